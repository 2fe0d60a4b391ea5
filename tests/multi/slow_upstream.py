"""An OpenAI-compatible upstream for the multi-gateway tests that counts what runs at once.

Every request streams a short answer after sleeping as long as its last message says ("sleep 1.5"), and is
counted in flight, per tag ("tag=abc"), from its arrival to its end or its client's disconnect. `GET
/stats/<tag>` gives {"in_flight", "max_in_flight", "requests"} for that tag: the most requests of one
key or account that ever ran upstream at once, whichever gateway sent them.

    python tests/multi/slow_upstream.py PORT
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections import defaultdict
from collections.abc import AsyncIterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

app = FastAPI()
STATS: dict[str, dict[str, int]] = defaultdict(lambda: {"in_flight": 0, "max_in_flight": 0, "requests": 0})


def _chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
    body = {"id": "up-1", "object": "chat.completion.chunk", "created": 1, "model": "slow",
            "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}]}
    if usage:
        body["usage"] = usage
    return f"data: {json.dumps(body)}\n\n"


@app.post("/v1/chat/completions")
async def chat(request: Request) -> StreamingResponse:
    body = await request.json()
    text = str(body["messages"][-1]["content"])
    sleep = float(m.group(1)) if (m := re.search(r"sleep ([\d.]+)", text)) else 0.0
    tag = m.group(1) if (m := re.search(r"tag=(\w+)", text)) else "-"
    stats = STATS[tag]
    stats["requests"] += 1
    stats["in_flight"] += 1
    stats["max_in_flight"] = max(stats["max_in_flight"], stats["in_flight"])

    async def events() -> AsyncIterator[str]:
        try:
            yield _chunk({"role": "assistant", "content": ""})
            await asyncio.sleep(sleep)
            yield _chunk({"content": "done"})
            yield _chunk({}, finish="stop")
            yield _chunk({}, usage={"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12})
            yield "data: [DONE]\n\n"
        finally:
            stats["in_flight"] -= 1

    return StreamingResponse(events(), media_type="text/event-stream")


@app.get("/stats/{tag}")
async def stats(tag: str) -> dict[str, int]:
    return dict(STATS[tag])


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")

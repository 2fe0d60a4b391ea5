"""A small faithful stand-in for DeepSeek's chat API, run as a real process for the remote-backend tests.

It streams as DeepSeek does: `reasoning_content` deltas when thinking is enabled (`thinking.type`), then
`content`, then a usage chunk with DeepSeek's own fields (`prompt_cache_hit_tokens`,
`prompt_cache_miss_tokens`, `completion_tokens_details.reasoning_tokens`). It demands its own key, and
records every request it got (`GET /requests`) so the tests can see what flashserve sent upstream.
The last user message steers it: "fail once" answers 503 to the first try, "reject" answers 400, "stall"
waits 30 s before answering, "slowly" streams a token every 0.2 s for a minute.

    python -m tests.e2e.fake_deepseek PORT KEY
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Iterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

app = FastAPI()
SEEN: list[dict] = []
FAILED_ONCE: set[str] = set()
KEY = "upstream-secret"


def _chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
    body = {"id": "ds-1", "object": "chat.completion.chunk", "created": 1, "model": "deepseek-v4-flash",
            "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}]}
    if usage:
        body["usage"] = usage
    return f"data: {json.dumps(body)}\n\n"


@app.post("/v1/chat/completions")
async def chat(request: Request) -> object:
    body = await request.json()
    SEEN.append({"headers": dict(request.headers), "body": body})
    if request.headers.get("authorization") != f"Bearer {KEY}":
        return JSONResponse({"error": {"message": "Authentication Fails", "type": "authentication_error"}}, 401)
    text = body["messages"][-1]["content"]
    if "reject" in text:
        return JSONResponse({"error": {"message": "Invalid max_tokens value", "type": "invalid_request_error",
                                       "param": "max_tokens"}}, 400)
    if "stall" in text:  # never answers in time
        await asyncio.sleep(30)
    if "fail once" in text and text not in FAILED_ONCE:
        FAILED_ONCE.add(text)
        return JSONResponse({"error": {"message": "Server overloaded"}}, 503)
    thinking = (body.get("thinking") or {}).get("type") == "enabled"

    if "slowly" in text:  # a token every 0.2 s for a minute: a stream still running when the test acts
        async def trickle() -> AsyncIterator[str]:
            yield _chunk({"role": "assistant", "content": ""})
            for _ in range(300):
                await asyncio.sleep(0.2)
                yield _chunk({"content": "tick "})

        return StreamingResponse(trickle(), media_type="text/event-stream")

    def events() -> Iterator[str]:
        yield _chunk({"role": "assistant", "content": ""})
        if thinking:
            yield _chunk({"reasoning_content": "Let me "})
            yield _chunk({"reasoning_content": "think."})
        for piece in ("Hello ", "from ", "upstream"):
            yield _chunk({"content": piece})
        yield _chunk({}, finish="stop")
        yield _chunk({}, usage={"prompt_tokens": 100, "completion_tokens": 7, "total_tokens": 107,
                                "prompt_cache_hit_tokens": 64, "prompt_cache_miss_tokens": 36,
                                "completion_tokens_details": {"reasoning_tokens": 3 if thinking else 0}})
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


@app.get("/requests")
async def requests() -> list[dict]:
    return SEEN


if __name__ == "__main__":
    KEY = sys.argv[2]
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")

"""A stand-in for llama-cpp-python's OpenAI server (0.3.x), run as a real process, keeping its rules:

- `x-request-id` must be a UUID: anything else gets HTTP 400 with an empty body (its starlette-context
  RequestIdPlugin does this), and the id is echoed on the response;
- its chat body has a fixed set of top-level fields (`LLAMACPP_FIELDS` below, read from the server's own
  request model). The real server silently ignores any other field; this stand-in refuses one with a 422
  naming it, stricter on purpose, so that flashserve never relies on a field llama.cpp would drop;
- `n` is accepted and ignored (one choice), `response_format` knows `text` and `json_object` (with an
  optional `schema`), not `json_schema`;
- a streamed answer carries no usage (it has no `stream_options`); a whole answer carries exact usage.

It records every request (`GET /requests`: headers and body). The last user message steers it: "reject"
answers an empty 400, as the real server does for a body it cannot use.

    python -m tests.e2e.fake_llamacpp PORT
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

app = FastAPI()
SEEN: list[dict] = []
LLAMACPP_FIELDS = {
    "model", "messages", "functions", "function_call", "tools", "tool_choice", "max_tokens", "min_tokens",
    "logprobs", "top_logprobs", "temperature", "top_p", "min_p", "stop", "stream", "presence_penalty",
    "frequency_penalty", "logit_bias", "seed", "response_format", "n", "user", "top_k", "repeat_penalty",
    "logit_bias_type", "mirostat_mode", "mirostat_tau", "mirostat_eta", "grammar"}
MESSAGE_FIELDS = {"role", "content", "name", "tool_calls", "tool_call_id", "function_call"}
USAGE = {"prompt_tokens": 21, "completion_tokens": 5, "total_tokens": 26}


def _valid_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


@app.middleware("http")
async def request_ids(request: Request, call_next):  # noqa: ANN001, ANN201 - starlette's middleware shape
    given = request.headers.get("x-request-id")
    if given is not None and not _valid_uuid(given):
        return Response(status_code=400)  # the real server's answer: no body at all
    response = await call_next(request)
    response.headers["x-request-id"] = given or str(uuid.uuid4())
    return response


def _refuse(field: str) -> JSONResponse:
    return JSONResponse({"detail": [{"type": "extra_forbidden", "loc": ["body", field],
                                     "msg": "Extra inputs are not permitted (stand-in's strict rule)"}]}, 422)


def _answer(body: dict) -> dict:
    """The message: a call of the named tool, a JSON object in JSON mode, else a fixed text."""
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and body.get("tools"):
        name = choice["function"]["name"]
        call = {"id": "call_llama0", "type": "function", "function": {"name": name, "arguments": '{"city": "Paris"}'}}
        return {"role": "assistant", "content": None, "tool_calls": [call]}
    fmt = body.get("response_format") or {}
    if fmt.get("type") == "json_object":
        return {"role": "assistant", "content": '{"answer": 42}'}
    return {"role": "assistant", "content": "Hello from llama"}


@app.post("/v1/chat/completions")
async def chat(request: Request) -> object:
    body = await request.json()
    SEEN.append({"headers": dict(request.headers), "body": body})
    extra = sorted(set(body) - LLAMACPP_FIELDS)
    if extra:
        return _refuse(extra[0])
    for i, message in enumerate(body.get("messages") or []):
        unknown = sorted(set(message) - MESSAGE_FIELDS)
        if unknown:
            return _refuse(f"messages.{i}.{unknown[0]}")
    fmt = body.get("response_format")
    if fmt is not None and fmt.get("type") not in ("text", "json_object"):
        return _refuse("response_format.type")
    if "reject" in str(body["messages"][-1].get("content")):
        return Response(status_code=400)
    message = _answer(body)
    finish = "tool_calls" if message.get("tool_calls") else "stop"
    if not body.get("stream"):
        return {"id": "chatcmpl-llama", "object": "chat.completion", "created": 1, "model": body.get("model"),
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
                "usage": USAGE}

    def events() -> Iterator[str]:
        def chunk(delta: dict, reason: str | None = None) -> str:
            return "data: " + json.dumps({"id": "chatcmpl-llama", "object": "chat.completion.chunk", "created": 1,
                                          "model": body.get("model"),
                                          "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}) + "\n\n"
        yield chunk({"role": "assistant"})
        for word in (message.get("content") or "").split(" "):
            yield chunk({"content": word + " "})
        yield chunk({}, finish)  # and no usage chunk: the real server has none
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


@app.get("/requests")
async def requests() -> list[dict]:
    return SEEN


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")

"""POST /v1/chat/completions: validate, hand to the model's backend, and
answer as one JSON object or as a server-sent event stream.

Whatever ends the request (completion, error, client disconnect), the
backend's generation is aborted or finished before the handler returns, so
no engine work outlives its client.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from flashserve.api.auth import require_api_key
from flashserve.api.errors import SERVER_ERROR, OpenAIError, invalid_request
from flashserve.api.schemas import ChatCompletionRequest
from flashserve.backends.base import Generation, RequestContext, Usage
from flashserve.catalog import ModelCard

log = logging.getLogger(__name__)
router = APIRouter()


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, tenant: str = Depends(require_api_key)
) -> JSONResponse | StreamingResponse:
    card, backend = request.app.state.catalog.resolve(body.model)
    check_request(body, card)
    ctx = RequestContext(request_id=f"chatcmpl-{uuid.uuid4().hex}", tenant=tenant)
    generation = await backend.open(body, ctx)
    meta = _Meta(ctx.request_id, int(time.time()), body.model, backend.system_fingerprint)
    if body.stream:
        return StreamingResponse(
            _sse(generation, meta, body.n or 1, body.include_usage),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-request-id": ctx.request_id},
        )
    return await _complete(generation, meta, body.n or 1, request)


def check_request(body: ChatCompletionRequest, card: ModelCard) -> None:
    """Checks that need the model card or span several fields."""
    if body.stream_options is not None and not body.stream:
        raise invalid_request("The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                              "stream_options", "invalid_value")
    for i, message in enumerate(body.messages):
        if not isinstance(message.content, list):
            continue
        for j, part in enumerate(message.content):
            if part.type != "text" and part.type not in card.input_modalities:
                raise invalid_request(
                    f"Content parts of type '{part.type}' are not supported: the model '{card.id}' accepts "
                    "text only.", f"messages[{i}].content[{j}]", "unsupported_content_type")


class _Meta:
    __slots__ = ("id", "created", "model", "fingerprint")

    def __init__(self, id: str, created: int, model: str, fingerprint: str) -> None:
        self.id, self.created, self.model, self.fingerprint = id, created, model, fingerprint


def usage_dict(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens, "text_tokens": usage.prompt_tokens,
                                  "audio_tokens": 0, "image_tokens": 0},
        "completion_tokens_details": {"text_tokens": usage.completion_tokens - usage.reasoning_tokens,
                                      "audio_tokens": 0, "reasoning_tokens": usage.reasoning_tokens},
    }


# -- non-streaming ---------------------------------------------------------------
async def _complete(generation: Generation, meta: _Meta, n: int, request: Request) -> JSONResponse:
    texts = [""] * n
    reasons: list[str | None] = [None] * n

    async def collect() -> None:
        async for delta in generation:
            texts[delta.index] += delta.content
            if delta.finish_reason:
                reasons[delta.index] = delta.finish_reason

    collector = asyncio.create_task(collect())
    watcher = asyncio.create_task(_wait_for_disconnect(request))
    try:
        await asyncio.wait({collector, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not collector.done():
            log.info("client disconnected; aborting %s", meta.id)
            collector.cancel()
            await generation.abort()
            return JSONResponse({}, status_code=499)
        collector.result()
    finally:
        watcher.cancel()
        if not collector.done():
            collector.cancel()
        await generation.abort()
    body = {
        "id": meta.id, "object": "chat.completion", "created": meta.created, "model": meta.model,
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": texts[i]}, "logprobs": None,
             "finish_reason": reasons[i]}
            for i in range(n)
        ],
        "usage": usage_dict(generation.usage),
        "system_fingerprint": meta.fingerprint,
    }
    return JSONResponse(body, headers={"x-request-id": meta.id})


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read, so the only message left to receive is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


# -- streaming -----------------------------------------------------------------------
def _event(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def _sse(generation: Generation, meta: _Meta, n: int, include_usage: bool) -> AsyncIterator[str]:
    def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {"id": meta.id, "object": "chat.completion.chunk", "created": meta.created,
                               "model": meta.model, "system_fingerprint": meta.fingerprint, "choices": choices}
        if include_usage:
            out["usage"] = None
        return out

    try:
        for i in range(n):
            yield _event(chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None}]))
        async for delta in generation:
            if delta.content:
                yield _event(chunk([{"index": delta.index, "delta": {"content": delta.content}, "logprobs": None,
                                     "finish_reason": None}]))
            if delta.finish_reason:
                yield _event(chunk([{"index": delta.index, "delta": {}, "logprobs": None,
                                     "finish_reason": delta.finish_reason}]))
        if include_usage:
            final = chunk([])
            final["usage"] = usage_dict(generation.usage)
            yield _event(final)
        yield _event("[DONE]")
    except OpenAIError as exc:
        yield _event(exc.body())
        yield _event("[DONE]")
    except Exception:  # noqa: BLE001 - headers are sent; report in-band
        log.exception("stream %s failed", meta.id)
        yield _event(OpenAIError(500, "The server had an error while generating.", SERVER_ERROR).body())
        yield _event("[DONE]")
    finally:
        # Runs on completion and on disconnect (cancellation); shield the awaited abort from the cancel.
        with anyio.CancelScope(shield=True):
            await generation.abort()

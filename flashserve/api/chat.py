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
from typing import Annotated, Any, TypeVar

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from flashserve.accounts.keys import Principal
from flashserve.accounts.pricing import format_usd, usd_from_pusd
from flashserve.api.auth import require_api_key
from flashserve.api.billing import Meter
from flashserve.api.errors import SERVER_ERROR, OpenAIError, invalid_request
from flashserve.api.schemas import ChatCompletionRequest
from flashserve.backends.base import Generation, RequestContext, Usage
from flashserve.backends.remote import CACHE_SALT_HEADER
from flashserve.catalog import ModelCard
from flashserve.chat.tools import ParsedCall

log = logging.getLogger(__name__)
router = APIRouter()
COST_HEADER = "x-flashserve-cost-usd"
T = TypeVar("T")


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, principal: Annotated[Principal, Depends(require_api_key)]
) -> JSONResponse | StreamingResponse:
    card, backend = request.app.state.catalog.resolve(body.model)
    check_request(body, card)
    # A router in front (backends/router.py) passes its tenant along: it can only narrow the namespace of
    # this account's prefix cache, never reach another account's.
    salt = request.headers.get(CACHE_SALT_HEADER, "")[:200]
    tenant = principal.account_id + (f"/{salt}" if salt else "")
    ctx = RequestContext(request_id=f"chatcmpl-{uuid.uuid4().hex}", tenant=tenant)
    meter = await Meter.admit(request.app.state.accounts, principal, card.id, card.token_prices, ctx.request_id)
    try:
        generation = await backend.open(body, ctx)
    except BaseException:
        meter.release_unused()
        raise
    meta = _Meta(ctx.request_id, int(time.time()), body.model, backend.system_fingerprint)
    if body.stream:
        return StreamingResponse(
            _sse(generation, meter, meta, body.n or 1, body.include_usage, request.app.state.sse_keepalive_s),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-request-id": ctx.request_id},
        )
    return await _complete(generation, meter, meta, body.n or 1, request)


def check_request(body: ChatCompletionRequest, card: ModelCard) -> None:
    """Checks that need the model card or span several fields."""
    if body.stream_options is not None and not body.stream:
        raise invalid_request("The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                              "stream_options", "invalid_value")
    call_ids: set[str] = set()
    for i, message in enumerate(body.messages):
        for call in message.tool_calls or ():
            call_ids.add(call.id)
        if message.role == "tool" and message.tool_call_id not in call_ids:
            raise invalid_request(f"messages[{i}] answers tool call '{message.tool_call_id}', but no earlier "
                                  "assistant message made a call with that id.", f"messages[{i}].tool_call_id",
                                  "invalid_tool_call_id")
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


def usage_dict(usage: Usage, cost_pusd: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens, "text_tokens": usage.prompt_tokens,
                                  "audio_tokens": 0, "image_tokens": 0},
        "completion_tokens_details": {"text_tokens": usage.completion_tokens - usage.reasoning_tokens,
                                      "audio_tokens": 0, "reasoning_tokens": usage.reasoning_tokens},
    }
    if cost_pusd is not None:
        out["cost"] = float(usd_from_pusd(cost_pusd))  # USD, as OpenRouter reports it
    return out


# -- non-streaming ---------------------------------------------------------------
async def _complete(generation: Generation, meter: Meter, meta: _Meta, n: int, request: Request) -> JSONResponse:
    texts = [""] * n
    thoughts = [""] * n
    calls: list[list[dict[str, Any]]] = [[] for _ in range(n)]
    reasons: list[str | None] = [None] * n

    async def collect() -> None:
        async for delta in generation:
            texts[delta.index] += delta.content
            thoughts[delta.index] += delta.reasoning_content
            calls[delta.index].extend(_call_dict(c) for c in delta.tool_calls)
            if delta.finish_reason:
                reasons[delta.index] = delta.finish_reason

    collector = asyncio.create_task(collect())
    watcher = asyncio.create_task(_wait_for_disconnect(request))
    status = "error"
    try:
        await asyncio.wait({collector, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not collector.done():
            log.info("client disconnected; aborting %s", meta.id)
            status = "cancelled"
            collector.cancel()
            await generation.abort()
            return JSONResponse({}, status_code=499)
        collector.result()
        status = "ok"
    finally:
        watcher.cancel()
        if not collector.done():
            collector.cancel()
        with anyio.CancelScope(shield=True):
            await generation.abort()
            cost = await meter.record(generation.usage, status)
    body = {
        "id": meta.id, "object": "chat.completion", "created": meta.created, "model": meta.model,
        "choices": [
            {"index": i, "message": _message(texts[i], calls[i], thoughts[i]), "logprobs": None,
             "finish_reason": reasons[i]}
            for i in range(n)
        ],
        "usage": usage_dict(generation.usage, cost),
        "system_fingerprint": meta.fingerprint,
    }
    return JSONResponse(body, headers={"x-request-id": meta.id, COST_HEADER: format_usd(cost)})


def _call_dict(call: ParsedCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def _message(text: str, calls: list[dict[str, Any]], reasoning: str = "") -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
    if reasoning:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = calls
    return message


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read, so the only message left to receive is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


# -- streaming -----------------------------------------------------------------------
def _event(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


KEEPALIVE = ": keep-alive\n\n"  # an SSE comment: clients skip it, proxies see the stream is alive


async def _paced(source: AsyncIterator[T], interval: float) -> AsyncIterator[T | None]:
    """The source's items, with None each time `interval` seconds pass without one (a request waiting in
    the engine's queue, or a slow step), so the stream can send a keep-alive meanwhile."""
    it = source.__aiter__()
    pending: asyncio.Future[T] = asyncio.ensure_future(it.__anext__())
    try:
        while True:
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield None
                continue
            try:
                item = pending.result()
            except StopAsyncIteration:
                return
            yield item
            pending = asyncio.ensure_future(it.__anext__())
    finally:
        if not pending.done():
            pending.cancel()


async def _sse(generation: Generation, meter: Meter, meta: _Meta, n: int,
               include_usage: bool, keepalive_s: float = 10.0) -> AsyncIterator[str]:
    def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {"id": meta.id, "object": "chat.completion.chunk", "created": meta.created,
                               "model": meta.model, "system_fingerprint": meta.fingerprint, "choices": choices}
        if include_usage:
            out["usage"] = None
        return out

    status = "cancelled"  # unless the stream ends below, the client went away
    try:
        for i in range(n):
            yield _event(chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None}]))
        call_counts = [0] * n
        try:
            async for delta in _paced(generation, keepalive_s):
                if delta is None:
                    yield KEEPALIVE
                    continue
                if delta.reasoning_content:
                    yield _event(chunk([{"index": delta.index, "delta": {"reasoning_content": delta.reasoning_content},
                                         "logprobs": None, "finish_reason": None}]))
                if delta.content:
                    yield _event(chunk([{"index": delta.index, "delta": {"content": delta.content},
                                         "logprobs": None, "finish_reason": None}]))
                for call in delta.tool_calls:
                    # As OpenAI streams them: the call's index, id and name first, then its arguments.
                    k = call_counts[delta.index]
                    call_counts[delta.index] += 1
                    head = {"index": k, "id": call.id, "type": "function",
                            "function": {"name": call.name, "arguments": ""}}
                    yield _event(chunk([{"index": delta.index, "delta": {"tool_calls": [head]}, "logprobs": None,
                                         "finish_reason": None}]))
                    args = {"index": k, "function": {"arguments": call.arguments}}
                    yield _event(chunk([{"index": delta.index, "delta": {"tool_calls": [args]}, "logprobs": None,
                                         "finish_reason": None}]))
                if delta.finish_reason:
                    yield _event(chunk([{"index": delta.index, "delta": {}, "logprobs": None,
                                         "finish_reason": delta.finish_reason}]))
        except Exception as exc:  # noqa: BLE001 - headers are sent; report in-band
            status = "error"
            if not isinstance(exc, OpenAIError):
                log.exception("stream %s failed", meta.id)
                exc = OpenAIError(500, "The server had an error while generating.", SERVER_ERROR)
            yield _event(exc.body())
            yield _event("[DONE]")
            return
        status = "ok"
        with anyio.CancelScope(shield=True):
            cost = await meter.record(generation.usage, status)
        if include_usage:
            final = chunk([])
            final["usage"] = usage_dict(generation.usage, cost)
            yield _event(final)
        yield _event("[DONE]")
    finally:
        # Runs on completion, on error and on disconnect (cancellation): shield the awaited
        # abort and the usage write from the cancel so neither is lost.
        with anyio.CancelScope(shield=True):
            await generation.abort()
            await meter.record(generation.usage, status)

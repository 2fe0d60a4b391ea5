"""POST /v1/chat/completions: OpenAI's chat completions as an adapter over `api/core.py`.

Also served where DeepSeek's SDK examples send it: `/chat/completions` (base URL without `/v1`) and
`/beta/chat/completions` (DeepSeek's beta base URL, home of chat prefix completion; prefix completion
works on every one of these paths).

This module owns only the wire format: the request body (`api/schemas.py: ChatCompletionRequest`) ->
`generation.py: GenerationRequest` (`generation_request`), the checks that need the model card, and the
core's deltas -> one `chat.completion` JSON object or `chat.completion.chunk` server-sent events. Billing,
limits, disconnects, keep-alives and the drain are the core's.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from flashserve.accounts.keys import Principal
from flashserve.accounts.pricing import format_usd, usd_from_pusd
from flashserve.api.auth import require_api_key
from flashserve.api.core import COST_HEADER, Call, Failed, Finished, KeepAlive, open_call
from flashserve.api.errors import openai_body
from flashserve.api.schemas import ChatCompletionRequest, ChatMessage, ContentPart, ThinkingSwitch
from flashserve.catalog import ModelCard
from flashserve.errors import invalid_request
from flashserve.generation import (
    ChoiceDelta,
    GenerationRequest,
    Message,
    Reasoning,
    ResponseFormat,
    Sampling,
    TokenLogprob,
    ToolCall,
    ToolChoice,
    ToolSpec,
    Usage,
)

router = APIRouter()
KEEPALIVE = ": keep-alive\n\n"  # an SSE comment: clients skip it, proxies see the stream is alive


@router.post("/v1/chat/completions", response_model=None)
@router.post("/chat/completions", response_model=None, include_in_schema=False)
@router.post("/beta/chat/completions", response_model=None, include_in_schema=False)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, principal: Annotated[Principal, Depends(require_api_key)]
) -> JSONResponse | StreamingResponse:
    return await serve_chat_completion(body, request, principal)


async def serve_chat_completion(body: ChatCompletionRequest, request: Request,
                                principal: Principal) -> JSONResponse | StreamingResponse:
    """A chat completion for `principal`, however it was authenticated (a Bearer key here; the console's
    session for its playground, `api/console/playground.py`): the same core, billing and streaming."""
    call = await open_call(request, principal, generation_request(body), id_prefix="chatcmpl",
                           check=lambda card: check_request(body, card))
    n = body.n or 1
    if body.stream:
        return StreamingResponse(_sse(call, body.model, n, body.include_usage, bool(body.logprobs)),
                                 media_type="text/event-stream", headers={"cache-control": "no-cache", **call.headers})
    return await _complete(call, body.model, n, request, bool(body.logprobs))


# -- request ---------------------------------------------------------------------------------------------
def generation_request(body: ChatCompletionRequest) -> GenerationRequest:
    """The chat completions body as the internal request every backend takes."""
    fmt = body.response_format
    response_format = None
    if fmt is not None:
        spec = fmt.json_schema
        schema = fmt.schema_ if fmt.schema_ is not None else (spec.schema_ if spec is not None else None)
        response_format = ResponseFormat(fmt.type, schema, spec.name if spec else None,
                                         spec.description if spec else None, spec.strict if spec else None)
    choice = body.tool_choice
    tool_choice = None if choice is None else (
        ToolChoice(choice) if isinstance(choice, str) else ToolChoice("named", choice.function.name))
    passthrough = {k: v for k, v in (("store", body.store), ("metadata", body.metadata),
                                     ("service_tier", body.service_tier)) if v is not None}
    return GenerationRequest(
        model=body.model,
        messages=[message_of(m) for m in body.messages],
        tools=tuple(ToolSpec(t.function.name, t.function.description, t.function.parameters, t.function.strict)
                    for t in body.tools or ()),
        tool_choice=tool_choice,
        parallel_tool_calls=body.parallel_tool_calls,
        response_format=response_format,
        sampling=Sampling(
            temperature=body.temperature, top_p=body.top_p, max_tokens=body.max_output_tokens,
            stop=tuple(body.stop_list), seed=body.seed, presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty, logit_bias=body.logit_bias, n=body.n or 1,
            logprobs=body.logprobs, top_logprobs=body.top_logprobs,
        ),
        reasoning=reasoning(body.reasoning_effort, body.thinking),
        stream=bool(body.stream),
        user=body.user,
        modalities=tuple(body.modalities) if body.modalities is not None else None,
        audio=body.audio.model_dump() if body.audio is not None else None,
        passthrough=passthrough,
    )


def reasoning(effort: str | None, switch: ThinkingSwitch | None) -> Reasoning:
    """`reasoning_effort` and DeepSeek's `thinking` switch together: disabled wins over any effort (which
    is then ignored: clients send both); enabled without an effort thinks in the default mode."""
    if switch is None:
        return Reasoning(effort=effort)
    if switch.type == "disabled":
        return Reasoning(thinking=False)
    return Reasoning(effort=effort if effort != "none" else None, thinking=True, budget_tokens=switch.budget_tokens)


def message_of(message: ChatMessage) -> Message:
    return Message(
        role=message.role,
        content=_text(message.content),
        reasoning_content=message.reasoning_content,
        tool_calls=tuple(ToolCall(c.id, c.function.name, c.function.arguments) for c in message.tool_calls or ()),
        tool_call_id=message.tool_call_id,
        name=message.name,
        prefix=bool(message.prefix),
    )


def _text(content: str | list[ContentPart] | None) -> str | None:
    """A message's text; text parts are joined with newlines (other parts are refused by check_request)."""
    if content is None or isinstance(content, str):
        return content
    return "\n".join(part.text or "" for part in content if part.type == "text")


def check_request(body: ChatCompletionRequest, card: ModelCard) -> None:
    """Checks that need the model card or span several fields."""
    if body.stream_options is not None and not body.stream:
        raise invalid_request("The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                              "stream_options", "invalid_value")
    if body.top_logprobs is not None and not body.logprobs:
        raise invalid_request("Invalid value for 'top_logprobs': it is only allowed when 'logprobs' is true.",
                              "top_logprobs", "invalid_value")
    check_messages(body.messages)
    check_content_parts(body.messages, card)


def check_content_parts(messages: list[ChatMessage], card: ModelCard) -> None:
    """Content parts the model cannot read are refused (their text would be all that is left)."""
    for i, message in enumerate(messages):
        if not isinstance(message.content, list):
            continue
        for j, part in enumerate(message.content):
            if part.type != "text" and part.type not in card.input_modalities:
                raise invalid_request(
                    f"Content parts of type '{part.type}' are not supported: the model '{card.id}' accepts "
                    "text only.", f"messages[{i}].content[{j}]", "unsupported_content_type")


def check_messages(messages: list[ChatMessage]) -> None:
    """Message fields that change the request's meaning are served or refused, never dropped; tool results
    answer earlier calls."""
    call_ids: set[str] = set()
    last = len(messages) - 1
    for i, message in enumerate(messages):
        if message.prefix and (i != last or message.role != "assistant"):
            raise invalid_request(f"messages[{i}] has 'prefix': only the last message, and only an assistant "
                                  "message, can be a prefix the answer continues.", f"messages[{i}].prefix",
                                  "invalid_value")
        if message.function_call is not None:
            raise invalid_request(f"messages[{i}].function_call is the deprecated function calling: send the "
                                  "call as 'tool_calls'.", f"messages[{i}].function_call", "unsupported_parameter")
        if message.audio is not None:
            raise invalid_request(f"messages[{i}].audio refers to an earlier audio answer, which this server "
                                  "never gives: send its transcript as 'content'.", f"messages[{i}].audio",
                                  "unsupported_parameter")
        for call in message.tool_calls or ():
            call_ids.add(call.id)
        if message.role == "tool" and message.tool_call_id not in call_ids:
            raise invalid_request(f"messages[{i}] answers tool call '{message.tool_call_id}', but no earlier "
                                  "assistant message made a call with that id.", f"messages[{i}].tool_call_id",
                                  "invalid_tool_call_id")


# -- response --------------------------------------------------------------------------------------------
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


def token_logprob_dicts(entries: list[TokenLogprob]) -> list[dict[str, Any]]:
    """Token logprobs in OpenAI's shape (chat's `logprobs.content`, the Responses output_text `logprobs`)."""
    return [{"token": e.token, "logprob": e.logprob, "bytes": list(e.bytes),
             "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes)} for t in e.top]}
            for e in entries]


def _logprobs_dict(entries: list[TokenLogprob], text: str) -> dict[str, Any]:
    """A choice's `logprobs`: one entry per content token; `content: null` where there is no content (a
    tool-call-only answer), as the message's own `content` is."""
    return {"content": token_logprob_dicts(entries) if text or entries else None, "refusal": None}


async def _complete(call: Call, model: str, n: int, request: Request, logprobs: bool = False) -> JSONResponse:
    texts = [""] * n
    thoughts = [""] * n
    calls: list[list[dict[str, Any]]] = [[] for _ in range(n)]
    reasons: list[str | None] = [None] * n
    token_logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]

    def add(delta: ChoiceDelta) -> None:
        token_logprobs[delta.index].extend(delta.logprobs)
        texts[delta.index] += delta.content
        thoughts[delta.index] += delta.reasoning_content
        calls[delta.index].extend(_call_dict(c) for c in delta.tool_calls)
        if delta.finish_reason:
            reasons[delta.index] = delta.finish_reason

    cost = await call.collect(add, request)
    if cost is None:
        return JSONResponse({}, status_code=499)  # the client left; nobody reads this
    body = {
        "id": call.id, "object": "chat.completion", "created": call.created, "model": model,
        "choices": [
            {"index": i, "message": _message_dict(texts[i], calls[i], thoughts[i]),
             "logprobs": _logprobs_dict(token_logprobs[i], texts[i]) if logprobs else None,
             "finish_reason": reasons[i]}
            for i in range(n)
        ],
        "usage": usage_dict(call.usage, cost),
        "system_fingerprint": call.system_fingerprint,
    }
    return JSONResponse(body, headers={**call.headers, COST_HEADER: format_usd(cost)})


def _call_dict(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def _message_dict(text: str, calls: list[dict[str, Any]], reasoning: str = "") -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
    if reasoning:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = calls
    return message


def _event(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def _sse(call: Call, model: str, n: int, include_usage: bool,
               logprobs: bool = False) -> AsyncIterator[str]:
    def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {"id": call.id, "object": "chat.completion.chunk", "created": call.created,
                               "model": model, "system_fingerprint": call.system_fingerprint, "choices": choices}
        if include_usage:
            out["usage"] = None
        return out

    def choice(index: int, delta: dict[str, Any], finish_reason: str | None = None,
               token_logprobs: dict[str, Any] | None = None) -> str:
        return _event(chunk([{"index": index, "delta": delta, "logprobs": token_logprobs,
                              "finish_reason": finish_reason}]))

    async with call.streaming() as events:
        for i in range(n):
            yield choice(i, {"role": "assistant", "content": ""})
        call_counts = [0] * n
        async for event in events:
            if isinstance(event, KeepAlive):
                yield KEEPALIVE
            elif isinstance(event, Failed):  # headers are sent: reported in-band
                yield _event(openai_body(event.error))
                yield _event("[DONE]")
                return
            elif isinstance(event, Finished):
                if include_usage:
                    final = chunk([])
                    final["usage"] = usage_dict(event.usage, event.cost_pusd)
                    yield _event(final)
                yield _event("[DONE]")
            else:
                if event.reasoning_content:
                    yield choice(event.index, {"reasoning_content": event.reasoning_content})
                if event.content or (logprobs and event.logprobs):
                    # Each content chunk carries the logprobs of the tokens whose text it completes.
                    yield choice(event.index, {"content": event.content}, None,
                                 _logprobs_dict(event.logprobs, event.content) if logprobs else None)
                for tool_call in event.tool_calls:
                    # As OpenAI streams them: the call's index, id and name first, then its arguments.
                    k = call_counts[event.index]
                    call_counts[event.index] += 1
                    head = {"index": k, "id": tool_call.id, "type": "function",
                            "function": {"name": tool_call.name, "arguments": ""}}
                    yield choice(event.index, {"tool_calls": [head]})
                    yield choice(event.index, {"tool_calls": [{"index": k,
                                                               "function": {"arguments": tool_call.arguments}}]})
                if event.finish_reason:
                    yield choice(event.index, {}, event.finish_reason)

"""POST /v1/messages (and /anthropic/v1/messages): Anthropic's Messages API as an adapter over `api/core.py`.

This module owns only the wire format: the request body (`api/anthropic_schemas.py: MessagesRequest`) ->
`generation.py: GenerationRequest` (`generation_request`), and the core's deltas -> one `message` JSON
object or Anthropic's named server-sent events (message_start, content_block_start/delta/stop,
message_delta, message_stop; `ping` for the core's keep-alive; `error` in-band). Billing, limits,
disconnects, keep-alives and the drain are the core's; errors on these paths are rendered in Anthropic's
shape by `api/errors.py`.

Choices made here (the README's "Anthropic Messages API" section documents them):
- `claude-*` model names map to a catalog model (`AppState.anthropic_models`, glob -> model id); the
  response echoes the name the client sent.
- `system` text blocks and `role: "system"` messages (Claude Code sends one) become one system prompt, in
  order; a block starting with `x-anthropic-billing-header:` (Claude Code's, different for every prompt) is
  left out, so the prompt's prefix stays cacheable.
- Thinking travels through the client sealed: a thinking block's `signature` is its text sealed with the
  deployment secret (`sealed_reasoning.py`), prefixed `SIGNATURE_PREFIX`. A thinking block sent back with
  our signature is opened (a changed one is a 400) and given to the model as the assistant's
  `reasoning_content`; one with no signature or another issuer's (real Claude) is dropped, as are
  `redacted_thinking` blocks: a conversation moved here from Anthropic keeps working.
- Server tools (`web_search_*`, `bash_*`, ...) are left out and named in `x-flashserve-dropped-tools`;
  images and documents are refused (`surface_policy.py`).
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from flashserve.accounts.keys import Principal
from flashserve.api.anthropic_schemas import ContentBlock, CountTokensRequest, MessagesRequest
from flashserve.api.auth import require_api_key
from flashserve.api.core import Call, Failed, Finished, KeepAlive, open_call, respond
from flashserve.api.errors import anthropic_body
from flashserve.api.sealed_reasoning import open_reasoning, seal_reasoning
from flashserve.api.state import app_state
from flashserve.api.surface_policy import dropped_tools_headers, refuse_content
from flashserve.errors import invalid_request
from flashserve.generation import (
    ChoiceDelta,
    GenerationRequest,
    Message,
    Reasoning,
    Sampling,
    ToolCall,
    ToolChoice,
    ToolSpec,
    Usage,
)
from flashserve.server_key import ServerKey

router = APIRouter()
SIGNATURE_PREFIX = "fs1."  # marks a signature we sealed ('.' is outside the sealed token's alphabet)
BILLING_HEADER_PREFIX = "x-anthropic-billing-header:"
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "content_filter": "refusal"}
PING = 'event: ping\ndata: {"type": "ping"}\n\n'


@router.post("/v1/messages", response_model=None)
@router.post("/anthropic/v1/messages", response_model=None, include_in_schema=False)
async def create_message(body: MessagesRequest, request: Request,
                         principal: Annotated[Principal, Depends(require_api_key)]) -> JSONResponse | StreamingResponse:
    state = app_state(request)
    gen, dropped = generation_request(body, state.server_key, principal.account_id, state.anthropic_models)
    gen.cache_key = request.headers.get("x-claude-code-session-id") or None
    call = await open_call(request, principal, gen, id_prefix="msg")
    headers = {**call.headers, **dropped_tools_headers(dropped)}
    view = _View(call, body.model, state.server_key, principal.account_id,
                 omit_thinking=body.thinking is not None and body.thinking.display == "omitted")
    return await respond(view, bool(body.stream), request, headers)


@router.post("/v1/messages/count_tokens")
@router.post("/anthropic/v1/messages/count_tokens", include_in_schema=False)
async def count_tokens(body: CountTokensRequest, request: Request,
                       principal: Annotated[Principal, Depends(require_api_key)]) -> JSONResponse:
    """The prompt's tokens as the generation would see them; free. Exact for the local engine, an estimate
    for a remote upstream (`Backend.count_tokens`)."""
    state = app_state(request)
    gen, dropped = generation_request(body, state.server_key, principal.account_id, state.anthropic_models)
    _, backend = state.catalog.resolve(gen.model)
    n = await backend.count_tokens(gen)
    return JSONResponse({"input_tokens": n}, headers=dropped_tools_headers(dropped))


# -- request ---------------------------------------------------------------------------------------------
def catalog_model(name: str, mapping: dict[str, str]) -> str:
    """The catalog id a client's model name means: the first matching pattern of `mapping` (e.g.
    "claude-*" -> "deepseek/deepseek-v4-flash"), else the name itself."""
    for pattern, target in mapping.items():
        if fnmatch.fnmatchcase(name, pattern):
            return target
    return name


def generation_request(body: CountTokensRequest, key: ServerKey, account_id: str,
                       models: dict[str, str]) -> tuple[GenerationRequest, list[str]]:
    """The Messages body as the internal request, and the server tools left out of it."""
    system: list[str] = _system_texts(body.system, "system")
    messages: list[Message] = []
    for i, message in enumerate(body.messages):
        where = f"messages[{i}]"
        if message.role == "system":
            system.extend(_system_texts(message.content, f"{where}.content"))
        elif message.role == "user":
            messages.extend(_user_messages(message.content, where))
        else:
            messages.append(_assistant_message(message.content, where, key, account_id))
    _check_tool_results(messages)
    if body.context_management is not None:
        messages = _clear_thinking(messages, body.context_management.edits)
    if system:
        messages.insert(0, Message(role="system", content="\n\n".join(system)))
    tools = [t for t in body.tools or () if t.is_custom]
    dropped = [t.name or t.type or "" for t in body.tools or () if not t.is_custom]
    choice = body.tool_choice
    tool_choice = None
    if choice is not None:
        mode = {"auto": "auto", "any": "required", "tool": "named", "none": "none"}[choice.type]
        tool_choice = ToolChoice(mode, choice.name if choice.type == "tool" else None)  # type: ignore[arg-type]
    gen = GenerationRequest(
        model=catalog_model(body.model, models),
        messages=messages,
        tools=tuple(ToolSpec(t.name, t.description, t.input_schema) for t in tools),
        tool_choice=tool_choice if tools or choice is None or choice.type == "none" else None,
        parallel_tool_calls=False if choice is not None and choice.disable_parallel_tool_use else None,
        reasoning=_reasoning(body),
    )
    if isinstance(body, MessagesRequest):
        gen.sampling = Sampling(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                                max_tokens=body.max_tokens, stop=tuple(body.stop_sequences or ()))
        gen.stream = bool(body.stream)
        gen.user = body.metadata.user_id if body.metadata is not None else None
    return gen, dropped


def _reasoning(body: CountTokensRequest) -> Reasoning:
    """`thinking` and `output_config.effort` onto the efforts chat completions takes (`chat/reasoning.py`):
    enabled/adaptive -> thinking on with the effort given (else the default mode); disabled -> off; no
    `thinking` -> the model's default, or the effort given. The effort is the last one a message gives
    (per-turn control: Claude Code sets `output_config` on a message of the conversation), else the
    request's own `output_config.effort`."""
    effort = body.output_config.effort if body.output_config is not None else None
    for message in body.messages:
        if message.output_config is not None and message.output_config.effort is not None:
            effort = message.output_config.effort
    thinking = body.thinking
    if thinking is None:
        return Reasoning(effort=effort)
    if thinking.type == "disabled":
        return Reasoning(effort="none", thinking=False)
    return Reasoning(effort=effort, thinking=True, budget_tokens=thinking.budget_tokens)


def _system_texts(content: str | list[ContentBlock] | None, where: str) -> list[str]:
    if content is None:
        return []
    if isinstance(content, str):
        return [content] if content else []
    out: list[str] = []
    for j, block in enumerate(content):
        if block.type != "text":
            raise refuse_content(block.type, f"{where}[{j}]")
        text = block.text or ""
        if text and not text.startswith(BILLING_HEADER_PREFIX):
            out.append(text)
    return out


def _blocks(content: str | list[ContentBlock]) -> list[ContentBlock]:
    return [ContentBlock(type="text", text=content)] if isinstance(content, str) else content


def _user_messages(content: str | list[ContentBlock], where: str) -> list[Message]:
    """A user turn: its tool results become tool messages, its text a user message, in their order."""
    out: list[Message] = []
    texts: list[str] = []
    for j, block in enumerate(_blocks(content)):
        if block.type == "text":
            texts.append(block.text or "")
        elif block.type == "tool_result":
            if texts:
                out.append(Message(role="user", content="\n".join(texts)))
                texts = []
            text = _result_text(block.content, f"{where}.content[{j}].content")
            if block.is_error:
                text = f"Error: {text}"
            out.append(Message(role="tool", content=text, tool_call_id=block.tool_use_id))
        else:
            raise refuse_content(block.type, f"{where}.content[{j}]")
    if texts:
        out.append(Message(role="user", content="\n".join(texts)))
    return out


def _result_text(content: str | list[ContentBlock] | None, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for k, block in enumerate(content):
        if block.type != "text":
            raise refuse_content(block.type, f"{where}[{k}]")
        parts.append(block.text or "")
    return "\n".join(parts)


def _assistant_message(content: str | list[ContentBlock], where: str, key: ServerKey, account_id: str) -> Message:
    texts: list[str] = []
    thoughts: list[str] = []
    calls: list[ToolCall] = []
    for j, block in enumerate(_blocks(content)):
        if block.type == "text":
            texts.append(block.text or "")
        elif block.type == "thinking":
            signature = block.signature or ""
            if signature.startswith(SIGNATURE_PREFIX):  # ours: opened, or a 400 when changed
                thoughts.append(open_reasoning(key, account_id, signature.removeprefix(SIGNATURE_PREFIX),
                                               f"{where}.content[{j}].signature"))
            # else: no signature, or another issuer's (real Claude): dropped
        elif block.type == "redacted_thinking":
            continue
        elif block.type == "tool_use":
            calls.append(ToolCall(block.id or "", block.name or "", json.dumps(block.input, ensure_ascii=False)))
        else:
            raise refuse_content(block.type, f"{where}.content[{j}]")
    return Message(role="assistant", content="".join(texts) if texts or not calls else None,
                   reasoning_content="".join(thoughts) or None, tool_calls=tuple(calls))


def _check_tool_results(messages: list[Message]) -> None:
    """A tool_result must answer a tool_use of an earlier assistant turn (as Anthropic checks)."""
    called: set[str] = set()
    for m in messages:
        if m.role == "assistant":
            called.update(c.id for c in m.tool_calls)
        elif m.role == "tool" and m.tool_call_id not in called:
            raise invalid_request(f"unexpected `tool_use_id` found in `tool_result` blocks: {m.tool_call_id}. Each "
                                  "`tool_result` block must have a corresponding `tool_use` block in an earlier "
                                  "assistant message.", "messages", "invalid_tool_use_id")


def _clear_thinking(messages: list[Message], edits: list[Any]) -> list[Message]:
    """`context_management` clear_thinking edits: keep the thinking of the last N assistant turns that have
    some (`keep: {"type": "thinking_turns", "value": N}`; default 1, Anthropic's), all with `keep: "all"`."""
    keep: int | None = None
    for edit in edits:
        if not edit.type.startswith("clear_thinking"):
            continue
        if edit.keep == "all":
            return messages
        value = edit.keep.get("value") if isinstance(edit.keep, dict) else None
        keep = value if isinstance(value, int) and value >= 0 else 1
    if keep is None:
        return messages
    thinking_turns = [i for i, m in enumerate(messages) if m.role == "assistant" and m.reasoning_content]
    cleared = set(thinking_turns[:max(len(thinking_turns) - keep, 0)])
    return [Message(m.role, m.content, None, m.tool_calls, m.tool_call_id, m.name, m.prefix) if i in cleared else m
            for i, m in enumerate(messages)]


# -- response --------------------------------------------------------------------------------------------
def usage_dict(usage: Usage) -> dict[str, Any]:
    """Anthropic's usage: `input_tokens` are the prompt tokens not read from the cache."""
    return {"input_tokens": usage.prompt_tokens - usage.cached_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": usage.cached_tokens,
            "output_tokens": usage.completion_tokens}


def tool_use_id(call_id: str) -> str:
    return call_id if call_id.startswith("toolu_") else "toolu_" + call_id.removeprefix("call_")


def _input(arguments: str) -> dict[str, Any]:
    try:
        value = json.loads(arguments or "{}")
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _sse(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


class _View:
    """One response being built from the call's deltas: the content blocks in order (thinking, text,
    tool_use), the stop reason, and the events that stream them."""

    def __init__(self, call: Call, model: str, key: ServerKey, account_id: str, omit_thinking: bool) -> None:
        self.call = call
        self.model = model
        self.key = key
        self.account_id = account_id
        self.omit_thinking = omit_thinking
        self.id = call.id  # msg_…: the request id (flashserve/ids.py)
        self.finish_reason: str | None = None
        self.stop_sequence: str | None = None  # the stop string that ended the answer (backends/ say which)
        self.has_calls = False

    def signature(self, thinking: str) -> str:
        return SIGNATURE_PREFIX + seal_reasoning(self.key, self.account_id, thinking)

    def stop_reason(self) -> str:
        if self.has_calls:
            return "tool_use"
        if self.stop_sequence is not None:
            return "stop_sequence"
        return STOP_REASONS.get(self.finish_reason or "stop", "end_turn")

    def message(self, content: list[dict[str, Any]], usage: Usage | None, stop: bool) -> dict[str, Any]:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": content,
                "stop_reason": self.stop_reason() if stop else None,
                "stop_sequence": self.stop_sequence if stop and not self.has_calls else None,
                "usage": usage_dict(usage or Usage())}

    # -- not streaming ---------------------------------------------------------------------------------
    async def collect(self, request: Request) -> tuple[dict[str, Any], int] | None:
        thinking: list[str] = []
        text: list[str] = []
        calls: list[ToolCall] = []

        def add(delta: ChoiceDelta) -> None:
            thinking.append(delta.reasoning_content)
            text.append(delta.content)
            calls.extend(delta.tool_calls)
            if delta.finish_reason:
                self.finish_reason = delta.finish_reason
                self.stop_sequence = delta.stop_sequence

        cost = await self.call.collect(add, request)
        if cost is None:
            return None
        self.has_calls = bool(calls)
        content: list[dict[str, Any]] = []
        reasoning = "".join(thinking)
        if reasoning:
            content.append({"type": "thinking", "thinking": "" if self.omit_thinking else reasoning,
                            "signature": self.signature(reasoning)})
        if "".join(text):
            content.append({"type": "text", "text": "".join(text)})
        content.extend({"type": "tool_use", "id": tool_use_id(c.id), "name": c.name, "input": _input(c.arguments)}
                       for c in calls)
        return self.message(content, self.call.usage, stop=True), cost

    # -- streaming -------------------------------------------------------------------------------------
    async def events(self) -> AsyncIterator[str]:
        index = -1
        open_kind: str | None = None  # "thinking" | "text" while a block is open
        thought: list[str] = []

        def start(kind: str, block: dict[str, Any]) -> str:
            nonlocal index, open_kind
            index += 1
            open_kind = kind
            return _sse("content_block_start", {"type": "content_block_start", "index": index,
                                                "content_block": block})

        def delta(payload: dict[str, Any]) -> str:
            return _sse("content_block_delta", {"type": "content_block_delta", "index": index, "delta": payload})

        def close() -> list[str]:
            nonlocal open_kind
            out: list[str] = []
            if open_kind == "thinking":
                out.append(delta({"type": "signature_delta", "signature": self.signature("".join(thought))}))
            if open_kind is not None:
                out.append(_sse("content_block_stop", {"type": "content_block_stop", "index": index}))
            open_kind = None
            return out

        async with self.call.streaming() as events:
            known = self.call.usage
            start_usage = Usage(prompt_tokens=known.prompt_tokens, cached_tokens=known.cached_tokens)
            yield _sse("message_start", {"type": "message_start",
                                         "message": self.message([], start_usage, stop=False)})
            async for event in events:
                if isinstance(event, KeepAlive):
                    yield PING
                elif isinstance(event, Failed):  # headers are sent: reported in-band
                    yield _sse("error", anthropic_body(event.error))
                    return
                elif isinstance(event, Finished):
                    for chunk in close():
                        yield chunk
                    yield _sse("message_delta", {"type": "message_delta",
                                                 "delta": {"stop_reason": self.stop_reason(),
                                                           "stop_sequence": self.stop_sequence
                                                           if not self.has_calls else None},
                                                 "usage": usage_dict(event.usage)})
                    yield _sse("message_stop", {"type": "message_stop"})
                else:
                    if event.reasoning_content:
                        if open_kind != "thinking":
                            for chunk in close():
                                yield chunk
                            thought = []
                            yield start("thinking", {"type": "thinking", "thinking": "", "signature": ""})
                        thought.append(event.reasoning_content)
                        if not self.omit_thinking:
                            yield delta({"type": "thinking_delta", "thinking": event.reasoning_content})
                    if event.content:
                        if open_kind != "text":
                            for chunk in close():
                                yield chunk
                            yield start("text", {"type": "text", "text": ""})
                        yield delta({"type": "text_delta", "text": event.content})
                    for tool_call in event.tool_calls:
                        self.has_calls = True
                        for chunk in close():
                            yield chunk
                        yield start("tool_use", {"type": "tool_use", "id": tool_use_id(tool_call.id),
                                                 "name": tool_call.name, "input": {}})
                        yield delta({"type": "input_json_delta", "partial_json": tool_call.arguments or "{}"})
                        for chunk in close():
                            yield chunk
                    if event.finish_reason:
                        self.finish_reason = event.finish_reason
                        self.stop_sequence = event.stop_sequence

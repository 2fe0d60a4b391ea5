"""The OpenAI Responses API (`/v1/responses`) as an adapter over `api/core.py`, with stored responses.

Routes: `POST /v1/responses` (JSON, or named server-sent events with `stream: true`), `GET /v1/responses/{id}`,
`DELETE /v1/responses/{id}`, `GET /v1/responses/{id}/input_items`. Billing, limits, disconnects, keep-alives
and the drain are the core's; this module owns the wire format and the stored conversation.

Choices made here (the README's "Responses API" section documents them):
- Input items (messages with input_text/output_text parts, function_call, function_call_output, reasoning)
  become the internal conversation: consecutive reasoning, assistant text and calls form one assistant turn,
  with the reasoning as its `reasoning_content`. `instructions` is the system prompt of this request only.
  Images, files and audio are refused (`surface_policy.refuse_content`).
- Function tools are served; a `{"type": "namespace", "name": NS, "tools": [...]}` (Codex's) is flattened:
  its function F is shown to the model as `NS__F`, and a call of `NS__F` comes back as a function_call item
  with `namespace: NS, name: F` (and is read back the same way). Hosted tools (web_search, file_search,
  code_interpreter, image_generation, computer_use, mcp, local_shell, custom, ...) are left out and named in
  `x-flashserve-dropped-tools`.
- Reasoning items: `summary` (when `reasoning.summary` is set) holds the reasoning text itself, there being
  no separate summarizer; without it the text is in the item's `content` (`reasoning_text`).
  `include: ["reasoning.encrypted_content"]` adds `encrypted_content`: the text sealed for this account
  (`sealed_reasoning.py`); sent back, it is opened (a changed or foreign one is a 400) and rendered again.
- `store` (default true) keeps the response, its input items and the whole conversation so far for
  `responses_retention_days` (`accounts/stored_responses.py`); `previous_response_id` continues it (the
  same 404 for an unknown, expired or another account's id). `store: false` keeps nothing.
- `prompt_cache_key` is routing affinity (`GenerationRequest.cache_key`); it does not namespace the cache.
- A failure after the stream began is a `response.failed` event carrying the error (the openai SDK's
  stream helper ends on it); `background: true` is a 400.
- `include: ["message.output_text.logprobs"]` (with `top_logprobs` 0..20) puts the content tokens' logprobs
  on the output_text part and on each `response.output_text.delta` event; `top_logprobs` without that
  include is a 400 naming it (it would change nothing). A stored conversation keeps the text, not them.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from flashserve.accounts.keys import Principal
from flashserve.accounts.pricing import usd_from_pusd
from flashserve.accounts.service import Accounts
from flashserve.api.auth import require_api_key
from flashserve.api.chat import KEEPALIVE, token_logprob_dicts
from flashserve.api.core import Call, Failed, Finished, KeepAlive, open_call, respond
from flashserve.api.responses_schemas import ResponsesRequest
from flashserve.api.sealed_reasoning import open_reasoning, seal_reasoning
from flashserve.api.state import app_state
from flashserve.api.surface_policy import dropped_tools_headers, refuse_content
from flashserve.errors import FlashserveError, invalid_request, not_found
from flashserve.generation import (
    ChoiceDelta,
    GenerationRequest,
    Message,
    Reasoning,
    ResponseFormat,
    Sampling,
    ToolCall,
    ToolChoice,
    ToolSpec,
    Usage,
)
from flashserve.server_key import ServerKey

log = logging.getLogger(__name__)
router = APIRouter()
NAMESPACE_SEP = "__"  # a namespace's function F of namespace NS is shown to the model as NS__F
ENCRYPTED_REASONING = "reasoning.encrypted_content"
LOGPROBS = "message.output_text.logprobs"
_REFUSED_CONTENT = {"input_image", "input_file", "input_audio", "image_url", "file", "audio"}


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# -- request -----------------------------------------------------------------------------------------------
@dataclass(slots=True)
class Prepared:
    gen: GenerationRequest
    dropped: list[str]
    input_items: list[dict[str, Any]]  # this request's input, normalized (ids given), for input_items
    conversation: list[dict[str, Any]]  # everything before the output: earlier turns + this input
    namespaces: set[str] = field(default_factory=set)


def check_request(body: ResponsesRequest) -> None:
    if body.background:
        raise invalid_request("Background responses are not supported by this server: leave 'background' unset "
                              "or false.", "background", "unsupported_parameter")
    if body.top_logprobs is not None and LOGPROBS not in (body.include or ()):
        raise invalid_request(f"Invalid value for 'top_logprobs': it is only allowed with '{LOGPROBS}' in "
                              "'include'.", "top_logprobs", "invalid_value")
    if body.input is None and body.previous_response_id is None:
        raise invalid_request("Missing required parameter: 'input'.", "input", "missing_required_parameter")


def prepare(body: ResponsesRequest, key: ServerKey, account_id: str,
            earlier: list[dict[str, Any]]) -> Prepared:
    """The request as the internal generation request, plus what a stored response keeps."""
    check_request(body)
    raw: list[dict[str, Any]] = (
        [{"type": "message", "role": "user", "content": body.input}] if isinstance(body.input, str)
        else list(body.input or []))
    items = [_normalize(item, f"input[{i}]", key, account_id) for i, item in enumerate(raw)]
    conversation = [*earlier, *items]
    tools, dropped, namespaces = _tools(body.tools or [])
    messages = _messages(conversation, len(earlier))
    if not any(m.role != "system" for m in messages):
        raise invalid_request("'input' must hold at least one message or item.", "input", "invalid_value")
    if body.instructions:
        messages.insert(0, Message(role="system", content=body.instructions))
    fmt = body.text.format if body.text is not None else None
    response_format = None
    if fmt is not None and fmt.type != "text":
        response_format = ResponseFormat(fmt.type, fmt.schema_, fmt.name, fmt.description, fmt.strict)
    gen = GenerationRequest(
        model=body.model,
        messages=messages,
        tools=tuple(tools),
        tool_choice=_tool_choice(body.tool_choice, namespaces) if tools else None,
        parallel_tool_calls=body.parallel_tool_calls,
        response_format=response_format,
        sampling=Sampling(temperature=body.temperature, top_p=body.top_p, max_tokens=body.max_output_tokens,
                          logprobs=True if LOGPROBS in (body.include or ()) else None,
                          top_logprobs=body.top_logprobs),
        reasoning=Reasoning(effort=body.reasoning.effort if body.reasoning else None),
        stream=bool(body.stream),
        user=body.user,
        cache_key=body.prompt_cache_key,
    )
    return Prepared(gen, dropped, items, conversation, namespaces)


def _tools(tools: list[dict[str, Any]]) -> tuple[list[ToolSpec], list[str], set[str]]:
    specs: list[ToolSpec] = []
    dropped: list[str] = []
    namespaces: set[str] = set()
    for i, tool in enumerate(tools):
        kind = tool.get("type")
        if kind == "function":
            specs.append(_function(tool, f"tools[{i}]"))
        elif kind == "namespace":
            ns = tool.get("name")
            if not isinstance(ns, str) or not ns:
                raise invalid_request("A namespace tool needs a 'name'.", f"tools[{i}].name", "invalid_value")
            namespaces.add(ns)
            inner_tools = tool.get("tools") or []
            if not isinstance(inner_tools, list):
                raise invalid_request("A namespace tool's 'tools' must be a list.", f"tools[{i}].tools",
                                      "invalid_type")
            for j, inner in enumerate(inner_tools):
                if isinstance(inner, dict) and inner.get("type") == "function":
                    specs.append(_function(inner, f"tools[{i}].tools[{j}]", ns))
                else:
                    dropped.append(f"{ns}.{inner.get('name') if isinstance(inner, dict) else '?'}")
        else:
            dropped.append(str(kind or "unknown"))
    return specs, dropped, namespaces


def _function(tool: dict[str, Any], where: str, namespace: str | None = None) -> ToolSpec:
    name = tool.get("name")
    if not isinstance(name, str) or not name:
        raise invalid_request("A function tool needs a 'name'.", f"{where}.name", "invalid_value")
    parameters = tool.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise invalid_request("A function tool's 'parameters' must be a JSON schema object.",
                              f"{where}.parameters", "invalid_value")
    description = tool.get("description")
    strict = tool.get("strict")
    return ToolSpec(f"{namespace}{NAMESPACE_SEP}{name}" if namespace else name,
                    description if isinstance(description, str) else None, parameters,
                    strict if isinstance(strict, bool) else None)


def _tool_choice(choice: str | dict[str, Any] | None, namespaces: set[str]) -> ToolChoice | None:
    if choice is None:
        return None
    if isinstance(choice, str):
        return ToolChoice(choice)  # type: ignore[arg-type]
    kind = choice.get("type")
    if kind == "function" and isinstance(choice.get("name"), str):
        ns = choice.get("namespace")
        name = f"{ns}{NAMESPACE_SEP}{choice['name']}" if isinstance(ns, str) and ns in namespaces else choice["name"]
        return ToolChoice("named", name)
    if kind == "allowed_tools":
        return ToolChoice("required" if choice.get("mode") == "required" else "auto")
    raise invalid_request(f"tool_choice of type '{kind}' names a tool this server does not run; use 'auto', "
                          "'required', 'none' or a function.", "tool_choice", "unsupported_tool_choice")


def _text_parts(content: Any, where: str) -> str:
    """A message's or tool output's text: a string, or text parts joined with newlines."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid_request("'content' must be a string or a list of content parts.", where, "invalid_type")
    texts: list[str] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text", "summary_text", "reasoning_text"):
            text = part.get("text")
            if not isinstance(text, str):
                raise invalid_request("A text part needs a 'text' string.", f"{where}[{j}].text", "invalid_value")
            texts.append(text)
        elif kind == "refusal":
            texts.append(str(part.get("refusal") or ""))
        elif kind in _REFUSED_CONTENT:
            raise refuse_content(str(kind), f"{where}[{j}]")
        else:
            raise invalid_request(f"Unknown content part type '{kind}'.", f"{where}[{j}].type",
                                  "unsupported_content")
    return "\n".join(texts)


def _normalize(item: Any, where: str, key: ServerKey, account_id: str) -> dict[str, Any]:
    """One input item in the shape the conversation keeps: text as parts, ids given, and a reasoning item's
    text opened from its `encrypted_content` (kept as `content` reasoning_text, never stored sealed)."""
    if not isinstance(item, dict):
        raise invalid_request("An input item must be a JSON object.", where, "invalid_type")
    kind = item.get("type", "message" if "role" in item else None)
    if kind == "message":
        role = item.get("role")
        if role not in ("user", "assistant", "system", "developer"):
            raise invalid_request(f"Invalid role '{role}': expected user, assistant, system or developer.",
                                  f"{where}.role", "invalid_value")
        text = _text_parts(item.get("content"), f"{where}.content")
        part = "output_text" if role == "assistant" else "input_text"
        content: dict[str, Any] = {"type": part, "text": text}
        if role == "assistant":
            content["annotations"] = []
        return {"type": "message", "id": item.get("id") or _new_id("msg"), "role": role, "content": [content],
                "status": "completed"}
    if kind == "function_call":
        call_id, name, arguments = item.get("call_id"), item.get("name"), item.get("arguments")
        for field_name, value in (("call_id", call_id), ("name", name), ("arguments", arguments)):
            if not isinstance(value, str):
                raise invalid_request(f"A function_call item needs '{field_name}' (a string).",
                                      f"{where}.{field_name}", "invalid_value")
        out = {"type": "function_call", "id": item.get("id") or _new_id("fc"), "call_id": call_id, "name": name,
               "arguments": arguments, "status": "completed"}
        if isinstance(item.get("namespace"), str):
            out["namespace"] = item["namespace"]
        return out
    if kind == "function_call_output":
        call_id = item.get("call_id")
        if not isinstance(call_id, str):
            raise invalid_request("A function_call_output item needs 'call_id' (a string).", f"{where}.call_id",
                                  "invalid_value")
        return {"type": "function_call_output", "id": item.get("id") or _new_id("fco"), "call_id": call_id,
                "output": _text_parts(item.get("output"), f"{where}.output"), "status": "completed"}
    if kind == "reasoning":
        summary_in = item.get("summary") or []
        if not isinstance(summary_in, list):
            raise invalid_request("A reasoning item's 'summary' must be a list.", f"{where}.summary", "invalid_type")
        summary = [s for s in summary_in if isinstance(s, dict)]
        sealed = item.get("encrypted_content")
        if isinstance(sealed, str) and sealed:
            text = open_reasoning(key, account_id, sealed, f"{where}.encrypted_content")
        elif item.get("content"):
            text = _text_parts(item["content"], f"{where}.content")
        else:
            text = _text_parts(summary, f"{where}.summary")
        return {"type": "reasoning", "id": item.get("id") or _new_id("rs"), "summary": summary,
                "content": [{"type": "reasoning_text", "text": text}]}
    raise invalid_request(f"Input items of type '{kind}' are not supported by this server.", f"{where}.type",
                          "unsupported_item")


def _messages(items: list[dict[str, Any]], first_new: int) -> list[Message]:
    """The conversation's items as messages: reasoning, assistant text and function calls that follow each
    other make one assistant turn."""
    messages: list[Message] = []
    turn: dict[str, Any] | None = None
    calls: set[str] = set()

    def flush() -> None:
        nonlocal turn
        if turn is not None:
            messages.append(Message(role="assistant", content=turn["content"],
                                    reasoning_content=turn["reasoning"], tool_calls=tuple(turn["calls"])))
            turn = None

    for i, item in enumerate(items):
        kind = item["type"]
        if kind == "reasoning":
            if turn is not None and (turn["content"] is not None or turn["calls"]):
                flush()
            turn = turn or {"content": None, "reasoning": None, "calls": []}
            text = item["content"][0]["text"]
            turn["reasoning"] = text if turn["reasoning"] is None else turn["reasoning"] + "\n" + text
        elif kind == "function_call":
            turn = turn or {"content": None, "reasoning": None, "calls": []}
            ns = item.get("namespace")
            name = f"{ns}{NAMESPACE_SEP}{item['name']}" if ns else item["name"]
            turn["calls"].append(ToolCall(item["call_id"], name, item["arguments"]))
            calls.add(item["call_id"])
        elif kind == "message" and item["role"] == "assistant":
            if turn is not None and (turn["content"] is not None or turn["calls"]):
                flush()
            turn = turn or {"content": None, "reasoning": None, "calls": []}
            turn["content"] = item["content"][0]["text"]
        elif kind == "function_call_output":
            flush()
            if item["call_id"] not in calls:
                where = f"input[{i - first_new}].call_id" if i >= first_new else "previous_response_id"
                raise invalid_request(f"No function_call with call_id '{item['call_id']}' comes before this "
                                      "function_call_output.", where, "invalid_tool_call_id")
            messages.append(Message(role="tool", content=item["output"], tool_call_id=item["call_id"]))
        else:
            flush()
            messages.append(Message(role=item["role"], content=item["content"][0]["text"]))
    flush()
    return messages


# -- output --------------------------------------------------------------------------------------------------
EventOut = tuple[str, dict[str, Any]]


class OutputBuilder:
    """The core's deltas as output items, with the stream events that build them (the JSON answer uses the
    items only). `history` is the same items as the stored conversation keeps them (reasoning in plain
    text, never sealed)."""

    def __init__(self, summary: bool, seal: Callable[[str], str] | None, namespaces: set[str],
                 logprobs: bool = False) -> None:
        self.summary = summary
        self.logprobs = logprobs  # include message.output_text.logprobs
        self._token_logprobs: list[dict[str, Any]] = []
        self.seal = seal
        self.namespaces = namespaces
        self.items: list[dict[str, Any]] = []
        self.history: list[dict[str, Any]] = []
        self.finish_reason: str | None = None
        self._open: dict[str, Any] | None = None
        self._text = ""

    @property
    def _index(self) -> int:
        return len(self.items)

    def feed(self, delta: ChoiceDelta) -> list[EventOut]:
        if delta.index != 0:
            return []
        out: list[EventOut] = []
        if delta.reasoning_content:
            if self._open is None or self._open["type"] != "reasoning":
                out += self.close()
                out += self._open_reasoning()
            self._text += delta.reasoning_content
            item_id = self._open["id"]  # type: ignore[index]
            if self.summary:
                out.append(("response.reasoning_summary_text.delta", {"item_id": item_id, "output_index": self._index,
                                                                      "summary_index": 0,
                                                                      "delta": delta.reasoning_content}))
            else:
                out.append(("response.reasoning_text.delta", {"item_id": item_id, "output_index": self._index,
                                                              "content_index": 0, "delta": delta.reasoning_content}))
        if delta.content:
            if self._open is None or self._open["type"] != "message":
                out += self.close()
                out += self._open_message()
            self._text += delta.content
            logprobs = token_logprob_dicts(delta.logprobs) if self.logprobs else []
            self._token_logprobs += logprobs
            out.append(("response.output_text.delta", {"item_id": self._open["id"],  # type: ignore[index]
                                                       "output_index": self._index, "content_index": 0,
                                                       "delta": delta.content, "logprobs": logprobs}))
        elif delta.logprobs and self.logprobs and self._open is not None and self._open["type"] == "message":
            self._token_logprobs += token_logprob_dicts(delta.logprobs)  # the last tokens, released at the end
        for call in delta.tool_calls:
            out += self.close()
            out += self._call(call)
        if delta.finish_reason:
            self.finish_reason = delta.finish_reason
        return out

    def _open_reasoning(self) -> list[EventOut]:
        self._open = {"id": _new_id("rs"), "type": "reasoning", "summary": []}
        self._text = ""
        out: list[EventOut] = [("response.output_item.added", {"output_index": self._index, "item": dict(self._open)})]
        if self.summary:
            out.append(("response.reasoning_summary_part.added", {
                "item_id": self._open["id"], "output_index": self._index, "summary_index": 0,
                "part": {"type": "summary_text", "text": ""}}))
        return out

    def _open_message(self) -> list[EventOut]:
        self._open = {"id": _new_id("msg"), "type": "message", "status": "in_progress", "role": "assistant",
                      "content": []}
        self._text = ""
        self._token_logprobs = []
        return [("response.output_item.added", {"output_index": self._index, "item": dict(self._open)}),
                ("response.content_part.added", {"item_id": self._open["id"], "output_index": self._index,
                                                 "content_index": 0,
                                                 "part": {"type": "output_text", "text": "", "annotations": []}})]

    def _call(self, call: ToolCall) -> list[EventOut]:
        item: dict[str, Any] = {"id": _new_id("fc"), "type": "function_call", "status": "in_progress",
                                "call_id": call.id, "name": call.name, "arguments": ""}
        ns, sep, name = call.name.partition(NAMESPACE_SEP)
        if sep and ns in self.namespaces:
            item["namespace"], item["name"] = ns, name
        i = self._index
        out: list[EventOut] = [("response.output_item.added", {"output_index": i, "item": dict(item)}),
                               ("response.function_call_arguments.delta", {"item_id": item["id"], "output_index": i,
                                                                           "delta": call.arguments})]
        item.update(arguments=call.arguments, status="completed")
        out += [("response.function_call_arguments.done", {"item_id": item["id"], "output_index": i,
                                                           "name": item["name"], "arguments": call.arguments}),
                ("response.output_item.done", {"output_index": i, "item": item})]
        self.items.append(item)
        self.history.append(item)
        return out

    def close(self) -> list[EventOut]:
        """Finish the item being streamed (if any)."""
        item, text, i = self._open, self._text, self._index
        if item is None:
            return []
        self._open, self._text = None, ""
        out: list[EventOut] = []
        if item["type"] == "reasoning":
            if self.summary:
                part = {"type": "summary_text", "text": text}
                item["summary"] = [part]
                out += [("response.reasoning_summary_text.done", {"item_id": item["id"], "output_index": i,
                                                                  "summary_index": 0, "text": text}),
                        ("response.reasoning_summary_part.done", {"item_id": item["id"], "output_index": i,
                                                                  "summary_index": 0, "part": part})]
            else:
                item["content"] = [{"type": "reasoning_text", "text": text}]
                out.append(("response.reasoning_text.done", {"item_id": item["id"], "output_index": i,
                                                             "content_index": 0, "text": text}))
            if self.seal is not None:
                item["encrypted_content"] = self.seal(text)
            self.history.append({"type": "reasoning", "id": item["id"], "summary": item["summary"],
                                 "content": [{"type": "reasoning_text", "text": text}]})
        else:
            part: dict[str, Any] = {"type": "output_text", "text": text, "annotations": []}
            if self.logprobs:
                part["logprobs"] = self._token_logprobs
            item["content"] = [part]
            item["status"] = "incomplete" if self.finish_reason == "length" else "completed"
            out += [("response.output_text.done", {"item_id": item["id"], "output_index": i, "content_index": 0,
                                                   "text": text, "logprobs": self._token_logprobs}),
                    ("response.content_part.done", {"item_id": item["id"], "output_index": i, "content_index": 0,
                                                    "part": part})]
            # The stored conversation keeps the text, not the logprobs.
            self.history.append({**item, "content": [{k: v for k, v in part.items() if k != "logprobs"}]})
        out.append(("response.output_item.done", {"output_index": i, "item": item}))
        self.items.append(item)
        return out


def usage_dict(usage: Usage, cost_pusd: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "total_tokens": usage.total_tokens,
    }
    if cost_pusd is not None:
        out["cost"] = float(usd_from_pusd(cost_pusd))  # USD, as chat completions reports it
    return out


class _View:
    """One response being made: the request's echo fields, its output, and the stored row at the end."""

    def __init__(self, body: ResponsesRequest, call: Call, prepared: Prepared, key: ServerKey,
                 principal: Principal, request: Request) -> None:
        self.body = body
        self.call = call
        self.prepared = prepared
        self.account_id = principal.account_id
        self.state = app_state(request)
        include = set(body.include or ())
        seal = ((lambda text: seal_reasoning(key, principal.account_id, text))
                if ENCRYPTED_REASONING in include else None)
        self.out = OutputBuilder(bool(body.reasoning and body.reasoning.wants_summary), seal, prepared.namespaces,
                                 logprobs=LOGPROBS in include)
        self.id = call.id  # resp_…: the request id (flashserve/ids.py)

    def response(self, status: str, usage: dict[str, Any] | None = None,
                 error: FlashserveError | None = None) -> dict[str, Any]:
        body = self.body
        reason = {"length": "max_output_tokens", "content_filter": "content_filter"}.get(self.out.finish_reason or "")
        fmt = body.text.format.model_dump(by_alias=True, exclude_none=True) if body.text and body.text.format else {
            "type": "text"}
        return {
            "id": self.id, "object": "response", "created_at": self.call.created, "status": status,
            "background": False,
            "error": None if error is None else {"code": error.code or error.type, "message": error.message},
            "incomplete_details": {"reason": reason} if status == "incomplete" else None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens, "model": body.model,
            "output": list(self.out.items),
            "parallel_tool_calls": body.parallel_tool_calls if body.parallel_tool_calls is not None else True,
            "previous_response_id": body.previous_response_id,
            "prompt_cache_key": body.prompt_cache_key,
            "reasoning": {"effort": body.reasoning.effort if body.reasoning else None,
                          "summary": (body.reasoning.summary or body.reasoning.generate_summary)
                          if body.reasoning else None},
            "store": body.store is not False,
            "temperature": body.temperature if body.temperature is not None else 1.0,
            "text": {"format": fmt},
            "tool_choice": body.tool_choice if body.tool_choice is not None else "auto",
            "tools": body.tools or [],
            "top_p": body.top_p if body.top_p is not None else 1.0,
            "top_logprobs": body.top_logprobs if body.top_logprobs is not None else 0,
            "truncation": body.truncation or "disabled",
            "usage": usage, "user": body.user, "metadata": body.metadata or {},
        }

    def final_status(self) -> str:
        return "incomplete" if self.out.finish_reason in ("length", "content_filter") else "completed"

    async def store(self, response: dict[str, Any]) -> None:
        if self.body.store is False:
            return
        conversation = [*self.prepared.conversation, *self.out.history]
        retention = timedelta(days=self.state.responses_retention_days)
        try:
            await self.state.accounts.responses.save(self.account_id, self.id, response, self.prepared.input_items,
                                                     conversation, retention)
        except Exception:  # noqa: BLE001 - the answer is made and paid for: it is not lost for a failed save
            log.exception("could not store response %s", self.id)

    async def events(self) -> AsyncIterator[str]:
        seq = itertools.count()

        def ev(kind: str, payload: dict[str, Any]) -> str:
            data = json.dumps({"type": kind, "sequence_number": next(seq), **payload}, ensure_ascii=False)
            return f"event: {kind}\ndata: {data}\n\n"

        async with self.call.streaming() as events:
            yield ev("response.created", {"response": self.response("in_progress")})
            yield ev("response.in_progress", {"response": self.response("in_progress")})
            async for event in events:
                if isinstance(event, KeepAlive):
                    yield KEEPALIVE
                elif isinstance(event, Failed):  # headers are sent: reported in-band
                    for kind, payload in self.out.close():
                        yield ev(kind, payload)
                    failed = self.response("failed", usage_dict(self.call.usage, None), error=event.error)
                    yield ev("response.failed", {"response": failed})
                    return
                elif isinstance(event, Finished):
                    for kind, payload in self.out.close():
                        yield ev(kind, payload)
                    status = self.final_status()
                    final = self.response(status, usage_dict(event.usage, event.cost_pusd))
                    await self.store(final)
                    yield ev(f"response.{status}", {"response": final})
                else:
                    for kind, payload in self.out.feed(event):
                        yield ev(kind, payload)

    async def collect(self, request: Request) -> tuple[dict[str, Any], int] | None:
        cost = await self.call.collect(self.out.feed, request)
        if cost is None:
            return None
        self.out.close()
        final = self.response(self.final_status(), usage_dict(self.call.usage, cost))
        await self.store(final)
        return final, cost


# -- routes ------------------------------------------------------------------------------------------------
def _response_not_found(response_id: str, param: str | None = None) -> FlashserveError:
    return not_found(f"Response with id '{response_id}' not found.", "response_not_found", param)


@router.post("/v1/responses", response_model=None)
async def create_response(
    body: ResponsesRequest, request: Request, principal: Annotated[Principal, Depends(require_api_key)]
) -> JSONResponse | StreamingResponse:
    state = app_state(request)
    check_request(body)
    earlier: list[dict[str, Any]] = []
    if body.previous_response_id is not None:
        stored = await state.accounts.responses.get(principal.account_id, body.previous_response_id)
        if stored is None:
            raise _response_not_found(body.previous_response_id, "previous_response_id")
        earlier = stored.conversation
    prepared = prepare(body, state.server_key, principal.account_id, earlier)
    call = await open_call(request, principal, prepared.gen, id_prefix="resp")
    view = _View(body, call, prepared, state.server_key, principal, request)
    headers = {**call.headers, **dropped_tools_headers(prepared.dropped)}
    return await respond(view, bool(body.stream), request, headers)


@router.get("/v1/responses/{response_id}")
async def get_response(response_id: str, request: Request,
                       principal: Annotated[Principal, Depends(require_api_key)]) -> JSONResponse:
    stored = await app_state(request).accounts.responses.get(principal.account_id, response_id)
    if stored is None:
        raise _response_not_found(response_id)
    return JSONResponse(stored.response)


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, request: Request,
                          principal: Annotated[Principal, Depends(require_api_key)]) -> JSONResponse:
    if not await app_state(request).accounts.responses.delete(principal.account_id, response_id):
        raise _response_not_found(response_id)
    return JSONResponse({"id": response_id, "object": "response", "deleted": True})


@router.get("/v1/responses/{response_id}/input_items")
async def list_input_items(response_id: str, request: Request,
                           principal: Annotated[Principal, Depends(require_api_key)],
                           limit: Annotated[int, Query(ge=1, le=100)] = 20, order: str = "desc",
                           after: str | None = None) -> JSONResponse:
    if order not in ("asc", "desc"):
        raise invalid_request("Invalid 'order': expected 'asc' or 'desc'.", "order", "invalid_value")
    stored = await app_state(request).accounts.responses.get(principal.account_id, response_id)
    if stored is None:
        raise _response_not_found(response_id)
    items = stored.input_items if order == "asc" else stored.input_items[::-1]
    if after is not None:
        ids = [item.get("id") for item in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    page = items[:limit]
    return JSONResponse({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                         "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit})


async def purge_expired_loop(accounts: Accounts, interval_s: float) -> None:
    """The lifespan's one small task: delete expired stored responses every `interval_s` (first at once)."""
    while True:
        try:
            purged = await accounts.responses.purge_expired()
            if purged:
                log.info("purged %d expired stored response(s)", purged)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a failed purge is retried at the next interval
            log.exception("purging expired stored responses failed")
        await asyncio.sleep(interval_s)

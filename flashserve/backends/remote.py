"""An OpenAI-compatible upstream (vLLM, SGLang, DeepSeek's API, another flashserve) as a `Backend`.

flashserve keeps the API, the keys and the billing; the upstream generates. Each request is sent upstream
as a stream (whatever the client asked: a non-streaming answer is assembled from it), with:

- the upstream's own key, from the catalog's settings, never the client's;
- `model` replaced by the upstream's model name;
- the reasoning effort translated for the upstream kind: DeepSeek's API takes `thinking` plus
  `reasoning_effort` ("high" or "max"); vLLM and SGLang take it through `chat_template_kwargs` (the
  DeepSeek-V4 template reads `thinking` and `reasoning_effort`); another flashserve takes it as is.

Usage is normalized into ours: DeepSeek's `prompt_cache_hit_tokens`, or `prompt_tokens_details.cached_tokens`
(vLLM, SGLang, OpenAI); reasoning tokens from `completion_tokens_details.reasoning_tokens` or SGLang's
top-level `reasoning_tokens`. vLLM's `reasoning` delta field becomes `reasoning_content`.

Raw text (`raw_text = "deepseek_v4"` in the catalog's backend table): the upstream's `content` is the
model's own text (thinking, `</think>`, the answer and DSML call blocks), as from an engine run without
reasoning and tool parsers. It goes through the stage the local engine uses (`chat/model_output.py`), so
reasoning_content, content and tool_calls (finish_reason `tool_calls`) come out as they would locally.
Such an upstream is always told whether to think, and thinks unless the request turns it off (effort
`none` or thinking disabled), so the parser and the upstream's prompt agree on where the answer starts
(its model card says `reasoning_default: true`). No DSML markup from it reaches `content`: a malformed
block is dropped, and so is an unfinished one when the stream ends (with a finish reason, or without one:
`[DONE]` or the end of the body after a cut; a connection that breaks is a mid-stream error).

Errors: an upstream answer other than 200 becomes our error object (its 4xx as a 400 with the upstream's
message, 429 as 429 with its retry-after, its auth failure and 5xx as 502, a timeout as 504). Connection
failures, 5xx and timeouts are retried, with backoff, only before anything has been returned to the caller,
so no byte of a retried request can have reached the client; a failure after that ends the stream with an
error, and the usage known so far is billed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

from flashserve.catalog import RemoteSpec
from flashserve.chat.model_output import RAW_TEXT_PARSERS, ModelOutputParser
from flashserve.chat.reasoning import EFFORT_MODE
from flashserve.errors import INVALID_REQUEST, SERVER_ERROR, FlashserveError, unsupported_parameter
from flashserve.generation import (
    CACHE_SALT_HEADER,
    ChoiceDelta,
    GenerationRequest,
    Message,
    RequestContext,
    ResponseFormat,
    ToolCall,
    ToolChoice,
    ToolSpec,
    Usage,
)

RETRYABLE_STATUS = {500, 502, 503, 504}


Upstream = RemoteSpec  # the catalog's spec of one upstream is all this backend needs


def upstream_body(request: GenerationRequest, upstream: Upstream) -> dict[str, Any]:
    """Our internal request as an OpenAI-compatible upstream wants it: a chat completions body, always
    streamed, with usage, in its own model name and reasoning dialect. Fields the client did not give
    are left out, so the upstream's defaults apply."""
    if request.raw_prompt is not None or request.suffix is not None:
        raise unsupported_parameter("prompt", "is not supported by remote engines yet: send chat messages.")
    sampling = request.sampling
    body: dict[str, Any] = {"model": upstream.model, "messages": [_message_body(m) for m in request.messages]}
    optional: dict[str, Any] = {
        "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
        "max_tokens": sampling.max_tokens, "stop": list(sampling.stop) or None, "seed": sampling.seed,
        "presence_penalty": sampling.presence_penalty, "frequency_penalty": sampling.frequency_penalty,
        "logit_bias": sampling.logit_bias, "n": sampling.n, "logprobs": sampling.logprobs,
        "top_logprobs": sampling.top_logprobs, "user": request.user,
        "tools": [_tool_body(t) for t in request.tools] or None,
        "tool_choice": _tool_choice_body(request.tool_choice),
        "parallel_tool_calls": request.parallel_tool_calls,
        "response_format": _response_format_body(request.response_format),
        "modalities": list(request.modalities) if request.modalities is not None else None,
        "audio": request.audio,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    body.update(request.passthrough)
    body["stream"] = True
    body["stream_options"] = {"include_usage": True}
    effort, switch = request.reasoning.effort, request.reasoning.thinking
    if upstream.raw_text is not None and effort is None and switch is None:
        effort = "high"  # a raw-text upstream is told explicitly: raw_thinking() reads the same default
    if effort is None and switch is None:
        return body
    mode = EFFORT_MODE.get(effort) if effort is not None else ("high" if switch else None)
    if switch is False:
        mode = None
    if upstream.kind == "deepseek":
        body["thinking"] = {"type": "enabled" if mode else "disabled"}
        if mode:
            body["reasoning_effort"] = mode
    elif upstream.kind in ("vllm", "sglang"):
        kwargs = dict(body.get("chat_template_kwargs") or {})
        kwargs["thinking"] = mode is not None
        if mode:
            kwargs["reasoning_effort"] = mode
        body["chat_template_kwargs"] = kwargs
    elif effort is not None:
        body["reasoning_effort"] = effort if switch is not False else "none"
    return body


def estimate_tokens(request: GenerationRequest) -> int:
    """A prompt's tokens, estimated without the upstream's tokenizer: 4 characters a token over the
    messages' text, reasoning and calls and the tools' JSON, plus 4 a message for the template's markers."""
    chars = 0
    for m in request.messages:
        chars += len(m.content or "") + len(m.reasoning_content or "")
        chars += sum(len(c.name) + len(c.arguments) for c in m.tool_calls)
    chars += sum(len(json.dumps(_tool_body(t), ensure_ascii=False)) for t in request.tools)
    return (chars + 3) // 4 + 4 * len(request.messages)


def raw_thinking(request: GenerationRequest) -> bool:
    """Whether a raw-text upstream's answer opens in thinking: unless turned off, as `upstream_body` asks."""
    effort, switch = request.reasoning.effort, request.reasoning.thinking
    if switch is False:
        return False
    if effort is not None:
        return EFFORT_MODE.get(effort) is not None
    return True


def _message_body(message: Message) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message.role}
    if message.content is not None:
        out["content"] = message.content
    for key in ("name", "tool_call_id", "reasoning_content"):
        value = getattr(message, key)
        if value is not None:
            out[key] = value
    if message.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                             for c in message.tool_calls]
    if message.prefix:
        out["prefix"] = True  # DeepSeek's chat prefix completion
    return out


def _tool_body(tool: ToolSpec) -> dict[str, Any]:
    function = {k: v for k, v in (("name", tool.name), ("description", tool.description),
                                   ("parameters", tool.parameters), ("strict", tool.strict)) if v is not None}
    return {"type": "function", "function": function}


def _tool_choice_body(choice: ToolChoice | None) -> str | dict[str, Any] | None:
    if choice is None:
        return None
    if choice.mode == "named":
        return {"type": "function", "function": {"name": choice.name}}
    return choice.mode


def _response_format_body(fmt: ResponseFormat | None) -> dict[str, Any] | None:
    if fmt is None:
        return None
    if fmt.type != "json_schema":
        return {"type": fmt.type}
    spec = {k: v for k, v in (("name", fmt.name), ("description", fmt.description), ("schema", fmt.schema),
                               ("strict", fmt.strict)) if v is not None}
    return {"type": "json_schema", "json_schema": spec}


def normalize_usage(raw: dict[str, Any]) -> Usage:
    prompt = int(raw.get("prompt_tokens") or 0)
    if raw.get("prompt_cache_hit_tokens") is not None:  # DeepSeek's API
        cached = int(raw["prompt_cache_hit_tokens"])
    else:
        cached = int((raw.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    details = raw.get("completion_tokens_details") or {}
    reasoning = int(details.get("reasoning_tokens") or raw.get("reasoning_tokens") or 0)
    return Usage(prompt_tokens=prompt, cached_tokens=min(cached, prompt),
                 completion_tokens=int(raw.get("completion_tokens") or 0), reasoning_tokens=reasoning)


def upstream_error(status: int, text: str, headers: httpx.Headers | dict[str, str]) -> FlashserveError:
    """Our error object for an upstream's non-200 answer."""
    try:
        detail = json.loads(text).get("error") or {}
        message = detail.get("message") if isinstance(detail, dict) else str(detail)
    except (ValueError, AttributeError):
        detail, message = {}, None
    message = message or text[:500] or f"HTTP {status}"
    param = detail.get("param") if isinstance(detail, dict) else None
    if status == 429:
        retry = {"retry-after": headers.get("retry-after", "1")}
        return FlashserveError(429, f"The upstream is rate limiting: {message}", "rate_limit_error", None,
                           "upstream_rate_limited", headers=retry)
    if status in (401, 403):
        return FlashserveError(502, "The upstream refused flashserve's credentials.", SERVER_ERROR, None,
                           "upstream_auth_failed")
    if 400 <= status < 500:
        return FlashserveError(400, f"The upstream rejected the request: {message}", INVALID_REQUEST, param,
                           "upstream_invalid_request")
    return FlashserveError(502, f"The upstream failed (HTTP {status}): {message}", SERVER_ERROR, None, "upstream_error")


class RemoteBackend:
    name = "remote"

    def __init__(self, upstream: Upstream, client: httpx.AsyncClient | None = None) -> None:
        self.upstream = upstream
        self._client = client or httpx.AsyncClient(timeout=httpx.Timeout(upstream.timeout_s,
                                                                          connect=upstream.connect_timeout_s))
        ident = f"{upstream.url}|{upstream.model}"
        self.system_fingerprint = "fp_" + hashlib.sha256(ident.encode()).hexdigest()[:10]
        self._open: set[RemoteGeneration] = set()  # the streams in flight: the load, and abort_all's work

    async def count_tokens(self, request: GenerationRequest) -> int:
        """An estimate (OpenAI-compatible upstreams have no count endpoint, and their tokenizer is not
        ours): `estimate_tokens`."""
        return estimate_tokens(request)

    @property
    def active(self) -> int:
        return len(self._open)

    @property
    def load(self) -> int:
        return self.active

    async def abort_all(self) -> int:
        """Close every upstream stream in flight (shutdown after the drain time); returns how many."""
        open_now = list(self._open)
        for generation in open_now:
            await generation.abort()
        return len(open_now)

    async def open(self, request: GenerationRequest, ctx: RequestContext) -> RemoteGeneration:
        body = upstream_body(request, self.upstream)
        headers = {"x-request-id": ctx.request_id}
        if self.upstream.kind == "openai" and ctx.tenant:
            # Another flashserve (a worker) namespaces its prefix cache with this too: tenants stay apart.
            headers[CACHE_SALT_HEADER] = ctx.tenant
        if self.upstream.api_key:
            headers["Authorization"] = f"Bearer {self.upstream.api_key}"
        url = self.upstream.url.rstrip("/") + "/chat/completions"
        delay = 0.2
        for attempt in range(self.upstream.retries + 1):
            last = attempt == self.upstream.retries
            try:
                response = await self._client.send(self._client.build_request("POST", url, json=body,
                                                                              headers=headers), stream=True)
            except httpx.TimeoutException as exc:
                if last:
                    raise FlashserveError(504, "The upstream did not answer in time.", SERVER_ERROR, None,
                                      "upstream_timeout") from exc
            except httpx.HTTPError as exc:
                if last:
                    raise FlashserveError(502, "The upstream is not reachable.", SERVER_ERROR, None,
                                      "upstream_unavailable") from exc
            else:
                if response.status_code == 200:
                    return RemoteGeneration(response, self, request)
                try:  # the refusal's text, for our error; the response is closed whatever happens here
                    text = (await response.aread()).decode(errors="replace")
                except httpx.HTTPError:
                    text = ""
                finally:
                    await response.aclose()
                if last or response.status_code not in RETRYABLE_STATUS:
                    raise upstream_error(response.status_code, text, response.headers)
            await asyncio.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    def stats(self) -> dict[str, object]:
        return {"upstream": self.upstream.url, "model": self.upstream.model, "active_requests": self.active}

    async def inspect(self) -> dict[str, object]:
        return self.stats()

    async def close(self) -> None:
        await self._client.aclose()


class RemoteGeneration:
    """The upstream's event stream as our deltas. Tool calls arrive in pieces per (choice, call index) and
    are handed on whole when their choice finishes. From a raw-text upstream, `content` is parsed per
    choice (`ModelOutputParser`)."""

    _raw: str | None = None

    def __init__(self, response: httpx.Response, backend: RemoteBackend,
                 request: GenerationRequest | None = None) -> None:
        self.usage = Usage()
        self._response = response
        self._backend = backend
        self._calls: dict[tuple[int, int], dict[str, str]] = {}
        self._raw = backend.upstream.raw_text
        self._raw_parsers: dict[int, ModelOutputParser] = {}  # per choice, for a raw-text upstream
        self._thinking = request is not None and raw_thinking(request)
        parses_calls = request is not None and bool(request.tools) and (
            request.tool_choice is None or request.tool_choice.mode != "none")
        self._tool_names = [t.name for t in request.tools] if request is not None and parses_calls else None
        self._max_calls = 1 if request is not None and request.parallel_tool_calls is False else None
        self._closed = False
        backend._open.add(self)

    def __aiter__(self) -> AsyncIterator[ChoiceDelta]:
        return self._deltas()

    async def _deltas(self) -> AsyncIterator[ChoiceDelta]:
        try:
            async for line in self._response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    error = chunk["error"] if isinstance(chunk["error"], dict) else {"message": str(chunk["error"])}
                    raise FlashserveError(502, f"The upstream failed mid-stream: {error.get('message')}", SERVER_ERROR,
                                      None, "upstream_error")
                if chunk.get("usage"):
                    self.usage = normalize_usage(chunk["usage"])
                for choice in chunk.get("choices") or ():
                    delta = self._delta(choice)
                    if delta is not None:
                        yield delta
            for delta in self._flush_raw():
                yield delta
        except (httpx.HTTPError, httpx.StreamError) as exc:
            if self._closed:  # abort_all closed the stream under us (the server's drain time is up)
                raise FlashserveError(503, "The request was aborted by the server.", SERVER_ERROR, None,
                                  "request_aborted") from exc
            raise FlashserveError(502, "The upstream connection failed mid-stream.", SERVER_ERROR, None,
                              "upstream_error") from exc
        finally:
            await self.abort()

    def _delta(self, choice: dict[str, Any]) -> ChoiceDelta | None:
        index = int(choice.get("index") or 0)
        raw = choice.get("delta") or {}
        for piece in raw.get("tool_calls") or ():
            key = (index, int(piece.get("index") or 0))
            call = self._calls.setdefault(key, {"id": "", "name": "", "arguments": ""})
            function = piece.get("function") or {}
            call["id"] = piece.get("id") or call["id"]
            call["name"] = function.get("name") or call["name"]
            call["arguments"] += function.get("arguments") or ""
        reason = choice.get("finish_reason")
        calls: list[ToolCall] = []
        if reason:
            done = sorted(k for k in self._calls if k[0] == index)
            calls = [ToolCall(self._calls[k]["id"] or f"call_{k[1]}", self._calls[k]["name"],
                                self._calls[k]["arguments"] or "{}") for k in done]
            for k in done:
                del self._calls[k]
        content = raw.get("content") or ""
        reasoning = raw.get("reasoning_content") or raw.get("reasoning") or ""  # vLLM calls it `reasoning`
        if self._raw is not None:
            parser = self._raw_parser(index)
            pieces = parser.feed(content)
            if reason:
                rest, reason = parser.finish(reason)
                pieces.add(rest)
                del self._raw_parsers[index]  # finished: nothing left for _flush_raw
                if calls and reason == "stop":
                    reason = "tool_calls"
            reasoning += pieces.reasoning
            content = pieces.content
            calls = pieces.calls + calls
        if not (content or reasoning or calls or reason):
            return None
        # vLLM and SGLang name the stop string that matched in `stop_reason` (a token id when a stop token did)
        matched = choice.get("stop_reason") if reason == "stop" else None
        return ChoiceDelta(index, content, reasoning, tool_calls=calls, finish_reason=reason,
                           stop_sequence=matched if isinstance(matched, str) else None)

    def _flush_raw(self) -> list[ChoiceDelta]:
        """A raw-text choice the upstream ended without a finish reason (a cut stream): its held-back text,
        an unfinished call block dropped, never content; the finish reason stays the upstream's (none)."""
        out = []
        for index, parser in sorted(self._raw_parsers.items()):
            pieces, _ = parser.finish(None)
            if pieces.content or pieces.reasoning or pieces.calls:
                out.append(ChoiceDelta(index, pieces.content, pieces.reasoning, tool_calls=pieces.calls))
        self._raw_parsers.clear()
        return out

    def _raw_parser(self, index: int) -> ModelOutputParser:
        parser = self._raw_parsers.get(index)
        if parser is None:
            assert self._raw is not None
            parser = ModelOutputParser(self._thinking, self._tool_names, self._max_calls,
                                       RAW_TEXT_PARSERS[self._raw], strip_think_markers=True)
            self._raw_parsers[index] = parser
        return parser

    async def abort(self) -> None:
        if not self._closed:
            self._closed = True
            self._backend._open.discard(self)
            await self._response.aclose()

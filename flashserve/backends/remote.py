"""An OpenAI-compatible upstream (vLLM, SGLang, DeepSeek's API, another flashserve) as a `Backend`.

flashserve keeps the API, the keys and the billing; the upstream generates. Each request is sent upstream
as a stream (whatever the client asked: a non-streaming answer is assembled from it), with:

- the upstream's own key, from the catalog's settings, never the client's;
- `model` replaced by the upstream's model name;
- the reasoning effort translated for the upstream kind: DeepSeek's API takes `thinking` plus
  `reasoning_effort` ("high" or "max"); vLLM and SGLang take it through `chat_template_kwargs` (the
  DeepSeek-V4 template reads `thinking` and `reasoning_effort`); another flashserve takes it as is.

A legacy completion (a raw prompt, with `suffix` for fill in the middle) goes to the upstream's
`/completions` with `prompt` and `suffix` as given (DeepSeek's FIM lives at its `/beta` base URL: the
catalog's url says which). A chat prefix (last assistant message with `prefix`) is sent as DeepSeek's
`prefix: true` (DeepSeek serves it at its `/beta` base URL), and to vLLM and SGLang as
`continue_final_message` without a generation prompt, their spelling of the same thing.

Tokenizer endpoints: vLLM, SGLang and flashserve have `/tokenize` and `/detokenize` at the server's root
(beside `/v1`); they are forwarded there (an upstream that answers 404 has none: 501). DeepSeek's API has
none: 501.

What else an upstream receives depends on its kind (`request_headers`): the request's `x-request-id` (as a
UUID for llama.cpp's server, which refuses anything else with an empty 400), the opaque cache salt only for
another flashserve (`kind = "flashserve"`, e.g. a `--workers` process), never anything naming an account.
llama.cpp's server (`kind = "llamacpp"`) gets only the fields it reads and is asked for whole answers
(`_llamacpp_body`: its stream carries no usage), which `WholeAnswer` hands on as deltas.

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

Logprobs: `logprobs`/`top_logprobs` go upstream as given, and each chunk's `choices[].logprobs.content`
comes back as the delta's token logprobs; from a raw-text upstream they cover its raw text, so only the
tokens of the parsed content are kept (`chat/logprob_alignment.py`, as for the local engine).

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
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx

from flashserve import metrics
from flashserve.backends.upstream_http import (
    AiohttpUpstream,
    HttpxUpstream,
    UpstreamClient,
    UpstreamResponse,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from flashserve.catalog import RemoteSpec
from flashserve.chat.logprob_alignment import ContentLogprobs
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
    TokenLogprob,
    ToolCall,
    ToolChoice,
    ToolSpec,
    TopLogprob,
    Usage,
)
from flashserve.request_scope import REQUEST_ID_HEADER, as_uuid

log = logging.getLogger(__name__)
RETRYABLE_STATUS = {500, 502, 503, 504}
_AFTER_DONE_S = 0.5  # how long the rest of a body after its [DONE] is waited for (`_read_to_end`)



Upstream = RemoteSpec  # the catalog's spec of one upstream is all this backend needs


def upstream_body(request: GenerationRequest, upstream: Upstream) -> dict[str, Any]:
    """Our internal request as an OpenAI-compatible upstream wants it: a chat completions body, always
    streamed, with usage, in its own model name and reasoning dialect. Fields the client did not give
    are left out, so the upstream's defaults apply."""
    sampling = request.sampling
    if request.raw_prompt is not None:
        body: dict[str, Any] = {"model": upstream.model, "prompt": request.raw_prompt}
        if request.suffix is not None:
            body["suffix"] = request.suffix
    elif request.suffix is not None:
        raise unsupported_parameter("suffix", "needs a prompt (legacy completions).")
    else:
        body = {"model": upstream.model, "messages": [_message_body(m) for m in request.messages]}
        if request.messages and request.messages[-1].prefix and upstream.kind in ("vllm", "sglang"):
            body["continue_final_message"] = True
            body["add_generation_prompt"] = False
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
    if upstream.kind == "llamacpp":
        return _llamacpp_body(body, request)
    body["stream"] = True
    body["stream_options"] = {"include_usage": True}
    if request.raw_prompt is not None:
        if request.tools or request.response_format is not None:
            raise unsupported_parameter("prompt", "cannot be combined with tools or a response_format.")
        for key in ("tools", "tool_choice", "parallel_tool_calls", "modalities", "audio", "top_logprobs"):
            body.pop(key, None)
        if sampling.logprobs:
            body["logprobs"] = sampling.top_logprobs or 0  # the legacy API's spelling: how many alternatives
        return body  # a raw prompt has no chat template to tell about thinking
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


# The top-level fields llama-cpp-python's server (0.3.x) reads: anything else it ignores without a word.
LLAMACPP_FIELDS = frozenset({
    "model", "messages", "functions", "function_call", "tools", "tool_choice", "max_tokens", "min_tokens",
    "logprobs", "top_logprobs", "temperature", "top_p", "min_p", "stop", "stream", "presence_penalty",
    "frequency_penalty", "logit_bias", "seed", "response_format", "n", "user", "top_k", "repeat_penalty",
    "logit_bias_type", "mirostat_mode", "mirostat_tau", "mirostat_eta", "grammar"})


def _llamacpp_body(body: dict[str, Any], request: GenerationRequest) -> dict[str, Any]:
    """The body for llama-cpp-python's server, which differs from an OpenAI upstream in what it can do:
    - its stream carries no usage (it has no `stream_options`), so it is asked for the whole answer at once
      (`stream: false`), whose `usage` is exact; the client's stream then gets that answer in one piece;
    - it ignores `n`: more than one choice is refused here rather than silently answered with one;
    - it knows no `json_schema` response format: a schema goes as its `json_object` with `schema`;
    - it has no reasoning switch, prefix completion or `reasoning_content` in messages: they are left out,
      as are the fields it does not read (`parallel_tool_calls`, `store`, `metadata`...)."""
    if request.sampling.n > 1:
        raise unsupported_parameter("n", "must be 1 for this model: its upstream (llama.cpp) makes one choice.")
    if request.modalities is not None or request.audio is not None:
        raise unsupported_parameter("modalities", "is not supported by this model's upstream (llama.cpp).")
    out = {k: v for k, v in body.items() if k in LLAMACPP_FIELDS}
    out["messages"] = [{k: v for k, v in m.items() if k not in ("reasoning_content", "prefix")}
                       for m in out["messages"]]
    fmt = request.response_format
    if fmt is not None and fmt.type == "json_schema":
        out["response_format"] = {"type": "json_object", **({"schema": fmt.schema} if fmt.schema else {})}
    out["stream"] = False
    return out


def request_headers(upstream: Upstream, ctx: RequestContext) -> dict[str, str]:
    """What one upstream kind receives besides the body: the request id in the form it accepts (llama.cpp's
    server answers anything but a UUID with an empty 400), the opaque cache salt only for another flashserve
    (it namespaces that worker's prefix cache; no other upstream gets anything derived from an account), and
    the upstream's own key."""
    headers: dict[str, str] = {}
    if ctx.trace_id:
        headers[REQUEST_ID_HEADER] = as_uuid(ctx.trace_id) if upstream.kind == "llamacpp" else ctx.trace_id
    if upstream.kind == "flashserve" and ctx.cache_salt:
        headers[CACHE_SALT_HEADER] = ctx.cache_salt
    if upstream.api_key:
        headers["Authorization"] = f"Bearer {upstream.api_key}"
    return headers


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


def token_logprobs(raw: Any) -> list[TokenLogprob]:
    """An upstream choice's `logprobs.content` (OpenAI's shape) as our token logprobs; entries without a
    token or a number are skipped, and -inf (vLLM's for a masked token) is OpenAI's -9999.0."""
    entries = raw.get("content") if isinstance(raw, dict) else None
    out: list[TokenLogprob] = []
    for entry in entries if isinstance(entries, list) else ():
        parsed = _token_and_logprob(entry)
        if parsed is None:
            continue
        top = tuple(TopLogprob(*alt) for alt in map(_token_and_logprob, entry.get("top_logprobs") or ())
                    if alt is not None)
        out.append(TokenLogprob(*parsed, top))
    return out


def _token_and_logprob(entry: Any) -> tuple[str, float, tuple[int, ...]] | None:
    if not isinstance(entry, dict) or not isinstance(entry.get("token"), str):
        return None
    try:
        logprob = max(float(entry["logprob"]), -9999.0)
    except (KeyError, TypeError, ValueError):
        return None
    raw = entry.get("bytes")
    token = entry["token"]
    data = tuple(raw) if isinstance(raw, list) and all(isinstance(b, int) for b in raw) else tuple(token.encode())
    return token, logprob, data


def legacy_logprobs(raw: Any) -> list[TokenLogprob]:
    """A legacy completions chunk's `logprobs` ({tokens, token_logprobs, top_logprobs}) as our entries (a
    token without a value is left out); other shapes (chat's `content` list) give none here."""
    if not isinstance(raw, dict) or not isinstance(raw.get("tokens"), list):
        return []
    values = raw.get("token_logprobs") or []
    tops = raw.get("top_logprobs") or []
    out = []
    for i, token in enumerate(raw["tokens"]):
        if i >= len(values) or not isinstance(values[i], int | float):
            continue  # no value (an echoed prompt's first token): nothing to report
        value = values[i]
        top = tops[i] if i < len(tops) and isinstance(tops[i], dict) else {}
        alternatives = tuple(TopLogprob(str(t), float(v), tuple(str(t).encode())) for t, v in top.items()
                             if isinstance(v, int | float))
        out.append(TokenLogprob(str(token), float(value), tuple(str(token).encode()), alternatives))
    return out


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


def upstream_error(status: int, text: str, headers: Mapping[str, str],
                   upstream: Upstream | None = None) -> FlashserveError:
    """Our error object for an upstream's non-200 answer. One with an empty body names the upstream (its
    kind and model; the URL goes to the log) and its status: the client knows who refused it and how."""
    try:
        detail = json.loads(text).get("error") or {}
        message = detail.get("message") if isinstance(detail, dict) else str(detail)
    except (ValueError, AttributeError):
        detail, message = {}, None
    if not message and not text.strip():
        # The client learns which upstream (kind and model) refused and how; the URL, internal, is only logged.
        who = f"{upstream.kind} upstream (model '{upstream.model}')" if upstream is not None else "upstream"
        message = f"the {who} answered HTTP {status} with an empty body"
        log.warning("%s at %s answered HTTP %d with an empty body", who, upstream.url if upstream else "?", status)
    message = message or text[:500]
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
        """`client`: an httpx client to send with (tests bring one over an in-process transport); by default
        aiohttp's (`upstream_http.py` says why)."""
        self.upstream = upstream
        self._client: UpstreamClient = (HttpxUpstream(client) if client is not None else
                                        AiohttpUpstream(upstream.timeout_s, upstream.connect_timeout_s))
        ident = f"{upstream.url}|{upstream.model}"
        self.system_fingerprint = "fp_" + hashlib.sha256(ident.encode()).hexdigest()[:10]
        self._open: set[RemoteGeneration] = set()  # the streams in flight: the load, and abort_all's work

    async def count_tokens(self, request: GenerationRequest) -> int:
        """An estimate (OpenAI-compatible upstreams have no count endpoint, and their tokenizer is not
        ours): `estimate_tokens`."""
        return estimate_tokens(request)

    max_model_len: int | None = None  # the upstream's; a tokenize answer from it reports its own

    async def tokenize(self, request: GenerationRequest, add_generation_prompt: bool = True) -> list[int]:
        """The upstream's own token ids, from its `/tokenize` (vLLM, SGLang, flashserve); 501 without one."""
        body: dict[str, Any] = {"model": self.upstream.model}
        if request.raw_prompt is not None:
            body["prompt"] = request.raw_prompt
        else:
            body["messages"] = [_message_body(m) for m in request.messages]
            body["add_generation_prompt"] = add_generation_prompt
        answer = await self._tokenizer_call("/tokenize", body)
        tokens = answer.get("tokens") if isinstance(answer, dict) else None
        if not isinstance(tokens, list):
            raise FlashserveError(502, "The upstream's /tokenize answer has no token list.", SERVER_ERROR, None,
                                  "upstream_error")
        return [int(t) for t in tokens]

    async def detokenize(self, token_ids: list[int]) -> str:
        answer = await self._tokenizer_call("/detokenize", {"model": self.upstream.model, "tokens": token_ids})
        text = answer.get("prompt") if isinstance(answer, dict) else None
        if not isinstance(text, str):
            raise FlashserveError(502, "The upstream's /detokenize answer has no prompt.", SERVER_ERROR, None,
                                  "upstream_error")
        return text

    async def _tokenizer_call(self, path: str, body: dict[str, Any]) -> Any:
        """POST to the upstream server's root `path` (vLLM, SGLang, another flashserve: kind "openai", which
        may also be a server without one: its 404 is our 501); DeepSeek's API has none."""
        unavailable = FlashserveError(501, f"This model's upstream ({self.upstream.kind}) has no tokenizer "
                                      "endpoint.", INVALID_REQUEST, None, "tokenizer_unavailable")
        if self.upstream.kind == "deepseek":
            raise unavailable
        headers = {"Authorization": f"Bearer {self.upstream.api_key}"} if self.upstream.api_key else {}
        url = self.upstream.url.rstrip("/").removesuffix("/v1") + path
        try:
            response = await self._client.post(url, body, headers)
            try:
                content = await response.read()
            finally:
                await response.close()
        except UpstreamTimeout as exc:
            raise FlashserveError(504, "The upstream did not answer in time.", SERVER_ERROR, None,
                                  "upstream_timeout") from exc
        except UpstreamUnreachable as exc:
            raise FlashserveError(502, "The upstream is not reachable.", SERVER_ERROR, None,
                                  "upstream_unavailable") from exc
        if response.status_code in (404, 405):
            raise unavailable
        if response.status_code != 200:
            raise upstream_error(response.status_code, content.decode(errors="replace"), response.headers)
        try:
            return json.loads(content)
        except ValueError as exc:
            raise FlashserveError(502, "The upstream's answer is not JSON.", SERVER_ERROR, None,
                                  "upstream_error") from exc

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
        headers = request_headers(self.upstream, ctx)
        path = "/completions" if request.raw_prompt is not None else "/chat/completions"
        url = self.upstream.url.rstrip("/") + path
        labels = (self.upstream.url, self.upstream.kind)
        delay = 0.2
        for attempt in range(self.upstream.retries + 1):
            last = attempt == self.upstream.retries
            started = time.monotonic()
            try:
                response = await self._client.post(url, body, headers)
            except UpstreamTimeout as exc:
                metrics.UPSTREAM_ERRORS.labels(*labels, "upstream_timeout").inc()
                if last:
                    raise FlashserveError(504, "The upstream did not answer in time.", SERVER_ERROR, None,
                                      "upstream_timeout") from exc
            except UpstreamUnreachable as exc:
                metrics.UPSTREAM_ERRORS.labels(*labels, "upstream_unavailable").inc()
                if last:
                    raise FlashserveError(502, "The upstream is not reachable.", SERVER_ERROR, None,
                                      "upstream_unavailable") from exc
            else:
                metrics.UPSTREAM_LATENCY.labels(*labels).observe(time.monotonic() - started)
                if response.status_code == 200:
                    if not body["stream"]:
                        return await WholeAnswer.read(response, self, request)
                    return RemoteGeneration(response, self, request)
                metrics.UPSTREAM_ERRORS.labels(*labels, f"http_{response.status_code}").inc()
                try:  # the refusal's text, for our error; the response is closed whatever happens here
                    text = (await response.read()).decode(errors="replace")
                except (UpstreamTimeout, UpstreamUnreachable):
                    text = ""
                finally:
                    await response.close()
                if last or response.status_code not in RETRYABLE_STATUS:
                    raise upstream_error(response.status_code, text, response.headers, self.upstream)
            await asyncio.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    def stats(self) -> dict[str, object]:
        return {"upstream": self.upstream.url, "model": self.upstream.model, "active_requests": self.active}

    async def inspect(self) -> dict[str, object]:
        return self.stats()

    async def close(self) -> None:
        await self._client.aclose()


async def _read_to_end(lines: AsyncIterator[str]) -> None:
    """Read what follows `[DONE]` (the body's end, normally received with it), so the connection goes back
    to the pool instead of being closed: a new upstream connection per request cost more than the request.
    An upstream that keeps the stream open past `[DONE]` gets `_AFTER_DONE_S`, then is closed."""
    try:
        async with asyncio.timeout(_AFTER_DONE_S):
            async for _ in lines:
                pass
    except (TimeoutError, UpstreamTimeout, UpstreamUnreachable):
        pass


class RemoteGeneration:
    """The upstream's event stream as our deltas. Tool calls arrive in pieces per (choice, call index) and
    are handed on whole when their choice finishes. From a raw-text upstream, `content` is parsed per
    choice (`ModelOutputParser`)."""

    _raw: str | None = None

    def __init__(self, response: UpstreamResponse, backend: RemoteBackend,
                 request: GenerationRequest | None = None) -> None:
        self.usage = Usage()
        self._response = response
        self._backend = backend
        self._calls: dict[tuple[int, int], dict[str, str]] = {}
        # A raw prompt's answer is plain text: there is no chat template whose output would need parsing.
        self._raw = backend.upstream.raw_text if request is None or request.raw_prompt is None else None
        self._raw_parsers: dict[int, ModelOutputParser] = {}  # per choice, for a raw-text upstream
        self._raw_logprobs: dict[int, ContentLogprobs] = {}  # per choice, for a raw-text upstream
        self._thinking = request is not None and raw_thinking(request)
        self._wants_logprobs = request is not None and bool(request.sampling.logprobs)
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
            lines = self._response.lines()
            async for line in lines:
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    await _read_to_end(lines)
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
        except (UpstreamTimeout, UpstreamUnreachable) as exc:
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
        content = raw.get("content") or choice.get("text") or ""  # `text`: a legacy completion's chunk
        reasoning = raw.get("reasoning_content") or raw.get("reasoning") or ""  # vLLM calls it `reasoning`
        logprobs = token_logprobs(choice.get("logprobs")) or legacy_logprobs(choice.get("logprobs"))
        if self._raw is not None:
            parser = self._raw_parser(index)
            # The upstream's logprobs cover the raw text (thinking and call markup too): keep the content's.
            aligned = self._raw_logprobs.setdefault(index, ContentLogprobs()) if self._wants_logprobs else None
            if aligned is not None:
                aligned.add_token_texts(logprobs, content)
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
            if aligned is not None:
                logprobs = aligned.finish(content) if reason else aligned.content(content)
        if not (content or reasoning or calls or reason or logprobs):
            return None
        # vLLM and SGLang name the stop string that matched in `stop_reason` (a token id when a stop token did)
        matched = choice.get("stop_reason") if reason == "stop" else None
        return ChoiceDelta(index, content, reasoning, tool_calls=calls, finish_reason=reason,
                           stop_sequence=matched if isinstance(matched, str) else None, logprobs=logprobs)

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
            await self._response.close()


class WholeAnswer:
    """A non-streamed upstream answer (llama.cpp's: its stream has no usage) as our deltas: one delta per
    choice with its whole content, reasoning and tool calls, and the answer's exact usage."""

    def __init__(self, deltas: list[ChoiceDelta], usage: Usage) -> None:
        self.usage = usage
        self._deltas = deltas

    @classmethod
    async def read(cls, response: UpstreamResponse, backend: RemoteBackend,
                   request: GenerationRequest) -> WholeAnswer:
        try:
            answer = json.loads(await response.read())
        except (UpstreamTimeout, UpstreamUnreachable, ValueError) as exc:
            raise FlashserveError(502, f"The {backend.upstream.kind} upstream at {backend.upstream.url} sent an "
                                  "unreadable answer.", SERVER_ERROR, None, "upstream_error") from exc
        finally:
            await response.close()
        deltas = []
        for choice in answer.get("choices") or ():
            message = choice.get("message") or {}
            calls = [ToolCall(c.get("id") or f"call_{i}", (c.get("function") or {}).get("name") or "",
                              (c.get("function") or {}).get("arguments") or "{}")
                     for i, c in enumerate(message.get("tool_calls") or ())]
            reason = choice.get("finish_reason") or "stop"
            deltas.append(ChoiceDelta(int(choice.get("index") or 0), message.get("content") or "",
                                      message.get("reasoning_content") or "", tool_calls=calls,
                                      finish_reason=reason))
        return cls(deltas, normalize_usage(answer.get("usage") or {}))

    def __aiter__(self) -> AsyncIterator[ChoiceDelta]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[ChoiceDelta]:
        while self._deltas:
            yield self._deltas.pop(0)

    async def abort(self) -> None:
        self._deltas.clear()

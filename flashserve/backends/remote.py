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
from dataclasses import dataclass
from typing import Any

import httpx

from flashserve.api.errors import INVALID_REQUEST, SERVER_ERROR, OpenAIError
from flashserve.api.schemas import ChatCompletionRequest
from flashserve.backends.base import ChoiceDelta, RequestContext, Usage
from flashserve.chat.reasoning import EFFORT_MODE
from flashserve.chat.tools import ParsedCall

KINDS = ("openai", "deepseek", "vllm", "sglang")
RETRYABLE_STATUS = {500, 502, 503, 504}
CACHE_SALT_HEADER = "x-flashserve-cache-salt"


@dataclass(frozen=True, slots=True)
class Upstream:
    url: str  # base URL, e.g. http://10.0.0.5:8000/v1
    model: str  # the model name the upstream serves
    kind: str = "openai"  # one of KINDS: how reasoning is asked for and usage reported
    api_key: str | None = None  # the upstream's own key (from the catalog's environment variable)
    timeout_s: float = 600.0  # the whole request
    connect_timeout_s: float = 10.0
    retries: int = 2  # extra attempts before the first byte

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"upstream kind must be one of {KINDS}, not {self.kind!r}")


def upstream_body(request: ChatCompletionRequest, upstream: Upstream) -> dict[str, Any]:
    """Our validated request as the upstream wants it: always streamed, with usage, in its own model name
    and reasoning dialect."""
    body = request.model_dump(mode="json", exclude_none=True, by_alias=True)
    body["model"] = upstream.model
    body["stream"] = True
    body["stream_options"] = {"include_usage": True}
    effort = body.pop("reasoning_effort", None)
    if effort is None:
        return body
    mode = EFFORT_MODE.get(effort)
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
    else:
        body["reasoning_effort"] = effort
    return body


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


def upstream_error(status: int, text: str, headers: httpx.Headers | dict[str, str]) -> OpenAIError:
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
        return OpenAIError(429, f"The upstream is rate limiting: {message}", "rate_limit_error", None,
                           "upstream_rate_limited", headers=retry)
    if status in (401, 403):
        return OpenAIError(502, "The upstream refused flashserve's credentials.", SERVER_ERROR, None,
                           "upstream_auth_failed")
    if 400 <= status < 500:
        return OpenAIError(400, f"The upstream rejected the request: {message}", INVALID_REQUEST, param,
                           "upstream_invalid_request")
    return OpenAIError(502, f"The upstream failed (HTTP {status}): {message}", SERVER_ERROR, None, "upstream_error")


class RemoteBackend:
    name = "remote"

    def __init__(self, upstream: Upstream, client: httpx.AsyncClient | None = None) -> None:
        self.upstream = upstream
        self._client = client or httpx.AsyncClient(timeout=httpx.Timeout(upstream.timeout_s,
                                                                          connect=upstream.connect_timeout_s))
        ident = f"{upstream.url}|{upstream.model}"
        self.system_fingerprint = "fp_" + hashlib.sha256(ident.encode()).hexdigest()[:10]
        self._open: set[RemoteGeneration] = set()  # the streams in flight: the load, and abort_all's work

    @property
    def active(self) -> int:
        return len(self._open)

    async def abort_all(self) -> int:
        """Close every upstream stream in flight (shutdown after the drain time); returns how many."""
        open_now = list(self._open)
        for generation in open_now:
            await generation.abort()
        return len(open_now)

    async def open(self, request: ChatCompletionRequest, ctx: RequestContext) -> RemoteGeneration:
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
                    raise OpenAIError(504, "The upstream did not answer in time.", SERVER_ERROR, None,
                                      "upstream_timeout") from exc
            except httpx.HTTPError as exc:
                if last:
                    raise OpenAIError(502, "The upstream is not reachable.", SERVER_ERROR, None,
                                      "upstream_unavailable") from exc
            else:
                if response.status_code == 200:
                    return RemoteGeneration(response, request.n or 1, self)
                text = (await response.aread()).decode(errors="replace")
                await response.aclose()
                if last or response.status_code not in RETRYABLE_STATUS:
                    raise upstream_error(response.status_code, text, response.headers)
            await asyncio.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    def stats(self) -> dict[str, object]:
        return {"upstream": self.upstream.url, "model": self.upstream.model, "active_requests": self.active}

    async def close(self) -> None:
        await self._client.aclose()


class RemoteGeneration:
    """The upstream's event stream as our deltas. Tool calls arrive in pieces per (choice, call index) and
    are handed on whole when their choice finishes."""

    def __init__(self, response: httpx.Response, n: int, backend: RemoteBackend) -> None:
        self.usage = Usage()
        self._response = response
        self._backend = backend
        self._calls: dict[tuple[int, int], dict[str, str]] = {}
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
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    error = chunk["error"] if isinstance(chunk["error"], dict) else {"message": str(chunk["error"])}
                    raise OpenAIError(502, f"The upstream failed mid-stream: {error.get('message')}", SERVER_ERROR,
                                      None, "upstream_error")
                if chunk.get("usage"):
                    self.usage = normalize_usage(chunk["usage"])
                for choice in chunk.get("choices") or ():
                    delta = self._delta(choice)
                    if delta is not None:
                        yield delta
        except (httpx.HTTPError, httpx.StreamError) as exc:
            if self._closed:  # abort_all closed the stream under us (the server's drain time is up)
                raise OpenAIError(503, "The request was aborted by the server.", SERVER_ERROR, None,
                                  "request_aborted") from exc
            raise OpenAIError(502, "The upstream connection failed mid-stream.", SERVER_ERROR, None,
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
        calls: list[ParsedCall] = []
        if reason:
            done = sorted(k for k in self._calls if k[0] == index)
            calls = [ParsedCall(self._calls[k]["id"] or f"call_{k[1]}", self._calls[k]["name"],
                                self._calls[k]["arguments"] or "{}") for k in done]
            for k in done:
                del self._calls[k]
        content = raw.get("content") or ""
        reasoning = raw.get("reasoning_content") or raw.get("reasoning") or ""  # vLLM calls it `reasoning`
        if not (content or reasoning or calls or reason):
            return None
        return ChoiceDelta(index, content, reasoning, tool_calls=calls, finish_reason=reason)

    async def abort(self) -> None:
        if not self._closed:
            self._closed = True
            self._backend._open.discard(self)
            await self._response.aclose()

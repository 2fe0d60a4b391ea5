"""POST /v1/completions (OpenAI's legacy completions) and /beta/completions (DeepSeek's fill in the middle),
as an adapter over `api/core.py`.

This module owns only the wire format: the body (`CompletionRequest`) -> one `GenerationRequest` per
prompt (`raw_prompt`, `suffix`: the backend renders the prompt as is, or in the model's fill-in-the-middle
format), and the core's deltas -> one `text_completion` object or its server-sent chunks. Also served at
the root (`/completions`), as DeepSeek's base URL has it.

A list of prompts is one admitted call per prompt (each billed and recorded as a chat request is, with its
own usage row), opened together before the response starts; choice `i * n + j` is prompt i's j-th choice,
as OpenAI numbers them. A stream gives the prompts' choices one prompt after the other; the usage reported
is the calls' sum.

`logprobs` (an integer 0-20) asks the backend for the sampled tokens' log-probabilities and that many
alternatives, rendered in the legacy shape: `tokens`, `token_logprobs`, `top_logprobs` (one dict per
token) and `text_offset` (each token's character offset in the choice's text). The prompt's own
log-probabilities are not computed, so `echo` with `logprobs` is refused.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from flashserve.accounts.keys import Principal
from flashserve.api.auth import require_api_key
from flashserve.api.chat import KEEPALIVE, usage_dict
from flashserve.api.core import Call, Failed, Finished, KeepAlive, open_call, respond
from flashserve.api.errors import openai_body
from flashserve.api.schemas import MAX_N, Penalty, StreamOptions, Unit, check_stop, stop_list
from flashserve.errors import invalid_request
from flashserve.generation import ChoiceDelta, GenerationRequest, Sampling, TokenLogprob, Usage

router = APIRouter()
MAX_PROMPTS = 16
MAX_CHOICES = 64  # prompts x n: engine requests one body may start
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for legacy completions


class CompletionRequest(BaseModel):
    """The legacy completions body. Prompts as token-id arrays are not accepted (a 400 naming `prompt`)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    model: str = Field(min_length=1)
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]
    suffix: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = DEFAULT_MAX_TOKENS
    temperature: Annotated[float, Field(ge=0, le=2)] | None = 1.0
    top_p: Unit | None = 1.0
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = 1
    best_of: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    echo: bool | None = False
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), le=2**64 - 1)] | None = None
    presence_penalty: Penalty | None = 0.0
    frequency_penalty: Penalty | None = 0.0
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    user: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _text_prompts(cls, value: Any) -> Any:
        if isinstance(value, list) and value and not all(isinstance(p, str) for p in value):
            raise ValueError("prompts must be text: prompts as token ids are not supported")
        return value

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        check_stop(stop_list(value))  # a field validator, so the 400 names `stop`
        return value

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def stop_list(self) -> list[str]:
        return stop_list(self.stop)

    @property
    def choices_per_prompt(self) -> int:
        return self.n or 1


@router.post("/v1/completions", response_model=None)
@router.post("/completions", response_model=None, include_in_schema=False)
@router.post("/beta/completions", response_model=None, include_in_schema=False)
async def create_completion(body: CompletionRequest, request: Request,
                            principal: Annotated[Principal, Depends(require_api_key)]
                            ) -> JSONResponse | StreamingResponse:
    check_request(body)
    calls: list[Call] = []
    try:
        for prompt in body.prompts:
            calls.append(await open_call(request, principal, generation_request(body, prompt), id_prefix="cmpl"))
    except BaseException:
        for call in calls:  # admitted before a later prompt was refused: nothing was generated for them
            await call.finish("cancelled")
        raise
    view = CompletionView(calls, body)
    return await respond(view, bool(body.stream), request, {"x-request-id": calls[0].id})


def check_request(body: CompletionRequest) -> None:
    """Checks that span several fields."""
    n = body.choices_per_prompt
    if body.stream_options is not None and not body.stream:
        raise invalid_request("The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                              "stream_options", "invalid_value")
    if body.best_of is not None and body.best_of != n:
        raise invalid_request("'best_of' (server-side choices ranked by log-probability) is not supported: "
                              "leave it out or equal to 'n'.", "best_of", "unsupported_parameter")
    if body.echo and body.logprobs is not None:
        raise invalid_request("'echo' with 'logprobs' would need the prompt's log-probabilities, which are not "
                              "computed: use one or the other.", "echo", "unsupported_parameter")
    if len(body.prompts) * n > MAX_CHOICES:
        raise invalid_request(f"{len(body.prompts)} prompts with n={n} ask for more than {MAX_CHOICES} choices.",
                              "n", "invalid_value")


def generation_request(body: CompletionRequest, prompt: str) -> GenerationRequest:
    """One prompt of the body as the internal request: the prompt as is (no chat template), or with
    `suffix` the model's fill-in-the-middle format."""
    return GenerationRequest(
        model=body.model,
        messages=[],
        raw_prompt=prompt,
        suffix=body.suffix,
        sampling=Sampling(
            temperature=body.temperature, top_p=body.top_p, max_tokens=body.max_tokens, stop=tuple(body.stop_list),
            seed=body.seed, presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
            logit_bias=body.logit_bias, n=body.choices_per_prompt,
            logprobs=True if body.logprobs is not None else None, top_logprobs=body.logprobs,
        ),
        stream=bool(body.stream),
        user=body.user,
    )


# -- response --------------------------------------------------------------------------------------------
@dataclass
class LegacyLogprobs:
    """One choice's log-probabilities in the legacy shape, built token by token."""

    top_n: int
    offset: int = 0  # where the next token starts in the choice's text
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[str, float]] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)

    def add(self, entries: list[TokenLogprob]) -> dict[str, Any]:
        """Append a delta's tokens; returns those tokens alone in the legacy shape (a stream chunk's)."""
        part = LegacyLogprobs(self.top_n, self.offset)
        for entry in entries:
            for target in (self, part):
                target.tokens.append(entry.token)
                target.token_logprobs.append(entry.logprob)
                target.top_logprobs.append({alt.token: alt.logprob for alt in entry.top[:self.top_n]})
                target.text_offset.append(target.offset)
                target.offset += len(entry.token)
        return part.as_dict()

    def as_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top_logprobs,
                "text_offset": self.text_offset}


def _event(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


class CompletionView:
    """The response of one completions body over its calls (one per prompt)."""

    def __init__(self, calls: list[Call], body: CompletionRequest) -> None:
        self.calls = calls
        self.prompts = body.prompts
        self.n = body.choices_per_prompt
        self.model = body.model
        self.echo = bool(body.echo)
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)
        total = len(calls) * self.n
        self.logprobs = [LegacyLogprobs(body.logprobs) for _ in range(total)] if body.logprobs is not None else None
        self.head = calls[0]

    def _index(self, call_index: int, delta: ChoiceDelta) -> int:
        return call_index * self.n + delta.index

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.head.id, "object": "text_completion", "created": self.head.created, "model": self.model,
                "system_fingerprint": self.head.system_fingerprint, "choices": choices}

    def _logprobs_of(self, index: int, delta: ChoiceDelta) -> dict[str, Any] | None:
        if self.logprobs is None:
            return None
        return self.logprobs[index].add(delta.logprobs)

    def _usage(self, usages: list[Usage], cost_pusd: int) -> dict[str, Any]:
        total = Usage(prompt_tokens=sum(u.prompt_tokens for u in usages),
                      cached_tokens=sum(u.cached_tokens for u in usages),
                      completion_tokens=sum(u.completion_tokens for u in usages),
                      reasoning_tokens=sum(u.reasoning_tokens for u in usages))
        return usage_dict(total, cost_pusd)

    # -- streaming -----------------------------------------------------------------------------------------
    async def events(self) -> AsyncIterator[str]:
        usages: list[Usage] = []
        cost = 0
        try:
            for c, call in enumerate(self.calls):
                if self.echo:
                    for j in range(self.n):
                        yield _event(self._chunk([{"index": c * self.n + j, "text": self.prompts[c],
                                                   "logprobs": None, "finish_reason": None}]))
                async with call.streaming() as events:
                    async for event in events:
                        if isinstance(event, KeepAlive):
                            yield KEEPALIVE
                        elif isinstance(event, Failed):  # headers are sent: reported in-band
                            yield _event(openai_body(event.error))
                            yield _event("[DONE]")
                            return
                        elif isinstance(event, Finished):
                            usages.append(event.usage)
                            cost += event.cost_pusd
                        elif event.content or event.finish_reason or event.logprobs:
                            index = self._index(c, event)
                            yield _event(self._chunk([{"index": index, "text": event.content,
                                                       "logprobs": self._logprobs_of(index, event),
                                                       "finish_reason": event.finish_reason}]))
            if self.include_usage:
                final = self._chunk([])
                final["usage"] = self._usage(usages, cost)
                yield _event(final)
            yield _event("[DONE]")
        finally:
            for call in self.calls:  # the client left before a later prompt's turn: those are cancelled
                await call.finish()

    # -- not streaming -------------------------------------------------------------------------------------
    async def collect(self, request: Request) -> tuple[dict[str, Any], int] | None:
        total = len(self.calls) * self.n
        texts = [self.prompts[i // self.n] if self.echo else "" for i in range(total)]
        reasons: list[str | None] = [None] * total
        cost = 0
        try:
            for c, call in enumerate(self.calls):
                def add(delta: ChoiceDelta, c: int = c) -> None:
                    index = self._index(c, delta)
                    texts[index] += delta.content
                    if self.logprobs is not None:
                        self.logprobs[index].add(delta.logprobs)
                    if delta.finish_reason:
                        reasons[index] = delta.finish_reason

                spent = await call.collect(add, request)
                if spent is None:
                    return None
                cost += spent
        finally:
            for call in self.calls:
                await call.finish()
        body = {
            "id": self.head.id, "object": "text_completion", "created": self.head.created, "model": self.model,
            "choices": [{"index": i, "text": texts[i],
                         "logprobs": self.logprobs[i].as_dict() if self.logprobs is not None else None,
                         "finish_reason": reasons[i]} for i in range(total)],
            "usage": self._usage([call.usage for call in self.calls], cost),
            "system_fingerprint": self.head.system_fingerprint,
        }
        return body, cost


"""One generation request inside the engine: its sampling parameters, its
tokens, where it stands (waiting, running, finished) and the counters that
usage is billed from.

Everything here is owned by the engine thread; other threads only see the
immutable `RequestOutput`s it emits.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from flashserve.engine.logprobs import MAX_TOP_LOGPROBS, SampledLogprob


class TokenConstraint(Protocol):
    """A grammar that decides which tokens may come next (see chat/structured.py)."""

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None: ...

    def accept(self, token_id: int) -> bool: ...

    @property
    def is_terminated(self) -> bool: ...


@dataclass(slots=True)
class SamplingParams:
    """How to pick tokens and when to stop; chat-level concerns (stop strings,
    detokenization) are handled outside the engine."""

    temperature: float = 1.0
    top_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    max_tokens: int | None = None  # None: as many as the context leaves
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # None: no logprobs; k: each emitted token's logprob and its k most likely alternatives (engine/logprobs.py)
    logprobs: int | None = None

    def __post_init__(self) -> None:
        assert 0.0 <= self.temperature <= 2.0, self.temperature
        assert 0.0 <= self.top_p <= 1.0, self.top_p
        assert -2.0 <= self.presence_penalty <= 2.0
        assert -2.0 <= self.frequency_penalty <= 2.0
        assert self.max_tokens is None or self.max_tokens >= 1
        assert self.logprobs is None or 0 <= self.logprobs <= MAX_TOP_LOGPROBS, self.logprobs

    @property
    def greedy(self) -> bool:
        # top_p == 0 keeps only the most likely token, which is greedy too.
        return self.temperature == 0.0 or self.top_p == 0.0

    @property
    def uses_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass(frozen=True, slots=True)
class ThinkingControl:
    """A request that starts inside a thinking block: its tokens count as reasoning until the
    end marker, which the engine forces once `budget` thinking tokens are spent. A request with a
    grammar (structured output, forced tool calls) thinks freely; the grammar applies from the first
    token after the end marker, and the sequence cannot end before it (stop tokens are masked)."""

    end_token_ids: tuple[int, ...]
    budget: int | None = None

    def __post_init__(self) -> None:
        assert self.end_token_ids, "a thinking request needs the end-of-thinking marker's tokens"
        assert self.budget is None or self.budget > len(self.end_token_ids)


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.StrEnum):
    STOP = "stop"  # an end-of-sequence token or, decided outside, a stop string
    LENGTH = "length"  # max_tokens or the context ran out
    ABORT = "abort"  # client went away or the server is shutting down


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_output_tokens: int  # params.max_tokens clamped to what the context leaves
    cache_salt: str = ""  # namespaces prefix-cache blocks (per tenant)
    constraint: TokenConstraint | None = None
    thinking: ThinkingControl | None = None
    num_reasoning_tokens: int = 0
    thinking_done: bool = False
    forced_token_ids: list[int] = field(default_factory=list)  # emitted next, whatever the logits say
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int | None = None  # prompt tokens served by the prefix cache, fixed at first schedule
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # keys of this request's full blocks, in order
    num_preemptions: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    scheduled_time: float | None = None  # first admitted to the running batch (queue time ends)
    first_token_time: float | None = None
    last_token_time: float | None = None
    generator: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        assert self.prompt_token_ids, "a request needs at least one prompt token"
        assert self.max_output_tokens >= 1
        self.generator = torch.Generator()
        if self.params.seed is not None:
            self.generator.manual_seed(self.params.seed)
        else:
            self.generator.seed()

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def in_thinking(self) -> bool:
        """Inside the thinking block the prompt opened: the grammar (if any) waits until it ends."""
        return self.thinking is not None and not self.thinking_done

    def track_thinking(self, token: int) -> None:
        """Count a thinking token; force the end marker when the budget is spent."""
        control = self.thinking
        if control is None or self.thinking_done:
            return
        self.num_reasoning_tokens += 1
        end = control.end_token_ids
        if tuple(self.output_token_ids[-len(end):]) == end:
            self.thinking_done = True
            self.forced_token_ids.clear()
        elif (control.budget is not None and not self.forced_token_ids
              and self.num_reasoning_tokens + len(end) >= control.budget):
            self.forced_token_ids.extend(end)


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """What one engine step produced for one request (sent to its stream)."""

    request_id: str
    new_token_ids: tuple[int, ...]
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    num_reasoning_tokens: int = 0
    logprobs: tuple[SampledLogprob, ...] = ()  # one per new token, for a request that asks for logprobs

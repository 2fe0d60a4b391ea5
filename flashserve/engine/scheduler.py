"""Continuous batching: which requests run in the next forward pass, and how
many of their tokens.

Each step has a token budget. Running requests go first (a decode costs one
token; an unfinished prefill continues with its next chunk), then waiting
requests are admitted in arrival order, their prompts chunked to what the
budget leaves. When the block pool runs dry the newest running request is
preempted: its blocks are freed and it is recomputed later (its prefix will
often still be cached).

The scheduler sees the KV cache only through `allocate`/`free` and the prefix
lookup, so it is tested on CPU with a small pool and no model.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from flashserve.engine.kv_cache import KVCacheManager
from flashserve.engine.logprobs import SampledLogprob
from flashserve.engine.request import FinishReason, Request, RequestOutput, RequestStatus


@dataclass(frozen=True, slots=True)
class ScheduledChunk:
    request: Request
    num_new_tokens: int  # tokens computed in this step, starting at request.num_computed_tokens

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the end of the known tokens, so the step picks the next one."""
        return self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_new_tokens for c in self.chunks)

    @property
    def sampling_requests(self) -> list[Request]:
        return [c.request for c in self.chunks if c.samples]


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    max_model_len: int = 8192

    def __post_init__(self) -> None:
        assert self.max_num_seqs >= 1
        assert self.max_num_batched_tokens >= 1
        assert self.max_model_len >= 2


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._by_id: dict[str, Request] = {}

    # -- membership ---------------------------------------------------------
    def add(self, request: Request) -> None:
        assert request.request_id not in self._by_id, f"duplicate request id {request.request_id}"
        assert request.num_prompt_tokens < self.config.max_model_len
        self._by_id[request.request_id] = request
        self.waiting.append(request)

    def abort(self, request_id: str) -> Request | None:
        """Finish a request wherever it is and free its blocks. Idempotent."""
        request = self._by_id.get(request_id)
        if request is None:
            return None
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self._finish(request, FinishReason.ABORT)
        return request

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_requests(self) -> int:
        return len(self._by_id)

    # -- scheduling ---------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.kv.allocate(request, num_new):
                victim = self.running.pop()  # the newest
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is request:
                    break
            else:
                out.chunks.append(ScheduledChunk(request, num_new))
                budget -= num_new
                i += 1
                continue
            break  # the request preempted itself: nothing older is left to try

        # Admit new work only when nothing had to be preempted: the pool is tight otherwise.
        while not out.preempted and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            prefix = self.kv.find_cached_prefix(request)
            num_cached = len(prefix) * self.kv.block_size
            num_new = min(request.num_tokens - num_cached, budget)
            if not self.kv.allocate(request, num_new, prefix):
                break
            self.waiting.popleft()
            request.num_computed_tokens = num_cached
            if request.num_cached_tokens is None:
                request.num_cached_tokens = min(num_cached, request.num_prompt_tokens)
                request.scheduled_time = time.monotonic()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.chunks.append(ScheduledChunk(request, num_new))
            budget -= num_new
        return out

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)

    # -- results ------------------------------------------------------------
    def update(self, out: SchedulerOutput, sampled: dict[str, int],
               logprobs: dict[str, SampledLogprob] | None = None) -> list[RequestOutput]:
        """Advance the scheduled requests by what the step computed and sampled (and the sampled tokens'
        logprobs, for the requests that ask for them)."""
        outputs: list[RequestOutput] = []
        for chunk in out.chunks:
            request = chunk.request
            request.num_computed_tokens += chunk.num_new_tokens
            token = sampled.get(request.request_id)
            if token is None:
                self.kv.cache_full_blocks(request)
                continue
            request.output_token_ids.append(token)
            thought = request.in_thinking  # a thinking token (the end marker included) is not the grammar's
            request.track_thinking(token)
            reason = self._stop_reason(request, token, grammar_token=not thought)
            self.kv.cache_full_blocks(request)
            if reason is not None:
                self.running.remove(request)
                self._finish(request, reason)
            logprob = None if logprobs is None else logprobs.get(request.request_id)
            outputs.append(self._output(request, (token,), () if logprob is None else (logprob,)))
        return outputs

    def _stop_reason(self, request: Request, token: int, grammar_token: bool = True) -> FinishReason | None:
        # The mask only offers tokens the grammar accepts; a refusal would be a bug, so stop cleanly.
        # Thinking tokens (up to and with `</think>`) come before the grammar's first token.
        constraint = request.constraint
        if constraint is not None and grammar_token and (not constraint.accept(token) or constraint.is_terminated):
            return FinishReason.STOP
        if not request.params.ignore_eos and token in request.params.stop_token_ids:
            return FinishReason.STOP
        if len(request.output_token_ids) >= request.max_output_tokens:
            return FinishReason.LENGTH
        if request.num_tokens >= self.config.max_model_len:
            return FinishReason.LENGTH
        return None

    def _finish(self, request: Request, reason: FinishReason) -> None:
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        self.kv.free(request)
        del self._by_id[request.request_id]

    @staticmethod
    def _output(request: Request, new_tokens: tuple[int, ...],
                logprobs: tuple[SampledLogprob, ...] = ()) -> RequestOutput:
        return RequestOutput(
            request_id=request.request_id,
            new_token_ids=new_tokens,
            finished=request.is_finished,
            finish_reason=request.finish_reason,
            num_prompt_tokens=request.num_prompt_tokens,
            num_cached_tokens=request.num_cached_tokens or 0,
            num_output_tokens=len(request.output_token_ids),
            num_reasoning_tokens=request.num_reasoning_tokens,
            logprobs=logprobs,
        )

    @staticmethod
    def final_output(request: Request) -> RequestOutput:
        """The closing output of a request finished outside a step (an abort)."""
        return Scheduler._output(request, ())

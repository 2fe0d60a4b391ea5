"""The synchronous engine: one `step()` schedules a batch, runs the model,
samples, and advances every request in the batch.

It is single-threaded by design; `async_engine.AsyncEngine` drives it from a
background thread and connects it to asyncio.

Which runner a model gets is its family's choice (`models/registry.py: ModelFamily.runner`), by a name
in `RUNNERS`; the engine never probes the model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from flashserve.engine.kv_cache import KVCacheManager, KVCacheStorage
from flashserve.engine.logprobs import SampledLogprob, sampled_logprobs
from flashserve.engine.request import Request, RequestOutput, SamplingParams, ThinkingControl, TokenConstraint
from flashserve.engine.runner import ModelRunner, Runner, StepLogits
from flashserve.engine.sampler import Sampler
from flashserve.engine.scheduler import Scheduler, SchedulerConfig
from flashserve.engine.state_runner import SequenceStateRunner, SnapshotPool
from flashserve.metrics import EngineSeries


@dataclass(frozen=True, slots=True)
class EngineConfig:
    max_model_len: int
    num_kv_blocks: int = 1024
    block_size: int = 16
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    enable_prefix_caching: bool = True
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    kv_cache_dtype: torch.dtype | None = None  # None: the model's dtype
    # Bytes of prefix-state copies a sequence-state runner may keep (the family derives it from the same
    # memory setting as the paged cache); None: unbounded. Unused by paged runners.
    snapshot_bytes: int | None = None

    def __post_init__(self) -> None:
        assert self.block_size > 0 and self.num_kv_blocks > 0
        # A single request must be able to fill the whole context.
        assert self.num_kv_blocks * self.block_size >= self.max_model_len, (
            f"the KV cache ({self.num_kv_blocks * self.block_size} tokens) must hold one full context "
            f"({self.max_model_len} tokens)"
        )
        assert self.snapshot_bytes is None or self.snapshot_bytes >= 0


def _paged_runner(model: nn.Module, config: EngineConfig, kv: KVCacheManager) -> Runner:
    storage = KVCacheStorage(model.cache_specs(), config.num_kv_blocks, config.block_size,
                             config.kv_cache_dtype or config.dtype, config.device)
    return ModelRunner(model, storage, config.block_size, config.device)


def _sequence_state_runner(model: nn.Module, config: EngineConfig, kv: KVCacheManager) -> Runner:
    capacity = config.snapshot_bytes if config.enable_prefix_caching else 0
    runner = SequenceStateRunner(model, config.block_size, SnapshotPool(capacity))
    kv.prefix_store = runner  # one LRU: a hit is cut to the copies the pool holds (state_runner.py)
    return runner


# name (a family's `runner`) -> factory. "paged": K/V in the block pool (Llama and most models);
# "sequence_state": a per-request state with prefix copies in a byte-bounded pool (DeepSeek-V4).
RUNNERS: dict[str, Callable[[nn.Module, EngineConfig, KVCacheManager], Runner]] = {
    "paged": _paged_runner,
    "sequence_state": _sequence_state_runner,
}


class LLMEngine:
    def __init__(self, model: nn.Module, config: EngineConfig, vocab_size: int, runner: str = "paged") -> None:
        self.config = config
        self.model = model
        self.kv = KVCacheManager(config.num_kv_blocks, config.block_size, config.enable_prefix_caching)
        self.runner: Runner = RUNNERS[runner](model, config, self.kv)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, config.max_model_len), self.kv
        )
        self.sampler = Sampler(vocab_size)
        self.series: EngineSeries | None = None  # the engine's Prometheus series (metrics.py), when exported

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    cache_salt: str = "", constraint: TokenConstraint | None = None,
                    thinking: ThinkingControl | None = None) -> Request:
        room = self.config.max_model_len - len(prompt_token_ids)
        if room < 1:
            raise ValueError(f"prompt of {len(prompt_token_ids)} tokens leaves no room in a context of "
                             f"{self.config.max_model_len}")
        max_out = room if params.max_tokens is None else min(params.max_tokens, room)
        request = Request(request_id, list(prompt_token_ids), params, max_output_tokens=max_out,
                          cache_salt=cache_salt, constraint=constraint, thinking=thinking)
        self.scheduler.add(request)
        return request

    def abort_request(self, request_id: str) -> RequestOutput | None:
        request = self.scheduler.abort(request_id)
        self.runner.release(request_id)
        return None if request is None else Scheduler.final_output(request)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch.chunks:
            return []
        step = self.runner.run(batch)
        sampling = batch.sampling_requests
        tokens = self.sampler(step.logits, sampling)
        sampled = {r.request_id: t for r, t in zip(sampling, tokens, strict=True)}
        outputs = self.scheduler.update(batch, sampled, self._logprobs(step, sampling, sampled))
        for out in outputs:
            if out.finished:
                self.runner.release(out.request_id)
        if self.series is not None:
            self._record(sampling, outputs)  # the list taken before `update` moved the requests on
        return outputs

    @staticmethod
    def _logprobs(step: StepLogits, sampling: list[Request], sampled: dict[str, int]) -> dict[str, SampledLogprob]:
        """The sampled tokens' logprobs, from the exact rows of the requests that ask for them (only those
        rows: the rest of the batch pays nothing)."""
        wanting = [r for r in sampling if r.request_id in step.exact]
        if not wanting:
            return {}
        exact = torch.stack([step.exact[r.request_id] for r in wanting])
        tokens = [sampled[r.request_id] for r in wanting]
        found = sampled_logprobs(exact, tokens, [r.params.logprobs or 0 for r in wanting])
        return {r.request_id: lp for r, lp in zip(wanting, found, strict=True)}

    def _record(self, sampled: list[Request], outputs: list[RequestOutput]) -> None:
        """The step's figures for /metrics: per token (first-token, inter-token times), per finished
        request (end-to-end, time per output token), and the batch and cache state after the step."""
        series = self.series
        assert series is not None
        now = time.monotonic()
        by_id = {r.request_id: r for r in sampled}
        for out in outputs:
            request = by_id.get(out.request_id)
            if request is None:
                continue
            if request.first_token_time is None:
                request.first_token_time = now
                series.on_first_token(request.arrival_time, request.scheduled_time or now, now,
                                      out.num_prompt_tokens, out.num_cached_tokens)
                series.on_token(None)
            else:
                series.on_token(now - (request.last_token_time or now))
            request.last_token_time = now
            if out.finished:
                series.on_finish(request.arrival_time, request.first_token_time, now, out.num_output_tokens,
                                 str(out.finish_reason or "stop"))
        series.on_step(len(self.scheduler.running), len(self.scheduler.waiting),
                       self.kv.num_used_blocks / self.kv.num_blocks)

    def stats(self) -> dict[str, int]:
        return {**self.kv.stats(), **self.runner.stats(), "running": len(self.scheduler.running),
                "waiting": len(self.scheduler.waiting)}

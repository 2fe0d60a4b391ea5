"""The `Runner` protocol every runner implements, and `ModelRunner`: the runner of paged-KV models.

A runner turns one scheduled batch into the logits to sample from, drops a finished request's state, and
says how much of a prefix hit it can resume (a runner that keeps more than the blocks, like DeepSeek-V4's,
is the KV manager's `PrefixStore`; a paged one resumes every cached block). `engine.RUNNERS` names the
runners a model family can ask for (`models/registry.py: ModelFamily.runner`).

`ModelRunner` is the only engine part that knows paged tensors: it flattens the
scheduled chunks into one token batch (one-token chunks first, so the decode
kernel reads them as one contiguous slice), builds the attention metadata from
the block tables, calls the model, and computes logits only for the rows that
sample (the last token of each request whose known tokens are now all computed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from flashserve.engine.kv_cache import KVCacheStorage
from flashserve.engine.request import Request
from flashserve.engine.scheduler import ScheduledChunk, SchedulerOutput
from flashserve.models.layers import AttentionMetadata


@dataclass(slots=True)
class StepLogits:
    """What a runner computed for a step's sampling requests."""

    logits: torch.Tensor  # [num_sampling_requests, vocab], in `batch.sampling_requests` order: what is sampled
    # request id -> float32 logits [vocab] of the full float32 head, for the requests that ask for logprobs
    exact: dict[str, torch.Tensor] = field(default_factory=dict)


def wants_logprobs(request: Request) -> bool:
    """Whether the token this step samples for `request` gets a logprob. Not while it thinks: logprobs
    cover content tokens, so thinking tokens (the end marker included) cost nothing extra."""
    return request.params.logprobs is not None and (request.thinking is None or request.thinking_done)


class Runner(Protocol):
    def run(self, batch: SchedulerOutput) -> StepLogits:
        """The logits to sample from, and the exact ones of requests that ask for logprobs."""
        ...

    def release(self, request_id: str) -> None:
        """The request finished or was aborted: drop what the runner holds for it."""
        ...

    def resumable_blocks(self, keys: Sequence[bytes]) -> int:
        """How many of a prefix hit's leading blocks (by chained key) the runner can resume from."""
        ...

    def evicted(self, key: bytes) -> None:
        """The KV manager reused the cached block `key` names."""
        ...

    def stats(self) -> dict[str, int]:
        ...


class ModelRunner:
    def __init__(self, model: nn.Module, storage: KVCacheStorage, block_size: int,
                 device: torch.device | str = "cpu") -> None:
        self.model = model
        self.storage = storage
        self.block_size = block_size
        self.device = torch.device(device)

    def release(self, request_id: str) -> None:
        """Nothing to drop: a request's K/V lives in its blocks, which the scheduler frees."""

    def resumable_blocks(self, keys: Sequence[bytes]) -> int:
        return len(keys)  # a cached block holds its K/V itself

    def evicted(self, key: bytes) -> None:
        """Nothing else to drop: the K/V was in the block."""

    def stats(self) -> dict[str, int]:
        return {}

    @torch.inference_mode()
    def run(self, batch: SchedulerOutput) -> StepLogits:
        """Logits [num_sampling_requests, vocab], in `batch.sampling_requests` order, and the exact rows."""
        # Generated-token decodes first: the leading rows that quantized weights and the decode kernel
        # serve. The sort is stable, so each group keeps the scheduler's order.
        chunks = sorted(batch.chunks, key=lambda c: not _generated(c))
        generated = sum(map(_generated, chunks))  # each samples: its token completes the known ones
        token_ids: list[int] = []
        positions: list[int] = []
        tables: list[list[int]] = []
        q_lens: list[int] = []
        ctx_lens: list[int] = []
        logit_rows: list[int] = []  # decode rows first, like the batch
        sampled: list[str] = []
        exact_ids: list[str] = []
        exact_rows: list[int] = []  # indices into logit_rows
        for chunk in chunks:
            request = chunk.request
            start = request.num_computed_tokens
            end = start + chunk.num_new_tokens
            token_ids.extend(request.all_token_ids[start:end])
            positions.extend(range(start, end))
            tables.append(request.block_ids)
            q_lens.append(chunk.num_new_tokens)
            ctx_lens.append(end)
            if chunk.samples:
                if wants_logprobs(request):
                    exact_ids.append(request.request_id)
                    exact_rows.append(len(logit_rows))
                logit_rows.append(len(token_ids) - 1)
                sampled.append(request.request_id)
        meta = AttentionMetadata.build(tables, q_lens, ctx_lens, self.block_size, self.device,
                                       generated_rows=generated)
        input_ids = torch.tensor(token_ids, dtype=torch.int64, device=self.device)
        hidden = self.model(input_ids, torch.tensor(positions, device=self.device), meta, self.storage.layers)
        if logit_rows != list(range(len(token_ids))):  # a pure decode batch samples every row, in order
            hidden = hidden[torch.tensor(logit_rows, dtype=torch.int64, device=self.device)]
        logits = self.model.compute_logits(hidden, generated).float().cpu()
        exact: dict[str, torch.Tensor] = {}
        if exact_ids:
            rows = hidden[torch.tensor(exact_rows, dtype=torch.int64, device=self.device)]
            full = _exact_logits(self.model, rows, logits[torch.tensor(exact_rows)])
            exact = dict(zip(exact_ids, full, strict=True))
        order = {request_id: i for i, request_id in enumerate(sampled)}
        wanted = [order[r.request_id] for r in batch.sampling_requests]
        logits = logits if wanted == list(range(len(wanted))) else logits[torch.tensor(wanted)]
        return StepLogits(logits, exact)


def _exact_logits(model: nn.Module, hidden: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """The model's full float32 head over `hidden` (float32 [rows, vocab]); a model without a separate one
    (its head is exact already) gives its logits as they are."""
    exact = getattr(model, "exact_logits", None)
    return logits if exact is None else exact(hidden).float().cpu()


def _generated(chunk: ScheduledChunk) -> bool:
    """A decode of a generated token (not a one-token piece of a prompt, e.g. after a prefix-cache hit):
    which weights serve a row must follow from the request alone, so cached and uncached prompts agree."""
    return chunk.num_new_tokens == 1 and chunk.request.num_computed_tokens >= chunk.request.num_prompt_tokens

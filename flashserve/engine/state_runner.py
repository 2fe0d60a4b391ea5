"""Runs models that carry a per-sequence state instead of reading a paged KV cache (DeepSeek-V4).

DeepSeek-V4's attention state is not one K/V row per token: each layer keeps a sliding window, compressed
entries that appear every 4 or 128 tokens, and the compressor's unfinished window. So the model runs each
scheduled chunk on its request's own `SequenceState` (`models/deepseek_v4.py`), one request after another
within a step, and the scheduler's block pool only does the bookkeeping (admission, preemption, and the
prefix cache's keys), with blocks of one prefix unit (128 tokens).

Prefix caching: whenever a request's state reaches the end of a whole unit, the runner keeps a copy keyed by
the same chained block key the KV manager gives that block (`kv_cache.block_key`, salt included). When the
scheduler admits a request with a cached prefix, the request starts from the copy at that boundary, so
`cached_tokens` counts whole reused units only. Copies are dropped oldest first beyond `max_snapshots`; a
request whose copy is gone recomputes its prefix from the tokens (same logits, only slower).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from flashserve.engine.kv_cache import block_key
from flashserve.engine.request import Request
from flashserve.engine.scheduler import SchedulerOutput


class SequenceStateRunner:
    def __init__(self, model: nn.Module, unit: int, max_snapshots: int) -> None:
        self.model = model
        self.unit = unit
        self.max_snapshots = max_snapshots
        self.states: dict[str, Any] = {}  # request id -> its SequenceState
        self.snapshots: OrderedDict[bytes, Any] = OrderedDict()
        self.recomputed_prefixes = 0  # hits whose copy had been dropped (see the module docstring)

    @torch.inference_mode()
    def run(self, batch: SchedulerOutput) -> torch.Tensor:
        """Logits [num_sampling_requests, vocab], in `batch.sampling_requests` order."""
        last: dict[str, torch.Tensor] = {}
        for chunk in batch.chunks:
            request = chunk.request
            start = request.num_computed_tokens
            state = self._state_at(request, start)
            logits = self._advance(request, state, start, start + chunk.num_new_tokens)
            if chunk.samples:
                last[request.request_id] = logits
        if not batch.sampling_requests:
            return torch.empty(0, 0)
        return torch.cat([last[r.request_id] for r in batch.sampling_requests]).float()

    def release(self, request_id: str) -> None:
        """The request finished or was aborted: its state goes (its prefix copies stay for others)."""
        self.states.pop(request_id, None)

    def _state_at(self, request: Request, start: int) -> Any:
        """The request's state after its first `start` tokens: its own, a prefix copy, or rebuilt."""
        state = self.states.get(request.request_id)
        if state is None or state.length != start:  # new, admitted with a cached prefix, or preempted
            if start == 0:
                state = self.model.new_state()
            else:
                copy = self.snapshots.get(self._key(request, start))
                if copy is not None:
                    state = copy.copy()
                else:
                    self.recomputed_prefixes += 1
                    state = self.model.new_state()
                    self._advance(request, state, 0, start)
            self.states[request.request_id] = state
        return state

    def _advance(self, request: Request, state: Any, start: int, end: int) -> torch.Tensor:
        """Run tokens [start, end) on `state`, stopping at every unit boundary to keep a copy there;
        returns the last token's logits [1, vocab]."""
        logits = torch.empty(0)
        pos = start
        while pos < end:
            stop = min(end, (pos // self.unit + 1) * self.unit)
            ids = torch.tensor(request.all_token_ids[pos:stop], dtype=torch.int64)
            logits = self.model(ids, state, last_only=True)
            if stop % self.unit == 0:
                self._keep(self._key(request, stop), state)
            pos = stop
        return logits

    def _keep(self, key: bytes, state: Any) -> None:
        if key in self.snapshots:
            self.snapshots.move_to_end(key)
            return
        self.snapshots[key] = state.copy()
        while len(self.snapshots) > self.max_snapshots:
            self.snapshots.popitem(last=False)

    def _key(self, request: Request, length: int) -> bytes:
        """The KV manager's chained key of the block that ends at `length` (a multiple of the unit)."""
        key: bytes | None = None
        tokens = request.all_token_ids
        for i in range(0, length, self.unit):
            key = block_key(key, request.cache_salt, tuple(tokens[i:i + self.unit]))
        assert key is not None
        return key

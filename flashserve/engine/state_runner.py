"""Runs models that carry a per-sequence state instead of reading a paged KV cache (DeepSeek-V4).

DeepSeek-V4's attention state is not one K/V row per token: each layer keeps a sliding window, compressed
entries that appear every 4 or 128 tokens, and the compressor's unfinished window. So the model runs each
scheduled chunk on its request's own `SequenceState` (`models/deepseek_v4.py`), one request after another
within a step, and the scheduler's block pool only does the bookkeeping (admission, preemption, and the
prefix cache's keys), with blocks of one prefix unit (128 tokens).

Prefix caching: whenever a request's state reaches the end of a whole unit, the runner keeps a copy in its
`SnapshotPool`, keyed by the same chained block key the KV manager gives that block (`kv_cache.block_key`,
salt included). The pool is bounded in bytes (`EngineConfig.snapshot_bytes`, which the model family derives
from the same memory setting as a paged KV cache: `models/registry.py`) and its LRU is the one that decides
what hits: the KV manager's blocks only say which token prefixes were seen, and before admitting a request
it asks the pool how much of its hit can be resumed (`resumable_blocks`: up to the deepest copy held, which
becomes the most recently used); a block the KV manager reuses drops its copy (`evicted`). A copy after n
units resumes the whole n-unit prefix by itself, so the pool dropping a shorter copy of the same prefix
costs no hit. So a hit is always a prefix whose state is resumed, and `cached_tokens` counts exactly the
tokens whose state was reused. Should a copy still be gone when the request runs (it
cannot be between admission and the run, which happen in one step, but the runner does not rely on it), the
request resumes from the longest copy left, recomputes the rest, and its `num_cached_tokens` is lowered to
what was actually resumed: recomputed tokens are never billed as cache hits.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from flashserve.engine.kv_cache import block_key
from flashserve.engine.request import Request
from flashserve.engine.runner import StepLogits, wants_logprobs
from flashserve.engine.scheduler import SchedulerOutput


class SnapshotPool:
    """Prefix-state copies by block key, least recently used dropped first, bounded in bytes.

    Copies of one sequence share their compressed-entry pages (`EntryPages`), so bytes are counted per
    tensor storage: a page held by ten copies counts once, and is freed (uncounted) with its last holder.
    `capacity_bytes=None` is unbounded (tests); 0 keeps nothing.
    """

    def __init__(self, capacity_bytes: int | None) -> None:
        assert capacity_bytes is None or capacity_bytes >= 0
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self._copies: OrderedDict[bytes, tuple[Any, list[int]]] = OrderedDict()  # key -> (state, storages)
        self._storages: dict[int, list[int]] = {}  # storage pointer -> [holders, bytes]

    def __len__(self) -> int:
        return len(self._copies)

    def __contains__(self, key: bytes) -> bool:
        return key in self._copies

    def get(self, key: bytes) -> Any | None:
        """The copy under `key` (now the most recently used), or None."""
        entry = self._copies.get(key)
        if entry is None:
            return None
        self._copies.move_to_end(key)
        return entry[0]

    def touch(self, key: bytes) -> None:
        if key in self._copies:
            self._copies.move_to_end(key)

    def put(self, key: bytes, state: Any) -> None:
        """Keep a copy of `state` under `key`, dropping the least recently used copies to stay in bounds."""
        if key in self._copies:
            self._copies.move_to_end(key)
            return
        if self.capacity_bytes == 0:
            return
        copy = state.copy()
        storages: list[int] = []
        added = 0
        for tensor in copy.tensors():
            storage = tensor.untyped_storage()
            ptr = storage.data_ptr()
            if ptr in storages:
                continue
            storages.append(ptr)
            held = self._storages.get(ptr)
            if held is None:
                self._storages[ptr] = [1, storage.nbytes()]
                added += storage.nbytes()
            else:
                held[0] += 1
        self._copies[key] = (copy, storages)
        self.used_bytes += added
        while self.capacity_bytes is not None and self.used_bytes > self.capacity_bytes and self._copies:
            self._remove(next(iter(self._copies)))

    def discard(self, key: bytes) -> None:
        if key in self._copies:
            self._remove(key)

    def clear(self) -> None:
        for key in list(self._copies):
            self._remove(key)

    def _remove(self, key: bytes) -> None:
        _, storages = self._copies.pop(key)
        for ptr in storages:
            held = self._storages[ptr]
            held[0] -= 1
            if held[0] == 0:
                del self._storages[ptr]
                self.used_bytes -= held[1]

    def check_invariants(self) -> None:
        assert self.used_bytes == sum(b for _, b in self._storages.values())
        assert self.capacity_bytes is None or self.used_bytes <= self.capacity_bytes
        assert all(h > 0 for h, _ in self._storages.values())


class SequenceStateRunner:
    def __init__(self, model: nn.Module, unit: int, pool: SnapshotPool) -> None:
        self.model = model
        self.unit = unit
        self.pool = pool
        self.states: dict[str, Any] = {}  # request id -> its SequenceState
        self.recomputed_prefixes = 0  # runs whose admitted prefix copy was gone (see the module docstring)

    # -- Runner ------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, batch: SchedulerOutput) -> StepLogits:
        """Logits [num_sampling_requests, vocab], in `batch.sampling_requests` order. The model's head runs in
        its own dtype over the full vocabulary, so a logprob row's exact logits are its logits (float32)."""
        # Every request's starting state first: a copy a request was admitted with is taken before any
        # chunk of this step keeps new copies (which could push it out of the pool).
        states = [self._state_at(chunk.request, chunk.request.num_computed_tokens) for chunk in batch.chunks]
        last: dict[str, torch.Tensor] = {}
        for chunk, state in zip(batch.chunks, states, strict=True):
            request = chunk.request
            start = request.num_computed_tokens
            logits = self._advance(request, state, start, start + chunk.num_new_tokens)
            if chunk.samples:
                last[request.request_id] = logits
        if not batch.sampling_requests:
            return StepLogits(torch.empty(0, 0))
        logits = torch.cat([last[r.request_id] for r in batch.sampling_requests]).float()
        exact = {r.request_id: logits[i] for i, r in enumerate(batch.sampling_requests) if wants_logprobs(r)}
        return StepLogits(logits, exact)

    def release(self, request_id: str) -> None:
        """The request finished or was aborted: its state goes (its prefix copies stay for others)."""
        self.states.pop(request_id, None)

    def resumable_blocks(self, keys: Sequence[bytes]) -> int:
        """How many of a prefix hit's leading blocks (by chained key) can be resumed: up to the deepest one
        whose state copy the pool holds. The copy becomes the most recently used."""
        for n in range(len(keys), 0, -1):
            if keys[n - 1] in self.pool:
                self.pool.touch(keys[n - 1])
                return n
        return 0

    def evicted(self, key: bytes) -> None:
        """The KV manager reused the block `key` names: its copy can no longer be reached by a hit."""
        self.pool.discard(key)

    def stats(self) -> dict[str, int]:
        return {"snapshots": len(self.pool), "snapshot_bytes": self.pool.used_bytes,
                "recomputed_prefixes": self.recomputed_prefixes}

    # -- internals ---------------------------------------------------------------
    def _state_at(self, request: Request, start: int) -> Any:
        """The request's state after its first `start` tokens: its own, a prefix copy, or rebuilt."""
        state = self.states.get(request.request_id)
        if state is None or state.length != start:  # new, admitted with a cached prefix, or preempted
            state, resumed = self._resume(request, start)
            if resumed < start:
                self.recomputed_prefixes += 1
                if request.num_preemptions == 0 and request.num_cached_tokens == start:
                    request.num_cached_tokens = min(resumed, request.num_prompt_tokens)  # bill what was reused
                self._advance(request, state, resumed, start)
            self.states[request.request_id] = state
        return state

    def _resume(self, request: Request, start: int) -> tuple[Any, int]:
        """A fresh state at the longest unit boundary <= `start` whose copy the pool holds, and that length."""
        keys: list[bytes] = []
        key: bytes | None = None
        tokens = request.all_token_ids
        for i in range(0, start - start % self.unit, self.unit):
            key = block_key(key, request.cache_salt, tuple(tokens[i:i + self.unit]))
            keys.append(key)
        for n in range(len(keys), 0, -1):
            copy = self.pool.get(keys[n - 1])
            if copy is not None:
                return copy.copy(), n * self.unit
        return self.model.new_state(), 0

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
                self.pool.put(self._key(request, stop), state)
            pos = stop
        return logits

    def _key(self, request: Request, length: int) -> bytes:
        """The KV manager's chained key of the block that ends at `length` (a multiple of the unit)."""
        key: bytes | None = None
        tokens = request.all_token_ids
        for i in range(0, length, self.unit):
            key = block_key(key, request.cache_salt, tuple(tokens[i:i + self.unit]))
        assert key is not None
        return key

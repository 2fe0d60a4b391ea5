"""A model-shaped stand-in for engine tests: no weights, exact arithmetic.

It stores each token id in its KV slot and predicts `(sum of the context's
token ids + 1) % vocab`, reading the context back from the cache. A wrong
slot, a stale prefix-cache block or a lost block after preemption therefore
changes the next token, which the tests compare with the same arithmetic.
"""

from __future__ import annotations

import torch
from torch import nn

from flashserve.models.layers import FULL_ATTENTION, AttentionMetadata, CacheSpec, LayerKVCache

VOCAB = 97


def expected_next(tokens: list[int]) -> int:
    return (sum(tokens) + 1) % VOCAB


class CountingModel(nn.Module):
    def __init__(self, num_layers: int = 2) -> None:
        super().__init__()
        self.num_layers = num_layers
        self.forward_calls: list[int] = []  # batch sizes (tokens) per forward

    def cache_specs(self) -> list[CacheSpec]:
        return [CacheSpec(FULL_ATTENTION, 1, 1)] * self.num_layers

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[LayerKVCache]) -> torch.Tensor:
        self.forward_calls.append(int(input_ids.numel()))
        cache = kv_caches[-1]
        cache.key[meta.slot_mapping, 0, 0] = input_ids.float()
        out = torch.zeros(input_ids.numel(), 1)
        for seq in meta.seqs:
            ctx = cache.key[meta.context_slots(seq), 0, 0]
            # Row j of the chunk sees the context up to its own position.
            cums = ctx.cumsum(0)[seq.ctx_len - seq.q_len:]
            out[seq.q_start:seq.q_start + seq.q_len, 0] = cums
        return out

    def compute_logits(self, hidden: torch.Tensor, decode_rows: int = 0) -> torch.Tensor:
        nxt = (hidden[:, 0].round().long() + 1) % VOCAB
        logits = torch.full((hidden.shape[0], VOCAB), -10.0)
        logits[torch.arange(hidden.shape[0]), nxt] = 10.0
        return logits

"""Layers shared by the model implementations: RMSNorm, rotary embeddings, and
attention over the engine's paged KV cache.

The engine hands every model forward pass one flat batch of new tokens (from
many requests, prefill chunks and decodes mixed) plus an `AttentionMetadata`
saying where each request's tokens sit in that batch and where its context
lives in the cache. Models never see block tables: the runner has already
turned them into flat slot indices, so a model's attention only gathers and
scatters rows of a `[num_slots, kv_heads, head_dim]` tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

FULL_ATTENTION = "full_attention"


@dataclass(frozen=True, slots=True)
class CacheSpec:
    """What one layer keeps in the KV cache, per token.

    The cache manager allocates storage per spec. Only full attention exists
    today; the DeepSeek-V4 issue adds sliding-window and compressed kinds,
    which is why a model declares a spec per layer instead of the cache
    assuming one shape for all.
    """

    kind: str
    num_kv_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        assert self.kind == FULL_ATTENTION, f"unsupported cache kind {self.kind!r}"
        assert self.num_kv_heads > 0 and self.head_dim > 0


@dataclass(slots=True)
class SeqAttention:
    """One request's slice of the batch.

    The request's new tokens are `q_len` rows starting at `q_start`; they are
    the last `q_len` positions of a context of `ctx_len` tokens whose K/V sit
    at `ctx_slots` in the cache (new tokens included, written before reading).
    """

    q_start: int
    q_len: int
    ctx_len: int
    ctx_slots: torch.Tensor  # [ctx_len] int64


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_new_tokens] int64: where each new token's K/V goes
    seqs: list[SeqAttention]


@dataclass(slots=True)
class LayerKVCache:
    """Storage for one full-attention layer: K and V rows addressed by slot."""

    key: torch.Tensor  # [num_slots, kv_heads, head_dim]
    value: torch.Tensor  # [num_slots, kv_heads, head_dim]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class RotaryEmbedding(nn.Module):
    """Rotate-half rotary embedding (the Hugging Face Llama layout).

    GGUF files store Q/K rows permuted for llama.cpp's interleaved rotary;
    the loader undoes that permutation, so every checkpoint reaches the model
    in one layout.
    """

    def __init__(self, head_dim: int, max_positions: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # q: [T, H, D], k: [T, KV, D]
        cos = self.cos[positions].unsqueeze(1).to(q.dtype)
        sin = self.sin[positions].unsqueeze(1).to(q.dtype)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: LayerKVCache,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Causal attention of each request's new tokens over its cached context.

    q: [T, H, D]; k, v: [T, KV, D] for the new tokens. Returns [T, H, D].
    New K/V are written into the cache first, so a request's context is read
    back uniformly whether it came from this step, an earlier one, or the
    prefix cache.
    """
    cache.key[meta.slot_mapping] = k
    cache.value[meta.slot_mapping] = v
    out = torch.empty_like(q)
    for seq in meta.seqs:
        q_i = q[seq.q_start : seq.q_start + seq.q_len].transpose(0, 1)  # [H, q, D]
        k_i = cache.key[seq.ctx_slots].transpose(0, 1)  # [KV, ctx, D]
        v_i = cache.value[seq.ctx_slots].transpose(0, 1)
        mask = _causal_mask(seq.q_len, seq.ctx_len, q.device)
        o = F.scaled_dot_product_attention(
            q_i.unsqueeze(0), k_i.unsqueeze(0), v_i.unsqueeze(0),
            attn_mask=mask, scale=scale, enable_gqa=True,
        )
        out[seq.q_start : seq.q_start + seq.q_len] = o.squeeze(0).transpose(0, 1)
    return out


def _causal_mask(q_len: int, ctx_len: int, device: torch.device) -> torch.Tensor | None:
    """Query j sits at absolute position ctx_len - q_len + j and sees keys up to it."""
    if q_len == 1:
        return None
    q_pos = torch.arange(ctx_len - q_len, ctx_len, device=device).unsqueeze(1)
    k_pos = torch.arange(ctx_len, device=device).unsqueeze(0)
    return k_pos <= q_pos

"""Layers shared by the model implementations: RMSNorm, rotary embeddings, and
attention over the engine's paged KV cache.

The engine hands every model forward pass one flat batch of new tokens (from
many requests, prefill chunks and decodes mixed) plus an `AttentionMetadata`
saying where each request's tokens sit in that batch and which cache blocks
hold its context. The native kernels in `flashserve.kernels` attend in place:
generated tokens with the decode kernel, prompt chunks with the prefill kernel,
whose rows do not depend on how the prompt was chunked or cached. Without
them, chunks gather their context rows and use SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flashserve.kernels import CpuOps, cpu_ops

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
    the last `q_len` positions of a context of `ctx_len` tokens, whose K/V sit
    in the blocks of row `index` of the metadata's block table (new tokens
    included: they are written before anything is read).
    """

    q_start: int
    q_len: int
    ctx_len: int
    index: int


@dataclass(slots=True)
class AttentionMetadata:
    """Where each request's tokens sit in the flat batch and where its context lives in the cache.

    Built once per step by `build`, shared by every layer. Requests with one new
    token (decodes, and one-token prefill tails) are attended by the native
    paged kernel straight from the block tables; longer chunks gather their
    context and use SDPA, where the matmuls dominate the copy.
    """

    slot_mapping: torch.Tensor  # [num_new_tokens] int64: where each new token's K/V goes
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    context_lens: torch.Tensor  # [num_seqs] int32
    block_size: int
    seqs: list[SeqAttention]
    decode_seqs: list[int]  # indexes into `seqs` of the one-token requests
    # Leading rows that decode a generated token: quantized decode weights serve these (linear.PackedLinear).
    num_generated_rows: int = 0

    @classmethod
    def build(cls, block_tables: list[list[int]], q_lens: list[int], ctx_lens: list[int], block_size: int,
              device: torch.device | str = "cpu", generated_rows: int | None = None) -> AttentionMetadata:
        """Metadata for requests laid out one after another in the batch, in the order given.

        `generated_rows`: the engine's count of leading requests that decode a generated token. Only
        those use the native decode kernel; one-token pieces of prompts (after a prefix-cache hit) go
        through SDPA like the rest of their prompt, so a cached prompt gets the numbers of an uncached
        one. None (tests) treats every one-token request as a decode.
        """
        seqs, slots = [], []
        q_start = 0
        for i, (table, q_len, ctx_len) in enumerate(zip(block_tables, q_lens, ctx_lens, strict=True)):
            seqs.append(SeqAttention(q_start, q_len, ctx_len, i))
            for pos in range(ctx_len - q_len, ctx_len):
                slots.append(table[pos // block_size] * block_size + pos % block_size)
            q_start += q_len
        width = max((len(t) for t in block_tables), default=0)
        padded = [t + [0] * (width - len(t)) for t in block_tables]
        if generated_rows is None:
            decode_seqs = [i for i, n in enumerate(q_lens) if n == 1]
        else:
            assert all(n == 1 for n in q_lens[:generated_rows])
            decode_seqs = list(range(generated_rows))
        return cls(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=device).reshape(len(padded), width),
            context_lens=torch.tensor(ctx_lens, dtype=torch.int32, device=device),
            block_size=block_size,
            seqs=seqs,
            decode_seqs=decode_seqs,
            num_generated_rows=generated_rows or 0,
        )

    @property
    def decodes_lead(self) -> bool:
        """The decodes are seqs 0..n-1 at rows 0..n-1 (the runner's layout), so slices replace gathers."""
        return self.decode_seqs == list(range(len(self.decode_seqs)))

    def context_slots(self, seq: SeqAttention) -> torch.Tensor:
        """[ctx_len] int64 cache slots of the request's whole context, in position order."""
        table = self.block_tables[seq.index].to(torch.int64)
        offsets = torch.arange(self.block_size, device=table.device)
        return (table.unsqueeze(1) * self.block_size + offsets).flatten()[: seq.ctx_len]


@dataclass(slots=True)
class LayerKVCache:
    """Storage for one full-attention layer: K and V rows addressed by slot."""

    key: torch.Tensor  # [num_slots, kv_heads, head_dim]
    value: torch.Tensor  # [num_slots, kv_heads, head_dim]


def _native(x: torch.Tensor) -> CpuOps | None:
    """The compiled CPU operators when they apply to `x`, else None (PyTorch path)."""
    return cpu_ops() if CpuOps.supports(x) else None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """norm(x); or, given the residual stream, `residual += x` in place and norm(residual)."""
        ops = _native(x)
        if (ops is not None and x.is_contiguous() and self.weight.dtype == x.dtype
                and (residual is None or residual.dtype == x.dtype)):
            out = torch.empty_like(x)
            if ops.rms_norm(x, self.weight, self.eps, out, residual):
                return out
        if residual is not None:
            x = residual.add_(x)
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """Rotate-half rotary embedding (the Hugging Face Llama layout).

    GGUF files store Q/K rows permuted for llama.cpp's interleaved rotary;
    the loader undoes that permutation, so every checkpoint reaches the model
    in one layout. The native kernel reads the half-width float32 tables; the
    PyTorch path uses full-width ones whose `sin` carries rotate-half's sign,
    so applying it is a roll and two multiplies.
    """

    def __init__(self, head_dim: int, max_positions: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.set_frequencies(inv_freq, max_positions)

    def set_frequencies(self, inv_freq: torch.Tensor, max_positions: int) -> None:
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        self.register_buffer("cos_half", freqs.cos().contiguous(), persistent=False)
        self.register_buffer("sin_half", freqs.sin().contiguous(), persistent=False)
        self.register_buffer("cos", torch.cat((freqs, freqs), dim=-1).cos(), persistent=False)
        self.register_buffer("sin", torch.cat((-freqs.sin(), freqs.sin()), dim=-1), persistent=False)


def rotary_and_store(qkv: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding, cache: LayerKVCache,
                     slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """Apply rotary to the Q and K heads of a fused projection [T, (H + 2KV) * D] and write the new K/V
    rows to the cache. Returns Q as [T, H, D] (a view; rows may be strided)."""
    t, h, kv, d = qkv.shape[0], num_heads, num_kv_heads, head_dim
    ops = _native(qkv)
    if ops is not None and qkv.is_contiguous():
        stores = CpuOps.supports_cache(qkv.dtype, cache.key.dtype)  # else the caller stores K/V below
        if ops.rotary_store(qkv, h, kv, d, positions, rotary.cos_half, rotary.sin_half,
                            slot_mapping if stores else None, cache.key if stores else None,
                            cache.value if stores else None):
            if not stores:
                new_kv = qkv[:, h * d :].view(t, 2, kv, d).to(cache.key.dtype)
                cache.key.index_copy_(0, slot_mapping, new_kv[:, 0])
                cache.value.index_copy_(0, slot_mapping, new_kv[:, 1])
            return qkv[:, : h * d].view(t, h, d)
    cos = rotary.cos[positions].unsqueeze(1).to(qkv.dtype)
    sin = rotary.sin[positions].unsqueeze(1).to(qkv.dtype)
    x = qkv[:, : (h + kv) * d].view(t, h + kv, d)
    qk = torch.addcmul(x * cos, x.roll(d // 2, dims=-1), sin)
    cache.key.index_copy_(0, slot_mapping, qk[:, h:].to(cache.key.dtype))
    cache.value.index_copy_(0, slot_mapping, qkv[:, (h + kv) * d :].view(t, kv, d).to(cache.value.dtype))
    return qk[:, :h]


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2I] -> silu(first half) * second half, [T, I]."""
    inter = gate_up.shape[-1] // 2
    ops = _native(gate_up)
    if ops is not None and gate_up.is_contiguous():
        out = gate_up.new_empty(gate_up.shape[0], inter)
        if ops.silu_mul(gate_up, out):
            return out
    gate, up = gate_up.split(inter, dim=-1)
    return F.silu(gate) * up


def paged_attention(q: torch.Tensor, cache: LayerKVCache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Causal attention of each request's new tokens over its cached context.

    q: [T, H, D], heads contiguous. The new tokens' K/V are already in the
    cache (`rotary_and_store`), so a request's context is read back uniformly
    whether it came from this step, an earlier one, or the prefix cache.
    Returns [T, H, D], contiguous.
    """
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    done = _native_decode(q, cache, meta, scale, out)
    ops = _native(q)
    prefill = ops is not None and CpuOps.supports_cache(q.dtype, cache.key.dtype) and q.stride(-1) == 1
    for seq in meta.seqs:
        if seq.index in done:
            continue
        rows = slice(seq.q_start, seq.q_start + seq.q_len)
        if prefill and ops.paged_prefill(q[rows], cache.key, cache.value, meta.block_tables[seq.index],  # type: ignore[union-attr]
                                         seq.ctx_len, meta.block_size, scale, out[rows]):
            continue
        slots = meta.context_slots(seq)
        q_i = q[seq.q_start : seq.q_start + seq.q_len].transpose(0, 1)  # [H, q, D]
        k_i = cache.key[slots].transpose(0, 1).to(q.dtype)  # [KV, ctx, D]
        v_i = cache.value[slots].transpose(0, 1).to(q.dtype)
        mask = _causal_mask(seq.q_len, seq.ctx_len, q.device)
        o = F.scaled_dot_product_attention(
            q_i.unsqueeze(0), k_i.unsqueeze(0), v_i.unsqueeze(0),
            attn_mask=mask, scale=scale, enable_gqa=True,
        )
        out[seq.q_start : seq.q_start + seq.q_len] = o.squeeze(0).transpose(0, 1)
    return out


def _native_decode(q: torch.Tensor, cache: LayerKVCache, meta: AttentionMetadata, scale: float,
                   out: torch.Tensor) -> set[int]:
    """Attend the one-token requests with the native kernel, writing into `out`. Returns the indexes of
    the requests it handled (none where the kernel does not apply)."""
    ops = _native(q)
    if ops is None or not meta.decode_seqs or not CpuOps.supports(cache.key) or q.stride(-1) != 1:
        return set()
    n = len(meta.decode_seqs)
    if meta.decodes_lead and CpuOps.supports_cache(q.dtype, cache.key.dtype):  # the runner's layout: in place
        handled = ops.paged_decode(q[:n], cache.key, cache.value, meta.block_tables[:n], meta.context_lens[:n],
                                   meta.block_size, scale, out[:n])
    else:  # gather the decode rows (in the cache's dtype where no kernel takes the pair) and scatter back
        rows = torch.tensor([meta.seqs[i].q_start for i in meta.decode_seqs], dtype=torch.int64)
        index = torch.tensor(meta.decode_seqs, dtype=torch.int64)
        work = q.dtype if CpuOps.supports_cache(q.dtype, cache.key.dtype) else cache.key.dtype
        part = torch.empty((n, *q.shape[1:]), dtype=work)
        handled = ops.paged_decode(q[rows].to(work), cache.key, cache.value,
                                   meta.block_tables[index].contiguous(), meta.context_lens[index].contiguous(),
                                   meta.block_size, scale, part)
        if handled:
            out[rows] = part.to(out.dtype)
    return set(meta.decode_seqs) if handled else set()


def _causal_mask(q_len: int, ctx_len: int, device: torch.device) -> torch.Tensor | None:
    """Query j sits at absolute position ctx_len - q_len + j and sees keys up to it."""
    if q_len == 1:
        return None
    q_pos = torch.arange(ctx_len - q_len, ctx_len, device=device).unsqueeze(1)
    k_pos = torch.arange(ctx_len, device=device).unsqueeze(0)
    return k_pos <= q_pos

"""The native fused CPU operators (`flashserve.kernels.cpu_ops`) against PyTorch references written here
from first principles, and the layer functions of `flashserve.models.layers` that dispatch to them.

Kernel by kernel, in float32 (tight tolerance) and bfloat16 (bf16 tolerance, and close to the float32
reference): paged decode attention (shuffled block tables, block sizes 16 and 1, context lengths from 1,
GQA and MHA, strided query rows, output written into a slice of a wider tensor), paged prefill attention
(whole prompts, chunks and single rows against causal SDPA; every row bit-for-bit the same however the
prompt is chunked), RMSNorm with and without
the in-place residual add, rotary + cache store, and silu-and-mul. Widths the kernels do not handle are
refused without touching anything, and the layer functions then fall back to PyTorch. Finally
`paged_attention` over mixed prefill/decode batches gives the same results with the native decode kernel
as with the PyTorch path alone.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from flashserve.kernels import CpuOps, cpu_ops
from flashserve.models import layers
from flashserve.models.layers import (
    AttentionMetadata,
    LayerKVCache,
    RMSNorm,
    RotaryEmbedding,
    paged_attention,
    rotary_and_store,
    silu_and_mul,
)

DTYPES = [torch.float32, torch.bfloat16]
# Kernel result against the reference computed (in float64) from the same inputs. The kernels compute in
# float32 and round once to the storage type, so bf16 results are within half a bf16 ulp (2**-8 relative)
# of the exact value, plus float32 noise.
TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.bfloat16: {"rtol": 8e-3, "atol": 2e-2}}
# bf16 result against the float32 reference on the unrounded inputs: input rounding adds to the error.
BF16_VS_F32 = {"rtol": 3e-2, "atol": 3e-2}


@pytest.fixture(autouse=True)
def _seed() -> Iterator[None]:
    torch.manual_seed(1234)
    yield


def assert_close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    torch.testing.assert_close(got.double(), ref.double(), **TOL[dtype])


def as_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A fresh contiguous copy in `dtype` (never `x` itself, which kernels may update in place)."""
    return x.to(dtype, copy=True).contiguous()


# -- paged decode ----------------------------------------------------------------------------------------


class PagedCache:
    """A paged KV cache whose blocks are handed out in shuffled order; slots no sequence owns hold NaN, so a
    kernel reading outside a sequence's context poisons its output. The unrounded float32 K/V values of each
    sequence are kept for the references."""

    def __init__(self, ctx_lens: list[int], block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, spare_blocks: int = 3) -> None:
        needed = [math.ceil(n / block_size) for n in ctx_lens]
        num_blocks = sum(needed) + spare_blocks
        order = torch.randperm(num_blocks).tolist()
        self.block_size, self.ctx_lens = block_size, ctx_lens
        self.key = torch.full((num_blocks * block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype)
        self.value = torch.full_like(self.key, float("nan"))
        self.tables: list[list[int]] = []
        self.keys: list[torch.Tensor] = []  # float32 [ctx, KV, D] per sequence
        self.values: list[torch.Tensor] = []
        spare = order[sum(needed):]
        for n, blocks in zip(ctx_lens, needed, strict=True):
            table, order = order[:blocks], order[blocks:]
            k, v = torch.randn(n, num_kv_heads, head_dim), torch.randn(n, num_kv_heads, head_dim)
            slots = self.slots(table, n)
            self.key[slots], self.value[slots] = k.to(dtype), v.to(dtype)
            self.tables.append(table)
            self.keys.append(k)
            self.values.append(v)
        self.spare = spare  # blocks no sequence owns: all NaN

    def slots(self, table: list[int], n: int) -> torch.Tensor:
        return torch.tensor([table[p // self.block_size] * self.block_size + p % self.block_size for p in range(n)])

    def block_table_tensor(self) -> torch.Tensor:
        """[B, max_blocks] int32, rows padded with an all-NaN block (a kernel must never read the padding)."""
        width = max(len(t) for t in self.tables) + 1
        return torch.tensor([t + [self.spare[0]] * (width - len(t)) for t in self.tables], dtype=torch.int32)

    def layer_cache(self) -> LayerKVCache:
        return LayerKVCache(self.key, self.value)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                        q_positions: torch.Tensor) -> torch.Tensor:
    """q [Tq, H, D] at absolute `q_positions`, k/v [ctx, KV, D] -> [Tq, H, D], causal, in float64 via SDPA
    with the KV heads repeated for GQA."""
    heads, kv_heads = q.shape[1], k.shape[1]
    kk = k.double().transpose(0, 1).repeat_interleave(heads // kv_heads, dim=0)  # [H, ctx, D]
    vv = v.double().transpose(0, 1).repeat_interleave(heads // kv_heads, dim=0)
    mask = torch.arange(k.shape[0]).unsqueeze(0) <= q_positions.unsqueeze(1)  # [Tq, ctx]
    out = F.scaled_dot_product_attention(q.double().transpose(0, 1), kk, vv, attn_mask=mask, scale=scale)
    return out.transpose(0, 1)


def reference_decode(q: torch.Tensor, cache: PagedCache, scale: float) -> torch.Tensor:
    """Each q row [H, D] attends over its sequence's whole context (the float32 K/V given)."""
    rows = []
    for b, n in enumerate(cache.ctx_lens):
        k = cache.key[cache.slots(cache.tables[b], n)]
        v = cache.value[cache.slots(cache.tables[b], n)]
        rows.append(reference_attention(q[b : b + 1], k, v, scale, torch.tensor([n - 1])))
    return torch.cat(rows)


DECODE_CASES = [
    # (num_heads, num_kv_heads, head_dim, block_size, context lengths)
    (9, 3, 64, 16, [1, 5, 16, 17, 40, 3]),  # SmolLM2's attention shape
    (4, 4, 32, 16, [33, 1, 16, 2]),  # MHA
    (16, 1, 16, 16, [7, 48]),  # the largest group the kernel takes
    (6, 2, 128, 1, [1, 3, 20, 9]),  # one slot per block: every token in a different block
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "block_size", "ctx_lens"), DECODE_CASES)
def test_paged_decode_matches_sdpa(ops: CpuOps, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int,
                                   block_size: int, ctx_lens: list[int]) -> None:
    batch, scale = len(ctx_lens), head_dim**-0.5
    cache = PagedCache(ctx_lens, block_size, kv_heads, head_dim, dtype)
    # q is a view into a wider row, as the model passes it (Q heads at the front of the fused QKV output).
    qkv32 = torch.randn(batch, (heads + 2 * kv_heads) * head_dim) * 2
    qkv = qkv32.to(dtype)
    q = qkv[:, : heads * head_dim].view(batch, heads, head_dim)
    assert not q.is_contiguous()
    # out is a slice of a wider tensor whose other columns must survive.
    wide_out = torch.full((batch, (heads + 3) * head_dim), 7.0, dtype=dtype)
    out = wide_out[:, head_dim : (heads + 1) * head_dim].view(batch, heads, head_dim)
    tables = cache.block_table_tensor()
    lens = torch.tensor(ctx_lens, dtype=torch.int32)

    assert ops.paged_decode(q, cache.key, cache.value, tables, lens, block_size, scale, out)

    assert_close(out, reference_decode(q, cache, scale), dtype)
    assert torch.all(wide_out[:, :head_dim] == 7.0) and torch.all(wide_out[:, (heads + 1) * head_dim :] == 7.0)
    if dtype == torch.bfloat16:  # close to float32 attention over the unrounded inputs
        ref32 = []
        for b, n in enumerate(ctx_lens):
            q32 = qkv32[b : b + 1, : heads * head_dim].view(1, heads, head_dim)
            ref32.append(reference_attention(q32, cache.keys[b], cache.values[b], scale, torch.tensor([n - 1])))
        torch.testing.assert_close(out.double(), torch.cat(ref32), **BF16_VS_F32)


def test_paged_decode_peaked_softmax(ops: CpuOps) -> None:
    """Large scores (a peaked softmax) stay finite and exact: the kernel subtracts the running maximum."""
    cache = PagedCache([37], 16, 2, 32, torch.float32)
    q = torch.randn(1, 4, 32) * 30
    out = torch.empty_like(q)
    assert ops.paged_decode(q, cache.key, cache.value, cache.block_table_tensor(),
                            torch.tensor([37], dtype=torch.int32), 16, 32**-0.5, out)
    assert torch.isfinite(out).all()
    assert_close(out, reference_decode(q, cache, 32**-0.5), torch.float32)


# -- paged prefill ---------------------------------------------------------------------------------------


def prefill_query(n: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """n query rows as the model passes them: the Q heads of fused QKV rows (a strided view)."""
    qkv = (torch.randn(n, (heads + 2 * kv_heads) * head_dim) * 2).to(dtype)
    return qkv[:, : heads * head_dim].view(n, heads, head_dim)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "block_size", "ctx_lens"), DECODE_CASES)
def test_paged_prefill_matches_sdpa(ops: CpuOps, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int,
                                    block_size: int, ctx_lens: list[int]) -> None:
    """Whole prompts, chunks ending a context, and single rows, each against causal SDPA in float64."""
    scale = head_dim**-0.5
    cache = PagedCache(ctx_lens, block_size, kv_heads, head_dim, dtype)
    tables = cache.block_table_tensor()
    for b, n in enumerate(ctx_lens):
        k = cache.key[cache.slots(cache.tables[b], n)]
        v = cache.value[cache.slots(cache.tables[b], n)]
        for q_len in sorted({n, max(1, n // 2), 1}):
            q = prefill_query(q_len, heads, kv_heads, head_dim, dtype)
            out = torch.full((q_len, heads, head_dim), 7.0, dtype=dtype)
            assert ops.paged_prefill(q, cache.key, cache.value, tables[b], n, block_size, scale, out)
            expected = reference_attention(q, k, v, scale, torch.arange(n - q_len, n))
            assert_close(out, expected, dtype)


def test_paged_prefill_rows_do_not_depend_on_the_chunking(ops: CpuOps) -> None:
    """A prompt attended whole, in chunks (each over the context so far, as after chunked prefill or a
    prefix-cache hit), or row by row: every row gets the same bits."""
    n, heads, kv_heads, head_dim, block_size = 70, 9, 3, 64, 16
    cache = PagedCache([n], block_size, kv_heads, head_dim, torch.float32)
    table, scale = cache.block_table_tensor()[0], head_dim**-0.5
    q = prefill_query(n, heads, kv_heads, head_dim, torch.float32)
    whole = torch.empty(n, heads, head_dim)
    assert ops.paged_prefill(q, cache.key, cache.value, table, n, block_size, scale, whole)
    for cuts in ([0, 23, 50, 70], [0, 16, 32, 48, 64, 70], [0, 69, 70], list(range(n + 1))):
        chunked = torch.empty(n, heads, head_dim)
        for start, end in itertools.pairwise(cuts):
            assert ops.paged_prefill(q[start:end], cache.key, cache.value, table, end, block_size, scale,
                                     chunked[start:end])
        assert torch.equal(chunked, whole), cuts


def test_paged_prefill_peaked_softmax(ops: CpuOps) -> None:
    cache = PagedCache([37], 16, 2, 32, torch.float32)
    q = torch.randn(37, 4, 32) * 30
    out = torch.empty_like(q)
    assert ops.paged_prefill(q, cache.key, cache.value, cache.block_table_tensor()[0], 37, 16, 32**-0.5, out)
    assert torch.isfinite(out).all()
    k, v = cache.key[cache.slots(cache.tables[0], 37)], cache.value[cache.slots(cache.tables[0], 37)]
    assert_close(out, reference_attention(q, k, v, 32**-0.5, torch.arange(37)), torch.float32)


# -- float32 activations over a bf16 cache -----------------------------------------------------------------


def test_float32_activations_over_a_bf16_cache(ops: CpuOps) -> None:
    """The mixed build: K/V stored rounded to bf16 (nearest even); decode and prefill attention of float32
    queries over them match float64 SDPA on the stored values, with float32 outputs."""
    heads, kv_heads, head_dim, block_size = 9, 3, 64, 16
    assert CpuOps.supports_cache(torch.float32, torch.bfloat16)
    assert not CpuOps.supports_cache(torch.bfloat16, torch.float32)
    tokens, num_slots = 5, 64
    cos_half, sin_half = rotary_tables(head_dim, 64)
    positions = torch.tensor([0, 3, 9, 9, 40], dtype=torch.int64)
    slots = torch.randperm(num_slots)[:tokens].to(torch.int64)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim)
    key_cache = torch.zeros(num_slots, kv_heads, head_dim, dtype=torch.bfloat16)
    value_cache = torch.zeros_like(key_cache)
    assert ops.rotary_store(qkv, heads, kv_heads, head_dim, positions, cos_half, sin_half, slots, key_cache,
                            value_cache)
    qk = qkv[:, : (heads + kv_heads) * head_dim].view(tokens, heads + kv_heads, head_dim)
    assert torch.equal(key_cache[slots], qk[:, heads:].to(torch.bfloat16))
    assert torch.equal(value_cache[slots], qkv[:, (heads + kv_heads) * head_dim :].view(tokens, kv_heads, head_dim)
                       .to(torch.bfloat16))

    ctx_lens, scale = [1, 17, 40], head_dim**-0.5
    cache = PagedCache(ctx_lens, block_size, kv_heads, head_dim, torch.bfloat16)
    tables = cache.block_table_tensor()
    q = prefill_query(len(ctx_lens), heads, kv_heads, head_dim, torch.float32)
    out = torch.empty(len(ctx_lens), heads, head_dim)
    assert ops.paged_decode(q, cache.key, cache.value, tables, torch.tensor(ctx_lens, dtype=torch.int32),
                            block_size, scale, out)
    assert_close(out, reference_decode(q, cache, scale), torch.float32)
    n = ctx_lens[-1]
    q = prefill_query(n, heads, kv_heads, head_dim, torch.float32)
    out = torch.empty(n, heads, head_dim)
    assert ops.paged_prefill(q, cache.key, cache.value, tables[-1], n, block_size, scale, out)
    k, v = cache.key[cache.slots(cache.tables[-1], n)], cache.value[cache.slots(cache.tables[-1], n)]
    assert_close(out, reference_attention(q, k, v, scale, torch.arange(n)), torch.float32)


# -- top k of logits rows -------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 8, 16])
def test_top_k_rows_matches_torch(ops: CpuOps, k: int) -> None:
    x = torch.randn(5, 49152) * 4
    x[2, 7] = x[2, 40000] = x[2, 123] = 99.0  # a three-way tie: lower indexes first
    x[4] = 0.0  # all equal: the first k indexes
    got = ops.top_k_rows(x, k)
    assert got is not None and got.shape == (5, k) and got.dtype == torch.int64
    expected = x.topk(k, dim=-1)
    assert torch.equal(x.gather(1, got), expected.values)  # the same values, largest first
    assert got[2, : min(k, 3)].tolist() == [7, 123, 40000][: min(k, 3)]
    assert got[4].tolist() == list(range(k))
    odd = torch.randn(3, 37)  # a width that is not a multiple of 16
    assert torch.equal(odd.gather(1, ops.top_k_rows(odd, k)), odd.topk(k, dim=-1).values)
    assert ops.top_k_rows(x, 17) is None


# -- rms norm --------------------------------------------------------------------------------------------


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x64 = x.double()
    return x64 / torch.sqrt(x64.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.double()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(ops: CpuOps, dtype: torch.dtype, with_residual: bool) -> None:
    rows, dim, eps = 7, 576, 1e-5
    x32, res32, w32 = torch.randn(rows, dim) * 3, torch.randn(rows, dim) * 3, 1 + 0.1 * torch.randn(dim)
    x, w = as_dtype(x32, dtype), as_dtype(w32, dtype)
    residual = as_dtype(res32, dtype) if with_residual else None
    x_before = x.clone()
    out = torch.empty_like(x)

    assert ops.rms_norm(x, w, eps, out, residual)

    assert torch.equal(x, x_before)
    if residual is not None:
        # The sum is rounded once to the storage type, exactly as an exact add then cast does.
        expected_residual = (as_dtype(res32, dtype).double() + x.double()).to(dtype)
        assert torch.equal(residual, expected_residual)
        normed = residual
    else:
        normed = x
    assert_close(out, reference_rms_norm(normed, w, eps), dtype)
    if dtype == torch.bfloat16:
        src32 = x32 + res32 if with_residual else x32
        torch.testing.assert_close(out.double(), reference_rms_norm(src32, w32, eps), **BF16_VS_F32)


def test_rms_norm_three_dims_and_large_values(ops: CpuOps) -> None:
    """Rows are counted over all leading dims; large inputs do not overflow the sum of squares."""
    x, w = torch.randn(2, 3, 64) * 1e5, torch.rand(64)
    out = torch.empty_like(x)
    assert ops.rms_norm(x, w, 1e-6, out)
    assert_close(out, reference_rms_norm(x, w, 1e-6), torch.float32)


# -- rotary + store --------------------------------------------------------------------------------------


def rotary_tables(head_dim: int, max_positions: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Half-width float32 cos/sin tables [max_positions, head_dim / 2], from float64 angles."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(max_positions, dtype=torch.float64).unsqueeze(1) * inv_freq
    return angles.cos().float().contiguous(), angles.sin().float().contiguous()


def rotate_half_reference(x: torch.Tensor, cos_half: torch.Tensor, sin_half: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D]; cos/sin [T, D/2] -> x * cos + rotate_half(x) * sin in float64 (Llama layout)."""
    half = x.shape[-1] // 2
    x64 = x.double()
    c, s = cos_half.double().unsqueeze(1), sin_half.double().unsqueeze(1)
    x1, x2 = x64[..., :half], x64[..., half:]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(9, 3, 64), (4, 4, 32), (2, 1, 128)])
def test_rotary_store(ops: CpuOps, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int) -> None:
    tokens, num_slots, max_pos = 6, 40, 4096
    cos_half, sin_half = rotary_tables(head_dim, max_pos)
    positions = torch.tensor([0, 4095, 17, 17, 1, 300], dtype=torch.int64)
    slots = torch.randperm(num_slots)[:tokens].to(torch.int64)
    qkv32 = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim)
    qkv = qkv32.to(dtype)
    before = qkv.clone()
    key_cache = torch.randn(num_slots, kv_heads, head_dim).to(dtype)
    value_cache = torch.randn(num_slots, kv_heads, head_dim).to(dtype)
    key_before, value_before = key_cache.clone(), value_cache.clone()

    assert ops.rotary_store(qkv, heads, kv_heads, head_dim, positions, cos_half, sin_half, slots, key_cache,
                            value_cache)

    qk_width = (heads + kv_heads) * head_dim
    qk_ref = rotate_half_reference(before[:, :qk_width].view(tokens, heads + kv_heads, head_dim),
                                   cos_half[positions], sin_half[positions])
    qk = qkv[:, :qk_width].view(tokens, heads + kv_heads, head_dim)
    assert_close(qk, qk_ref, dtype)
    assert torch.equal(qkv[:, qk_width:], before[:, qk_width:])  # V untouched
    # K (rotated, as left in qkv) and V rows land at their slots, and no other slot changes.
    assert torch.equal(key_cache[slots], qk[:, heads:])
    assert torch.equal(value_cache[slots], before[:, qk_width:].view(tokens, kv_heads, head_dim))
    others = torch.ones(num_slots, dtype=torch.bool)
    others[slots] = False
    assert torch.equal(key_cache[others], key_before[others])
    assert torch.equal(value_cache[others], value_before[others])
    if dtype == torch.bfloat16:
        ref32 = rotate_half_reference(qkv32[:, :qk_width].view(tokens, heads + kv_heads, head_dim),
                                      cos_half[positions], sin_half[positions])
        torch.testing.assert_close(qk.double(), ref32, **BF16_VS_F32)


# -- silu * mul ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(ops: CpuOps, dtype: torch.dtype) -> None:
    rows, inter = 5, 1536
    gate_up32 = torch.randn(rows, 2 * inter) * 4
    gate_up = gate_up32.to(dtype)
    out = torch.empty(rows, inter, dtype=dtype)

    assert ops.silu_mul(gate_up, out)

    g, u = gate_up.double().split(inter, dim=-1)
    assert_close(out, F.silu(g) * u, dtype)
    if dtype == torch.bfloat16:
        g32, u32 = gate_up32.double().split(inter, dim=-1)
        torch.testing.assert_close(out.double(), F.silu(g32) * u32, **BF16_VS_F32)


def test_silu_mul_large_gates(ops: CpuOps) -> None:
    """Strongly negative gates (while exp(-g) stays finite) give ~0, strongly positive ones the identity."""
    gate = torch.tensor([-88.0, -60.0, -20.0, -1.0, 0.0, 1.0, 20.0, 100.0, 1000.0, 3.0e4] + [0.5] * 6)
    gate_up = torch.cat([gate, torch.full((16,), 2.0)]).unsqueeze(0).contiguous()
    out = torch.empty(1, 16)
    assert ops.silu_mul(gate_up, out)
    torch.testing.assert_close(out[0].double(), F.silu(gate.double()) * 2, rtol=1e-5, atol=1e-30)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_very_negative_gate_is_zero(ops: CpuOps, dtype: torch.dtype) -> None:
    gate = torch.tensor([-88.8, -89.0, -100.0, -1000.0] * 4)
    gate_up = torch.cat([gate, torch.ones(16)]).unsqueeze(0).to(dtype)
    out = torch.empty(1, 16, dtype=dtype)
    assert ops.silu_mul(gate_up, out)
    assert torch.isfinite(out).all(), out
    torch.testing.assert_close(out[0].double(), F.silu(gate.double()), rtol=0, atol=1e-30)


# -- refused widths, and the layer functions' fallback ---------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_refuse_unsupported_widths_untouched(ops: CpuOps, dtype: torch.dtype) -> None:
    # paged_decode: head_dim not a multiple of 16, and more than 16 query heads per KV head.
    for heads, kv_heads, head_dim in [(4, 2, 8), (4, 2, 24), (17, 1, 16)]:
        cache = PagedCache([5], 16, kv_heads, head_dim, dtype)
        q = torch.randn(1, heads, head_dim).to(dtype)
        out = torch.full_like(q, 3.0)
        assert not ops.paged_decode(q, cache.key, cache.value, cache.block_table_tensor(),
                                    torch.tensor([5], dtype=torch.int32), 16, 0.5, out)
        assert torch.all(out == 3.0)
    # rms_norm: dim not a multiple of 16 leaves the residual and out alone.
    x, res = torch.randn(3, 24).to(dtype), torch.randn(3, 24).to(dtype)
    res_before, out = res.clone(), torch.full_like(x, 3.0)
    assert not ops.rms_norm(x, torch.ones(24, dtype=dtype), 1e-6, out, res)
    assert torch.equal(res, res_before) and torch.all(out == 3.0)
    # rotary_store: half of head_dim must be a multiple of 16 (head_dim 16 and 8 are refused).
    for head_dim in (16, 8):
        qkv = torch.randn(2, 4 * head_dim).to(dtype)
        qkv_before = qkv.clone()
        kc, vc = torch.zeros(4, 1, head_dim, dtype=dtype), torch.zeros(4, 1, head_dim, dtype=dtype)
        cos_half, sin_half = rotary_tables(head_dim, 8)
        assert not ops.rotary_store(qkv, 2, 1, head_dim, torch.tensor([1, 2]), cos_half, sin_half,
                                    torch.tensor([0, 3]), kc, vc)
        assert torch.equal(qkv, qkv_before) and not kc.any() and not vc.any()
    # silu_mul: intermediate width not a multiple of 16.
    gate_up, out = torch.randn(2, 48).to(dtype), torch.full((2, 24), 3.0, dtype=dtype)
    assert not ops.silu_mul(gate_up, out)
    assert torch.all(out == 3.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_layers_fall_back_on_unsupported_widths(ops: CpuOps, dtype: torch.dtype) -> None:
    """With the kernels present but refusing the shape, the layer functions still give the right answer."""
    # RMSNorm, dim 24, with residual: residual += x in place, then norm.
    norm = RMSNorm(24, 1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(24))
    x, res = torch.randn(3, 24).to(dtype), torch.randn(3, 24).to(dtype)
    expected_res = (res.double() + x.double()).to(dtype)
    with torch.no_grad():
        out = norm(x, res)
    assert torch.equal(res, expected_res)
    assert_close(out, reference_rms_norm(expected_res, norm.weight, 1e-6), dtype)
    # silu_and_mul, intermediate width 24.
    gate_up = torch.randn(3, 48).to(dtype)
    g, u = gate_up.double().split(24, dim=-1)
    assert_close(silu_and_mul(gate_up), F.silu(g) * u, dtype)
    # rotary_and_store, head_dim 16 (half-width 8).
    heads, kv_heads, head_dim = 2, 1, 16
    rotary = RotaryEmbedding(head_dim, 64, 10000.0)
    qkv = torch.randn(3, (heads + 2 * kv_heads) * head_dim).to(dtype)
    before = qkv.clone()
    cache = LayerKVCache(torch.zeros(5, kv_heads, head_dim, dtype=dtype), torch.zeros(5, kv_heads, head_dim,
                                                                                   dtype=dtype))
    positions, slots = torch.tensor([3, 0, 63]), torch.tensor([4, 0, 2])
    q = rotary_and_store(qkv, positions, rotary, cache, slots, heads, kv_heads, head_dim)
    qk_ref = rotate_half_reference(before[:, : 3 * head_dim].view(3, 3, head_dim), rotary.cos_half[positions],
                                   rotary.sin_half[positions])
    fallback_tol = {"rtol": 2e-2, "atol": 3e-2} if dtype == torch.bfloat16 else TOL[dtype]
    torch.testing.assert_close(q.double(), qk_ref[:, :heads], **fallback_tol)
    torch.testing.assert_close(cache.key[slots].double(), qk_ref[:, heads:], **fallback_tol)
    assert torch.equal(cache.value[slots], before[:, 3 * head_dim :].view(3, kv_heads, head_dim))
    assert not cache.key[[1, 3]].any() and not cache.value[[1, 3]].any()
    # paged_attention with head_dim 8: the decode kernel refuses, SDPA serves the decode rows.
    cache8 = PagedCache([5, 9], 4, 2, 8, dtype)
    meta = AttentionMetadata.build(cache8.tables, [1, 3], [5, 9], 4)
    q8 = torch.randn(4, 4, 8).to(dtype)
    assert layers._native_decode(q8, cache8.layer_cache(), meta, 0.3, torch.empty_like(q8)) == set()
    got = paged_attention(q8, cache8.layer_cache(), meta, 0.3)
    assert_close(got, reference_paged(q8, cache8, meta, 0.3), dtype)


# -- paged_attention through the layer: native decode vs the PyTorch path --------------------------------


def reference_paged(q: torch.Tensor, cache: PagedCache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    out = torch.empty(q.shape, dtype=torch.float64)
    for seq in meta.seqs:
        slots = cache.slots(cache.tables[seq.index], seq.ctx_len)
        rows = slice(seq.q_start, seq.q_start + seq.q_len)
        positions = torch.arange(seq.ctx_len - seq.q_len, seq.ctx_len)
        out[rows] = reference_attention(q[rows], cache.key[slots], cache.value[slots], scale, positions)
    return out


LAYOUTS = {
    "decodes-lead": ([1, 1, 1, 6], [1, 17, 33, 21]),
    "prefill-first": ([5, 1, 1], [20, 16, 2]),
    "prefill-between": ([1, 7, 1, 1], [9, 7, 40, 1]),
    "decodes-only": ([1, 1], [3, 32]),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 1])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_paged_attention_native_matches_pytorch(ops: CpuOps, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype,
                                                block_size: int, layout: str) -> None:
    q_lens, ctx_lens = LAYOUTS[layout]
    heads, kv_heads, head_dim = 9, 3, 64
    scale = head_dim**-0.5
    cache = PagedCache(ctx_lens, block_size, kv_heads, head_dim, dtype)
    meta = AttentionMetadata.build(cache.tables, q_lens, ctx_lens, block_size)
    assert meta.decodes_lead == (layout in ("decodes-lead", "decodes-only"))
    tokens = sum(q_lens)
    qkv = (torch.randn(tokens, (heads + 2 * kv_heads) * head_dim) * 2).to(dtype)
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)  # strided rows, as rotary_and_store returns

    scratch = torch.empty(q.shape, dtype=dtype)
    assert layers._native_decode(q, cache.layer_cache(), meta, scale, scratch) == set(meta.decode_seqs)
    native = paged_attention(q, cache.layer_cache(), meta, scale)
    monkeypatch.setattr(layers, "_native", lambda x: None)
    fallback = paged_attention(q, cache.layer_cache(), meta, scale)

    assert native.shape == q.shape and native.is_contiguous() and torch.isfinite(native).all()
    # Decode rows (decode kernel) and prompt rows (prefill kernel) against PyTorch's SDPA path.
    tol = TOL[dtype] if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(native.double(), fallback.double(), **tol)
    reference = reference_paged(q, cache, meta, scale)
    assert_close(native, reference, dtype)
    fallback_tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 3e-2}
    torch.testing.assert_close(fallback.double(), reference, **fallback_tol)


def test_native_kernels_can_be_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLASHSERVE_NATIVE_KERNELS", "0")
    assert cpu_ops.__wrapped__() is None  # the uncached builder honours the switch


def test_native_applies_to_cpu_float32_and_bf16_only() -> None:
    assert CpuOps.supports(torch.zeros(1)) and CpuOps.supports(torch.zeros(1, dtype=torch.bfloat16))
    assert not CpuOps.supports(torch.zeros(1, dtype=torch.float16))
    assert not CpuOps.supports(torch.zeros(1, dtype=torch.float64))


def test_argmax_rows_is_torch_argmax_with_first_index_on_ties(ops: CpuOps) -> None:
    torch.manual_seed(11)
    for cols in (16, 17, 100, 49152):
        x = torch.randn(9, cols)
        x[3, cols // 2] = x[3, -1] = 50.0  # a tie: the lower index wins, as torch's argmax
        x[4] = 0.0  # all equal: index 0
        x[5, 0] = 60.0  # the first lane of the first vector
        x[6, -1] = 60.0  # the scalar tail
        got = ops.argmax_rows(x)
        assert got is not None and torch.equal(got, x.argmax(dim=1)), cols
    assert ops.argmax_rows(torch.randn(2, 8)) is None  # under one vector: the caller uses torch

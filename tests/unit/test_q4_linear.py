"""The native 4-bit decode path: `kernels/q4_linear.c` with its Python packing (`models.linear`), and the
all-layers driver `kernels/llama_decode.c` (`models.llama_native`).

- `quantize_q4` puts a Q4_1-style grid (fp16 d and m per 32 inputs) back onto itself exactly.
- `pack_q4`'s bytes decode, by the layout the kernel's header documents, to the codes, scales and mins.
- The kernel equals a reference written here: activations rounded to int8 per 32 inputs, exact integer
  group sums, then the documented float32 sequence.
- Every row is bit-for-bit the row computed alone, for 1..40 rows (where the CPU has AMX, whole tiles of
  16 rows take the tile path and the rest the VNNI path); an all-zero row gives zeros.
- Shapes the kernel does not take fall back to torch's int4 kernel.
- A random tiny Llama with int4 decode weights: a pure decode batch through the native driver gives the
  very hidden states of the Python layer loop, over a float32 and over a bf16 KV cache, and the driver
  is what ran.
"""

from __future__ import annotations

import pytest
import torch

from flashserve.kernels import CpuOps
from flashserve.models import linear
from flashserve.models.layers import AttentionMetadata, LayerKVCache
from flashserve.models.linear import INT4_GROUP, Q4_BLOCK, QuantizedWeight, pack_q4, quantize_q4
from flashserve.models.llama import LlamaConfig, LlamaForCausalLM


def q4_grid(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes using each group's whole range (as GGUF's Q4_1 quantizer makes them) and fp16 d, m."""
    q = torch.randint(0, 16, (n, k // INT4_GROUP, INT4_GROUP), dtype=torch.uint8)
    q[..., 0], q[..., 1] = 0, 15
    d = (torch.rand(n, k // INT4_GROUP) * 0.01 + 0.001).half()
    m = (-8 * d.float() + torch.randn(n, k // INT4_GROUP) * 0.001).half()
    return q, d, m


def dequantize(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    n = q.shape[0]
    groups = d.shape[1]
    return (q.view(n, groups, INT4_GROUP).double() * d.double().unsqueeze(2) + m.double().unsqueeze(2)).view(n, -1)


def test_quantize_q4_recovers_a_q4_1_grid_exactly() -> None:
    torch.manual_seed(0)
    q, d, m = q4_grid(48, 128)
    weight = dequantize(q, d, m).float()
    got_q, got_d, got_m = quantize_q4(weight)
    assert torch.equal(got_q, q.view(48, 128)) and torch.equal(got_d, d) and torch.equal(got_m, m)


def test_quantize_q4_constant_groups_and_fp16_overflow() -> None:
    weight = torch.full((16, 64), 0.25)
    q, d, m = quantize_q4(weight)
    assert torch.equal(q, torch.zeros_like(q)) and torch.equal(d, torch.zeros_like(d))
    assert torch.equal(dequantize(q, d, m).float(), weight)
    assert quantize_q4(torch.full((16, 64), 1e6)) is None  # beyond fp16: the caller keeps torch's kernel


def test_pack_q4_layout() -> None:
    torch.manual_seed(1)
    n, k = 32, 96
    q, d, m = q4_grid(n, k)
    packed = pack_q4(q.view(n, k), d, m)
    groups = k // INT4_GROUP
    assert packed.dtype == torch.uint8 and packed.shape == (n // Q4_BLOCK, groups, 256 + 64)
    for block in range(n // Q4_BLOCK):
        for g in range(groups):
            raw = packed[block, g]
            scales = raw[256:288].view(torch.float16)
            mins = raw[288:320].view(torch.float16)
            for o in range(Q4_BLOCK):
                row = block * Q4_BLOCK + o
                assert scales[o] == d[row, g] and mins[o] == m[row, g]
                for c in range(4):
                    for i in range(4):
                        byte = int(raw[c * 64 + o * 4 + i])
                        assert byte & 0x0F == q[row, g, 4 * c + i]
                        assert byte >> 4 == q[row, g, 16 + 4 * c + i]


def reference_q4_linear(x: torch.Tensor, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The kernel's arithmetic in float64 from its definition: int8 activations per group of 32 (round half
    to even of x * 127 / amax), integer group sums, then per group isum * xscale * d + m * xscale * sum(xq)."""
    rows, k = x.shape
    groups = k // INT4_GROUP
    xg = x.view(rows, groups, INT4_GROUP)
    amax = xg.abs().amax(dim=2, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    xq = torch.round(xg * inv)  # torch.round rounds half to even, like the kernel's nearbyintf
    xscale = (amax / 127.0).squeeze(2).double()
    codes = q.view(q.shape[0], groups, INT4_GROUP).double()
    isum = torch.einsum("rgk,ngk->rng", xq.double(), codes)
    offset = xscale * xq.double().sum(dim=2)
    scaled = isum * xscale.unsqueeze(1) * d.double().unsqueeze(0)  # [rows, n, groups]
    return (scaled + m.double().unsqueeze(0) * offset.unsqueeze(1)).sum(2)


@pytest.mark.parametrize(("n", "k"), [(16, 32), (64, 576), (48, 1536)])
def test_q4_linear_matches_reference(ops: CpuOps, n: int, k: int) -> None:
    torch.manual_seed(2)
    q, d, m = q4_grid(n, k)
    packed = pack_q4(q.view(n, k), d, m)
    x = torch.randn(5, k) * 3
    out = torch.empty(5, n)
    assert ops.q4_linear(x, packed, out)
    expected = reference_q4_linear(x, q, d, m)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    # And it is a faithful product: close to x @ W.T with the dequantized weights (int8 activation rounding).
    exact = x.double() @ dequantize(q, d, m).T
    assert ((out.double() - exact).norm() / exact.norm()) < 0.01


def test_q4_rows_do_not_depend_on_batch(ops: CpuOps) -> None:
    torch.manual_seed(3)
    weight = torch.randn(96, 576) / 24
    layer = QuantizedWeight(weight, 4)
    assert layer.native is not None
    x = torch.randn(40, 576)
    x[7] = 0  # an all-zero row quantizes to zeros instead of dividing by zero
    full = layer.matmul(x)  # with AMX: tiles of 16 rows, the last 8 on the VNNI path
    assert torch.equal(full[7], torch.zeros(96))
    for rows in (1, 3, 8, 9, 15, 16, 17, 20, 32, 33):
        assert torch.equal(layer.matmul(x[:rows]), full[:rows]), rows
    for r in range(40):
        assert torch.equal(layer.matmul(x[r : r + 1])[0], full[r]), r


def test_q4_linear_refuses_shapes_it_does_not_take(ops: CpuOps) -> None:
    packed = torch.zeros(1, 1, 320, dtype=torch.uint8)
    out = torch.full((2, 8), 7.0)
    assert not ops.q4_linear(torch.randn(2, 32), packed, out)  # 8 outputs: not a whole block of 16
    assert torch.equal(out, torch.full((2, 8), 7.0))


def test_without_native_kernels_int4_uses_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(linear, "cpu_ops", lambda: None)
    torch.manual_seed(5)
    weight = torch.randn(32, 64) / 8
    layer = QuantizedWeight(weight, 4)
    assert layer.native is None and layer.scales is not None
    x = torch.randn(3, 64)
    got = layer.matmul(x)
    assert ((got - x @ weight.T).norm() / (x @ weight.T).norm()) < 0.12


TINY = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                   tie_word_embeddings=True)


def tiny_int4_llama() -> LlamaForCausalLM:
    torch.manual_seed(4)
    model = LlamaForCausalLM(TINY)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.02 if "embed" in name else 0.1) + (1.0 if "norm" in name else 0.0))
    model.pack("int4", torch.bfloat16)
    return model.eval().requires_grad_(False)


def decode_hidden(model: LlamaForCausalLM, native: bool, cache_dtype: torch.dtype) -> list[torch.Tensor]:
    """Prefill three prompts, then decode six steps of all three together; the hidden states per step."""
    caches = [LayerKVCache(torch.zeros(512, 2, 32, dtype=cache_dtype), torch.zeros(512, 2, 32, dtype=cache_dtype))
              for _ in range(TINY.num_hidden_layers)]
    if not native:
        model.model._native_decoder = lambda kv_caches: None  # type: ignore[method-assign]
    prompts = [[5, 9, 17], [3, 4, 5, 6, 7, 8, 9], [100]]
    tables = [list(range(i * 16, (i + 1) * 16)) for i in range(3)]  # block size 8: 16 blocks each
    meta = AttentionMetadata.build(tables, [len(p) for p in prompts], [len(p) for p in prompts], 8,
                                   generated_rows=0)
    ids = torch.tensor([t for p in prompts for t in p])
    positions = torch.tensor([i for p in prompts for i in range(len(p))])
    hidden = model(ids, positions, meta, caches)
    last = [sum(len(p) for p in prompts[: i + 1]) - 1 for i in range(3)]
    tokens = model.compute_logits(hidden[last]).argmax(-1)
    lengths = [len(p) for p in prompts]
    states = []
    for _ in range(6):
        lengths = [n + 1 for n in lengths]
        meta = AttentionMetadata.build(tables, [1, 1, 1], lengths, 8, generated_rows=3)
        hidden = model(tokens, torch.tensor([n - 1 for n in lengths]), meta, caches)
        states.append(hidden)
        tokens = model.compute_logits(hidden, 3).argmax(-1)
    if native:
        assert model.model._native_decoder(caches) is not None, "the native driver should cover this model"
    return states


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_native_decode_driver_equals_the_python_layers(ops: CpuOps, cache_dtype: torch.dtype) -> None:
    native = decode_hidden(tiny_int4_llama(), native=True, cache_dtype=cache_dtype)
    python = decode_hidden(tiny_int4_llama(), native=False, cache_dtype=cache_dtype)
    for step, (a, b) in enumerate(zip(native, python, strict=True)):
        assert torch.equal(a, b), step


def test_native_decode_driver_declines_models_it_does_not_cover(ops: CpuOps) -> None:
    model = LlamaForCausalLM(TINY)
    model.pack("none")  # float32 dense weights everywhere: no 4-bit tables for the driver
    caches = [LayerKVCache(torch.zeros(64, 2, 32), torch.zeros(64, 2, 32)) for _ in range(TINY.num_hidden_layers)]
    assert model.model._native_decoder(caches) is None
    int4 = tiny_int4_llama()
    assert int4.model._native_decoder(caches) is not None
    fp16_caches = [LayerKVCache(c.key.half(), c.value.half()) for c in caches]  # no kernel reads fp16
    assert int4.model._native_decoder(fp16_caches) is None

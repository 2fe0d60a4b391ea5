"""PackedLinear (`flashserve.models.linear`): fused projections, batch-invariant bf16, int8 decode rows.

- The fused output equals the concatenation of the separate nn.Linear outputs, with and without bias.
- bf16 and float32 batch invariance, for random weights of the served model's shapes: every row of a batch
  of 1..80 rows is bit-for-bit the row computed alone, on the native dense kernel (by construction: see
  kernels/dense_linear.c) and on the PyTorch fallback (a batch of one per row). These tests run at every
  kernel level (scripts/test-kernel-levels.sh) and under oneDNN and ATen held to lower ISAs.
- int8: `quantize_int8` round-trips within half a scale step; int8 decode rows are bit-for-bit the rows
  computed alone whatever the number of decode rows and whatever prompt rows follow (which keep the dense
  bf16 path); `decode_rows=0` is the dense path; int8 results stay close to the bf16 reference.
- `weight_quant` is validated.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flashserve.models.linear import (
    INT4_GROUP,
    WEIGHT_QUANTS,
    PackedLinear,
    exact_q8,
    pack_dense,
    quantize_int4,
    quantize_int8,
)

MAX_ROWS = 80
TILE = 4  # rows per tile of the native dense kernel: sizes around its multiples are the edges


def make_linear(in_features: int, out_features: int, bias: bool, dtype: torch.dtype = torch.float32) -> nn.Linear:
    """A linear with random weights of the usual magnitude (and a non-trivial bias)."""
    lin = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_features, in_features) / in_features**0.5)
        if bias:
            lin.bias.copy_(torch.randn(out_features) * 0.5)
    return lin.to(dtype)


def rows_alone(layer: PackedLinear, x: torch.Tensor, decode: bool = False) -> torch.Tensor:
    """Each row of x through the layer in a batch of its own (as a decode row, or a prompt row)."""
    with torch.no_grad():
        return torch.cat([layer(x[r : r + 1], decode_rows=int(decode)) for r in range(x.shape[0])])


def mismatched_rows(got: torch.Tensor, expected: torch.Tensor) -> list[int]:
    return [r for r in range(got.shape[0]) if not torch.equal(got[r], expected[r])]


# -- fusion ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 50])
def test_fused_equals_concatenated_linears(bias: bool, rows: int) -> None:
    torch.manual_seed(0)
    linears = [make_linear(64, 96, bias), make_linear(64, 32, bias), make_linear(64, 48, bias)]
    packed = PackedLinear(linears)
    x = torch.randn(rows, 64)
    with torch.no_grad():
        expected = torch.cat([lin(x) for lin in linears], dim=-1)
        got = packed(x)
    assert packed.out_features == [96, 32, 48]
    assert (packed.bias is not None) == bias
    assert got.shape == (rows, 176) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # Splitting the fused output back gives each projection.
    for part, lin in zip(got.split(packed.out_features, dim=-1), linears, strict=True):
        with torch.no_grad():
            torch.testing.assert_close(part, lin(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_single_linear_and_bf16_fusion(bias: bool) -> None:
    torch.manual_seed(1)
    lin = make_linear(48, 80, bias)
    x = torch.randn(5, 48)
    with torch.no_grad():
        torch.testing.assert_close(PackedLinear([lin])(x), lin(x), rtol=1e-5, atol=1e-5)
    linears = [make_linear(64, 32, bias, torch.bfloat16), make_linear(64, 64, bias, torch.bfloat16)]
    xb = torch.randn(40, 64).to(torch.bfloat16)
    with torch.no_grad():
        got = PackedLinear(linears)(xb)
        expected = torch.cat([lin(xb) for lin in linears], dim=-1)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_rows_give_an_empty_output_of_the_right_width(dtype: torch.dtype) -> None:
    """A step that samples no row (a prefill chunk that does not end its prompt) hands the head 0 rows."""
    layer = PackedLinear([make_linear(64, 96, True, dtype)])
    with torch.no_grad():
        out = layer(torch.empty(0, 64, dtype=dtype))
    assert out.shape == (0, 96) and out.dtype == dtype


# -- bf16 batch invariance -------------------------------------------------------------------------------

# (in, out, bias, batch sizes): SmolLM2-135M's q/k/v-packed, gate/up-packed and down projections, all batch
# sizes; and its 49152-row head on a few sizes around the tile edges (it is the slow one).
BF16_SHAPES = [
    (576, 960, False, range(1, MAX_ROWS + 1)),
    (576, 3072, True, range(1, MAX_ROWS + 1)),
    (1536, 576, False, range(1, MAX_ROWS + 1)),
    (576, 49152, False, (1, 2, 3, TILE, TILE + 1, 17, 32, 33, MAX_ROWS)),
]


@pytest.mark.parametrize(("in_features", "out_features", "bias", "batch_sizes"), BF16_SHAPES,
                         ids=[f"{i}x{o}" for i, o, _, _ in BF16_SHAPES])
def test_bf16_rows_do_not_depend_on_batch(in_features: int, out_features: int, bias: bool,
                                          batch_sizes: range | tuple[int, ...]) -> None:
    torch.manual_seed(2)
    lin = make_linear(in_features, out_features, bias, torch.bfloat16)
    layer = PackedLinear([lin])
    x = torch.randn(MAX_ROWS, in_features).to(torch.bfloat16)
    alone = rows_alone(layer, x)
    with torch.no_grad():
        for n in batch_sizes:
            got = layer(x[:n])
            assert got.shape == (n, out_features)
            assert not mismatched_rows(got, alone[:n]), f"batch of {n}: rows {mismatched_rows(got, alone[:n])}"
    reference = F.linear(x.double(), lin.weight.double(), None if lin.bias is None else lin.bias.double())
    torch.testing.assert_close(alone.double(), reference, rtol=1.6e-2, atol=2e-2)


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
@pytest.mark.parametrize(("dtype", "in_features", "out_features"),
                         [(torch.float32, 576, 960), (torch.bfloat16, 1536, 576), (torch.bfloat16, 37, 20)])
def test_dense_rows_do_not_depend_on_batch_or_chunking(dtype: torch.dtype, in_features: int, out_features: int,
                                                      native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both dense paths (the native kernel; torch one row per call) at odd shapes too (K odd, N not a
    multiple of 16: padded): every row of any batch, and of any split of it into chunks, is the row alone."""
    if not native:
        monkeypatch.setattr("flashserve.models.linear.cpu_ops", lambda: None)
    torch.manual_seed(11)
    lin = make_linear(in_features, out_features, True, dtype)
    layer = PackedLinear([lin])
    assert (layer._native is not None) == native and (layer.packed is not None) == (native and dtype == torch.bfloat16)
    x = torch.randn(23, in_features).to(dtype)
    alone = rows_alone(layer, x)
    with torch.no_grad():
        for n in (2, 3, 4, 5, 9, 23):
            assert not mismatched_rows(layer(x[:n]), alone[:n]), f"batch of {n}"
        chunks = torch.cat([layer(part) for part in x.split([5, 1, 8, 9])])
    assert torch.equal(chunks, alone)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    with torch.no_grad():
        torch.testing.assert_close(alone.double(), lin.double()(x.double()), rtol=tol, atol=tol)


def test_pack_dense_layout() -> None:
    """bf16 pairs [K/2][16][2] and float32 [K][16] per block of 16 outputs, zero-padded to whole blocks."""
    w = torch.arange(20 * 6, dtype=torch.float32).view(20, 6)
    packed = pack_dense(w)
    assert packed.shape == (2, 6 * 16)
    assert packed[0, 16 * 2 + 5] == w[5, 2] and packed[1, 16 * 3 + 3] == w[19, 3] and packed[1, 16 * 3 + 4] == 0
    wb = w.to(torch.bfloat16)
    packed = pack_dense(wb)
    assert packed.shape == (2, 6 * 16) and packed.dtype == torch.bfloat16
    # pair kp, output o, input j at [kp * 32 + o * 2 + j]
    assert packed[0, 1 * 32 + 5 * 2 + 1] == wb[5, 3] and packed[1, 2 * 32 + 3 * 2] == wb[19, 4]


# -- int8 ------------------------------------------------------------------------------------------------


def test_quantize_int8_round_trip_float32() -> None:
    torch.manual_seed(4)
    weight = torch.randn(300, 576) * torch.rand(300, 1) * 3  # per-row magnitudes vary
    weight[7] = 0.0  # an all-zero row must not divide by zero
    q, scale = quantize_int8(weight)
    assert q.dtype == torch.int8 and q.shape == weight.shape
    assert scale.dtype == torch.float32 and scale.shape == (300,)
    assert q.abs().max() <= 127 and (q.abs().amax(dim=1)[scale > 1e-11] == 127).all()
    err = (q.double() * scale.double().unsqueeze(1) - weight.double()).abs()
    assert (err <= scale.double().unsqueeze(1) / 2 * (1 + 1e-5)).all(), (err / scale.unsqueeze(1)).max()
    assert not q[7].any() and torch.isfinite(scale).all()


def bf16_round_trip_error_in_steps() -> float:
    torch.manual_seed(5)
    weight = (torch.randn(960, 576) * 0.05).to(torch.bfloat16)
    q, scale = quantize_int8(weight)
    assert scale.dtype == torch.bfloat16
    err = (q.double() * scale.double().unsqueeze(1) - weight.double()).abs()
    return float((err / scale.double().unsqueeze(1)).max())


def test_quantize_int8_round_trip_bf16_half_step() -> None:
    """The scale is rounded to bf16 before quantising with it, so every element is within half a step."""
    assert bf16_round_trip_error_in_steps() <= 0.5 + 1e-3


@pytest.mark.parametrize(("in_features", "out_features", "bias"), [(576, 3072, False), (1536, 576, True)])
def test_int8_decode_rows_do_not_depend_on_batch(in_features: int, out_features: int, bias: bool) -> None:
    torch.manual_seed(6)
    lin = make_linear(in_features, out_features, bias, torch.bfloat16)
    layer, dense = PackedLinear([lin], weight_quant="int8"), PackedLinear([lin])
    assert layer.int8 is not None
    x = torch.randn(MAX_ROWS, in_features).to(torch.bfloat16)
    decode_alone, prompt_alone = rows_alone(layer, x, decode=True), rows_alone(dense, x)
    with torch.no_grad():
        for decode_rows in range(1, MAX_ROWS + 1):
            # Follow the decode rows by no prompt rows, a few, or enough to need several tiles.
            n = min(MAX_ROWS, decode_rows + (0, 1, 5, 40)[decode_rows % 4])
            got = layer(x[:n], decode_rows=decode_rows)
            assert got.shape == (n, out_features) and got.dtype == torch.bfloat16
            bad = mismatched_rows(got[:decode_rows], decode_alone[:decode_rows])
            assert not bad, f"{decode_rows} decode rows in a batch of {n}: decode rows {bad} differ"
            bad = mismatched_rows(got[decode_rows:], prompt_alone[decode_rows:n])
            assert not bad, f"{decode_rows} decode rows in a batch of {n}: prompt rows {bad} differ"
    # The int8 rows really come from the int8 weights: they differ from the bf16 ones, and stay close.
    assert not torch.equal(decode_alone, prompt_alone)
    reference = F.linear(x.double(), lin.weight.double(), None if lin.bias is None else lin.bias.double())
    rel = (decode_alone.double() - reference).norm() / reference.norm()
    assert rel < 0.02, f"int8 relative error {rel:.4f}"
    row_rel = (decode_alone.double() - reference).norm(dim=1) / reference.norm(dim=1)
    assert row_rel.max() < 0.03, f"worst row's int8 relative error {row_rel.max():.4f}"


def test_int8_with_zero_decode_rows_is_the_dense_path() -> None:
    torch.manual_seed(7)
    lin = make_linear(576, 960, True, torch.bfloat16)
    layer, dense = PackedLinear([lin], weight_quant="int8"), PackedLinear([lin])
    x = torch.randn(45, 576).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(layer(x), dense(x))
        assert torch.equal(layer(x, decode_rows=0), dense(x))
        assert torch.equal(layer(x[:3], decode_rows=0), dense(x[:3]))
        assert not torch.equal(layer(x[:3], decode_rows=3), dense(x[:3]))


def test_int8_fused_projections() -> None:
    """Packing q/k/v with int8: decode rows are close to the separate bf16 projections, biases included."""
    torch.manual_seed(8)
    linears = [make_linear(576, 576, True, torch.bfloat16), make_linear(576, 192, True, torch.bfloat16),
               make_linear(576, 192, True, torch.bfloat16)]
    layer = PackedLinear(linears, weight_quant="int8")
    x = torch.randn(6, 576).to(torch.bfloat16)
    with torch.no_grad():
        got = layer(x, decode_rows=4)
        expected = torch.cat([F.linear(x.double(), lin.weight.double(), lin.bias.double()) for lin in linears], -1)
    assert got.shape == (6, 960)
    rel = (got.double() - expected).norm(dim=1) / expected.norm(dim=1)
    assert rel.max() < 0.02, rel


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_float32_activations_use_quantized_decode_rows_and_bf16_dense_rows(quant: str) -> None:
    """The serving default: float32 activations, bf16 dense weights, a quantized copy for generated rows.
    Outputs stay float32; every row equals that row computed alone, and is close to the float32 product."""
    torch.manual_seed(9)
    lin = make_linear(64, 32, True)
    layer = PackedLinear([lin], weight_quant=quant, dense_dtype=torch.bfloat16)
    assert layer.quant is not None and layer.quant.bits == (8 if quant == "int8" else 4)
    assert layer.dense_dtype == torch.bfloat16
    x = torch.randn(7, 64)
    with torch.no_grad():
        out = layer(x, decode_rows=3)
        assert out.dtype == torch.float32
        alone = torch.cat([layer(x[r : r + 1], decode_rows=1 if r < 3 else 0) for r in range(7)])
        assert torch.equal(out, alone)
        reference = lin(x)
    rel = (out - reference).norm() / reference.norm()
    assert rel < (0.02 if quant == "int8" else 0.12), rel


def test_int4_is_skipped_where_inputs_do_not_fill_groups() -> None:
    lin = make_linear(48, 16, False)  # 48 inputs: not a multiple of the 32-input group
    assert PackedLinear([lin], weight_quant="int4").quant is None
    lin = make_linear(64, 24, False)  # 24 outputs: not a whole block of 16
    assert PackedLinear([lin], weight_quant="int4").quant is None


def test_weight_quant_is_validated() -> None:
    lin = make_linear(32, 16, False)
    assert WEIGHT_QUANTS == ("none", "int8", "int4")
    for quant in WEIGHT_QUANTS:
        PackedLinear([lin], weight_quant=quant)
    for bad in ("int2", "INT8", "", "fp8"):
        with pytest.raises(ValueError, match="weight_quant"):
            PackedLinear([lin], weight_quant=bad)


def test_int4_requantizes_a_q4_grid_onto_itself() -> None:
    """Weights on a GGUF Q4_1-style grid (d * q + m per 32-input block, q spanning 0..15) come back to the
    same grid: only the bf16 rounding of scale and zero separates the kernel's weights from the originals."""
    torch.manual_seed(10)
    n, k = 64, 128
    d = torch.rand(n, k // 32, 1) * 0.01 + 0.001
    m = -8 * d + torch.randn(n, k // 32, 1) * 0.001
    q = torch.randint(0, 16, (n, k // 32, 32)).float()
    q[..., 0], q[..., 1] = 0, 15  # every block uses its whole range, as the Q4_1 quantizer makes it
    weight = (d * q + m).view(n, k)
    packed, scales = quantize_int4(weight)
    eye = torch.eye(k, dtype=torch.bfloat16)
    recovered = torch._weight_int4pack_mm_for_cpu(eye, packed, INT4_GROUP, scales.to(torch.bfloat16)).float().T
    step = d.expand(n, k // 32, 32).reshape(n, k)
    # Off by at most a small fraction of a step (bf16 scale/zero rounding and the bf16 output), never a step.
    assert ((recovered - weight).abs() / step).max() < 0.2


def test_exact_q8_only_where_it_gives_back_every_float32_value() -> None:
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    assert exact_q8(w) is None  # random floats are not on an int8 grid
    groups = w.view(8, 2, 32)
    scale = (groups.abs().amax(dim=2, keepdim=True) / 127).half().float()
    grid = (torch.round(groups / scale) * scale).view(8, 64)
    codes, scales = exact_q8(grid)
    assert codes.dtype == torch.int8 and scales.shape == (8, 2)
    assert torch.equal(codes.float().view(8, 2, 32) * scales.unsqueeze(2), grid.view(8, 2, 32))
    assert exact_q8(grid.to(torch.bfloat16)) is None and exact_q8(grid[:, :48]) is None

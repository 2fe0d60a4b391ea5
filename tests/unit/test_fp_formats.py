"""FP8 E4M3, FP4 E2M1 and E8M0 decoding, bit for bit: our tables (built from the bit layouts) against
torch's own float8 dtypes and against values written out by hand, then block/group dequantization and the
quantizers that write checkpoints in these formats."""

from __future__ import annotations

import math

import torch

from flashserve.models.fp_formats import (
    FP4_E2M1,
    decode_e8m0,
    decode_fp8_e4m3,
    dequantize_fp4_groups,
    dequantize_fp8_blocks,
    quantize_fp4_groups,
    quantize_fp8_blocks,
    unpack_fp4_e2m1,
)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.float().view(torch.int32), b.float().view(torch.int32))


def test_fp8_e4m3_every_code_matches_torch_and_the_definition() -> None:
    codes = torch.arange(256, dtype=torch.uint8)
    ours = decode_fp8_e4m3(codes)
    theirs = codes.view(torch.float8_e4m3fn).float()
    nan = torch.isnan(theirs)
    assert torch.equal(torch.isnan(ours), nan) and nan.sum() == 2  # 0x7F and 0xFF
    assert same_bits(ours[~nan], theirs[~nan])  # -0 included: 0x80 decodes to -0.0
    by_hand = {0x00: 0.0, 0x01: 2.0**-9, 0x08: 2.0**-6, 0x38: 1.0, 0x3C: 1.5, 0x7E: 448.0, 0xFE: -448.0, 0xC0: -2.0}
    for code, value in by_hand.items():
        assert float(ours[code]) == value, hex(code)
    assert math.copysign(1.0, float(ours[0x80])) == -1.0


def test_e8m0_every_code() -> None:
    codes = torch.arange(256, dtype=torch.uint8)
    ours = decode_e8m0(codes)
    theirs = codes.view(torch.float8_e8m0fnu).float()
    assert torch.isnan(ours[255]) and torch.isnan(theirs[255])
    assert same_bits(ours[:255], theirs[:255])
    assert float(ours[127]) == 1.0 and float(ours[128]) == 2.0 and float(ours[0]) == 2.0**-127


def test_fp4_e2m1_table_and_nibble_order() -> None:
    expected = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
    assert FP4_E2M1.tolist() == expected
    assert math.copysign(1.0, float(FP4_E2M1[8])) == -1.0
    packed = torch.tensor([[0x21, 0xF7]], dtype=torch.uint8).view(torch.int8)  # low nibble first
    assert unpack_fp4_e2m1(packed).tolist() == [[0.5, 1.0, 6.0, -6.0]]


def test_fp8_block_dequantization_with_ragged_edges() -> None:
    torch.manual_seed(0)
    rows, cols = 200, 130  # neither a multiple of 128: the last blocks are partial
    codes = torch.randint(0, 256, (rows, cols), dtype=torch.uint8)
    codes[codes == 0x7F] = 0x7E
    codes[codes == 0xFF] = 0xFE
    scales = torch.tensor([[120, 127], [130, 100]], dtype=torch.uint8)
    out = dequantize_fp8_blocks(codes.view(torch.float8_e4m3fn), scales.view(torch.float8_e8m0fnu))
    values = codes.view(torch.float8_e4m3fn).float()
    for r in (0, 127, 128, 199):
        for c in (0, 127, 128, 129):
            factor = 2.0 ** (int(scales[r // 128, c // 128]) - 127)
            assert float(out[r, c]) == float(values[r, c]) * factor, (r, c)


def test_fp4_group_dequantization() -> None:
    torch.manual_seed(1)
    packed = torch.randint(-128, 128, (3, 32), dtype=torch.int8)  # 64 values a row: two groups of 32
    scales = torch.tensor([[127, 120], [130, 127], [1, 254]], dtype=torch.uint8).view(torch.float8_e8m0fnu)
    out = dequantize_fp4_groups(packed, scales)
    values = unpack_fp4_e2m1(packed)
    factors = decode_e8m0(scales).repeat_interleave(32, 1)
    assert out.shape == (3, 64) and same_bits(out, values * factors)


def test_quantizers_round_trip_exactly_on_representable_weights() -> None:
    torch.manual_seed(2)
    # Weights already on the FP8 grid times a power of two per block come back bit for bit.
    grid = decode_fp8_e4m3(torch.randint(0, 0x7E, (256, 256), dtype=torch.uint8))
    grid[0, 0] = 448.0  # each block's largest magnitude fixes its scale exactly
    grid[0, 128] = grid[128, 0] = grid[128, 128] = 448.0
    w8, s8 = quantize_fp8_blocks(grid * 2.0**-10)
    assert w8.dtype == torch.float8_e4m3fn and s8.dtype == torch.float8_e8m0fnu and s8.shape == (2, 2)
    assert same_bits(dequantize_fp8_blocks(w8, s8), grid * 2.0**-10)
    fp4 = FP4_E2M1[torch.randint(0, 16, (4, 64))]
    fp4[:, 0] = fp4[:, 32] = 6.0
    w4, s4 = quantize_fp4_groups(fp4 * 0.25)
    assert w4.dtype == torch.int8 and w4.shape == (4, 32) and s4.shape == (4, 2)
    assert torch.equal(dequantize_fp4_groups(w4, s4), fp4 * 0.25)


def test_quantizers_are_close_on_arbitrary_weights() -> None:
    torch.manual_seed(3)
    w = torch.randn(300, 200) * 0.02
    w8, s8 = quantize_fp8_blocks(w)
    assert ((dequantize_fp8_blocks(w8, s8) - w).norm() / w.norm()) < 0.05
    w4, s4 = quantize_fp4_groups(w[:, :192])
    assert ((dequantize_fp4_groups(w4, s4) - w[:, :192]).norm() / w[:, :192].norm()) < 0.2

"""The low-precision number formats of DeepSeek-V4's official checkpoint, decoded from their definitions.

- FP8 E4M3 ("fn": no infinities): sign, 4 exponent bits with bias 7, 3 mantissa bits; exponent 0 is
  subnormal (m/8 * 2^-6); 0x7F and 0xFF are NaN. Attention and shared-expert linears, with one E8M0
  scale per 128x128 block of the weight.
- FP4 E2M1: sign, 2 exponent bits with bias 1, 1 mantissa bit: magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6.
  Routed experts, two values per byte (the low nibble holds the even element), with one E8M0 scale per
  1x32 of a row.
- E8M0: an exponent alone, 2^(e - 127); 0xFF is NaN.

Every decoded value is exact in float32 (and in bf16: at most 4 significant bits times a power of two), so
dequantization is bit-exact whatever the order. Tables are built here from the bit layouts rather than
taken from torch's float8 dtypes, so the tests can hold the two against each other. The quantizers are the
inverse, for writing checkpoints in this format (`flashserve make-tiny-v4`).
"""

from __future__ import annotations

import torch

FP8_BLOCK = 128
FP4_GROUP = 32


def _fp8_e4m3_table() -> torch.Tensor:
    values = []
    for code in range(256):
        sign = -1.0 if code & 0x80 else 1.0
        exponent, mantissa = (code >> 3) & 0xF, code & 0x7
        if exponent == 0xF and mantissa == 0x7:
            values.append(float("nan"))
        elif exponent == 0:
            values.append(sign * mantissa / 8 * 2.0**-6)
        else:
            values.append(sign * (1 + mantissa / 8) * 2.0 ** (exponent - 7))
    return torch.tensor(values, dtype=torch.float32)


def _fp4_e2m1_table() -> torch.Tensor:
    values = []
    for code in range(16):
        sign = -1.0 if code & 0x8 else 1.0
        exponent, mantissa = (code >> 1) & 0x3, code & 0x1
        magnitude = mantissa * 0.5 if exponent == 0 else (1 + mantissa / 2) * 2.0 ** (exponent - 1)
        values.append(sign * magnitude)
    return torch.tensor(values, dtype=torch.float32)


FP8_E4M3 = _fp8_e4m3_table()
FP4_E2M1 = _fp4_e2m1_table()


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as uint8 (float8 and int8 tensors alike), same shape."""
    return t.view(torch.uint8) if t.element_size() == 1 else t


def decode_e8m0(scale: torch.Tensor) -> torch.Tensor:
    codes = raw_bytes(scale).to(torch.int32)
    values = torch.ldexp(torch.ones_like(codes, dtype=torch.float32), codes - 127)
    return torch.where(codes == 0xFF, torch.full_like(values, float("nan")), values)


def decode_fp8_e4m3(weight: torch.Tensor) -> torch.Tensor:
    return FP8_E4M3[raw_bytes(weight).long()]


def unpack_fp4_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """[rows, cols / 2] bytes -> [rows, cols] values; the low nibble is the even column."""
    codes = raw_bytes(packed).long()
    return torch.stack([FP4_E2M1[codes & 0xF], FP4_E2M1[codes >> 4]], dim=-1).flatten(-2)


def dequantize_fp8_blocks(weight: torch.Tensor, scale: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    """FP8 weight [out, in] with E8M0 scales [ceil(out / block), ceil(in / block)] -> float32."""
    values = decode_fp8_e4m3(weight)
    rows, cols = values.shape
    factors = decode_e8m0(scale).repeat_interleave(block, 0).repeat_interleave(block, 1)[:rows, :cols]
    return values * factors


def dequantize_fp4_groups(packed: torch.Tensor, scale: torch.Tensor, group: int = FP4_GROUP) -> torch.Tensor:
    """FP4 weight packed [out, in / 2] with E8M0 scales [out, in / group] -> float32 [out, in]."""
    values = unpack_fp4_e2m1(packed)
    return values * decode_e8m0(scale).repeat_interleave(group, 1)[:, : values.shape[1]]


def _e8m0_for(amax: torch.Tensor, top: float) -> torch.Tensor:
    """The smallest power of two scale s with amax / s <= top, as E8M0 codes (uint8)."""
    exponent = torch.ceil(torch.log2(torch.clamp(amax / top, min=2.0**-126)))
    return (exponent + 127).clamp(0, 254).to(torch.uint8)


def quantize_fp8_blocks(weight: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """float weight [out, in] -> (float8_e4m3fn [out, in], float8_e8m0fnu scales per block)."""
    rows, cols = weight.shape
    w = weight.float()
    pad = torch.zeros(-(-rows // block) * block, -(-cols // block) * block)
    pad[:rows, :cols] = w.abs()
    amax = pad.view(pad.shape[0] // block, block, pad.shape[1] // block, block).amax(dim=(1, 3))
    codes = _e8m0_for(amax, 448.0)
    factors = decode_e8m0(codes).repeat_interleave(block, 0).repeat_interleave(block, 1)[:rows, :cols]
    return (w / factors).to(torch.float8_e4m3fn), codes.view(torch.float8_e8m0fnu)


def quantize_fp4_groups(weight: torch.Tensor, group: int = FP4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """float weight [out, in] (in a multiple of `group`) -> (int8 packed [out, in / 2], E8M0 scales)."""
    rows, cols = weight.shape
    w = weight.float().view(rows, cols // group, group)
    codes = _e8m0_for(w.abs().amax(dim=2), 6.0)
    scaled = (w / decode_e8m0(codes).unsqueeze(2)).view(rows, cols)
    nearest = (scaled.unsqueeze(-1) - FP4_E2M1).abs().argmin(dim=-1)  # ties: the lower code, +0 not -0
    packed = (nearest[:, 0::2] | (nearest[:, 1::2] << 4)).to(torch.uint8)
    return packed.view(torch.int8), codes.view(torch.float8_e8m0fnu)

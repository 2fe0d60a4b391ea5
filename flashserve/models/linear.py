"""Linear layers packed for serving: fused projections, bf16 matrix units, quantized decode weights.

Packing fuses projections that read the same input (Q/K/V, gate/up) into one matmul.

Dense weights can be kept in bf16 under float32 activations: the matmul then runs on the CPU's bf16 units
(rounding its input to bf16, accumulating in float32) while norms, residuals and attention stay float32.

Every row of a dense matmul gets the bits it would get alone, in any batch and any chunking, on every CPU:
by construction, not by a vendor library's choice of kernel. bf16 and float32 weights run on the native
`dense_linear` kernels (kernels/dense_linear.c), where each output is one accumulator over K in a fixed
order and a partial row tile runs the same code as a full one; bf16 weights are packed once into its
layout (`pack_dense`), float32 ones stay as they are (a tied head keeps sharing the embedding table).
oneDNN's matmul, used before, picks its microkernel (and so its order of summation) from
the whole call's shape: on Zen 4 without AMX a batch of 5 rows gave one row other bits than alone. Where
the native kernels are not built (no compiler, FLASHSERVE_NATIVE_KERNELS=0) or the dtype has none
(float16), every row goes through torch's matmul as a batch of one: the same call for every row, so the
same bits, at the cost of speed.

A decode step of a small model multiplies a few rows by every weight, so it is bound by the weight bytes
it reads: a 4-bit copy (per group of 32 inputs, the grid of GGUF's Q4 blocks) or an 8-bit one (per output
channel) reads a quarter or half of bf16. Which kernel a row uses follows from the row itself (a generated
token or a prompt token), never from the batch, so results stay batch-invariant.

The 4-bit copy runs on the native `q4_linear` kernel where it is built (see `kernels/q4_linear.c`): it
quantizes each decode row to 8 bits per group of 32 and multiplies bytes with the CPU's VNNI dot-product
instructions, like llama.cpp's Q4_1 path. Without it, torch's int4 kernel (bf16 activations) serves.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from flashserve.kernels import cpu_ops

WEIGHT_QUANTS = ("none", "int8", "int4")
DENSE_BLOCK = 16  # outputs per block of the native dense kernel's layout
INT4_GROUP = 32  # the group of GGUF's Q4_0/Q4_1 blocks, so 4-bit checkpoints requantize onto their own grid
Q4_BLOCK = 16  # outputs per block of the native kernel's layout


def pack_dense(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] bf16 or float32 -> the layout of kernels/dense_linear.c, [ceil(N / 16), K' * 16] with N padded to
    whole blocks of 16 and K to an even K' (zeros): per block of 16 outputs, bf16 as [K' / 2][16][2] (the
    pairs one VDPBF16PS takes), float32 as [K'][16]."""
    n, k = weight.shape
    w = F.pad(weight, (0, k % 2, 0, -n % DENSE_BLOCK))
    blocks, kp = w.shape[0] // DENSE_BLOCK, w.shape[1]
    if w.dtype == torch.bfloat16:
        tiles = w.view(blocks, DENSE_BLOCK, kp // 2, 2).permute(0, 2, 1, 3)
    else:
        tiles = w.view(blocks, DENSE_BLOCK, kp).permute(0, 2, 1)
    return tiles.contiguous().view(blocks, kp * DENSE_BLOCK)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: weight ≈ q * scale[:, None]; scale in the weight's dtype."""
    w = weight.float()
    # Round the scale to the weight's dtype first: quantizing with the scale the kernel will use keeps
    # every element within half a step.
    scale = (w.abs().amax(dim=1).clamp(min=1e-12) / 127.0).to(weight.dtype)
    q = torch.round(w / scale.float().unsqueeze(1)).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(weight: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit per group of `group` inputs, packed for `torch._weight_int4pack_mm_for_cpu`:
    weight ≈ (q - 8) * scale + zero. Returns (packed weight, scales_and_zeros [K / group, N, 2])."""
    n, k = weight.shape
    w = weight.float().view(n, k // group, group)
    low, high = w.amin(dim=2), w.amax(dim=2)
    scale = ((high - low) / 15).clamp(min=1e-12).to(torch.bfloat16).float()
    q = torch.round((w - low.unsqueeze(2)) / scale.unsqueeze(2)).clamp(0, 15).to(torch.int32).view(n, k)
    zero = low + 8 * scale
    scales_and_zeros = torch.stack([scale, zero], dim=2).transpose(0, 1).contiguous()
    return torch._convert_weight_to_int4pack_for_cpu(q, 1), scales_and_zeros


def quantize_q4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """GGUF Q4_1's scheme per group of 32 inputs: weight ≈ scale * q + min, q in 0..15, scale and min in
    fp16 (as Q4_1 stores them, so a Q4_1 checkpoint's own values come back exactly). Returns (q uint8
    [N, K], scale, min [N, K / 32] fp16), or None where a value does not fit fp16."""
    n, k = weight.shape
    w = weight.float().view(n, k // INT4_GROUP, INT4_GROUP)
    low, high = w.amin(dim=2), w.amax(dim=2)
    scale, low16 = ((high - low) / 15).to(torch.float16), low.to(torch.float16)
    if not (torch.isfinite(scale).all() and torch.isfinite(low16).all()):
        return None
    step = torch.where(scale > 0, scale.float(), 1.0).unsqueeze(2)  # a constant group: every q is 0
    q = torch.round((w - low16.float().unsqueeze(2)) / step).clamp(0, 15).to(torch.uint8)
    return q.view(n, k), scale, low16


def exact_q8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A float32 table as GGUF's Q8_0 holds it: int8 codes [N, K] and a scale per 32 inputs [N, K / 32] (an
    fp16 value, kept as float32 for the kernel), returned only where `scale * code` gives back every
    float32 value exactly (a Q8_0 checkpoint's own values do: the scale of a group is its largest
    magnitude / 127, as Q8_0 made it), else None. About a quarter of the bytes for the same bits: the
    exact head of logprobs (`kernels.CpuOps.gather_dot_q8`)."""
    n, k = weight.shape
    if weight.dtype != torch.float32 or k % INT4_GROUP:
        return None
    w = weight.view(n, k // INT4_GROUP, INT4_GROUP)
    scale = (w.abs().amax(dim=2) / 127).to(torch.float16)
    if not torch.isfinite(scale).all():
        return None
    step = torch.where(scale > 0, scale.float(), 1.0).unsqueeze(2)
    codes = torch.round(w / step).clamp(-127, 127)
    if not torch.equal(codes * scale.float().unsqueeze(2), w):
        return None
    return codes.to(torch.int8).view(n, k), scale.float()


def pack_q4(q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """Lay `quantize_q4`'s output out for `q4_linear` (layout: kernels/q4_linear.c): per block of 16
    outputs and group, 256 bytes of codes (q[4c + i] low nibble, q[16 + 4c + i] high), 16 scales, 16 mins."""
    n, k = q.shape
    blocks, groups = n // Q4_BLOCK, k // INT4_GROUP
    halves = q.view(blocks, Q4_BLOCK, groups, 2, 4, 4)  # (block, output, group, half, c, i)
    codes = (halves[:, :, :, 0] | (halves[:, :, :, 1] << 4)).permute(0, 2, 3, 1, 4)  # (block, group, c, output, i)

    def per_group(values: torch.Tensor) -> torch.Tensor:
        return values.view(blocks, Q4_BLOCK, groups).transpose(1, 2).contiguous().view(torch.uint8)

    return torch.cat([codes.reshape(blocks, groups, 256), per_group(scale), per_group(low)], dim=2).contiguous()


class QuantizedWeight:
    """A decode-row copy of a weight: int4 per group for the native `q4_linear` kernel where it is built,
    else int8 per channel or int4 per group for torch's CPU kernels. Every one of them computes each row
    on its own, so a row gets the same bits in any batch."""

    def __init__(self, weight: torch.Tensor, bits: int) -> None:
        self.bits = bits
        self.out_features = weight.shape[0]
        # Quantize from the weight as loaded (float32 keeps a GGUF's 4-bit grid exact).
        ops = cpu_ops() if bits == 4 else None
        q4 = quantize_q4(weight) if ops is not None else None
        self.native = ops if q4 is not None else None
        if q4 is not None:
            self.data, self.scales = pack_q4(*q4), None
        else:  # torch's kernels take bf16 activations and scales
            data, scales = quantize_int8(weight) if bits == 8 else quantize_int4(weight)
            self.data, self.scales = data, scales.to(torch.bfloat16)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.native is not None:
            out = torch.empty(x.shape[0], self.out_features, dtype=torch.float32)
            if not self.native.q4_linear(x.float(), self.data, out):
                raise RuntimeError(f"q4_linear refused a [{x.shape[0]}, {x.shape[1]}] input")
            return out.to(x.dtype)
        x16 = x.to(torch.bfloat16)
        if self.bits == 8:
            out = torch._weight_int8pack_mm(x16, self.data, self.scales)
        else:
            out = torch._weight_int4pack_mm_for_cpu(x16, self.data, INT4_GROUP, self.scales)
        return out.to(x.dtype)


class PackedLinear(nn.Module):
    """y = x @ W.T + b for the row-concatenation of several linears' W and b.

    `dense_dtype` is the dtype the dense weight is kept and multiplied in (default: the weight's own);
    inputs are cast to it and outputs back. With `weight_quant` "int8" or "int4", the first `decode_rows`
    rows of a call (tokens the model generated, one per request) use the quantized copy whatever their
    number, and the rest the dense weight: a row's kernel depends on its own request only.
    """

    def __init__(self, linears: Sequence[nn.Linear], weight_quant: str = "none",
                 dense_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if weight_quant not in WEIGHT_QUANTS:
            raise ValueError(f"weight_quant must be one of {WEIGHT_QUANTS}, not {weight_quant!r}")
        weight = torch.cat([lin.weight.detach() for lin in linears]) if len(linears) > 1 else linears[0].weight
        weight = weight.detach()
        biases = [lin.bias for lin in linears]
        if len({b is None for b in biases}) > 1:
            raise ValueError("cannot pack linears where only some have a bias")
        self.out_features = [lin.out_features for lin in linears]
        self.quant: QuantizedWeight | None = None
        # torch's weight-only kernels run on CPU, with bf16 activations (others are cast for the call).
        usable = weight.dtype in (torch.bfloat16, torch.float32) and weight.device.type == "cpu"
        # Both 4-bit kernels take whole blocks of 16 outputs and groups of 32 inputs.
        fits_int4 = weight.shape[0] % Q4_BLOCK == 0 and weight.shape[1] % INT4_GROUP == 0
        if usable and (weight_quant == "int8" or (weight_quant == "int4" and fits_int4)):
            self.quant = QuantizedWeight(weight, 8 if weight_quant == "int8" else 4)
        dense = weight.to(dense_dtype or weight.dtype)
        bias = torch.cat([b.detach() for b in biases]).to(dense.dtype) if biases[0] is not None else None
        self.register_buffer("bias", bias, persistent=False)
        self.dense_dtype = dense.dtype
        self.dense_features = dense.shape[0]
        self.packed: torch.Tensor | None = None
        self._native = cpu_ops() if dense.dtype in (torch.bfloat16, torch.float32) and dense.device.type == "cpu" \
            else None
        self._bias32 = bias.float().contiguous() if bias is not None and self._native is not None else None
        # float32 weights stay in their plain layout (dense_linear_plain): a head tied to the embedding
        # table keeps sharing its memory. bf16 ones are packed for VDPBF16PS.
        if self._native is not None and dense.dtype == torch.bfloat16:
            if self._bias32 is not None and dense.shape[0] % DENSE_BLOCK:
                self._bias32 = F.pad(self._bias32, (0, -dense.shape[0] % DENSE_BLOCK))
            # The packed copy replaces the plain weight: keeping both would hold the weights twice.
            self.packed = pack_dense(dense)
        elif self._native is not None and not dense.is_contiguous():
            dense = dense.contiguous()
        self.register_buffer("weight", None if self.packed is not None else dense, persistent=False)

    @property
    def int8(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return (self.quant.data, self.quant.scales) if self.quant is not None and self.quant.bits == 8 else None

    def forward(self, x: torch.Tensor, decode_rows: int = 0) -> torch.Tensor:
        if self.quant is None or decode_rows == 0:
            return self._dense(x)
        decode = self.quant.matmul(x[:decode_rows].contiguous())
        if self.bias is not None:
            decode = decode + self.bias.to(decode.dtype)
        if decode_rows == x.shape[0]:
            return decode
        return torch.cat([decode, self._dense(x[decode_rows:])])

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        xw = x.reshape(-1, k).to(self.dense_dtype)
        if self._native is not None and self.packed is None and self.weight is not None:  # float32, plain
            if xw.stride(-1) != 1:
                xw = xw.contiguous()
            out = torch.empty(xw.shape[0], self.dense_features, dtype=torch.float32)
            if not self._native.dense_linear_plain(xw, self.weight, self._bias32, out):
                raise RuntimeError(f"dense_linear_plain refused a [{xw.shape[0]}, {xw.shape[1]}] input")
        elif self._native is not None and self.packed is not None:
            if k % 2:  # the packed weight has a zero column there
                xw = F.pad(xw, (0, 1))
            if xw.stride(-1) != 1:
                xw = xw.contiguous()
            padded = self.packed.shape[0] * DENSE_BLOCK
            out = torch.empty(xw.shape[0], padded, dtype=torch.float32)
            if not self._native.dense_linear(xw, self.packed, self._bias32, out):
                raise RuntimeError(f"dense_linear refused a [{xw.shape[0]}, {xw.shape[1]}] input")
            if padded != self.dense_features:
                out = out[:, : self.dense_features]
        else:  # one row per call: every row runs the very call a batch of one runs
            weight = self.weight
            if weight is None:
                raise RuntimeError("PackedLinear: the dense weight is packed for a kernel that is not loaded")
            out = torch.cat([F.linear(row, weight, self.bias) for row in xw.split(1)]) if len(xw) else \
                F.linear(xw, weight, self.bias)
        return out.to(x.dtype).reshape(*lead, self.dense_features)  # -1 is ambiguous for 0 rows

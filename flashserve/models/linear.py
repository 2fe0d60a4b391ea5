"""Linear layers packed for serving: fused projections, batch-invariant bf16, optional int8 for decode.

Packing fuses projections that read the same input (Q/K/V, gate/up) into one matmul.

A decode step of a small model multiplies a few rows by every weight, so it is bound by the weight bytes
it reads: an int8 copy (one scale per output channel) halves them against bf16. Prompt rows are bound by
arithmetic instead, where the CPU's bf16 matrix units win. Which kernel a row uses is decided by the row's
own kind (decode or prompt), never by the batch size, so results stay batch-invariant.

bf16 weights are prepacked once into oneDNN's blocked layout (`_reorder_linear_weight`), which saves the
per-call reorder of a plain weight: ~30% less time per decode step. Packed for a batch of one, the kernel
computes every row on its own, so any batch gives each row the bits it would get alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

WEIGHT_QUANTS = ("none", "int8")
# Without prepacking, oneDNN's bf16 matmul gives every row the same bits as that row alone for batches of
# up to 32 rows, not beyond; unpacked bf16 batches therefore run in 32-row tiles. tests/unit/test_linear.py
# checks both properties on the machine at hand.
ROW_TILE = 32


def _can_prepack(weight: torch.Tensor) -> bool:
    return weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and torch.backends.mkldnn.is_available()


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: weight ≈ q * scale[:, None]; scale in the weight's dtype."""
    w = weight.float()
    # Round the scale to the weight's dtype first: quantizing with the scale the kernel will use keeps
    # every element within half a step.
    scale = (w.abs().amax(dim=1).clamp(min=1e-12) / 127.0).to(weight.dtype)
    q = torch.round(w / scale.float().unsqueeze(1)).clamp(-127, 127).to(torch.int8)
    return q, scale


class PackedLinear(nn.Module):
    """y = x @ W.T + b for the row-concatenation of several linears' W and b.

    With `weight_quant="int8"`, decode rows (the first `decode_rows` of the batch: one token per request)
    use the int8 copy whatever their number, and prompt rows the bf16 weights: a row's kernel depends on
    its own request only, never on the batch.
    """

    def __init__(self, linears: Sequence[nn.Linear], weight_quant: str = "none") -> None:
        super().__init__()
        if weight_quant not in WEIGHT_QUANTS:
            raise ValueError(f"weight_quant must be one of {WEIGHT_QUANTS}, not {weight_quant!r}")
        weight = torch.cat([lin.weight.detach() for lin in linears]) if len(linears) > 1 else linears[0].weight
        biases = [lin.bias for lin in linears]
        self.out_features = [lin.out_features for lin in linears]
        self.register_buffer("weight", weight.detach(), persistent=False)
        if len({b is None for b in biases}) > 1:
            raise ValueError("cannot pack linears where only some have a bias")
        bias = torch.cat([b.detach() for b in biases]) if biases[0] is not None else None
        self.register_buffer("bias", bias, persistent=False)
        self.int8: tuple[torch.Tensor, torch.Tensor] | None = None
        # torch's weight-only int8 kernel is fast with bf16 activations on CPU only.
        if weight_quant == "int8" and weight.dtype == torch.bfloat16 and weight.device.type == "cpu":
            self.int8 = quantize_int8(weight)
        self._tiled = weight.dtype in (torch.bfloat16, torch.float16)
        self.packed: torch.Tensor | None = None
        if _can_prepack(weight):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)

    def forward(self, x: torch.Tensor, decode_rows: int = 0) -> torch.Tensor:
        if self.int8 is None or decode_rows == 0:
            return self._dense(x)
        decode = self._int8(x[:decode_rows].contiguous())
        if decode_rows == x.shape[0]:
            return decode
        return torch.cat([decode, self._dense(x[decode_rows:])])

    def _int8(self, x: torch.Tensor) -> torch.Tensor:
        assert self.int8 is not None
        out = torch._weight_int8pack_mm(x, *self.int8)  # row-invariant: each row is its own dot products
        return out if self.bias is None else out + self.bias

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        if not self._tiled or x.shape[0] <= ROW_TILE:
            return F.linear(x, self.weight, self.bias)
        return torch.cat([F.linear(tile, self.weight, self.bias) for tile in x.split(ROW_TILE)])

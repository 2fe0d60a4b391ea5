"""The native decode path of a Llama model: every layer of a pure decode batch in one C call.

`LlamaModel.forward` hands a batch to `NativeLlamaDecoder` when every row decodes a generated token;
`kernels/llama_decode.c` then chains the same kernels the Python layers call, so a row's bits do not
depend on which path ran it. What the driver covers is checked once, when the decoder is built for a
KV cache: float32 activations and norms, a float32 or bf16 cache, and 4-bit native weights without
biases in every linear. Anything else (`build` returns None) stays on the Python path.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

import torch

from flashserve.kernels import CpuOps, DecodeDims, DecodeLayer, cpu_ops
from flashserve.models.layers import AttentionMetadata, LayerKVCache, RotaryEmbedding
from flashserve.models.linear import INT4_GROUP, Q4_BLOCK, PackedLinear

if TYPE_CHECKING:
    from flashserve.models.llama import LlamaModel

MAX_QUERY_GROUP = 16  # query heads per KV head that paged_decode takes
MAX_HEAD_DIM = 512


class NativeLlamaDecoder:
    def __init__(self, ops: CpuOps, layers: ctypes.Array[DecodeLayer], dims: DecodeDims,
                 rotary: RotaryEmbedding) -> None:
        self.ops, self.layers, self.dims, self.rotary = ops, layers, dims, rotary

    @classmethod
    def build(cls, model: LlamaModel, caches: list[LayerKVCache]) -> NativeLlamaDecoder | None:
        ops = cpu_ops()
        if ops is None or not _covers(model, caches):
            return None
        table = (DecodeLayer * len(caches))()
        for entry, layer, cache in zip(table, model.layers, caches, strict=True):
            attn, mlp = layer.self_attn, layer.mlp
            entry.qkv, entry.o = _q4(attn.qkv_proj).data_ptr(), _q4(attn.o_proj).data_ptr()
            entry.gate_up, entry.down = _q4(mlp.gate_up_proj).data_ptr(), _q4(mlp.down_proj).data_ptr()
            entry.input_norm = layer.input_layernorm.weight.data_ptr()
            entry.post_norm = layer.post_attention_layernorm.weight.data_ptr()
            entry.key_cache, entry.value_cache = cache.key.data_ptr(), cache.value.data_ptr()
        first = model.layers[0]
        dims = DecodeDims(model.norm.weight.shape[0], first.mlp.intermediate_size, first.self_attn.num_heads,
                          first.self_attn.num_kv_heads, first.self_attn.head_dim,
                          int(caches[0].key.dtype == torch.bfloat16), first.input_layernorm.eps, first.self_attn.scale)
        return cls(ops, table, dims, model.rotary_emb)

    def run(self, x: torch.Tensor, positions: torch.Tensor,
            meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings x [B, hidden] of B decode rows -> (last MLP output, residual stream)."""
        residual = torch.empty_like(x)
        self.ops.llama_decode_layers(self.layers, self.dims, x, residual, positions, meta.slot_mapping,
                                     meta.block_tables, meta.context_lens, meta.block_size, self.rotary.cos_half,
                                     self.rotary.sin_half)
        return x, residual


def _q4(linear: PackedLinear | None) -> torch.Tensor:
    # The table takes raw pointers: a linear without a native 4-bit copy must stop here, also under -O.
    if linear is None or linear.quant is None or linear.quant.native is None:
        raise ValueError("the native decode driver needs a packed 4-bit weight in every linear")
    return linear.quant.data


def _native_q4(linear: object) -> bool:
    return (isinstance(linear, PackedLinear) and linear.bias is None and linear.quant is not None
            and linear.quant.native is not None)


def _covers(model: LlamaModel, caches: list[LayerKVCache]) -> bool:
    first = model.layers[0].self_attn
    heads, kv_heads, head_dim = first.num_heads, first.num_kv_heads, first.head_dim
    hidden, inter = model.norm.weight.shape[0], model.layers[0].mlp.intermediate_size
    if (head_dim % INT4_GROUP or head_dim > MAX_HEAD_DIM or heads // kv_heads > MAX_QUERY_GROUP
            or hidden % INT4_GROUP or inter % INT4_GROUP or hidden % Q4_BLOCK):
        return False
    if model.embed_tokens.weight.dtype != torch.float32 or model.rotary_emb.cos_half.dtype != torch.float32:
        return False
    for layer, cache in zip(model.layers, caches, strict=True):
        attn, mlp = layer.self_attn, layer.mlp
        linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
        if not all(_native_q4(lin) for lin in linears):
            return False
        if any(n.dtype != torch.float32 or not n.is_contiguous() for n in norms):
            return False
        if any(t.dtype != caches[0].key.dtype or not t.is_contiguous() for t in (cache.key, cache.value)):
            return False
    return caches[0].key.dtype in (torch.float32, torch.bfloat16)

"""The Llama family (SmolLM2, the embedded default; Llama 2/3, Mistral-style dense models).

Owns the config dataclass and the module tree. Submodule names mirror Hugging Face's
`LlamaForCausalLM` exactly, so a `Checkpoint.state_dict` (always in HF names, whatever the file
format) loads without renaming, and the parity tests can load the same dict into transformers.

The forward pass takes the engine's flat token batch (many requests, prefill chunks and decodes
mixed) and returns final-normed hidden states; `compute_logits` is separate so the runner only
projects the rows it samples from (the last token of each request), not every prefill position.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from flashserve.kernels import CpuOps, cpu_ops
from flashserve.models.layers import (
    FULL_ATTENTION,
    AttentionMetadata,
    CacheSpec,
    LayerKVCache,
    RMSNorm,
    RotaryEmbedding,
    paged_attention,
    rotary_and_store,
    silu_and_mul,
)
from flashserve.models.linear import PackedLinear, exact_q8
from flashserve.models.llama_native import NativeLlamaDecoder

SUPPORTED_ROPE_SCALING = ("linear", "llama3")


@dataclass(slots=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    rope_scaling: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        assert self.vocab_size > 0 and self.hidden_size > 0 and self.intermediate_size > 0
        assert self.num_hidden_layers > 0 and self.max_position_embeddings > 0
        assert self.num_attention_heads > 0 and self.num_key_value_heads > 0
        assert self.num_attention_heads % self.num_key_value_heads == 0, (
            "query heads must group evenly over KV heads"
        )
        assert self.head_dim > 0 and self.head_dim % 2 == 0, "rotary needs an even head_dim"
        assert self.rms_norm_eps > 0 and self.rope_theta > 0
        if self.hidden_act != "silu":
            raise ValueError(f"Llama hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in SUPPORTED_ROPE_SCALING and kind != "default":
                supported = ", ".join(SUPPORTED_ROPE_SCALING)
                raise ValueError(f"rope_scaling type {kind!r} is not supported (supported: {supported})")

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> LlamaConfig:
        """From an HF-style config dict (`config.json`, or `Checkpoint.config` for either format)."""
        heads = int(config["num_attention_heads"])
        rope_theta = config.get("rope_theta")
        rope_scaling = config.get("rope_scaling")
        rope_parameters = config.get("rope_parameters")
        # transformers 5 folds rope_theta and the scaling into `rope_parameters`.
        if isinstance(rope_parameters, dict):
            rope_theta = rope_theta if rope_theta is not None else rope_parameters.get("rope_theta")
            if rope_scaling is None and rope_parameters.get("rope_type", "default") != "default":
                rope_scaling = {k: v for k, v in rope_parameters.items() if k != "rope_theta"}
        if rope_scaling is not None and rope_scaling.get("rope_type", rope_scaling.get("type")) == "default":
            rope_scaling = None
        return cls(
            vocab_size=int(config["vocab_size"]),
            hidden_size=int(config["hidden_size"]),
            intermediate_size=int(config["intermediate_size"]),
            num_hidden_layers=int(config["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or config["hidden_size"] // heads),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(config.get("attention_bias", False)),
            mlp_bias=bool(config.get("mlp_bias", False)),
            hidden_act=str(config.get("hidden_act", "silu")),
            rope_scaling=dict(rope_scaling) if rope_scaling else None,
        )


def rope_inv_freq(config: LlamaConfig) -> torch.Tensor:
    """Rotary inverse frequencies, with `rope_scaling` applied (same formulas as transformers)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    scaling = config.rope_scaling
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    if kind == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate in between.
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling.get("original_max_position_embeddings", config.max_position_embeddings))
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv_freq  # "default"; unsupported kinds were rejected by LlamaConfig


def build_rotary(config: LlamaConfig) -> RotaryEmbedding:
    """layers.RotaryEmbedding, with its cos/sin tables recomputed when the config scales rope."""
    rotary = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta)
    if config.rope_scaling:
        rotary.set_frequencies(rope_inv_freq(config), config.max_position_embeddings)
    return rotary


class LlamaAttention(nn.Module):
    """Loads as HF's separate q/k/v projections; `pack` fuses them into one `qkv_proj` for serving."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj: nn.Module = nn.Linear(self.num_heads * self.head_dim, hidden, bias=bias)
        self.qkv_proj: PackedLinear | None = None

    def pack(self, weight_quant: str, dense_dtype: torch.dtype | None) -> None:
        self.qkv_proj = PackedLinear([self.q_proj, self.k_proj, self.v_proj], weight_quant, dense_dtype)
        self.o_proj = PackedLinear([self.o_proj], weight_quant, dense_dtype)  # type: ignore[list-item]
        del self.q_proj, self.k_proj, self.v_proj

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rotary: RotaryEmbedding,
        cache: LayerKVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        assert self.qkv_proj is not None, "pack() the model before running it"
        qkv = self.qkv_proj.forward(x, meta.num_generated_rows)
        q = rotary_and_store(qkv, positions, rotary, cache, meta.slot_mapping, self.num_heads,
                             self.num_kv_heads, self.head_dim)
        out = paged_attention(q, cache, meta, self.scale)
        return self.o_proj.forward(out.view(x.shape[0], self.num_heads * self.head_dim), meta.num_generated_rows)


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        hidden, inter, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.intermediate_size = inter
        self.gate_proj = nn.Linear(hidden, inter, bias=bias)
        self.up_proj = nn.Linear(hidden, inter, bias=bias)
        self.down_proj: nn.Module = nn.Linear(inter, hidden, bias=bias)
        self.gate_up_proj: PackedLinear | None = None

    def pack(self, weight_quant: str, dense_dtype: torch.dtype | None) -> None:
        self.gate_up_proj = PackedLinear([self.gate_proj, self.up_proj], weight_quant, dense_dtype)
        self.down_proj = PackedLinear([self.down_proj], weight_quant, dense_dtype)  # type: ignore[list-item]
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor, decode_rows: int = 0) -> torch.Tensor:
        assert self.gate_up_proj is not None, "pack() the model before running it"
        return self.down_proj.forward(silu_and_mul(self.gate_up_proj.forward(x, decode_rows)), decode_rows)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        rotary: RotaryEmbedding,
        cache: LayerKVCache,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous layer's MLP output, not yet added to `residual` (the stream), which is None
        for the first layer (x is then the embeddings). The adds happen inside the norms, in place."""
        if residual is None:
            residual, h = x, self.input_layernorm.forward(x)
        else:
            h = self.input_layernorm.forward(x, residual)
        h = self.post_attention_layernorm.forward(self.self_attn.forward(h, positions, rotary, cache, meta), residual)
        return self.mlp.forward(h, meta.num_generated_rows), residual


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        weight = torch.empty(config.vocab_size, config.hidden_size)
        on_meta = weight.is_meta  # registry.build_model constructs on the meta device, then loads
        if not on_meta:
            # On meta, `normal_` would import torch._dynamo (~2 s) for values nobody reads.
            nn.init.normal_(weight)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=weight)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # One table for all layers; its buffers are not persistent, so they never enter the state dict
        # and no checkpoint can fill them: build them for real even when the rest is on meta.
        with torch.device("cpu") if on_meta else contextlib.nullcontext():
            self.rotary_emb = build_rotary(config)
        self._decoder_caches: list[LayerKVCache] | None = None  # what `_decoder`'s table points into
        self._decoder: NativeLlamaDecoder | None = None

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[LayerKVCache],
    ) -> torch.Tensor:
        assert len(kv_caches) == len(self.layers), "one LayerKVCache per layer"
        x, residual = self.embed_tokens(input_ids), None
        if meta.num_generated_rows == x.shape[0] and meta.decodes_lead:
            decoder = self._native_decoder(kv_caches)
            if decoder is not None:  # a pure decode batch: every layer in one native call
                x, residual = decoder.run(x, positions, meta)
                return self.norm(x, residual)
        for layer, cache in zip(self.layers, kv_caches, strict=True):
            # .forward skips nn.Module's call machinery (hooks we never use): ~1 ms per decode step.
            x, residual = layer.forward(x, residual, positions, self.rotary_emb, cache, meta)
        return self.norm(x, residual)

    def _native_decoder(self, kv_caches: list[LayerKVCache]) -> NativeLlamaDecoder | None:
        """The native decode driver for these caches, built on first use; None where it does not apply.
        The engine passes the same list of caches every step, so its identity is the check."""
        if kv_caches is not self._decoder_caches:
            self._decoder_caches, self._decoder = kv_caches, NativeLlamaDecoder.build(self, kv_caches)
        return self._decoder


# Candidates per row whose logits a low-precision head has rescored in float32 (see compute_logits).
REFINE_TOP_K = 8


class LlamaForCausalLM(nn.Module):
    config_class = LlamaConfig

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head: nn.Module = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.exact_head: torch.Tensor | None = None  # set by pack()
        self.exact_head_q8: tuple[torch.Tensor, torch.Tensor] | None = None  # set by pack()
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[LayerKVCache],
    ) -> torch.Tensor:
        """input_ids, positions: [T] -> final-normed hidden states [T, hidden]."""
        return self.model(input_ids, positions, meta, kv_caches)

    def compute_logits(self, hidden: torch.Tensor, decode_rows: int = 0) -> torch.Tensor:
        """[N, hidden] -> float32 logits [N, vocab]; the first `decode_rows` rows come from decode steps.

        Where the head runs in low precision, its bf16 output steps by 0.125 at logits near 25: enough
        to tie or swap the top tokens (SmolLM2's "The" and "L'" before "Paris" are 0.08 apart). The
        top `REFINE_TOP_K` candidates are therefore rescored exactly with the float32 weight, per row.
        """
        logits = self.lm_head.forward(hidden, decode_rows).float()
        exact = self.exact_head
        if exact is None:
            return logits
        k = min(REFINE_TOP_K, logits.shape[-1])
        ops = cpu_ops() if CpuOps.supports(logits) and logits.is_contiguous() else None
        top = ops.top_k_rows(logits, k) if ops is not None and len(logits) else None
        if top is None:
            top = logits.topk(k, dim=-1).indices
        h = hidden.to(exact.dtype).contiguous()
        if ops is not None and exact.dtype == torch.float32 and exact.is_contiguous():
            # One fixed-order dot per candidate (kernels/dense_linear.c): no row's sum depends on the batch.
            rescored = ops.gather_dot(exact, h, top.contiguous())
        else:
            # Torch's sum over the hidden dim may split a reduction across threads when there are few
            # outputs; one row per call keeps every row's reduction the one a batch of one gets.
            rescored = torch.cat([(exact[t] * r).sum(-1, keepdim=True).T for t, r in zip(top, h, strict=True)]) \
                if len(top) else top.float()
        return logits.scatter_(1, top, rescored.float())

    def exact_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> float32 logits [N, vocab] of the float32 head over the whole vocabulary: what
        logprobs are computed from (engine/logprobs.py), for the rows of requests that ask for them only.

        With a float32 head to rescore from, every entry is the same fixed-order dot as `compute_logits`'s
        rescoring gives its top candidates (the same kernel, so the same bits): the token greedy picks has
        the largest of these logits. Without one the head is exact already (float32, not quantized) or has
        no float32 weights to be exact with (a bf16 checkpoint): its dense (prompt-row) path is used.

        This reads the whole head once per row, so it is what logprobs cost the rest of a batch; a head
        that is a Q8_0 table is read from its int8 codes (`exact_head_q8`), a quarter of the bytes of
        float32, by a kernel that sums exactly as the float32 one does (the same bits).
        """
        exact = self.exact_head
        if exact is None:
            return self.lm_head.forward(hidden, 0).float()
        h = hidden.to(exact.dtype).contiguous()
        ops = cpu_ops() if CpuOps.supports(h) else None
        if ops is not None and exact.dtype == torch.float32 and exact.is_contiguous():
            every = torch.arange(exact.shape[0], dtype=torch.int64).expand(h.shape[0], -1).contiguous()
            if self.exact_head_q8 is not None:
                return ops.gather_dot_q8(*self.exact_head_q8, h, every)
            return ops.gather_dot(exact, h, every)
        # One row per call: a row's sums then never depend on the other rows (see compute_logits).
        return torch.cat([r.unsqueeze(0) @ exact.T for r in h]).float() if len(h) else h.new_zeros(0, exact.shape[0])

    def cache_specs(self) -> list[CacheSpec]:
        spec = CacheSpec(FULL_ATTENTION, self.config.num_key_value_heads, self.config.head_dim)
        return [spec] * self.config.num_hidden_layers

    def load_weights(self, state_dict: dict[str, torch.Tensor], weight_quant: str = "none",
                     dense_dtype: torch.dtype | None = None) -> None:
        """Adopt a checkpoint's tensors (no copy, taking them out of `state_dict`), check the names match
        exactly, then pack for serving.

        Works on a module built on the meta device: `assign=True` replaces every parameter (the rotary
        tables, which no checkpoint holds, are always built for real). `weight_quant` is one of
        `linear.WEIGHT_QUANTS`; `dense_dtype` the dtype of the dense matmul weights.
        """
        expected = set(self.state_dict())
        if self.config.tie_word_embeddings:
            expected.discard("lm_head.weight")
        missing, unexpected = expected - set(state_dict), set(state_dict) - expected
        if missing or unexpected:
            raise ValueError(
                f"checkpoint does not match the Llama model: missing {sorted(missing)[:8]}, "
                f"unexpected {sorted(unexpected)[:8]}"
            )
        self.load_state_dict(state_dict, strict=False, assign=True)
        # The modules hold the tensors now. Emptying the dict (the caller's: see the docstring) lets
        # packing free each float32 weight as soon as its packed forms exist, instead of all at the end.
        state_dict.clear()
        if self.config.tie_word_embeddings:
            # assign=True replaced the embedding Parameter; re-point the head at the new one.
            self.lm_head.weight = self.model.embed_tokens.weight
        self.pack(weight_quant, dense_dtype)

    def pack(self, weight_quant: str, dense_dtype: torch.dtype | None = None) -> None:
        """Fuse Q/K/V and gate/up, keep dense weights in `dense_dtype` (default: as loaded), and add
        quantized copies for decode rows (see `linear.PackedLinear`)."""
        for layer in self.model.layers:
            layer.self_attn.pack(weight_quant, dense_dtype)
            layer.mlp.pack(weight_quant, dense_dtype)
        head = self.lm_head
        if head.bias is not None:
            raise ValueError("the Llama head has no bias")
        exact = head.weight.dtype == torch.float32
        # The head picks the token: at 4 bits only with its top candidates rescored in float32 (below);
        # without a float32 head to rescore from, it stays at 8 bits.
        head_quant = "int8" if weight_quant == "int4" and not exact else weight_quant
        lossy = head_quant != "none" or (dense_dtype is not None and dense_dtype != head.weight.dtype)
        # A float32 head is the embedding table when tied (no extra memory); else the loaded head itself.
        self.exact_head = head.weight.detach() if lossy and exact else None
        # Where that float32 head is a Q8_0 table (the embedded GGUF's), logprobs read it from int8 codes:
        # the same bits from a quarter of the bytes (exact_logits).
        ops = cpu_ops()
        q8 = self.exact_head is not None and ops is not None and ops.gather_dot_q8_pays
        self.exact_head_q8 = exact_q8(self.exact_head) if q8 else None
        self.lm_head = PackedLinear([head], head_quant, dense_dtype)  # type: ignore[list-item]

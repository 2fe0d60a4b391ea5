"""DeepSeek-V4: the model behind the reference page, in PyTorch, with the official checkpoint's tensor names.

The architecture (facts: `shared/spec/deepseek-v4-architecture.md`):

- Attention is multi-query with one shared 512-d head that is both key and value. Queries are low-rank
  (`wq_a` -> RMSNorm -> `wq_b`, then a weightless RMSNorm per head). RoPE turns the trailing
  `rope_head_dim` channels as interleaved pairs, and the output's rope channels are turned back at the
  query's position. Each head has a learned sink logit in the softmax denominator. The output projection
  is grouped (`wo_a` per group of heads, then `wo_b`).
- Every layer attends over a sliding window. Compressed layers also attend over entries that a gated
  compressor makes from whole windows of tokens: CSA (ratio 4, overlapping windows of 8) through a
  lightning indexer that picks the top-k entries per query, HCA (ratio 128 in Flash) over every entry
  whose window has closed.
- The residual is 4 streams mixed by manifold-constrained hyper-connections (mHC): per block, weights
  collapse the streams into the block's input (pre), spread its output back (post), and mix the streams
  through a Sinkhorn-normalised matrix (comb).
- Every FFN is a mixture of experts plus a shared expert; the first layers route by token id.

The model runs on one sequence at a time, in chunks: `DeepseekV4ForCausalLM.forward(ids, start, state)`
extends a `SequenceState` (each layer's sliding window, compressor leftovers and compressed entries), so a
whole prompt in one call, the same prompt in chunks, and prefill followed by decode give the same logits.
Names are the official checkpoint's (`layers.N.attn.wq_a`, ...); `hf_to_official` maps a `transformers`
state dict onto them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flashserve.models.fp_formats import dequantize_fp4_groups, dequantize_fp8_blocks

SLIDING, CSA, HCA = "sliding", "csa", "hca"
_HF_LAYER_KINDS = {"sliding_attention": SLIDING, "compressed_sparse_attention": CSA,
                   "heavily_compressed_attention": HCA}


@dataclass(frozen=True)
class Yarn:
    """YaRN's frequency blend for the compressed layers' RoPE (the cos/sin are not rescaled: V4 sets the
    attention factor to 1)."""

    factor: float
    original_max_position: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0


@dataclass(frozen=True)
class DeepseekV4Config:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    rope_head_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    window: int
    layer_kinds: tuple[str, ...]  # SLIDING, CSA or HCA per layer
    compress_ratios: tuple[int, ...]  # 0 for sliding layers
    hash_layers: int  # layers [0, hash_layers) route by token id
    num_experts: int
    num_shared_experts: int
    experts_per_token: int
    moe_intermediate_size: int
    routed_scale: float
    swiglu_limit: float
    index_heads: int
    index_head_dim: int
    index_topk: int
    hc_mult: int
    hc_sinkhorn_iters: int
    hc_eps: float
    rope_theta: float
    compress_rope_theta: float
    yarn: Yarn | None
    norm_eps: float = 1e-6
    max_position: int = 1 << 20
    num_mtp_layers: int = 0
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1

    @classmethod
    def from_hf(cls, raw: dict[str, Any]) -> DeepseekV4Config:
        """From a checkpoint's config.json, as DeepSeek writes it (`compress_ratios`, `rope_scaling`,
        `num_hash_layers`, `qk_rope_head_dim`) or as `transformers` does (`layer_types`, `compress_rates`,
        `mlp_layer_types`, `rope_parameters`, `partial_rotary_factor`)."""
        c = dict(raw)
        n = int(c["num_hidden_layers"])
        head_dim = int(c.get("head_dim", 512))
        kinds, ratios = _layer_pattern(c, n)
        rope_dim = c.get("qk_rope_head_dim")
        if rope_dim is None:
            rope_dim = head_dim * float(c.get("partial_rotary_factor") or 64 / 512)
        mlp_types = c.get("mlp_layer_types")
        hash_layers = (sum(t == "hash_moe" for t in mlp_types) if mlp_types is not None
                       else int(c.get("num_hash_layers", 3)))
        if mlp_types is not None and list(mlp_types) != ["hash_moe"] * hash_layers + ["moe"] * (n - hash_layers):
            raise ValueError("DeepSeek-V4 expects hash-routed layers first: mlp_layer_types must be hash_moe*k + moe*")
        scoring = c.get("scoring_func", "sqrtsoftplus")
        if scoring != "sqrtsoftplus":
            raise ValueError(f"DeepSeek-V4 router scoring {scoring!r} is not supported (only sqrtsoftplus)")
        rope_theta, compress_theta, yarn = _rope(c)
        eos = c.get("eos_token_id", 1)
        return cls(
            vocab_size=int(c["vocab_size"]), hidden_size=int(c["hidden_size"]), num_layers=n,
            num_heads=int(c["num_attention_heads"]), head_dim=head_dim, rope_head_dim=int(rope_dim),
            q_lora_rank=int(c["q_lora_rank"]), o_groups=int(c["o_groups"]), o_lora_rank=int(c["o_lora_rank"]),
            window=int(c.get("sliding_window", 128)), layer_kinds=kinds, compress_ratios=ratios,
            hash_layers=hash_layers, num_experts=int(c["n_routed_experts"]),
            num_shared_experts=int(c.get("n_shared_experts", 1)), experts_per_token=int(c["num_experts_per_tok"]),
            moe_intermediate_size=int(c["moe_intermediate_size"]),
            routed_scale=float(c.get("routed_scaling_factor", 1.5)), swiglu_limit=float(c.get("swiglu_limit", 10.0)),
            index_heads=int(c.get("index_n_heads", 64)), index_head_dim=int(c.get("index_head_dim", 128)),
            index_topk=int(c.get("index_topk", 512)), hc_mult=int(c.get("hc_mult", 4)),
            hc_sinkhorn_iters=int(c.get("hc_sinkhorn_iters", 20)), hc_eps=float(c.get("hc_eps", 1e-6)),
            rope_theta=rope_theta, compress_rope_theta=compress_theta, yarn=yarn,
            norm_eps=float(c.get("rms_norm_eps", 1e-6)), max_position=int(c.get("max_position_embeddings", 1 << 20)),
            num_mtp_layers=int(c.get("num_nextn_predict_layers", 0)), bos_token_id=c.get("bos_token_id", 0),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
        )


def _layer_pattern(c: dict[str, Any], n: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
    if c.get("layer_types") is not None:
        rates = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128,
                 **(c.get("compress_rates") or {})}
        kinds = tuple(_HF_LAYER_KINDS[t] for t in c["layer_types"][:n])
        ratios = tuple(0 if k == SLIDING else int(rates[t]) for k, t in zip(kinds, c["layer_types"], strict=False))
    elif c.get("compress_ratios") is not None:
        # The official rule: ratio 4 is the overlapping, indexed kind; any other non-zero ratio is HCA.
        ratios = tuple(int(r) for r in c["compress_ratios"][:n])
        kinds = tuple(SLIDING if r == 0 else CSA if r == 4 else HCA for r in ratios)
    else:
        raise ValueError("DeepSeek-V4 config names no layer pattern (compress_ratios or layer_types)")
    if len(kinds) != n:
        raise ValueError(f"the layer pattern covers {len(kinds)} layers, the model has {n}")
    return kinds, ratios


def _rope(c: dict[str, Any]) -> tuple[float, float, Yarn | None]:
    params = c.get("rope_parameters")
    if isinstance(params, dict) and isinstance(params.get("compress"), dict):
        main, compress = params["main"], params["compress"]
        scaling = compress if compress.get("rope_type", "default") == "yarn" else None
        return float(main["rope_theta"]), float(compress["rope_theta"]), _yarn(scaling)
    scaling = c.get("rope_scaling") or (params if isinstance(params, dict) else None)
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) != "yarn":
        scaling = None
    return float(c.get("rope_theta", 10000.0)), float(c.get("compress_rope_theta", 160000.0)), _yarn(scaling)


def _yarn(scaling: dict[str, Any] | None) -> Yarn | None:
    if scaling is None:
        return None
    return Yarn(float(scaling["factor"]), int(scaling["original_max_position_embeddings"]),
                float(scaling.get("beta_fast") or 32), float(scaling.get("beta_slow") or 1))


# --------------------------------------------------------------------------------------------------
# Small pieces


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * rms_norm(x.float(), self.eps)


def inverse_frequencies(dim: int, theta: float, yarn: Yarn | None) -> torch.Tensor:
    """One frequency per rotated pair. With YaRN, low frequencies (many positions per turn) are divided by
    the factor, high ones kept, and a linear ramp in between over the dims the betas bound."""
    exponents = torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim
    base = 1.0 / theta**exponents
    if yarn is None:
        return base

    def dim_for(rotations: float) -> float:
        return dim * math.log(yarn.original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = max(math.floor(dim_for(yarn.beta_fast)), 0), min(math.ceil(dim_for(yarn.beta_slow)), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / ((high - low) or 0.001)).clamp(0, 1)
    keep = 1 - ramp  # the share of the original frequency
    return base / yarn.factor * (1 - keep) + base * keep


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved RoPE on the trailing 2 * cos.shape[-1] channels of x [..., T, (H,) D]; cos/sin [T, pairs]
    broadcast over any head axis between. Pass -sin to turn back."""
    rope = 2 * cos.shape[-1]
    head, tail = x[..., :-rope], x[..., -rope:].float()
    even, odd = tail[..., 0::2], tail[..., 1::2]
    while cos.dim() < even.dim():
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    turned = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)
    return torch.cat([head, turned.to(x.dtype)], dim=-1)


class Rope:
    """cos/sin tables by position for one frequency set."""

    def __init__(self, dim: int, theta: float, yarn: Yarn | None) -> None:
        self.inv_freq = inverse_frequencies(dim, theta, yarn)

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.float().unsqueeze(-1) * self.inv_freq
        return angles.cos(), angles.sin()


# --------------------------------------------------------------------------------------------------
# Per-sequence state


PAGE_ENTRIES = 64  # compressed entries per page


@dataclass
class EntryPages:
    """A compressor's entries, append-only, in pages of PAGE_ENTRIES rows.

    No page is ever written in place: a full page is final, and appending to the partial last one replaces
    it with a new tensor. So a copy of the state (a prefix-cache snapshot) shares every page with the
    original, and a sequence's snapshots cost one list of references each, not one copy of its entries.
    """

    pages: list[torch.Tensor] = field(default_factory=list)
    count: int = 0

    def append(self, rows: torch.Tensor) -> None:
        self.count += rows.shape[0]
        if self.pages and self.pages[-1].shape[0] < PAGE_ENTRIES:
            room = PAGE_ENTRIES - self.pages[-1].shape[0]
            self.pages[-1], rows = torch.cat([self.pages[-1], rows[:room]]), rows[room:]
        if rows.shape[0]:
            self.pages.extend(page.clone() for page in rows.split(PAGE_ENTRIES))

    def all(self, dim: int) -> torch.Tensor:
        """Every entry so far [count, dim]."""
        if not self.pages:
            return torch.zeros(0, dim)
        return self.pages[0] if len(self.pages) == 1 else torch.cat(self.pages)

    def copy(self) -> EntryPages:
        return EntryPages(list(self.pages), self.count)


@dataclass
class CompressorState:
    """What a compressor carries between chunks: projected rows of the unfinished window, the previous
    window's first-half rows (CSA overlap), and the entries made so far."""

    pending_kv: torch.Tensor | None = None
    pending_gate: torch.Tensor | None = None
    overlap_kv: torch.Tensor | None = None
    overlap_gate: torch.Tensor | None = None
    entries: EntryPages = field(default_factory=EntryPages)
    windows: int = 0  # whole windows compressed so far

    def copy(self) -> CompressorState:
        return CompressorState(*(_clone(t) for t in (self.pending_kv, self.pending_gate, self.overlap_kv,
                                                     self.overlap_gate)), self.entries.copy(), self.windows)


@dataclass
class LayerState:
    window_kv: torch.Tensor | None = None  # the last `window` K=V rows (after RoPE)
    compressor: CompressorState = field(default_factory=CompressorState)
    indexer: CompressorState = field(default_factory=CompressorState)

    def copy(self) -> LayerState:
        return LayerState(_clone(self.window_kv), self.compressor.copy(), self.indexer.copy())


@dataclass
class SequenceState:
    """Everything one sequence's later tokens need from its earlier ones."""

    layers: list[LayerState]
    length: int = 0

    @classmethod
    def empty(cls, num_layers: int) -> SequenceState:
        return cls([LayerState() for _ in range(num_layers)])

    def copy(self) -> SequenceState:
        """An independent copy (a prefix-cache snapshot): later chunks extend one without touching the other."""
        return SequenceState([layer.copy() for layer in self.layers], self.length)

    def tensors(self) -> Iterator[torch.Tensor]:
        """Every tensor the state holds (copies share entry pages: a byte count goes by storage)."""
        for layer in self.layers:
            if layer.window_kv is not None:
                yield layer.window_kv
            for comp in (layer.compressor, layer.indexer):
                yield from (t for t in (comp.pending_kv, comp.pending_gate, comp.overlap_kv, comp.overlap_gate)
                            if t is not None)
                yield from comp.entries.pages


def _clone(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.clone()


def _cat(old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    return new if old is None else torch.cat([old, new])


# --------------------------------------------------------------------------------------------------
# Attention


class Compressor(nn.Module):
    """Gated pooling of whole windows of `ratio` tokens into one `dim`-wide entry each.

    Per channel, the window's rows are weighted by a softmax of their gates (plus a learned bias by slot),
    summed, RMS-normalised and rotated at the window's first position. With `overlap` (CSA), each entry
    also pools the previous window: every token projects two rows, one for its own window's entry and one
    for the next one's, so entries span 8 tokens at a stride of 4.
    """

    def __init__(self, hidden: int, dim: int, ratio: int, overlap: bool, eps: float) -> None:
        super().__init__()
        self.dim, self.ratio, self.overlap = dim, ratio, overlap
        width = dim * (2 if overlap else 1)
        self.wkv = nn.Linear(hidden, width, bias=False)
        self.wgate = nn.Linear(hidden, width, bias=False)
        self.ape = nn.Parameter(torch.zeros(ratio, width))
        self.norm = RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, state: CompressorState, rope: Rope) -> torch.Tensor:
        """Append the entries of the windows x completes; returns all entries so far [n, dim]."""
        kv, gate = _cat(state.pending_kv, self.wkv(x)), _cat(state.pending_gate, self.wgate(x))
        n = kv.shape[0] // self.ratio
        used = n * self.ratio
        state.pending_kv, state.pending_gate = kv[used:].clone(), gate[used:].clone()  # not views of the chunk
        if n:
            kv = kv[:used].view(n, self.ratio, -1)
            gate = gate[:used].view(n, self.ratio, -1) + self.ape
            if self.overlap:
                kv, gate = self._with_previous_windows(kv, gate, state)
            pooled = (kv * gate.softmax(dim=1)).sum(dim=1)
            positions = (torch.arange(n) + state.windows) * self.ratio
            state.entries.append(rotate(self.norm(pooled), *rope(positions)))
            state.windows += n
        return state.entries.all(self.dim)

    def _with_previous_windows(self, kv: torch.Tensor, gate: torch.Tensor,
                               state: CompressorState) -> tuple[torch.Tensor, torch.Tensor]:
        """[n, ratio, 2 * dim] rows -> [n, 2 * ratio, dim]: the previous window's first halves, then this
        window's second halves. Before the first window the missing half weighs nothing (-inf gates)."""
        d = self.dim
        prev_kv = torch.cat([_or_zeros(state.overlap_kv, kv[:1, :, :d]), kv[:-1, :, :d]])
        prev_gate = torch.cat([_or_fill(state.overlap_gate, gate[:1, :, :d], float("-inf")), gate[:-1, :, :d]])
        state.overlap_kv, state.overlap_gate = kv[-1:, :, :d], gate[-1:, :, :d]
        return torch.cat([prev_kv, kv[:, :, d:]], dim=1), torch.cat([prev_gate, gate[:, :, d:]], dim=1)


def _or_zeros(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if t is None else t


def _or_fill(t: torch.Tensor | None, like: torch.Tensor, value: float) -> torch.Tensor:
    return torch.full_like(like, value) if t is None else t


class Indexer(nn.Module):
    """CSA's lightning indexer: scores every compressed entry for each query as sum over heads of
    w_h * ReLU(q_h . k), with its own compressor for the keys, and keeps the top k entries."""

    def __init__(self, cfg: DeepseekV4Config, ratio: int) -> None:
        super().__init__()
        self.heads, self.dim, self.topk, self.ratio = cfg.index_heads, cfg.index_head_dim, cfg.index_topk, ratio
        self.wq_b = nn.Linear(cfg.q_lora_rank, self.heads * self.dim, bias=False)
        self.weights_proj = nn.Linear(cfg.hidden_size, self.heads, bias=False)
        self.compressor = Compressor(cfg.hidden_size, self.dim, ratio, overlap=True, eps=cfg.norm_eps)

    def forward(self, x: torch.Tensor, q_low: torch.Tensor, positions: torch.Tensor, state: CompressorState,
                rope: Rope) -> torch.Tensor:
        """Selected entry indices [T, k], -1 where fewer than k entries are visible to the query."""
        keys = self.compressor(x, state, rope)
        if keys.shape[0] == 0:
            return torch.full((x.shape[0], 0), -1, dtype=torch.long)
        q = rotate(self.wq_b(q_low).view(-1, self.heads, self.dim), *rope(positions))
        scores = F.relu(torch.einsum("thd,nd->thn", q.float(), keys.float())) * self.dim**-0.5
        weights = self.weights_proj(x).float() * self.heads**-0.5
        scores = (scores * weights.unsqueeze(-1)).sum(dim=1)  # [T, n]
        visible = _visible_entries(positions, self.ratio, keys.shape[0])
        top = scores.masked_fill(~visible, float("-inf")).topk(min(self.topk, keys.shape[0]), dim=-1).indices
        return torch.where(visible.gather(1, top), top, torch.full_like(top, -1))


def _visible_entries(positions: torch.Tensor, ratio: int, n: int) -> torch.Tensor:
    """[T, n]: the query at position t sees entry i once its window has closed, i < (t + 1) // ratio."""
    return torch.arange(n).unsqueeze(0) < ((positions + 1) // ratio).unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, cfg: DeepseekV4Config, layer: int) -> None:
        super().__init__()
        backbone = layer < cfg.num_layers  # the MTP block, past the backbone, attends over its window only
        self.cfg = cfg
        self.kind = cfg.layer_kinds[layer] if backbone else SLIDING
        self.ratio = cfg.compress_ratios[layer] if backbone else 0
        h, d = cfg.num_heads, cfg.head_dim
        self.wq_a = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
        self.wq_b = nn.Linear(cfg.q_lora_rank, h * d, bias=False)
        self.wkv = nn.Linear(cfg.hidden_size, d, bias=False)
        self.kv_norm = RMSNorm(d, cfg.norm_eps)
        self.wo_a = nn.Linear(h * d // cfg.o_groups, cfg.o_groups * cfg.o_lora_rank, bias=False)
        self.wo_b = nn.Linear(cfg.o_groups * cfg.o_lora_rank, cfg.hidden_size, bias=False)
        self.attn_sink = nn.Parameter(torch.zeros(h))
        if self.kind != SLIDING:
            self.compressor = Compressor(cfg.hidden_size, d, self.ratio, overlap=self.kind == CSA, eps=cfg.norm_eps)
        if self.kind == CSA:
            self.indexer = Indexer(cfg, self.ratio)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, state: LayerState,
                ropes: dict[str, Rope]) -> torch.Tensor:
        cfg = self.cfg
        rope = ropes["main" if self.kind == SLIDING else "compress"]
        cos, sin = rope(positions)
        q_low = self.q_norm(self.wq_a(x))
        q = rotate(rms_norm(self.wq_b(q_low).view(-1, cfg.num_heads, cfg.head_dim), cfg.norm_eps), cos, sin)
        kv = rotate(self.kv_norm(self.wkv(x)), cos, sin)  # [T, D]: the one head's key and value

        keys = _cat(state.window_kv, kv)
        first = int(positions[0]) - (keys.shape[0] - kv.shape[0])  # the position of keys[0]
        key_pos = torch.arange(keys.shape[0]) + first
        back = positions.unsqueeze(1) - key_pos.unsqueeze(0)  # how far each key lies behind each query
        allowed = (back >= 0) & (back < cfg.window)
        state.window_kv = keys[-cfg.window:].clone()
        if self.kind != SLIDING:
            entries = self.compressor(x, state.compressor, rope)
            if self.kind == CSA:
                picks = self.indexer(x, q_low, positions, state.indexer, rope)
                chosen = torch.zeros(x.shape[0], entries.shape[0] + 1, dtype=torch.bool)
                chosen.scatter_(1, torch.where(picks >= 0, picks, entries.shape[0]), True)
                seen = chosen[:, :-1]
            else:
                seen = _visible_entries(positions, self.ratio, entries.shape[0])
            keys = torch.cat([keys, entries])
            allowed = torch.cat([allowed, seen], dim=1)
        out = _sink_attention(q, keys, allowed, self.attn_sink, cfg.head_dim**-0.5)
        out = rotate(out, cos, -sin)  # the values carried RoPE: turn it back at the query's position
        grouped = out.reshape(-1, cfg.o_groups, cfg.num_heads * cfg.head_dim // cfg.o_groups)
        w = self.wo_a.weight.view(cfg.o_groups, cfg.o_lora_rank, -1)
        mixed = torch.einsum("tgi,goi->tgo", grouped, w).flatten(1)
        return self.wo_b(mixed)


def _sink_attention(q: torch.Tensor, kv: torch.Tensor, allowed: torch.Tensor, sink: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """q [T, H, D] over the shared key/value rows kv [N, D], where allowed [T, N]; each head's sink logit
    joins the softmax's denominator and nothing else."""
    logits = torch.einsum("thd,nd->thn", q, kv) * scale
    logits = logits.masked_fill(~allowed.unsqueeze(1), float("-inf"))
    sinks = sink.view(1, -1, 1).expand(logits.shape[0], -1, 1)
    both = torch.cat([logits, sinks.to(logits.dtype)], dim=-1)
    probs = (both - both.amax(dim=-1, keepdim=True)).softmax(dim=-1)[..., :-1]
    return torch.einsum("thn,nd->thd", probs, kv)


# --------------------------------------------------------------------------------------------------
# Mixture of experts


class Expert(nn.Module):
    """SwiGLU with its pre-activations clamped (the gate from above, the up projection both ways)."""

    def __init__(self, hidden: int, inter: int, limit: float) -> None:
        super().__init__()
        self.w1 = nn.Linear(hidden, inter, bias=False)
        self.w2 = nn.Linear(inter, hidden, bias=False)
        self.w3 = nn.Linear(hidden, inter, bias=False)
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.w1(x).clamp(max=self.limit)
        return self.w2(F.silu(gate) * self.w3(x).clamp(-self.limit, self.limit))


class Gate(nn.Module):
    """Router: scores sqrt(softplus(x W)). Learned layers pick the top k of score + correction bias (the
    bias steers selection only); hash layers take the experts `tid2eid` lists for the token. The chosen
    scores are renormalised and scaled."""

    def __init__(self, cfg: DeepseekV4Config, hashed: bool) -> None:
        super().__init__()
        self.k, self.scale, self.hashed = cfg.experts_per_token, cfg.routed_scale, hashed
        self.weight = nn.Parameter(torch.zeros(cfg.num_experts, cfg.hidden_size))
        if hashed:
            self.register_buffer("tid2eid", torch.zeros(cfg.vocab_size, cfg.experts_per_token, dtype=torch.long))
        else:
            self.bias = nn.Parameter(torch.zeros(cfg.num_experts))

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = F.softplus(F.linear(x.float(), self.weight.float())).sqrt()
        experts = self._hashed(ids) if self.hashed else (scores + self.bias.float()).topk(self.k, dim=-1).indices
        weights = scores.gather(1, experts)
        return experts, weights / (weights.sum(dim=-1, keepdim=True) + 1e-20) * self.scale

    def _hashed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tid2eid[ids].long()


class MoE(nn.Module):
    def __init__(self, cfg: DeepseekV4Config, layer: int) -> None:
        super().__init__()
        self.gate = Gate(cfg, hashed=layer < cfg.hash_layers)
        self.experts = nn.ModuleList(Expert(cfg.hidden_size, cfg.moe_intermediate_size, cfg.swiglu_limit)
                                     for _ in range(cfg.num_experts))
        self.shared_experts = Expert(cfg.hidden_size, cfg.moe_intermediate_size * cfg.num_shared_experts,
                                     cfg.swiglu_limit)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        experts, weights = self.gate(x, ids)
        out = self.shared_experts(x)
        for e in experts.unique().tolist():
            rows, slot = (experts == e).nonzero(as_tuple=True)
            out = out.index_add(0, rows, self.experts[e](x[rows]) * weights[rows, slot].unsqueeze(1).to(x.dtype))
        return out


# --------------------------------------------------------------------------------------------------
# Hyper-connections and the model


def hc_weights(streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
               cfg: DeepseekV4Config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From streams [T, n, D]: the block input (streams collapsed by `pre`), `post` [T, n] and `comb` [T, n, n]
    (Sinkhorn-normalised towards a doubly stochastic matrix)."""
    n = cfg.hc_mult
    mixes = F.linear(rms_norm(streams.flatten(1).float(), cfg.norm_eps), fn.float())
    pre = torch.sigmoid(mixes[:, :n] * scale[0] + base[:n]) + cfg.hc_eps
    post = 2 * torch.sigmoid(mixes[:, n:2 * n] * scale[1] + base[n:2 * n])
    comb = torch.softmax(mixes[:, 2 * n:].view(-1, n, n) * scale[2] + base[2 * n:].view(n, n), dim=-1) + cfg.hc_eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + cfg.hc_eps)
    for _ in range(cfg.hc_sinkhorn_iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + cfg.hc_eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + cfg.hc_eps)
    collapsed = (pre.unsqueeze(-1) * streams).sum(dim=1).to(streams.dtype)
    return collapsed, post, comb


def hc_merge(streams: torch.Tensor, out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """Stream k becomes post_k * out + sum_j comb[j, k] * stream j."""
    mixed = torch.einsum("tjk,tjd->tkd", comb.to(streams.dtype), streams)
    return post.unsqueeze(-1).to(out.dtype) * out.unsqueeze(1) + mixed


class Block(nn.Module):
    def __init__(self, cfg: DeepseekV4Config, layer: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.attn = Attention(cfg, layer)
        self.ffn = MoE(cfg, layer)
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        mix = (2 + cfg.hc_mult) * cfg.hc_mult
        for part in ("attn", "ffn"):
            self.register_parameter(f"hc_{part}_fn", nn.Parameter(torch.zeros(mix, cfg.hc_mult * cfg.hidden_size)))
            self.register_parameter(f"hc_{part}_base", nn.Parameter(torch.zeros(mix)))
            self.register_parameter(f"hc_{part}_scale", nn.Parameter(torch.ones(3)))

    def forward(self, streams: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor, state: LayerState,
                ropes: dict[str, Rope]) -> torch.Tensor:
        x, post, comb = hc_weights(streams, self.hc_attn_fn, self.hc_attn_base, self.hc_attn_scale, self.cfg)
        streams = hc_merge(streams, self.attn(self.attn_norm(x), positions, state, ropes), post, comb)
        x, post, comb = hc_weights(streams, self.hc_ffn_fn, self.hc_ffn_base, self.hc_ffn_scale, self.cfg)
        return hc_merge(streams, self.ffn(self.ffn_norm(x), ids), post, comb)


class MTPBlock(Block):
    """The multi-token-prediction block: from the backbone's final streams at position t and the embedding
    of token t + 1, a full block predicts token t + 2. It shares the embedding and head; it is loaded and
    kept for speculative decoding (`DeepseekV4ForCausalLM.draft`)."""

    def __init__(self, cfg: DeepseekV4Config, layer: int) -> None:
        super().__init__(cfg, layer)
        h = cfg.hidden_size
        self.e_proj = nn.Linear(h, h, bias=False)
        self.h_proj = nn.Linear(h, h, bias=False)
        self.enorm = RMSNorm(h, cfg.norm_eps)
        self.hnorm = RMSNorm(h, cfg.norm_eps)
        self.norm = RMSNorm(h, cfg.norm_eps)
        self.hc_head_fn = nn.Parameter(torch.zeros(cfg.hc_mult, cfg.hc_mult * h))
        self.hc_head_base = nn.Parameter(torch.zeros(cfg.hc_mult))
        self.hc_head_scale = nn.Parameter(torch.ones(1))


class DeepseekV4ForCausalLM(nn.Module):
    config_class = DeepseekV4Config
    # The engine runs this model per sequence over a `SequenceState` (engine/state_runner.py: its family in
    # models/registry.py names that runner), and caches prefixes in whole units of 128 tokens: the longest
    # compressor window, so a snapshot at a unit's end has no compressed entry half made.
    prefix_unit = 128

    def __init__(self, cfg: DeepseekV4Config) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.hc_head_fn = nn.Parameter(torch.zeros(cfg.hc_mult, cfg.hc_mult * cfg.hidden_size))
        self.hc_head_base = nn.Parameter(torch.zeros(cfg.hc_mult))
        self.hc_head_scale = nn.Parameter(torch.ones(1))
        self.mtp = nn.ModuleList(MTPBlock(cfg, cfg.num_layers + i) for i in range(cfg.num_mtp_layers))
        self.ropes = {"main": Rope(cfg.rope_head_dim, cfg.rope_theta, None),
                      "compress": Rope(cfg.rope_head_dim, cfg.compress_rope_theta, cfg.yarn)}

    def new_state(self) -> SequenceState:
        return SequenceState.empty(self.config.num_layers)

    def snapshot_bytes_per_token(self) -> int:
        """What prefix-state copies cost per cached token, one copy every `prefix_unit` tokens: each copy
        holds every layer's window, the compressors' overlap rows and its partial last entry page of its
        own, and shares the full entry pages (one row per `ratio` tokens, plus the indexer's on CSA layers)
        with the copies before it."""
        cfg = self.config
        itemsize = self.embed.weight.element_size()
        per_copy = per_token = 0.0
        for kind, ratio in zip(cfg.layer_kinds, cfg.compress_ratios, strict=True):
            per_copy += cfg.window * cfg.head_dim * itemsize
            if not ratio:
                continue
            dims = (cfg.head_dim, cfg.index_head_dim) if kind == CSA else (cfg.head_dim,)
            entries = self.prefix_unit // ratio  # per unit
            partial = sum(k * entries % PAGE_ENTRIES for k in range(PAGE_ENTRIES)) / PAGE_ENTRIES  # mean rows
            for dim in dims:
                per_token += dim * itemsize / ratio
                per_copy += partial * dim * itemsize
                if kind == CSA:  # overlapping windows: the last window's first-half kv and gate rows
                    per_copy += 2 * ratio * dim * itemsize
        return max(1, math.ceil(per_token + per_copy / self.prefix_unit))

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, state: SequenceState | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits [T, vocab] (or [1, vocab] for the last token alone) for the next T tokens `ids` of the
        sequence `state` holds (a fresh one when None); `state` is extended in place."""
        streams = self.streams(ids, state)
        if last_only:
            streams = streams[-1:]
        return self.head(self.norm(self._collapse(streams, self)))

    @torch.inference_mode()
    def streams(self, ids: torch.Tensor, state: SequenceState | None = None) -> torch.Tensor:
        """The backbone's final residual streams [T, hc_mult, hidden] (what the head and the MTP block read)."""
        state = state or self.new_state()
        positions = torch.arange(ids.shape[0]) + state.length
        x = self.embed(ids)
        streams = x.unsqueeze(1).expand(-1, self.config.hc_mult, -1).contiguous()
        for layer, layer_state in zip(self.layers, state.layers, strict=True):
            streams = layer(streams, ids, positions, layer_state, self.ropes)
        state.length += ids.shape[0]
        return streams

    @torch.inference_mode()
    def draft(self, streams: torch.Tensor, next_ids: torch.Tensor, start: int, state: LayerState) -> torch.Tensor:
        """The MTP block's logits [T, vocab] for the tokens after `next_ids`, from the backbone streams of the
        T positions before them (positions start.., the block's own window in `state`)."""
        mtp = self.mtp[0]
        positions = torch.arange(next_ids.shape[0]) + start
        e = mtp.e_proj(mtp.enorm(self.embed(next_ids))).unsqueeze(1)
        x = mtp(e + mtp.h_proj(mtp.hnorm(streams)), next_ids, positions, state, self.ropes)
        return self.head(mtp.norm(self._collapse(x, mtp)))

    def _collapse(self, streams: torch.Tensor, owner: nn.Module) -> torch.Tensor:
        """The final mix of the streams (pre weights only), with `owner`'s hc_head parameters."""
        fn, base, scale = owner.hc_head_fn, owner.hc_head_base, owner.hc_head_scale
        mixes = F.linear(rms_norm(streams.flatten(1).float(), self.config.norm_eps), fn.float())
        pre = torch.sigmoid(mixes * scale.float()[0] + base.float()) + self.config.hc_eps
        return (pre.unsqueeze(-1) * streams).sum(dim=1).to(streams.dtype)

    def load_weights(self, state_dict: dict[str, torch.Tensor], weight_quant: str = "none",
                     dense_dtype: torch.dtype | None = None) -> None:
        """Adopt a checkpoint's float tensors (official names, or transformers' layout), checking the names
        match exactly. The engine has no FP8/FP4 kernels yet, so `weight_quant` and `dense_dtype` are not
        applied: the loader has dequantized the official formats (`dequantize_checkpoint`)."""
        if any(name.startswith(("model.", "lm_head.")) for name in state_dict):
            state_dict = hf_to_official(state_dict, self.config)
        if not any(name.startswith("mtp.") for name in state_dict):
            self.mtp = nn.ModuleList()  # transformers drops the MTP block: such a checkpoint cannot draft
        expected = set(self.state_dict())
        missing, unexpected = expected - set(state_dict), set(state_dict) - expected
        if missing or unexpected:
            raise ValueError(f"checkpoint does not match the DeepSeek-V4 model: missing {sorted(missing)[:8]}, "
                             f"unexpected {sorted(unexpected)[:8]}")
        self.load_state_dict(state_dict, strict=True, assign=True)


def dequantize_checkpoint(raw: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The official checkpoint's tensors in `dtype`: FP8 weights (float8_e4m3fn, a `.scale` per 128x128
    block) and FP4 ones (int8 pairs, a `.scale` per 1x32) decoded with their E8M0 scales; other floats cast;
    integer tables (`tid2eid`) kept."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in raw.items():
        if name.endswith(".scale"):
            if name[: -len("scale")] + "weight" not in raw:
                raise ValueError(f"{name} scales no weight")
            continue
        scale = raw.get(name[: -len("weight")] + "scale") if name.endswith(".weight") else None
        if scale is not None:
            if tensor.dtype == torch.float8_e4m3fn:
                tensor = dequantize_fp8_blocks(tensor, scale)
            elif tensor.dtype in (torch.int8, torch.uint8):
                tensor = dequantize_fp4_groups(tensor, scale)
            else:
                raise ValueError(f"{name}: a scaled weight must be FP8 (float8_e4m3fn) or packed FP4 (int8), "
                                 f"not {tensor.dtype}")
        elif tensor.dtype in (torch.float8_e4m3fn, torch.float8_e8m0fnu):
            raise ValueError(f"{name} is {tensor.dtype} without a scale")
        out[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return out


# --------------------------------------------------------------------------------------------------
# transformers' layout -> the official names

_HF_RENAMES: list[tuple[str, str]] = [
    (r"^model\.embed_tokens\.", "embed."), (r"^lm_head\.", "head."), (r"^model\.norm\.", "norm."),
    (r"^model\.hc_head\.hc_(fn|base|scale)$", r"hc_head_\1"), (r"^model\.layers\.", "layers."),
    (r"\.self_attn\.compressor\.indexer\.scorer\.weights_proj\.", ".attn.indexer.weights_proj."),
    (r"\.self_attn\.compressor\.indexer\.q_b_proj\.", ".attn.indexer.wq_b."),
    (r"\.self_attn\.compressor\.indexer\.", ".attn.indexer.compressor."),
    (r"\.self_attn\.", ".attn."), (r"\.mlp\.", ".ffn."),
    (r"\.input_layernorm\.", ".attn_norm."), (r"\.post_attention_layernorm\.", ".ffn_norm."),
    (r"\.attn_hc\.(fn|base|scale)$", r".hc_attn_\1"), (r"\.ffn_hc\.(fn|base|scale)$", r".hc_ffn_\1"),
    (r"\.sinks$", ".attn_sink"), (r"\.q_a_proj\.", ".wq_a."), (r"\.q_a_norm\.", ".q_norm."),
    (r"\.q_b_proj\.", ".wq_b."), (r"\.kv_proj\.", ".wkv."), (r"\.gate_proj\.", ".wgate."),
    (r"\.o_a_proj\.", ".wo_a."), (r"\.o_b_proj\.", ".wo_b."), (r"\.position_bias$", ".ape"),
    (r"\.gate\.e_score_correction_bias$", ".gate.bias"),
    # save_pretrained maps most names back to the official ones, but turns the main attention's kv_norm
    # into "norm" (its reverse of the compressor rule): only the compressors' norms are called that.
    (r"^(layers\.\d+)\.attn\.norm\.", r"\1.attn.kv_norm."),
]
_HF_COMPRESSOR_NORM = re.compile(r"\.compressor\.kv_norm\.|\.indexer\.compressor\.kv_norm\.")


def hf_to_official(state: dict[str, torch.Tensor], cfg: DeepseekV4Config) -> dict[str, torch.Tensor]:
    """Rename a `transformers` DeepseekV4ForCausalLM state dict to the official names, splitting the
    stacked expert tensors into per-expert w1/w3 (gate, up) and w2 (down). Takes both the module's own
    names and the mostly-official ones its `save_pretrained` writes (with a `model.` prefix)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if ".mlp.experts." in name:
            _split_experts(name, tensor, cfg, out)
            continue
        if ".shared_experts." in name:
            name = name.replace(".gate_proj.", ".w1.").replace(".up_proj.", ".w3.").replace(".down_proj.", ".w2.")
        for pattern, repl in _HF_RENAMES:
            name = re.sub(pattern, repl, name)
        name = _HF_COMPRESSOR_NORM.sub(lambda m: m.group(0).replace("kv_norm", "norm"), name)
        out[name] = tensor
    return out


def _split_experts(name: str, tensor: torch.Tensor, cfg: DeepseekV4Config, out: dict[str, torch.Tensor]) -> None:
    layer = re.match(r"model\.layers\.(\d+)\.", name)
    if layer is None:
        raise ValueError(f"unexpected expert tensor {name}")
    prefix = f"layers.{layer.group(1)}.ffn.experts"
    for e in range(cfg.num_experts):
        if name.endswith("gate_up_proj"):
            gate, up = tensor[e].chunk(2, dim=0)
            out[f"{prefix}.{e}.w1.weight"], out[f"{prefix}.{e}.w3.weight"] = gate, up
        elif name.endswith("down_proj"):
            out[f"{prefix}.{e}.w2.weight"] = tensor[e]
        else:
            raise ValueError(f"unexpected expert tensor {name}")

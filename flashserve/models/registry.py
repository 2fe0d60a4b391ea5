"""Architecture name -> `ModelFamily`: everything that differs between model families, in one object.

A family bundles the model class, the runner the engine drives it with, its memory accounting (block size,
KV blocks and prefix-state bytes from the one memory setting), its chat template or encoder, its tool-call
format and parser, the grammar format of forced calls, and its reasoning spec. `build_model` turns a
`Checkpoint` into the family's ready eval-mode module.

Layering: `models/` sits below `engine/` and `chat/`, so the family names the pieces those layers own
instead of importing them: `runner` is a key of `engine/engine.py: RUNNERS`; `template`, `tool_format`,
`grammar_format` and `reasoning` are keys of `chat/formats.py` (which builds the template, the parser,
the grammar's call syntax and the `ReasoningSpec` with its end-of-thinking tokens). What the model layer
owns itself (the class, the memory accounting) the family holds directly. The composition root
(`server.py: build_engine`) reads one family and asks each layer for its piece; it never tests the
architecture. A new family that reuses existing formats is one `ModelFamily` here (docs/adding-a-model.md).

Both spellings a checkpoint can carry are registered: GGUF's `general.architecture` / HF's `model_type`
("llama") and HF's `architectures[0]` ("LlamaForCausalLM"). A model class provides
`config_class.from_hf(dict)` and `load_weights(state_dict)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from flashserve.models.deepseek_v4 import DeepseekV4ForCausalLM
from flashserve.models.llama import LlamaForCausalLM
from flashserve.models.loading import Checkpoint


@dataclass(frozen=True, slots=True)
class MemoryPlan:
    """How the engine spends the memory setting (`kv_cache_tokens`) on one model."""

    block_size: int  # tokens per KV block (and per prefix-cache unit)
    num_blocks: int  # KV blocks: admission and preemption count in these
    cache_bytes: int  # what `kv_cache_tokens` tokens of this model's cache cost
    snapshot_bytes: int | None = None  # the prefix-state pool's bound (sequence-state runners); None: none


@dataclass(frozen=True, slots=True)
class MemorySetting:
    kv_cache_tokens: int  # the memory setting: tokens of cache
    max_model_len: int  # one request must fit
    block_size: int  # the configured block size (a family may impose its own)
    kv_cache_dtype: torch.dtype


def _num_blocks(memory: MemorySetting, block_size: int) -> int:
    return max(-(-memory.kv_cache_tokens // block_size), -(-memory.max_model_len // block_size))


def paged_memory(model: nn.Module, memory: MemorySetting) -> MemoryPlan:
    """K and V rows per token per layer, in the configured blocks (`model.cache_specs()`)."""
    itemsize = torch.empty((), dtype=memory.kv_cache_dtype).element_size()
    per_token = sum(2 * s.num_kv_heads * s.head_dim * itemsize for s in model.cache_specs())  # type: ignore[operator]
    return MemoryPlan(memory.block_size, _num_blocks(memory, memory.block_size),
                      memory.kv_cache_tokens * per_token)


def deepseek_v4_memory(model: nn.Module, memory: MemorySetting) -> MemoryPlan:
    """Blocks of one prefix unit (128 tokens) for admission; the same `kv_cache_tokens` buys the prefix-state
    pool its bytes, at what DeepSeek-V4's state copies cost per cached token."""
    assert isinstance(model, DeepseekV4ForCausalLM)
    unit = model.prefix_unit
    nbytes = memory.kv_cache_tokens * model.snapshot_bytes_per_token()
    return MemoryPlan(unit, _num_blocks(memory, unit), nbytes, snapshot_bytes=nbytes)


@dataclass(frozen=True, slots=True)
class ModelFamily:
    name: str
    model_class: type[nn.Module]
    runner: str  # engine/engine.py RUNNERS: "paged" | "sequence_state"
    memory: Callable[[nn.Module, MemorySetting], MemoryPlan]
    template: str  # chat/formats.py TEMPLATES: "checkpoint" (its own Jinja template) | "deepseek_v4"
    tool_format: str  # how the model writes calls, and so the parser: chat/formats.py TOOL_PARSERS
    grammar_format: str  # the call syntax forced calls are constrained to (chat/structured.py)
    reasoning: str  # chat/formats.py REASONING: "none" | "deepseek_v4"
    architectures: tuple[str, ...]  # the names checkpoints give it


LLAMA = ModelFamily(
    name="llama", model_class=LlamaForCausalLM, runner="paged", memory=paged_memory, template="checkpoint",
    tool_format="json", grammar_format="json", reasoning="none", architectures=("llama", "LlamaForCausalLM"),
)
DEEPSEEK_V4 = ModelFamily(
    name="deepseek_v4", model_class=DeepseekV4ForCausalLM, runner="sequence_state", memory=deepseek_v4_memory,
    template="deepseek_v4", tool_format="dsml", grammar_format="dsml", reasoning="deepseek_v4",
    architectures=("deepseek_v4", "DeepseekV4ForCausalLM"),
)
FAMILIES: dict[str, ModelFamily] = {arch: family for family in (LLAMA, DEEPSEEK_V4) for arch in family.architectures}
MODEL_REGISTRY: dict[str, type[nn.Module]] = {arch: family.model_class for arch, family in FAMILIES.items()}


def model_family(architecture: str) -> ModelFamily:
    try:
        return FAMILIES[architecture]
    except KeyError:
        known = ", ".join(sorted(FAMILIES))
        raise ValueError(f"unsupported model architecture {architecture!r} (supported: {known})") from None


def model_class(architecture: str) -> type[nn.Module]:
    return model_family(architecture).model_class


def build_model(checkpoint: Checkpoint, dtype: torch.dtype = torch.float32, weight_quant: str = "none",
                dense_dtype: torch.dtype | None = None, consume: bool = False) -> nn.Module:
    """Construct the checkpoint's model in `dtype` with its weights, in eval mode, without gradients,
    packed for serving (`weight_quant`, `dense_dtype`: see `linear.PackedLinear`).

    `consume=True` empties `checkpoint.state_dict`, so that each float32 weight is freed as soon as it
    is packed: the server's peak memory is then one copy of the weights, not two.

    The module is built on the meta device and adopts the checkpoint's tensors directly, so no
    throwaway random initialisation is computed and the weights are not held twice.
    """
    cls = model_class(checkpoint.architecture)
    config = cls.config_class.from_hf(checkpoint.config)  # type: ignore[attr-defined]
    with torch.device("meta"):
        model = cls(config)
    state_dict = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in checkpoint.state_dict.items()}
    if consume:
        checkpoint.state_dict.clear()
    model.load_weights(state_dict, weight_quant, dense_dtype)  # type: ignore[operator]
    model.eval()
    model.requires_grad_(False)
    return model

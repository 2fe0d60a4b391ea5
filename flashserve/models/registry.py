"""Architecture name -> model class, and `build_model`: a `Checkpoint` in, a ready eval-mode module out.

Both spellings a checkpoint can carry are registered: GGUF's `general.architecture` / HF's
`model_type` ("llama") and HF's `architectures[0]` ("LlamaForCausalLM"). A model class provides
`config_class.from_hf(dict)` and `load_weights(state_dict)`; nothing else here knows about Llama.
"""

from __future__ import annotations

import torch
from torch import nn

from flashserve.models.deepseek_v4 import DeepseekV4ForCausalLM
from flashserve.models.llama import LlamaForCausalLM
from flashserve.models.loading import Checkpoint

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "llama": LlamaForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
    "deepseek_v4": DeepseekV4ForCausalLM,
    "DeepseekV4ForCausalLM": DeepseekV4ForCausalLM,
}


def model_class(architecture: str) -> type[nn.Module]:
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        known = ", ".join(sorted(MODEL_REGISTRY))
        raise ValueError(f"unsupported model architecture {architecture!r} (supported: {known})") from None


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

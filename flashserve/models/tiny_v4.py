"""`flashserve make-tiny-v4 DIR`: a small random DeepSeek-V4 checkpoint in the official format.

What the real Flash checkpoint holds, at a size that runs on a laptop: DeepSeek's own config.json keys
(`compress_ratios` with the MTP layer's entry, `rope_scaling`, `num_hash_layers`, an FP8 block
`quantization_config`), the official tensor names and dtypes (FP8 E4M3 attention and shared-expert linears
with E8M0 scales per 128x128 block; FP4 E2M1 routed experts, two per byte, with E8M0 scales per 1x32; BF16
embedding, head, norms, gates, compressor and indexer-weight projections; F32 sinks, compressor position
biases, router biases and hyper-connection tensors; an int32 `tid2eid`), and a byte-level BPE tokenizer
whose first ids are V4's special tokens (bos 0, eos 1).

The layer pattern exercises every kind: sliding, CSA (ratio 4, with the indexer), HCA (ratio 16 here, 128 in
Flash), plus one MTP block. Weights are random, drawn so that every part matters (sinks, position biases,
router biases and hyper-connection bases away from zero). The model's answers are noise; the point is the
format, the arithmetic and the serving path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from flashserve.models.deepseek_v4 import DeepseekV4Config, DeepseekV4ForCausalLM
from flashserve.models.fp_formats import quantize_fp4_groups, quantize_fp8_blocks

SPECIAL_TOKENS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜▁pad▁｜>"]
# Fill-in-the-middle markers (chat/deepseek_v4.py: fim_prompt): special, added after the trained vocabulary
# so the ids of everything before them stay as they were.
FIM_TOKENS = ["<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"]
# Added but not special: they must come back as text when decoded (the reasoning splitter and the DSML
# parser read them).
TEXT_MARKERS = ["<think>", "</think>", "｜DSML｜"]

TINY_CONFIG: dict[str, Any] = {
    "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4",
    "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 1, "head_dim": 32, "qk_rope_head_dim": 8, "q_lora_rank": 32, "o_groups": 2,
    "o_lora_rank": 16, "sliding_window": 8, "compress_ratios": [0, 4, 16, 4, 0], "num_hash_layers": 1,
    "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
    "scoring_func": "sqrtsoftplus", "norm_topk_prob": True, "routed_scaling_factor": 1.5, "swiglu_limit": 10.0,
    "index_n_heads": 8, "index_head_dim": 16, "index_topk": 4, "hc_mult": 4, "hc_sinkhorn_iters": 20,
    "hc_eps": 1e-6, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "compress_rope_theta": 160000.0,
    "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 64, "beta_fast": 32,
                     "beta_slow": 1},
    "max_position_embeddings": 4096, "num_nextn_predict_layers": 1, "bos_token_id": 0, "eos_token_id": 1,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "expert_dtype": "fp4",
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                            "weight_block_size": [128, 128], "scale_fmt": "ue8m0"},
}

# Which official tensors are stored in which format (the rest of the floats are BF16).
_FP8 = (".attn.wq_a.weight", ".attn.wq_b.weight", ".attn.wkv.weight", ".attn.wo_a.weight", ".attn.wo_b.weight",
        ".attn.indexer.wq_b.weight", ".shared_experts.w1.weight", ".shared_experts.w2.weight",
        ".shared_experts.w3.weight", ".e_proj.weight", ".h_proj.weight")
_F32 = (".attn_sink", ".ape", ".gate.bias", "_fn", "_base", "_scale")


def random_model(cfg: DeepseekV4Config, seed: int) -> DeepseekV4ForCausalLM:
    """Random weights (std 0.1) with the parameters a fresh model leaves at zero or one moved away from it."""
    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "_scale")):
                p.copy_(1 + torch.randn_like(p) * 0.1)
            elif name.endswith((".attn_sink", ".ape", "_base", ".gate.bias")):
                p.copy_(torch.randn_like(p) * 0.5)
            else:
                p.copy_(torch.randn_like(p) * 0.1)
        for name, buf in model.named_buffers():
            if name.endswith("tid2eid"):
                buf.copy_(torch.stack([torch.randperm(cfg.num_experts)[: cfg.experts_per_token]
                                       for _ in range(cfg.vocab_size)]))
    return model


def official_tensors(model: DeepseekV4ForCausalLM) -> dict[str, torch.Tensor]:
    """The model's state dict in the official checkpoint's formats (see the module docstring)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("tid2eid"):
            out[name] = tensor.to(torch.int32)
        elif ".experts." in name and ".shared_experts." not in name:
            out[name], out[name[: -len("weight")] + "scale"] = quantize_fp4_groups(tensor)
        elif name.endswith(_FP8):
            out[name], out[name[: -len("weight")] + "scale"] = quantize_fp8_blocks(tensor)
        elif name.endswith(_F32):
            out[name] = tensor.float()
        else:
            out[name] = tensor.to(torch.bfloat16)
    return {k: v.contiguous() for k, v in out.items()}


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A byte-level BPE trained on a few sentences, V4's special tokens first (ids 0, 1, ...) and its text
    markers last, within `vocab_size` ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(TEXT_MARKERS) - len(FIM_TOKENS),
                                  special_tokens=SPECIAL_TOKENS,
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["The quick brown fox jumps over the lazy dog.", "What is the capital of France? Paris.",
              '{"location": "Paris", "unit": "celsius", "temperature": 21}', "def add(a, b):\n    return a + b",
              "Let me think step by step about the weather tool call."] * 20
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.add_tokens([AddedToken(marker, special=False, normalized=False) for marker in TEXT_MARKERS])
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in FIM_TOKENS])
    assert tokenizer.get_vocab_size() <= vocab_size
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": SPECIAL_TOKENS[0], "eos_token": SPECIAL_TOKENS[1], "pad_token": SPECIAL_TOKENS[-1],
         "add_bos_token": False, "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2))


def make_tiny_v4(folder: str | Path, seed: int = 0, max_position_embeddings: int | None = None) -> Path:
    """Write the checkpoint into `folder` (created if needed); returns its path. `max_position_embeddings`
    (default 4096) is the context the server will offer: an agent CLI's ~12k-token prompt needs 16384 or
    more. The weights do not depend on it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = dict(TINY_CONFIG)
    if max_position_embeddings is not None:
        if max_position_embeddings < 1:
            raise ValueError("max_position_embeddings must be positive")
        config["max_position_embeddings"] = max_position_embeddings
    cfg = DeepseekV4Config.from_hf(config)
    save_file(official_tensors(random_model(cfg, seed)), str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))
    write_tokenizer(folder, cfg.vocab_size)
    return folder

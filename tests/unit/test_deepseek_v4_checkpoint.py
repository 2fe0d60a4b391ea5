"""The official DeepSeek-V4 checkpoint format, end to end at tiny size: `make_tiny_v4` writes DeepSeek's
config.json keys, tensor names and dtypes (FP8 + E8M0 per 128x128 block, FP4 pairs + E8M0 per 1x32, BF16,
F32, int32 `tid2eid`) and a tokenizer with V4's special tokens; `load_checkpoint` reads it back, decoding
the scaled formats; the model built from it computes what the written (quantized) weights define."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from flashserve.chat.deepseek_v4 import FIM_BEGIN, FIM_END, FIM_HOLE
from flashserve.models.deepseek_v4 import DeepseekV4Config, DeepseekV4ForCausalLM, dequantize_checkpoint
from flashserve.models.loading import load_checkpoint
from flashserve.models.tiny_v4 import FIM_TOKENS, SPECIAL_TOKENS, TEXT_MARKERS, TINY_CONFIG, make_tiny_v4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_v4(tmp_path_factory.mktemp("tiny-v4"), seed=7)


def build(state: dict[str, torch.Tensor], config: dict) -> DeepseekV4ForCausalLM:
    with torch.device("meta"):
        model = DeepseekV4ForCausalLM(DeepseekV4Config.from_hf(config))
    model.load_weights(dict(state))
    return model.eval()


def test_the_file_holds_the_official_names_and_dtypes(tiny: Path) -> None:
    with safe_open(str(tiny / "model.safetensors"), framework="pt") as f:
        dtypes = {k: f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118
    assert dtypes["embed.weight"] == dtypes["head.weight"] == torch.bfloat16
    assert dtypes["layers.0.attn.wq_a.weight"] == torch.float8_e4m3fn
    assert dtypes["layers.0.attn.wq_a.scale"] == torch.float8_e8m0fnu
    assert dtypes["layers.1.ffn.experts.3.w2.weight"] == torch.int8  # FP4 pairs
    assert dtypes["layers.1.ffn.experts.3.w2.scale"] == torch.float8_e8m0fnu
    assert dtypes["layers.1.ffn.shared_experts.w1.weight"] == torch.float8_e4m3fn
    assert dtypes["layers.1.attn.compressor.wkv.weight"] == torch.bfloat16
    assert dtypes["layers.1.attn.indexer.weights_proj.weight"] == torch.bfloat16
    assert dtypes["layers.1.attn.indexer.compressor.ape"] == torch.float32
    assert dtypes["layers.2.attn.attn_sink"] == dtypes["layers.2.hc_attn_fn"] == dtypes["hc_head_base"] == torch.float32
    assert dtypes["layers.0.ffn.gate.tid2eid"] == torch.int32 and "layers.1.ffn.gate.bias" in dtypes
    assert "layers.2.attn.indexer.wq_b.weight" not in dtypes  # HCA: no indexer
    assert "mtp.0.e_proj.weight" in dtypes and "mtp.0.attn.wq_a.scale" in dtypes


def test_load_decodes_the_scaled_formats_and_the_model_runs(tiny: Path) -> None:
    ckpt = load_checkpoint(tiny)
    assert ckpt.architecture == "deepseek_v4" and ckpt.config["compress_ratios"] == TINY_CONFIG["compress_ratios"]
    assert all(".scale" not in k for k in ckpt.state_dict)
    assert all(v.dtype in (torch.float32, torch.int32) for v in ckpt.state_dict.values())
    # The decoded weights are exactly what the raw file's codes and scales define.
    with safe_open(str(tiny / "model.safetensors"), framework="pt") as f:
        raw = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert all(torch.equal(v, ckpt.state_dict[k]) for k, v in dequantize_checkpoint(raw, torch.float32).items())
    w = ckpt.state_dict["layers.1.ffn.experts.3.w2.weight"]
    assert w.shape == (64, 32) and set(w.div(w.abs().amax()).unique().tolist()) != {0.0}

    model = build(ckpt.state_dict, ckpt.config)
    assert len(model.mtp) == 1
    ids = torch.tensor(ckpt.tokenizer.encode("What is the capital of France?").ids)
    logits = model(ids)
    assert logits.shape == (len(ids), 512) and torch.isfinite(logits).all()
    # The MTP block drafts the token after next from the backbone's streams.
    state = model.new_state()
    streams = model.streams(ids[:-1], state)
    draft = model.draft(streams, ids[1:], 0, type(state.layers[0])())
    assert draft.shape == (len(ids) - 1, 512) and torch.isfinite(draft).all()


def test_tokenizer_has_the_special_tokens_first(tiny: Path) -> None:
    ckpt = load_checkpoint(tiny)
    assert [ckpt.tokenizer.token_to_id(t) for t in SPECIAL_TOKENS[:2]] == [0, 1]
    assert ckpt.bos_token == SPECIAL_TOKENS[0] and ckpt.eos_token == SPECIAL_TOKENS[1] and 1 in ckpt.stop_token_ids
    for token in SPECIAL_TOKENS + TEXT_MARKERS + FIM_TOKENS:
        assert ckpt.tokenizer.encode(f"a{token}b").tokens.count(token) == 1, token
    # The fill-in-the-middle markers are V4's own spelling (chat/deepseek_v4.py writes them), one id each.
    assert FIM_TOKENS == [FIM_BEGIN, FIM_HOLE, FIM_END]
    assert all(ckpt.tokenizer.token_to_id(t) < 512 for t in FIM_TOKENS)
    for marker in TEXT_MARKERS:  # the thinking and DSML markers come back as text
        ids = ckpt.tokenizer.encode(f"x{marker}y", add_special_tokens=False).ids
        assert ckpt.tokenizer.decode(ids, skip_special_tokens=True) == f"x{marker}y"
        assert max(ids) < 512


def test_a_weight_in_the_wrong_format_is_refused() -> None:
    raw = {"x.weight": torch.zeros(4, 4, dtype=torch.bfloat16), "x.scale": torch.zeros(1, 1).to(torch.float8_e8m0fnu)}
    with pytest.raises(ValueError, match="FP8"):
        dequantize_checkpoint(raw, torch.float32)
    with pytest.raises(ValueError, match="without a scale"):
        dequantize_checkpoint({"y.weight": torch.zeros(2, 2).to(torch.float8_e4m3fn)}, torch.float32)


def test_a_folder_transformers_saved_serves_the_same_logits(tiny: Path, tmp_path: Path) -> None:
    """config.json as transformers writes it (layer_types, rope_parameters) and the names its save_pretrained
    uses: the checkpoint loads and computes what transformers computes."""
    import shutil

    from flashserve.models.registry import build_model
    from tests.unit.test_deepseek_v4_parity import random_hf_model, tiny_hf_config

    hf = random_hf_model(tiny_hf_config(), seed=4)
    hf.save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / name, tmp_path / name)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.architecture == "deepseek_v4" and "layer_types" in ckpt.config
    model = build_model(ckpt)
    ids = torch.randint(0, 512, (40,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(ids.unsqueeze(0)).logits[0]
    torch.testing.assert_close(model(ids), expected, rtol=0, atol=1e-4)

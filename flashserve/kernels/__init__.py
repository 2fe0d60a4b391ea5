"""Fused CPU operators that PyTorch lacks, built on first use with the host C compiler.

`cpu_ops.c` holds them (decode attention straight from the paged cache, residual-add + RMSNorm,
rotary + cache store, silu-and-mul), `q4_linear.c` the 4-bit x 8-bit matmul of decode rows, and
`llama_decode.c` a driver that chains them through every Llama layer in one call; see their headers for
why each exists. The library is compiled once
per machine into a cache folder keyed by the source, the flags and the CPU, and loaded with ctypes,
which releases the GIL while a kernel runs. Where no compiler is available, or
`FLASHSERVE_NATIVE_KERNELS=0`, `cpu_ops()` returns None and the models use their PyTorch path, which
is also the reference the kernels are tested against.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCES = [Path(__file__).with_name(name) for name in ("cpu_ops.c", "q4_linear.c", "llama_decode.c")]
_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-shared", "-std=gnu11"]
if platform.machine() in ("x86_64", "AMD64"):
    # GCC vectorizes plain loops at 256 bits on AVX-512 CPUs unless told otherwise, doubling their
    # instruction count.
    _FLAGS.append("-mprefer-vector-width=512")
_P, _I, _L, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float
_SIGNATURES = {
    "paged_decode": [_P, _L, _P, _P, _P, _L, _P, _P, _I, _I, _I, _I, _I, _I, _F],
    "paged_prefill": [_P, _L, _P, _P, _P, _L, _P, _I, _I, _I, _I, _I, _I, _F],
    "rms_norm": [_P, _P, _P, _P, _L, _I, _F],
    "rotary_store": [_P, _L, _I, _I, _I, _P, _P, _P, _P, _P, _P],
    "silu_mul": [_P, _P, _L, _I],
}
_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}
_CACHE_OPS = ("paged_decode", "paged_prefill", "rotary_store")
# (activation dtype, KV cache dtype) -> suffix of the attention and cache-store kernels built for the pair.
_CACHE_SUFFIX = {(torch.float32, torch.float32): "f32", (torch.bfloat16, torch.bfloat16): "bf16",
                 (torch.float32, torch.bfloat16): "f32_bf16"}


def _cache_dir() -> Path:
    base = os.environ.get("FLASHSERVE_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "flashserve", "kernels")
    return Path(base)


def _cpu_id() -> str:
    # -march=native binds the library to this CPU; a home folder shared between machines must not mix them.
    try:
        with open("/proc/cpuinfo") as f:
            return "".join([ln for ln in f if ln.startswith(("model name", "flags"))][:2])
    except OSError:
        return platform.processor()


def _build(compiler: str) -> Path:
    sources = b"".join(path.read_bytes() for path in _SOURCES)
    digest = hashlib.sha256(sources + " ".join(_FLAGS).encode() + _cpu_id().encode()).hexdigest()
    target = _cache_dir() / f"cpu_ops-{digest[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: servers starting together never load a half-written file.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        subprocess.run([compiler, *_FLAGS, *map(str, _SOURCES), "-o", str(out), "-lm"], check=True,
                       capture_output=True, text=True)
        os.replace(out, target)
    return target


class DecodeLayer(ctypes.Structure):
    """llama_decode.c's per-layer table entry: packed 4-bit weights, norm weights, the layer's cache."""

    _fields_ = [(name, _P) for name in ("qkv", "o", "gate_up", "down", "input_norm", "post_norm",
                                        "key_cache", "value_cache")]


class DecodeDims(ctypes.Structure):
    _fields_ = [("hidden", _I), ("inter", _I), ("num_heads", _I), ("num_kv_heads", _I), ("head_dim", _I),
                ("cache_bf16", _I), ("eps", _F), ("scale", _F)]


class _DecodeBatch(ctypes.Structure):
    _fields_ = [("positions", _P), ("slots", _P), ("block_tables", _P), ("context_lens", _P),
                ("max_blocks", _I), ("block_size", _I), ("cos_half", _P), ("sin_half", _P)]


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class CpuOps:
    """Typed wrappers over the compiled library. Each returns False (doing nothing) when the shapes are
    outside what the kernel handles, so callers can fall back to PyTorch."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._fns: dict[tuple[str, str], ctypes._CFuncPtr] = {}
        for name, argtypes in _SIGNATURES.items():
            for suffix in (_CACHE_SUFFIX if name in _CACHE_OPS else _SUFFIX).values():
                fn = getattr(lib, f"{name}_{suffix}")
                fn.argtypes, fn.restype = argtypes, ctypes.c_int
                self._fns[name, suffix] = fn
        self._q4_linear = lib.q4_linear
        self._top_k_rows = lib.top_k_rows
        self._top_k_rows.argtypes, self._top_k_rows.restype = [_P, _L, _I, _I, _P], ctypes.c_int
        self._argmax_rows = lib.argmax_rows
        self._argmax_rows.argtypes, self._argmax_rows.restype = [_P, _L, _I, _P], ctypes.c_int
        self._llama_decode = lib.llama_decode_layers
        self._llama_decode.argtypes = [_P, _I, ctypes.POINTER(DecodeDims), ctypes.POINTER(_DecodeBatch), _P, _P, _I]
        self._llama_decode.restype = ctypes.c_int
        self._q4_linear.argtypes, self._q4_linear.restype = [_P, _L, _I, _I, _P, _P, _L, _I], ctypes.c_int

    @staticmethod
    def supports(t: torch.Tensor) -> bool:
        return t.device.type == "cpu" and t.dtype in _SUFFIX

    @staticmethod
    def supports_cache(activations: torch.dtype, cache: torch.dtype) -> bool:
        """Whether the attention and cache-store kernels exist for activations over a cache of `cache`."""
        return (activations, cache) in _CACHE_SUFFIX

    def _call(self, name: str, suffix: str, *args: object) -> bool:
        rc = self._fns[name, suffix](*args)
        if rc == -1:
            raise MemoryError(f"{name}: the kernel could not allocate its scratch space")
        return rc == 0

    def paged_decode(self, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                     block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int, scale: float,
                     out: torch.Tensor) -> bool:
        """q, out: [B, H, D] with contiguous heads (rows may be strided); caches: [slots, KV, D];
        block_tables: [B, max_blocks] int32; context_lens: [B] int32."""
        num_seqs, num_heads, head_dim = q.shape
        assert q.stride(2) == 1 and q.stride(1) == head_dim and out.stride(2) == 1 and out.stride(1) == head_dim
        assert key_cache.is_contiguous() and value_cache.is_contiguous() and out.dtype == q.dtype
        assert block_tables.dtype == torch.int32 and block_tables.is_contiguous() and context_lens.is_contiguous()
        suffix = _CACHE_SUFFIX[q.dtype, key_cache.dtype]
        return self._call("paged_decode", suffix, q.data_ptr(), q.stride(0), key_cache.data_ptr(),
                          value_cache.data_ptr(), out.data_ptr(), out.stride(0), block_tables.data_ptr(),
                          context_lens.data_ptr(), num_seqs, block_tables.shape[1], block_size, num_heads,
                          key_cache.shape[1], head_dim, scale)

    def paged_prefill(self, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                      block_table: torch.Tensor, ctx_len: int, block_size: int, scale: float,
                      out: torch.Tensor) -> bool:
        """Causal attention of one request's q_len new tokens (the last positions of a ctx_len context):
        q, out: [q_len, H, D] with contiguous heads (rows may be strided); block_table: [blocks] int32."""
        q_len, num_heads, head_dim = q.shape
        assert q.stride(2) == 1 and q.stride(1) == head_dim and out.stride(2) == 1 and out.stride(1) == head_dim
        assert key_cache.is_contiguous() and value_cache.is_contiguous() and out.dtype == q.dtype
        assert block_table.dtype == torch.int32 and block_table.is_contiguous() and q_len <= ctx_len
        assert block_table.numel() * block_size >= ctx_len
        suffix = _CACHE_SUFFIX[q.dtype, key_cache.dtype]
        return self._call("paged_prefill", suffix, q.data_ptr(), q.stride(0), key_cache.data_ptr(),
                          value_cache.data_ptr(), out.data_ptr(), out.stride(0), block_table.data_ptr(), q_len,
                          ctx_len, block_size, num_heads, key_cache.shape[1], head_dim, scale)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor,
                 residual: torch.Tensor | None = None) -> bool:
        """out = rmsnorm(residual + x) * weight, with residual += x in place (or of x alone)."""
        assert x.is_contiguous() and out.is_contiguous() and weight.is_contiguous() and weight.dtype == x.dtype
        assert residual is None or (residual.is_contiguous() and residual.shape == x.shape)
        rows, dim = x.numel() // x.shape[-1], x.shape[-1]
        return self._call("rms_norm", _SUFFIX[x.dtype], x.data_ptr(), _ptr(residual), weight.data_ptr(), out.data_ptr(),
                          rows, dim, eps)

    def rotary_store(self, qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
                     positions: torch.Tensor, cos_half: torch.Tensor, sin_half: torch.Tensor,
                     slots: torch.Tensor | None, key_cache: torch.Tensor | None,
                     value_cache: torch.Tensor | None) -> bool:
        """Rotate the Q and K heads of qkv [T, (H + 2KV) * D] in place; store K, V rows at `slots` (in the
        cache's dtype, which `supports_cache` must allow; skipped when `slots` is None)."""
        assert qkv.is_contiguous() and qkv.shape[1] == (num_heads + 2 * num_kv_heads) * head_dim
        assert positions.dtype == torch.int64 and positions.is_contiguous()
        assert cos_half.dtype == sin_half.dtype == torch.float32 and cos_half.is_contiguous()
        if slots is not None:
            assert slots.dtype == torch.int64 and slots.is_contiguous()
            assert key_cache is not None and value_cache is not None and key_cache.dtype == value_cache.dtype
            assert key_cache.is_contiguous() and value_cache.is_contiguous()
        suffix = _CACHE_SUFFIX[qkv.dtype, qkv.dtype if key_cache is None else key_cache.dtype]
        return self._call("rotary_store", suffix, qkv.data_ptr(), qkv.shape[0], num_heads, num_kv_heads, head_dim,
                          positions.data_ptr(), cos_half.data_ptr(), sin_half.data_ptr(),
                          _ptr(slots), _ptr(key_cache), _ptr(value_cache))

    def silu_mul(self, gate_up: torch.Tensor, out: torch.Tensor) -> bool:
        """out [T, I] = silu(gate_up[:, :I]) * gate_up[:, I:]."""
        assert gate_up.is_contiguous() and out.is_contiguous() and gate_up.shape[1] == 2 * out.shape[1]
        return self._call("silu_mul", _SUFFIX[gate_up.dtype], gate_up.data_ptr(), out.data_ptr(), out.shape[0],
                          out.shape[1])

    def q4_linear(self, x: torch.Tensor, weights: torch.Tensor, out: torch.Tensor) -> bool:
        """out [M, N] = x [M, K] @ W.T for float32 x and out, W packed by `linear.pack_q4`."""
        assert x.dtype == out.dtype == torch.float32 and x.stride(1) == 1 and out.is_contiguous()
        assert weights.dtype == torch.uint8 and weights.is_contiguous()
        rc = self._q4_linear(x.data_ptr(), x.stride(0), x.shape[0], x.shape[1], weights.data_ptr(),
                             out.data_ptr(), out.stride(0), out.shape[1])
        if rc == -1:
            raise MemoryError("q4_linear: the kernel could not allocate its scratch space")
        return rc == 0

    def top_k_rows(self, x: torch.Tensor, k: int) -> torch.Tensor | None:
        """Indices [rows, k] int64 of each row's k largest entries, largest first, lower index first on ties
        (float32 [rows, cols] contiguous x); None where k is outside 1..16."""
        assert x.dtype == torch.float32 and x.dim() == 2 and x.is_contiguous()
        out = torch.empty(x.shape[0], k, dtype=torch.int64)
        return out if self._top_k_rows(x.data_ptr(), x.shape[0], x.shape[1], k, out.data_ptr()) == 0 else None

    def argmax_rows(self, x: torch.Tensor) -> torch.Tensor | None:
        """Indices [rows] int64 of each row's first largest entry (float32 [rows, cols] contiguous x of finite
        values: the kernel is built with finite math); None where a row is shorter than 16."""
        assert x.dtype == torch.float32 and x.dim() == 2 and x.is_contiguous()
        out = torch.empty(x.shape[0], dtype=torch.int64)
        return out if self._argmax_rows(x.data_ptr(), x.shape[0], x.shape[1], out.data_ptr()) == 0 else None

    def llama_decode_layers(self, layers: ctypes.Array[DecodeLayer], dims: DecodeDims, x: torch.Tensor,
                            residual: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                            block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int,
                            cos_half: torch.Tensor, sin_half: torch.Tensor) -> None:
        """Run every layer in `layers` over decode rows x [B, hidden] (sequence b at row b): x becomes the
        last MLP output and residual the stream beside it. The caller vouches for the table (see
        models.llama); this checks the per-step tensors."""
        rows = x.shape[0]
        assert x.dtype == residual.dtype == torch.float32 and x.is_contiguous() and residual.is_contiguous()
        assert positions.dtype == slots.dtype == torch.int64 and positions.is_contiguous() and slots.is_contiguous()
        assert block_tables.dtype == context_lens.dtype == torch.int32 and block_tables.is_contiguous()
        assert len(positions) == len(slots) == len(context_lens) == block_tables.shape[0] == rows
        batch = _DecodeBatch(positions.data_ptr(), slots.data_ptr(), block_tables.data_ptr(),
                             context_lens.data_ptr(), block_tables.shape[1], block_size, cos_half.data_ptr(),
                             sin_half.data_ptr())
        rc = self._llama_decode(ctypes.addressof(layers), len(layers), ctypes.byref(dims), ctypes.byref(batch),
                                x.data_ptr(), residual.data_ptr(), rows)
        if rc == -1:
            raise MemoryError("llama_decode_layers: could not allocate its scratch space")
        if rc != 0:
            raise RuntimeError(f"llama_decode_layers: a kernel refused the shapes (rc {rc})")


_lock = threading.Lock()


@lru_cache(maxsize=1)
def cpu_ops() -> CpuOps | None:
    """The compiled operators, or None (with one warning) where they cannot be built here."""
    if os.environ.get("FLASHSERVE_NATIVE_KERNELS", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler found: using PyTorch operators only (slower decode)")
        return None
    with _lock:
        try:
            return CpuOps(ctypes.CDLL(str(_build(compiler))))
        except (OSError, subprocess.CalledProcessError) as exc:
            log.warning("native CPU operators unavailable (%s): using PyTorch only",
                        getattr(exc, "stderr", "") or exc)
            return None

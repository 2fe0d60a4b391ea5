"""Fused CPU operators that PyTorch lacks, built on first use with the host C compiler.

`cpu_ops.c` holds them (decode attention straight from the paged cache, residual-add + RMSNorm,
rotary + cache store, silu-and-mul), `q4_linear.c` the 4-bit x 8-bit matmul of decode rows,
`dense_linear.c` the bf16/float32 matmul of prompt rows (batch-invariant by construction) and the head's
rescoring, and `llama_decode.c` a driver that chains them through every Llama layer in one call; see their
headers for why each exists.

The library is compiled once per machine into a cache folder keyed by the sources, the compiler, the
flags and the CPU, and loaded with ctypes, which releases the GIL while a kernel runs. It is built for
`-march=$FLASHSERVE_KERNEL_MARCH` (default `native`; or an x86-64 level, x86-64-v4 down to x86-64): every
kernel has an AVX-512 path (VNNI, BF16, AMX where the level has them), an AVX2 one and a plain-C one
(which is what runs on aarch64), chosen at compile time by the level's predefined macros. Levels are for
testing the lower paths on a fast machine and for building portable caches; a level above the host CPU's
is refused (it would die on an illegal instruction). Where no compiler is available, or
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

_SOURCES = [Path(__file__).with_name(name)
            for name in ("cpu_ops.c", "q4_linear.c", "dense_linear.c", "llama_decode.c")]
MARCH_ENV = "FLASHSERVE_KERNEL_MARCH"
# The -march levels the kernels are built and tested for: the host's own, and the x86-64 psABI levels
# (v4: AVX-512 F/BW/DQ/VL/CD; v3: AVX2, FMA, F16C; v2: SSE4.2, POPCNT; x86-64: SSE2). Every kernel has a
# plain-C path, so each level builds and gives correct results; only the speed differs.
X86_MARCHES = ("x86-64-v4", "x86-64-v3", "x86-64-v2", "x86-64")
MARCHES = ("native", *X86_MARCHES)
_BASE_FLAGS = ["-O3", "-ffast-math", "-fopenmp", "-fPIC", "-shared", "-std=gnu11",
               # The kernels pass 64-byte vectors between static functions; GCC warns that their ABI would
               # differ from AVX-512's below that level, which does not matter inside one library.
               "-Wno-psabi"]


def _is_x86() -> bool:
    return platform.machine() in ("x86_64", "AMD64")


# The CPU flags (as /proc/cpuinfo names them) each x86-64 level needs beyond the one below it.
_LEVEL_FLAGS = {
    "x86-64": ("sse2",),
    "x86-64-v2": ("sse2", "ssse3", "sse4_1", "sse4_2", "popcnt", "cx16"),
    "x86-64-v3": ("sse2", "ssse3", "sse4_1", "sse4_2", "popcnt", "avx", "avx2", "fma", "f16c", "bmi1", "bmi2",
                  "movbe"),
    "x86-64-v4": ("sse2", "ssse3", "sse4_1", "sse4_2", "popcnt", "avx", "avx2", "fma", "f16c", "bmi1", "bmi2",
                  "movbe", "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"),
}


def kernel_march() -> str:
    """The -march the kernels are built for: FLASHSERVE_KERNEL_MARCH, default `native`. Raises ValueError on
    a value outside MARCHES (or an x86-64 level on another architecture): a typo must not silently build
    for the host instead."""
    march = os.environ.get(MARCH_ENV, "").strip() or "native"
    if march not in MARCHES:
        raise ValueError(f"{MARCH_ENV}={march!r} is not one of {', '.join(MARCHES)}")
    if march != "native" and not _is_x86():
        raise ValueError(f"{MARCH_ENV}={march!r} is an x86-64 level; this machine is {platform.machine()} "
                         "(only 'native' applies)")
    if march != "native":
        host = set(_cpu_id().split())
        missing = [flag for flag in _LEVEL_FLAGS[march] if flag not in host]
        # /proc/cpuinfo may be unreadable (then _cpu_id has no flags line): only refuse on evidence.
        if missing and "sse2" in host:
            raise ValueError(f"{MARCH_ENV}={march!r}: this CPU lacks {', '.join(missing)}; the kernels would "
                             "stop on an illegal instruction")
    return march


def _host_has_avx512() -> bool:
    return "avx512f" in _cpu_id().split()


def build_flags(march: str) -> list[str]:
    """The compiler flags for `march` (one of MARCHES)."""
    flags = [*_BASE_FLAGS, f"-march={march}"]
    if march == "x86-64-v4" or (march == "native" and _is_x86() and _host_has_avx512()):
        # GCC vectorizes plain loops at 256 bits on AVX-512 CPUs unless told otherwise, doubling their
        # instruction count. Only where the level has AVX-512: below it the option means nothing useful.
        flags.append("-mprefer-vector-width=512")
    return flags


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


def cache_key(compiler: str, march: str) -> str:
    """What the built library depends on: the sources, the compiler, the flags (the march among them) and
    the CPU (for `native`, and because a cache folder may be shared between machines)."""
    sources = b"".join(path.read_bytes() for path in _SOURCES)
    parts = [compiler, " ".join(build_flags(march)), _cpu_id()]
    return hashlib.sha256(sources + "\0".join(parts).encode()).hexdigest()[:16]


def _build(compiler: str, march: str) -> Path:
    flags = build_flags(march)
    target = _cache_dir() / f"cpu_ops-{march}-{cache_key(compiler, march)}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: servers starting together never load a half-written file.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        subprocess.run([compiler, *flags, *map(str, _SOURCES), "-o", str(out), "-lm"], check=True,
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


# The checks below guard raw-pointer calls: a wrong layout would make the C code read or write outside the
# tensors. They raise real errors (never `assert`, which `python -O` strips).
def _check(ok: bool, op: str, what: str) -> None:
    if not ok:
        raise ValueError(f"{op}: {what}")


def _check_dtype(t: torch.Tensor, dtypes: tuple[torch.dtype, ...], op: str, name: str) -> None:
    if t.dtype not in dtypes:
        raise TypeError(f"{op}: {name} must be {' or '.join(map(str, dtypes))}, not {t.dtype}")


def _check_cpu(op: str, *tensors: torch.Tensor | None) -> None:
    for t in tensors:
        if t is not None and t.device.type != "cpu":
            raise ValueError(f"{op}: every tensor must be on the CPU, not {t.device}")


def _heads_contiguous(t: torch.Tensor) -> bool:
    """[rows, H, D] with each row's heads back to back (rows may be strided)."""
    return t.dim() == 3 and t.stride(2) == 1 and t.stride(1) == t.shape[2]


class CpuOps:
    """Typed wrappers over the compiled library. Each returns False (doing nothing) when the shapes are
    outside what the kernel handles, so callers can fall back to PyTorch; a tensor whose layout or dtype
    the kernel would misread raises ValueError or TypeError before any pointer reaches C."""

    def __init__(self, lib: ctypes.CDLL, march: str = "native", path: Path | None = None) -> None:
        self.march, self.path = march, path
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
        self._dense = {}
        for dtype, name in ((torch.bfloat16, "dense_linear_bf16"), (torch.float32, "dense_linear_f32")):
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = [_P, _L, _I, _I, _P, _P, _P, _L, _I], ctypes.c_int
            self._dense[dtype] = fn
        self._dense_plain = lib.dense_linear_f32_plain
        self._dense_plain.argtypes, self._dense_plain.restype = [_P, _L, _I, _I, _P, _P, _P, _L, _I], ctypes.c_int
        self._gather_dot = lib.gather_dot_f32
        self._gather_dot.argtypes, self._gather_dot.restype = [_P, _I, _P, _L, _P, _I, _P], ctypes.c_int
        self._gather_dot_q8 = lib.gather_dot_q8
        self.gather_dot_q8_pays = bool(lib.gather_dot_q8_pays())  # see dense_linear.c
        self._gather_dot_q8.argtypes, self._gather_dot_q8.restype = [_P, _P, _I, _P, _L, _P, _I, _P], ctypes.c_int

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

    @staticmethod
    def _suffix(op: str, table: dict, key: object) -> str:
        if key not in table:
            raise TypeError(f"{op}: no kernel for {key}")
        return table[key]

    def paged_decode(self, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                     block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int, scale: float,
                     out: torch.Tensor) -> bool:
        """q, out: [B, H, D] with contiguous heads (rows may be strided); caches: [slots, KV, D];
        block_tables: [B, max_blocks] int32; context_lens: [B] int32."""
        op = "paged_decode"
        _check_cpu(op, q, key_cache, value_cache, block_tables, context_lens, out)
        _check(_heads_contiguous(q) and _heads_contiguous(out) and out.shape == q.shape, op,
               "q and out must be [B, H, D] of one shape with contiguous heads")
        _check(key_cache.is_contiguous() and value_cache.is_contiguous() and key_cache.shape == value_cache.shape,
               op, "the key and value caches must be contiguous and of one shape")
        _check(key_cache.dim() == 3 and key_cache.shape[2] == q.shape[2], op, "caches must be [slots, KV, D]")
        _check_dtype(out, (q.dtype,), op, "out")
        _check_dtype(value_cache, (key_cache.dtype,), op, "value_cache")
        _check_dtype(block_tables, (torch.int32,), op, "block_tables")
        _check_dtype(context_lens, (torch.int32,), op, "context_lens")
        _check(block_tables.is_contiguous() and context_lens.is_contiguous() and block_tables.dim() == 2
               and block_tables.shape[0] == context_lens.numel() == q.shape[0], op,
               "block_tables [B, max_blocks] and context_lens [B] must be contiguous, one row per sequence")
        num_seqs, num_heads, head_dim = q.shape
        suffix = self._suffix(op, _CACHE_SUFFIX, (q.dtype, key_cache.dtype))
        return self._call(op, suffix, q.data_ptr(), q.stride(0), key_cache.data_ptr(),
                          value_cache.data_ptr(), out.data_ptr(), out.stride(0), block_tables.data_ptr(),
                          context_lens.data_ptr(), num_seqs, block_tables.shape[1], block_size, num_heads,
                          key_cache.shape[1], head_dim, scale)

    def paged_prefill(self, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                      block_table: torch.Tensor, ctx_len: int, block_size: int, scale: float,
                      out: torch.Tensor) -> bool:
        """Causal attention of one request's q_len new tokens (the last positions of a ctx_len context):
        q, out: [q_len, H, D] with contiguous heads (rows may be strided); block_table: [blocks] int32."""
        op = "paged_prefill"
        _check_cpu(op, q, key_cache, value_cache, block_table, out)
        _check(_heads_contiguous(q) and _heads_contiguous(out) and out.shape == q.shape, op,
               "q and out must be [q_len, H, D] of one shape with contiguous heads")
        _check(key_cache.is_contiguous() and value_cache.is_contiguous() and key_cache.shape == value_cache.shape,
               op, "the key and value caches must be contiguous and of one shape")
        _check(key_cache.dim() == 3 and key_cache.shape[2] == q.shape[2], op, "caches must be [slots, KV, D]")
        _check_dtype(out, (q.dtype,), op, "out")
        _check_dtype(value_cache, (key_cache.dtype,), op, "value_cache")
        _check_dtype(block_table, (torch.int32,), op, "block_table")
        q_len, num_heads, head_dim = q.shape
        _check(block_table.is_contiguous() and q_len <= ctx_len, op,
               f"block_table must be contiguous and q_len ({q_len}) at most ctx_len ({ctx_len})")
        _check(block_table.numel() * block_size >= ctx_len, op,
               f"{block_table.numel()} blocks of {block_size} cannot hold a context of {ctx_len}")
        suffix = self._suffix(op, _CACHE_SUFFIX, (q.dtype, key_cache.dtype))
        return self._call(op, suffix, q.data_ptr(), q.stride(0), key_cache.data_ptr(),
                          value_cache.data_ptr(), out.data_ptr(), out.stride(0), block_table.data_ptr(), q_len,
                          ctx_len, block_size, num_heads, key_cache.shape[1], head_dim, scale)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor,
                 residual: torch.Tensor | None = None) -> bool:
        """out = rmsnorm(residual + x) * weight, with residual += x in place (or of x alone)."""
        op = "rms_norm"
        _check_cpu(op, x, weight, out, residual)
        _check(x.is_contiguous() and out.is_contiguous() and weight.is_contiguous(), op,
               "x, weight and out must be contiguous")
        _check(out.shape == x.shape and weight.numel() == x.shape[-1], op,
               "out must have x's shape and weight one entry per column")
        _check_dtype(weight, (x.dtype,), op, "weight")
        _check_dtype(out, (x.dtype,), op, "out")
        if residual is not None:
            _check(residual.is_contiguous() and residual.shape == x.shape, op,
                   "residual must be contiguous and of x's shape")
            _check_dtype(residual, (x.dtype,), op, "residual")
        rows, dim = x.numel() // x.shape[-1], x.shape[-1]
        return self._call(op, self._suffix(op, _SUFFIX, x.dtype), x.data_ptr(), _ptr(residual), weight.data_ptr(),
                          out.data_ptr(), rows, dim, eps)

    def rotary_store(self, qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
                     positions: torch.Tensor, cos_half: torch.Tensor, sin_half: torch.Tensor,
                     slots: torch.Tensor | None, key_cache: torch.Tensor | None,
                     value_cache: torch.Tensor | None) -> bool:
        """Rotate the Q and K heads of qkv [T, (H + 2KV) * D] in place; store K, V rows at `slots` (in the
        cache's dtype, which `supports_cache` must allow; skipped when `slots` is None)."""
        op = "rotary_store"
        _check_cpu(op, qkv, positions, cos_half, sin_half, slots, key_cache, value_cache)
        _check(qkv.dim() == 2 and qkv.is_contiguous() and qkv.shape[1] == (num_heads + 2 * num_kv_heads) * head_dim,
               op, "qkv must be contiguous [T, (H + 2 KV) * D]")
        _check_dtype(positions, (torch.int64,), op, "positions")
        _check(positions.is_contiguous() and positions.numel() == qkv.shape[0], op,
               "positions must be contiguous, one per row")
        _check_dtype(cos_half, (torch.float32,), op, "cos_half")
        _check_dtype(sin_half, (torch.float32,), op, "sin_half")
        _check(cos_half.is_contiguous() and sin_half.is_contiguous() and cos_half.shape == sin_half.shape, op,
               "cos_half and sin_half must be contiguous and of one shape")
        if slots is not None:
            _check_dtype(slots, (torch.int64,), op, "slots")
            _check(slots.is_contiguous() and slots.numel() == qkv.shape[0], op, "slots must be contiguous, one per row")
            if key_cache is None or value_cache is None:
                raise ValueError(f"{op}: storing needs both caches")
            _check_dtype(value_cache, (key_cache.dtype,), op, "value_cache")
            _check(key_cache.is_contiguous() and value_cache.is_contiguous(), op, "the caches must be contiguous")
        suffix = self._suffix(op, _CACHE_SUFFIX, (qkv.dtype, qkv.dtype if key_cache is None else key_cache.dtype))
        return self._call(op, suffix, qkv.data_ptr(), qkv.shape[0], num_heads, num_kv_heads, head_dim,
                          positions.data_ptr(), cos_half.data_ptr(), sin_half.data_ptr(),
                          _ptr(slots), _ptr(key_cache), _ptr(value_cache))

    def silu_mul(self, gate_up: torch.Tensor, out: torch.Tensor) -> bool:
        """out [T, I] = silu(gate_up[:, :I]) * gate_up[:, I:]."""
        op = "silu_mul"
        _check_cpu(op, gate_up, out)
        _check(gate_up.is_contiguous() and out.is_contiguous() and gate_up.dim() == out.dim() == 2
               and gate_up.shape[0] == out.shape[0] and gate_up.shape[1] == 2 * out.shape[1], op,
               "gate_up [T, 2I] and out [T, I] must be contiguous")
        _check_dtype(out, (gate_up.dtype,), op, "out")
        return self._call(op, self._suffix(op, _SUFFIX, gate_up.dtype), gate_up.data_ptr(), out.data_ptr(),
                          out.shape[0], out.shape[1])

    def q4_linear(self, x: torch.Tensor, weights: torch.Tensor, out: torch.Tensor) -> bool:
        """out [M, N] = x [M, K] @ W.T for float32 x and out, W packed by `linear.pack_q4`."""
        op = "q4_linear"
        _check_cpu(op, x, weights, out)
        _check_dtype(x, (torch.float32,), op, "x")
        _check_dtype(out, (torch.float32,), op, "out")
        _check_dtype(weights, (torch.uint8,), op, "weights")
        _check(x.dim() == out.dim() == 2 and x.stride(1) == 1 and out.is_contiguous() and weights.is_contiguous()
               and x.shape[0] == out.shape[0], op, "x [M, K] with unit column stride, contiguous out and weights")
        if out.shape[1] % 16 or x.shape[1] % 32 or x.shape[0] == 0:
            return False  # not whole blocks and groups: refused, as the kernel would
        # Packed: per 16-output block and 32-input group, 256 code bytes, 16 fp16 scales and 16 fp16 mins.
        _check(weights.numel() == out.shape[1] // 16 * x.shape[1] // 32 * 320, op,
               f"weights of {weights.numel()} bytes are not a packed [{out.shape[1]}, {x.shape[1]}] matrix")
        rc = self._q4_linear(x.data_ptr(), x.stride(0), x.shape[0], x.shape[1], weights.data_ptr(),
                             out.data_ptr(), out.stride(0), out.shape[1])
        if rc == -1:
            raise MemoryError("q4_linear: the kernel could not allocate its scratch space")
        return rc == 0

    def dense_linear(self, x: torch.Tensor, weights: torch.Tensor, bias: torch.Tensor | None,
                     out: torch.Tensor) -> bool:
        """out [M, N] float32 = x [M, K] @ W.T + bias for x in W's dtype (bf16 or float32), W packed by
        `linear.pack_dense` ([N / 16, K * 16], N a multiple of 16, K even), bias float32 [N] or None.
        Every row gets the same bits in any batch (see kernels/dense_linear.c)."""
        op = "dense_linear"
        _check_cpu(op, x, weights, bias, out)
        _check_dtype(x, (torch.bfloat16, torch.float32), op, "x")
        _check_dtype(weights, (x.dtype,), op, "weights")
        _check_dtype(out, (torch.float32,), op, "out")
        _check(x.dim() == out.dim() == 2 and x.stride(1) == 1 and out.stride(1) == 1 and weights.is_contiguous()
               and x.shape[0] == out.shape[0], op, "x [M, K] and out [M, N] with unit column strides")
        n, k = out.shape[1], x.shape[1]
        _check(n % 16 == 0 and k % 2 == 0 and weights.shape == (n // 16, k * 16), op,
               f"weights {tuple(weights.shape)} are not a packed [{n}, {k}] matrix (N % 16 == 0, K even)")
        if bias is not None:
            _check_dtype(bias, (torch.float32,), op, "bias")
            _check(bias.is_contiguous() and bias.numel() == n, op, f"bias must be contiguous [{n}]")
        if x.shape[0] == 0:
            return True
        rc = self._dense[x.dtype](x.data_ptr(), x.stride(0), x.shape[0], k, weights.data_ptr(), _ptr(bias),
                                  out.data_ptr(), out.stride(0), n)
        return rc == 0

    def dense_linear_plain(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           out: torch.Tensor) -> bool:
        """out [M, N] float32 = x [M, K] @ W.T + bias for float32 x and a plain contiguous W [N, K] (not
        copied: a tied head keeps sharing the embedding table). Every row gets the same bits in any batch."""
        op = "dense_linear_plain"
        _check_cpu(op, x, weight, bias, out)
        _check_dtype(x, (torch.float32,), op, "x")
        _check_dtype(weight, (torch.float32,), op, "weight")
        _check_dtype(out, (torch.float32,), op, "out")
        _check(x.dim() == out.dim() == weight.dim() == 2 and x.stride(1) == 1 and out.stride(1) == 1
               and weight.is_contiguous() and x.shape[0] == out.shape[0] and weight.shape == (out.shape[1], x.shape[1]),
               op, "x [M, K], contiguous weight [N, K] and out [M, N] with unit column strides")
        if bias is not None:
            _check_dtype(bias, (torch.float32,), op, "bias")
            _check(bias.is_contiguous() and bias.numel() == out.shape[1], op, "bias must be contiguous [N]")
        if x.shape[0] == 0:
            return True
        return self._dense_plain(x.data_ptr(), x.stride(0), x.shape[0], x.shape[1], weight.data_ptr(), _ptr(bias),
                                 out.data_ptr(), out.stride(0), out.shape[1]) == 0

    def gather_dot(self, table: torch.Tensor, hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """out [rows, k] float32, out[r, j] = table[index[r, j]] . hidden[r], each a fixed-order sum that
        does not depend on the other rows (the head's rescoring: models/llama.py)."""
        op = "gather_dot"
        _check_dtype(table, (torch.float32,), op, "table")
        out = self._gather_out(op, table, hidden, index)
        if index.numel() and self._gather_dot(table.data_ptr(), table.shape[1], hidden.data_ptr(), index.shape[0],
                                              index.data_ptr(), index.shape[1], out.data_ptr()) != 0:
            raise RuntimeError(f"{op}: the kernel refused the shapes")
        return out

    def gather_dot_q8(self, codes: torch.Tensor, scales: torch.Tensor, hidden: torch.Tensor,
                      index: torch.Tensor) -> torch.Tensor:
        """`gather_dot` over the table `scales * codes` (int8 codes [V, H], float32 scales [V, H / 32], one
        per 32 entries of a row): the same bits as `gather_dot` over that table in float32, from about a
        quarter of the bytes (see `linear.exact_q8`)."""
        op = "gather_dot_q8"
        _check_dtype(codes, (torch.int8,), op, "codes")
        _check_dtype(scales, (torch.float32,), op, "scales")
        _check(scales.dim() == 2 and scales.is_contiguous() and codes.shape[1] % 32 == 0
               and tuple(scales.shape) == (codes.shape[0], codes.shape[1] // 32), op,
               "scales must be [V, H / 32] and contiguous, H a multiple of 32")
        out = self._gather_out(op, codes, hidden, index)
        if index.numel() and self._gather_dot_q8(codes.data_ptr(), scales.data_ptr(), codes.shape[1],
                                                 hidden.data_ptr(), index.shape[0], index.data_ptr(),
                                                 index.shape[1], out.data_ptr()) != 0:
            raise RuntimeError(f"{op}: the kernel refused the shapes")
        return out

    @staticmethod
    def _gather_out(op: str, table: torch.Tensor, hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Check a gather's operands (the table's dtype is the caller's) and allocate its output."""
        _check_cpu(op, table, hidden, index)
        _check_dtype(hidden, (torch.float32,), op, "hidden")
        _check_dtype(index, (torch.int64,), op, "index")
        _check(table.dim() == hidden.dim() == index.dim() == 2 and table.is_contiguous() and hidden.is_contiguous()
               and index.is_contiguous() and hidden.shape[1] == table.shape[1] and index.shape[0] == hidden.shape[0],
               op, "table [V, H], hidden [rows, H] and index [rows, k] must be contiguous")
        if index.numel():
            _check(int(index.min()) >= 0 and int(index.max()) < table.shape[0], op,
                   "an index is not a row of the table")
        return torch.empty(index.shape, dtype=torch.float32)

    def top_k_rows(self, x: torch.Tensor, k: int) -> torch.Tensor | None:
        """Indices [rows, k] int64 of each row's k largest entries, largest first, lower index first on ties
        (float32 [rows, cols] contiguous x); None where k is outside 1..16."""
        _check_cpu("top_k_rows", x)
        _check_dtype(x, (torch.float32,), "top_k_rows", "x")
        _check(x.dim() == 2 and x.is_contiguous(), "top_k_rows", "x must be contiguous [rows, cols]")
        out = torch.empty(x.shape[0], k, dtype=torch.int64)
        return out if self._top_k_rows(x.data_ptr(), x.shape[0], x.shape[1], k, out.data_ptr()) == 0 else None

    def argmax_rows(self, x: torch.Tensor) -> torch.Tensor | None:
        """Indices [rows] int64 of each row's first largest entry (float32 [rows, cols] contiguous x of finite
        values: the kernel is built with finite math); None where a row is shorter than 16."""
        _check_cpu("argmax_rows", x)
        _check_dtype(x, (torch.float32,), "argmax_rows", "x")
        _check(x.dim() == 2 and x.is_contiguous(), "argmax_rows", "x must be contiguous [rows, cols]")
        out = torch.empty(x.shape[0], dtype=torch.int64)
        return out if self._argmax_rows(x.data_ptr(), x.shape[0], x.shape[1], out.data_ptr()) == 0 else None

    def llama_decode_layers(self, layers: ctypes.Array[DecodeLayer], dims: DecodeDims, x: torch.Tensor,
                            residual: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                            block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int,
                            cos_half: torch.Tensor, sin_half: torch.Tensor) -> None:
        """Run every layer in `layers` over decode rows x [B, hidden] (sequence b at row b): x becomes the
        last MLP output and residual the stream beside it. The caller vouches for the table (see
        models.llama); this checks the per-step tensors."""
        op = "llama_decode_layers"
        _check_cpu(op, x, residual, positions, slots, block_tables, context_lens, cos_half, sin_half)
        rows = x.shape[0]
        _check_dtype(x, (torch.float32,), op, "x")
        _check_dtype(residual, (torch.float32,), op, "residual")
        _check(x.dim() == 2 and x.shape[1] == dims.hidden and x.is_contiguous() and residual.is_contiguous()
               and residual.shape == x.shape, op, "x and residual must be contiguous [B, hidden]")
        _check_dtype(positions, (torch.int64,), op, "positions")
        _check_dtype(slots, (torch.int64,), op, "slots")
        _check(positions.is_contiguous() and slots.is_contiguous(), op, "positions and slots must be contiguous")
        _check_dtype(block_tables, (torch.int32,), op, "block_tables")
        _check_dtype(context_lens, (torch.int32,), op, "context_lens")
        _check(block_tables.dim() == 2 and block_tables.is_contiguous() and context_lens.is_contiguous(), op,
               "block_tables [B, max_blocks] and context_lens must be contiguous")
        _check(len(positions) == len(slots) == len(context_lens) == block_tables.shape[0] == rows, op,
               "positions, slots, context_lens and block_tables need one entry per row")
        _check_dtype(cos_half, (torch.float32,), op, "cos_half")
        _check_dtype(sin_half, (torch.float32,), op, "sin_half")
        _check(cos_half.is_contiguous() and sin_half.is_contiguous(), op, "cos_half and sin_half must be contiguous")
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
    march = kernel_march()  # a bad value is the caller's error: it raises rather than falls back
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler found: using PyTorch operators only (slower decode)")
        return None
    with _lock:
        try:
            path = _build(compiler, march)
            return CpuOps(ctypes.CDLL(str(path)), march, path)
        except (OSError, subprocess.CalledProcessError) as exc:
            log.warning("native CPU operators unavailable (%s): using PyTorch only",
                        getattr(exc, "stderr", "") or exc)
            return None

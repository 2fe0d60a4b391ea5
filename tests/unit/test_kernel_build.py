"""How the native kernels are built (`flashserve.kernels`): the target level, the flags, the cache key.

- FLASHSERVE_KERNEL_MARCH (default `native`) reaches the compiler's -march and the cache key; only levels
  with AVX-512 get -mprefer-vector-width=512; an unknown value, or a level this CPU cannot run, is a
  ValueError naming the setting, not a silent fallback.
- The library the tests load is the one built for the level asked for (scripts/test-kernel-levels.sh runs
  the kernel tests at each level), and below AVX-512 it holds no AVX-512 instruction.
- The wrappers' guards before raw-pointer calls raise ValueError/TypeError (never `assert`, which
  `python -O` strips).
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

import flashserve.kernels as kernels
from flashserve.kernels import MARCH_ENV, MARCHES, CpuOps, build_flags, cache_key, kernel_march

x86_only = pytest.mark.skipif(not kernels._is_x86(), reason="x86-64 levels apply to x86-64 hosts only")


def test_default_march_is_native(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MARCH_ENV, raising=False)
    assert kernel_march() == "native"
    monkeypatch.setenv(MARCH_ENV, "")
    assert kernel_march() == "native"


@x86_only
@pytest.mark.parametrize("march", [m for m in MARCHES if m != "native"])
def test_march_reaches_flags_and_cache_key(march: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "_cpu_id", lambda: "flags : sse2 ssse3 sse4_1 sse4_2 popcnt cx16 avx avx2 fma f16c "
                        "bmi1 bmi2 movbe avx512f avx512bw avx512cd avx512dq avx512vl")
    monkeypatch.setenv(MARCH_ENV, march)
    assert kernel_march() == march
    flags = build_flags(march)
    assert f"-march={march}" in flags and "-march=native" not in flags
    assert ("-mprefer-vector-width=512" in flags) == (march == "x86-64-v4")
    keys = {cache_key("cc", m) for m in MARCHES}
    assert len(keys) == len(MARCHES)  # every level its own library
    assert cache_key("cc", march) != cache_key("gcc-12", march)  # and every compiler


@pytest.mark.parametrize("bad", ["avx2", "x86-64-v5", "NATIVE", "haswell", "x86_64"])
def test_unknown_march_is_a_clear_error(bad: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MARCH_ENV, bad)
    with pytest.raises(ValueError, match=MARCH_ENV):
        kernel_march()
    kernels.cpu_ops.cache_clear()
    try:
        with pytest.raises(ValueError, match=MARCH_ENV):
            kernels.cpu_ops()
    finally:
        kernels.cpu_ops.cache_clear()


@x86_only
def test_a_level_above_the_cpu_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "_cpu_id", lambda: "model name : old\nflags : fpu sse sse2 ssse3 sse4_1 sse4_2 "
                        "popcnt cx16")
    monkeypatch.setenv(MARCH_ENV, "x86-64-v3")
    with pytest.raises(ValueError, match="avx2"):
        kernel_march()
    monkeypatch.setenv(MARCH_ENV, "x86-64-v2")
    assert kernel_march() == "x86-64-v2"


def test_loaded_library_is_the_level_asked_for(ops: CpuOps) -> None:
    assert ops.march == kernel_march()
    assert ops.path is not None and f"-{ops.march}-" in ops.path.name


def test_levels_below_avx512_hold_no_avx512(ops: CpuOps) -> None:
    if ops.march not in ("x86-64-v3", "x86-64-v2", "x86-64"):
        pytest.skip(f"built for {ops.march}")
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("no objdump")
    text = subprocess.run([objdump, "-d", str(ops.path)], capture_output=True, text=True, check=True).stdout
    assert "%zmm" not in text
    if ops.march != "x86-64-v3":
        assert "%ymm" not in text


def test_guards_raise_real_errors(ops: CpuOps) -> None:
    """Layout and dtype errors are ValueError/TypeError, also under `python -O`."""
    x = torch.randn(4, 32)
    with pytest.raises(ValueError, match="rms_norm"):
        ops.rms_norm(x.T, torch.ones(4), 1e-6, torch.empty(32, 4))
    with pytest.raises(TypeError, match="rms_norm"):
        ops.rms_norm(x, torch.ones(32, dtype=torch.float64), 1e-6, torch.empty_like(x))
    with pytest.raises(ValueError, match="silu_mul"):
        ops.silu_mul(x, torch.empty(4, 8))
    with pytest.raises(TypeError, match="q4_linear"):
        ops.q4_linear(x.double(), torch.zeros(320, dtype=torch.uint8), torch.empty(4, 16))
    with pytest.raises(ValueError, match="q4_linear"):
        ops.q4_linear(x, torch.zeros(100, dtype=torch.uint8), torch.empty(4, 16))
    with pytest.raises(ValueError, match="dense_linear"):
        ops.dense_linear(x.to(torch.bfloat16), torch.zeros(1, 32 * 16, dtype=torch.bfloat16), None,
                         torch.empty(4, 32))
    with pytest.raises(TypeError, match="top_k_rows"):
        ops.top_k_rows(x.double(), 4)
    with pytest.raises(ValueError, match="gather_dot"):
        ops.gather_dot(torch.randn(10, 32), x, torch.tensor([[10]] * 4))
    with pytest.raises(ValueError, match="gather_dot_q8"):  # a scale per 32 entries: [10, 1], not [10, 2]
        ops.gather_dot_q8(torch.zeros(10, 32, dtype=torch.int8), torch.ones(10, 2), x, torch.tensor([[1]] * 4))
    with pytest.raises(TypeError, match="gather_dot_q8"):
        ops.gather_dot_q8(torch.zeros(10, 32, dtype=torch.int8), torch.ones(10, 1).half(), x, torch.tensor([[1]] * 4))


def test_guards_survive_python_dash_o() -> None:
    """The same guard in a `python -O` process: still an error, not a call with a bad pointer."""
    code = ("import torch; from flashserve.kernels import cpu_ops; ops = cpu_ops(); x = torch.randn(4, 32)\n"
            "try:\n    ops.silu_mul(x, torch.empty(4, 8))\nexcept ValueError:\n    print('raised')\n")
    out = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "raised", out.stderr

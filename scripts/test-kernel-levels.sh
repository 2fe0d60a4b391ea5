#!/usr/bin/env bash
# Kernel portability runs (issue 14), called by .ci/run after `make test` (which is the native run).
#
# Each run below is the kernel and linear unit tests plus the e2e test that greedy answers in a batch equal
# the answers alone, under one setting:
#   FLASHSERVE_KERNEL_MARCH=x86-64-v3    the native kernels built for AVX2 + FMA, no AVX-512
#   FLASHSERVE_KERNEL_MARCH=x86-64       the native kernels built for SSE2 only: the plain-C paths
#   ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16  oneDNN held to Zen 4's ISA (AVX-512 with BF16, no AMX)
#   ONEDNN_MAX_CPU_ISA=AVX2              oneDNN held to AVX2
#   ATEN_CPU_CAPABILITY=avx2             PyTorch's own CPU kernels held to AVX2
# then the C harness (scripts/kernel_harness.c) built for x86-64-v4 (AVX-512 without VNNI or BF16: the
# portable paths at 512 bits) and x86-64-v2, the levels the runs above do not cover, and the aarch64
# compile check with the harness under qemu (scripts/check-kernels-aarch64.sh).
#
# Usage: scripts/test-kernel-levels.sh [setting ...]   (default: all of the above; e.g. one
# `FLASHSERVE_KERNEL_MARCH=x86-64-v3`, or `aarch64` for the aarch64 check alone). PYTHON names the
# interpreter (default .venv/bin/python). Stops at the first failing run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
UNIT=(tests/unit/test_kernel_build.py tests/unit/test_cpu_ops.py tests/unit/test_q4_linear.py
      tests/unit/test_linear.py tests/unit/test_logits.py)
E2E=tests/e2e/test_concurrency.py::test_eight_simultaneous_streams_match_requests_sent_alone
SETTINGS=("$@")
if [ ${#SETTINGS[@]} -eq 0 ]; then
    SETTINGS=(FLASHSERVE_KERNEL_MARCH=x86-64-v3 FLASHSERVE_KERNEL_MARCH=x86-64
              ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2
              harness aarch64)
fi

has_flag() { grep -qw "$1" /proc/cpuinfo; }
is_x86() { [ "$(uname -m)" = x86_64 ]; }

for setting in "${SETTINGS[@]}"; do
    start=$SECONDS
    case "$setting" in
    harness)
        if ! is_x86; then echo "== harness: not an x86-64 host, skipped"; continue; fi
        for march in x86-64-v4 x86-64-v2; do
            if [ "$march" = x86-64-v4 ] && ! has_flag avx512bw; then continue; fi
            out=$(mktemp)
            gcc -O3 -march="$march" -ffast-math -fopenmp -std=gnu11 -Wno-psabi -Wall -Werror \
                scripts/kernel_harness.c flashserve/kernels/*.c -lm -o "$out"
            echo "== harness -march=$march: $("$out")"
            rm -f "$out"
        done
        ;;
    aarch64)
        echo "== aarch64"
        scripts/check-kernels-aarch64.sh
        ;;
    FLASHSERVE_KERNEL_MARCH=*)
        march=${setting#*=}
        if ! is_x86; then echo "== $setting: not an x86-64 host, skipped"; continue; fi
        if [ "$march" = x86-64-v3 ] && ! has_flag avx2; then
            echo "== $setting: this CPU has no AVX2, skipped"; continue
        fi
        echo "== $setting"
        env "$setting" "$PY" -m pytest -q -p no:cacheprovider "${UNIT[@]}" "$E2E"
        ;;
    *=*)
        echo "== $setting"
        env "$setting" "$PY" -m pytest -q -p no:cacheprovider "${UNIT[@]}" "$E2E"
        ;;
    *)
        echo "unknown setting $setting" >&2
        exit 2
        ;;
    esac
    echo "-- $setting: $((SECONDS - start)) s"
done

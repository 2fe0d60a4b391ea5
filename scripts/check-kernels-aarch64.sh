#!/usr/bin/env bash
# aarch64 check of the native kernels (flashserve/kernels/*.c), run by scripts/test-kernel-levels.sh.
#
# 1. Compile check: the shared library flashserve builds, cross-compiled with Debian's
#    gcc-aarch64-linux-gnu at -Wall -Werror, so no x86 intrinsic or header can leak into a non-x86 build.
# 2. The C harness (scripts/kernel_harness.c: references, and rows alone == rows batched) cross-built and
#    run under qemu-user. What runs is the plain-C path: GCC vector extensions lowered to NEON.
# Not run on aarch64: PyTorch and the Python tests (no aarch64 Python environment here), and no NEON
# intrinsics path exists (the 4-bit matmul's plain-C path is the one there).
#
# The tools are installed with apt-get when missing and this runs as root (as .ci/run does); otherwise
# it stops with the packages to install. Any failure is a non-zero exit.
set -euo pipefail
cd "$(dirname "$0")/.."
CC=${AARCH64_CC:-aarch64-linux-gnu-gcc}
QEMU=${AARCH64_QEMU:-qemu-aarch64}
SYSROOT=${AARCH64_SYSROOT:-/usr/aarch64-linux-gnu}
PACKAGES=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user)

if ! command -v "$CC" >/dev/null || ! command -v "$QEMU" >/dev/null; then
    if [ "$(id -u)" != 0 ]; then
        echo "check-kernels-aarch64: $CC or $QEMU missing; install: apt-get install -y ${PACKAGES[*]}" >&2
        exit 1
    fi
    echo "check-kernels-aarch64: installing ${PACKAGES[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${PACKAGES[@]}" >/dev/null
fi

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# flashserve/kernels/__init__.py's flags for a build at an explicit level (armv8-a: the aarch64 baseline).
FLAGS=(-O3 -march=armv8-a -ffast-math -fopenmp -std=gnu11 -Wno-psabi -Wall -Werror)
"$CC" "${FLAGS[@]}" -fPIC -shared flashserve/kernels/*.c -lm -o "$out/libcpu_ops.so"
echo "check-kernels-aarch64: the kernels compile for aarch64 ($("$CC" -dumpversion), ${FLAGS[*]})"
"$CC" "${FLAGS[@]}" scripts/kernel_harness.c flashserve/kernels/*.c -lm -o "$out/kernel_harness"
echo "check-kernels-aarch64: running the kernel harness under $QEMU"
"$QEMU" -L "$SYSROOT" "$out/kernel_harness"

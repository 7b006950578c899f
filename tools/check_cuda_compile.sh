#!/usr/bin/env bash
# Compiles every csrc/cuda/*.cu with nvcc for sm_80 and sm_90, with the flags a
# torch CUDAExtension build uses, so CUDA code can be checked on machines that
# have nvcc but no GPU (and a CPU-only torch: its wheel ships the CUDA headers).
# Objects go to a temporary directory and are thrown away.
#
#   PYTHON  interpreter whose torch supplies the headers (default: python3)
#   NVCC    nvcc to use (default: nvcc on PATH, else $CUDA_HOME/bin/nvcc)
#
# Prints one line per file compiled; exits non-zero on the first failure.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
if [[ -z "${NVCC:-}" ]]; then
  if command -v nvcc >/dev/null 2>&1; then
    NVCC=nvcc
  elif [[ -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]]; then
    NVCC="$CUDA_HOME/bin/nvcc"
  else
    echo "check_cuda_compile: nvcc not found (set NVCC or CUDA_HOME)" >&2
    exit 1
  fi
fi

# Torch's include directories and the flags its extension builder gives nvcc.
# include_paths() took `cuda: bool` before torch 2.6 and `device_type: str`
# since; only the torch directories are wanted (nvcc knows its own), and asking
# for the CUDA ones fails when torch was built without CUDA.
TORCH_FLAGS=$("$PYTHON" - <<'PY'
import inspect
import os

import torch
from torch.utils import cpp_extension as ce

params = inspect.signature(ce.include_paths).parameters
if "device_type" in params:
    dirs = ce.include_paths(device_type="cpu")
else:
    dirs = ce.include_paths(cuda=False)
# -isystem: warnings inside torch's own headers are not ours to fix.
flags = [f for d in dirs for f in ("-isystem", d)]
# A CPU-only wheel ships the c10/cuda headers but not the header its CUDA build
# generates (it only sets Windows export macros); tell CUDAMacros.h to skip it.
if not any(os.path.exists(os.path.join(d, "c10/cuda/impl/cuda_cmake_macros.h")) for d in dirs):
    flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
flags += getattr(ce, "COMMON_NVCC_FLAGS", [])
flags.append("-D_GLIBCXX_USE_CXX11_ABI=%d" % int(torch._C._GLIBCXX_USE_CXX11_ABI))
print("\n".join(flags))
PY
)
mapfile -t TORCH_FLAGS <<<"$TORCH_FLAGS"

FLAGS=(
  -c -O3 -std=c++17 --expt-relaxed-constexpr --fmad=false -lineinfo
  -gencode arch=compute_80,code=sm_80
  -gencode arch=compute_90,code=sm_90
  -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H
  --compiler-options -fPIC,-Wall
  # Register spills and local-memory use show up here without a GPU (a copy of
  # the kernel argument struct to local memory would be a big slowdown).
  # Known (CUDA 13.0): ptxas may spill a few bytes in the float64 + L2 + amsgrad
  # Adam kernel on sm_90, a register-allocation choice in a rarely used variant
  # that moves with small code changes; likewise 8 bytes in the float64 Adagrad
  # kernels (the float64 division p -= clr * g / (sqrt(sum) + eps) takes nvcc's
  # slow path).
  -Xptxas -warn-spills,-warn-lmem-usage
  -I"$ROOT/csrc/include" -I"$ROOT/csrc"
  "${TORCH_FLAGS[@]}"
)

OBJ_DIR=$(mktemp -d)
trap 'rm -rf "$OBJ_DIR"' EXIT

shopt -s nullglob
SOURCES=("$ROOT"/csrc/cuda/*.cu)
if [[ ${#SOURCES[@]} -eq 0 ]]; then
  echo "check_cuda_compile: no .cu files under csrc/cuda" >&2
  exit 1
fi

echo "check_cuda_compile: $("$NVCC" --version | tail -n 1), sm_80 + sm_90"
for src in "${SOURCES[@]}"; do
  rel=${src#"$ROOT"/}
  start=$SECONDS
  if ! "$NVCC" "${FLAGS[@]}" "$src" -o "$OBJ_DIR/$(basename "$src").o"; then
    echo "FAIL $rel" >&2
    exit 1
  fi
  echo "ok   $rel ($((SECONDS - start)) s)"
done

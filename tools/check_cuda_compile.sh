#!/usr/bin/env bash
# Compiles every csrc/cuda/*.cu with nvcc for sm_80 and sm_90, with the flags a
# torch CUDAExtension build uses, and csrc/ops.cpp as a CUDA build compiles it
# (alongside, in the background), then links them into a shared object against
# the toolkit's cudart and torch's libraries as the extension build links
# fusedclip._C. So CUDA code and the CUDA link can be checked on machines that
# have the toolkit but no GPU (and a CPU-only torch: its wheel ships the CUDA
# headers). Objects and the shared object go to a temporary directory and are
# thrown away.
#
# The toolkit is the one setup.py finds (find_cuda_toolkit(): CUDA_HOME, the
# toolkit behind the nvcc on PATH, wrapper scripts resolved, the usual
# folders), so a toolkit the build would not find, or a missing libcudart.so
# ("cannot find -lcudart"), fails here as it would fail the build.
#
#   PYTHON  interpreter whose torch supplies headers and libraries (default: python3)
#   NVCC    nvcc to use (default: <toolkit>/bin/nvcc, the one the build uses)
#   CXX     C++ compiler and linker driver (default: c++, as torch's extension builder)
#
# Prints one line per file compiled and one for the link; exits non-zero on the
# first failure.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
CXX=${CXX:-c++}

# From torch and setup.py, as shell assignments: the toolkit folder and its
# library folder, torch's include flags for nvcc, and the libraries
# CUDAExtension links (those a CPU-only torch lacks listed apart).
# include_paths() took `cuda: bool` before torch 2.6 and `device_type: str`
# since; only the torch directories are wanted (nvcc knows its own), and asking
# for the CUDA ones fails when torch was built without CUDA.
SETTINGS=$(env -u FUSEDCLIP_CUDA "$PYTHON" - "$ROOT/setup.py" <<'PY'
import importlib.util
import inspect
import os
import shlex
import sys

import torch
from torch.utils import cpp_extension as ce


def emit(name, value):
    if isinstance(value, list):
        print(f"{name}=(" + " ".join(shlex.quote(v) for v in value) + ")")
    else:
        print(f"{name}={shlex.quote(value)}")


# setup.py's own toolkit search (it does not call setup() when imported).
spec = importlib.util.spec_from_file_location("fusedclip_setup", sys.argv[1])
setup_py = importlib.util.module_from_spec(spec)
try:
    spec.loader.exec_module(setup_py)
    toolkit, looked = setup_py.find_cuda_toolkit()
except SystemExit as error:
    sys.exit(f"check_cuda_compile: {error}")
if toolkit is None:
    sys.exit("check_cuda_compile: no CUDA toolkit found (" + "; ".join(looked) + "); set "
             "CUDA_HOME to the folder that holds bin/nvcc and lib64/libcudart.so")
# torch's library_paths("cuda"): lib64, else lib where only that exists.
lib = "lib64"
if not os.path.exists(os.path.join(toolkit, lib)) and os.path.exists(os.path.join(toolkit, "lib")):
    lib = "lib"
emit("TOOLKIT", toolkit)
emit("PY_INCLUDE", __import__("sysconfig").get_paths()["include"])
emit("CUDA_LIB_DIR", os.path.join(toolkit, lib))
emit("TORCH_LIB_DIR", ce.TORCH_LIB_PATH)

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
emit("TORCH_FLAGS", flags)

# CUDAExtension's libraries, in its order; cudart is the toolkit's and must be
# there. c10_cuda and torch_cuda exist only in a CUDA build of torch.
present, absent = [], []
for name in ("c10", "torch", "torch_cpu", "torch_python", "cudart", "c10_cuda", "torch_cuda"):
    if name == "cudart" or os.path.exists(os.path.join(ce.TORCH_LIB_PATH, f"lib{name}.so")):
        present.append(name)
    else:
        absent.append(name)
emit("LINK_LIBS", present)
emit("ABSENT_LIBS", absent)
PY
)
eval "$SETTINGS"
NVCC=${NVCC:-$TOOLKIT/bin/nvcc}

FLAGS=(
  -c -O3 -std=c++17 --expt-relaxed-constexpr --fmad=false -lineinfo
  -gencode arch=compute_80,code=sm_80
  -gencode arch=compute_90,code=sm_90
  -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H
  --compiler-options -fPIC,-Wall
  # Register spills and local-memory use show up here without a GPU (a copy of
  # the kernel argument struct to local memory would be a big slowdown).
  # Known (CUDA 13.0): ptxas spills 4-8 bytes in the SGD momentum kernels of
  # bfloat16/float16 without weight decay (the buffer's first-step test is a
  # per-tensor runtime flag of the generic driver, one more live value in the
  # unrolled 8-element loop), and may spill a few bytes in float64 Adam/Adagrad
  # variants (nvcc's slow path for the float64 division); register-allocation
  # choices that move with small code changes, in a few of ~80 kernels.
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

# csrc/ops.cpp, which the .cu files call into (the argument checks), compiled
# as the CUDA build compiles it, in the background while nvcc works.
CXX_FLAGS=(-c -O3 -std=c++17 -fPIC -fno-math-errno -ffp-contract=off -fopenmp -DFUSEDCLIP_WITH_CUDA
           -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H -I"$ROOT/csrc/include"
           -I"$ROOT/csrc" -isystem "$PY_INCLUDE")
for ((i = 0; i < ${#TORCH_FLAGS[@]}; i++)); do
  case "${TORCH_FLAGS[$i]}" in
    -isystem) CXX_FLAGS+=(-isystem "${TORCH_FLAGS[$((i + 1))]}"); i=$((i + 1)) ;;
    -D_GLIBCXX_USE_CXX11_ABI=*) CXX_FLAGS+=("${TORCH_FLAGS[$i]}") ;;
  esac
done
"$CXX" "${CXX_FLAGS[@]}" "$ROOT/csrc/ops.cpp" -o "$OBJ_DIR/ops.o" >"$OBJ_DIR/ops.log" 2>&1 &
OPS_PID=$!

echo "check_cuda_compile: $("$NVCC" --version | tail -n 1), sm_80 + sm_90, toolkit $TOOLKIT"
OBJECTS=()
for src in "${SOURCES[@]}"; do
  rel=${src#"$ROOT"/}
  start=$SECONDS
  obj="$OBJ_DIR/$(basename "$src").o"
  if ! "$NVCC" "${FLAGS[@]}" "$src" -o "$obj"; then
    echo "FAIL $rel" >&2
    exit 1
  fi
  OBJECTS+=("$obj")
  echo "ok   $rel ($((SECONDS - start)) s)"
done
if ! wait "$OPS_PID"; then
  cat "$OBJ_DIR/ops.log" >&2
  echo "FAIL csrc/ops.cpp (-DFUSEDCLIP_WITH_CUDA)" >&2
  exit 1
fi
echo "ok   csrc/ops.cpp with -DFUSEDCLIP_WITH_CUDA (compiled alongside)"

# The link, as the extension build does it: torch's library folder first, then
# the toolkit's, CUDAExtension's -l list. It runs with -Wl,--no-undefined so
# that the undefined symbols can be told apart. Expected, because the
# extension's other pieces define them: the CPU kernels (fusedclip::cpu::, in
# csrc/cpu/*.cpp, which the CPU build links and tests), Python's C API (an
# extension module takes it from the interpreter), and, with a CPU-only torch
# that has no libc10_cuda/libtorch_cuda, what the objects use from those
# (c10::cuda::, at::cuda::). Any other undefined symbol, or a library that is not
# found ("cannot find -lcudart"), fails the check. Then the same link without
# --no-undefined must produce the shared object.
start=$SECONDS
LINK=("$CXX" -shared -o "$OBJ_DIR/_C_cuda_check.so" "${OBJECTS[@]}" "$OBJ_DIR/ops.o"
      -L"$TORCH_LIB_DIR" -L"$CUDA_LIB_DIR" "${LINK_LIBS[@]/#/-l}" -fopenmp)
LC_ALL=C "${LINK[@]}" -Wl,--no-undefined >"$OBJ_DIR/link.log" 2>&1 || true
if grep -q "cannot find" "$OBJ_DIR/link.log"; then
  grep "cannot find" "$OBJ_DIR/link.log" >&2
  echo "FAIL link: ${LINK[*]}" >&2
  exit 1
fi
mapfile -t UNDEFINED < <(sed -n "s/.*undefined reference to \`\(.*\)'.*/\1/p" "$OBJ_DIR/link.log" \
                         | sort -u)
UNEXPECTED=()
CUDA_LIB_SYMBOLS=0
for sym in "${UNDEFINED[@]}"; do
  case "$sym" in
    fusedclip::cpu::*|Py*|_Py*) ;;
    c10::cuda::*|at::cuda::*)
      if [[ ${#ABSENT_LIBS[@]} -gt 0 ]]; then
        CUDA_LIB_SYMBOLS=$((CUDA_LIB_SYMBOLS + 1))
      else
        UNEXPECTED+=("$sym")
      fi ;;
    *) UNEXPECTED+=("$sym") ;;
  esac
done
OTHER_ERRORS=$(grep -v "undefined reference\|more undefined references\|: in function\|collect2: error\|ld returned" \
                 "$OBJ_DIR/link.log" | grep -i "error" || true)
if [[ ${#UNEXPECTED[@]} -gt 0 || -n "$OTHER_ERRORS" ]]; then
  printf 'undefined symbol: %s\n' "${UNEXPECTED[@]}" >&2
  [[ -n "$OTHER_ERRORS" ]] && echo "$OTHER_ERRORS" >&2
  echo "FAIL link: ${LINK[*]}" >&2
  exit 1
fi
if ! "${LINK[@]}" >"$OBJ_DIR/link.log" 2>&1; then
  cat "$OBJ_DIR/link.log" >&2
  echo "FAIL link: ${LINK[*]}" >&2
  exit 1
fi
NEEDED=$(readelf -d "$OBJ_DIR/_C_cuda_check.so" 2>/dev/null | sed -n 's/.*Shared library: \[\(libcudart[^]]*\)\].*/\1/p')
TORCH_LIBS=()
for lib in "${LINK_LIBS[@]}"; do [[ $lib == cudart ]] || TORCH_LIBS+=("$lib"); done
echo "ok   link: needs ${NEEDED:-<no libcudart?>} from $CUDA_LIB_DIR, torch's ${TORCH_LIBS[*]}" \
     "($((SECONDS - start)) s)"
if [[ ${#ABSENT_LIBS[@]} -gt 0 ]]; then
  echo "     CPU-only torch: no ${ABSENT_LIBS[*]}; the $CUDA_LIB_SYMBOLS c10::cuda/at::cuda symbols" \
       "the objects use from them were left undefined (found at load time in a CUDA torch)"
fi

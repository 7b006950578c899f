"""Build of the fusedclip._C extension.

The C++ CPU kernels are always built. The CUDA kernels are built when the
installed torch has CUDA and nvcc is found; FUSEDCLIP_CUDA=0/1 overrides that.
Whether a GPU is present at build time plays no part.

On x86-64 machines whose CPU has AVX2 and FMA, the CPU kernels are compiled
for them (ATen's AVX2 vectors); FUSEDCLIP_CPU_ARCH=default turns that off.
"""

import glob
import os
import platform

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def env_flag(name):
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    if value not in ("0", "1"):
        raise SystemExit(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"


def want_cuda():
    override = env_flag("FUSEDCLIP_CUDA")
    can = torch.version.cuda is not None and CUDA_HOME is not None
    if override is None:
        return can
    if override and not can:
        raise SystemExit(
            "FUSEDCLIP_CUDA=1 but the CUDA kernels cannot be built: "
            f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={CUDA_HOME!r}"
        )
    return override


def cpu_has_avx2():
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return {"avx2", "fma", "f16c"} <= set(flags)


def cpu_flags():
    arch = os.environ.get("FUSEDCLIP_CPU_ARCH", "native")
    if arch not in ("native", "default"):
        raise SystemExit(f"FUSEDCLIP_CPU_ARCH must be 'native' or 'default', got {arch!r}")
    if arch == "native" and cpu_has_avx2():
        # ATen picks its SIMD implementation from these macros.
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return []


def extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    # -fopenmp: at::parallel_for is an inline template that only runs in
    # parallel where _OPENMP is defined; the runtime is torch's own libgomp.
    cxx = ["-O3", "-std=c++17", "-fno-math-errno", "-fopenmp"] + cpu_flags()
    link = ["-fopenmp"]
    if want_cuda():
        sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
        nvcc = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
        return CUDAExtension(
            "fusedclip._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx + ["-DFUSEDCLIP_WITH_CUDA"], "nvcc": nvcc},
            extra_link_args=link,
        )
    return CppExtension(
        "fusedclip._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx},
        extra_link_args=link,
    )


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)

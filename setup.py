"""Build of the fusedclip._C extension.

The C++ CPU kernels are always built. The CUDA kernels are built when the
installed torch has CUDA and nvcc is found; FUSEDCLIP_CUDA=0/1 overrides that.
Whether a GPU is present at build time plays no part.

The CPU kernels are compiled for the widest ATen vector set the build
machine's CPU has: AVX-512 (avx512f/bw/vl/dq, ATen's AVX512 capability, which
torch itself uses on such CPUs), else AVX2 with FMA, else ATen's default.
FUSEDCLIP_CPU_ARCH=avx512, avx2 or default asks for one of them (a build that
must run on older CPUs, or a side-by-side measurement).
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


def cpu_flag_set():
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return set()
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return set()


# ATen picks its SIMD implementation (at::vec::Vectorized) from the
# CPU_CAPABILITY macros; the -m flags are those torch builds that capability with.
ARCH_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma",
               "-mf16c", "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "default": [],
}
ARCH_CPU_FLAGS = {
    "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c"},
    "avx2": {"avx2", "fma", "f16c"},
    "default": set(),
}


def cpu_arch():
    arch = os.environ.get("FUSEDCLIP_CPU_ARCH", "native")
    if arch not in ("native", *ARCH_FLAGS):
        raise SystemExit("FUSEDCLIP_CPU_ARCH must be 'native', 'avx512', 'avx2' or 'default', "
                         f"got {arch!r}")
    if arch != "native":
        return arch
    # AVX-512 halves the instructions of the bfloat16/float16 loops, whose
    # conversions make them compute-bound on 2 cores: with it, the bf16 update
    # passes of GPT-2 small ran 1.5x (AdamW), 1.3x (Adagrad) and 1.05x (SGD)
    # faster than with AVX2, fp32 the same (bench/bench_optim.py --dtype
    # bfloat16, AMD EPYC, 2 threads).
    flags = cpu_flag_set()
    return next(a for a in ("avx512", "avx2", "default") if ARCH_CPU_FLAGS[a] <= flags)


def extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    # -fopenmp: at::parallel_for is an inline template that only runs in
    # parallel where _OPENMP is defined; the runtime is torch's own libgomp.
    # -ffp-contract=off: a multiply is fused into an add only where the source
    # says so (fc_fma in csrc/include/fusedclip/math_traits.h), which is how
    # the CPU steps round exactly as torch's fused CPU kernels do.
    cxx = ["-O3", "-std=c++17", "-fno-math-errno", "-ffp-contract=off", "-fopenmp"] + ARCH_FLAGS[cpu_arch()]
    link = ["-fopenmp"]
    if want_cuda():
        sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
        # --fmad=false: as -ffp-contract=off for the CPU kernels; the rules
        # round exactly as their source says, on both backends.
        nvcc = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "--fmad=false", "-lineinfo"]
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

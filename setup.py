"""Build of the fusedclip._C extension.

The C++ CPU kernels are always built. The CUDA kernels are built when the
installed torch has CUDA and a CUDA toolkit is found (below); FUSEDCLIP_CUDA=0/1
overrides that. A GPU at build time only chooses the architectures compiled
for when TORCH_CUDA_ARCH_LIST is unset (without one: 8.0 and 9.0+PTX).

The CPU kernels (csrc/cpu/*_cpu.cpp) are compiled once per ATen vector set,
as torch compiles its own CPU kernels: ATen's default, AVX2 with FMA, and
AVX-512 (avx512f/bw/vl/dq), each in a namespace of its own
(csrc/cpu/capability.h); on other machines than x86, the default only. When
the library loads, csrc/cpu/dispatch.cpp picks the widest set the running CPU
supports, which FUSEDCLIP_CPU_CAPABILITY=default|avx2 caps at run time. The
rest of the library is compiled once, for the compiler's baseline, so a wheel
runs on any CPU of its architecture. FUSEDCLIP_CPU_ARCH=avx512, avx2 or default
builds that one set only, =native the build machine's widest (quicker builds,
side-by-side measurements). The build carries no debug information
(FUSEDCLIP_DEBUG_INFO=1 keeps it).

The CUDA toolkit is the first of: CUDA_HOME (or CUDA_PATH); the toolkit of the
nvcc on PATH, found through symlinks and wrapper scripts (a script that execs
the real nvcc, ccache); /usr/local/cuda-<torch's CUDA version>, /usr/local/cuda,
/usr/local/cuda-*, /opt/cuda. torch.utils.cpp_extension is told the folder
(CUDA_HOME) before it computes include and library paths: on its own it takes
the parent of nvcc's folder, which for a wrapper at /usr/local/bin/nvcc is
/usr/local, and the link then fails with "cannot find -lcudart".
"""

import concurrent.futures
import functools
import glob
import os
import platform
import re
import shutil
import subprocess
import sys

from setuptools import setup

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))


def env_flag(name):
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    if value not in ("0", "1"):
        raise SystemExit(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"


# -- the CUDA toolkit -------------------------------------------------------------
def toolkit_problem(home):
    """Why `home` is not a CUDA toolkit folder this build can use, or None.
    It needs bin/nvcc and, where torch looks for it (lib64, else lib), the
    libcudart.so that -lcudart links against."""
    nvcc = os.path.join(home, "bin", "nvcc")
    if not (os.path.isfile(nvcc) and os.access(nvcc, os.X_OK)):
        return f"no {nvcc}"
    if not any(os.path.exists(os.path.join(home, lib, "libcudart.so")) for lib in ("lib64", "lib")):
        return f"no libcudart.so in {home}/lib64 or {home}/lib"
    return None


def _is_elf(path):
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def toolkit_of_nvcc(nvcc):
    """The toolkit folder of the nvcc at `nvcc` (on PATH), or None: the real
    file's grandparent when it is the compiler itself; else (a wrapper script,
    ccache) the folder nvcc reports for itself in a dry run (_HERE_), else an
    absolute .../bin/nvcc named in the script's text."""
    real = os.path.realpath(nvcc)
    if _is_elf(real) and os.path.basename(real) == "nvcc":
        home = os.path.dirname(os.path.dirname(real))
        if toolkit_problem(home) is None:
            return home
    try:
        dry = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        found = re.search(r"^#\$ _HERE_=(.+)$", dry.stdout + dry.stderr, re.M)
        if found:
            home = os.path.dirname(os.path.realpath(found.group(1).strip()))
            if toolkit_problem(home) is None:
                return home
    except (OSError, subprocess.SubprocessError):
        pass
    if not _is_elf(real):
        try:
            with open(real, errors="replace") as f:
                text = f.read(65536)
        except OSError:
            text = ""
        for path in re.findall(r"(/[^\s'\"$;|&()]+)/bin/nvcc\b", text):
            if toolkit_problem(os.path.realpath(path)) is None:
                return os.path.realpath(path)
    return None


def find_cuda_toolkit():
    """(toolkit folder or None, what was looked at: a list of lines)."""
    looked = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home:
            problem = toolkit_problem(home)
            if problem:
                # Set by hand: a wrong value is an error, not a hint to look elsewhere.
                raise SystemExit(f"{var}={home} is not a CUDA toolkit folder ({problem}). "
                                 f"Set {var} to the folder that holds bin/nvcc and "
                                 "lib64/libcudart.so, or unset it, or build without the CUDA "
                                 "kernels with FUSEDCLIP_CUDA=0.")
            return home, looked
        looked.append(f"{var}: not set")
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = toolkit_of_nvcc(nvcc)
        if home:
            return home, looked
        looked.append(f"nvcc on PATH ({nvcc} -> {os.path.realpath(nvcc)}): no toolkit found "
                      "behind it")
    else:
        looked.append("nvcc on PATH: none")
    usual = []
    if torch.version.cuda:
        usual.append(f"/usr/local/cuda-{torch.version.cuda}")
    usual.append("/usr/local/cuda")

    def version_key(path):
        return [int(n) for n in re.findall(r"\d+", os.path.basename(path))]

    usual += sorted(glob.glob("/usr/local/cuda-*"), key=version_key, reverse=True)
    usual.append("/opt/cuda")
    for home in dict.fromkeys(usual):
        if toolkit_problem(home) is None:
            return home, looked
    looked.append("usual folders: " + ", ".join(dict.fromkeys(usual)) + ": none is a toolkit")
    return None, looked


def cuda_toolkit():
    """The toolkit folder for a build with the CUDA kernels, or None when they
    are not built. FUSEDCLIP_CUDA=1 without a CUDA torch or a toolkit is an
    error that says what to set."""
    override = env_flag("FUSEDCLIP_CUDA")
    if override is False:
        return None
    if torch.version.cuda is None:
        if override:
            raise SystemExit(
                f"FUSEDCLIP_CUDA=1 but the installed torch ({torch.__version__}) was built "
                "without CUDA (torch.version.cuda is None): install a CUDA build of torch, "
                "or build the CPU kernels only with FUSEDCLIP_CUDA=0.")
        return None
    home, looked = find_cuda_toolkit()
    if home is None:
        message = ("no CUDA toolkit found (" + "; ".join(looked) + "). Set CUDA_HOME to the "
                   "toolkit folder, the one that holds bin/nvcc and lib64/libcudart.so "
                   f"(e.g. CUDA_HOME=/usr/local/cuda-{torch.version.cuda})")
        if override:
            raise SystemExit("FUSEDCLIP_CUDA=1 but " + message + ".")
        print(f"setup.py: building the CPU kernels only: {message}, or FUSEDCLIP_CUDA=1 to "
              "make this an error.", file=sys.stderr)
        return None
    return home


CUDA_TOOLKIT = cuda_toolkit()
if CUDA_TOOLKIT is not None:
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported and computes
    # include dirs, library dirs and nvcc's path from it; tell it before, and
    # after too in case something imported it already.
    os.environ["CUDA_HOME"] = CUDA_TOOLKIT
from torch.utils import cpp_extension  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

if CUDA_TOOLKIT is not None:
    cpp_extension.CUDA_HOME = CUDA_TOOLKIT

# torch.utils.cpp_extension takes the GPU architectures from TORCH_CUDA_ARCH_LIST,
# else from the GPUs it sees; with neither (a build machine or container without a
# GPU) torch 2.11 fails with "IndexError: list index out of range". Without a GPU
# the build targets the architectures CI compiles for, A100 and H100/H200 (the PTX
# of sm_90 runs, JIT-compiled, on newer ones), and says how to choose others.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"


def missing_cuda_arch_list():
    """The architectures to build for where torch would find none: no
    TORCH_CUDA_ARCH_LIST and no visible GPU (else None: torch's own choice)."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST") or torch.cuda.is_available():
        return None
    return DEFAULT_CUDA_ARCH_LIST


def want_cuda():
    return CUDA_TOOLKIT is not None


def is_x86():
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def cpu_flag_set():
    if not is_x86():
        return set()
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return set()


# ATen picks its SIMD implementation (at::vec::Vectorized) from the
# CPU_CAPABILITY macros, which also name the namespace each copy of the CPU
# kernels lives in; the -m flags are those torch builds that capability with.
ARCH_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma",
               "-mf16c", "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "default": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"],
}
ARCH_CPU_FLAGS = {
    "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c"},
    "avx2": {"avx2", "fma", "f16c"},
    "default": set(),
}
# The kernels compiled once per vector set; every other source is compiled once.
CPU_KERNEL_SOURCES = sorted(glob.glob("csrc/cpu/*_cpu.cpp"))


def compiler_accepts(flags):
    """Whether the C++ compiler takes these flags (an old one may lack AVX-512)."""
    compiler = os.environ.get("CXX", "c++")
    try:
        result = subprocess.run([compiler, *flags, "-x", "c++", "-E", "-o", os.devnull, os.devnull],
                                capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0


@functools.lru_cache(maxsize=None)
def cpu_arch_sets():
    """The vector sets to compile the CPU kernels for, narrowest first."""
    arch = os.environ.get("FUSEDCLIP_CPU_ARCH", "all")
    if arch not in ("all", "native", *ARCH_FLAGS):
        raise SystemExit("FUSEDCLIP_CPU_ARCH must be 'all' (the default), 'native', 'avx512', "
                         f"'avx2' or 'default', got {arch!r}")
    if not is_x86():
        if arch in ("avx512", "avx2"):
            raise SystemExit(f"FUSEDCLIP_CPU_ARCH={arch} is an x86 vector set; this machine is "
                             f"{platform.machine()}")
        return ["default"]
    if arch == "all":
        return ["default"] + [a for a in ("avx2", "avx512") if compiler_accepts(ARCH_FLAGS[a])]
    if arch != "native":
        return [arch]
    # AVX-512 halves the instructions of the bfloat16/float16 loops, whose
    # conversions make them compute-bound on 2 cores: with it, the bf16 update
    # passes of GPT-2 small ran 1.5x (AdamW), 1.3x (Adagrad) and 1.05x (SGD)
    # faster than with AVX2, fp32 the same (bench/bench_optim.py --dtype
    # bfloat16, AMD EPYC, 2 threads).
    flags = cpu_flag_set()
    return [next(a for a in ("avx512", "avx2", "default") if ARCH_CPU_FLAGS[a] <= flags)]



class BuildExt(BuildExtension):
    """torch's BuildExtension, which first compiles the CPU kernels once per
    vector set (each set's objects in a folder of its own, the sets in
    parallel) and links them after the other sources' objects. The order
    matters where an inline function of a shared header (update_op.h,
    include/fusedclip/) is emitted in several objects: the linker keeps the
    first copy, which is then one compiled for the baseline, not for AVX-512."""

    def build_extension(self, ext):
        cxx = ext.extra_compile_args["cxx"]  # BuildExtension made it a dict, with its flags

        def compile_set(arch):
            return self.compiler.compile(
                CPU_KERNEL_SOURCES, output_dir=os.path.join(self.build_temp, "cpu_" + arch),
                macros=ext.define_macros, include_dirs=ext.include_dirs, debug=self.debug,
                extra_postargs={"cxx": cxx + ARCH_FLAGS[arch]}, depends=ext.depends)

        with concurrent.futures.ThreadPoolExecutor(len(cpu_arch_sets())) as pool:
            per_set = list(pool.map(compile_set, cpu_arch_sets()))
        ext.extra_objects = list(ext.extra_objects or []) + [o for objs in per_set for o in objs]
        super().build_extension(ext)


def extension():
    sources = sorted(set(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
                     - set(CPU_KERNEL_SOURCES))
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    # -fopenmp: at::parallel_for is an inline template that only runs in
    # parallel where _OPENMP is defined; the runtime is torch's own libgomp.
    # -ffp-contract=off: a multiply is fused into an add only where the source
    # says so (fc_fma in csrc/include/fusedclip/math_traits.h), which is how
    # the CPU steps round exactly as torch's fused CPU kernels do.
    # -g0: Python's own flags ask for debug information (-g), which made the
    # library 18 MB.
    debug_info = env_flag("FUSEDCLIP_DEBUG_INFO")
    cxx = ["-O3", "-std=c++17", "-fno-math-errno", "-ffp-contract=off", "-fopenmp",
           "-g" if debug_info else "-g0"]
    # dispatch.cpp registers the sets that were built.
    cxx += [f"-DFUSEDCLIP_CPU_{arch.upper()}" for arch in cpu_arch_sets()]
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


# tools/check_cuda_compile.sh imports this file for find_cuda_toolkit(); pip
# (setuptools.build_meta) and `python setup.py` run it as __main__.
if __name__ == "__main__":
    if CUDA_TOOLKIT is not None:
        print(f"setup.py: CUDA kernels on, toolkit {CUDA_TOOLKIT}", file=sys.stderr)
        arch_list = missing_cuda_arch_list()
        if arch_list is not None:
            os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
            print(f"setup.py: no GPU visible and TORCH_CUDA_ARCH_LIST unset: building for "
                  f"{arch_list} (set TORCH_CUDA_ARCH_LIST for other GPUs, e.g. '8.6;8.9')",
                  file=sys.stderr)
    setup(
        ext_modules=[extension()],
        cmdclass={"build_ext": BuildExt.with_options(use_ninja=True)},
    )

"""The CPU kernels' tuning (fusedclip.ops.cpu_tuning): what it reports, how the
software-prefetch distance is set and refused, and that the distance changes
no result, only the speed; which copy of the kernels runs (one per vector set,
csrc/cpu/dispatch.cpp), how FUSEDCLIP_CPU_CAPABILITY caps it, and that no
vector code of one set ends up in code that every CPU runs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import fusedclip
from fusedclip import ops

OPTIMIZERS = {
    "adamw": lambda params: fusedclip.FusedClipAdamW(params, lr=1e-2, clip=1.0),
    "sgd": lambda params: fusedclip.FusedClipSGD(params, lr=0.1, momentum=0.9, clip=1.0),
    "adagrad": lambda params: fusedclip.FusedClipAdagrad(params, lr=0.1, clip=1.0),
}
# Enough elements for the parallel path and several chunks, with odd tails.
SHAPES = [(300, 257), (70001,), (1000,), (5,), ()]


@pytest.fixture
def restore_distance():
    saved = ops.cpu_tuning()[1]
    yield
    ops.cpu_tuning(saved)


def test_reports_the_vector_set_and_the_distance():
    arch, distance = ops.cpu_tuning()
    assert arch in ("avx512", "avx2", "default")
    assert 0 <= distance <= 1 << 20


def test_sets_the_distance(restore_distance):
    arch = ops.cpu_tuning()[0]
    assert ops.cpu_tuning(4096) == (arch, 4096)
    assert ops.cpu_tuning() == (arch, 4096)
    assert ops.cpu_tuning(0) == (arch, 0)


@pytest.mark.parametrize("bad", [-1, (1 << 20) + 1])
def test_a_bad_distance_is_refused_and_changes_nothing(restore_distance, bad):
    before = ops.cpu_tuning(512)
    with pytest.raises(RuntimeError, match=r"prefetch_distance must be a prefetch distance in bytes"):
        ops.cpu_tuning(bad)
    assert ops.cpu_tuning() == before


def run_python(code: str, prefetch_env: str | None = None, capability_env: str | None = None,
               aten_capability_env: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    for name, value in (("FUSEDCLIP_CPU_PREFETCH", prefetch_env),
                        ("FUSEDCLIP_CPU_CAPABILITY", capability_env),
                        ("ATEN_CPU_CAPABILITY", aten_capability_env)):
        env.pop(name, None)
        if value is not None:
            env[name] = value
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)


def test_the_environment_sets_the_starting_distance():
    result = run_python("from fusedclip import ops; print(ops.cpu_tuning()[1])", "1024")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1024"


@pytest.mark.parametrize("value, message", [
    ("abc", r"FUSEDCLIP_CPU_PREFETCH must be a number of bytes, got 'abc'"),
    ("-64", r"FUSEDCLIP_CPU_PREFETCH must be a prefetch distance in bytes from 0 \(none\)"),
])
def test_a_bad_environment_fails_at_import(value, message):
    result = run_python("import fusedclip", value)
    assert result.returncode != 0
    assert re.search(message, result.stderr), result.stderr


def train(kind: str, dtype: torch.dtype, distance: int) -> tuple[list, list, list]:
    """Three clipped steps from the same start, with the given prefetch
    distance: the parameters, the state tensors and the global norms."""
    ops.cpu_tuning(distance)
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]
    opt = OPTIMIZERS[kind](params)
    norms = []
    for _ in range(3):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) * 0.1).to(dtype)
        opt.step()
        norms.append(opt.clip_stats["grad_norm"])
    state = [v for p in params for v in opt.state[p].values() if isinstance(v, torch.Tensor)]
    return params, state, norms


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_the_distance_changes_no_result(restore_distance, kind, dtype):
    expected = train(kind, dtype, 0)
    for distance in (64, 2048):
        actual = train(kind, dtype, distance)
        for what, a_list, e_list in zip(("params", "state", "norms"), actual, expected):
            assert len(a_list) == len(e_list)
            for a, e in zip(a_list, e_list):
                assert torch.equal(a, e), f"{kind} {dtype}: {what} differ with distance {distance}"


# -- the vector set (csrc/cpu/dispatch.cpp) ------------------------------------------------------
SETS = ["default", "avx2", "avx512"]  # narrowest first
ARCH_OF = "from fusedclip import ops; print(ops.cpu_tuning()[0])"


def widest_set() -> str:
    """The set the kernels run without a cap: the widest this CPU and this build have."""
    result = run_python(ARCH_OF)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.parametrize("cap", SETS)
def test_the_capability_caps_the_vector_set(cap):
    widest = widest_set()
    result = run_python(ARCH_OF + "; import torch, fusedclip; p = torch.nn.Parameter("
                        "torch.ones(37)); p.grad = torch.ones(37); "
                        "fusedclip.FusedClipAdamW([p], clip=1.0).step()", capability_env=cap)
    if result.returncode != 0 and "cannot run on this CPU" in result.stderr:
        pytest.skip("this build has some of the vector sets only (FUSEDCLIP_CPU_ARCH)")
    assert result.returncode == 0, result.stderr
    # The cap, or the widest set this CPU runs where that is narrower.
    assert result.stdout.strip() == min(cap, widest, key=SETS.index)


def test_a_bad_capability_fails_at_import():
    result = run_python("import fusedclip", capability_env="sse2")
    assert result.returncode != 0
    assert re.search(r"FUSEDCLIP_CPU_CAPABILITY must be 'default', 'avx2' or 'avx512', "
                     r"got 'sse2'", result.stderr), result.stderr


def functions_with_wide_registers(library: str) -> dict[str, set[str]]:
    """Each function of the library's code that uses ymm or zmm registers, with
    which of the two it uses (objdump's demangled names)."""
    listing = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", library],
                             capture_output=True, text=True, check=True, timeout=300).stdout
    found: dict[str, set[str]] = {}
    name = None
    for line in listing.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            name = header.group(1)
        elif name is not None and ("%ymm" in line or "%zmm" in line):
            found.setdefault(name, set()).update(re.findall(r"%([yz]mm)", line))
    return found


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump (binutils)")
def test_wide_vector_code_only_in_its_sets_namespace():
    """Code that uses AVX registers must be a copy of the kernels for that set
    (fusedclip::cpu::AVX2, ::AVX512, at::vec::AVX2, ...; capability.h), never
    code that every CPU runs: an inline function that several copies emit once
    each would otherwise be linked once, maybe as its AVX-512 body (setup.py
    links the default copy and the shared code first)."""
    import fusedclip._C

    found = functions_with_wide_registers(fusedclip._C.__file__)
    wrong = [f"{name} ({', '.join(sorted(regs))})" for name, regs in found.items()
             if not ("AVX512" in name or ("AVX2" in name and "zmm" not in regs))]
    assert not wrong, "AVX code outside its vector set's namespace:\n" + "\n".join(wrong[:20])


# Run in a process of its own per vector set, both libraries capped at it:
# torch's fused CPU step and fusedclip's (clip=None) over three steps, on
# tensors of every length up to two AVX-512 float vectors and one, so that
# every tail length of every set is met; the cases fuse multiply-adds (weight
# decay, the momentum blend, Nesterov, the second moment) and take both
# branches of Adam's lerp (1 - beta1 below and above 0.5). Prints what differs.
SAME_AS_TORCH = """
import torch, fusedclip
cases = [
    (torch.optim.SGD, fusedclip.FusedClipSGD, dict(lr=0.1, momentum=0.9, weight_decay=0.1)),
    (torch.optim.SGD, fusedclip.FusedClipSGD,
     dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1)),
    (torch.optim.Adam, fusedclip.FusedClipAdam, dict(lr=0.1, weight_decay=0.1, amsgrad=True)),
    (torch.optim.AdamW, fusedclip.FusedClipAdamW, dict(lr=0.1, betas=(0.2, 0.9))),
    (torch.optim.Adagrad, fusedclip.FusedClipAdagrad, dict(lr=0.1, weight_decay=0.1)),
]
gen = torch.Generator().manual_seed(0)
sizes = range(1, 34)
for twin, fused_cls, kwargs in cases:
    for dtype in (torch.float32, torch.float64):
        init = [torch.randn(n, generator=gen, dtype=dtype) for n in sizes]
        grads = [[torch.randn(n, generator=gen, dtype=dtype) for n in sizes] for _ in range(3)]
        results = []
        for make in (lambda p: twin(p, fused=True, **kwargs), lambda p: fused_cls(p, **kwargs)):
            params = [torch.nn.Parameter(x.clone()) for x in init]
            opt = make(params)
            for step_grads in grads:
                for p, g in zip(params, step_grads):
                    p.grad = g.clone()
                opt.step()
            results.append(params)
        for n, a, b in zip(sizes, *results):
            if not torch.equal(a, b):
                print(f"{fused_cls.__name__} {kwargs} {dtype} n={n}: differs")
print(fusedclip.ops.cpu_tuning()[0], torch.backends.cpu.get_cpu_capability())
"""


@pytest.mark.parametrize("cap", SETS)
def test_each_set_is_torchs_fused_step_bit_for_bit(cap):
    """The bitwise checks of tests/test_bitwise_torch.py, in short, for each
    set this CPU runs: torch's default build rounds every a * b + c twice,
    its AVX2 and AVX-512 ones fuse it (csrc/cpu/lanes.h)."""
    widest = widest_set()
    if SETS.index(cap) > SETS.index(widest):
        pytest.skip(f"this CPU (or build) runs {widest} at most")
    result = run_python(SAME_AS_TORCH, capability_env=cap, aten_capability_env=cap)
    assert result.returncode == 0, result.stderr
    *differ, sets = result.stdout.strip().splitlines()
    assert sets == f"{cap} {cap.upper()}"  # both libraries ran the set
    assert not differ, "\n".join(differ)

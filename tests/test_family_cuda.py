"""The CUDA kernels of sgd_ and adagrad_: the CPU kernels' contract on a GPU.

Skipped without a GPU or without those kernels in the build (see
docs/GPU_RUNBOOK.md). NOTE: written without a GPU at hand; these tests have
not run yet. What they check:

- trajectories of FusedClipSGD / FusedClipAdagrad on CUDA against the CPU
  kernels (CUDA_VS_CPU) and the float64 reference (REFERENCE), over random
  configurations of every argument and dtype;
- torch.library.opcheck of both ops on CUDA tensors;
- more tensors than one launch takes (37 at depth 6, 50 at depth 4), more
  chunks than one launch takes, odd sizes, misaligned views;
- the momentum buffer's first step after skipped ones, read from the device
  counter with no host sync; CUDA-graph capture and replay of opt.step();
- ValueClip and AGC (clip_value, unit_coefs: the shared gradient transform)
  against the CPU kernels, and opcheck of those arguments.
"""

from __future__ import annotations

import math

import pytest
import torch

import fusedclip

import legacy_ops
from conftest import assert_unchanged, bitwise_equal, clip_policy, flat, make_tensor, snapshot
from family import (
    FUSED, assert_matches_reference, assert_states_close, make_reference, random_configs,
)
from tolerances import CUDA_VS_CPU, REFERENCE


def _has_cuda_kernel(op: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")
    except Exception:
        return False


pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.skipif(
        not all(_has_cuda_kernel(op) for op in ("fusedclip::sgd_", "fusedclip::adagrad_")),
        reason="fusedclip._C was built without CUDA kernels (rebuild with FUSEDCLIP_CUDA=1)"),
]

DEV = "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# Launch limits of csrc/cuda/multi_tensor_apply.cuh: tensors per launch at
# depth 6 (param, grad, unit coefficients, unit length, buffer or sum, counter)
# and depth 4 (plain SGD).
TENSORS_PER_LAUNCH = {6: 37, 4: 50}
ODD_SIZES = [0, 1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 33, 127, 129, 511, 512, 513, 4097,
             65535, 65536, 65537, 131073]


def to_device(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=DEV)
    out.copy_(t)
    return out


def _mirror(opt, params):
    """CPU copies of parameters and state, dressed as an optimizer."""
    from types import SimpleNamespace

    cpu = [p.detach().cpu() for p in params]
    state = {c: {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in opt.state[p].items()}
             for p, c in zip(params, cpu) if p in opt.state}
    index = {id(p): c for p, c in zip(params, cpu)}
    groups = [dict(g, params=[index[id(p)] for p in g["params"] if id(p) in index])
              for g in opt.param_groups]
    return SimpleNamespace(state=state, param_groups=groups), cpu


CONFIGS = (random_configs("SGD", 8, seed=77_001, against="reference")
           + random_configs("Adagrad", 8, seed=77_002, against="reference"))


@pytest.mark.parametrize("config", CONFIGS)
def test_trajectory_cuda_vs_cpu_and_reference(config):
    kind, problem, clip = config["kind"], config["problem"], config["clip"]
    cls = FUSED[kind]
    cpu_params = problem.params()
    cuda_params = [[torch.nn.Parameter(to_device(p.detach())) for p in g] for g in cpu_params]
    cuda_groups = problem.param_groups(cuda_params)
    for g in cuda_groups:
        if isinstance(g.get("lr"), torch.Tensor):
            g["lr"] = g["lr"].to(DEV)
    cpu_opt = cls(problem.param_groups(cpu_params), **config["defaults"], clip=clip_policy(clip))
    cuda_opt = cls(cuda_groups, **config["defaults"], clip=clip_policy(clip))
    ref = make_reference(kind, problem, problem.params(), clip, config["defaults"])
    cpu_flat, cuda_flat = flat(cpu_params), flat(cuda_params)
    for step in range(config["steps"]):
        grads = problem.grads(step)
        for p, d, g in zip(cpu_flat, cuda_flat, grads):
            p.grad = None if g is None else g.clone()
            d.grad = None if g is None else to_device(g)
        cpu_opt.step()
        cuda_opt.step()
        ref.step(grads)
    mirror, mirror_params = _mirror(cuda_opt, cuda_flat)
    assert_states_close(kind, mirror, cpu_opt, mirror_params, cpu_flat,
                        CUDA_VS_CPU[problem.dtype], "cuda vs cpu")
    assert_matches_reference(kind, mirror, mirror_params, ref, problem,
                             REFERENCE[problem.dtype], "cuda vs reference")
    for p, c in zip(cuda_flat, cpu_flat):
        assert p.stride() == c.stride()


# -- opcheck ------------------------------------------------------------------------------------
def _cuda_samples():
    from test_family_ops import _samples

    for param in _samples():
        yield param


@pytest.mark.parametrize("op,dtype,options", list(_cuda_samples()))
def test_opcheck_cuda(op, dtype, options):
    from test_family_ops import OPS

    fn, sample = OPS[op]
    args, kwargs = sample(dtype, **options)
    args = tuple([to_device(t) for t in group] for group in args)
    kwargs = {k: (v.to(DEV) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    legacy_ops.opcheck(fn, args, kwargs)


# -- sizes, launch limits, alignment ---------------------------------------------------------------
KINDS = {
    "sgd-plain": (fusedclip.FusedClipSGD, dict(weight_decay=0.1)),
    "sgd-momentum": (fusedclip.FusedClipSGD, dict(momentum=0.9, dampening=0.3, weight_decay=0.1)),
    "sgd-nesterov": (fusedclip.FusedClipSGD, dict(momentum=0.9, nesterov=True, maximize=True)),
    "adagrad": (fusedclip.FusedClipAdagrad, dict(lr_decay=0.1, weight_decay=0.1,
                                                 initial_accumulator_value=0.1)),
}


def _pair(kind, specs, dtype, *, seed=0, misaligned=None, clip=1.0):
    cls, kwargs = KINDS[kind]
    gen = torch.Generator().manual_seed(seed)
    cpu = [make_tensor(s, lay, gen, dtype) for s, lay in specs]
    cuda = [to_device(t) for t in cpu]
    if misaligned is not None:
        base = torch.empty(cuda[misaligned].numel() + 1, dtype=dtype, device=DEV)
        view = base[1:].view(cuda[misaligned].shape)
        view.copy_(cuda[misaligned])
        cuda[misaligned] = view
    out = []
    for tensors, device in ((cpu, "cpu"), (cuda, DEV)):
        params = [torch.nn.Parameter(t) for t in tensors]
        out.append((params, cls(params, lr=torch.tensor(0.01, device=device), clip=clip, **kwargs)))
    if misaligned is not None:
        assert out[1][0][misaligned].data_ptr() % 16 != 0
    return out


def _run_pair(kind, pair, steps, dtype, poison_step=None):
    (cpu_params, cpu_opt), (cuda_params, cuda_opt) = pair
    for step in range(steps):
        gen = torch.Generator().manual_seed(100 + step)
        for i, (pc, pd) in enumerate(zip(cpu_params, cuda_params)):
            g = (torch.randn(pc.shape, generator=gen, dtype=torch.float64) * 0.1).to(dtype)
            if step == poison_step and i == 0 and g.numel():
                g.view(-1)[0] = math.nan
            pc.grad, pd.grad = g, to_device(g)
        cpu_opt.step()
        cuda_opt.step()
    mirror, mirror_params = _mirror(cuda_opt, cuda_params)
    family_kind = "Adagrad" if kind == "adagrad" else "SGD"
    assert_states_close(family_kind, mirror, cpu_opt, mirror_params, cpu_params,
                        CUDA_VS_CPU[dtype], f"{kind} cuda vs cpu")


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_odd_sizes(kind, dtype):
    specs = [((n,), "contiguous") for n in ODD_SIZES] + [((), "contiguous")]
    _run_pair(kind, _pair(kind, specs, dtype), 3, dtype)


@pytest.mark.parametrize("kind", list(KINDS))
def test_more_tensors_than_one_launch(kind):
    small = [((0,), "contiguous"), ((), "contiguous"), ((1,), "contiguous"),
             ((3, 5), "transposed"), ((17,), "contiguous"), ((4097,), "contiguous")]
    specs = [small[i % len(small)] for i in range(3 * TENSORS_PER_LAUNCH[4] + 7)]
    _run_pair(kind, _pair(kind, specs, torch.float32), 3, torch.float32)


@pytest.mark.parametrize("kind", ["sgd-momentum", "adagrad"])
def test_more_chunks_than_one_launch(kind):
    specs = [((1000,), "contiguous")] * 5 + [((25_000_000,), "contiguous"), ((33,), "contiguous")]
    _run_pair(kind, _pair(kind, specs, torch.float32), 2, torch.float32)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_misaligned_and_strided(kind, dtype):
    specs = [((70001,), "contiguous"), ((33, 65), "transposed"), ((129, 40), "slice"),
             ((2, 3, 5, 7), "channels_last"), ((), "contiguous"), ((0, 3), "contiguous")]
    _run_pair(kind, _pair(kind, specs, dtype, misaligned=0), 3, dtype)


# -- the first momentum step after skipped ones, with no host sync ------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_skipped_first_step_no_sync(dtype):
    """Poisoned first steps are skipped on the device (no host sync) and the
    next step is the buffers' first (buf = g: dampening does not apply), as
    the CPU kernels do."""
    specs = [((5, 7), "contiguous"), ((), "contiguous"), ((0,), "contiguous"),
             ((6, 4), "transposed"), ((3, 8), "slice"), ((70001,), "contiguous")]
    pair = _pair("sgd-momentum", specs, dtype)
    (cpu_params, cpu_opt), (cuda_params, cuda_opt) = pair
    for step in range(5):
        gen = torch.Generator().manual_seed(step)
        for pc, pd in zip(cpu_params, cuda_params):
            g = torch.randn(pc.shape, generator=gen, dtype=torch.float64).to(dtype)
            pc.grad, pd.grad = g.clone(), to_device(g)
        if step < 2:
            cpu_params[5].grad[7] = math.nan
            cuda_params[5].grad[7] = math.nan
        if step == 1:
            before = snapshot(cuda_opt, cuda_params)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            cuda_opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        cpu_opt.step()
        if step == 1:
            assert_unchanged(cuda_opt, cuda_params, before, "second skipped step")
    assert int(cuda_opt.clip_stats["skipped"]) == 2
    mirror, mirror_params = _mirror(cuda_opt, cuda_params)
    assert_states_close("SGD", mirror, cpu_opt, mirror_params, cpu_params, CUDA_VS_CPU[dtype],
                        "after skipped first steps")


# -- CUDA graphs --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sgd-momentum", "adagrad"])
def test_cuda_graph_capture_and_replay(kind):
    """opt.step() captured once and replayed equals eager steps bit for bit;
    a poisoned replay is skipped."""
    cls, kwargs = KINDS[kind]
    specs = [((5, 7), "contiguous"), ((), "contiguous"), ((0,), "contiguous"),
             ((6, 4), "transposed"), ((3, 8), "slice"), ((200_003,), "contiguous")]

    def setup():
        gen = torch.Generator().manual_seed(6)
        params = [torch.nn.Parameter(to_device(make_tensor(s, lay, gen, torch.float32)))
                  for s, lay in specs]
        for p in params:
            p.grad = torch.zeros_like(p)
        return params, cls(params, lr=torch.tensor(0.01, device=DEV), clip=1.0, **kwargs)

    def fill(params, step, poison=False):
        gen = torch.Generator().manual_seed(100 + step)
        for p in params:
            p.grad.copy_(torch.randn(p.shape, generator=gen))
        if poison:
            params[5].grad[7] = math.inf

    eager_p, eager = setup()
    graph_p, graphed = setup()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for step in range(3):
            fill(graph_p, step)
            graphed.step()
    torch.cuda.current_stream().wait_stream(side)
    for step in range(3):
        fill(eager_p, step)
        eager.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed.step()
    for step in range(3, 8):
        poison = step == 5
        fill(eager_p, step, poison)
        fill(graph_p, step, poison)
        eager.step()
        graph.replay()
        torch.cuda.synchronize()
        for a, b in zip(eager_p, graph_p):
            assert bitwise_equal(a.detach(), b.detach()), f"step {step}"
            for key in eager.state[a]:
                assert bitwise_equal(eager.state[a][key], graphed.state[b][key]), (step, key)
    assert int(graphed.clip_stats["skipped"]) == 1


# -- ValueClip and AGC: the shared gradient transform ------------------------------------------
def _transform_cuda_samples():
    from test_family_ops import _transform_opcheck_samples

    yield from _transform_opcheck_samples()


def _on_device(v):
    if isinstance(v, torch.Tensor):
        return to_device(v)
    if isinstance(v, list):
        return [to_device(t) for t in v]
    return v


@pytest.mark.parametrize("fn,args,kwargs", list(_transform_cuda_samples()))
def test_opcheck_grad_transform_cuda(fn, args, kwargs):
    args = tuple([to_device(t) for t in group] for group in args)
    legacy_ops.opcheck(fn, args, {k: _on_device(v) for k, v in kwargs.items()})


TRANSFORM_SPECS = [((5, 7), "contiguous"), ((3, 20000), "contiguous"), ((6, 4), "transposed"),
                   ((4, 6), "slice"), ((97,), "contiguous"), ((), "contiguous"), ((0,), "contiguous")]


@pytest.mark.parametrize("policy", ["ValueClip(0.05)", "AGC(0.3)"])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grad_transform_cuda_vs_cpu(kind, dtype, policy):
    """Units that span chunks (3 x 20000), non-contiguous parameters (row-major
    stand-ins), a skipped step; the CPU kernels are the oracle."""
    clip = fusedclip.ValueClip(0.05) if policy.startswith("Value") else fusedclip.AGC(0.3)
    pair = _pair(kind, TRANSFORM_SPECS, dtype, seed=3, clip=clip)
    _run_pair(kind, pair, 5, dtype, poison_step=2)

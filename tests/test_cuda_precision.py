"""The CUDA kernel of the mixed-precision update ops (issue 20: fp32 masters,
int16 remainders, states of another dtype, stochastic rounding), at the op
level, with the CPU kernels as the oracle (csrc/cuda/update_cuda.cu's
MixedUpdateFunctor against csrc/cpu/update_cpu.cpp's mixed path).

Both backends compute every element in float32 from the same inputs with the
same rule headers, and round with the same functions of
include/fusedclip/precision.h, the random bits keyed by the same [seed,
counter] and the same tensor element index. So where the CPU kernel takes no
scalar tail (sizes that are multiples of 64: SCALAR_TAIL rounds Adam's and
SGD's tail elements as torch's scalar code does) and the clip coefficients are
given, every stored bit agrees: parameters, masters, remainders, states, and
the stochastically rounded values too. Elsewhere tolerances.CUDA_VS_CPU
applies, per stored dtype.

Skipped without a GPU or without the CUDA kernels in the build, as
test_cuda.py; ``FUSEDCLIP_CUDA_TESTS_ON_CPU=1`` runs the bodies on the CPU
against the CPU kernels (every comparison then holds trivially: it rehearses
the test code).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from fusedclip import ops

from helpers import bitwise_equal, assert_close, cuda_skips, misaligned_copy, no_host_reads, \
    to_device
from registry import RULES
from tolerances import CUDA_VS_CPU

REHEARSE = os.environ.get("FUSEDCLIP_CUDA_TESTS_ON_CPU") == "1"
DEV = "cpu" if REHEARSE else "cuda"
if not REHEARSE:
    pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

# The op-level cases of the CPU tests, run here on CUDA.
from test_precision_ops import HYPER, LR, RULE_NAMES  # noqa: E402

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
# (params, states, master: None / "full" / "remainder", stochastic rounding)
MODES = {
    "master-bf16": (BF16, FP32, "full", False),
    "master-fp16": (FP16, FP32, "full", False),
    "remainder-bf16": (BF16, FP32, "remainder", False),
    "master-bf16-bf16state-sr": (BF16, BF16, "full", True),
    "remainder-bf16-fp16state-sr": (BF16, FP16, "remainder", True),
    "fp32-bf16state": (FP32, BF16, None, False),
    "fp32-fp16state": (FP32, FP16, None, False),
    "bf16-fp32state": (BF16, FP32, None, False),
    "bf16-sr": (BF16, BF16, None, True),
    "fp16-sr": (FP16, FP16, None, True),
    "fp32-bf16state-sr": (FP32, BF16, None, True),
    "bf16-fp32state-sr": (BF16, FP32, None, True),
}

# Multiples of 64 elements (no CPU scalar tail): one over a CUDA chunk (65536
# elements), and 2-D ones stored transposed and as a column slice (stand-ins).
EXACT_SHAPES = [((64,), "contiguous"), ((8, 24), "contiguous"), ((70016,), "contiguous"),
                ((16, 48), "transposed"), ((32, 64), "slice"), ((0,), "contiguous")]
# Sizes around the CUDA group (4 elements) and the CPU vector widths, a 0-d
# tensor, more than one chunk with a ragged end.
ODD_SHAPES = [((1,), "contiguous"), ((3,), "contiguous"), ((5,), "contiguous"),
              ((17,), "contiguous"), ((), "contiguous"), ((33, 7), "transposed"),
              ((131075,), "contiguous")]


def _needs():
    return [] if REHEARSE else cuda_skips([RULES[r].op for r in RULE_NAMES])


def _cases():
    return [pytest.param(rule, mode, id=f"{rule}-{mode}", marks=_needs())
            for rule in RULE_NAMES for mode in MODES]


def _tensor(shape, layout, gen, dtype, std=1.0):
    x = torch.randn((shape[1], shape[0]) if layout == "transposed" else
                    (shape[0], 2 * shape[1]) if layout == "slice" else shape,
                    generator=gen, dtype=torch.float64) * std
    x = x.to(dtype)
    return x.t() if layout == "transposed" else x[:, ::2] if layout == "slice" else x


class Call:
    """One rule's tensors for a run of mixed-precision steps: params, states
    (the mode's dtype), step counters, masters and sr generators, on one
    device."""

    def __init__(self, rule, mode, shapes, seed=0):
        param_dtype, state_dtype, master, sr = MODES[mode]
        gen = torch.Generator().manual_seed(seed)
        self.rule, self.hyper = rule, HYPER[rule]
        self.params = [_tensor(s, lay, gen, param_dtype) for s, lay in shapes]
        states, self.steps = RULES[rule].make_states(
            gen, [s for s, _ in shapes], FP32, self.hyper, True, FP32)
        self.states = [[t.to(state_dtype) for t in state] for state in states if state]
        if master == "full":
            self.masters = [p.float() for p in self.params]
        elif master == "remainder":
            self.masters = [torch.zeros(p.shape, dtype=torch.int16) for p in self.params]
        else:
            self.masters = None
        self.gens = ([torch.tensor([seed * 7919 + 1000 * i + 3, 5], dtype=torch.int64)
                      for i in range(len(self.params))] if sr else None)

    def lists(self):
        return [self.params, *self.states, self.steps, self.masters or [], self.gens or []]

    def to(self, device):
        out = object.__new__(Call)
        out.__dict__.update(self.__dict__)
        out.params = [to_device(t, device) for t in self.params]
        out.states = [[to_device(t, device) for t in s] for s in self.states]
        out.steps = [to_device(t, device) for t in self.steps]
        out.masters = None if self.masters is None else [to_device(t, device)
                                                         for t in self.masters]
        out.gens = None if self.gens is None else [to_device(t, device) for t in self.gens]
        return out

    def step(self, grads, **args):
        ops.update_(self.rule, self.params, grads, self.states, self.steps, self.hyper,
                    ops.StepArgs(lr=LR[self.rule], masters=self.masters,
                                 sr_generators=self.gens, **args))


def _grads(params, step, seed=0):
    gen = torch.Generator().manual_seed(1000 * seed + step + 1)
    return [(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5).to(p.dtype)
            for p in params]


def _run_both(rule, mode, shapes, steps, *, seed=0, skip_step=None, device_fn=None):
    """The same steps on the CPU and on DEV (per-tensor clip coefficients; a
    found_inf of 1 at `skip_step`); `device_fn` may swap device tensors (a
    misaligned copy, say) before the first step."""
    cpu = Call(rule, mode, shapes, seed)
    dev = cpu.to(DEV)
    if device_fn is not None:
        device_fn(dev)
    n = len(cpu.params)
    for step in range(steps):
        grads = _grads(cpu.params, step, seed)
        clip = torch.linspace(0.25, 1.0, n)
        found = torch.tensor(1.0 if step == skip_step else 0.0)
        cpu.step(grads, clip_coef=clip, found_inf=found)
        dev.step([to_device(g, DEV) for g in grads], clip_coef=clip.to(DEV),
                 found_inf=found.to(DEV))
    return cpu, dev


def _pairs(cpu, dev):
    """(what, cpu tensor, device tensor) of every array the steps write."""
    out = [(f"params[{i}]", a, b) for i, (a, b) in enumerate(zip(cpu.params, dev.params))]
    for k, (sa, sb) in enumerate(zip(cpu.states, dev.states)):
        out += [(f"states[{k}][{i}]", a, b) for i, (a, b) in enumerate(zip(sa, sb))]
    out += [(f"steps[{i}]", a, b) for i, (a, b) in enumerate(zip(cpu.steps, dev.steps))]
    if cpu.masters is not None:
        out += [(f"masters[{i}]", a, b) for i, (a, b) in enumerate(zip(cpu.masters, dev.masters))]
    if cpu.gens is not None:
        out += [(f"sr_generators[{i}]", a, b) for i, (a, b) in enumerate(zip(cpu.gens, dev.gens))]
    return out


@pytest.mark.parametrize("rule,mode", _cases())
def test_mixed_cuda_vs_cpu_bitwise(rule, mode):
    """Tail-free sizes, given clip coefficients, a skipped step: every stored
    bit as the CPU kernels store it (masters and remainders, parameters
    rounded from them, states in their dtype, stochastic roundings, the
    generators' counters)."""
    cpu, dev = _run_both(rule, mode, EXACT_SHAPES, 6, seed=1, skip_step=2)
    for what, a, b in _pairs(cpu, dev):
        assert b.device.type == DEV and b.stride() == a.stride(), what
        assert bitwise_equal(b.cpu(), a), (
            f"{rule} {mode} {what}: {int((b.cpu().double() != a.double()).sum())} elements "
            f"differ from the CPU kernels'")
    if cpu.gens is not None:
        assert all(int(g[1]) == 5 + 5 for g in dev.gens)  # 6 steps, one skipped


@pytest.mark.parametrize("rule,mode", _cases())
def test_mixed_cuda_vs_cpu_odd_sizes_and_misaligned(rule, mode):
    """Sizes that end inside a group and inside a CPU vector, a 0-d tensor, a
    ragged last chunk, and on the device a parameter (and its master) at
    storage offset 1 (the element-by-element path): within CUDA_VS_CPU of each
    stored dtype."""

    def misalign(dev):
        dev.params[0] = misaligned_copy(dev.params[0])
        if dev.masters is not None:
            dev.masters[0] = misaligned_copy(dev.masters[0])

    cpu, dev = _run_both(rule, mode, ODD_SHAPES, 4, seed=2, device_fn=misalign)
    if not REHEARSE:
        assert dev.params[0].data_ptr() % 16 != 0
    for what, a, b in _pairs(cpu, dev):
        if a.dtype in (torch.int16, torch.int64):
            continue  # remainders: their masters are compared below; counters: exact
        assert_close(b.cpu(), a, CUDA_VS_CPU[a.dtype], f"{rule} {mode} {what}")
    if cpu.masters is not None and cpu.masters[0].dtype == torch.int16:
        from fusedclip import reference as R
        for i, (pa, ra, pb, rb) in enumerate(zip(cpu.params, cpu.masters, dev.params,
                                                 dev.masters)):
            assert_close(R.bf16_rebuild(pb.cpu(), rb.cpu()), R.bf16_rebuild(pa, ra),
                         CUDA_VS_CPU[FP32], f"{rule} {mode} rebuilt masters[{i}]")
    if cpu.gens is not None:
        assert all(bitwise_equal(a, b.cpu()) for a, b in zip(cpu.gens, dev.gens))


# -- stochastic rounding on the device ----------------------------------------------------------
def _sgd_constant_step(dtype, n, lr, seed, sr):
    """One plain SGD step (no momentum, no decay) of n parameters equal to 1
    with gradients 1: the exact result is 1 - lr."""
    params = [torch.ones(n, dtype=dtype, device=DEV)]
    grads = [torch.ones(n, dtype=dtype, device=DEV)]
    gens = [torch.tensor([seed, 0], dtype=torch.int64, device=DEV)] if sr else None
    ops.update_("sgd", params, grads, [], [], dict(momentum=0.0, dampening=0.0,
                                                   weight_decay=0.0, nesterov=False),
                ops.StepArgs(lr=lr, sr_generators=gens))
    return params[0], gens


@pytest.mark.parametrize("dtype", [pytest.param(d, id=str(d)[6:], marks=_needs())
                                   for d in (BF16, FP16)])
def test_sr_unbiased_reproducible_and_not_nearest(dtype):
    """An update of 1e-4 (bf16: 0.026 of the gap below 1, 2^-8; fp16: 0.2 of
    2^-11) on 2^20 elements: to nearest nothing moves; stochastically the mean
    moves by 1e-4 within 6 standard deviations of the mean of 2^20 Bernoulli
    draws times the gap; the same seed gives the same bits, another seed other
    ones."""
    n, lr = 2**20, 1e-4
    gap = 2.0**-8 if dtype == BF16 else 2.0**-11
    nearest, _ = _sgd_constant_step(dtype, n, lr, 0, sr=False)
    assert bool((nearest == 1).all())
    a, gens = _sgd_constant_step(dtype, n, lr, 11, sr=True)
    b, _ = _sgd_constant_step(dtype, n, lr, 11, sr=True)
    c, _ = _sgd_constant_step(dtype, n, lr, 12, sr=True)
    assert int(gens[0][1]) == 1
    assert bitwise_equal(a, b)
    assert not bitwise_equal(a, c)
    values = a.double()
    assert bool(((values == 1) | (values == 1 - gap)).all())
    p = lr / gap
    bound = 6 * gap * math.sqrt(p * (1 - p) / n)
    assert abs(float(values.mean()) - (1 - lr)) <= bound


@pytest.mark.skipif(REHEARSE, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("mode", [pytest.param(m, marks=_needs()) for m in
                                  ("master-bf16-bf16state-sr", "remainder-bf16-fp16state-sr",
                                   "bf16-sr")])
def test_mixed_graph_capture_no_sync(mode):
    """Mixed steps captured in a CUDA graph and replayed equal the same eager
    steps bit for bit: the generators' counters live on the device, read by the
    update and incremented by the launch after it (a replay with found_inf set
    changes nothing, the counter included); the eager steps read nothing on the
    host."""
    shapes = [((70016,), "contiguous"), ((8, 24), "transposed"), ((5,), "contiguous")]
    eager = Call("adam", mode, shapes, seed=3).to(DEV)
    graphed = Call("adam", mode, shapes, seed=3).to(DEV)
    grads = [torch.zeros_like(p) for p in eager.params]
    found = torch.zeros((), device=DEV)
    clip = torch.linspace(0.5, 1.0, len(grads), device=DEV)

    def fill(step):
        for g, h in zip(grads, _grads(eager.params, step, seed=3)):
            g.copy_(h)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fill(0)
        graphed.step(grads, clip_coef=clip, found_inf=found)
    torch.cuda.current_stream().wait_stream(side)
    with no_host_reads(DEV):
        eager.step(grads, clip_coef=clip, found_inf=found)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed.step(grads, clip_coef=clip, found_inf=found)
    for step in range(1, 6):
        fill(step)
        found.fill_(1.0 if step == 3 else 0.0)
        with no_host_reads(DEV):
            eager.step(grads, clip_coef=clip, found_inf=found)
        graph.replay()
        torch.cuda.synchronize()
        for what, a, b in _pairs(eager, graphed):
            assert bitwise_equal(a, b), f"step {step} {what}"
    assert all(int(g[1]) == 5 + 5 for g in graphed.gens)  # 6 calls, one skipped

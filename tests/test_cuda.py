"""What only the CUDA kernels have, for every optimizer of the registry: their
launch limits, alignment, odd sizes around their vector widths, determinism,
CUDA-graph capture and the skip of a first step without a host sync, with the
CPU kernels as the oracle (tolerances.CUDA_VS_CPU).

Everything else the CUDA kernels must do is checked by the generic tests,
whose "cuda" instances run the CPU tests' bodies on the GPU: trajectories
against the float64 reference (test_reference.py), parity with torch.optim
(test_parity.py), state dicts (test_state_dict.py), the non-finite policies
(test_nonfinite.py), GradScaler (test_amp.py), torch.compile
(test_compile.py), opcheck, the norm ops and every update op's contract
(test_ops.py).

Every test here is skipped without a GPU or without the CUDA kernels in the
build (``FUSEDCLIP_CUDA=1 python setup.py build_ext --inplace``; see
docs/GPU_RUNBOOK.md). ``FUSEDCLIP_CUDA_TESTS_ON_CPU=1`` runs their bodies on the
CPU instead, against the CPU kernels: every comparison then holds trivially;
it only rehearses the test code.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from fusedclip import ops
from fusedclip.reference import global_norm

from helpers import (
    assert_states_close, assert_unchanged, bitwise_equal, clip_policy, cpu_mirror, cuda_skips,
    make_tensor, misaligned_copy, no_host_reads, snapshot, to_device,
)
from registry import NORM_OPS, SPECS, step_ops
from tolerances import CUDA_VS_CPU, NORM

REHEARSE = os.environ.get("FUSEDCLIP_CUDA_TESTS_ON_CPU") == "1"
DEV = "cpu" if REHEARSE else "cuda"
if not REHEARSE:
    pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
DNAME = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
         torch.float64: "fp64"}
# Around the 16-byte vector widths (2, 4, 8 elements), the block (512 threads)
# and the chunk (65536 elements).
ODD_SIZES = [0, 1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 33, 127, 129, 511, 512, 513, 2047,
             2049, 4095, 4097, 65535, 65536, 65537, 131071, 131073, 200003]
# Launch limits of csrc/cuda/multi_tensor_apply.cuh: chunks of 65536 elements,
# 320 blocks a launch, and at most 111 tensors a launch for the norm, 50 for the
# update with the fewest lists (plain SGD), fewer with more lists.
CHUNK = 65536
BLOCKS_PER_LAUNCH = 320
NORM_TENSORS_PER_LAUNCH = 111
MOST_UPDATE_TENSORS_PER_LAUNCH = 50


def _needs(ops_needed) -> list:
    return [] if REHEARSE else cuda_skips(ops_needed)


# Every optimizer twice: with its defaults (the fewest state lists: plain SGD,
# Adam without amsgrad) and with its example hyperparameters (every option
# that adds state on).
CASES = [pytest.param(spec, hyper, id=f"{spec.name}-{name}", marks=_needs(step_ops(spec)))
         for spec in SPECS.values()
         for name, hyper in (("plain", {}), ("example", spec.example))]


def _cases_by(*params_lists):
    """CASES times other parameters, as (spec, hyper, *others) params."""
    out = []
    for case in CASES:
        for others in params_lists:
            for other in others:
                values = other.values if hasattr(other, "values") else (other,)
                oid = other.id if hasattr(other, "id") else DNAME.get(other, str(other))
                out.append(pytest.param(*case.values, *values, marks=case.marks,
                                        id=f"{case.id}-{oid}"))
    return out


# -- the norm op: launch limits ---------------------------------------------------------------
def _norm_vs_float64(tensors, norm_type, what=""):
    norms, total, flag = ops.multi_tensor_norm(tensors, norm_type)
    dtype = tensors[0].dtype
    out = torch.float64 if dtype == torch.float64 else torch.float32
    assert norms.device.type == total.device.type == flag.device.type == DEV
    assert norms.dtype == total.dtype == out and flag.dtype == torch.float32
    from helpers import assert_close
    expected = torch.stack([torch.linalg.vector_norm(t.double().flatten(), norm_type) if t.numel()
                            else torch.zeros((), dtype=torch.float64, device=t.device)
                            for t in tensors])
    assert_close(norms.cpu(), expected.cpu().to(out), NORM[dtype], f"{what} tensor norms")
    exp_total = global_norm([t.cpu() for t in tensors], norm_type)
    assert_close(total.cpu(), exp_total.to(out), NORM[dtype], f"{what} total")
    assert float(flag) == (0.0 if math.isfinite(float(exp_total)) else 1.0)


@pytest.mark.parametrize("norm_type", [2.0, math.inf], ids=["l2", "inf"])
@pytest.mark.parametrize("dtype", [pytest.param(d, id=DNAME[d], marks=_needs(NORM_OPS))
                                   for d in (torch.float32, torch.bfloat16)])
def test_norm_many_tensors_and_chunks(dtype, norm_type):
    g = torch.Generator().manual_seed(2)
    # 3 launches' worth of tensors, empty and 0-d ones among them, then a
    # tensor of ~25M elements (382 chunks: more than one launch, and it starts
    # in the middle of one, so it is carried into the next at slot 0), then
    # more small tensors.
    small = [(0,), (), (1,), (3, 5), (17,), (4097,)]
    shapes = [small[i % len(small)] for i in range(3 * NORM_TENSORS_PER_LAUNCH + 5)]
    shapes += [(25_000_000,)] + shapes[:40]
    tensors = [torch.randn(s, generator=g).to(dtype).to(DEV) for s in shapes]
    assert (25_000_000 + CHUNK - 1) // CHUNK > BLOCKS_PER_LAUNCH
    _norm_vs_float64(tensors, norm_type, "many")


def _free_gpu_bytes() -> int:
    if not torch.cuda.is_available():
        return 0
    return torch.cuda.mem_get_info()[0]


@pytest.mark.slow
@pytest.mark.skipif(REHEARSE or _free_gpu_bytes() < 12 * 2**30,
                    reason="needs ~12 GiB of free GPU memory (a 4.3 GB bfloat16 tensor)")
def test_norm_over_2_31_elements():
    n = 2**31 + 4099  # elements past 2^31, and a last chunk that is not full
    x = torch.ones(n, dtype=torch.bfloat16, device=DEV)
    x[2**31 + 7] = 256.0         # past 2^31: read, or the norms below are wrong
    x[n - 1] = -3.0
    norms, total, flag = ops.multi_tensor_norm([x], 2.0)
    expected = math.sqrt((n - 2) + 256.0**2 + 9.0)
    assert float(flag) == 0.0
    assert abs(float(total) - expected) <= NORM[torch.bfloat16][0] * expected
    assert abs(float(norms[0]) - expected) <= NORM[torch.bfloat16][0] * expected
    norms, total, flag = ops.multi_tensor_norm([x], math.inf)
    assert float(total) == 256.0 and float(norms[0]) == 256.0
    x[n - 2] = math.nan
    _, total, flag = ops.multi_tensor_norm([x], 2.0)
    assert float(flag) == 1.0 and math.isnan(float(total))


# -- the update ops: the same steps on the CPU kernels ------------------------------------------
def _pair(spec, hyper, specs, dtype, *, seed=0, misaligned=None, clip=1.0):
    """The same parameters on the CPU and on the device, each with the spec's
    optimizer (`hyper`, a tensor lr of 0.01 on its device, `clip`). The
    device parameter at index `misaligned` is a view at storage offset 1."""
    gen = torch.Generator().manual_seed(seed)
    cpu = [make_tensor(s, lay, gen, dtype) for s, lay in specs]
    dev = [to_device(t, DEV) for t in cpu]
    if misaligned is not None:
        dev[misaligned] = misaligned_copy(dev[misaligned])
    out = []
    for tensors, device in ((cpu, "cpu"), (dev, DEV)):
        params = [torch.nn.Parameter(t) for t in tensors]
        # (rehearsed on the CPU, the lr is a float: the optimizer reads a CPU
        # lr tensor's value, which no_host_reads forbids)
        lr = 0.01 if REHEARSE else torch.tensor(0.01, device=device)
        kwargs = dict(hyper, lr=lr, **spec.ctor)
        out.append((params, spec.fused(params, clip=clip_policy(clip) if not callable(clip)
                                       else clip(), **kwargs)))
    if misaligned is not None:
        assert out[1][0][misaligned].data_ptr() % 16 != 0
    return out


def _run_pair(pair, steps, dtype, *, seed=0, device_grad_fn=None, poison_step=None, what=""):
    """`steps` steps of the same gradients (a NaN in the first gradient at
    `poison_step`) on both; the device's parameters and state against the
    CPU's."""
    (cpu_params, cpu_opt), (dev_params, dev_opt) = pair
    for step in range(steps):
        gen = torch.Generator().manual_seed(seed * 100 + step)
        for i, (pc, pd) in enumerate(zip(cpu_params, dev_params)):
            g = (torch.randn(pc.shape, generator=gen, dtype=torch.float64) * 0.1).to(dtype)
            if step == poison_step and i == 0 and g.numel():
                g.view(-1)[0] = math.nan
            pc.grad = g
            pd.grad = to_device(g, DEV) if device_grad_fn is None else device_grad_fn(
                to_device(g, DEV))
        cpu_opt.step()
        dev_opt.step()
    mirror, mirror_params = cpu_mirror(dev_opt, dev_params)
    assert_states_close(mirror, cpu_opt, mirror_params, cpu_params, CUDA_VS_CPU[dtype],
                        f"{what} cuda vs cpu")
    for p, c in zip(dev_params, cpu_params):
        assert p.stride() == c.stride()


@pytest.mark.parametrize("spec,hyper,dtype", _cases_by(DTYPES))
def test_update_odd_sizes(spec, hyper, dtype):
    specs = [((n,), "contiguous") for n in ODD_SIZES] + [((), "contiguous")]
    _run_pair(_pair(spec, hyper, specs, dtype), 3, dtype, what=spec.name)


@pytest.mark.parametrize("spec,hyper", CASES)
def test_update_more_tensors_than_one_launch(spec, hyper):
    # 3 launches' worth at the fewest lists (more at more lists), with empty
    # and 0-d ones.
    small = [((0,), "contiguous"), ((), "contiguous"), ((1,), "contiguous"),
             ((3, 5), "transposed"), ((17,), "contiguous"), ((4097,), "contiguous")]
    specs = [small[i % len(small)] for i in range(3 * MOST_UPDATE_TENSORS_PER_LAUNCH + 7)]
    _run_pair(_pair(spec, hyper, specs, torch.float32), 3, torch.float32, what=spec.name)


@pytest.mark.parametrize("spec,hyper,dtype", _cases_by([torch.float32, torch.bfloat16]))
def test_update_more_chunks_than_one_launch(spec, hyper, dtype):
    # ~25M elements: 382 chunks, more than one launch's 320 blocks, starting
    # after small tensors so that it is carried over from a slot other than 0.
    specs = [((1000,), "contiguous")] * 5 + [((25_000_000,), "contiguous"), ((33,), "contiguous")]
    _run_pair(_pair(spec, hyper, specs, dtype), 2, dtype, what=spec.name)


@pytest.mark.parametrize("spec,hyper,dtype", _cases_by(DTYPES))
def test_update_misaligned_and_strided(spec, hyper, dtype):
    specs = [((70001,), "contiguous"), ((33, 65), "transposed"), ((129, 40), "slice"),
             ((2, 3, 5, 7), "channels_last"), ((), "contiguous"), ((0, 3), "contiguous")]

    def misaligned_grads(g):
        return misaligned_copy(g) if g.is_contiguous() else g

    # A parameter that is a view at storage offset 1, with aligned gradients
    # and state (the element-by-element path of chunk_foreach).
    _run_pair(_pair(spec, hyper, specs, dtype, misaligned=0), 3, dtype, what="misaligned param")
    # The same with misaligned gradients too (contiguous ones become views at
    # offset 1; the strided ones stay strided).
    _run_pair(_pair(spec, hyper, specs, dtype, misaligned=0, seed=1), 2, dtype, seed=1,
              device_grad_fn=misaligned_grads, what="misaligned param and grads")
    # An aligned parameter with a misaligned gradient.
    _run_pair(_pair(spec, hyper, specs, dtype, seed=2), 2, dtype, seed=2,
              device_grad_fn=misaligned_grads, what="misaligned grads")


@pytest.mark.parametrize("spec,hyper", [c for c in CASES if "example" in c.id])
def test_update_deterministic(spec, hyper):
    specs = [((3_000_000,), "contiguous"), ((7, 9), "transposed"), ((), "contiguous")] + \
        [((1000,), "contiguous")] * 60
    runs = []
    for _ in range(2):
        (_, _), (params, opt) = _pair(spec, hyper, specs, torch.float32)
        for step in range(3):
            gen = torch.Generator().manual_seed(step)
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(DEV)
            opt.step()
        runs.append((params, opt))
    (pa, oa), (pb, ob) = runs
    for a, b in zip(pa, pb):
        assert bitwise_equal(a.detach(), b.detach())
        for key in oa.state.get(a, {}):
            assert bitwise_equal(oa.state[a][key], ob.state[b][key]), key
    for key in oa.clip_stats:
        assert bitwise_equal(oa.clip_stats[key], ob.clip_stats[key]), key


# -- the first steps skipped, with no host sync -------------------------------------------------
@pytest.mark.parametrize("spec,hyper,dtype", _cases_by(DTYPES))
def test_skipped_first_steps_no_sync(spec, hyper, dtype):
    """Poisoned first steps are skipped on the device (no host sync) and
    change nothing; the next step is the state's first (SGD's buffer: buf = g,
    dampening does not apply), as the CPU kernels do."""
    specs = [((5, 7), "contiguous"), ((), "contiguous"), ((0,), "contiguous"),
             ((6, 4), "transposed"), ((3, 8), "slice"), ((70001,), "contiguous")]
    (cpu_params, cpu_opt), (dev_params, dev_opt) = _pair(spec, hyper, specs, dtype)
    for step in range(5):
        gen = torch.Generator().manual_seed(step)
        for pc, pd in zip(cpu_params, dev_params):
            g = torch.randn(pc.shape, generator=gen, dtype=torch.float64).to(dtype)
            pc.grad, pd.grad = g.clone(), to_device(g, DEV)
        if step < 2:
            cpu_params[5].grad[7] = math.nan
            dev_params[5].grad[7] = math.nan
        if step == 1:
            before = snapshot(dev_opt, dev_params)
        with no_host_reads(DEV):
            dev_opt.step()
        cpu_opt.step()
        if step == 1:
            assert_unchanged(dev_opt, dev_params, before, "second skipped step")
    assert int(dev_opt.clip_stats["skipped"]) == 2
    mirror, mirror_params = cpu_mirror(dev_opt, dev_params)
    assert_states_close(mirror, cpu_opt, mirror_params, cpu_params, CUDA_VS_CPU[dtype],
                        "after skipped first steps")


# -- CUDA graphs ----------------------------------------------------------------------------------
@pytest.mark.skipif(REHEARSE, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("clip", [1.0, ("global", 0.5, math.inf)], ids=str)
@pytest.mark.parametrize("spec,hyper,dtype", _cases_by([torch.float32, torch.bfloat16]))
def test_cuda_graph_capture_and_replay(spec, hyper, dtype, clip):
    """opt.step() captured once and replayed equals eager steps, bit for bit:
    the same kernels on the same inputs. A replay whose gradients hold an inf
    is skipped, and a new lr written into the lr tensor is used."""
    specs = [((5, 7), "contiguous"), ((), "contiguous"), ((0,), "contiguous"),
             ((6, 4), "transposed"), ((3, 8), "slice"), ((200_003,), "contiguous")]

    def setup():
        gen = torch.Generator().manual_seed(6)
        params = [torch.nn.Parameter(to_device(make_tensor(s, lay, gen, dtype), DEV))
                  for s, lay in specs]
        for p in params:  # static gradient buffers, written in place every step
            p.grad = torch.zeros_like(p)
        lr = torch.tensor(0.01, device=DEV)
        return params, lr, spec.fused(params, **dict(hyper, lr=lr, **spec.ctor),
                                      clip=clip_policy(clip))

    def fill(params, step, poison=False):
        gen = torch.Generator().manual_seed(100 + step)
        for p in params:
            p.grad.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype))
        if poison:
            params[5].grad[7] = math.inf

    eager_p, eager_lr, eager = setup()
    graph_p, graph_lr, graphed = setup()

    # Warm-up on a side stream (torch's recipe), which also creates the state.
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

    for step in range(3, 10):
        poison = step == 6
        if step == 8:
            eager_lr.fill_(0.003)
            graph_lr.fill_(0.003)
        fill(eager_p, step, poison)
        fill(graph_p, step, poison)
        eager.step()
        graph.replay()
        torch.cuda.synchronize()
        for a, b in zip(eager_p, graph_p):
            assert bitwise_equal(a.detach(), b.detach()), f"step {step}"
            for key in eager.state.get(a, {}):
                assert bitwise_equal(eager.state[a][key], graphed.state[b][key]), (step, key)
        for key in ("grad_norm", "clip_coef", "skipped"):
            assert bitwise_equal(eager.clip_stats[key], graphed.clip_stats[key]), (step, key)
    assert int(graphed.clip_stats["skipped"]) == 1
    if "step" in graphed.state[graph_p[0]]:
        assert float(graphed.state[graph_p[0]]["step"]) == 9.0  # 10 steps, one skipped


# -- ValueClip and AGC: the shared gradient transform ------------------------------------------
TRANSFORM_SPECS = [((5, 7), "contiguous"), ((3, 20000), "contiguous"), ((6, 4), "transposed"),
                   ((4, 6), "slice"), ((97,), "contiguous"), ((), "contiguous"), ((0,), "contiguous")]


@pytest.mark.parametrize("policy", ["ValueClip(0.05)", "AGC(0.3)"])
@pytest.mark.parametrize("spec,hyper,dtype", _cases_by([torch.float32, torch.bfloat16]))
def test_grad_transform_cuda_vs_cpu(spec, hyper, dtype, policy):
    """Units that span chunks (3 x 20000), non-contiguous parameters (row-major
    stand-ins), a skipped step; the CPU kernels are the oracle."""
    import fusedclip

    def clip():
        return fusedclip.ValueClip(0.05) if policy.startswith("Value") else fusedclip.AGC(0.3)

    pair = _pair(spec, hyper, TRANSFORM_SPECS, dtype, seed=3, clip=clip)
    _run_pair(pair, 5, dtype, poison_step=2, seed=1, what=f"{spec.name} {policy}")

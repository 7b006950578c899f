"""The CUDA backend: the same contract as the CPU kernels, on a GPU.

Every test here is skipped without a GPU or without the CUDA kernels in the
build (``FUSEDCLIP_CUDA=1 python setup.py build_ext --inplace``; see
docs/GPU_RUNBOOK.md). What runs:

- whole trajectories against the CPU kernels and the float64 reference, for
  Adam/AdamW with every argument (amsgrad, maximize, coupled and decoupled
  weight decay, a tensor lr on the device, clip None / float / GlobalNorm inf),
  in float32, bfloat16, float16 and float64;
- torch.library.opcheck of both ops on CUDA tensors;
- more tensors than one launch takes (111 at depth 1 for the norm, 42 for Adam,
  37 with amsgrad), more chunks than one launch takes (320 of 65536 elements),
  a tensor that straddles two launches, odd sizes, views that are not 16-byte
  aligned, transposed and strided parameters, empty and 0-d tensors;
- determinism (the same bits on every run), a tensor of more than 2^31
  elements (norm only, when the GPU has the memory), the non-finite skip with
  no host sync, CUDA-graph capture and replay of ``opt.step()``, and
  ``torch.compile(opt.step, fullgraph=True)``.

Tolerances come from tolerances.py; a new one (CUDA_VS_CPU) says why it is
what it is.
"""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch

import fusedclip
from fusedclip import ops
from fusedclip.reference import ReferenceAdam, global_norm

import legacy_ops
from conftest import (
    LOW_PRECISION, Problem, assert_close, assert_states_close, assert_unchanged, bitwise_equal,
    clip_args, clip_policy, clone_layout, flat, make_tensor, random_configs, snapshot, torch_defaults,
)
from tolerances import CUDA_VS_CPU, NORM, NORM_OUT_DTYPE, REFERENCE


def _has_cuda_kernel(op: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")
    except Exception:  # the private helper moved or changed: treat as absent
        return False


CUDA_KERNELS_BUILT = all(
    _has_cuda_kernel(op) for op in ("fusedclip::multi_tensor_norm", "fusedclip::adam_"))

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.skipif(
        not CUDA_KERNELS_BUILT,
        reason="fusedclip._C was built without CUDA kernels "
               "(rebuild with FUSEDCLIP_CUDA=1; see docs/GPU_RUNBOOK.md)"),
]

DEV = "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
DNAME = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
         torch.float64: "fp64"}
# Around the 16-byte vector widths (2, 4, 8 elements), the block (512 threads)
# and the chunk (65536 elements).
ODD_SIZES = [0, 1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 33, 127, 129, 511, 512, 513, 2047,
             2049, 4095, 4097, 65535, 65536, 65537, 131071, 131073, 200003]
# Launch limits of csrc/cuda/multi_tensor_apply.cuh.
CHUNK = 65536
BLOCKS_PER_LAUNCH = 320
# adam_ lists: param, grad, exp_avg, exp_avg_sq, step, unit coefficients, unit
# length (depth 7), and max_exp_avg_sq with amsgrad (depth 8).
TENSORS_PER_LAUNCH = {"norm": 111, "adam": 32, "adam_amsgrad": 29}


# -- moving to the device, and back for the comparisons ---------------------------------------
def to_device(t: torch.Tensor, device=DEV) -> torch.Tensor:
    """A copy on `device` with the same strides (also for non-dense tensors)."""
    out = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=device)
    out.copy_(t)
    return out


def device_params(params: list[list[torch.nn.Parameter]]) -> list[list[torch.nn.Parameter]]:
    return [[torch.nn.Parameter(to_device(p.detach())) for p in group] for group in params]


def device_groups(problem: Problem, params) -> list[dict]:
    """The problem's param groups, a tensor lr on the device."""
    groups = problem.param_groups(params)
    for g in groups:
        if isinstance(g.get("lr"), torch.Tensor):
            g["lr"] = g["lr"].to(DEV)
    return groups


def set_device_grads(params, grads) -> None:
    for p, g in zip(params, grads):
        p.grad = None if g is None else to_device(g)


def cpu_mirror(opt, params):
    """CPU copies of parameters and state, dressed as an optimizer for the
    conftest / test_reference comparison helpers."""
    cpu_params = [p.detach().cpu() for p in params]
    state = {}
    for p, c in zip(params, cpu_params):
        if p in opt.state:
            state[c] = {k: (v.cpu() if isinstance(v, torch.Tensor) else v)
                        for k, v in opt.state[p].items()}
    index = {id(p): c for p, c in zip(params, cpu_params)}
    groups = [dict(g, params=[index[id(p)] for p in g["params"] if id(p) in index])
              for g in opt.param_groups]
    return SimpleNamespace(state=state, param_groups=groups), cpu_params


# -- trajectories against the CPU kernels and the float64 reference -----------------------------
def _argument_configs() -> list:
    """Every argument of Adam/AdamW at least once per dtype, on parameters that
    hold a 0-d, an empty, a transposed, a strided and a channels-last one."""
    specs = [((5, 7), "contiguous"), ((), "contiguous"), ((0,), "contiguous"),
             ((6, 4), "transposed"), ((3, 8), "slice"), ((2, 3, 4, 5), "channels_last"),
             ((1031,), "contiguous"), ((70001,), "contiguous")]
    variants = [
        # (amsgrad, maximize, weight_decay, decoupled, tensor lr, clip)
        (False, False, 0.0, False, False, None),
        (True, False, 0.1, False, True, 1.0),
        (False, True, 0.1, True, True, ("global", 0.5, math.inf)),
        (True, True, 0.01, True, False, 5.0),
    ]
    configs = []
    for dtype, (i, v) in itertools.product(DTYPES, enumerate(variants)):
        amsgrad, maximize, wd, decoupled, lr_t, clip = v
        low = dtype in LOW_PRECISION
        lr = 3e-2 if low else 1e-2
        group = {"specs": specs[:4], "lr": f"tensor:{lr}" if lr_t else lr, "amsgrad": amsgrad,
                 "maximize": maximize, "weight_decay": wd, "decoupled_weight_decay": decoupled}
        group2 = dict(group, specs=specs[4:], lr=lr / 3, betas=(0.8, 0.99))
        config = {
            "kind": "AdamW" if decoupled else "Adam",
            "problem": Problem(groups=[group, group2], dtype=dtype, grad_std=0.1,
                               grad_layout="like_param" if i % 2 else "contiguous",
                               none_prob=0.2 if i == 3 else 0.0, seed=500 + i),
            "clip": clip, "steps": 10, "defaults": {},
        }
        name = (f"{DNAME[dtype]}-{config['kind']}-ams{int(amsgrad)}-max{int(maximize)}"
                f"-wd{wd}-lrT{int(lr_t)}-{clip}")
        configs.append(pytest.param(config, id=name))
    return configs


CONFIGS = _argument_configs() + random_configs(16, seed=31_000_003, against="reference")


def make_reference(kind, problem, params, clip, ctor) -> ReferenceAdam:
    args = clip_args(clip)
    return ReferenceAdam(
        problem.reference_groups(params, {**torch_defaults(kind), **ctor}),
        clip=None if args is None else args[0],
        norm_type=2.0 if args is None else args[1],
        round_to=problem.dtype if problem.dtype in LOW_PRECISION else None,
    )


@pytest.mark.parametrize("config", CONFIGS)
def test_trajectory_cuda_vs_cpu_and_reference(config):
    from test_reference import assert_matches_reference

    kind, problem, clip = config["kind"], config["problem"], config["clip"]
    cls = {"Adam": fusedclip.FusedClipAdam, "AdamW": fusedclip.FusedClipAdamW}[kind]
    cpu_params, cuda_params = problem.params(), device_params(problem.params())
    cpu_opt = cls(problem.param_groups(cpu_params), **config["defaults"], clip=clip_policy(clip))
    cuda_opt = cls(device_groups(problem, cuda_params), **config["defaults"],
                   clip=clip_policy(clip))
    ref = make_reference(kind, problem, problem.params(), clip, config["defaults"])
    cpu_flat, cuda_flat = flat(cpu_params), flat(cuda_params)
    for step in range(config["steps"]):
        grads = problem.grads(step)
        for p, g in zip(cpu_flat, grads):
            p.grad = None if g is None else clone_layout(g)
        set_device_grads(cuda_flat, grads)
        cpu_opt.step()
        cuda_opt.step()
        ref.step(grads)
        norm = cuda_opt.clip_stats["grad_norm"]
        assert norm.device.type == "cuda" and norm.dtype == NORM_OUT_DTYPE[problem.dtype]
        assert_close(norm.cpu(), ref.last_norm.to(norm.dtype), NORM[problem.dtype],
                     f"step {step} grad_norm")
    mirror, mirror_params = cpu_mirror(cuda_opt, cuda_flat)
    for p in mirror_params:
        assert p.device.type == "cpu"
    assert_states_close(mirror, cpu_opt, mirror_params, cpu_flat, CUDA_VS_CPU[problem.dtype],
                        "cuda vs cpu")
    assert_matches_reference(mirror, mirror_params, ref, problem, REFERENCE[problem.dtype],
                             "cuda vs reference")
    # Layouts stay the parameter's own.
    for p, c in zip(cuda_flat, cpu_flat):
        assert p.stride() == c.stride()
        if p in cuda_opt.state and p.numel():
            assert cuda_opt.state[p]["exp_avg"].stride() == cpu_opt.state[c]["exp_avg"].stride()


def test_configurations_cover_every_argument():
    configs = [p.values[0] for p in CONFIGS]
    groups = [g for c in configs for g in c["problem"].groups]
    assert {c["problem"].dtype for c in configs} == set(DTYPES)
    assert any(g["amsgrad"] for g in groups) and any(g["maximize"] for g in groups)
    assert any(g.get("decoupled_weight_decay") and g["weight_decay"] for g in groups)
    assert any(not g.get("decoupled_weight_decay") and g["weight_decay"] for g in groups)
    assert any(isinstance(g["lr"], str) for g in groups)
    clips = [c["clip"] for c in configs]
    assert None in clips and any(isinstance(c, float) for c in clips)
    assert any(isinstance(c, tuple) and math.isinf(c[2]) for c in clips)
    assert any(len(c["problem"].specs) > TENSORS_PER_LAUNCH["norm"] for c in configs)


# -- opcheck -------------------------------------------------------------------------------------
def _tree_to_device(x):
    if isinstance(x, torch.Tensor):
        return to_device(x)
    if isinstance(x, (list, tuple)):
        return type(x)(_tree_to_device(v) for v in x)
    if isinstance(x, dict):
        return {k: _tree_to_device(v) for k, v in x.items()}
    return x


def _cpu_norm_samples():
    from test_ops import _norm_samples
    return list(_norm_samples())


def _cpu_adam_samples():
    from test_ops import _adam_samples
    return list(_adam_samples())


@pytest.mark.parametrize("tensors,norm_type", _cpu_norm_samples())
def test_opcheck_multi_tensor_norm_cuda(tensors, norm_type):
    torch.library.opcheck(torch.ops.fusedclip.multi_tensor_norm.default,
                          (_tree_to_device(tensors), norm_type))


@pytest.mark.parametrize("args,kwargs", _cpu_adam_samples())
def test_opcheck_adam_cuda(args, kwargs):
    legacy_ops.opcheck("adam", _tree_to_device(args), _tree_to_device(kwargs))


# -- the norm op ------------------------------------------------------------------------------------
def _norm_vs_float64(tensors, norm_type, what=""):
    norms, total, flag = ops.multi_tensor_norm(tensors, norm_type)
    dtype = tensors[0].dtype
    out = NORM_OUT_DTYPE[dtype]
    assert norms.device.type == total.device.type == flag.device.type == "cuda"
    assert norms.dtype == total.dtype == out and flag.dtype == torch.float32
    ord = math.inf if math.isinf(norm_type) else 2.0
    expected = torch.stack([torch.linalg.vector_norm(t.double().flatten(), ord) if t.numel()
                            else torch.zeros((), dtype=torch.float64, device=t.device)
                            for t in tensors])
    assert_close(norms.cpu(), expected.cpu().to(out), NORM[dtype], f"{what} tensor norms")
    exp_total = global_norm([t.cpu() for t in tensors], norm_type)
    assert_close(total.cpu(), exp_total.to(out), NORM[dtype], f"{what} total")
    assert float(flag) == (0.0 if math.isfinite(float(exp_total)) else 1.0)
    return norms, total, flag


@pytest.mark.parametrize("norm_type", [2.0, math.inf], ids=["l2", "inf"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DNAME.get)
def test_norm_odd_sizes(dtype, norm_type):
    g = torch.Generator().manual_seed(1)
    tensors = [to_device(make_tensor((n,), "contiguous", g, dtype)) for n in ODD_SIZES]
    _norm_vs_float64(tensors, norm_type, "odd sizes")
    for n in ODD_SIZES:  # one at a time too: the only tensor of a call
        if n:
            _norm_vs_float64([to_device(make_tensor((n,), "contiguous", g, dtype))], norm_type,
                             f"n={n}")


@pytest.mark.parametrize("norm_type", [2.0, math.inf], ids=["l2", "inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DNAME.get)
def test_norm_many_tensors_and_chunks(dtype, norm_type):
    g = torch.Generator().manual_seed(2)
    # 3 launches' worth of tensors, empty and 0-d ones among them, then a
    # tensor of ~25M elements (382 chunks: more than one launch, and it starts
    # in the middle of one, so it is carried into the next at slot 0), then
    # more small tensors.
    small = [(0,), (), (1,), (3, 5), (17,), (4097,)]
    shapes = [small[i % len(small)] for i in range(3 * TENSORS_PER_LAUNCH["norm"] + 5)]
    shapes += [(25_000_000,)] + shapes[:40]
    tensors = [torch.randn(s, generator=g).to(dtype).to(DEV) for s in shapes]
    assert (25_000_000 + CHUNK - 1) // CHUNK > BLOCKS_PER_LAUNCH
    _norm_vs_float64(tensors, norm_type, "many")


@pytest.mark.parametrize("norm_type", [2.0, math.inf], ids=["l2", "inf"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DNAME.get)
def test_norm_layouts_and_misaligned(dtype, norm_type):
    g = torch.Generator().manual_seed(3)
    base = to_device(make_tensor((70001,), "contiguous", g, dtype))
    tensors = [
        base[1:],                       # storage offset 1: not 16-byte aligned
        base[3:3 + 4097],               # misaligned, odd size
        to_device(make_tensor((33, 65), "transposed", g, dtype)),
        to_device(make_tensor((129, 40), "slice", g, dtype)),   # strided, not dense
        to_device(make_tensor((2, 3, 5, 7), "channels_last", g, dtype)),
        to_device(make_tensor((), "contiguous", g, dtype)),
        to_device(make_tensor((0, 3), "contiguous", g, dtype)),
    ]
    assert base[1:].data_ptr() % 16 != 0
    _norm_vs_float64(tensors, norm_type, "layouts")


@pytest.mark.parametrize("dtype", DTYPES, ids=DNAME.get)
def test_norm_only_empty_and_nonfinite(dtype):
    norms, total, flag = ops.multi_tensor_norm([torch.zeros(0, dtype=dtype, device=DEV)] * 3)
    assert norms.shape == (3,) and float(total) == 0.0 and float(flag) == 0.0
    for value in (math.inf, -math.inf, math.nan):
        x = torch.ones(200_000, dtype=dtype, device=DEV)
        x[199_999] = value
        for norm_type in (2.0, math.inf):
            _, total, flag = ops.multi_tensor_norm([torch.ones(5, dtype=dtype, device=DEV), x],
                                                   norm_type)
            assert float(flag) == 1.0 and not math.isfinite(float(total)), (value, norm_type)


@pytest.mark.parametrize("norm_type", [2.0, math.inf], ids=["l2", "inf"])
def test_norm_deterministic(norm_type):
    g = torch.Generator().manual_seed(4)
    tensors = [torch.randn(s, generator=g).to(DEV) for s in
               [(3_000_000,), (7,), (), (65537,)] + [(1000,)] * 150]
    first = ops.multi_tensor_norm(tensors, norm_type)
    for _ in range(5):
        again = ops.multi_tensor_norm(tensors, norm_type)
        for a, b in zip(first, again):
            assert bitwise_equal(a, b)


def _free_gpu_bytes() -> int:
    if not torch.cuda.is_available():
        return 0
    return torch.cuda.mem_get_info()[0]


@pytest.mark.slow
@pytest.mark.skipif(_free_gpu_bytes() < 12 * 2**30,
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


# -- the Adam op: layouts, launch limits, sizes ---------------------------------------------------
def _misaligned_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of `t` on its device, at storage offset 1 (so not
    16-byte aligned)."""
    base = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = base[1:].view(t.shape)
    view.copy_(t)
    return view


def _adam_pair(specs, dtype, *, amsgrad=False, lr_tensor=True, clip=1.0, seed=0,
               misaligned_param=None):
    """The same problem on the CPU and on CUDA: (params, opt) for each. The
    CUDA parameter at index `misaligned_param` is a view at storage offset 1."""
    gen = torch.Generator().manual_seed(seed)
    cpu = [make_tensor(s, lay, gen, dtype) for s, lay in specs]
    cpu_params = [torch.nn.Parameter(t) for t in cpu]
    cuda = [to_device(t) for t in cpu]
    if misaligned_param is not None:
        cuda[misaligned_param] = _misaligned_copy(cuda[misaligned_param])
    cuda_params = [torch.nn.Parameter(t) for t in cuda]
    if misaligned_param is not None:
        assert cuda_params[misaligned_param].data_ptr() % 16 != 0
    out = []
    for params, device in ((cpu_params, "cpu"), (cuda_params, DEV)):
        lr = torch.tensor(0.01, device=device) if lr_tensor else 0.01
        out.append((params, fusedclip.FusedClipAdamW(params, lr=lr, amsgrad=amsgrad, clip=clip,
                                                    weight_decay=0.1)))
    return out


def _run_pair(pair, steps, dtype, device_grad_fn=None, seed=0):
    (cpu_params, cpu_opt), (cuda_params, cuda_opt) = pair
    for step in range(steps):
        gen = torch.Generator().manual_seed(seed * 100 + step)
        for pc, pd in zip(cpu_params, cuda_params):
            g = torch.randn(pc.shape, generator=gen, dtype=torch.float64).to(dtype) * 0.1
            pc.grad = g
            pd.grad = to_device(g) if device_grad_fn is None else device_grad_fn(to_device(g))
        cpu_opt.step()
        cuda_opt.step()
    mirror, mirror_params = cpu_mirror(cuda_opt, cuda_params)
    assert_states_close(mirror, cpu_opt, mirror_params, cpu_params, CUDA_VS_CPU[dtype], "cuda vs cpu")


@pytest.mark.parametrize("amsgrad", [False, True], ids=["plain", "amsgrad"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DNAME.get)
def test_adam_odd_sizes(dtype, amsgrad):
    specs = [((n,), "contiguous") for n in ODD_SIZES] + [((), "contiguous")]
    _run_pair(_adam_pair(specs, dtype, amsgrad=amsgrad), 3, dtype)


@pytest.mark.parametrize("amsgrad", [False, True], ids=["plain", "amsgrad"])
def test_adam_more_tensors_than_one_launch(amsgrad):
    # 3 launches' worth at depth 5 (and 6 with amsgrad), with empty and 0-d ones.
    small = [((0,), "contiguous"), ((), "contiguous"), ((1,), "contiguous"),
             ((3, 5), "transposed"), ((17,), "contiguous"), ((4097,), "contiguous")]
    specs = [small[i % len(small)] for i in range(3 * TENSORS_PER_LAUNCH["adam"] + 7)]
    _run_pair(_adam_pair(specs, torch.float32, amsgrad=amsgrad), 3, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DNAME.get)
def test_adam_more_chunks_than_one_launch(dtype):
    # ~25M elements: 382 chunks, more than one launch's 320 blocks, starting
    # after small tensors so that it is carried over from a slot other than 0.
    specs = [((1000,), "contiguous")] * 5 + [((25_000_000,), "contiguous"), ((33,), "contiguous")]
    _run_pair(_adam_pair(specs, dtype), 2, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DNAME.get)
def test_adam_misaligned_and_strided(dtype):
    specs = [((70001,), "contiguous"), ((33, 65), "transposed"), ((129, 40), "slice"),
             ((2, 3, 5, 7), "channels_last"), ((), "contiguous"), ((0, 3), "contiguous")]
    # A parameter that is a view at storage offset 1, with aligned gradients
    # and state (the element-by-element path of chunk_foreach).
    _run_pair(_adam_pair(specs, dtype, misaligned_param=0), 3, dtype)
    # The same with misaligned gradients too (contiguous ones become views at
    # offset 1; the strided ones stay strided).
    _run_pair(_adam_pair(specs, dtype, misaligned_param=0, seed=1), 2, dtype,
              device_grad_fn=lambda g: _misaligned_copy(g) if g.is_contiguous() else g)
    # An aligned parameter with a misaligned gradient.
    _run_pair(_adam_pair(specs, dtype, seed=2), 2, dtype,
              device_grad_fn=lambda g: _misaligned_copy(g) if g.is_contiguous() else g)


def test_adam_deterministic():
    specs = [((3_000_000,), "contiguous"), ((7, 9), "transposed"), ((), "contiguous")] + \
        [((1000,), "contiguous")] * 60
    runs = []
    for _ in range(2):
        (_, _), (params, opt) = _adam_pair(specs, torch.float32, amsgrad=True)
        for step in range(3):
            gen = torch.Generator().manual_seed(step)
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(DEV)
            opt.step()
        runs.append((params, opt))
    (pa, oa), (pb, ob) = runs
    for a, b in zip(pa, pb):
        assert bitwise_equal(a.detach(), b.detach())
        for key in oa.state[a]:
            assert bitwise_equal(oa.state[a][key], ob.state[b][key]), key
    for key in oa.clip_stats:
        assert bitwise_equal(oa.clip_stats[key], ob.clip_stats[key]), key


# -- non-finite skip without a host sync ------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DNAME.get)
@pytest.mark.parametrize("clip", [None, 1.0, ("global", 0.5, math.inf)], ids=str)
def test_nonfinite_skip_no_sync(dtype, clip):
    specs = [((5, 7), "contiguous"), ((), "contiguous"), ((0,), "contiguous"),
             ((6, 4), "transposed"), ((3, 8), "slice"), ((70001,), "contiguous")]
    gen = torch.Generator().manual_seed(5)
    params = [torch.nn.Parameter(to_device(make_tensor(s, lay, gen, dtype))) for s, lay in specs]
    opt = fusedclip.FusedClipAdam(params, lr=torch.tensor(0.01, device=DEV), amsgrad=True,
                                  weight_decay=0.1, clip=clip_policy(clip))
    for step in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        if step == 2:
            before = snapshot(opt, params)
            params[5].grad[70000] = math.nan
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert_unchanged(opt, params, before, "skipped step")
    assert int(opt.clip_stats["skipped"]) == 1
    assert all(float(opt.state[p]["step"]) == 2.0 for p in params)


# -- CUDA graphs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DNAME.get)
@pytest.mark.parametrize("clip", [1.0, ("global", 0.5, math.inf)], ids=str)
def test_cuda_graph_capture_and_replay(dtype, clip):
    """opt.step() captured once and replayed equals eager steps, bit for bit:
    the same kernels on the same inputs. A replay whose gradients hold a NaN
    is skipped, and a new lr written into the lr tensor is used."""
    specs = [((5, 7), "contiguous"), ((), "contiguous"), ((0,), "contiguous"),
             ((6, 4), "transposed"), ((3, 8), "slice"), ((200_003,), "contiguous")]

    def setup():
        gen = torch.Generator().manual_seed(6)
        params = [torch.nn.Parameter(to_device(make_tensor(s, lay, gen, dtype)))
                  for s, lay in specs]
        for p in params:  # static gradient buffers, written in place every step
            p.grad = torch.zeros_like(p)
        lr = torch.tensor(0.01, device=DEV)
        return params, lr, fusedclip.FusedClipAdamW(params, lr=lr, amsgrad=True,
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
            for key in eager.state[a]:
                assert bitwise_equal(eager.state[a][key], graphed.state[b][key]), (step, key)
        for key in ("grad_norm", "clip_coef", "skipped"):
            assert bitwise_equal(eager.clip_stats[key], graphed.clip_stats[key]), (step, key)
    assert int(graphed.clip_stats["skipped"]) == 1
    assert float(graphed.state[graph_p[0]]["step"]) == 9.0  # 10 steps, one skipped


# -- torch.compile --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DNAME.get)
@pytest.mark.parametrize("lr_tensor", [False, True], ids=["lr-float", "lr-tensor"])
def test_compiled_step_cuda(dtype, lr_tensor):
    from test_compile import assert_same_run, run_compiled_vs_eager

    try:
        eager, comp = run_compiled_vs_eager(DEV, dtype=dtype, lr_tensor=lr_tensor, steps=4,
                                            poison_step=2)
        assert_same_run(eager, comp, dtype)
        assert int(comp[1].clip_stats["skipped"]) == 1
    finally:
        torch._dynamo.reset()

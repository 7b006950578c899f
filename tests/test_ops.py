"""The operators, on the CPU and (with a GPU and the CUDA kernels) on CUDA:
torch.library.opcheck of every op; the norm ops against
torch.linalg.vector_norm; every update rule's op contract (skip flag,
per-tensor coefficients, grad_scale, tensor lr, layouts, counter dtypes, the
shared gradient transform: clip_value and unit_coefs) and its own argument
checks.

Every update op is reached through the registry's adapter (registry.OpSample,
call_update, op_call), for every rule of registry.RULES.
"""

from __future__ import annotations

import math

import pytest
import torch

from fusedclip import ops

from helpers import (
    DTYPES, assert_close, assert_same_step, bitwise_equal, clone_layout, device_params, dname,
    make_tensor, to_device,
)
from registry import (
    NORM_OPS, RULES, call_op, call_update, on_devices, op_call, op_sample, rule_params,
    run_update, times_units, transform_sample, variant_params,
)
from tolerances import NORM, NORM_OUT_DTYPE, REFERENCE, TORCH_NORM

NORM_TYPES = [pytest.param(2.0, id="l2"), pytest.param(math.inf, id="inf")]
# CPU: around the SIMD widths (8 floats, 16 half per AVX2 step; 16 and 32 with
# AVX-512; times 4 accumulators), the CPU update chunk (16384), the norm chunk of
# 256 KiB (32768 float64, 65536 float32, 131072 bfloat16/float16 elements) and
# the multi-threaded threshold (65536), and one of a million elements. CUDA:
# around the 16-byte vector widths (2, 4, 8 elements), the block (512 threads)
# and the chunk (65536 elements).
ODD_SIZES = sorted(set(
    [0, 1, 2, 7, 8, 9, 15, 16, 17, 31, 33, 63, 65, 127, 129, 255, 1023, 16383, 16384,
     16385, 32767, 32768, 32769, 65535, 65536, 65537, 100003, 131071, 131072, 131073,
     262147, 1000003]
    + [0, 1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 33, 127, 129, 511, 512, 513, 2047,
       2049, 4095, 4097, 65535, 65536, 65537, 131071, 131073, 200003]))
NORM_DEVICE = device_params(NORM_OPS)  # the norm ops' devices


def _devices(cases):
    """Every case (a dtype, or pytest params) on every device, for the norm ops."""
    cases = [pytest.param(c, id=dname(c)) if isinstance(c, torch.dtype) else c for c in cases]
    return on_devices(cases, lambda values: list(NORM_OPS))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _on(device, tensors):
    return [to_device(t, device) for t in tensors]


# =============================================================================================
# The norm ops
# =============================================================================================
def _norm_samples():
    g = _gen(0)
    for dtype in DTYPES:
        tensors = [
            make_tensor((5,), "contiguous", g, dtype), make_tensor((4, 3), "transposed", g, dtype),
            make_tensor((3, 4), "slice", g, dtype), make_tensor((), "contiguous", g, dtype),
            make_tensor((0,), "contiguous", g, dtype), make_tensor((2, 3, 4, 5), "channels_last", g, dtype),
            make_tensor((40000,), "contiguous", g, dtype),
        ]
        for norm_type in (2.0, math.inf):
            yield pytest.param(tensors, norm_type, id=f"{dname(dtype)}-{norm_type}")
    yield pytest.param([make_tensor((0,), "contiguous", g, torch.float32)], 2.0, id="only-empty")
    yield pytest.param([make_tensor((9,), "contiguous", g, torch.float32)], math.inf, id="one")


@pytest.mark.parametrize("device,tensors,norm_type", _devices(list(_norm_samples())))
def test_opcheck_multi_tensor_norm(device, tensors, norm_type):
    torch.library.opcheck(torch.ops.fusedclip.multi_tensor_norm.default,
                          (_on(device, tensors), norm_type))


def _norm_vs_float64(tensors, norm_type, what=""):
    """multi_tensor_norm of `tensors` against the float64 norms: per tensor,
    global, the flag, and the dtypes and device of the results."""
    norms, total, flag = ops.multi_tensor_norm(tensors, norm_type)
    dtype, device = tensors[0].dtype, tensors[0].device
    out = NORM_OUT_DTYPE[dtype]
    assert norms.device == total.device == flag.device == device
    assert norms.dtype == total.dtype == out and flag.dtype == torch.float32
    expected = [torch.linalg.vector_norm(t.double().flatten().cpu(), norm_type) if t.numel()
                else torch.zeros((), dtype=torch.float64) for t in tensors]
    assert_close(norms.cpu(), torch.stack(expected).to(out), NORM[dtype], f"{what} tensor norms")
    exp_total = torch.linalg.vector_norm(torch.stack(expected), norm_type)
    assert_close(total.cpu(), exp_total.to(out), NORM[dtype], f"{what} total")
    assert float(flag) == (0.0 if math.isfinite(float(exp_total)) else 1.0)
    return norms, total, flag


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("device,dtype", _devices(DTYPES))
def test_norm_matches_vector_norm(device, dtype, norm_type):
    """Per-tensor and global norms of tensors of every odd size, in one call,
    against vector_norm in float64 (the exact answer to rounding), against
    vector_norm in the tensors' own dtype (what clip_grad_norm_ computes), and
    each size alone (the only tensor of a call)."""
    g = _gen(1)
    tensors = [to_device(make_tensor((n,), "contiguous", g, dtype, std=3.0), device)
               for n in ODD_SIZES]
    norms, total, flag = ops.multi_tensor_norm(tensors, norm_type)
    out_dtype = NORM_OUT_DTYPE[dtype]
    assert norms.dtype == total.dtype == out_dtype
    assert norms.shape == (len(tensors),) and total.shape == () and flag.shape == ()
    assert flag.dtype == torch.float32 and float(flag) == 0.0
    # (torch refuses the inf norm of an empty tensor; fusedclip's is 0, the
    # identity of max over norms >= 0)
    exact = [torch.linalg.vector_norm(t.double().cpu(), norm_type) if t.numel()
             else torch.zeros((), dtype=torch.float64) for t in tensors]
    exact_total = torch.linalg.vector_norm(torch.stack(exact), norm_type)
    norms, total = norms.cpu(), total.cpu()
    if math.isinf(norm_type):
        # max |x| is exact in any dtype
        assert torch.equal(norms, torch.stack(exact).to(out_dtype))
        assert torch.equal(total, exact_total.to(out_dtype))
    else:
        for n, t, e in zip(norms, tensors, exact):
            assert_close(n, e.to(out_dtype), NORM[dtype], f"norm of {t.numel()} elements")
        assert_close(total, exact_total.to(out_dtype), NORM[dtype], "global norm")
    # torch's own result in the tensors' dtype: the same number, rounded to it.
    # Not for the million elements: torch's float32 vector_norm of them is
    # itself 1e-5 off the exact value (measured; fusedclip's 1e-7), and the
    # exact comparison above covers them.
    for n, t in zip(norms, tensors):
        if (t.numel() == 0 and math.isinf(norm_type)) or t.numel() > 500_000:
            continue
        theirs = torch.linalg.vector_norm(t, norm_type).cpu()
        assert_close(n.to(dtype), theirs, TORCH_NORM[dtype], f"vs torch, {t.numel()} elements")
    for t in tensors:  # one at a time too
        if t.numel():
            _norm_vs_float64([t], norm_type, f"n={t.numel()}")


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("device,dtype", _devices(DTYPES))
def test_norm_of_any_layout(device, dtype, norm_type):
    """Transposed, strided, channels-last, expanded (overlapping) tensors and
    views that are not 16-byte aligned, a 0-d and an empty one: every element
    as torch counts it; on the CPU exactly what the same values, contiguous,
    give."""
    g = _gen(2)
    base = to_device(make_tensor((5, 1), "contiguous", g, dtype), device)
    tensors = [
        to_device(make_tensor((33, 17), "transposed", g, dtype), device),
        to_device(make_tensor((9, 70), "slice", g, dtype), device),
        to_device(make_tensor((2, 3, 5, 7), "channels_last", g, dtype), device),
        base.expand(5, 41),
        to_device(make_tensor((64, 64), "contiguous", g, dtype), device)[::3, 1::5],
    ]
    # Pinned: these five, on the CPU, give bit for bit their contiguous copies'
    # norms. (Not every permuted tensor does: a transposed 100 x 100 float32
    # one, for instance, differs in the last bit; reported, not asserted.)
    pinned = len(tensors)
    flat = to_device(make_tensor((70001,), "contiguous", g, dtype), device)
    tensors += [
        flat[1:],                       # storage offset 1: not 16-byte aligned
        flat[3:3 + 4097],               # misaligned, odd size
        to_device(make_tensor((33, 65), "transposed", g, dtype), device),
        to_device(make_tensor((129, 40), "slice", g, dtype), device),
        to_device(make_tensor((), "contiguous", g, dtype), device),
        to_device(make_tensor((0, 3), "contiguous", g, dtype), device),
    ]
    assert flat[1:].data_ptr() % 16 != 0
    norms, total, _ = _norm_vs_float64(tensors, norm_type, "layouts")
    out_dtype = NORM_OUT_DTYPE[dtype]
    for i, (n, t) in enumerate(zip(norms, tensors)):
        if t.numel() == 0:  # (torch refuses the inf norm of an empty tensor; ours is 0)
            assert float(n) == 0.0
            continue
        expected = torch.linalg.vector_norm(t.double().cpu(), norm_type).to(out_dtype)
        assert_close(n.cpu(), expected, NORM[dtype], f"layout {t.stride()}")
        if device == "cpu" and i < pinned:
            assert bitwise_equal(n, ops.multi_tensor_norm([t.contiguous()], norm_type)[0][0])


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("device,dtype", _devices(DTYPES))
def test_empty_tensors_add_nothing(device, dtype, norm_type):
    g = _gen(3)
    x = to_device(make_tensor((13,), "contiguous", g, dtype), device)
    y = to_device(make_tensor((4, 5), "contiguous", g, dtype), device)
    empties = [torch.zeros(0, dtype=dtype, device=device),
               torch.zeros(3, 0, dtype=dtype, device=device)]
    norms, total, flag = ops.multi_tensor_norm([empties[0], x, empties[1], y], norm_type)
    _, total_without, _ = ops.multi_tensor_norm([x, y], norm_type)
    assert bitwise_equal(total, total_without)
    assert float(norms[0]) == 0.0 and float(norms[2]) == 0.0 and float(flag) == 0.0
    for only in (empties, [empties[0]] * 3):
        norms, total, flag = ops.multi_tensor_norm(only, norm_type)
        assert norms.tolist() == [0.0] * len(only) and float(total) == 0.0 and float(flag) == 0.0
        assert total.dtype == NORM_OUT_DTYPE[dtype]


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_empty_list(norm_type):
    norms, total, flag = ops.multi_tensor_norm([], norm_type)
    assert norms.shape == (0,) and float(total) == 0.0 and float(flag) == 0.0


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("device,dtype", _devices(DTYPES))
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
def test_nonfinite_flag(value, device, dtype, norm_type):
    """One bad element anywhere (SIMD tail, second chunk, 0-d tensor, the last
    element of a long tensor) sets the flag, and the norm is what vector_norm
    gives: inf for an inf, nan for a nan."""
    g = _gen(4)
    shapes = [(17,), (16385,), (), (100,), (200_000,)]
    for which, element in [(0, 16), (1, 16384), (1, 3), (2, 0), (3, 99), (4, 199_999)]:
        tensors = [make_tensor(shape, "contiguous", g, dtype) for shape in shapes]
        tensors[which].view(-1)[element] = value
        norms, total, flag = ops.multi_tensor_norm(_on(device, tensors), norm_type)
        norms, total = norms.cpu(), total.cpu()
        assert float(flag) == 1.0, (which, element)
        expected = torch.linalg.vector_norm(tensors[which].double(), norm_type)
        assert (math.isnan(float(norms[which])) == math.isnan(float(expected))
                and math.isnan(float(total)) == math.isnan(float(expected))), (which, element)
        if not math.isnan(float(expected)):
            assert float(total) == math.inf and float(norms[which]) == math.inf
        others = [i for i in range(len(shapes)) if i != which]
        assert all(math.isfinite(float(norms[i])) for i in others)


@pytest.mark.parametrize("device", NORM_DEVICE)
def test_large_half_values_do_not_overflow_the_norm(device):
    """float16 gradients near their largest value: squares and sums are taken
    in float32, so the (float32) norm is finite and right."""
    x = torch.full((1000,), 60000.0, dtype=torch.float16, device=device)
    norms, total, flag = ops.multi_tensor_norm([x], 2.0)
    assert float(flag) == 0.0
    assert_close(total.cpu(), torch.tensor(60000.0 * math.sqrt(1000)), NORM[torch.float16], "norm")


@pytest.mark.parametrize("device", NORM_DEVICE)
def test_float32_overflow_is_flagged(device):
    """A float32 norm that overflows is not finite, as clip_grad_norm_'s is."""
    x = torch.full((1000,), 1e20, device=device)
    _, total, flag = ops.multi_tensor_norm([x], 2.0)
    assert float(total) == math.inf and float(flag) == 1.0
    assert float(torch.linalg.vector_norm(x)) == math.inf


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("device,dtype", _devices(DTYPES))
def test_norm_is_bit_deterministic(device, dtype, norm_type):
    """The same inputs give the same bits, run after run (on the CPU with one
    thread or two: chunks are reduced on their own and summed in a fixed
    order), for a few long tensors and for many small ones."""
    g = _gen(5)
    sizes = [70001, 16385, 3, 50000, 3_000_000, 7, 65537] + [1000] * 150
    tensors = [to_device(make_tensor((n,), "contiguous", g, dtype), device) for n in sizes]
    tensors.append(to_device(make_tensor((), "contiguous", g, dtype), device))
    threads = torch.get_num_threads()
    try:
        results = []
        for n_threads in ((2, 1, 2) if device == "cpu" else (threads,)):
            torch.set_num_threads(n_threads)
            for _ in range(3):
                results.append(ops.multi_tensor_norm(tensors, norm_type))
    finally:
        torch.set_num_threads(threads)
    for norms, total, flag in results[1:]:
        assert bitwise_equal(norms, results[0][0])
        assert bitwise_equal(total, results[0][1])
        assert bitwise_equal(flag, results[0][2])


# -- multi_tensor_unit_norm: per-unit norms in the same read ----------------------------------
def _unit_norm_samples():
    g = _gen(3)
    for dtype in DTYPES:
        tensors = [
            make_tensor((5,), "contiguous", g, dtype), make_tensor((4, 3), "transposed", g, dtype),
            make_tensor((3, 4), "slice", g, dtype), make_tensor((), "contiguous", g, dtype),
            make_tensor((0,), "contiguous", g, dtype), make_tensor((2, 3, 4, 5), "channels_last", g, dtype),
            torch.zeros((4, 0), dtype=dtype), torch.zeros((0, 3), dtype=dtype),
            make_tensor((3, 20000), "contiguous", g, dtype), make_tensor((40000, 3), "contiguous", g, dtype),
        ]
        for norm_type in (2.0, math.inf):
            yield pytest.param(tensors, norm_type, id=f"{dname(dtype)}-{norm_type}")
    yield pytest.param([make_tensor((0,), "contiguous", g, torch.float32)], 2.0, id="only-empty")


UNIT_NORM_SAMPLES = list(_unit_norm_samples())


def _exact_unit_norms(t: torch.Tensor, norm_type: float) -> torch.Tensor:
    """timm's unitwise_norm in float64, as one 1-D tensor (0 for empty units)."""
    x = t.double().cpu()
    if x.dim() <= 1:
        x = x.reshape(1, -1)
    x = x.flatten(1)
    if x.shape[1] == 0:
        return torch.zeros(x.shape[0], dtype=torch.float64)
    return torch.linalg.vector_norm(x, norm_type, dim=1)


@pytest.mark.parametrize("device,tensors,norm_type", _devices(UNIT_NORM_SAMPLES))
def test_opcheck_multi_tensor_unit_norm(device, tensors, norm_type):
    torch.library.opcheck(torch.ops.fusedclip.multi_tensor_unit_norm.default,
                          (_on(device, tensors), norm_type))


@pytest.mark.parametrize("device,tensors,norm_type", _devices(UNIT_NORM_SAMPLES))
def test_unit_norms_are_unitwise_norms(device, tensors, norm_type):
    """Every unit (index of dim 0; the whole tensor for ndim <= 1) of tensors of
    every layout, units that span CPU chunks (3 x 20000) and chunks that start
    inside a unit (40000 x 3): against the float64 norm; the per-tensor and
    global norms and the flag as multi_tensor_norm gives them."""
    tensors = _on(device, tensors)
    dtype = tensors[0].dtype
    units, norms, total, flag = ops.multi_tensor_unit_norm(tensors, norm_type)
    counts = ops.unit_counts(tensors)
    assert units.shape == (sum(counts),) and units.dtype == NORM_OUT_DTYPE[dtype]
    for i, (u, t) in enumerate(zip(units.cpu().split(counts), tensors)):
        assert_close(u, _exact_unit_norms(t, norm_type).to(u.dtype), NORM[dtype],
                     f"units of tensor {i} {tuple(t.shape)}")
    n2, total2, flag2 = ops.multi_tensor_norm(tensors, norm_type)
    assert_close(norms, n2, NORM[dtype], "tensor norms")
    assert_close(total, total2, NORM[dtype], "global norm")
    assert bitwise_equal(flag, flag2)


@pytest.mark.parametrize("device", NORM_DEVICE)
def test_unit_norm_nonfinite_flag_and_threads(device):
    x = torch.randn(300, 70)
    x[123, 5] = math.inf
    units, _, total, flag = ops.multi_tensor_unit_norm(_on(device, [torch.randn(7), x]), 2.0)
    units = units.cpu()
    assert float(flag) == 1.0 and math.isinf(float(total))
    assert math.isinf(float(units[1 + 123])) and bool(torch.isfinite(units[1:1 + 123]).all())
    # multi-threaded (on the CPU): the result does not depend on the threads
    y = to_device(torch.randn(50000, 5), device)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in ((1, max(2, threads)) if device == "cpu" else (threads, threads)):
            torch.set_num_threads(n)
            results.append(ops.multi_tensor_unit_norm([y, torch.randn(3, device=device)[:0]], 2.0))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert bitwise_equal(a, b)


def test_unit_norm_of_no_tensors():
    units, norms, total, flag = ops.multi_tensor_unit_norm([], 2.0)
    assert units.shape == (0,) and norms.shape == (0,) and float(total) == 0 and float(flag) == 0


def test_tensors_like():
    """ops.tensors_like: every tensor dense, of the dtype, on the device; an
    empty list is."""
    cpu = torch.device("cpu")
    dense = [torch.zeros(3), torch.zeros(2, 2).t(), torch.zeros(())]
    assert ops.tensors_like(dense, torch.float32, cpu)
    assert ops.tensors_like([], torch.float32, cpu)
    assert not ops.tensors_like(dense, torch.float64, cpu)
    assert not ops.tensors_like(dense + [torch.zeros(3, dtype=torch.bfloat16)], torch.float32, cpu)
    assert not ops.tensors_like(dense + [torch.zeros(3, device="meta")], torch.float32, cpu)
    assert not ops.tensors_like([torch.zeros(3), torch.zeros(3).to_sparse()], torch.float32, cpu)
    assert not ops.tensors_like([torch.zeros(2, 2).to_sparse_csr()], torch.float32, cpu)


# =============================================================================================
# The update ops, every rule through the registry's adapter
# =============================================================================================
def _rule_devices(cases):
    """Every case (its first value a rule) on every device."""
    return on_devices(cases, lambda values: values[0])


def _assert_lists_equal(a, b, what: str, skip=()):
    """Bitwise equality of two OpSamples' tensor lists (``skip``: list indices
    left out: 1 is the gradients)."""
    for k, (x, y) in enumerate(zip(a.lists(), b.lists())):
        if k in skip:
            continue
        assert len(x) == len(y), f"{what}: list {k} lengths"
        for i, (s, t) in enumerate(zip(x, y)):
            assert bitwise_equal(s, t), f"{what}: list {k} [{i}] differs"


def _update_samples():
    """Every rule in every dtype, the option sets alternating (first steps
    and a tensor lr; a transposed parameter, per-tensor coefficients and
    grad_scale), and a few more: no clip coefficient with a slice and a
    found_inf of 0, a found_inf of 1, float64 step counters, spike_theta
    (rules with a second moment), SGD without momentum."""
    for rule in RULES.values():
        for k, dtype in enumerate(DTYPES):
            if k % 2 == 0:
                yield pytest.param(rule, dtype, dict(lr_tensor=True, started=False, **rule.base),
                                   id=f"{rule}-{dname(dtype)}-first-lrT")
            else:
                yield pytest.param(rule, dtype, dict(layout="transposed", clip="per-tensor",
                                                     grad_scale=True, **rule.alt),
                                   id=f"{rule}-{dname(dtype)}-T-percoef-scale")
        yield pytest.param(rule, torch.float32, dict(layout="slice", clip="none",
                                                     found_inf=torch.tensor(0.0), **rule.base),
                           id=f"{rule}-slice-noclip-found0")
        yield pytest.param(rule, torch.float32, dict(found_inf=torch.tensor(1.0), started=False),
                           id=f"{rule}-found1")
        if rule.steps_name:
            yield pytest.param(rule, torch.float64, dict(step_dtype=torch.float64),
                               id=f"{rule}-f64-steps")
        if rule.second_moment:  # SpikeClip's element-wise clip against it
            yield pytest.param(rule, torch.float32, dict(spike_theta=2.0), id=f"{rule}-spike")
    yield pytest.param(RULES["sgd"], torch.float32, dict(momentum=0.0, clip="none"),
                       id="sgd-plain")


@pytest.mark.parametrize("device,rule,dtype,options", _rule_devices(list(_update_samples())))
def test_opcheck_update(device, rule, dtype, options):
    fn, args, kwargs = op_call(op_sample(rule, dtype, **options).to(device))
    torch.library.opcheck(fn, args, kwargs)


def _transform_opcheck_samples():
    """Every rule in every dtype with unit_coefs and clip_value (small
    tensors: the registration is checked here, the kernels' units across
    chunks by the tests below), and one more per rule: float64 coefficients
    (SGD without momentum), or clip_value on a slice with found_inf."""
    for rule in RULES.values():
        for k, dtype in enumerate(DTYPES):
            options = dict(rule.base)
            if rule.name == "sgd":
                options.update(nesterov=bool(k % 2), started=bool(k % 2))
            s, coefs = transform_sample(rule, dtype, seed=k, large=False, **options)
            yield pytest.param(s.with_args(unit_coefs=coefs, clip_value=0.5),
                               id=f"{rule}-{dname(dtype)}-units-value")
        if rule.name in ("adam", "sgd"):
            plain = dict(momentum=0.0) if rule.name == "sgd" else dict(rule.base)
            s, coefs = transform_sample(rule, torch.float32, coef_dtype=torch.float64,
                                        large=False, **plain)
            yield pytest.param(s.with_args(unit_coefs=coefs), id=f"{rule}-plain-f64coefs")
        else:
            s, _ = transform_sample(rule, torch.float32, layout="slice", large=False, **rule.base)
            yield pytest.param(s.with_args(clip_value=0.25, found_inf=torch.tensor(1.0)),
                               id=f"{rule}-value-found1")


@pytest.mark.parametrize("device,sample", on_devices(
    list(_transform_opcheck_samples()), lambda values: values[0].rule))
def test_opcheck_grad_transform(device, sample):
    fn, args, kwargs = op_call(sample.to(device))
    torch.library.opcheck(fn, args, kwargs)


# -- the ops' contract ----------------------------------------------------------------------
@pytest.mark.parametrize("device,rule,dtype", _rule_devices(
    [pytest.param(r, d, id=f"{r}-{dname(d)}") for r in RULES.values() for d in DTYPES]))
def test_found_inf_changes_nothing(device, rule, dtype):
    s = op_sample(rule, dtype, found_inf=torch.tensor(1.0), **rule.base).to(device)
    _assert_lists_equal(run_update(s), s, "found_inf=1")
    after = run_update(s.with_args(found_inf=torch.tensor(0.0, device=device)))
    assert [float(x) for x in after.steps] == [float(x) + 1 for x in s.steps]
    assert not torch.equal(after.params[0], s.params[0])


@pytest.mark.parametrize("device,rule,dtype", _rule_devices(
    [pytest.param(r, d, id=f"{r}-{dname(d)}") for r in RULES.values() for d in DTYPES]))
def test_per_tensor_coefficients(device, rule, dtype):
    """clip_coef with one value per tensor: each tensor as if run alone with its own."""
    s = op_sample(rule, dtype, clip="per-tensor", **rule.base).to(device)
    together = run_update(s)
    for i in range(len(s.params)):
        alone = s.with_lists([[group[i]] if group else [] for group in s.lists()])
        alone = run_update(alone.with_args(clip_coef=s.args["clip_coef"][i].clone()))
        for k, (x, y) in enumerate(zip(together.lists(), alone.lists())):
            if y:
                assert bitwise_equal(x[i], y[0]), f"tensor {i} list {k}"


@pytest.mark.parametrize("device,rule,dtype", _rule_devices(
    [pytest.param(r, d, id=f"{r}-{dname(d)}") for r in RULES.values() for d in DTYPES]))
def test_grad_scale_and_lr_tensor(device, rule, dtype):
    """Gradients scaled by a power of two with grad_scale given are the
    unscaled gradients, bit for bit (the unscale is exact); lr_tensor's
    float32 value is used, whatever lr says."""
    s = op_sample(rule, dtype, grad_scale=True, lr_tensor=True, **rule.base).to(device)
    a = run_update(s.with_grads([g * 4.0 for g in s.grads]))
    b = run_update(s.with_args(grad_scale=None, lr=float(s.args["lr_tensor"]), lr_tensor=None))
    _assert_lists_equal(a, b, "grad_scale / lr_tensor", skip=(1,))


@pytest.mark.parametrize("device,rule,layout,dtype", _rule_devices(
    [pytest.param(r, lay, d, id=f"{r}-{lay}-{dname(d)}") for r in RULES.values()
     for lay in ("transposed", "slice") for d in DTYPES]))
def test_layouts(device, rule, layout, dtype):
    """A parameter whose layout its gradient and state do not share is
    updated in its own storage, to the same values as a contiguous one."""
    s = op_sample(rule, dtype, layout=layout, **rule.base).to(device)
    param = s.params[1]
    assert not param.is_contiguous()
    ptr, stride = param.data_ptr(), param.stride()
    contiguous = s.clone()
    contiguous.params[1] = param.contiguous()
    expected = run_update(contiguous)
    call_update(s)
    assert param.data_ptr() == ptr and param.stride() == stride
    _assert_lists_equal(s, expected, layout)


@pytest.mark.parametrize("device,rule,dtype", _rule_devices(
    [pytest.param(r, d, id=f"{r}-{dname(d)}") for r in RULES.values() if r.steps_name
     for d in DTYPES]))
def test_float64_and_mixed_counters(device, rule, dtype):
    """Step counters may be float64 (torch.optim's under a float64 default
    dtype), all of them or some: the same update, the counters' dtypes kept."""
    s = op_sample(rule, dtype, **rule.base).to(device)
    a = run_update(s)
    for name, convert in (("float64", lambda i, c: c.double()),
                          ("mixed", lambda i, c: c.double() if i % 2 else c)):
        other = s.clone()
        other.steps = [convert(i, c) for i, c in enumerate(other.steps)]
        dtypes = [c.dtype for c in other.steps]
        b = run_update(other)
        _assert_lists_equal(a, b, f"{name} counters", skip=(len(s.lists()) - 1,))
        assert [float(x) for x in a.steps] == [float(x) for x in b.steps]
        assert [c.dtype for c in b.steps] == dtypes


@pytest.mark.parametrize("device,dtype,nesterov", on_devices(
    [pytest.param(d, n, id=f"{dname(d)}-{'nesterov' if n else 'momentum'}")
     for d in DTYPES for n in (False, True)], lambda values: RULES["sgd"]))
def test_first_buffer_step_after_skips(device, dtype, nesterov):
    """SGD: a counter at 0 makes the step the buffer's first, buf = g exactly
    (clip_coef None, no decay: g unchanged), whatever the buffer holds and
    whatever the dampening; skipped calls keep it at 0. A started buffer
    blends: momentum * buf + (1 - dampening) g."""
    damp = 0.0 if nesterov else 0.5
    s = op_sample("sgd", dtype, started=False, clip="none", weight_decay=0.0,
                  nesterov=nesterov, dampening=damp).to(device)
    for _ in range(2):
        s = run_update(s.with_args(found_inf=torch.tensor(1.0, device=device)))
        s = s.with_args(found_inf=None)
        assert all(float(c) == 0 for c in s.steps)
    after = run_update(s)
    for i, (buf, g) in enumerate(zip(after.states[0], s.grads)):
        assert bitwise_equal(buf, g), f"buffer {i} is not the gradient"
        assert float(after.steps[i]) == 1
    again = run_update(after)
    for i, (buf, old, g) in enumerate(zip(again.states[0], after.states[0], s.grads)):
        expected = (0.9 * old.double() + (1 - damp) * g.double()).to(dtype)
        assert torch.allclose(buf.double(), expected.double(), rtol=2 ** -7, atol=1e-6), i


# -- clip_value and unit_coefs (the shared gradient transform) -----------------------------
def _variant_devices():
    return on_devices(variant_params(), lambda values: values[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dname)
@pytest.mark.parametrize("device,rule,options", _variant_devices())
def test_unit_coefs_scale_each_unit(device, rule, options, dtype):
    """unit_coefs: the update of gradients pre-multiplied unit by unit, to an
    ulp or two (tolerances.TRANSFORM_PATHS; float32 coefficients and no
    clip_coef: the multiplier is the coefficient itself), across chunk
    boundaries inside units, for every layout (row-major stand-ins, updated in
    the parameter's own storage); the gradients are not written."""
    s, coefs = transform_sample(rule, dtype, **options)
    s, coefs = s.to(device), [c.to(device) for c in coefs]
    param = s.params[1]
    ptr, stride = param.data_ptr(), param.stride()
    expected = run_update(s.with_grads(times_units(s.grads, coefs)))
    got = run_update(s.with_args(unit_coefs=coefs))
    assert_same_step(got.lists()[:1] + got.lists()[2:], expected.lists()[:1] + expected.lists()[2:],
                     f"{rule} unit_coefs")
    assert not run_update(s).params[0].equal(got.params[0])  # the coefficients matter
    grads_before = [clone_layout(g) for g in s.grads]
    call_update(s.with_args(unit_coefs=coefs))
    assert param.data_ptr() == ptr and param.stride() == stride
    assert all(bitwise_equal(a, b) for a, b in zip(s.grads, grads_before)), "grads written"
    assert all(bitwise_equal(a, b) for a, b in zip(s.params, got.params)), "in place"


@pytest.mark.parametrize("device,rule,dtype", _rule_devices(
    [pytest.param(r, d, id=f"{r}-{dname(d)}") for r in RULES.values() for d in DTYPES]))
def test_unit_coefs_with_clip_coef_and_scale(device, rule, dtype):
    """unit_coefs (float64), a per-tensor clip_coef and grad_scale multiply:
    against the rule's float64 reference step on the so-scaled gradients,
    parameters and every state list."""
    s, coefs = transform_sample(rule, dtype, coef_dtype=torch.float64, **rule.base)
    n = len(s.params)
    clip = torch.linspace(0.3, 1.0, n, dtype=torch.float64)
    s = s.with_args(clip_coef=clip, grad_scale=torch.tensor(8.0), unit_coefs=coefs)
    before = s.clone()
    s = s.to(device)
    call_update(s)
    for i in range(n):
        p = before.params[i].double()
        grad = times_units([before.grads[i].double()], [coefs[i]])[0] * clip[i] / 8.0
        states = [lst[i].double() for lst in before.states if lst]
        step = before.steps[i] if before.steps else None
        expected = rule.reference_step(p, grad, states, step, s.hyper, lr=s.args["lr"],
                                       maximize=s.args["maximize"])
        assert_close(s.params[i].cpu(), p.to(dtype), REFERENCE[dtype], f"{rule} param {i}")
        got_states = [lst[i] for lst in s.states if lst]
        for k, (a, e) in enumerate(zip(got_states, expected)):
            assert_close(a.cpu(), e.to(dtype), REFERENCE[dtype], f"{rule} state {k} [{i}]")


@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("device,rule,options", _variant_devices())
def test_clip_value_clamps_each_element(device, rule, options, dtype):
    """clip_value: the update of pre-clamped gradients, to an ulp or two
    (tolerances.TRANSFORM_PATHS; the clamp is exact and commutes with the sign
    of maximize); with grad_scale the unscaled gradient is clamped. 0.375 is
    exact in every dtype (the kernel clamps in the math type, float32 for half
    and bfloat16)."""
    s, _ = transform_sample(rule, dtype, **options)
    s = s.to(device)
    clamped = [g.clamp(-0.375, 0.375) for g in s.grads]
    expected = run_update(s.with_grads(clamped))
    got = run_update(s.with_args(clip_value=0.375))
    assert_same_step(got.lists()[:1] + got.lists()[2:], expected.lists()[:1] + expected.lists()[2:],
                     f"{rule} clip_value")
    assert not run_update(s).params[0].equal(got.params[0])  # the clamp matters
    scaled = s.with_grads([g * 16 for g in s.grads])
    got = run_update(scaled.with_args(clip_value=0.375,
                                      grad_scale=torch.tensor(16.0, device=device)))
    assert_same_step(got.lists()[:1], expected.lists()[:1], f"{rule} clip_value with grad_scale")


@pytest.mark.parametrize("device,rule", _rule_devices(rule_params()))
def test_clip_value_propagates_nan_and_clamps_inf(device, rule):
    """Like torch.clamp: inf becomes +-clip_value, NaN stays NaN (and reaches
    the parameter, or where the rule's step keeps it from the parameter, the
    state)."""
    s, _ = transform_sample(rule, torch.float32, layout="contiguous", **rule.base)
    grad = s.grads[0]
    grad[0], grad[1], grad[2] = math.inf, -math.inf, math.nan
    s = s.to(device)
    clamped = [g.clamp(-0.375, 0.375) for g in s.grads]
    assert math.isnan(float(clamped[0][2]))
    expected = run_update(s.with_grads(clamped))
    got = run_update(s.with_args(clip_value=0.375))
    assert_same_step(got.lists()[:1] + got.lists()[2:], expected.lists()[:1] + expected.lists()[2:],
                     f"{rule} non-finite")
    assert math.isfinite(float(got.params[0][0]))
    if rule.nan_reaches_param:
        assert math.isnan(float(got.params[0][2]))
    else:  # the NaN reaches the state (Lion's momentum)
        assert math.isnan(float(got.states[0][0][2]))


@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("device,rule,options", on_devices(
    [p for p in variant_params() if p.values[0].second_moment], lambda values: values[0]))
def test_clip_value_then_spike_theta(device, rule, options, dtype):
    """clip_value and spike_theta in one call (the active transforms of
    csrc/include/fusedclip/grad_transform.h, chosen together): the update of
    pre-clamped gradients with spike_theta alone, to an ulp or two (0.375 is
    exact in every dtype), and unlike either argument alone. (Both cap an
    element's magnitude, so the two orders agree: this checks that both run.)"""
    s, _ = transform_sample(rule, dtype, **options)
    s = s.to(device)
    clamped = [g.clamp(-0.375, 0.375) for g in s.grads]
    expected = run_update(s.with_grads(clamped).with_args(spike_theta=2.0))
    got = run_update(s.with_args(clip_value=0.375, spike_theta=2.0))
    assert_same_step(got.lists()[:1] + got.lists()[2:], expected.lists()[:1] + expected.lists()[2:],
                     f"{rule} clip_value then spike_theta")
    for alone in (dict(clip_value=0.375), dict(spike_theta=2.0)):
        other = run_update(s.with_args(**alone))
        assert not all(a.equal(b) for a, b in zip(other.params, got.params)), f"{alone} alone"


@pytest.mark.parametrize("rule", rule_params())
@pytest.mark.parametrize("change,match", [
    (dict(unit_coefs=lambda c: c[:-1]), "unit_coefs has"),
    (dict(unit_coefs=lambda c: c[:1] + [torch.ones(5)] + c[2:]), "one element per index of dim 0"),
    (dict(unit_coefs=lambda c: [c[0].to(torch.int64)] + c[1:]), "float32 or float64"),
    (dict(unit_coefs=lambda c: [c[0].double()] + c[1:]), "one dtype"),
    (dict(unit_coefs=lambda c: [c[0].reshape(1, -1)] + c[1:]), "0-d or 1-d"),
    (dict(clip_value=lambda c: -1.0), "clip_value must be >= 0"),
    (dict(clip_value=lambda c: math.nan), "clip_value must be >= 0"),
], ids=["count", "numel", "dtype", "mixed", "dim", "negative", "nan"])
def test_bad_transform_args(rule, change, match):
    """The shared check of clip_value and unit_coefs refuses before anything changes."""
    s, coefs = transform_sample(rule, torch.float32, **rule.base)
    before = s.clone()
    with pytest.raises(RuntimeError, match=match):
        call_update(s.with_args(**{k: f(coefs) for k, f in change.items()}))
    _assert_lists_equal(s, before, "refused call")


# -- the ops' own checks --------------------------------------------------------------------
def _breakers(rule):
    """Ways to break a call of `rule`'s op (on the five-tensor sample), and
    the error each gives: the checks every update op shares, then the rule's own."""
    state = rule.list_names[0]

    def at(k, i, tensor):
        def apply(s):
            s.lists()[k][i] = tensor
        return apply

    def args(**changes):
        def apply(s):
            s.args.update(changes)
        return apply

    def hyper(**changes):
        def apply(s):
            s.hyper.update(changes)
        return apply

    def drop(k):
        def apply(s):
            s.lists()[k].pop()
        return apply

    steps = len(rule.list_names) + 2  # the index of the step list in OpSample.lists()
    last = max(k for k, lst in enumerate(op_sample(rule, torch.float32).states) if lst)
    return [
        pytest.param(rule, at(1, 1, torch.zeros(6, 4)),
                     r"grads\[1\] has shape \[6, 4\] but params\[1\] has shape \[4, 6\]",
                     id=f"{rule}-grad-shape"),
        pytest.param(rule, at(2, 1, torch.zeros(6, 4)), rf"{state}\[1\] has shape \[6, 4\]",
                     id=f"{rule}-state-shape"),
        pytest.param(rule, at(1, 1, torch.zeros(4, 6, dtype=torch.float64)),
                     r"must have one dtype, but grads\[1\] is Double", id=f"{rule}-mixed-dtype"),
        pytest.param(rule, at(0, 2, torch.zeros((), dtype=torch.float64)), "must have one dtype",
                     id=f"{rule}-mixed-param-dtype"),
        pytest.param(rule, at(1, 0, torch.zeros(7, dtype=torch.complex64)), r"grads\[0\] is complex",
                     id=f"{rule}-complex"),
        pytest.param(rule, at(1, 0, torch.zeros(7, dtype=torch.int32)), r"grads\[0\] has dtype Int",
                     id=f"{rule}-int"),
        # A sparse tensor never reaches the kernel's own check: the dispatcher
        # refuses it first, naming the backend (the optimizers check gradients
        # themselves, with their own message: test_errors.py).
        pytest.param(rule, at(1, 0, torch.zeros(7).to_sparse()),
                     f"'{rule.op}' with arguments from the 'SparseCPU' backend",
                     id=f"{rule}-sparse"),
    ] + ([
        pytest.param(rule, drop(steps), rf"{rule.steps_name} has 4 tensors but params has 5",
                     id=f"{rule}-steps-count"),
    ] if rule.steps_name else []) + ([
        pytest.param(rule, args(spike_theta=5000.0), "keeps no second moment",
                     id=f"{rule}-spike-without-second-moment"),
    ] if not rule.second_moment else []) + [
        # (the op takes the state lists as one flat list and cuts it by the
        # parameters' count: a tensor short shows in the last list)
        pytest.param(rule, drop(2 + last), rf"{rule.list_names[last]} has 4 tensors but params has 5",
                     id=f"{rule}-state-count"),
        pytest.param(rule, args(lr=-1.0), "invalid learning rate -1", id=f"{rule}-lr"),
        pytest.param(rule, args(lr_tensor=torch.tensor(-1.0)),
                     "invalid learning rate -1 in lr_tensor", id=f"{rule}-lr-tensor"),
        pytest.param(rule, args(clip_coef=torch.ones(2)),
                     r"clip_coef must have 1 or one per tensor \(5\) elements, got 2",
                     id=f"{rule}-clip-coef-numel"),
        pytest.param(rule, args(clip_coef=torch.ones((), dtype=torch.float16)),
                     "clip_coef must be a dense float32 or float64", id=f"{rule}-clip-coef-dtype"),
        pytest.param(rule, args(found_inf=torch.zeros((), dtype=torch.int32)),
                     "found_inf must be a dense float32 or float64", id=f"{rule}-found-inf-dtype"),
        pytest.param(rule, args(grad_scale=torch.ones(3)), "grad_scale must have 1 elements, got 3",
                     id=f"{rule}-grad-scale-numel"),
        pytest.param(rule, args(lr_tensor=torch.ones(1, 1)), "lr_tensor must be 0-d or 1-d",
                     id=f"{rule}-lr-tensor-dim"),
    ] + [pytest.param(rule, hyper(**changes), match, id=f"{rule}-{name}")
         for name, changes, match in rule.bad_hyper]


@pytest.mark.parametrize("rule,breaker,match", [b for r in RULES.values() for b in _breakers(r)])
def test_update_op_errors(rule, breaker, match):
    """The op refuses bad calls by name, before writing anything."""
    s = op_sample(rule, torch.float32)
    breaker(s)
    before = [[t.clone() for t in group] for group in s.lists()]
    with pytest.raises(RuntimeError, match=match):
        call_op(s)
    for group, old in zip(s.lists(), before):
        for t, o in zip(group, old):
            if t.layout == torch.strided:
                assert torch.equal(t, o)

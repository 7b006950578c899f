"""The two operators: torch.library.opcheck on both, and the norm op against
torch.linalg.vector_norm; the update op's own contract (skip flag, per-tensor
coefficients, grad_scale, tensor lr, layouts)."""

from __future__ import annotations

import math

import pytest
import torch

from fusedclip import ops

import legacy_ops
from conftest import assert_close, assert_same_step, bitwise_equal, clone_layout, make_tensor
from tolerances import NORM, NORM_OUT_DTYPE, TORCH_NORM

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
NORM_TYPES = [pytest.param(2.0, id="l2"), pytest.param(math.inf, id="inf")]
# Around the SIMD widths (8 floats, 16 half per AVX2 step; 16 and 32 with
# AVX-512; times 4 accumulators), the CPU update chunk (16384), the norm chunk of
# 256 KiB (32768 float64, 65536 float32, 131072 bfloat16/float16 elements) and
# the multi-threaded threshold (65536), and one of a million elements.
ODD_SIZES = [0, 1, 2, 7, 8, 9, 15, 16, 17, 31, 33, 63, 65, 127, 129, 255, 1023, 16383, 16384,
             16385, 32767, 32768, 32769, 65535, 65536, 65537, 100003, 131071, 131072, 131073,
             262147, 1000003]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _dname(dtype) -> str:
    return str(dtype).removeprefix("torch.")


# -- opcheck -------------------------------------------------------------------------------
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
            yield pytest.param(tensors, norm_type, id=f"{_dname(dtype)}-{norm_type}")
    yield pytest.param([make_tensor((0,), "contiguous", g, torch.float32)], 2.0, id="only-empty")
    yield pytest.param([make_tensor((9,), "contiguous", g, torch.float32)], math.inf, id="one")


@pytest.mark.parametrize("tensors,norm_type", list(_norm_samples()))
def test_opcheck_multi_tensor_norm(tensors, norm_type):
    torch.library.opcheck(torch.ops.fusedclip.multi_tensor_norm.default, (tensors, norm_type))


def _adam_sample(dtype, *, amsgrad, layout="contiguous", lr_tensor=False, clip="one",
                 grad_scale=False, found_inf=None, step_dtype=torch.float32, seed=0):
    g = _gen(seed)
    shapes = [((7,), "contiguous"), ((4, 6), layout if layout != "channels_last" else "contiguous"),
              ((), "contiguous"), ((0,), "contiguous"), ((3, 33), "contiguous")]
    params = [make_tensor(s, lay, g, dtype) for s, lay in shapes]
    grads = [make_tensor(s, "contiguous", g, dtype) for s, _ in shapes]
    exp_avgs = [make_tensor(s, "contiguous", g, dtype, 0.1) for s, _ in shapes]
    exp_avg_sqs = [make_tensor(s, "contiguous", g, dtype, 0.1).abs() for s, _ in shapes]
    maxes = [v * 1.5 for v in exp_avg_sqs] if amsgrad else []
    steps = [torch.tensor(float(i + 1), dtype=step_dtype) for i in range(len(shapes))]
    clip_coef = {"none": None, "one": torch.tensor(0.7),
                 "per-tensor": torch.linspace(0.2, 1.0, len(shapes))}[clip]
    kwargs = dict(
        lr=0.01, lr_tensor=torch.tensor([0.02]) if lr_tensor else None, beta1=0.9, beta2=0.99,
        eps=1e-8, weight_decay=0.05, amsgrad=amsgrad, maximize=False,
        decoupled_weight_decay=True, clip_coef=clip_coef,
        grad_scale=torch.tensor(4.0) if grad_scale else None, found_inf=found_inf,
    )
    return (params, grads, exp_avgs, exp_avg_sqs, maxes, steps), kwargs


def _adam_samples():
    for dtype in DTYPES:
        yield pytest.param(*_adam_sample(dtype, amsgrad=True, lr_tensor=True), id=f"{_dname(dtype)}-ams-lrT")
        yield pytest.param(*_adam_sample(dtype, amsgrad=False, layout="transposed", clip="per-tensor",
                                         grad_scale=True), id=f"{_dname(dtype)}-T-percoef-scale")
    yield pytest.param(*_adam_sample(torch.float32, amsgrad=True, layout="slice", clip="none",
                                     found_inf=torch.tensor(0.0)), id="slice-noclip-found0")
    yield pytest.param(*_adam_sample(torch.float32, amsgrad=False, found_inf=torch.tensor(1.0)),
                       id="found1")
    yield pytest.param(*_adam_sample(torch.float64, amsgrad=False, step_dtype=torch.float64),
                       id="float64-steps")


@pytest.mark.parametrize("args,kwargs", list(_adam_samples()))
def test_opcheck_adam(args, kwargs):
    legacy_ops.opcheck("adam", args, kwargs)


# -- the norm op against torch.linalg.vector_norm -----------------------------------------
@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dname)
def test_norm_matches_vector_norm(dtype, norm_type):
    """Per-tensor and global norms of tensors of every odd size, in one call,
    against vector_norm in float64 (the exact answer to rounding), and against
    vector_norm in the tensors' own dtype (what clip_grad_norm_ computes)."""
    g = _gen(1)
    tensors = [make_tensor((n,), "contiguous", g, dtype, std=3.0) for n in ODD_SIZES]
    norms, total, flag = ops.multi_tensor_norm(tensors, norm_type)
    out_dtype = NORM_OUT_DTYPE[dtype]
    assert norms.dtype == total.dtype == out_dtype
    assert norms.shape == (len(tensors),) and total.shape == () and flag.shape == ()
    assert flag.dtype == torch.float32 and float(flag) == 0.0
    # (torch refuses the inf norm of an empty tensor; fusedclip's is 0, the
    # identity of max over norms >= 0)
    exact = [torch.linalg.vector_norm(t.double(), norm_type) if t.numel()
             else torch.zeros((), dtype=torch.float64) for t in tensors]
    exact_total = torch.linalg.vector_norm(torch.stack(exact), norm_type)
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
        theirs = torch.linalg.vector_norm(t, norm_type)
        assert_close(n.to(dtype), theirs, TORCH_NORM[dtype], f"vs torch, {t.numel()} elements")


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dname)
def test_norm_of_any_layout(dtype, norm_type):
    """Transposed, strided, channels-last and expanded (overlapping) tensors:
    every element as torch counts it."""
    g = _gen(2)
    base = make_tensor((5, 1), "contiguous", g, dtype)
    tensors = [
        make_tensor((33, 17), "transposed", g, dtype), make_tensor((9, 70), "slice", g, dtype),
        make_tensor((2, 3, 5, 7), "channels_last", g, dtype), base.expand(5, 41),
        make_tensor((64, 64), "contiguous", g, dtype)[::3, 1::5],
    ]
    norms, total, _ = ops.multi_tensor_norm(tensors, norm_type)
    out_dtype = NORM_OUT_DTYPE[dtype]
    for n, t in zip(norms, tensors):
        expected = torch.linalg.vector_norm(t.double(), norm_type).to(out_dtype)
        assert_close(n, expected, NORM[dtype], f"layout {t.stride()}")
        # and exactly what the same values, contiguous, give
        assert bitwise_equal(n, ops.multi_tensor_norm([t.contiguous()], norm_type)[0][0])


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dname)
def test_empty_tensors_add_nothing(dtype, norm_type):
    g = _gen(3)
    x, y = make_tensor((13,), "contiguous", g, dtype), make_tensor((4, 5), "contiguous", g, dtype)
    empties = [torch.zeros(0, dtype=dtype), torch.zeros(3, 0, dtype=dtype)]
    norms, total, flag = ops.multi_tensor_norm([empties[0], x, empties[1], y], norm_type)
    _, total_without, _ = ops.multi_tensor_norm([x, y], norm_type)
    assert bitwise_equal(total, total_without)
    assert float(norms[0]) == 0.0 and float(norms[2]) == 0.0 and float(flag) == 0.0
    norms, total, flag = ops.multi_tensor_norm(empties, norm_type)
    assert norms.tolist() == [0.0, 0.0] and float(total) == 0.0 and float(flag) == 0.0
    assert total.dtype == NORM_OUT_DTYPE[dtype]


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_empty_list(norm_type):
    norms, total, flag = ops.multi_tensor_norm([], norm_type)
    assert norms.shape == (0,) and float(total) == 0.0 and float(flag) == 0.0


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dname)
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
def test_nonfinite_flag(value, dtype, norm_type):
    """One bad element anywhere (SIMD tail, second chunk, 0-d tensor) sets the
    flag, and the norm is what vector_norm gives: inf for an inf, nan for a nan."""
    g = _gen(4)
    shapes = [(17,), (16385,), (), (100,)]
    for which, element in [(0, 16), (1, 16384), (1, 3), (2, 0), (3, 99)]:
        tensors = [make_tensor(shape, "contiguous", g, dtype) for shape in shapes]
        tensors[which].view(-1)[element] = value
        norms, total, flag = ops.multi_tensor_norm(tensors, norm_type)
        assert float(flag) == 1.0, (which, element)
        expected = torch.linalg.vector_norm(tensors[which].double(), norm_type)
        assert (math.isnan(float(norms[which])) == math.isnan(float(expected))
                and math.isnan(float(total)) == math.isnan(float(expected))), (which, element)
        if not math.isnan(float(expected)):
            assert float(total) == math.inf and float(norms[which]) == math.inf
        others = [i for i in range(len(shapes)) if i != which]
        assert all(math.isfinite(float(norms[i])) for i in others)


def test_large_half_values_do_not_overflow_the_norm():
    """float16 gradients near their largest value: squares and sums are taken
    in float32, so the (float32) norm is finite and right."""
    x = torch.full((1000,), 60000.0, dtype=torch.float16)
    norms, total, flag = ops.multi_tensor_norm([x], 2.0)
    assert float(flag) == 0.0
    assert_close(total, torch.tensor(60000.0 * math.sqrt(1000)), NORM[torch.float16], "norm")


def test_float32_overflow_is_flagged():
    """A float32 norm that overflows is not finite, as clip_grad_norm_'s is."""
    x = torch.full((1000,), 1e20)
    _, total, flag = ops.multi_tensor_norm([x], 2.0)
    assert float(total) == math.inf and float(flag) == 1.0
    assert float(torch.linalg.vector_norm(x)) == math.inf


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dname)
def test_norm_is_bit_deterministic(dtype, norm_type):
    """The same inputs give the same bits, run after run and with one thread or
    two (chunks are reduced on their own and summed in a fixed order)."""
    g = _gen(5)
    tensors = [make_tensor((n,), "contiguous", g, dtype) for n in (70001, 16385, 3, 50000)]
    threads = torch.get_num_threads()
    try:
        results = []
        for n_threads in (2, 1, 2):
            torch.set_num_threads(n_threads)
            for _ in range(3):
                results.append(ops.multi_tensor_norm(tensors, norm_type))
    finally:
        torch.set_num_threads(threads)
    for norms, total, flag in results[1:]:
        assert bitwise_equal(norms, results[0][0])
        assert bitwise_equal(total, results[0][1])
        assert bitwise_equal(flag, results[0][2])


# -- the update op's contract ---------------------------------------------------------------
def _clone_args(args):
    return tuple([clone_layout(t) for t in group] for group in args)


def _run_adam(args, kwargs):
    args = _clone_args(args)
    legacy_ops.call("adam", *args, **kwargs)
    return args


def _assert_args_equal(a, b, what: str):
    for name, x, y in zip(("params", "grads", "exp_avgs", "exp_avg_sqs", "maxes", "steps"), a, b):
        for i, (s, t) in enumerate(zip(x, y)):
            assert bitwise_equal(s, t), f"{what}: {name}[{i}] differs"


@pytest.mark.parametrize("dtype", DTYPES, ids=_dname)
def test_adam_found_inf_changes_nothing(dtype):
    args, kwargs = _adam_sample(dtype, amsgrad=True, found_inf=torch.tensor(1.0))
    after = _run_adam(args, kwargs)
    _assert_args_equal(after, args, "found_inf=1")
    kwargs["found_inf"] = torch.tensor(0.0)
    after = _run_adam(args, kwargs)
    assert [float(s) for s in after[5]] == [float(s) + 1 for s in args[5]]
    assert not torch.equal(after[0][0], args[0][0])


@pytest.mark.parametrize("dtype", DTYPES, ids=_dname)
def test_adam_per_tensor_coefficients(dtype):
    """clip_coef with one value per tensor: each tensor as if run alone with its own."""
    args, kwargs = _adam_sample(dtype, amsgrad=True, clip="per-tensor")
    together = _run_adam(args, kwargs)
    for i in range(len(args[0])):
        alone_args = tuple([group[i]] if group else [] for group in args)
        alone = _run_adam(alone_args, dict(kwargs, clip_coef=kwargs["clip_coef"][i].clone()))
        for name, x, y in zip(("param", "grad", "m", "v", "max", "step"), together, alone):
            if y:
                assert bitwise_equal(x[i], y[0]), f"tensor {i} {name}"


@pytest.mark.parametrize("dtype", DTYPES, ids=_dname)
def test_adam_grad_scale(dtype):
    """Gradients scaled by a power of two with grad_scale given are the
    unscaled gradients, bit for bit (the unscale is exact)."""
    args, kwargs = _adam_sample(dtype, amsgrad=False, grad_scale=True)
    scaled = list(args)
    scaled[1] = [g * 4.0 for g in args[1]]
    with_scale = _run_adam(tuple(scaled), kwargs)
    without = _run_adam(args, dict(kwargs, grad_scale=None))
    for i, (a, b) in enumerate(zip(with_scale[0], without[0])):
        assert bitwise_equal(a, b), f"param {i}"


def test_adam_lr_tensor_overrides_lr():
    args, kwargs = _adam_sample(torch.float32, amsgrad=False, lr_tensor=True)
    a = _run_adam(args, kwargs)
    b = _run_adam(args, dict(kwargs, lr=0.02, lr_tensor=None))
    _assert_args_equal(a, b, "lr_tensor")


@pytest.mark.parametrize("layout", ["transposed", "slice"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dname)
def test_adam_layouts(dtype, layout):
    """A parameter whose layout its gradient and state do not share is
    updated in its own storage, to the same values as a contiguous one."""
    args, kwargs = _adam_sample(dtype, amsgrad=True, layout=layout)
    param = args[0][1]
    assert not param.is_contiguous()
    ptr, stride = param.data_ptr(), param.stride()
    contiguous = tuple(list(group) for group in args)
    contiguous[0][1] = param.contiguous()
    expected = _run_adam(contiguous, kwargs)
    legacy_ops.call("adam", *args, **kwargs)
    assert param.data_ptr() == ptr and param.stride() == stride
    _assert_args_equal(args, expected, layout)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dname)
def test_adam_float64_step_counters(dtype):
    """Step counters may be float64 (torch.optim's under a float64 default dtype)."""
    args, kwargs = _adam_sample(dtype, amsgrad=False, step_dtype=torch.float64)
    a = _run_adam(args, kwargs)
    b = _run_adam(tuple(group if i != 5 else [s.float() for s in group] for i, group in enumerate(args)),
                  kwargs)
    for x, y in zip(a[0], b[0]):
        assert bitwise_equal(x, y)
    assert all(s.dtype == torch.float64 for s in a[5])


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
            yield pytest.param(tensors, norm_type, id=f"{_dname(dtype)}-{norm_type}")
    yield pytest.param([make_tensor((0,), "contiguous", g, torch.float32)], 2.0, id="only-empty")


def _exact_unit_norms(t: torch.Tensor, norm_type: float) -> torch.Tensor:
    """timm's unitwise_norm in float64, as one 1-D tensor (0 for empty units)."""
    x = t.double()
    if x.dim() <= 1:
        x = x.reshape(1, -1)
    x = x.flatten(1)
    if x.shape[1] == 0:
        return torch.zeros(x.shape[0], dtype=torch.float64)
    return torch.linalg.vector_norm(x, norm_type, dim=1)


@pytest.mark.parametrize("tensors,norm_type", list(_unit_norm_samples()))
def test_opcheck_multi_tensor_unit_norm(tensors, norm_type):
    torch.library.opcheck(torch.ops.fusedclip.multi_tensor_unit_norm.default, (tensors, norm_type))


@pytest.mark.parametrize("tensors,norm_type", list(_unit_norm_samples()))
def test_unit_norms_are_unitwise_norms(tensors, norm_type):
    """Every unit (index of dim 0; the whole tensor for ndim <= 1) of tensors of
    every layout, units that span CPU chunks (3 x 20000) and chunks that start
    inside a unit (40000 x 3): against the float64 norm; the per-tensor and
    global norms and the flag as multi_tensor_norm gives them."""
    dtype = tensors[0].dtype
    units, norms, total, flag = ops.multi_tensor_unit_norm(tensors, norm_type)
    counts = ops.unit_counts(tensors)
    assert units.shape == (sum(counts),) and units.dtype == NORM_OUT_DTYPE[dtype]
    for i, (u, t) in enumerate(zip(units.split(counts), tensors)):
        assert_close(u, _exact_unit_norms(t, norm_type).to(u.dtype), NORM[dtype],
                     f"units of tensor {i} {tuple(t.shape)}")
    n2, total2, flag2 = ops.multi_tensor_norm(tensors, norm_type)
    assert_close(norms, n2, NORM[dtype], "tensor norms")
    assert_close(total, total2, NORM[dtype], "global norm")
    assert bitwise_equal(flag, flag2)


def test_unit_norm_nonfinite_flag_and_threads():
    x = torch.randn(300, 70)
    x[123, 5] = math.inf
    units, _, total, flag = ops.multi_tensor_unit_norm([torch.randn(7), x], 2.0)
    assert float(flag) == 1.0 and math.isinf(float(total))
    assert math.isinf(float(units[1 + 123])) and bool(torch.isfinite(units[1:1 + 123]).all())
    y = torch.randn(50000, 5)  # multi-threaded: the result does not depend on the threads
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            results.append(ops.multi_tensor_unit_norm([y, torch.randn(3)[:0]], 2.0))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert bitwise_equal(a, b)


def test_unit_norm_of_no_tensors():
    units, norms, total, flag = ops.multi_tensor_unit_norm([], 2.0)
    assert units.shape == (0,) and norms.shape == (0,) and float(total) == 0 and float(flag) == 0


# -- adam_: clip_value and unit_coefs (the shared gradient transform) ------------------------
def _unit_coef_sample(dtype, layout="contiguous", coef_dtype=torch.float32, seed=7):
    args, kwargs = _adam_sample(dtype, amsgrad=True, layout=layout, clip="none", seed=seed)
    g = _gen(seed + 1)
    # add units that span CPU chunks and chunks that start inside a unit
    for shape in [(3, 20000), (9000, 3)]:
        for k, group in enumerate(args):
            if k == 5:
                group.append(torch.tensor(2.0))
            elif k == 3 or k == 4:
                group.append(make_tensor(shape, "contiguous", g, dtype, 0.1).abs())
            else:
                group.append(make_tensor(shape, "contiguous", g, dtype))
    coefs = [torch.rand(ops.unit_counts([p])[0], generator=g, dtype=torch.float64).to(coef_dtype)
             for p in args[0]]
    return args, kwargs, coefs


def _assert_same_update(a, b, what: str):
    """Params, states and steps: the same step (the gradients differ on purpose)."""
    assert_same_step(a[:1] + a[2:], b[:1] + b[2:], what)


def _times_units(grads, coefs):
    """Each gradient times its unit coefficients, in the gradient's dtype."""
    out = []
    for grad, c in zip(grads, coefs):
        c = c.to(grad.dtype)
        out.append(grad * (c.reshape((-1,) + (1,) * (grad.dim() - 1)) if grad.dim() > 1 else c[0]))
    return out


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "slice"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=_dname)
def test_adam_unit_coefs_scale_each_unit(dtype, layout):
    """unit_coefs: the update of gradients pre-multiplied unit by unit, to an
    ulp or two (tolerances.TRANSFORM_PATHS; float32 coefficients: the
    multiplier rounds to the coefficient itself), across chunk boundaries inside
    units and for every layout (row-major stand-ins, updated in the parameter's
    own storage)."""
    args, kwargs, coefs = _unit_coef_sample(dtype, layout)
    param = args[0][1]
    ptr, stride = param.data_ptr(), param.stride()
    expected = _run_adam(tuple(g if k != 1 else _times_units(g, coefs) for k, g in enumerate(args)),
                         kwargs)
    grads_before = [clone_layout(t) for t in args[1]]
    legacy_ops.call("adam", *args, **dict(kwargs, unit_coefs=coefs))
    assert param.data_ptr() == ptr and param.stride() == stride
    _assert_same_update(args, expected, f"unit_coefs {layout}")
    assert all(bitwise_equal(a, b) for a, b in zip(args[1], grads_before)), "grads written"


@pytest.mark.parametrize("dtype", DTYPES, ids=_dname)
def test_adam_unit_coefs_with_clip_coef_and_scale(dtype):
    """unit_coefs, a per-tensor clip_coef and grad_scale multiply: against the
    reference Adam step on the so-scaled float64 gradients."""
    from fusedclip import reference as ref
    from tolerances import REFERENCE
    args, kwargs, coefs = _unit_coef_sample(dtype, coef_dtype=torch.float64)
    n = len(args[0])
    clip = torch.linspace(0.3, 1.0, n, dtype=torch.float64)
    kwargs = dict(kwargs, clip_coef=clip, grad_scale=torch.tensor(8.0), unit_coefs=coefs)
    before = _clone_args(args)
    legacy_ops.call("adam", *args, **kwargs)
    for i in range(n):
        p = before[0][i].double()
        state = {"step": float(before[5][i]), "exp_avg": before[2][i].double(),
                 "exp_avg_sq": before[3][i].double(), "max_exp_avg_sq": before[4][i].double()}
        grad = _times_units([before[1][i].double()], [coefs[i]])[0] * clip[i] / 8.0
        ref.adam_step(p, grad, state, lr=0.01, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.05,
                      amsgrad=True, maximize=False, decoupled_weight_decay=True)
        assert_close(args[0][i], p.to(dtype), REFERENCE[dtype], f"param {i}")
        assert_close(args[2][i], state["exp_avg"].to(dtype), REFERENCE[dtype], f"exp_avg {i}")


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dname)
def test_adam_clip_value_clamps_each_element(dtype, maximize):
    """clip_value: the update of pre-clamped gradients, to an ulp or two
    (tolerances.TRANSFORM_PATHS; the clamp is exact and commutes with the sign
    of maximize); with grad_scale the
    unscaled gradient is clamped. 0.375 is exact in every dtype (the kernel
    clamps in the math type, float32 for half and bfloat16)."""
    args, kwargs, _ = _unit_coef_sample(dtype)
    kwargs = dict(kwargs, maximize=maximize)
    clamped = [g.clamp(-0.375, 0.375) for g in args[1]]
    expected = _run_adam(tuple(g if k != 1 else clamped for k, g in enumerate(args)), kwargs)
    got = _run_adam(args, dict(kwargs, clip_value=0.375))
    _assert_same_update(got, expected, "clip_value")
    scaled = tuple(g if k != 1 else [x * 16 for x in g] for k, g in enumerate(args))
    got = _run_adam(scaled, dict(kwargs, clip_value=0.375, grad_scale=torch.tensor(16.0)))
    assert_same_step(got[:1], expected[:1], "clip_value with grad_scale")


def test_adam_clip_value_propagates_nan_and_clamps_inf():
    """Like torch.clamp: inf becomes +-clip_value, NaN stays NaN."""
    args, kwargs, _ = _unit_coef_sample(torch.float32)
    grad = args[1][0]
    grad[0], grad[1], grad[2] = math.inf, -math.inf, math.nan
    clamped = [g.clamp(-0.375, 0.375) for g in args[1]]
    assert math.isnan(float(clamped[0][2]))
    expected = _run_adam(tuple(g if k != 1 else clamped for k, g in enumerate(args)), kwargs)
    got = _run_adam(args, dict(kwargs, clip_value=0.375))
    _assert_same_update(got, expected, "non-finite")
    assert math.isnan(float(got[0][0][2])) and math.isfinite(float(got[0][0][0]))


def _unit_coef_opcheck_samples():
    for dtype in DTYPES:
        args, kwargs, coefs = _unit_coef_sample(dtype, layout="transposed")
        yield pytest.param(args, dict(kwargs, unit_coefs=coefs, clip_value=0.5),
                           id=f"{_dname(dtype)}-units-value")
    args, kwargs, coefs = _unit_coef_sample(torch.float32, coef_dtype=torch.float64)
    yield pytest.param(args, dict(kwargs, unit_coefs=coefs), id="float64-coefs")


@pytest.mark.parametrize("args,kwargs", list(_unit_coef_opcheck_samples()))
def test_opcheck_adam_grad_transform(args, kwargs):
    legacy_ops.opcheck("adam", args, kwargs)


@pytest.mark.parametrize("change,match", [
    (lambda c: c[:-1], "unit_coefs has"),
    (lambda c: c[:1] + [torch.ones(5)] + c[2:], "one element per index of dim 0"),
    (lambda c: [c[0].to(torch.int64)] + c[1:], "float32 or float64"),
    (lambda c: [c[0].double()] + c[1:], "one dtype"),
    (lambda c: [c[0].reshape(1, -1)] + c[1:], "0-d or 1-d"),
], ids=["count", "numel", "dtype", "mixed", "dim"])
def test_adam_bad_unit_coefs(change, match):
    args, kwargs, coefs = _unit_coef_sample(torch.float32)
    before = _clone_args(args)
    with pytest.raises(RuntimeError, match=match):
        legacy_ops.call("adam", *args, **dict(kwargs, unit_coefs=change(coefs)))
    _assert_args_equal(args, before, "refused call")


def test_adam_bad_clip_value():
    args, kwargs, _ = _unit_coef_sample(torch.float32)
    with pytest.raises(RuntimeError, match="clip_value must be >= 0"):
        legacy_ops.call("adam", *args, **dict(kwargs, clip_value=-1.0))
    with pytest.raises(RuntimeError, match="clip_value must be >= 0"):
        legacy_ops.call("adam", *args, **dict(kwargs, clip_value=math.nan))

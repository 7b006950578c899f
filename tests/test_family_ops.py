"""The sgd_ and adagrad_ operators: torch.library.opcheck, their contract
(skip flag, the momentum buffer's first step, per-tensor coefficients,
grad_scale, tensor lr, layouts, counter dtypes), their own argument checks,
and the public surface of FusedClipSGD / FusedClipAdagrad."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

import fusedclip
from fusedclip import ops

import legacy_ops
from conftest import assert_same_step, bitwise_equal, make_tensor

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SHAPES = [((7,), "contiguous"), ((4, 6), "contiguous"), ((), "contiguous"), ((0,), "contiguous"),
          ((3, 33), "contiguous")]


def _dname(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _coef(clip, n):
    return {"none": None, "one": torch.tensor(0.7),
            "per-tensor": torch.linspace(0.2, 1.0, n)}[clip]


def sgd_sample(dtype, *, momentum=0.9, nesterov=False, dampening=0.0, layout="contiguous",
               started=True, lr_tensor=False, clip="one", grad_scale=False, found_inf=None,
               counter_dtype=torch.float32, weight_decay=0.05, seed=0):
    g = _gen(seed)
    shapes = list(SHAPES)
    shapes[1] = ((4, 6), layout)
    params = [make_tensor(s, lay, g, dtype) for s, lay in shapes]
    grads = [make_tensor(s, "contiguous", g, dtype) for s, _ in shapes]
    if momentum:
        bufs = [make_tensor(s, "contiguous", g, dtype, 0.1) for s, _ in shapes]
        # mixed: some buffers started, some not
        counts = [float(i) if started else 0.0 for i in range(len(shapes))]
        counters = [torch.tensor(c, dtype=counter_dtype) for c in counts]
    else:
        bufs, counters = [], []
    kwargs = dict(
        lr=0.01, lr_tensor=torch.tensor([0.02]) if lr_tensor else None, momentum=momentum,
        dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, maximize=False,
        clip_coef=_coef(clip, len(shapes)),
        grad_scale=torch.tensor(4.0) if grad_scale else None, found_inf=found_inf,
    )
    return (params, grads, bufs, counters), kwargs


def adagrad_sample(dtype, *, layout="contiguous", lr_tensor=False, clip="one", grad_scale=False,
                   found_inf=None, step_dtype=torch.float32, weight_decay=0.05, seed=0):
    g = _gen(seed)
    shapes = list(SHAPES)
    shapes[1] = ((4, 6), layout)
    params = [make_tensor(s, lay, g, dtype) for s, lay in shapes]
    grads = [make_tensor(s, "contiguous", g, dtype) for s, _ in shapes]
    sums = [make_tensor(s, "contiguous", g, dtype, 0.1).abs() for s, _ in shapes]
    steps = [torch.tensor(float(i), dtype=step_dtype) for i in range(len(shapes))]
    kwargs = dict(
        lr=0.01, lr_tensor=torch.tensor([0.02]) if lr_tensor else None, lr_decay=0.1,
        weight_decay=weight_decay, eps=1e-10, maximize=True, clip_coef=_coef(clip, len(shapes)),
        grad_scale=torch.tensor(4.0) if grad_scale else None, found_inf=found_inf,
    )
    return (params, grads, sums, steps), kwargs


OPS = {"sgd": ("sgd", sgd_sample),
       "adagrad": ("adagrad", adagrad_sample)}


def _samples():
    # Every dtype once per op, the options alternating (opcheck is slow).
    for k, dtype in enumerate(DTYPES):
        d = _dname(dtype)
        if k % 2 == 0:
            yield pytest.param("sgd", dtype, dict(lr_tensor=True, started=False),
                               id=f"sgd-{d}-first-lrT")
            yield pytest.param("adagrad", dtype, dict(layout="transposed", clip="per-tensor",
                                                      grad_scale=True), id=f"adagrad-{d}-T-percoef-scale")
        else:
            yield pytest.param("sgd", dtype, dict(nesterov=True, layout="transposed",
                                                  clip="per-tensor", grad_scale=True),
                               id=f"sgd-{d}-nest-T-percoef-scale")
            yield pytest.param("adagrad", dtype, dict(lr_tensor=True), id=f"adagrad-{d}-lrT")
    yield pytest.param("sgd", torch.float32, dict(momentum=0.0, clip="none"), id="sgd-plain")
    yield pytest.param("sgd", torch.float32, dict(dampening=0.3, layout="slice",
                                                  found_inf=torch.tensor(0.0)), id="sgd-slice-found0")
    yield pytest.param("sgd", torch.float32, dict(found_inf=torch.tensor(1.0), started=False),
                       id="sgd-found1")
    yield pytest.param("sgd", torch.float64, dict(counter_dtype=torch.float64), id="sgd-f64-counters")
    yield pytest.param("adagrad", torch.float32, dict(layout="slice", clip="none",
                                                      found_inf=torch.tensor(1.0)), id="adagrad-found1")
    yield pytest.param("adagrad", torch.float64, dict(step_dtype=torch.float64), id="adagrad-f64-steps")


@pytest.mark.parametrize("op,dtype,options", list(_samples()))
def test_opcheck(op, dtype, options):
    fn, sample = OPS[op]
    args, kwargs = sample(dtype, **options)
    legacy_ops.opcheck(fn, args, kwargs)


# -- the ops' contract ----------------------------------------------------------------------
def _clone(args):
    return tuple([t.clone() if t.is_contiguous() else t.clone().t().contiguous().t()
                  if t.dim() == 2 else t.clone() for t in group] for group in args)


def _run(op, args, kwargs):
    args = _clone(args)
    legacy_ops.call(op, *args, **kwargs)
    return args


def _assert_equal(a, b, what):
    for k, (x, y) in enumerate(zip(a, b)):
        for i, (s, t) in enumerate(zip(x, y)):
            assert bitwise_equal(s, t), f"{what}: list {k} [{i}] differs"


@pytest.mark.parametrize("op", ["sgd", "adagrad"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dname)
def test_found_inf_changes_nothing(op, dtype):
    fn, sample = OPS[op]
    args, kwargs = sample(dtype, found_inf=torch.tensor(1.0))
    _assert_equal(_run(op, args, kwargs), args, "found_inf=1")
    after = _run(op, args, dict(kwargs, found_inf=torch.tensor(0.0)))
    assert [float(s) for s in after[3]] == [float(s) + 1 for s in args[3]]
    assert not torch.equal(after[0][0], args[0][0])


@pytest.mark.parametrize("dtype", DTYPES, ids=_dname)
@pytest.mark.parametrize("nesterov", [False, True])
def test_first_buffer_step_after_skips(dtype, nesterov):
    """A counter at 0 makes the step the buffer's first, buf = g exactly
    (clip_coef None, no decay: g unchanged), whatever the buffer holds and
    whatever the dampening; skipped calls keep it at 0. A started buffer
    blends: momentum * buf + (1 - dampening) g."""
    damp = 0.0 if nesterov else 0.5
    args, kwargs = sgd_sample(dtype, started=False, clip="none", weight_decay=0.0,
                              nesterov=nesterov, dampening=damp)
    for _ in range(2):
        args = _run("sgd", args, dict(kwargs, found_inf=torch.tensor(1.0)))
        assert all(float(c) == 0 for c in args[3])
    after = _run("sgd", args, kwargs)
    for i, (buf, g) in enumerate(zip(after[2], args[1])):
        assert bitwise_equal(buf, g), f"buffer {i} is not the gradient"
        assert float(after[3][i]) == 1
    again = _run("sgd", after, kwargs)
    for i, (buf, old, g) in enumerate(zip(again[2], after[2], args[1])):
        expected = (0.9 * old.double() + (1 - damp) * g.double()).to(dtype)
        assert torch.allclose(buf.double(), expected.double(), rtol=2 ** -7, atol=1e-6), i


@pytest.mark.parametrize("op", ["sgd", "adagrad"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dname)
def test_per_tensor_coefficients(op, dtype):
    fn, sample = OPS[op]
    args, kwargs = sample(dtype, clip="per-tensor")
    together = _run(op, args, kwargs)
    for i in range(len(args[0])):
        alone_args = tuple([group[i]] for group in args)
        alone = _run(op, alone_args, dict(kwargs, clip_coef=kwargs["clip_coef"][i].clone()))
        for k, (x, y) in enumerate(zip(together, alone)):
            assert bitwise_equal(x[i], y[0]), f"tensor {i} list {k}"


@pytest.mark.parametrize("op", ["sgd", "adagrad"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dname)
def test_grad_scale_and_lr_tensor(op, dtype):
    fn, sample = OPS[op]
    args, kwargs = sample(dtype, grad_scale=True, lr_tensor=True)
    scaled = list(args)
    scaled[1] = [g * 4.0 for g in args[1]]
    a = _run(op, tuple(scaled), kwargs)
    # the unscale by a power of two is exact; lr_tensor's float32 value is used
    b = _run(op, args, dict(kwargs, grad_scale=None, lr=float(kwargs["lr_tensor"]),
                            lr_tensor=None))
    for k in (0, 2, 3):  # everything but the gradients
        _assert_equal(a[k:k + 1], b[k:k + 1], f"grad_scale / lr_tensor, list {k}")


@pytest.mark.parametrize("op", ["sgd", "adagrad"])
@pytest.mark.parametrize("layout", ["transposed", "slice"])
def test_layouts(op, layout):
    fn, sample = OPS[op]
    args, kwargs = sample(torch.float32, layout=layout)
    param = args[0][1]
    assert not param.is_contiguous()
    ptr, stride = param.data_ptr(), param.stride()
    contiguous = tuple(list(group) for group in _clone(args))
    contiguous[0][1] = param.contiguous()
    expected = _run(op, contiguous, kwargs)
    legacy_ops.call(op, *args, **kwargs)
    assert param.data_ptr() == ptr and param.stride() == stride
    _assert_equal(args, expected, layout)


@pytest.mark.parametrize("op", ["sgd", "adagrad"])
def test_float64_and_mixed_counters(op):
    fn, sample = OPS[op]
    args, kwargs = sample(torch.float32)
    a = _run(op, args, kwargs)
    mixed = list(_clone(args))
    mixed[3] = [c.double() if i % 2 else c for i, c in enumerate(mixed[3])]
    b = _run(op, tuple(mixed), kwargs)
    _assert_equal(a[:3], b[:3], "counter dtypes")
    assert [float(x) for x in a[3]] == [float(x) for x in b[3]]
    assert [c.dtype for c in b[3]] == [c.dtype for c in mixed[3]]


# -- clip_value and unit_coefs (the shared gradient transform) -----------------------------
def _transform_sample(op, dtype, layout="transposed", coef_dtype=torch.float32, seed=7,
                      **options):
    """A sample without a clip coefficient, with units that span CPU chunks and
    chunks that start inside a unit, and one coefficient per unit."""
    fn, sample = OPS[op]
    args, kwargs = sample(dtype, layout=layout, clip="none", seed=seed, **options)
    args = tuple(list(group) for group in args)
    g = _gen(seed + 1)
    for shape in [(3, 20000), (9000, 3)]:
        args[0].append(make_tensor(shape, "contiguous", g, dtype))
        args[1].append(make_tensor(shape, "contiguous", g, dtype))
        if args[2]:  # not for SGD without momentum
            args[2].append(make_tensor(shape, "contiguous", g, dtype, 0.1).abs())
            args[3].append(torch.tensor(2.0, dtype=args[3][0].dtype))
    coefs = [torch.rand(ops.unit_counts([p])[0], generator=g, dtype=torch.float64).to(coef_dtype)
             for p in args[0]]
    return args, kwargs, coefs


def _times_units(grads, coefs):
    """Each gradient times its unit coefficients, in the gradient's dtype."""
    out = []
    for grad, c in zip(grads, coefs):
        c = c.to(grad.dtype)
        out.append(grad * (c.reshape((-1,) + (1,) * (grad.dim() - 1)) if grad.dim() > 1 else c[0]))
    return out


def _with_grads(args, grads):
    return (args[0], grads) + tuple(args[2:])


TRANSFORM_SAMPLES = [
    pytest.param("sgd", dict(), id="sgd-momentum"),
    pytest.param("sgd", dict(nesterov=True, started=False), id="sgd-nesterov-first"),
    pytest.param("adagrad", dict(), id="adagrad"),
]


@pytest.mark.parametrize("op,options", TRANSFORM_SAMPLES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=_dname)
def test_unit_coefs_scale_each_unit(op, options, dtype):
    """unit_coefs: the update of gradients pre-multiplied unit by unit, to an
    ulp or two (tolerances.TRANSFORM_PATHS; float32 coefficients and no
    clip_coef: the multiplier is the coefficient itself), across chunk
    boundaries inside units, for a transposed parameter updated in its own
    storage."""
    args, kwargs, coefs = _transform_sample(op, dtype, **options)
    param = args[0][1]
    ptr, stride = param.data_ptr(), param.stride()
    expected = _run(op, _with_grads(args, _times_units(args[1], coefs)), kwargs)
    got = _run(op, args, dict(kwargs, unit_coefs=coefs))
    assert_same_step(got[:1] + got[2:], expected[:1] + expected[2:], f"{op} unit_coefs")
    assert not _run(op, args, kwargs)[0][0].equal(got[0][0])  # the coefficients matter
    grads_before = _clone(args)[1]
    legacy_ops.call(op, *args, **dict(kwargs, unit_coefs=coefs))
    assert param.data_ptr() == ptr and param.stride() == stride
    _assert_equal((args[1],), (grads_before,), "grads written")
    _assert_equal(args[:1], got[:1], "in place")


@pytest.mark.parametrize("op,options", TRANSFORM_SAMPLES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dname)
def test_clip_value_clamps_each_element(op, options, dtype):
    """clip_value: the update of pre-clamped gradients, to an ulp or two
    (tolerances.TRANSFORM_PATHS; adagrad_'s sample maximizes: the clamp
    commutes with the sign); with grad_scale the unscaled gradient is clamped.
    0.375 is exact in every dtype."""
    args, kwargs, _ = _transform_sample(op, dtype, **options)
    clamped = [g.clamp(-0.375, 0.375) for g in args[1]]
    expected = _run(op, _with_grads(args, clamped), kwargs)
    got = _run(op, args, dict(kwargs, clip_value=0.375))
    assert_same_step(got[:1] + got[2:], expected[:1] + expected[2:], f"{op} clip_value")
    assert not _run(op, args, kwargs)[0][0].equal(got[0][0])  # the clamp matters
    scaled = _with_grads(args, [g * 16 for g in args[1]])
    got = _run(op, scaled, dict(kwargs, clip_value=0.375, grad_scale=torch.tensor(16.0)))
    assert_same_step(got[:1], expected[:1], f"{op} clip_value with grad_scale")


@pytest.mark.parametrize("op", ["sgd", "adagrad"])
def test_clip_value_propagates_nan_and_clamps_inf(op):
    args, kwargs, _ = _transform_sample(op, torch.float32, layout="contiguous")
    grad = args[1][0]
    grad[0], grad[1], grad[2] = math.inf, -math.inf, math.nan
    expected = _run(op, _with_grads(args, [g.clamp(-0.375, 0.375) for g in args[1]]), kwargs)
    got = _run(op, args, dict(kwargs, clip_value=0.375))
    assert_same_step(got[:1] + got[2:], expected[:1] + expected[2:], f"{op} non-finite")
    assert math.isnan(float(got[0][0][2])) and math.isfinite(float(got[0][0][0]))


@pytest.mark.parametrize("op", ["sgd", "adagrad"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dname)
def test_unit_coefs_with_clip_coef_and_scale(op, dtype):
    """unit_coefs (float64), a per-tensor clip_coef and grad_scale multiply:
    against the float64 reference step on the so-scaled gradients."""
    from fusedclip import reference as ref
    from tolerances import REFERENCE
    from conftest import assert_close
    args, kwargs, coefs = _transform_sample(op, dtype, coef_dtype=torch.float64)
    n = len(args[0])
    clip = torch.linspace(0.3, 1.0, n, dtype=torch.float64)
    kwargs = dict(kwargs, clip_coef=clip, grad_scale=torch.tensor(8.0), unit_coefs=coefs)
    before = _clone(args)
    legacy_ops.call(op, *args, **kwargs)
    for i in range(n):
        p = before[0][i].double()
        grad = _times_units([before[1][i].double()], [coefs[i]])[0] * clip[i] / 8.0
        if op == "sgd":
            state = {"momentum_buffer": before[2][i].double() if float(before[3][i]) else None}
            ref.sgd_step(p, grad, state, lr=kwargs["lr"], momentum=kwargs["momentum"],
                         dampening=kwargs["dampening"], weight_decay=kwargs["weight_decay"],
                         nesterov=kwargs["nesterov"], maximize=kwargs["maximize"])
            key, expected = "momentum_buffer", state["momentum_buffer"]
        else:
            state = {"step": float(before[3][i]), "sum": before[2][i].double()}
            ref.adagrad_step(p, grad, state, lr=kwargs["lr"], lr_decay=kwargs["lr_decay"],
                             weight_decay=kwargs["weight_decay"], eps=kwargs["eps"],
                             maximize=kwargs["maximize"])
            key, expected = "sum", state["sum"]
        assert_close(args[0][i], p.to(dtype), REFERENCE[dtype], f"{op} param {i}")
        assert_close(args[2][i], expected.to(dtype), REFERENCE[dtype], f"{op} {key} {i}")


def _transform_opcheck_samples():
    for k, dtype in enumerate(DTYPES):
        for op, options in [("sgd", dict(nesterov=bool(k % 2), started=bool(k % 2))),
                            ("adagrad", dict())]:
            args, kwargs, coefs = _transform_sample(op, dtype, seed=k, **options)
            yield pytest.param(OPS[op][0], args, dict(kwargs, unit_coefs=coefs, clip_value=0.5),
                               id=f"{op}-{_dname(dtype)}-units-value")
    args, kwargs, coefs = _transform_sample("sgd", torch.float32, coef_dtype=torch.float64,
                                            momentum=0.0)
    yield pytest.param(OPS["sgd"][0], args, dict(kwargs, unit_coefs=coefs), id="sgd-plain-f64coefs")
    args, kwargs, _ = _transform_sample("adagrad", torch.float32, layout="slice")
    yield pytest.param(OPS["adagrad"][0], args, dict(kwargs, clip_value=0.25,
                                                     found_inf=torch.tensor(1.0)),
                       id="adagrad-value-found1")


@pytest.mark.parametrize("fn,args,kwargs", list(_transform_opcheck_samples()))
def test_opcheck_grad_transform(fn, args, kwargs):
    legacy_ops.opcheck(fn, args, kwargs)


@pytest.mark.parametrize("op", ["sgd", "adagrad"])
@pytest.mark.parametrize("change,match", [
    (dict(unit_coefs=lambda c: c[:-1]), "unit_coefs has"),
    (dict(unit_coefs=lambda c: c[:1] + [torch.ones(5)] + c[2:]), "one element per index of dim 0"),
    (dict(unit_coefs=lambda c: [c[0].double()] + c[1:]), "one dtype"),
    (dict(clip_value=lambda c: -1.0), "clip_value must be >= 0"),
    (dict(clip_value=lambda c: math.nan), "clip_value must be >= 0"),
], ids=["count", "numel", "mixed", "negative", "nan"])
def test_bad_transform_args(op, change, match):
    """The shared check_grad_transform_args refuses before anything changes."""
    args, kwargs, coefs = _transform_sample(op, torch.float32)
    kwargs = dict(kwargs, **{k: f(coefs) for k, f in change.items()})
    before = _clone(args)
    with pytest.raises(RuntimeError, match=match):
        legacy_ops.call(op, *args, **kwargs)
    _assert_equal(args, before, "refused call")


# -- the ops' own checks --------------------------------------------------------------------
def _sgd_breakers():
    def kw(**changes):
        return lambda args, kwargs: kwargs.update(changes)

    def drop(k):
        return lambda args, kwargs: args[k].pop()

    return [
        pytest.param(kw(lr=-1.0), "invalid learning rate -1", id="lr"),
        pytest.param(kw(momentum=-0.5), r"invalid momentum -0.5 \(must be >= 0\)", id="momentum"),
        pytest.param(kw(weight_decay=-1.0), "invalid weight_decay -1", id="wd"),
        pytest.param(kw(dampening=float("nan")), "invalid dampening nan", id="dampening"),
        pytest.param(kw(nesterov=True, dampening=0.1),
                     "nesterov momentum requires momentum > 0 and zero dampening", id="nesterov"),
        pytest.param(kw(momentum=0.0), "without momentum, momentum_buffers and buffer_steps must be empty",
                     id="buffers-without-momentum"),
        pytest.param(drop(2), r"momentum_buffers has 4 tensors but params has 5", id="buffers-count"),
        pytest.param(drop(3), r"buffer_steps has 4 tensors but params has 5", id="counters-count"),
        pytest.param(kw(lr_tensor=torch.tensor(-1.0)), "invalid learning rate -1 in lr_tensor", id="lr-tensor"),
        pytest.param(kw(clip_coef=torch.ones(2)), r"clip_coef must have 1 or one per tensor \(5\)",
                     id="clip-coef"),
    ]


@pytest.mark.parametrize("breaker,match", _sgd_breakers())
def test_sgd_op_errors(breaker, match):
    args, kwargs = sgd_sample(torch.float32)
    args = tuple(list(group) for group in args)
    breaker(args, kwargs)
    before = _clone(args)
    with pytest.raises(RuntimeError, match=match):
        legacy_ops.call("sgd", *args, **kwargs)
    _assert_equal(args, before, "failed call")


@pytest.mark.parametrize("changes,match", [
    (dict(lr_decay=-1.0), "invalid lr_decay -1"),
    (dict(eps=-1.0), "invalid eps -1"),
    (dict(weight_decay=-1.0), "invalid weight_decay -1"),
    (dict(lr=-1.0), "invalid learning rate -1"),
    (dict(grad_scale=torch.ones(3)), "grad_scale must have 1 elements, got 3"),
])
def test_adagrad_op_errors(changes, match):
    args, kwargs = adagrad_sample(torch.float32)
    before = _clone(args)
    with pytest.raises(RuntimeError, match=match):
        legacy_ops.call("adagrad", *args, **dict(kwargs, **changes))
    _assert_equal(args, before, "failed call")


def test_adagrad_op_shape_and_count_errors():
    args, kwargs = adagrad_sample(torch.float32)
    sums = list(args[2])
    sums[1] = torch.zeros(6, 4)
    with pytest.raises(RuntimeError, match=r"state_sums\[1\] has shape \[6, 4\]"):
        legacy_ops.call("adagrad", args[0], args[1], sums, args[3], **kwargs)
    with pytest.raises(RuntimeError, match="steps has 4 tensors but params has 5"):
        legacy_ops.call("adagrad", args[0], args[1], args[2], args[3][:4], **kwargs)
    with pytest.raises(RuntimeError, match=r"grads\[0\] is complex"):
        legacy_ops.call("adagrad", args[0], [torch.zeros(7, dtype=torch.complex64)] + args[1][1:],
                        args[2], args[3], **kwargs)


# -- the public surface ---------------------------------------------------------------------
PAIRS = [(fusedclip.FusedClipSGD, torch.optim.SGD), (fusedclip.FusedClipAdagrad, torch.optim.Adagrad)]
TORCH_ONLY: set = set()  # every argument of torch's is ours too (issue 10)


@pytest.mark.parametrize("ours,theirs", PAIRS, ids=["SGD", "Adagrad"])
def test_signature_matches_torch(ours, theirs):
    """Every argument of torch's but its implementation switches (foreach,
    differentiable, fused) is ours too, with torch's default and kind, the
    positional ones in torch's order; clip and nonfinite are keyword-only."""
    mine = inspect.signature(ours.__init__).parameters
    torchs = {k: v for k, v in inspect.signature(theirs.__init__).parameters.items()
              if k not in TORCH_ONLY}
    assert [n for n in mine if n not in ("clip", "nonfinite", "norm_group")] == list(torchs)
    for name, p in torchs.items():
        assert mine[name].default == p.default, name
        assert mine[name].kind == p.kind, name
    for name in ("clip", "nonfinite", "norm_group"):
        assert mine[name].kind is inspect.Parameter.KEYWORD_ONLY
    assert mine["clip"].default is None and mine["nonfinite"].default == "skip"
    p = torch.nn.Parameter(torch.zeros(2))
    torch_defaults = {k: v for k, v in theirs([p]).defaults.items() if k not in TORCH_ONLY}
    assert ours([p]).defaults == torch_defaults


def test_public_names():
    for name in ("FusedClipSGD", "FusedClipAdagrad"):
        assert name in fusedclip.__all__ and name in fusedclip.optim.__all__
        cls = getattr(fusedclip, name)
        assert issubclass(cls, torch.optim.Optimizer)
        doc = cls.__doc__
        assert "clip (None, float or ClipPolicy, optional)" in doc and "References:" in doc
    assert "Duchi, Hazan & Singer" in fusedclip.FusedClipAdagrad.__doc__
    assert "Sutskever" in fusedclip.FusedClipSGD.__doc__ and "Polyak" in fusedclip.FusedClipSGD.__doc__


# -- torch.compile ------------------------------------------------------------------------------
COMPILE_KINDS = {
    # momentum with dampening, and a poisoned first step: the compiled steps
    # include the buffers' first one, after the skip
    "SGD": (fusedclip.FusedClipSGD, dict(momentum=0.9, dampening=0.5, weight_decay=0.1), 0),
    "Adagrad": (fusedclip.FusedClipAdagrad, dict(lr_decay=0.1, weight_decay=0.1), 2),
}


def run_compiled_vs_eager(kind: str, device, dtype=torch.float32, steps: int = 4):
    """torch.compile(opt.step, fullgraph=True) against eager steps on the same
    gradients; both take the first step eagerly, and the graph compiled at the
    second must serve every later one. Returns both (params, opt) pairs."""
    from test_compile import make_params, set_step_grads

    cls, kwargs, poison_step = COMPILE_KINDS[kind]
    runs = []
    for _ in range(2):
        params = make_params(device, dtype)
        runs.append((params, cls(params, lr=torch.tensor(0.01, device=device), clip=1.0,
                                 **kwargs)))
    (eager_p, eager), (comp_p, comp) = runs
    torch._dynamo.reset()
    compiled = torch.compile(comp.step, fullgraph=True)
    try:
        for step in range(steps):
            set_step_grads(eager_p, step, step == poison_step)
            set_step_grads(comp_p, step, step == poison_step)
            eager.step()
            if step == 0:
                comp.step()
            elif step == 1:
                compiled()
            else:
                with torch.compiler.set_stance("fail_on_recompile"):
                    compiled()
    finally:
        torch._dynamo.reset()
    return runs


@pytest.mark.parametrize("kind", ["SGD", "Adagrad"])
def test_compiled_step_matches_eager(kind):
    from family import assert_states_close
    from tolerances import TORCH_PARITY

    (eager_p, eager), (comp_p, comp) = run_compiled_vs_eager(kind, "cpu")
    assert_states_close(kind, comp, eager, comp_p, eager_p, TORCH_PARITY[torch.float32],
                        "compiled")
    assert int(comp.clip_stats["skipped"]) == 1

"""Bad inputs fail with errors that name the problem, and a failed step leaves
parameters and state as they were."""

from __future__ import annotations

import math

import pytest
import torch

import fusedclip

import legacy_ops
from conftest import assert_unchanged, snapshot

OPTIMIZERS = [fusedclip.FusedClipAdam, fusedclip.FusedClipAdamW]


def _params(n=2, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(4, 3, generator=g, dtype=dtype)) for _ in range(n)]


def _trained(cls, n_groups=2, **kwargs):
    """An optimizer with two groups that has taken two good steps."""
    params = _params(2 * n_groups)
    groups = [{"params": params[2 * i:2 * i + 2]} for i in range(n_groups)]
    opt = cls(groups, **kwargs)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    return opt, params


# -- constructor arguments ---------------------------------------------------------------
@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("kwargs,error,match", [
    (dict(lr=-0.1), ValueError, r"Invalid learning rate: -0\.1"),
    (dict(lr=math.nan), ValueError, "Invalid learning rate"),
    (dict(lr="0.1"), ValueError, "Invalid learning rate"),
    (dict(lr=torch.tensor(-0.1)), ValueError, "Invalid learning rate"),
    (dict(lr=torch.tensor([0.1, 0.2])), ValueError, "Tensor lr must be 1-element"),
    (dict(lr=torch.tensor(1)), ValueError, "Tensor lr must be a real floating tensor"),
    (dict(eps=-1e-8), ValueError, "Invalid epsilon value: -1e-08"),
    (dict(eps=math.nan), ValueError, "Invalid epsilon value"),
    (dict(weight_decay=-0.01), ValueError, "Invalid weight_decay value: -0.01"),
    (dict(betas=(1.0, 0.999)), ValueError, "Invalid beta parameter at index 0: 1.0"),
    (dict(betas=(-0.1, 0.999)), ValueError, "Invalid beta parameter at index 0"),
    (dict(betas=(0.9, 1.0)), ValueError, "Invalid beta parameter at index 1: 1.0"),
    (dict(betas=(0.9, 1.5)), ValueError, "Invalid beta parameter at index 1"),
    (dict(betas=(0.9, math.nan)), ValueError, "Invalid beta parameter at index 1"),
    (dict(betas=(0.9,)), ValueError, "betas must be a pair"),
    # torch's own message for a float and a Tensor; fusedclip refuses Tensor betas.
    (dict(betas=(torch.tensor(0.9), 0.999)), ValueError, r"betas must be either both floats or both Tensors"),
    (dict(betas=(torch.tensor(0.9), torch.tensor(0.999))), ValueError, r"betas\[0\] is a Tensor"),
    (dict(clip="1.0"), TypeError, "clip must be None, a float max_norm"),
    (dict(clip=True), TypeError, "clip must be None, a float max_norm"),
    (dict(clip=[1.0]), TypeError, "clip must be None, a float max_norm"),
    (dict(clip=torch.tensor(1.0)), TypeError, "clip must be None, a float max_norm"),
    (dict(clip=-1.0), ValueError, "max_norm must be >= 0, got -1.0"),
    (dict(clip=math.nan), ValueError, "max_norm must not be NaN"),
    (dict(nonfinite="ignore"), ValueError, r"nonfinite must be one of \('skip', 'raise', 'propagate'\)"),
    (dict(nonfinite=None), ValueError, "nonfinite must be one of"),
    (dict(nonfinite="SKIP"), ValueError, "nonfinite must be one of"),
])
def test_bad_constructor_arguments(cls, kwargs, error, match):
    with pytest.raises(error, match=match):
        cls(_params(), **kwargs)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(max_norm=-0.5), ValueError, "GlobalNorm: max_norm must be >= 0, got -0.5"),
    (dict(max_norm=math.nan), ValueError, "GlobalNorm: max_norm must not be NaN"),
    (dict(max_norm="1"), TypeError, "GlobalNorm: max_norm must be a real number"),
    (dict(max_norm=None), TypeError, "GlobalNorm: max_norm must be a real number"),
    (dict(max_norm=1.0, norm_type=1.0), ValueError, "GlobalNorm: norm_type must be 2.0 or inf, got 1.0"),
    (dict(max_norm=1.0, norm_type=3), ValueError, "norm_type must be 2.0 or inf, got 3"),
    (dict(max_norm=1.0, norm_type=0), ValueError, "norm_type must be 2.0 or inf"),
    (dict(max_norm=1.0, norm_type=-math.inf), ValueError, "norm_type must be 2.0 or inf"),
    (dict(max_norm=1.0, norm_type=math.nan), ValueError, "norm_type must not be NaN"),
    (dict(max_norm=1.0, norm_type="fro"), TypeError, "GlobalNorm: norm_type must be a real number"),
])
def test_bad_global_norm(kwargs, error, match):
    with pytest.raises(error, match=match):
        fusedclip.GlobalNorm(**kwargs)


def test_good_global_norm_arguments():
    assert fusedclip.GlobalNorm(0).max_norm == 0.0
    assert fusedclip.GlobalNorm(1, norm_type=2).norm_type == 2.0
    assert fusedclip.GlobalNorm(1.0, norm_type="inf").norm_type == math.inf
    assert fusedclip.GlobalNorm(1.0, norm_type=float("inf")).norm_type == math.inf


def test_hyperparameters_per_group_are_checked():
    a, b = _params()
    with pytest.raises(ValueError, match="Invalid beta parameter at index 1"):
        fusedclip.FusedClipAdam([{"params": [a]}, {"params": [b], "betas": (0.9, 1.0)}])
    with pytest.raises(ValueError, match="Invalid learning rate"):
        fusedclip.FusedClipAdamW([{"params": [a]}, {"params": [b], "lr": -1.0}])


# -- failures at step time leave everything as it was ------------------------------------
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_sparse_gradient(cls):
    opt, params = _trained(cls, clip=1.0)
    before = snapshot(opt, params)
    for p in params:
        p.grad = torch.randn_like(p)
    params[-1].grad = params[-1].grad.to_sparse()  # the last group's last parameter
    with pytest.raises(RuntimeError, match=f"{cls.__name__} does not support sparse gradients"):
        opt.step()
    assert_unchanged(opt, params, before, "sparse gradient")


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_complex32_parameter(cls):
    """complex64/128 are optimized as torch does (tests/test_dropin.py);
    complex32 has no real view the kernels take, and is refused."""
    real = _params(1)[0]
    z = torch.nn.Parameter(torch.randn(3, 2, dtype=torch.complex64).to(torch.complex32))
    opt = cls([{"params": [real]}, {"params": [z]}], clip=1.0)
    real.grad = torch.randn_like(real)
    opt.step()
    before = snapshot(opt, [real, z])
    real.grad = torch.randn_like(real)
    z.grad = torch.ones_like(z)
    with pytest.raises(RuntimeError, match=r"supports float32.*complex64/complex128 ones, got torch.complex32"):
        opt.step()
    assert_unchanged(opt, [real, z], before, "complex32 parameter")


def test_unsupported_parameter_dtype():
    """A float8 (or other unsupported) parameter is refused by name."""
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float8_e4m3fn), requires_grad=False)
    p.grad = torch.zeros(3, dtype=torch.float8_e4m3fn)
    opt = fusedclip.FusedClipAdam([p])
    with pytest.raises(RuntimeError, match="supports float32, float64, float16 and bfloat16"):
        opt.step()


@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("key,value,match", [
    ("lr", -1e-3, "Invalid learning rate"),
    ("lr", torch.tensor(-1e-3), "Invalid learning rate"),
    ("lr", torch.tensor([math.nan]), "Invalid learning rate"),
    ("eps", -1.0, "Invalid epsilon value"),
    ("betas", (0.9, 1.0), "Invalid beta parameter at index 1"),
    ("betas", (1.2, 0.9), "Invalid beta parameter at index 0"),
    ("weight_decay", -1.0, "Invalid weight_decay value"),
])
def test_bad_hyperparameter_set_after_construction(cls, key, value, match):
    """A group changed to a bad value (by hand or by a scheduler) fails the next
    step before any group is updated: here the bad group is the second one."""
    opt, params = _trained(cls, clip=1.0)
    before = snapshot(opt, params)
    opt.param_groups[1][key] = value
    for p in params:
        p.grad = torch.randn_like(p)
    with pytest.raises(ValueError, match=match):
        opt.step()
    assert_unchanged(opt, params, before, f"bad {key}")


# -- the ops' own checks --------------------------------------------------------------------
def _adam_args(n=3, dtype=torch.float32, amsgrad=False):
    g = torch.Generator().manual_seed(1)
    params = [torch.randn(5, 2, generator=g, dtype=dtype) for _ in range(n)]
    grads = [torch.randn(5, 2, generator=g, dtype=dtype) for _ in range(n)]
    m = [torch.zeros(5, 2, dtype=dtype) for _ in range(n)]
    v = [torch.zeros(5, 2, dtype=dtype) for _ in range(n)]
    mx = [torch.zeros(5, 2, dtype=dtype) for _ in range(n)] if amsgrad else []
    steps = [torch.zeros(()) for _ in range(n)]
    kwargs = dict(lr=1e-3, lr_tensor=None, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                  amsgrad=amsgrad, maximize=False, decoupled_weight_decay=False,
                  clip_coef=None, grad_scale=None, found_inf=None)
    return [params, grads, m, v, mx, steps], kwargs


def _op_breakers():
    def at(list_index, i, tensor):
        def apply(args, kwargs):
            args[list_index][i] = tensor
        return apply

    def kw(**changes):
        def apply(args, kwargs):
            kwargs.update(changes)
        return apply

    def drop_step(args, kwargs):
        args[5].pop()

    return [
        pytest.param(at(1, 2, torch.zeros(5, 3)), r"grads\[2\] has shape \[5, 3\] but params\[2\] has shape \[5, 2\]", id="grad-shape"),
        pytest.param(at(3, 0, torch.zeros(2, 5)), r"exp_avg_sqs\[0\] has shape", id="state-shape"),
        pytest.param(at(1, 1, torch.zeros(5, 2, dtype=torch.float64)), "must have one dtype, but grads\\[1\\] is Double", id="mixed-dtype"),
        pytest.param(at(0, 2, torch.zeros(5, 2, dtype=torch.float64)), "must have one dtype", id="mixed-param-dtype"),
        pytest.param(at(1, 0, torch.zeros(5, 2, dtype=torch.complex64)), r"grads\[0\] is complex", id="complex"),
        pytest.param(at(1, 0, torch.zeros(5, 2, dtype=torch.int32)), r"grads\[0\] has dtype Int", id="int"),
        # A sparse tensor never reaches the kernel's own check: the dispatcher
        # refuses it first, naming the backend (the optimizer checks gradients
        # itself, with its own message, see test_sparse_gradient).
        pytest.param(at(1, 0, torch.zeros(5, 2).to_sparse()), "'fusedclip::adam_' with arguments from the 'SparseCPU' backend", id="sparse"),
        pytest.param(drop_step, "steps has 2 tensors but params has 3", id="steps-count"),
        pytest.param(kw(lr=-1.0), "invalid learning rate -1", id="lr"),
        pytest.param(kw(lr_tensor=torch.tensor(-1.0)), "invalid learning rate -1 in lr_tensor", id="lr-tensor"),
        pytest.param(kw(eps=-1.0), "invalid eps -1", id="eps"),
        pytest.param(kw(beta1=1.0), r"invalid beta1 1 \(must be in \[0, 1\)\)", id="beta1"),
        pytest.param(kw(beta2=-0.5), "invalid beta2 -0.5", id="beta2"),
        pytest.param(kw(weight_decay=-1.0), "invalid weight_decay -1", id="weight-decay"),
        pytest.param(kw(amsgrad=True), r"max_exp_avg_sqs has 0 tensors but params has 3", id="amsgrad-no-max"),
        pytest.param(kw(clip_coef=torch.ones(2)), r"clip_coef must have 1 or one per tensor \(3\) elements, got 2", id="clip-coef-numel"),
        pytest.param(kw(clip_coef=torch.ones((), dtype=torch.float16)), "clip_coef must be a dense float32 or float64", id="clip-coef-dtype"),
        pytest.param(kw(found_inf=torch.zeros((), dtype=torch.int32)), "found_inf must be a dense float32 or float64", id="found-inf-dtype"),
        pytest.param(kw(grad_scale=torch.ones(3)), "grad_scale must have 1 elements, got 3", id="grad-scale-numel"),
        pytest.param(kw(lr_tensor=torch.ones(1, 1)), "lr_tensor must be 0-d or 1-d", id="lr-tensor-dim"),
    ]


@pytest.mark.parametrize("breaker,match", _op_breakers())
def test_adam_op_errors(breaker, match):
    """The op refuses bad calls by name, before writing anything."""
    args, kwargs = _adam_args()
    breaker(args, kwargs)
    before = [[t.clone() for t in group] for group in args]
    with pytest.raises(RuntimeError, match=match):
        legacy_ops.call("adam", *args, **kwargs)
    for group, old in zip(args, before):
        for t, o in zip(group, old):
            if t.layout == torch.strided:
                assert torch.equal(t, o)


@pytest.mark.parametrize("tensors,norm_type,match", [
    pytest.param([torch.ones(3)], 1.0, "norm_type must be 2.0 or inf, got 1", id="norm-type"),
    pytest.param([torch.ones(3)], -math.inf, "norm_type must be 2.0 or inf", id="-inf"),
    pytest.param([torch.ones(3), torch.ones(2, dtype=torch.float64)], 2.0, "must have one dtype", id="mixed"),
    pytest.param([torch.ones(3, dtype=torch.complex64)], 2.0, r"tensors\[0\] is complex", id="complex"),
    pytest.param([torch.ones(3, dtype=torch.int64)], 2.0, r"tensors\[0\] has dtype Long", id="int"),
    pytest.param([torch.ones(3).to_sparse()], 2.0, "'fusedclip::multi_tensor_norm' with arguments from the 'SparseCPU' backend", id="sparse"),
])
def test_norm_op_errors(tensors, norm_type, match):
    with pytest.raises(RuntimeError, match=match):
        fusedclip.ops.multi_tensor_norm(tensors, norm_type)

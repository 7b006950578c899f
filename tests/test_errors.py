"""Bad inputs fail with errors that name the problem, and a failed step leaves
parameters and state as they were."""

from __future__ import annotations

import math

import pytest
import torch

import fusedclip

from helpers import assert_unchanged, snapshot
from registry import SPECS

# The Adam family's own hyperparameter checks (SGD's and Adagrad's are in
# test_sgd.py and test_adagrad.py); what every optimizer refuses is checked
# for every spec of the registry below.
OPTIMIZERS = [fusedclip.FusedClipAdam, fusedclip.FusedClipAdamW]
EVERY = [pytest.param(s.fused, id=s.name) for s in SPECS.values()]


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
@pytest.mark.parametrize("cls", EVERY)
def test_sparse_gradient(cls):
    opt, params = _trained(cls, clip=1.0)
    before = snapshot(opt, params)
    for p in params:
        p.grad = torch.randn_like(p)
    params[-1].grad = params[-1].grad.to_sparse()  # the last group's last parameter
    with pytest.raises(RuntimeError, match=f"{cls.__name__} does not support sparse gradients"):
        opt.step()
    assert_unchanged(opt, params, before, "sparse gradient")


@pytest.mark.parametrize("cls", EVERY)
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


@pytest.mark.parametrize("cls", EVERY)
def test_unsupported_parameter_dtype(cls):
    """A float8 (or other unsupported) parameter is refused by name."""
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float8_e4m3fn), requires_grad=False)
    p.grad = torch.zeros(3, dtype=torch.float8_e4m3fn)
    opt = cls([p])
    with pytest.raises(RuntimeError, match="supports float32, float64, float16 and bfloat16"):
        opt.step()


@pytest.mark.parametrize("cls", EVERY)
def test_meta_parameter(cls):
    """A parameter on a device the kernels do not run on (here meta, whose
    fake kernels would change nothing) is refused with torch's fused message,
    before the CPU parameters beside it change."""
    real = _params(1)[0]
    meta = torch.nn.Parameter(torch.zeros(3, device="meta"))
    opt = cls([{"params": [real]}, {"params": [meta]}], clip=1.0)
    real.grad = torch.randn_like(real)
    opt.step()
    before = snapshot(opt, [real])
    real.grad = torch.randn_like(real)
    meta.grad = torch.zeros(3, device="meta")
    with pytest.raises(RuntimeError, match=r"supported devices: \['cpu', 'cuda'\] but "
                                           r"torch.float32 and meta; .* runs on the CPU and CUDA"):
        opt.step()
    assert_unchanged(opt, [real], before, "meta parameter")


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


# -- the norm op's own checks (the update ops': test_ops.py) ------------------------------------
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

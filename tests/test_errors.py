"""Bad inputs fail with errors that name the problem, and a failed step leaves
parameters and state as they were."""

from __future__ import annotations

import math

import pytest
import torch

import fusedclip

from helpers import assert_unchanged, snapshot
from registry import COMMON_BAD_ARGS, COMMON_BAD_GROUP_VALUES, SPECS

EVERY = [pytest.param(s.fused, id=s.name) for s in SPECS.values()]


def _bad_args():
    """Every optimizer's refusals: the shared ones and its own (registry.py)."""
    for spec in SPECS.values():
        for i, bad in enumerate(COMMON_BAD_ARGS + spec.bad_args):
            own = "own" if i >= len(COMMON_BAD_ARGS) else "common"
            yield pytest.param(spec, bad, id=f"{spec.name}-{own}-{'-'.join(bad.kwargs)}-{i}")


def _bad_group_values():
    for spec in SPECS.values():
        for key, value, match in COMMON_BAD_GROUP_VALUES + spec.bad_group_values:
            yield pytest.param(spec, key, value, match, id=f"{spec.name}-{key}-{value!r}")


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
@pytest.mark.parametrize("spec,bad", list(_bad_args()))
def test_bad_constructor_arguments(spec, bad):
    with pytest.raises(bad.error, match=bad.match):
        spec.fused(_params(), **bad.kwargs)
    # Hyperparameters are checked before the parameters, as torch checks them.
    with pytest.raises(bad.error, match=bad.match):
        spec.fused(None, **bad.kwargs)
    if bad.torch_refuses and spec.twin is not None:
        with pytest.raises(ValueError):
            spec.twin(_params(), **bad.kwargs)


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


@pytest.mark.parametrize("spec,key,value,match", list(_bad_group_values()))
def test_bad_hyperparameter_set_after_construction(spec, key, value, match):
    """A group changed to a bad value (by hand or by a scheduler) fails the next
    step before any group is updated: here the bad group is the second one."""
    opt, params = _trained(spec.fused, clip=1.0)
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

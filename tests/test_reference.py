"""Every fused optimizer against its float64 reference (fusedclip/reference.py),
whole trajectories of 10+ steps, on the CPU and (with a GPU and the CUDA
kernels) on CUDA, where the CPU kernels are a second oracle
(registry.run_against_reference).

float64 and float32 runs are compared with the unrounded reference; bfloat16
and float16 runs with a reference that rounds parameters and state to the
storage dtype after every step (``round_to``), which is what fusedclip does:
the tighter check of low precision (torch.optim rounds every intermediate, see
registry.run_parity).
"""

from __future__ import annotations

import math

import pytest
import torch

import fusedclip
from fusedclip.reference import ReferenceAdam, global_norm, global_norm_coefficient

from helpers import Problem, assert_close, flat, set_grads
from registry import SPECS, on_devices, run_against_reference, spec_params
from tolerances import NORM, NORM_OUT_DTYPE, REFERENCE

CONFIGS = [c for s in SPECS.values() for c in s.configs("reference")]
# The CUDA norm op's launch takes 111 tensors at most (csrc/cuda/multi_tensor_apply.cuh).
NORM_TENSORS_PER_LAUNCH = 111


@pytest.mark.parametrize("device,config", on_devices(CONFIGS, lambda values: values[0]["spec"]))
def test_trajectory_matches_reference(device, config):
    run_against_reference(config, device)


@pytest.mark.parametrize("spec", spec_params())
def test_reference_configurations_cover_every_argument(spec):
    """The configurations against the reference (over the spec's generator's
    stream) reach every dtype, both values of every flag, weight decay, a
    tensor lr, no clip, a float clip and the inf norm, and more tensors than
    one CUDA launch takes."""
    configs = [p.values[0] for p in spec.stream("reference")]
    groups = [{**c["defaults"], **g} for c in configs for g in c["problem"].groups]
    assert {c["problem"].dtype for c in configs} == set(spec.dtypes)
    for key in spec.bool_keys:
        assert {g.get(key) for g in groups} >= {True, False}, key
    assert any(g.get("weight_decay") for g in groups)
    assert any(isinstance(g["lr"], str) for g in groups)
    clips = [c["clip"] for c in configs]
    assert None in clips and any(isinstance(c, float) for c in clips)
    assert any(isinstance(c, tuple) and math.isinf(c[2]) for c in clips)
    assert any(len(c["problem"].specs) > max(1000, NORM_TENSORS_PER_LAUNCH) for c in configs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("spec", spec_params(s for s in SPECS.values() if s.low_precision_groups))
def test_low_precision_weight_decay(spec, dtype):
    """L2 weight decay in low precision with small gradients, where g and
    weight_decay * param nearly cancel (left out of the torch comparison, whose
    bfloat16 rounding of that sum decides its sign), and decoupled decay smaller
    than half an ulp of the weights (which torch's separate rounding loses),
    against the rounding reference."""
    specs = [((129,), "contiguous"), ((7, 9), "transposed"), ((), "contiguous"), ((4, 6), "slice")]
    first, second = spec.low_precision_groups
    problem = Problem(groups=[dict(first, specs=specs[:2]), dict(second, specs=specs[2:])],
                      dtype=dtype, grad_std=0.01, seed=21)
    config = {"spec": spec, "problem": problem, "clip": 1.0, "steps": 12, "defaults": {}}
    run_against_reference(config)


@pytest.mark.parametrize("norm_type", [2.0, math.inf], ids=["l2", "inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_mixed_groups_one_dtype_each(dtype, norm_type):
    """Groups with different dtypes share one global norm: a float64 group
    beside a `dtype` group, against the reference run per dtype group."""
    groups = [
        {"specs": [((9, 7), "contiguous"), ((5,), "contiguous")], "lr": 0.03,
         "weight_decay": 0.1},
        {"specs": [((33,), "contiguous"), ((), "contiguous")], "lr": 0.01, "amsgrad": True},
    ]
    low = Problem(groups=[groups[0]], dtype=dtype, seed=11)
    high = Problem(groups=[groups[1]], dtype=torch.float64, seed=12)
    lp, hp = low.params(), high.params()
    opt = fusedclip.FusedClipAdamW(low.param_groups(lp) + high.param_groups(hp),
                                   clip=fusedclip.GlobalNorm(0.5, norm_type))
    both = Problem(groups=groups, dtype=torch.float64, seed=0)
    ref = ReferenceAdam(both.reference_groups([lp[0], hp[0]], SPECS["AdamW"].defaults), clip=0.5,
                        norm_type=norm_type)
    for step in range(10):
        lg, hg = low.grads(step), high.grads(step)
        set_grads(flat(lp), lg)
        set_grads(flat(hp), hg)
        opt.step()
        # The reference keeps float64 values; the low-precision half is fed the
        # same (exactly representable) gradients and rounded by hand below.
        ref.step(lg + hg)
        for p in ref.groups[0]["params"]:
            p.copy_(p.to(dtype).double())
        for key, state in ref.states.items():
            if key[0] == 0:
                for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                    state[name] = state[name].to(dtype).double()
    # The global norm is the norm of both groups together.
    expected = global_norm([p.grad for p in flat(lp) + flat(hp)], norm_type)
    assert_close(opt.clip_stats["grad_norm"], expected, NORM[dtype], "grad_norm")
    # The coefficient comes from the global norm, which is only as precise as
    # its least precise part (a float32 norm for the `dtype` group): the float64
    # group is updated with a float32-accurate coefficient.
    tol_low, tol_high = REFERENCE[dtype], REFERENCE[NORM_OUT_DTYPE[dtype]]
    for p, r in zip(flat(lp), ref.groups[0]["params"]):
        assert_close(p.detach(), r.to(dtype), tol_low, "low-precision group")
    for p, r in zip(flat(hp), ref.groups[1]["params"]):
        assert_close(p.detach(), r, tol_high, "float64 group")


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_reference_clip_coefficient(norm_type):
    """clip_stats' coefficient is the reference's min(1, max_norm / (norm + 1e-6))."""
    problem = Problem(groups=[{"specs": [((40,), "contiguous"), ((3, 5), "transposed")]}],
                      dtype=torch.float64, seed=3)
    params = problem.params()
    for max_norm in (0.0, 0.25, 3.0, 1e6):
        opt = fusedclip.FusedClipAdam(problem.param_groups(params),
                                      clip=fusedclip.GlobalNorm(max_norm, norm_type))
        grads = problem.grads(0)
        set_grads(flat(params), grads)
        opt.step()
        norm = global_norm(grads, norm_type)
        assert_close(opt.clip_stats["grad_norm"], norm, NORM[torch.float64], "grad_norm")
        assert_close(opt.clip_stats["clip_coef"], global_norm_coefficient(norm, max_norm),
                     NORM[torch.float64], f"clip_coef max_norm={max_norm}")

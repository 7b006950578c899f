"""FusedClipAdam / FusedClipAdamW against the float64 reference
(fusedclip/reference.py), whole trajectories of 10+ steps.

float64 and float32 runs are compared with the unrounded reference; bfloat16
and float16 runs with a reference that rounds parameters and state to the
storage dtype after every step (``round_to``), which is what fusedclip does:
the tighter check of low precision (torch.optim rounds every intermediate, see
test_adam_parity.py).
"""

from __future__ import annotations

import math

import pytest
import torch

import fusedclip
from fusedclip.reference import ReferenceAdam, global_norm, global_norm_coefficient

from conftest import (
    LOW_PRECISION, Problem, assert_close, clip_args, clip_policy, flat, make_fused_opt,
    random_configs, set_grads, torch_defaults,
)
from tolerances import NORM, NORM_OUT_DTYPE, REFERENCE

CONFIGS = random_configs(28, seed=7_000_003, against="reference")


def make_reference(kind: str, problem: Problem, params, clip, ctor: dict) -> ReferenceAdam:
    """The reference of a configuration; `ctor` holds the constructor
    arguments the fused optimizer was given."""
    args = clip_args(clip)
    return ReferenceAdam(
        problem.reference_groups(params, {**torch_defaults(kind), **ctor}),
        clip=None if args is None else args[0],
        norm_type=2.0 if args is None else args[1],
        round_to=problem.dtype if problem.dtype in LOW_PRECISION else None,
    )


def assert_matches_reference(fopt, fparams: list, ref: ReferenceAdam, problem: Problem,
                             tol, what: str) -> None:
    """Parameters and state of the fused optimizer against the reference's, each
    quantity judged against its largest value over all parameters."""
    dtype = problem.dtype
    rparams = ref.params()
    keys = [(gi, pi) for gi, g in enumerate(problem.groups) for pi in range(len(g["specs"]))]
    amsgrad = [g["amsgrad"] for g in fopt.param_groups for _ in g["params"]]
    quantities = {"param": [(p.detach(), r.to(dtype)) for p, r in zip(fparams, rparams)]}
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        pairs = []
        for i, (p, k) in enumerate(zip(fparams, keys)):
            if k not in ref.states:
                assert p not in fopt.state, f"{what}: param[{i}] has state, the reference none"
                continue
            if key == "max_exp_avg_sq" and not amsgrad[i]:
                assert key not in fopt.state[p]
                continue
            pairs.append((fopt.state[p][key], ref.states[k][key].to(dtype)))
        quantities[key] = pairs
    for name, pairs in quantities.items():
        scale = max((float(e.abs().max()) for _, e in pairs if e.numel()), default=0.0)
        for i, (actual, expected) in enumerate(pairs):
            assert_close(actual, expected, tol, f"{what} {name}[{i}]", scale=scale)
    for i, (p, k) in enumerate(zip(fparams, keys)):
        if k in ref.states:
            assert float(fopt.state[p]["step"]) == ref.states[k]["step"], f"{what} step[{i}]"


def run_against_reference(config: dict) -> None:
    kind, problem, clip = config["kind"], config["problem"], config["clip"]
    tol = REFERENCE[problem.dtype]
    fparams = problem.params()
    fopt = make_fused_opt(kind, problem, fparams, config["defaults"], clip=clip_policy(clip))
    ref = make_reference(kind, problem, problem.params(), clip, config["defaults"])
    fflat = flat(fparams)
    for step in range(config["steps"]):
        grads = problem.grads(step)
        set_grads(fflat, grads)
        fopt.step()
        ref.step(grads)
        if "grad_norm" in fopt.clip_stats:
            norm = fopt.clip_stats["grad_norm"]
            assert_close(norm, ref.last_norm.to(norm.dtype), NORM[problem.dtype],
                         f"step {step} grad_norm")
    assert_matches_reference(fopt, fflat, ref, problem, tol, f"{kind} after {config['steps']} steps")


@pytest.mark.parametrize("config", CONFIGS)
def test_trajectory_matches_reference(config):
    run_against_reference(config)


def test_reference_configurations_cover_every_dtype():
    configs = [p.values[0] for p in CONFIGS]
    assert {c["problem"].dtype for c in configs} == {
        torch.float32, torch.float64, torch.bfloat16, torch.float16}
    assert any(len(c["problem"].specs) > 1000 for c in configs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["Adam", "AdamW"])
def test_low_precision_weight_decay(kind, dtype):
    """L2 weight decay in low precision with small gradients, where g and
    weight_decay * param nearly cancel (left out of the torch comparison, whose
    bfloat16 rounding of that sum decides its sign), and decoupled decay smaller
    than half an ulp of the weights (which torch's separate rounding loses)."""
    specs = [((129,), "contiguous"), ((7, 9), "transposed"), ((), "contiguous"), ((4, 6), "slice")]
    problem = Problem(
        groups=[{"specs": specs[:2], "lr": 0.01, "weight_decay": 0.1, "eps": 1e-6},
                {"specs": specs[2:], "lr": 0.03, "weight_decay": 0.01, "amsgrad": True}],
        dtype=dtype, grad_std=0.01, seed=21,
    )
    config = {"kind": kind, "problem": problem, "clip": 1.0, "steps": 12, "defaults": {}}
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
    defaults = torch_defaults("AdamW")
    both = Problem(groups=groups, dtype=torch.float64, seed=0)
    ref = ReferenceAdam(both.reference_groups([lp[0], hp[0]], defaults), clip=0.5,
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

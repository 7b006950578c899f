"""Shared machinery of the SGD and Adagrad tests: the torch.optim twin, the
fused class and the float64 reference of each kind, random configurations as
data, and the parity / reference runs.

(The Adam tests keep their own, older helpers in conftest.py; the test
problems, tensor layouts, clip configurations and comparison functions are
shared.)
"""

from __future__ import annotations

import math
import random

import pytest
import torch

import fusedclip
from fusedclip.reference import ReferenceAdagrad, ReferenceSGD

from conftest import (
    DTYPE_NAMES, LARGE_SPECS, LOW_PRECISION, MANY, PARALLEL_SPEC, SMALL_SPECS, TINY_SHAPES,
    Problem, _clip, _clip_name, _finite_max_abs, assert_close, clip_args, clip_policy,
    copy_state, flat, set_grads, torch_clip,
)

TORCH = {"SGD": torch.optim.SGD, "Adagrad": torch.optim.Adagrad}
FUSED = {"SGD": fusedclip.FusedClipSGD, "Adagrad": fusedclip.FusedClipAdagrad}
REFERENCE = {"SGD": ReferenceSGD, "Adagrad": ReferenceAdagrad}
# The state tensors of each kind, torch's keys (besides `step`).
STATE_KEYS = {"SGD": ("momentum_buffer",), "Adagrad": ("sum",)}
HYPER = {
    "SGD": ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize"),
    "Adagrad": ("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps",
                "maximize"),
}


def torch_defaults(kind: str) -> dict:
    """Every hyperparameter's default as torch's class states it."""
    opt = TORCH[kind]([torch.nn.Parameter(torch.zeros(1))])
    return {k: opt.defaults[k] for k in HYPER[kind]}


def make_torch_opt(kind: str, problem: Problem, params, defaults: dict):
    # foreach=False is what torch.optim picks on the CPU anyway; stated to be sure.
    return TORCH[kind](problem.param_groups(params), foreach=False, **defaults)


def make_fused_opt(kind: str, problem: Problem, params, defaults: dict, **kwargs):
    return FUSED[kind](problem.param_groups(params), **defaults, **kwargs)


def make_reference(kind: str, problem: Problem, params, clip, ctor: dict, **kwargs):
    args = clip_args(clip)
    return REFERENCE[kind](
        problem.reference_groups(params, {**torch_defaults(kind), **ctor}),
        clip=None if args is None else args[0],
        norm_type=2.0 if args is None else args[1],
        round_to=problem.dtype if problem.dtype in LOW_PRECISION else None,
        **kwargs,
    )


# -- comparing ---------------------------------------------------------------------------
def assert_states_close(kind: str, actual_opt, expected_opt, actual_params, expected_params,
                        tol, what: str = "", equal_nan: bool = False) -> None:
    """Parameters, state keys, steps and state tensors agree; each quantity's
    absolute tolerance scales with its largest value over all parameters
    (see tolerances.py)."""
    scales = {"param": _finite_max_abs([p.detach() for p in expected_params])}
    for key in STATE_KEYS[kind]:
        scales[key] = _finite_max_abs([expected_opt.state[p][key] for p in expected_params
                                       if key in expected_opt.state.get(p, {})])
    for i, (pa, pe) in enumerate(zip(actual_params, expected_params)):
        assert_close(pa.detach(), pe.detach(), tol, f"{what} param[{i}]", equal_nan,
                     scales["param"])
        sa, se = actual_opt.state.get(pa, {}), expected_opt.state.get(pe, {})
        assert set(sa) == set(se), f"{what} param[{i}]: state keys {set(sa)} vs {set(se)}"
        if "step" in se:
            assert float(sa["step"]) == float(se["step"]), f"{what} param[{i}] step"
            assert sa["step"].dtype == se["step"].dtype, f"{what} param[{i}] step dtype"
        for key in STATE_KEYS[kind]:
            if key in se:
                assert_close(sa[key], se[key], tol, f"{what} param[{i}] {key}", equal_nan,
                             scales[key])


def assert_matches_reference(kind: str, fopt, fparams, ref, problem: Problem, tol,
                             what: str) -> None:
    """The fused optimizer's parameters and state against the reference's."""
    dtype = problem.dtype
    keys = [(gi, pi) for gi, g in enumerate(problem.groups) for pi in range(len(g["specs"]))]
    quantities = {"param": [(p.detach(), r.to(dtype)) for p, r in zip(fparams, ref.params())]}
    # each parameter's group, for its initial Adagrad sum
    groups = [g for g in ref.groups for _ in g["params"]]
    for key in STATE_KEYS[kind]:
        pairs = []
        for i, (p, k) in enumerate(zip(fparams, keys)):
            rstate = ref.states.get(k, {})
            if rstate.get(key) is None:
                # No reference state yet: the fused one is absent, or (Adagrad,
                # whose state torch makes eagerly) still its initial value.
                if kind == "Adagrad":
                    init = groups[i]["initial_accumulator_value"]
                    assert float(fopt.state[p]["step"]) == 0, f"{what} step[{i}]"
                    pairs.append((fopt.state[p][key], fopt.state[p][key].new_full(p.shape, init)))
                else:
                    assert key not in fopt.state.get(p, {}), f"{what} {key}[{i}] exists"
                continue
            pairs.append((fopt.state[p][key], rstate[key].to(dtype)))
            if "step" in rstate:
                assert float(fopt.state[p]["step"]) == rstate["step"], f"{what} step[{i}]"
        quantities[key] = pairs
    for name, items in quantities.items():
        scale = max((float(e.abs().max()) for _, e in items if e.numel()), default=0.0)
        for i, (actual, expected) in enumerate(items):
            assert_close(actual, expected, tol, f"{what} {name}[{i}]", scale=scale)


# -- random configurations ----------------------------------------------------------------
def _group(rng: random.Random, kind: str, dtype, specs, against: str) -> dict:
    low = dtype in LOW_PRECISION
    group = {"specs": specs}
    lr = rng.choice([1e-2, 3e-2, 0.1] if low else [1e-3, 1e-2, 0.1, 0.3])
    group["lr"] = f"tensor:{lr}" if rng.random() < 0.3 else lr
    group["weight_decay"] = rng.choice([0.0, 0.0, 1e-2, 0.1])
    group["maximize"] = rng.random() < 0.3
    if kind == "SGD":
        group["momentum"] = rng.choice([0.0, 0.5, 0.9, 0.9])
        group["nesterov"] = group["momentum"] > 0 and rng.random() < 0.35
        group["dampening"] = 0.0 if group["nesterov"] else rng.choice([0.0, 0.1, 0.5])
    else:
        group["lr_decay"] = rng.choice([0.0, 0.0, 1e-2, 0.1])
        group["eps"] = rng.choice([1e-10, 1e-6, 1e-3] if low else [1e-10, 1e-6, 1e-3, 0.0])
        if low and against == "torch":
            # As for Adam (conftest._group): on a first step g / sqrt(g^2)
            # turns the sign of g + weight_decay * param, which torch rounds
            # to the storage dtype first, into a whole +-lr step where the two
            # nearly cancel. L2 decay in low precision is compared with the
            # float64 reference instead.
            group["weight_decay"] = 0.0
    return group


def random_configs(kind: str, n: int, seed: int, against: str) -> list:
    """`n` random configurations of `kind` as pytest params with readable ids.
    The first ones pin every dtype, then many tiny tensors (more than one CUDA
    launch takes), then the multi-threaded CPU path."""
    assert against in ("torch", "reference")
    rng = random.Random(seed)
    configs = []
    for i in range(n):
        dtype = rng.choice([torch.float32] * 4 + [torch.float64] * 2
                           + [torch.bfloat16, torch.float16])
        if i < 4:
            dtype = [torch.float32, torch.float64, torch.bfloat16, torch.float16][i]
        if i == 4:
            all_specs = [(rng.choice(TINY_SHAPES), "contiguous") for _ in range(MANY)]
        else:
            all_specs = rng.sample(SMALL_SPECS, rng.randint(4, len(SMALL_SPECS)))
            all_specs += rng.sample(LARGE_SPECS, rng.randint(0, 2))
            if i == 5:
                all_specs.append(PARALLEL_SPEC)
            rng.shuffle(all_specs)
        n_groups = rng.choice([1, 2, 3])
        cuts = sorted(rng.sample(range(1, len(all_specs)), n_groups - 1))
        bounds = [0, *cuts, len(all_specs)]
        groups = [_group(rng, kind, dtype, all_specs[a:b], against)
                  for a, b in zip(bounds, bounds[1:])]
        grad_std = rng.choice([0.01, 0.1, 1.0])
        # float16 against torch: gradients away from zero (conftest explains
        # why for Adam; Adagrad's sum of squares has the same subnormal range).
        grad_floor = 0.5 if dtype == torch.float16 and against == "torch" else 0.0
        clip = _clip(rng, dtype, all_specs, grad_std, grad_floor, against)
        # Now and then a hyperparameter comes from the constructor instead of
        # the groups (those groups that share the first group's value leave it out).
        defaults = {}
        if rng.random() < 0.3:
            key = "weight_decay" if kind == "SGD" else "eps"
            defaults = {key: groups[0][key]}
            for group in groups:
                if group[key] == defaults[key]:
                    del group[key]
        if kind == "Adagrad":
            # torch.optim.Adagrad fills every sum with its constructor's
            # initial_accumulator_value and ignores a group's own, so the
            # configurations give it to the constructor only (a group's own
            # value is tested in test_adagrad.py).
            defaults["initial_accumulator_value"] = rng.choice([0.0, 0.0, 0.1, 1.0])
        config = {
            "kind": kind,
            "problem": Problem(
                groups=groups, dtype=dtype, grad_std=grad_std, grad_floor=grad_floor,
                grad_layout=rng.choice(["contiguous", "like_param"]),
                none_prob=rng.choice([0.0, 0.0, 0.2]), seed=5000 + i,
            ),
            "clip": clip,
            "steps": rng.randint(10, 12),
            "defaults": defaults,
        }
        hyper = [{**defaults, **g} for g in groups]
        flags = [f"{i:02d}", kind, DTYPE_NAMES[dtype], _clip_name(clip), f"{n_groups}g",
                 f"{len(all_specs)}t"]
        flags += ["lrT"] if any(isinstance(g["lr"], str) for g in groups) else []
        flags += ["max"] if any(h["maximize"] for h in hyper) else []
        flags += ["wd"] if any(h["weight_decay"] for h in hyper) else []
        if kind == "SGD":
            flags += ["mom"] if any(h["momentum"] for h in hyper) else []
            flags += ["nest"] if any(h["nesterov"] for h in hyper) else []
            flags += ["damp"] if any(h["dampening"] for h in hyper) else []
        else:
            flags += ["lrdecay"] if any(h["lr_decay"] for h in hyper) else []
            flags += ["init"] if any(h["initial_accumulator_value"] for h in hyper) else []
        flags += ["nonegrad"] if config["problem"].none_prob else []
        flags += ["ctor"] if set(defaults) - {"initial_accumulator_value"} else []
        configs.append(pytest.param(config, id="-".join(flags)))
    return configs


def config_groups(configs) -> list[dict]:
    """Every group's hyperparameters, constructor arguments filled in."""
    return [{**c["defaults"], **g} for c in configs for g in c["problem"].groups]


# -- runs --------------------------------------------------------------------------------
def run_parity(config: dict, tol_table: dict) -> None:
    """Fused optimizer vs torch.optim + clip_grad_norm_ from the same parameters
    through the same gradients; low precision step by step from torch's state
    (see test_adam_parity.run_parity)."""
    kind, problem, clip = config["kind"], config["problem"], config["clip"]
    tol = tol_table[problem.dtype]
    step_by_step = problem.dtype in LOW_PRECISION
    tparams, fparams = problem.params(), problem.params()
    topt = make_torch_opt(kind, problem, tparams, config["defaults"])
    fopt = make_fused_opt(kind, problem, fparams, config["defaults"], clip=clip_policy(clip))
    tflat, fflat = flat(tparams), flat(fparams)
    storage = [p.data_ptr() for p in fflat]
    strides = [p.stride() for p in fflat]
    for step in range(config["steps"]):
        if step_by_step and step > 0:
            copy_state(topt, fopt, tflat, fflat)
        grads = problem.grads(step)
        set_grads(tflat, grads)
        set_grads(fflat, grads)
        fgrads = [None if p.grad is None else p.grad.clone() for p in fflat]
        torch_clip(tflat, clip)
        topt.step()
        fopt.step()
        assert int(fopt.clip_stats["skipped"]) == 0
        for p, g in zip(fflat, fgrads):
            if g is not None:
                assert torch.equal(p.grad, g), "the fused step changed a gradient"
        if step_by_step:
            assert_states_close(kind, fopt, topt, fflat, tflat, tol, f"{kind} step {step}")
    assert_states_close(kind, fopt, topt, fflat, tflat, tol,
                        f"{kind} after {config['steps']} steps")
    assert [p.data_ptr() for p in fflat] == storage
    assert [p.stride() for p in fflat] == strides


def run_against_reference(config: dict, tol_table: dict) -> None:
    kind, problem, clip = config["kind"], config["problem"], config["clip"]
    fparams = problem.params()
    fopt = make_fused_opt(kind, problem, fparams, config["defaults"], clip=clip_policy(clip))
    ref = make_reference(kind, problem, problem.params(), clip, config["defaults"])
    fflat = flat(fparams)
    for step in range(config["steps"]):
        grads = problem.grads(step)
        set_grads(fflat, grads)
        fopt.step()
        ref.step(grads)
    assert_matches_reference(kind, fopt, fflat, ref, problem, tol_table[problem.dtype],
                             f"{kind} after {config['steps']} steps")


def check_coverage(kind: str, configs) -> None:
    """The random configurations reach every case the spec lists."""
    configs = [p.values[0] for p in configs]
    problems = [c["problem"] for c in configs]
    groups = config_groups(configs)
    specs = [s for pr in problems for s in pr.specs]
    assert {pr.dtype for pr in problems} == {torch.float32, torch.float64, torch.bfloat16,
                                            torch.float16}
    assert any(isinstance(g["lr"], str) for g in groups)
    assert any(isinstance(g["lr"], float) for g in groups)
    keys = ["maximize"] + (["nesterov"] if kind == "SGD" else [])
    for key in keys:
        assert {g[key] for g in groups} == {True, False}, key
    numeric = ["weight_decay"] + (["momentum", "dampening"] if kind == "SGD"
                                  else ["lr_decay", "initial_accumulator_value", "eps"])
    for key in numeric:
        assert len({g[key] for g in groups}) >= 3, key
    if kind == "SGD":
        # momentum with dampening, with Nesterov, and plain SGD
        assert any(g["momentum"] and g["dampening"] for g in groups)
        assert any(g["momentum"] == 0 for g in groups)
    clips = [c["clip"] for c in configs]
    assert None in clips and any(isinstance(c, float) for c in clips)
    assert {c[2] for c in clips if isinstance(c, tuple)} == {2.0, math.inf}
    assert any(len(pr.groups) >= 3 for pr in problems)
    assert all(c["steps"] >= 10 for c in configs)
    assert any(len(pr.specs) > 1000 for pr in problems)
    assert {layout for _, layout in specs} == {"contiguous", "transposed", "slice",
                                               "channels_last"}
    shapes = {shape for shape, _ in specs}
    assert () in shapes and (0,) in shapes and (3, 0) in shapes and PARALLEL_SPEC[0] in shapes
    assert {pr.grad_layout for pr in problems} == {"contiguous", "like_param"}
    assert any(pr.none_prob > 0 for pr in problems)
    assert any(set(c["defaults"]) - {"initial_accumulator_value"} for c in configs)

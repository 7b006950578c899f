"""FusedClipAdam / FusedClipAdamW against torch.optim.Adam / AdamW preceded by
torch.nn.utils.clip_grad_norm_, over many random configurations and steps."""

from __future__ import annotations

import math

import pytest
import torch

import fusedclip

from conftest import (
    LOW_PRECISION, PARALLEL_SPEC, Problem, assert_close, assert_states_close, clip_policy,
    copy_state, flat, make_fused_opt, make_torch_opt, random_configs, set_grads, torch_clip,
    torch_defaults,
)
from tolerances import TORCH_NORM, TORCH_PARITY

CONFIGS = random_configs(56, seed=20240601, against="torch")


def run_parity(config: dict) -> None:
    """Both optimizers from the same parameters through the same gradients.

    float64 and float32 run side by side for all steps and are compared at the
    end. bfloat16 and float16 are compared step by step: before each step the
    fused optimizer is given torch's parameters and state, so that each
    comparison measures one step's rounding. (Left to run on their own, the two
    low-precision trajectories drift apart by the integral of those per-step
    differences: torch rounds every intermediate to the storage dtype and, in
    AdamW, rounds the decayed weight before adding the update, so a decay
    smaller than half an ulp is lost in torch and kept in fusedclip. The whole
    low-precision trajectory is compared with the float64 reference, which
    rounds as fusedclip does, in test_reference.py.)
    """
    kind, problem, clip = config["kind"], config["problem"], config["clip"]
    tol = TORCH_PARITY[problem.dtype]
    step_by_step = problem.dtype in LOW_PRECISION
    defaults = config["defaults"]
    tparams, fparams = problem.params(), problem.params()
    topt = make_torch_opt(kind, problem, tparams, defaults)
    fopt = make_fused_opt(kind, problem, fparams, defaults, clip=clip_policy(clip))
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
        norm = torch_clip(tflat, clip)
        topt.step()
        fopt.step()
        if norm is not None:
            # clip_grad_norm_ returns its norm in the gradients' dtype (rounded to
            # bfloat16, say); fusedclip's is float32 (float64 for float64).
            fnorm = fopt.clip_stats["grad_norm"]
            assert_close(fnorm.to(norm.dtype), norm, TORCH_NORM[problem.dtype],
                         f"step {step} grad_norm")
        assert int(fopt.clip_stats["skipped"]) == 0
        # The fused step reads the gradients; it never writes them.
        for p, g in zip(fflat, fgrads):
            assert (p.grad is None) == (g is None)
            if g is not None:
                assert torch.equal(p.grad, g), "the fused step changed a gradient"
        if step_by_step:
            assert_states_close(fopt, topt, fflat, tflat, tol, f"{kind} step {step}")
    assert_states_close(fopt, topt, fflat, tflat, tol, f"{kind} after {config['steps']} steps")
    # Parameters were updated in their own storage and kept their layout.
    assert [p.data_ptr() for p in fflat] == storage
    assert [p.stride() for p in fflat] == strides
    # Hyperparameter groups are untouched (lr tensors included).
    for tg, fg in zip(topt.param_groups, fopt.param_groups):
        for key in ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize"):
            tv, fv = tg[key], fg[key]
            if isinstance(tv, torch.Tensor):
                assert torch.equal(tv, fv)
            else:
                assert tv == fv


@pytest.mark.parametrize("config", CONFIGS)
def test_parity_with_torch(config):
    run_parity(config)


def test_configurations_cover_the_spec():
    """The random configurations do reach every case the spec lists."""
    configs = [p.values[0] for p in CONFIGS]
    assert len(configs) >= 50
    problems = [c["problem"] for c in configs]
    # each group's hyperparameters, constructor arguments filled in
    groups = [{**c["defaults"], **g} for c in configs for g in c["problem"].groups]
    specs = [s for pr in problems for s in pr.specs]
    assert {pr.dtype for pr in problems} == {torch.float32, torch.float64, torch.bfloat16, torch.float16}
    assert {c["kind"] for c in configs} == {"Adam", "AdamW"}
    assert any(isinstance(g["lr"], str) for g in groups) and any(isinstance(g["lr"], float) for g in groups)
    for key in ("amsgrad", "maximize", "decoupled_weight_decay"):
        assert {g.get(key) for g in groups} >= {True, False}, key
    assert len({g["betas"] for g in groups}) >= 4
    assert len({g["eps"] for g in groups}) >= 3
    assert len({g["weight_decay"] for g in groups}) >= 3
    clips = [c["clip"] for c in configs]
    assert None in clips and any(isinstance(c, float) for c in clips)
    assert {c[2] for c in clips if isinstance(c, tuple)} == {2.0, math.inf}
    assert any(len(pr.groups) >= 3 for pr in problems)
    assert all(c["steps"] >= 10 for c in configs)
    assert any(len(pr.specs) > 1000 for pr in problems)
    layouts = {layout for _, layout in specs}
    assert layouts == {"contiguous", "transposed", "slice", "channels_last"}
    shapes = {shape for shape, _ in specs}
    assert () in shapes and (0,) in shapes and (3, 0) in shapes and PARALLEL_SPEC[0] in shapes
    assert {pr.grad_layout for pr in problems} == {"contiguous", "like_param"}
    assert any(pr.none_prob > 0 for pr in problems)
    assert any(c["defaults"] for c in configs) and any(not c["defaults"] for c in configs)


def test_default_hyperparameters_match_torch():
    """With every hyperparameter left at its default, over a small model with
    several layers, the fused step is torch's."""
    for kind in ("Adam", "AdamW"):
        problem = Problem(groups=[{"specs": [((8, 4), "contiguous"), ((8,), "contiguous"),
                                             ((3, 8), "contiguous"), ((3,), "contiguous")]}],
                          seed=5)
        tparams, fparams = problem.params(), problem.params()
        topt = make_torch_opt(kind, problem, tparams, {})
        fopt = make_fused_opt(kind, problem, fparams, {})
        for step in range(12):
            grads = problem.grads(step)
            set_grads(flat(tparams), grads)
            set_grads(flat(fparams), grads)
            topt.step()
            fopt.step()
        assert fopt.defaults == type(topt)([torch.nn.Parameter(torch.zeros(1))]).defaults
        assert_states_close(fopt, topt, flat(fparams), flat(tparams), TORCH_PARITY[torch.float32], kind)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_parity_with_autograd_gradients(dtype):
    """Gradients made by backward() (so a strided-slice parameter gets a
    contiguous gradient, as autograd lays it out) on a small model."""
    results = []
    for side in ("torch", "fused"):
        gen = torch.Generator().manual_seed(3)
        base = torch.randn(6, 10, generator=gen, dtype=dtype)
        w1 = torch.nn.Parameter(base[:, ::2])  # not dense
        w2 = torch.nn.Parameter(torch.randn(4, 6, generator=gen, dtype=dtype).t())  # transposed
        b = torch.nn.Parameter(torch.randn((), generator=gen, dtype=dtype))  # 0-d
        params = [w1, w2, b]
        if side == "torch":
            opt = torch.optim.AdamW(params, lr=0.01, weight_decay=0.1, foreach=False)
        else:
            opt = fusedclip.FusedClipAdamW(params, lr=0.01, weight_decay=0.1, clip=0.5)
        data = torch.Generator().manual_seed(4)
        norms = []
        for _ in range(12):
            x = torch.randn(7, 5, generator=data, dtype=dtype)
            loss = ((torch.tanh(x @ w1.t()) @ w2).sum(1) + b).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            assert w1.grad.is_contiguous() and not w1.is_contiguous()
            if side == "torch":
                norms.append(torch.nn.utils.clip_grad_norm_(params, 0.5))
            opt.step()
            if side == "fused":
                norms.append(opt.clip_stats["grad_norm"].clone())
        results.append((params, opt, norms))
    (tp, topt, tn), (fp, fopt, fn) = results
    tol = TORCH_PARITY[dtype]
    for a, e in zip(fn, tn):
        assert_close(a, e, TORCH_NORM[dtype], "grad_norm")
    assert_states_close(fopt, topt, fp, tp, tol, "autograd")

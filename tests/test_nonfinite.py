"""The three non-finite policies: "skip" (default), "raise" and "propagate"."""

from __future__ import annotations

import math

import pytest
import torch

import fusedclip

from conftest import (
    Problem, assert_states_close, assert_unchanged, flat, make_fused_opt, make_torch_opt,
    set_grads, snapshot, torch_clip,
)
from tolerances import TORCH_PARITY

SPECS = [((5, 7), "contiguous"), ((), "contiguous"), ((0,), "contiguous"), ((6, 4), "transposed"),
         ((3, 8), "slice"), ((1031,), "contiguous")]
CLIPS = [
    pytest.param(None, id="noclip"),
    pytest.param(1.0, id="clip1.0"),
    pytest.param(("global", 0.5, math.inf), id="GN(0.5,inf)"),
]
# Where the bad value goes: (parameter index, flat element index, value).
BAD = [
    pytest.param((0, 3, math.inf), id="inf"),
    pytest.param((1, 0, -math.inf), id="-inf-0d"),
    pytest.param((4, 5, math.nan), id="nan-slice"),
    pytest.param((5, 1030, math.nan), id="nan-last"),
]


def _problem(dtype=torch.float32) -> Problem:
    return Problem(
        groups=[{"specs": SPECS[:3], "lr": 0.01, "amsgrad": True},
                {"specs": SPECS[3:], "lr": "tensor:0.003", "weight_decay": 0.1,
                 "maximize": True}],
        dtype=dtype, grad_std=0.5, seed=31,
    )


def _clip_policy(clip):
    return fusedclip.GlobalNorm(clip[1], clip[2]) if isinstance(clip, tuple) else clip


def _poison(grads, where):
    index, element, value = where
    grads = list(grads)
    g = grads[index].clone()
    assert g.is_contiguous()
    g.view(-1)[element] = value
    grads[index] = g
    return grads


# -- skip ----------------------------------------------------------------------------------
@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("where", BAD)
@pytest.mark.parametrize("kind", ["Adam", "AdamW"])
def test_skip_changes_nothing_and_training_goes_on(kind, where, clip):
    """A bad step changes no parameter and no state tensor (step included),
    counts in clip_stats['skipped'], and later steps match torch, which never
    saw the bad gradients."""
    problem = _problem()
    tparams, fparams = problem.params(), problem.params()
    topt = make_torch_opt(kind, problem, tparams, {})
    fopt = make_fused_opt(kind, problem, fparams, {}, clip=_clip_policy(clip))
    assert fopt.nonfinite == "skip"  # the default
    tflat, fflat = flat(tparams), flat(fparams)
    torch_step = 0
    skipped = 0
    for step in range(12):
        grads = problem.grads(step)
        if step in (3, 4, 9):  # two in a row, and one later
            before = snapshot(fopt, fflat)
            set_grads(fflat, _poison(grads, where))
            fopt.step()
            skipped += 1
            assert_unchanged(fopt, fflat, before, f"skipped step {step}")
            assert int(fopt.clip_stats["skipped"]) == skipped
            assert not torch.isfinite(fopt.clip_stats["grad_norm"])
            continue
        set_grads(tflat, grads)
        set_grads(fflat, grads)
        torch_clip(tflat, clip)
        topt.step()
        fopt.step()
        torch_step += 1
        assert int(fopt.clip_stats["skipped"]) == skipped
        assert torch.isfinite(fopt.clip_stats["grad_norm"])
    assert_states_close(fopt, topt, fflat, tflat, TORCH_PARITY[torch.float32], "after skips")
    for p in fflat:
        assert float(fopt.state[p]["step"]) == torch_step


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_skip_on_the_first_step(dtype):
    """A first step that is skipped leaves the parameters as they were and the
    optimizer as if it had not run: any state it holds is zero with step 0,
    and the next steps are those of a fresh optimizer."""
    problem = _problem(dtype)
    params, fresh = problem.params(), problem.params()
    opt = make_fused_opt("AdamW", problem, params, {}, clip=1.0)
    fresh_opt = make_fused_opt("AdamW", problem, fresh, {}, clip=1.0)
    before = [p.detach().clone() for p in flat(params)]
    set_grads(flat(params), _poison(problem.grads(0), (0, 0, math.nan)))
    opt.step()
    assert int(opt.clip_stats["skipped"]) == 1
    for p, b in zip(flat(params), before):
        assert torch.equal(p.detach(), b)
        for key, value in opt.state.get(p, {}).items():
            assert not value.any(), key
    for step in range(4):
        grads = problem.grads(step)
        set_grads(flat(params), grads)
        set_grads(flat(fresh), grads)
        opt.step()
        fresh_opt.step()
    for a, b in zip(flat(params), flat(fresh)):
        assert torch.equal(a.detach(), b.detach())
        for key, value in fresh_opt.state[b].items():
            assert torch.equal(opt.state[a][key], value), key


def test_skip_covers_every_dtype_bucket():
    """An inf in a float16 gradient skips the float32 and float64 groups too:
    the flag is global, like the norm."""
    groups = []
    problems = [Problem(groups=[{"specs": SPECS[:2], "lr": 0.01}], dtype=dt, seed=40 + i)
                for i, dt in enumerate((torch.float32, torch.float64, torch.float16))]
    params = [pr.params() for pr in problems]
    for pr, ps in zip(problems, params):
        groups += pr.param_groups(ps)
    opt = fusedclip.FusedClipAdam(groups, clip=1.0)
    everything = [p for ps in params for p in flat(ps)]
    for step in range(2):
        for pr, ps in zip(problems, params):
            set_grads(flat(ps), pr.grads(step))
        opt.step()
    before = snapshot(opt, everything)
    for pr, ps in zip(problems, params):
        set_grads(flat(ps), pr.grads(5))
    flat(params[2])[0].grad[1, 1] = math.inf
    opt.step()
    assert_unchanged(opt, everything, before, "float16 inf")
    assert int(opt.clip_stats["skipped"]) == 1


def test_skip_overflowing_low_precision_gradient():
    """A bfloat16 gradient that overflowed to inf in the backward pass."""
    w = torch.nn.Parameter(torch.ones(4, 4, dtype=torch.bfloat16))
    opt = fusedclip.FusedClipAdam([w], lr=0.1)
    x = torch.full((4, 4), 3e38, dtype=torch.bfloat16)
    (w * x * 4).sum().backward()
    assert torch.isinf(w.grad).all()
    opt.step()
    assert torch.equal(w.detach(), torch.ones(4, 4, dtype=torch.bfloat16))
    assert int(opt.clip_stats["skipped"]) == 1


# -- raise ---------------------------------------------------------------------------------
@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("where", BAD)
def test_raise_before_anything_changes(where, clip):
    problem = _problem()
    tparams, fparams = problem.params(), problem.params()
    topt = make_torch_opt("Adam", problem, tparams, {})
    fopt = make_fused_opt("Adam", problem, fparams, {}, clip=_clip_policy(clip), nonfinite="raise")
    tflat, fflat = flat(tparams), flat(fparams)
    for step in range(8):
        grads = problem.grads(step)
        if step == 4:
            before = snapshot(fopt, fflat)
            stats_before = dict(fopt.clip_stats)
            set_grads(fflat, _poison(grads, where))
            with pytest.raises(RuntimeError, match=r"inf or nan.*nonfinite='raise'"):
                fopt.step()
            assert_unchanged(fopt, fflat, before, "raised step")
            assert fopt.clip_stats == stats_before
            assert int(fopt.clip_stats["skipped"]) == 0
            continue
        set_grads(tflat, grads)
        set_grads(fflat, grads)
        torch_clip(tflat, clip)
        topt.step()
        fopt.step()
    assert_states_close(fopt, topt, fflat, tflat, TORCH_PARITY[torch.float32], "after raise")


def test_raise_on_the_first_step_leaves_no_state():
    problem = _problem()
    params = problem.params()
    opt = make_fused_opt("AdamW", problem, params, {}, nonfinite="raise")
    set_grads(flat(params), _poison(problem.grads(0), (3, 2, math.inf)))
    before = snapshot(opt, flat(params))
    with pytest.raises(RuntimeError, match="inf or nan"):
        opt.step()
    assert_unchanged(opt, flat(params), before, "raised first step")
    assert len(opt.state) == 0


# -- propagate -------------------------------------------------------------------------------
@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("where", BAD)
@pytest.mark.parametrize("kind", ["Adam", "AdamW"])
def test_propagate_is_torchs_behaviour(kind, where, clip):
    """inf/nan flow into parameters and state exactly where torch.optim +
    clip_grad_norm_ put them (a clip coefficient of 0 from an inf norm turns an
    inf gradient into nan and every finite one into 0; a nan norm makes every
    gradient nan; without clipping only the bad tensor is hit)."""
    problem = _problem()
    tparams, fparams = problem.params(), problem.params()
    topt = make_torch_opt(kind, problem, tparams, {})
    fopt = make_fused_opt(kind, problem, fparams, {}, clip=_clip_policy(clip), nonfinite="propagate")
    tflat, fflat = flat(tparams), flat(fparams)
    for step in range(6):
        grads = problem.grads(step)
        if step == 3:
            grads = _poison(grads, where)
        set_grads(tflat, grads)
        set_grads(fflat, grads)
        tnorm = torch_clip(tflat, clip)
        topt.step()
        fopt.step()
        if tnorm is not None:
            fnorm = fopt.clip_stats["grad_norm"]
            assert bool(torch.isfinite(fnorm)) == bool(torch.isfinite(tnorm))
            assert bool(torch.isnan(fnorm)) == bool(torch.isnan(tnorm))
        else:
            # No norm pass at all: NaN, "nothing measured", even where every
            # gradient is finite.
            assert torch.isnan(fopt.clip_stats["grad_norm"])
        assert int(fopt.clip_stats["skipped"]) == 0
    assert any(not torch.isfinite(p).all() for p in tflat), "the test must reach nan/inf"
    assert_states_close(fopt, topt, fflat, tflat, TORCH_PARITY[torch.float32], "propagate",
                        equal_nan=True)

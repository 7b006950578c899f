"""The three non-finite policies, for every fused optimizer: "skip" (default),
"raise" and "propagate"."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import (
    Problem, assert_states_close, assert_unchanged, bitwise_equal, clip_policy, flat, make_params,
    no_host_reads, poisoned, set_grads, snapshot, torch_clip,
)
from registry import SPECS, on_devices, spec_params
from tolerances import TORCH_PARITY

SPECS_6 = [((5, 7), "contiguous"), ((), "contiguous"), ((0,), "contiguous"),
           ((6, 4), "transposed"), ((3, 8), "slice"), ((1031,), "contiguous")]
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
TWINNED = spec_params(twin=True)
# Every spec with a twin, on every device, with every bad value and clip.
ON_DEVICES = on_devices([pytest.param(spec.values[0], where.values[0], clip.values[0],
                                      id=f"{spec.id}-{where.id}-{clip.id}")
                         for spec in TWINNED for where in BAD for clip in CLIPS],
                        lambda v: v[0])


def _problem(spec, dtype=torch.float32, seed=31) -> Problem:
    """The spec's state dict groups (every option its state depends on) over
    six parameters (an empty and a 0-d one among them); the second group's
    lr a tensor."""
    groups = [dict(g) for g in spec.state_dict_groups]
    cuts = [0, 3, 5, 6][:len(groups)] + [6]
    for i, (group, a, b) in enumerate(zip(groups, cuts, cuts[1:])):
        group["specs"] = SPECS_6[a:b]
        if i == 1:
            group["lr"] = f"tensor:{group['lr']}"
    return Problem(groups=groups, dtype=dtype, grad_std=0.5, seed=seed)


def _poison(grads, where):
    index, element, value = where
    return poisoned(grads, index, value, element)


# -- skip ----------------------------------------------------------------------------------
@pytest.mark.parametrize("device,spec,where,clip", ON_DEVICES)
def test_skip_changes_nothing_and_training_goes_on(device, spec, where, clip):
    """A bad step changes no parameter and no state tensor (step included),
    counts in clip_stats['skipped'], and later steps match torch, which never
    saw the bad gradients."""
    problem = _problem(spec)
    tparams, fparams = problem.params(device), problem.params(device)
    topt = spec.make_torch(problem, tparams, spec.ctor, device)
    fopt = spec.make_fused(problem, fparams, spec.ctor, device, clip=clip_policy(clip))
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
        if "step" in fopt.state.get(p, {}):
            assert float(fopt.state[p]["step"]) == torch_step


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("spec", spec_params())
def test_skip_on_the_first_step(spec, dtype):
    """A first step that is skipped leaves the parameters as they were and the
    optimizer as if it had not run: any state it holds is zero with step 0
    (or, made eagerly, what a fresh optimizer holds), and the next steps are
    those of a fresh optimizer."""
    problem = _problem(spec, dtype)
    params, fresh = problem.params(), problem.params()
    opt = spec.make_fused(problem, params, spec.ctor, clip=1.0)
    fresh_opt = spec.make_fused(problem, fresh, spec.ctor, clip=1.0)
    before = [p.detach().clone() for p in flat(params)]
    set_grads(flat(params), _poison(problem.grads(0), (0, 0, math.nan)))
    opt.step()
    assert int(opt.clip_stats["skipped"]) == 1
    for p, q, b in zip(flat(params), flat(fresh), before):
        assert torch.equal(p.detach(), b)
        for key, value in opt.state.get(p, {}).items():
            if spec.eager_state:
                assert bitwise_equal(value, fresh_opt.state[q][key]), key
            else:
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


@pytest.mark.parametrize("spec", spec_params())
def test_skip_covers_every_dtype_bucket(spec):
    """An inf in a float16 gradient skips the float32 and float64 groups too:
    the flag is global, like the norm."""
    groups = []
    problems = [Problem(groups=[{"specs": SPECS_6[:2], "lr": 0.01}], dtype=dt, seed=40 + i)
                for i, dt in enumerate((torch.float32, torch.float64, torch.float16))]
    params = [pr.params() for pr in problems]
    for pr, ps in zip(problems, params):
        groups += pr.param_groups(ps)
    opt = spec.fused(groups, clip=1.0, **spec.ctor)
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


@pytest.mark.parametrize("spec", spec_params())
def test_skip_overflowing_low_precision_gradient(spec):
    """A bfloat16 gradient that overflowed to inf in the backward pass."""
    w = torch.nn.Parameter(torch.ones(4, 4, dtype=torch.bfloat16))
    opt = spec.fused([w], lr=0.1)
    x = torch.full((4, 4), 3e38, dtype=torch.bfloat16)
    (w * x * 4).sum().backward()
    assert torch.isinf(w.grad).all()
    opt.step()
    assert torch.equal(w.detach(), torch.ones(4, 4, dtype=torch.bfloat16))
    assert int(opt.clip_stats["skipped"]) == 1


# -- raise ---------------------------------------------------------------------------------
@pytest.mark.parametrize("device,spec,where,clip", ON_DEVICES)
def test_raise_before_anything_changes(device, spec, where, clip):
    problem = _problem(spec)
    tparams, fparams = problem.params(device), problem.params(device)
    topt = spec.make_torch(problem, tparams, spec.ctor, device)
    fopt = spec.make_fused(problem, fparams, spec.ctor, device, clip=clip_policy(clip),
                           nonfinite="raise")
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


@pytest.mark.parametrize("spec", spec_params())
def test_raise_on_the_first_step_leaves_no_state(spec):
    """Nothing changes, not even on the first step: no state is made (but for
    state made eagerly, when the parameters joined)."""
    problem = _problem(spec)
    params = problem.params()
    opt = spec.make_fused(problem, params, spec.ctor, nonfinite="raise")
    set_grads(flat(params), _poison(problem.grads(0), (3, 2, math.inf)))
    before = snapshot(opt, flat(params))
    with pytest.raises(RuntimeError, match=r"inf or nan.*nonfinite='raise'"):
        opt.step()
    assert_unchanged(opt, flat(params), before, "raised first step")
    if not spec.eager_state:
        assert len(opt.state) == 0


# -- propagate -------------------------------------------------------------------------------
@pytest.mark.parametrize("device,spec,where,clip", ON_DEVICES)
def test_propagate_is_torchs_behaviour(device, spec, where, clip):
    """inf/nan flow into parameters and state exactly where torch.optim +
    clip_grad_norm_ put them (a clip coefficient of 0 from an inf norm turns an
    inf gradient into nan and every finite one into 0; a nan norm makes every
    gradient nan; without clipping only the bad tensor is hit)."""
    problem = _problem(spec)
    tparams, fparams = problem.params(device), problem.params(device)
    topt = spec.make_torch(problem, tparams, spec.ctor, device)
    fopt = spec.make_fused(problem, fparams, spec.ctor, device, clip=clip_policy(clip),
                           nonfinite="propagate")
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
    if clip is not None and math.isnan(where[2]):  # a nan norm: every parameter nan
        assert all(torch.isnan(p).all() for p in tflat)
    assert_states_close(fopt, topt, fflat, tflat, TORCH_PARITY[torch.float32], "propagate",
                        equal_nan=True)


# -- no host read ----------------------------------------------------------------------------
@pytest.mark.parametrize("device,spec,dtype,clip", on_devices(
    [pytest.param(spec, dtype, clip.values[0], id=f"{spec.name}-{str(dtype)[6:]}-{clip.id}")
     for spec in SPECS.values()
     for k, dtype in enumerate((torch.float32, torch.bfloat16, torch.float16, torch.float64))
     for clip in [CLIPS[(k + list(SPECS).index(spec.name)) % len(CLIPS)]]],
    lambda v: v[0]))
def test_skip_reads_no_device_value(device, spec, dtype, clip):
    """A step with a NaN gradient is skipped without reading a value on the
    host (every optimizer in every dtype, the clip varying with them): the skip flag stays on the device (CUDA: torch's sync debug mode
    fails on a sync; CPU: every Tensor method that reads a value fails), with
    the lr a tensor on the device (a float on the CPU, where the optimizer
    reads a CPU lr tensor's value to check it, which costs no sync)."""
    params = make_params(SPECS_6[:5] + [((70001,), "contiguous")], dtype, seed=5, device=device)
    lr = torch.tensor(0.01, device=device) if device != "cpu" else 0.01
    hyper = dict(spec.example, lr=lr, **spec.ctor)
    opt = spec.fused(params, clip=clip_policy(clip), **hyper)
    for step in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        if step == 2:
            before = snapshot(opt, params)
            params[5].grad[70000] = math.nan
        with no_host_reads(device):
            opt.step()
    assert_unchanged(opt, params, before, "skipped step")
    assert int(opt.clip_stats["skipped"]) == 1
    assert all(float(opt.state[p]["step"]) == 2.0 for p in params if "step" in opt.state[p])

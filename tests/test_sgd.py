"""FusedClipSGD's own behaviour (the checks every optimizer shares are the
registry's: test_parity.py, test_reference.py, test_state_dict.py,
test_nonfinite.py, ...): momentum switched on later, the first momentum step
after skipped ones, a bad Nesterov group, a GradScaler's skipped first step, and
normalized SGD."""

from __future__ import annotations

import math

import pytest
import torch

import fusedclip

from helpers import (
    Problem, assert_close, assert_states_close, assert_unchanged, bitwise_equal, flat, poisoned,
    set_grads, snapshot, torch_clip,
)
from registry import SPECS
from tolerances import REFERENCE, TORCH_PARITY

SGD = SPECS["SGD"]


def test_momentum_switched_on_later():
    """A group that starts without momentum and gets it later (a schedule):
    the buffer starts then, with torch's first step."""
    problem = Problem(groups=[{"specs": [((5, 3), "contiguous"), ((7,), "contiguous")],
                               "lr": 0.1, "dampening": 0.5}], seed=8)
    tparams, fparams = problem.params(), problem.params()
    topt = SGD.make_torch(problem, tparams)
    fopt = SGD.make_fused(problem, fparams, clip=1.0)
    for step in range(8):
        if step == 3:
            topt.param_groups[0]["momentum"] = fopt.param_groups[0]["momentum"] = 0.9
        grads = problem.grads(step)
        set_grads(flat(tparams), grads)
        set_grads(flat(fparams), grads)
        torch_clip(flat(tparams), 1.0)
        topt.step()
        fopt.step()
        assert_states_close(fopt, topt, flat(fparams), flat(tparams),
                            TORCH_PARITY[torch.float32], f"step {step}")


# -- the first momentum step after skipped ones ---------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("nesterov", [False, True])
def test_skipped_first_step_leaves_the_next_one_first(dtype, nesterov):
    """Two skipped steps before any good one: the third step is the buffers'
    first, buf = g (not momentum * 0 + (1 - dampening) g), exactly as in
    torch.optim.SGD, which never saw the bad steps, and bit for bit as in a
    fused optimizer that never saw them either. Dampening 0.5 makes the wrong
    rule visible (half the gradient)."""
    damp = 0.0 if nesterov else 0.5
    problem = Problem(groups=[{"specs": [((6, 5), "contiguous"), ((), "contiguous"),
                                         ((4, 7), "transposed"), ((3, 8), "slice")],
                               "lr": 0.1, "momentum": 0.9, "dampening": damp,
                               "nesterov": nesterov, "weight_decay": 0.01}],
                      dtype=dtype, seed=13)
    params, fresh, tparams = problem.params(), problem.params(), problem.params()
    opt = SGD.make_fused(problem, params)
    fresh_opt = SGD.make_fused(problem, fresh)
    topt = SGD.make_torch(problem, tparams)
    for bad in range(2):
        before = snapshot(opt, flat(params))
        set_grads(flat(params), poisoned(problem.grads(100 + bad)))
        opt.step()
        # Nothing changed: the buffers made for the step are still zero.
        for p, b in zip(flat(params), before["params"]):
            assert bitwise_equal(p.detach(), b)
            assert not opt.state[p]["momentum_buffer"].any()
    assert int(opt.clip_stats["skipped"]) == 2
    for step in range(4):
        grads = problem.grads(step)
        for ps in (params, fresh, tparams):
            set_grads(flat(ps), grads)
        opt.step()
        fresh_opt.step()
        topt.step()
        if step == 0 and not nesterov:
            # first step: the buffer is the gradient plus decay, undamped
            for p, g, p0 in zip(flat(params), grads, flat(problem.params())):
                expected = g + 0.01 * p0.detach()
                assert_close(opt.state[p]["momentum_buffer"], expected.to(dtype),
                             TORCH_PARITY[dtype], "first buffer")
    for a, b in zip(flat(params), flat(fresh)):
        assert bitwise_equal(a.detach(), b.detach())
        assert bitwise_equal(opt.state[a]["momentum_buffer"], fresh_opt.state[b]["momentum_buffer"])
    if dtype != torch.bfloat16:  # bfloat16 is compared with torch step by step elsewhere
        assert_states_close(opt, topt, flat(params), flat(tparams), TORCH_PARITY[dtype],
                            "after skipped first steps")


# -- a bad group (the constructor's checks and the others: test_errors.py) ------------------
def _params(n=2):
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(4, 3, generator=g)) for _ in range(n)]


def test_bad_group_set_later_fails_before_any_update():
    params = _params(4)
    opt = fusedclip.FusedClipSGD([{"params": params[:2]}, {"params": params[2:]}],
                                 lr=0.1, momentum=0.9, clip=1.0)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    before = snapshot(opt, params)
    opt.param_groups[1]["nesterov"] = True
    opt.param_groups[1]["dampening"] = 0.5
    with pytest.raises(ValueError, match="Nesterov momentum requires"):
        opt.step()
    assert_unchanged(opt, params, before, "bad nesterov")


@pytest.mark.parametrize("nonfinite", ["skip", "propagate"])
def test_grad_scaler_skipped_first_step(nonfinite):
    """torch.amp.GradScaler hands grad_scale and found_inf to the fused step; a
    first step whose scaled gradients overflowed is skipped (under every
    policy), and the next one is the buffers' first: torch.optim.SGD, given
    only the good steps' unscaled gradients, agrees."""
    problem = Problem(groups=[{"specs": [((6, 5), "contiguous"), ((7,), "contiguous")],
                               "lr": 0.1, "momentum": 0.9, "dampening": 0.5}], seed=17)
    tparams, fparams = problem.params(), problem.params()
    topt = SGD.make_torch(problem, tparams)
    fopt = SGD.make_fused(problem, fparams, nonfinite=nonfinite)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4, growth_interval=1000)
    scaler.scale(torch.ones(()))  # the scaler makes its scale tensor lazily
    for step in range(5):
        grads = problem.grads(step)
        scaled = [g * scaler.get_scale() for g in grads]
        if step == 0:
            scaled = poisoned(scaled, 1)
            scaled[1].view(-1)[0] = math.inf
        set_grads(flat(fparams), scaled)
        scaler.step(fopt)
        scaler.update()
        if step == 0:
            assert not fopt.state[flat(fparams)[0]]["momentum_buffer"].any()
            continue
        set_grads(flat(tparams), grads)
        topt.step()
    assert scaler.get_scale() == 2.0**3  # halved once, after the overflow
    assert_states_close(fopt, topt, flat(fparams), flat(tparams),
                        TORCH_PARITY[torch.float32], f"GradScaler, nonfinite={nonfinite}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normalized_sgd(dtype):
    """Plain SGD with clip=Normalize() is normalized SGD: every step moves the
    parameters by lr * g / (||g|| + eps), so by lr in global norm."""
    from fusedclip.reference import RefNormalize

    problem = Problem(groups=[{"specs": [((6, 5), "contiguous"), ((), "contiguous"),
                                         ((4, 7), "transposed"), ((3, 8), "slice")],
                               "lr": 0.05}], dtype=dtype, grad_std=3.0, seed=23)
    params = problem.params()
    opt = SGD.make_fused(problem, params, clip=fusedclip.Normalize())
    ref = SGD.make_reference(problem, problem.params(), RefNormalize(), round_to=None)
    for step in range(10):
        grads = problem.grads(step)
        before = [p.detach().clone() for p in flat(params)]
        set_grads(flat(params), grads)
        opt.step()
        ref.step(grads)
        moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(flat(params), before)])
        assert abs(float(moved.double().norm()) - 0.05) < 1e-5
    for p, r in zip(flat(params), ref.params()):
        assert_close(p.detach(), r.to(dtype), REFERENCE[dtype], "normalized SGD")

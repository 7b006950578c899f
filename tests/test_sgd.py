"""FusedClipSGD: parity with torch.optim.SGD + clip_grad_norm_, the float64
reference, state dicts both ways, the non-finite policies (and the first
momentum step after a skipped one), and bad arguments."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import fusedclip

from conftest import (
    Problem, assert_close, assert_restores_bitwise, assert_unchanged, bitwise_equal, copy_params,
    flat, set_grads, snapshot, torch_clip, train_steps,
)
from family import (
    assert_states_close, check_coverage, make_fused_opt, make_torch_opt, random_configs,
    run_against_reference, run_parity, torch_defaults,
)
from tolerances import REFERENCE, TORCH_PARITY

PARITY = random_configs("SGD", 16, seed=31_337, against="torch")
AGAINST_REFERENCE = random_configs("SGD", 8, seed=4_242, against="reference")


@pytest.mark.parametrize("config", PARITY)
def test_parity_with_torch(config):
    run_parity(config, TORCH_PARITY)


@pytest.mark.parametrize("config", AGAINST_REFERENCE)
def test_trajectory_matches_reference(config):
    run_against_reference(config, REFERENCE)


def test_configurations_cover_the_spec():
    check_coverage("SGD", PARITY)
    check_coverage("SGD", PARITY + AGAINST_REFERENCE)


def test_default_hyperparameters_match_torch():
    problem = Problem(groups=[{"specs": [((8, 4), "contiguous"), ((8,), "contiguous"),
                                         ((), "contiguous")]}], seed=5)
    tparams, fparams = problem.params(), problem.params()
    topt = make_torch_opt("SGD", problem, tparams, {})
    fopt = make_fused_opt("SGD", problem, fparams, {})
    assert fopt.defaults == type(topt)([torch.nn.Parameter(torch.zeros(1))]).defaults
    for step in range(10):
        grads = problem.grads(step)
        set_grads(flat(tparams), grads)
        set_grads(flat(fparams), grads)
        topt.step()
        fopt.step()
    assert_states_close("SGD", fopt, topt, flat(fparams), flat(tparams),
                        TORCH_PARITY[torch.float32], "defaults")
    assert all(len(fopt.state[p]) == 0 for p in flat(fparams))  # no momentum, no state


def test_momentum_switched_on_later():
    """A group that starts without momentum and gets it later (a schedule):
    the buffer starts then, with torch's first step."""
    problem = Problem(groups=[{"specs": [((5, 3), "contiguous"), ((7,), "contiguous")],
                               "lr": 0.1, "dampening": 0.5}], seed=8)
    tparams, fparams = problem.params(), problem.params()
    topt = make_torch_opt("SGD", problem, tparams, {})
    fopt = make_fused_opt("SGD", problem, fparams, {}, clip=1.0)
    for step in range(8):
        if step == 3:
            topt.param_groups[0]["momentum"] = fopt.param_groups[0]["momentum"] = 0.9
        grads = problem.grads(step)
        set_grads(flat(tparams), grads)
        set_grads(flat(fparams), grads)
        torch_clip(flat(tparams), 1.0)
        topt.step()
        fopt.step()
        assert_states_close("SGD", fopt, topt, flat(fparams), flat(tparams),
                            TORCH_PARITY[torch.float32], f"step {step}")


# -- the first momentum step after skipped ones ---------------------------------------------
def _poisoned(grads, index=0):
    grads = list(grads)
    grads[index] = grads[index].clone()
    grads[index].view(-1)[0] = math.nan
    return grads


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
    opt = make_fused_opt("SGD", problem, params, {})
    fresh_opt = make_fused_opt("SGD", problem, fresh, {})
    topt = make_torch_opt("SGD", problem, tparams, {})
    for bad in range(2):
        before = snapshot(opt, flat(params))
        set_grads(flat(params), _poisoned(problem.grads(100 + bad)))
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
        assert_states_close("SGD", opt, topt, flat(params), flat(tparams), TORCH_PARITY[dtype],
                            "after skipped first steps")


def test_skip_after_the_first_step_changes_nothing():
    """Later skipped steps leave buffers and parameters bit-identical, and
    training goes on as torch's, which never saw them."""
    problem = Problem(groups=[{"specs": [((5, 7), "contiguous"), ((0,), "contiguous"),
                                         ((6, 4), "transposed")], "lr": 0.05,
                               "momentum": 0.8, "dampening": 0.3},
                              {"specs": [((3, 8), "slice"), ((1031,), "contiguous")],
                               "lr": "tensor:0.02", "momentum": 0.9, "nesterov": True,
                               "maximize": True, "weight_decay": 0.1}], seed=3)
    tparams, fparams = problem.params(), problem.params()
    topt = make_torch_opt("SGD", problem, tparams, {})
    fopt = make_fused_opt("SGD", problem, fparams, {}, clip=fusedclip.GlobalNorm(0.5, "inf"))
    for step in range(10):
        grads = problem.grads(step)
        if step in (2, 3, 7):
            before = snapshot(fopt, flat(fparams))
            set_grads(flat(fparams), _poisoned(grads, 4))
            fopt.step()
            assert_unchanged(fopt, flat(fparams), before, f"skipped step {step}")
            continue
        set_grads(flat(tparams), grads)
        set_grads(flat(fparams), grads)
        torch_clip(flat(tparams), ("global", 0.5, math.inf))
        topt.step()
        fopt.step()
    assert int(fopt.clip_stats["skipped"]) == 3
    assert_states_close("SGD", fopt, topt, flat(fparams), flat(tparams),
                        TORCH_PARITY[torch.float32], "after skips")


def test_raise_and_propagate():
    problem = Problem(groups=[{"specs": [((5, 7), "contiguous"), ((3,), "contiguous")],
                               "lr": 0.1, "momentum": 0.9, "dampening": 0.2}], seed=4)
    # raise: nothing changes, not even on the first step
    params = problem.params()
    opt = make_fused_opt("SGD", problem, params, {}, nonfinite="raise")
    set_grads(flat(params), _poisoned(problem.grads(0)))
    before = snapshot(opt, flat(params))
    with pytest.raises(RuntimeError, match=r"inf or nan.*nonfinite='raise'"):
        opt.step()
    assert_unchanged(opt, flat(params), before, "raised")
    # propagate: nan goes where torch puts it
    tparams, fparams = problem.params(), problem.params()
    topt = make_torch_opt("SGD", problem, tparams, {})
    fopt = make_fused_opt("SGD", problem, fparams, {}, clip=1.0, nonfinite="propagate")
    for step in range(4):
        grads = _poisoned(problem.grads(step)) if step == 2 else problem.grads(step)
        set_grads(flat(tparams), grads)
        set_grads(flat(fparams), grads)
        torch_clip(flat(tparams), 1.0)
        topt.step()
        fopt.step()
    assert all(torch.isnan(p).all() for p in flat(tparams))
    assert_states_close("SGD", fopt, topt, flat(fparams), flat(tparams),
                        TORCH_PARITY[torch.float32], "propagate", equal_nan=True)


# -- state dicts ----------------------------------------------------------------------------
def _sd_problem(dtype, tensor_lr: bool) -> Problem:
    return Problem(groups=[
        {"specs": [((6, 5), "contiguous"), ((4, 7), "transposed"), ((), "contiguous"),
                   ((0,), "contiguous")], "lr": "tensor:0.05" if tensor_lr else 0.05,
         "momentum": 0.9, "dampening": 0.25, "weight_decay": 0.05},
        {"specs": [((5, 6), "slice"), ((33,), "contiguous")], "lr": 0.02, "momentum": 0.8,
         "nesterov": True, "maximize": True},
        {"specs": [((7,), "contiguous")], "lr": 0.03},  # plain SGD: no state
    ], dtype=dtype, grad_std=0.3, seed=77)


@pytest.mark.parametrize("dtype,tensor_lr", [(torch.float32, False), (torch.float64, True)])
def test_state_dicts_both_ways(dtype, tensor_lr):
    """torch -> fused and fused -> torch: same keys, and training continues as
    if the optimizer had never changed."""
    tol = TORCH_PARITY[dtype]
    problem = _sd_problem(dtype, tensor_lr)
    # torch into fused
    tparams = problem.params()
    topt = make_torch_opt("SGD", problem, tparams, {})
    train_steps(topt, flat(tparams), problem, 4, 0, True)
    fparams = problem.params()
    copy_params(tparams, fparams)
    fopt = make_fused_opt("SGD", problem, fparams, {}, clip=0.5)
    fopt.load_state_dict(copy.deepcopy(topt.state_dict()))
    train_steps(topt, flat(tparams), problem, 6, 4, True)
    train_steps(fopt, flat(fparams), problem, 6, 4, False)
    assert_states_close("SGD", fopt, topt, flat(fparams), flat(tparams), tol, "torch->fused")
    # fused into torch
    t2 = problem.params()
    copy_params(fparams, t2)
    topt2 = make_torch_opt("SGD", problem, t2, {})
    topt2.load_state_dict(copy.deepcopy(fopt.state_dict()))
    tsd, fsd = topt2.state_dict(), fopt.state_dict()
    assert tsd["state"].keys() == fsd["state"].keys()
    for index, state in tsd["state"].items():
        assert state.keys() == fsd["state"][index].keys() == {"momentum_buffer"}
    train_steps(topt2, flat(t2), problem, 6, 10, True)
    train_steps(fopt, flat(fparams), problem, 6, 10, False)
    assert_states_close("SGD", fopt, topt2, flat(fparams), flat(t2), tol, "fused->torch")


def test_state_dict_layout_is_torchs():
    problem = _sd_problem(torch.float32, False)
    tparams, fparams = problem.params(), problem.params()
    topt = make_torch_opt("SGD", problem, tparams, {})
    fopt = make_fused_opt("SGD", problem, fparams, {}, clip=0.5)
    train_steps(topt, flat(tparams), problem, 2, 0, True)
    train_steps(fopt, flat(fparams), problem, 2, 0, False)
    tsd, fsd = topt.state_dict(), fopt.state_dict()
    assert tsd["state"].keys() == fsd["state"].keys()
    for index, tstate in tsd["state"].items():
        for key, value in tstate.items():
            assert fsd["state"][index][key].dtype == value.dtype
            assert fsd["state"][index][key].shape == value.shape
    shared = {"lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize", "params"}
    for tg, fg in zip(tsd["param_groups"], fsd["param_groups"]):
        for key in shared:
            assert tg[key] == fg[key], key


def test_state_dict_round_trip_fused_is_bitwise():
    problem = _sd_problem(torch.float32, True)
    assert_restores_bitwise(
        lambda params: make_fused_opt("SGD", problem, params, {}, clip=0.5), problem, 3, 5)


# -- bad arguments --------------------------------------------------------------------------
def _params(n=2):
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(4, 3, generator=g)) for _ in range(n)]


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-0.1), r"Invalid learning rate: -0\.1"),
    (dict(lr=torch.tensor(-0.1)), "Invalid learning rate"),
    (dict(lr=torch.tensor([0.1, 0.2])), "Tensor lr must be 1-element"),
    (dict(momentum=-0.5), r"Invalid momentum value: -0\.5"),
    (dict(momentum=math.nan), "Invalid momentum value"),
    (dict(momentum=torch.tensor(0.9)), "momentum is a Tensor"),
    (dict(weight_decay=-0.01), r"Invalid weight_decay value: -0\.01"),
    (dict(weight_decay=torch.tensor(0.1)), "weight_decay is a Tensor"),
    (dict(dampening=math.nan), "Invalid dampening value"),
    (dict(nesterov=True), "Nesterov momentum requires a momentum and zero dampening"),
    (dict(nesterov=True, momentum=0.9, dampening=0.1),
     "Nesterov momentum requires a momentum and zero dampening"),
    (dict(clip=-1.0), "max_norm must be >= 0"),
    (dict(nonfinite="ignore"), "nonfinite must be one of"),
])
def test_bad_constructor_arguments(kwargs, match):
    error = TypeError if "clip" in kwargs and not isinstance(kwargs["clip"], float) else ValueError
    with pytest.raises(error, match=match):
        fusedclip.FusedClipSGD(_params(), **kwargs)
    # torch refuses the same, except NaN momentum and tensor momentum/decay,
    # which it lets through
    if not any(k in kwargs for k in ("clip", "nonfinite", "dampening")) and not any(
            (isinstance(v, torch.Tensor) and k != "lr") or (isinstance(v, float) and math.isnan(v))
            for k, v in kwargs.items()):
        with pytest.raises(ValueError):
            torch.optim.SGD(_params(), **kwargs)


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


def test_sparse_gradients_refused():
    p = torch.nn.Parameter(torch.zeros(5, 2))
    opt = fusedclip.FusedClipSGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.ones(5, 2).to_sparse()
    with pytest.raises(RuntimeError, match="FusedClipSGD does not support sparse gradients"):
        opt.step()


@pytest.mark.parametrize("nonfinite", ["skip", "propagate"])
def test_grad_scaler_skipped_first_step(nonfinite):
    """torch.amp.GradScaler hands grad_scale and found_inf to the fused step; a
    first step whose scaled gradients overflowed is skipped (under every
    policy), and the next one is the buffers' first: torch.optim.SGD, given
    only the good steps' unscaled gradients, agrees."""
    problem = Problem(groups=[{"specs": [((6, 5), "contiguous"), ((7,), "contiguous")],
                               "lr": 0.1, "momentum": 0.9, "dampening": 0.5}], seed=17)
    tparams, fparams = problem.params(), problem.params()
    topt = make_torch_opt("SGD", problem, tparams, {})
    fopt = make_fused_opt("SGD", problem, fparams, {}, nonfinite=nonfinite)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4, growth_interval=1000)
    scaler.scale(torch.ones(()))  # the scaler makes its scale tensor lazily
    for step in range(5):
        grads = problem.grads(step)
        scaled = [g * scaler.get_scale() for g in grads]
        if step == 0:
            scaled = _poisoned(scaled, 1)
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
    assert_states_close("SGD", fopt, topt, flat(fparams), flat(tparams),
                        TORCH_PARITY[torch.float32], f"GradScaler, nonfinite={nonfinite}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normalized_sgd(dtype):
    """Plain SGD with clip=Normalize() is normalized SGD: every step moves the
    parameters by lr * g / (||g|| + eps), so by lr in global norm."""
    from fusedclip.reference import ReferenceSGD, RefNormalize

    problem = Problem(groups=[{"specs": [((6, 5), "contiguous"), ((), "contiguous"),
                                         ((4, 7), "transposed"), ((3, 8), "slice")],
                               "lr": 0.05}], dtype=dtype, grad_std=3.0, seed=23)
    params = problem.params()
    opt = make_fused_opt("SGD", problem, params, {}, clip=fusedclip.Normalize())
    ref = ReferenceSGD(problem.reference_groups(problem.params(), torch_defaults("SGD")),
                       clip=RefNormalize())
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

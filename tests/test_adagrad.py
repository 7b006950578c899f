"""FusedClipAdagrad: parity with torch.optim.Adagrad + clip_grad_norm_, the
float64 reference, state dicts both ways (torch makes Adagrad's state
eagerly), the non-finite policies, and bad arguments."""

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

PARITY = random_configs("Adagrad", 16, seed=2012, against="torch")
AGAINST_REFERENCE = random_configs("Adagrad", 8, seed=1_000_003, against="reference")


@pytest.mark.parametrize("config", PARITY)
def test_parity_with_torch(config):
    run_parity(config, TORCH_PARITY)


@pytest.mark.parametrize("config", AGAINST_REFERENCE)
def test_trajectory_matches_reference(config):
    run_against_reference(config, REFERENCE)


def test_configurations_cover_the_spec():
    check_coverage("Adagrad", PARITY)
    check_coverage("Adagrad", PARITY + AGAINST_REFERENCE)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weight_decay(dtype):
    """L2 weight decay in low precision (left out of the torch comparison, see
    family._group) against the rounding reference."""
    problem = Problem(groups=[
        {"specs": [((129,), "contiguous"), ((7, 9), "transposed")], "lr": 0.03,
         "weight_decay": 0.1, "lr_decay": 0.01},
        {"specs": [((), "contiguous"), ((4, 6), "slice")], "lr": 0.01, "weight_decay": 0.01,
         "initial_accumulator_value": 0.1},
    ], dtype=dtype, grad_std=0.01, seed=21)
    config = {"kind": "Adagrad", "problem": problem, "clip": 1.0, "steps": 10, "defaults": {}}
    run_against_reference(config, REFERENCE)


def test_default_hyperparameters_match_torch():
    problem = Problem(groups=[{"specs": [((8, 4), "contiguous"), ((8,), "contiguous"),
                                         ((), "contiguous")]}], seed=5)
    tparams, fparams = problem.params(), problem.params()
    topt = make_torch_opt("Adagrad", problem, tparams, {})
    fopt = make_fused_opt("Adagrad", problem, fparams, {})
    assert fopt.defaults == type(topt)([torch.nn.Parameter(torch.zeros(1))]).defaults
    for step in range(10):
        grads = problem.grads(step)
        set_grads(flat(tparams), grads)
        set_grads(flat(fparams), grads)
        topt.step()
        fopt.step()
    assert_states_close("Adagrad", fopt, topt, flat(fparams), flat(tparams),
                        TORCH_PARITY[torch.float32], "defaults")


def test_group_initial_accumulator_value():
    """A group's own initial_accumulator_value is that group's initial sum
    (torch.optim.Adagrad fills every sum with its constructor's value and
    ignores the group's; fusedclip follows the group, as for every other
    hyperparameter), against the reference."""
    problem = Problem(groups=[
        {"specs": [((5, 3), "contiguous"), ((), "contiguous")], "lr": 0.1,
         "initial_accumulator_value": 2.0},
        {"specs": [((4, 6), "transposed")], "lr": 0.05},
    ], seed=9)
    params = problem.params()
    opt = make_fused_opt("Adagrad", problem, params, INIT)
    assert torch.equal(opt.state[params[0][0]]["sum"], torch.full((5, 3), 2.0))
    assert torch.equal(opt.state[params[1][0]]["sum"], torch.full((4, 6), 0.1))
    config = {"kind": "Adagrad", "problem": problem, "clip": 0.5, "steps": 10, "defaults": INIT}
    run_against_reference(config, REFERENCE)


# -- non-finite policies ----------------------------------------------------------------------
def _poisoned(grads, index=0, value=math.nan):
    grads = list(grads)
    grads[index] = grads[index].clone()
    grads[index].view(-1)[0] = value
    return grads


# torch.optim.Adagrad takes initial_accumulator_value from its constructor only
# (a group's own value is ignored there; see test_group_initial_accumulator_value).
INIT = {"initial_accumulator_value": 0.1}


def _nf_problem(dtype=torch.float32):
    return Problem(groups=[
        {"specs": [((5, 7), "contiguous"), ((), "contiguous"), ((0,), "contiguous")],
         "lr": 0.05, "lr_decay": 0.1},
        {"specs": [((6, 4), "transposed"), ((3, 8), "slice"), ((1031,), "contiguous")],
         "lr": "tensor:0.03", "weight_decay": 0.1, "maximize": True},
    ], dtype=dtype, grad_std=0.5, seed=31)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_skip_changes_nothing_and_training_goes_on(value):
    """Skipped steps (the very first one among them) change no parameter and
    no state, step counters included (they set the lr decay), and training
    goes on as torch's, which never saw them."""
    problem = _nf_problem()
    tparams, fparams = problem.params(), problem.params()
    topt = make_torch_opt("Adagrad", problem, tparams, INIT)
    fopt = make_fused_opt("Adagrad", problem, fparams, INIT, clip=1.0)
    good = 0
    for step in range(10):
        grads = problem.grads(step)
        if step in (0, 3, 4, 8):
            before = snapshot(fopt, flat(fparams))
            set_grads(flat(fparams), _poisoned(grads, 4, value))
            fopt.step()
            assert_unchanged(fopt, flat(fparams), before, f"skipped step {step}")
            continue
        set_grads(flat(tparams), grads)
        set_grads(flat(fparams), grads)
        torch_clip(flat(tparams), 1.0)
        topt.step()
        fopt.step()
        good += 1
    assert int(fopt.clip_stats["skipped"]) == 4
    assert all(float(fopt.state[p]["step"]) == good for p in flat(fparams))
    assert_states_close("Adagrad", fopt, topt, flat(fparams), flat(tparams),
                        TORCH_PARITY[torch.float32], "after skips")


def test_raise_and_propagate():
    problem = _nf_problem()
    params = problem.params()
    opt = make_fused_opt("Adagrad", problem, params, INIT, nonfinite="raise")
    set_grads(flat(params), _poisoned(problem.grads(0)))
    before = snapshot(opt, flat(params))
    with pytest.raises(RuntimeError, match=r"inf or nan.*nonfinite='raise'"):
        opt.step()
    assert_unchanged(opt, flat(params), before, "raised")
    tparams, fparams = problem.params(), problem.params()
    topt = make_torch_opt("Adagrad", problem, tparams, INIT)
    fopt = make_fused_opt("Adagrad", problem, fparams, INIT, nonfinite="propagate")
    for step in range(4):
        grads = _poisoned(problem.grads(step), 0, math.inf) if step == 2 else problem.grads(step)
        set_grads(flat(tparams), grads)
        set_grads(flat(fparams), grads)
        topt.step()
        fopt.step()
    assert not torch.isfinite(flat(tparams)[0]).all()
    assert_states_close("Adagrad", fopt, topt, flat(fparams), flat(tparams),
                        TORCH_PARITY[torch.float32], "propagate", equal_nan=True)


# -- state dicts ------------------------------------------------------------------------------
def _sd_problem(dtype, tensor_lr: bool) -> Problem:
    return Problem(groups=[
        {"specs": [((6, 5), "contiguous"), ((4, 7), "transposed"), ((), "contiguous"),
                   ((0,), "contiguous")], "lr": "tensor:0.05" if tensor_lr else 0.05,
         "lr_decay": 0.05, "weight_decay": 0.05},
        {"specs": [((5, 6), "slice"), ((33,), "contiguous")], "lr": 0.02, "eps": 1e-6,
         "maximize": True},
    ], dtype=dtype, grad_std=0.3, seed=77)


@pytest.mark.parametrize("dtype,tensor_lr", [(torch.float32, False), (torch.float64, True)])
def test_state_dicts_both_ways(dtype, tensor_lr):
    tol = TORCH_PARITY[dtype]
    if dtype == torch.float64:
        torch.set_default_dtype(torch.float64)  # torch's float64 step counters
    problem = _sd_problem(dtype, tensor_lr)
    tparams = problem.params()
    topt = make_torch_opt("Adagrad", problem, tparams, INIT)
    train_steps(topt, flat(tparams), problem, 4, 0, True)
    fparams = problem.params()
    copy_params(tparams, fparams)
    fopt = make_fused_opt("Adagrad", problem, fparams, INIT, clip=0.5)
    fopt.load_state_dict(copy.deepcopy(topt.state_dict()))
    assert all(fopt.state[p]["step"].device == p.device for p in flat(fparams))
    train_steps(topt, flat(tparams), problem, 6, 4, True)
    train_steps(fopt, flat(fparams), problem, 6, 4, False)
    assert_states_close("Adagrad", fopt, topt, flat(fparams), flat(tparams), tol,
                        "torch->fused")
    t2 = problem.params()
    copy_params(fparams, t2)
    topt2 = make_torch_opt("Adagrad", problem, t2, INIT)
    topt2.load_state_dict(copy.deepcopy(fopt.state_dict()))
    train_steps(topt2, flat(t2), problem, 6, 10, True)
    train_steps(fopt, flat(fparams), problem, 6, 10, False)
    assert_states_close("Adagrad", fopt, topt2, flat(fparams), flat(t2), tol, "fused->torch")


def test_state_is_made_eagerly_like_torchs():
    """torch.optim.Adagrad makes every parameter's state when it joins (so a
    state dict taken before any step, or of a parameter that never had a
    gradient, loads into torch): the fused optimizer does too, with the same
    keys, dtypes, shapes and values."""
    problem = _sd_problem(torch.float32, False)
    tparams, fparams = problem.params(), problem.params()
    topt = make_torch_opt("Adagrad", problem, tparams, INIT)
    fopt = make_fused_opt("Adagrad", problem, fparams, INIT)
    tsd, fsd = topt.state_dict(), fopt.state_dict()
    assert tsd["state"].keys() == fsd["state"].keys() == set(range(len(flat(tparams))))
    for index, tstate in tsd["state"].items():
        fstate = fsd["state"][index]
        assert tstate.keys() == fstate.keys() == {"step", "sum"}
        for key, value in tstate.items():
            assert bitwise_equal(fstate[key], value), key
    shared = {"lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps", "maximize",
              "params"}
    for tg, fg in zip(tsd["param_groups"], fsd["param_groups"]):
        for key in shared:
            assert tg[key] == fg[key], key
    # A group added later gets its state too, with its own initial value.
    extra = torch.nn.Parameter(torch.zeros(3))
    fopt.add_param_group({"params": [extra], "initial_accumulator_value": 0.7})
    assert torch.equal(fopt.state[extra]["sum"], torch.full((3,), 0.7))
    with pytest.raises(ValueError, match="Invalid initial_accumulator_value value: -1"):
        fopt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))],
                              "initial_accumulator_value": -1.0})
    assert len(fopt.param_groups) == 3
    # A fresh fused state dict loads into torch, which then trains.
    t3 = problem.params()
    topt3 = make_torch_opt("Adagrad", problem, t3, INIT)
    topt3.load_state_dict(copy.deepcopy(make_fused_opt("Adagrad", problem, problem.params(),
                                                       INIT).state_dict()))
    train_steps(topt3, flat(t3), problem, 1, 0, True)


def test_state_dict_round_trip_fused_is_bitwise():
    problem = _sd_problem(torch.float32, True)
    assert_restores_bitwise(
        lambda params: make_fused_opt("Adagrad", problem, params, {}, clip=0.5), problem, 3, 5)


# -- bad arguments ----------------------------------------------------------------------------
def _params(n=2):
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(4, 3, generator=g)) for _ in range(n)]


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-0.1), r"Invalid learning rate: -0\.1"),
    (dict(lr=torch.tensor(-0.1)), "Invalid learning rate"),
    (dict(lr_decay=-0.5), r"Invalid lr_decay value: -0\.5"),
    (dict(lr_decay=math.nan), "Invalid lr_decay value"),
    (dict(weight_decay=-0.01), r"Invalid weight_decay value: -0\.01"),
    (dict(initial_accumulator_value=-1.0), r"Invalid initial_accumulator_value value: -1\.0"),
    (dict(initial_accumulator_value=math.nan), "Invalid initial_accumulator_value value"),
    (dict(eps=-1e-10), r"Invalid epsilon value: -1e-10"),
    (dict(eps=torch.tensor(1e-10)), "eps is a Tensor"),
    (dict(clip=-1.0), "max_norm must be >= 0"),
    (dict(nonfinite="ignore"), "nonfinite must be one of"),
])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fusedclip.FusedClipAdagrad(_params(), **kwargs)
    if not any(k in kwargs for k in ("clip", "nonfinite", "eps")):
        with pytest.raises(ValueError):  # torch refuses the same
            torch.optim.Adagrad(_params(), **kwargs)


@pytest.mark.parametrize("key,value,match", [
    ("lr_decay", -1.0, "Invalid lr_decay value"),
    ("eps", -1.0, "Invalid epsilon value"),
    ("lr", torch.tensor([-1.0]), "Invalid learning rate"),
])
def test_bad_group_set_later_fails_before_any_update(key, value, match):
    params = _params(4)
    opt = fusedclip.FusedClipAdagrad([{"params": params[:2]}, {"params": params[2:]}], clip=1.0)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    before = snapshot(opt, params)
    opt.param_groups[1][key] = value
    with pytest.raises(ValueError, match=match):
        opt.step()
    assert_unchanged(opt, params, before, f"bad {key}")


def test_sparse_gradients_refused():
    p = torch.nn.Parameter(torch.zeros(5, 2))
    opt = fusedclip.FusedClipAdagrad([p])
    p.grad = torch.ones(5, 2).to_sparse()
    with pytest.raises(RuntimeError, match="FusedClipAdagrad does not support sparse gradients"):
        opt.step()


def test_per_tensor_policy_over_groups():
    """A per-tensor clip policy hands one coefficient per gradient (slices of
    its per-bucket coefficients) to the op, across groups, against the
    reference."""
    from fusedclip.reference import ReferenceAdagrad, RefPerTensorNorm

    problem = Problem(groups=[
        {"specs": [((6, 5), "contiguous"), ((), "contiguous")], "lr": 0.05, "lr_decay": 0.1},
        {"specs": [((4, 7), "transposed"), ((33,), "contiguous")], "lr": "tensor:0.02",
         "weight_decay": 0.1},
    ], dtype=torch.float64, grad_std=2.0, none_prob=0.2, seed=29)
    params = problem.params()
    opt = make_fused_opt("Adagrad", problem, params, INIT, clip=fusedclip.PerTensorNorm(1.0))
    ref = ReferenceAdagrad(problem.reference_groups(problem.params(),
                                                    {**torch_defaults("Adagrad"), **INIT}),
                           clip=RefPerTensorNorm(1.0))
    for step in range(10):
        grads = problem.grads(step)
        set_grads(flat(params), grads)
        opt.step()
        ref.step(grads)
    for p, r in zip(flat(params), ref.params()):
        assert_close(p.detach(), r, REFERENCE[torch.float64], "PerTensorNorm Adagrad")

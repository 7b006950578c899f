"""FusedClipAdagrad's own behaviour (the checks every optimizer shares are the
registry's: test_parity.py, test_reference.py, test_state_dict.py,
test_nonfinite.py, ...): a group's own initial_accumulator_value, state made
when a group is added, bad arguments, and a per-tensor policy over groups."""

from __future__ import annotations

import math

import pytest
import torch

import fusedclip

from helpers import Problem, assert_close, assert_unchanged, flat, set_grads, snapshot
from registry import SPECS, run_against_reference
from tolerances import REFERENCE

ADAGRAD = SPECS["Adagrad"]
# torch.optim.Adagrad takes initial_accumulator_value from its constructor only
# (a group's own value is ignored there; see test_group_initial_accumulator_value).
INIT = {"initial_accumulator_value": 0.1}


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
    opt = ADAGRAD.make_fused(problem, params, INIT)
    assert torch.equal(opt.state[params[0][0]]["sum"], torch.full((5, 3), 2.0))
    assert torch.equal(opt.state[params[1][0]]["sum"], torch.full((4, 6), 0.1))
    config = {"spec": ADAGRAD, "problem": problem, "clip": 0.5, "steps": 10, "defaults": INIT}
    run_against_reference(config)


def test_state_is_made_eagerly_like_torchs():
    """torch.optim.Adagrad makes every parameter's state when it joins (the
    state dict before any step: test_state_dict.py): a group added later
    gets its state too, with its own initial value; a bad one is refused and
    not added."""
    p = torch.nn.Parameter(torch.zeros(4))
    fopt = fusedclip.FusedClipAdagrad([{"params": [p]}, {"params": [torch.nn.Parameter(
        torch.zeros(2))]}], **INIT)
    assert torch.equal(fopt.state[p]["sum"], torch.full((4,), 0.1))
    extra = torch.nn.Parameter(torch.zeros(3))
    fopt.add_param_group({"params": [extra], "initial_accumulator_value": 0.7})
    assert torch.equal(fopt.state[extra]["sum"], torch.full((3,), 0.7))
    with pytest.raises(ValueError, match="Invalid initial_accumulator_value value: -1"):
        fopt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))],
                              "initial_accumulator_value": -1.0})
    assert len(fopt.param_groups) == 3


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


def test_per_tensor_policy_over_groups():
    """A per-tensor clip policy hands one coefficient per gradient (slices of
    its per-bucket coefficients) to the op, across groups, against the
    reference."""
    from fusedclip.reference import RefPerTensorNorm

    problem = Problem(groups=[
        {"specs": [((6, 5), "contiguous"), ((), "contiguous")], "lr": 0.05, "lr_decay": 0.1},
        {"specs": [((4, 7), "transposed"), ((33,), "contiguous")], "lr": "tensor:0.02",
         "weight_decay": 0.1},
    ], dtype=torch.float64, grad_std=2.0, none_prob=0.2, seed=29)
    params = problem.params()
    opt = ADAGRAD.make_fused(problem, params, INIT, clip=fusedclip.PerTensorNorm(1.0))
    ref = ADAGRAD.make_reference(problem, problem.params(), RefPerTensorNorm(1.0), INIT)
    for step in range(10):
        grads = problem.grads(step)
        set_grads(flat(params), grads)
        opt.step()
        ref.step(grads)
    for p, r in zip(flat(params), ref.params()):
        assert_close(p.detach(), r, REFERENCE[torch.float64], "PerTensorNorm Adagrad")

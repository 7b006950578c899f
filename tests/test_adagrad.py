"""FusedClipAdagrad's own behaviour (the checks every optimizer shares are the
registry's: test_parity.py, test_reference.py, test_state_dict.py,
test_nonfinite.py, ...): a group's own initial_accumulator_value, state made
when a group is added, and a per-tensor policy over groups (its bad arguments:
test_errors.py, from the registry)."""

from __future__ import annotations

import pytest
import torch

import fusedclip

from helpers import Problem, assert_close, flat, set_grads
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

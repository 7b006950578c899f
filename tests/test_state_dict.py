"""State dicts move between torch.optim.Adam/AdamW and FusedClipAdam/W both
ways, and training continues as if the optimizer had never changed."""

from __future__ import annotations

import copy

import pytest
import torch

import fusedclip

from conftest import (
    Problem, assert_restores_bitwise, assert_states_close, copy_params, flat, make_fused_opt,
    make_torch_opt, train_steps,
)
from tolerances import TORCH_PARITY

SPECS = [((6, 5), "contiguous"), ((4, 7), "transposed"), ((), "contiguous"), ((0,), "contiguous"),
         ((5, 6), "slice"), ((33,), "contiguous"), ((2, 3, 4, 5), "channels_last")]
CLIP = 0.5
FIRST, THEN = 5, 7  # steps before and after the hand-over


def _problem(dtype, amsgrad: bool, tensor_lr: bool) -> Problem:
    return Problem(
        groups=[
            {"specs": SPECS[:4], "lr": "tensor:0.01" if tensor_lr else 0.01, "amsgrad": amsgrad,
             "weight_decay": 0.05},
            {"specs": SPECS[4:], "lr": 0.003, "betas": (0.8, 0.99), "maximize": True,
             "amsgrad": amsgrad},
        ],
        dtype=dtype, grad_std=0.3, seed=77,
    )


CASES = [
    pytest.param(kind, dtype, amsgrad, tensor_lr,
                 id=f"{kind}-{str(dtype)[6:]}{'-ams' if amsgrad else ''}{'-lrT' if tensor_lr else ''}")
    for kind in ("Adam", "AdamW")
    for dtype in (torch.float32, torch.float64)
    for amsgrad, tensor_lr in ((False, False), (True, True))
]


@pytest.mark.parametrize("kind,dtype,amsgrad,tensor_lr", CASES)
def test_torch_state_dict_into_fused(kind, dtype, amsgrad, tensor_lr):
    """torch trains, hands its state dict to the fused optimizer, and both go on."""
    problem = _problem(dtype, amsgrad, tensor_lr)
    tparams = problem.params()
    topt = make_torch_opt(kind, problem, tparams, {})
    train_steps(topt, flat(tparams), problem, FIRST, 0, torch_side=True, max_norm=CLIP)

    fparams = problem.params()
    copy_params(tparams, fparams)
    fopt = make_fused_opt(kind, problem, fparams, {}, clip=CLIP)
    fopt.load_state_dict(copy.deepcopy(topt.state_dict()))
    assert_states_close(fopt, topt, flat(fparams), flat(tparams), TORCH_PARITY[dtype], "loaded")
    for p in flat(fparams):
        if p in fopt.state:
            assert fopt.state[p]["step"].device == p.device

    train_steps(topt, flat(tparams), problem, THEN, FIRST, torch_side=True, max_norm=CLIP)
    train_steps(fopt, flat(fparams), problem, THEN, FIRST, torch_side=False)
    assert_states_close(fopt, topt, flat(fparams), flat(tparams), TORCH_PARITY[dtype],
                        f"{THEN} steps after loading")


@pytest.mark.parametrize("kind,dtype,amsgrad,tensor_lr", CASES)
def test_fused_state_dict_into_torch(kind, dtype, amsgrad, tensor_lr):
    """The fused optimizer trains, hands its state dict to torch, and both go on."""
    problem = _problem(dtype, amsgrad, tensor_lr)
    fparams = problem.params()
    fopt = make_fused_opt(kind, problem, fparams, {}, clip=CLIP)
    train_steps(fopt, flat(fparams), problem, FIRST, 0, torch_side=False)

    tparams = problem.params()
    copy_params(fparams, tparams)
    topt = make_torch_opt(kind, problem, tparams, {})
    topt.load_state_dict(copy.deepcopy(fopt.state_dict()))
    for tg, fg in zip(topt.param_groups, fopt.param_groups):
        assert tg["decoupled_weight_decay"] == fg["decoupled_weight_decay"]
        assert tg["foreach"] is None and tg["fused"] is None and not tg["capturable"]

    train_steps(topt, flat(tparams), problem, THEN, FIRST, torch_side=True, max_norm=CLIP)
    train_steps(fopt, flat(fparams), problem, THEN, FIRST, torch_side=False)
    assert_states_close(fopt, topt, flat(fparams), flat(tparams), TORCH_PARITY[dtype],
                        f"{THEN} steps after loading")


@pytest.mark.parametrize("kind", ["Adam", "AdamW"])
def test_state_dict_layout_is_torchs(kind):
    """Same state keys, dtypes and shapes, same hyperparameter keys, as torch's."""
    problem = _problem(torch.float32, amsgrad=True, tensor_lr=False)
    tparams, fparams = problem.params(), problem.params()
    topt = make_torch_opt(kind, problem, tparams, {})
    fopt = make_fused_opt(kind, problem, fparams, {}, clip=CLIP)
    train_steps(topt, flat(tparams), problem, 2, 0, torch_side=True, max_norm=CLIP)
    train_steps(fopt, flat(fparams), problem, 2, 0, torch_side=False)
    tsd, fsd = topt.state_dict(), fopt.state_dict()
    assert tsd["state"].keys() == fsd["state"].keys()
    for index, tstate in tsd["state"].items():
        fstate = fsd["state"][index]
        assert tstate.keys() == fstate.keys()
        for key, value in tstate.items():
            assert fstate[key].dtype == value.dtype, key
            assert fstate[key].shape == value.shape, key
            assert fstate[key].device == value.device, key
    shared = {"lr", "betas", "eps", "weight_decay", "amsgrad", "maximize",
              "decoupled_weight_decay", "params"}
    for tg, fg in zip(tsd["param_groups"], fsd["param_groups"]):
        assert shared <= tg.keys() and shared <= fg.keys()
        for key in shared:
            assert tg[key] == fg[key], key


def test_state_dict_round_trip_fused():
    """A fused optimizer restored from its own state dict continues bit for bit."""
    problem = _problem(torch.float32, amsgrad=True, tensor_lr=True)
    assert_restores_bitwise(
        lambda params: make_fused_opt("Adam", problem, params, {},
                                      clip=fusedclip.GlobalNorm(0.5, "inf")),
        problem, FIRST, THEN)


def test_old_torch_checkpoint_without_decoupled_weight_decay():
    """Adam checkpoints from before torch had decoupled_weight_decay load as
    plain (L2) Adam."""
    problem = _problem(torch.float64, amsgrad=False, tensor_lr=False)
    tparams = problem.params()
    topt = make_torch_opt("Adam", problem, tparams, {})
    train_steps(topt, flat(tparams), problem, FIRST, 0, torch_side=True, max_norm=CLIP)
    sd = copy.deepcopy(topt.state_dict())
    for group in sd["param_groups"]:
        del group["decoupled_weight_decay"]
    fparams = problem.params()
    copy_params(tparams, fparams)
    fopt = make_fused_opt("Adam", problem, fparams, {}, clip=CLIP)
    fopt.load_state_dict(sd)
    train_steps(topt, flat(tparams), problem, THEN, FIRST, torch_side=True, max_norm=CLIP)
    train_steps(fopt, flat(fparams), problem, THEN, FIRST, torch_side=False)
    assert_states_close(fopt, topt, flat(fparams), flat(tparams), TORCH_PARITY[torch.float64],
                        "old checkpoint")

"""State dicts move between every fused optimizer and its torch.optim twin
both ways, with torch's keys, dtypes and layouts, and training continues as if
the optimizer had never changed; a fused optimizer restored from its own state
dict continues bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch

import fusedclip

from helpers import (
    Problem, assert_restores_bitwise, assert_states_close, bitwise_equal, copy_params, flat,
    train_steps,
)
from registry import SPECS, on_devices, spec_params
from tolerances import TORCH_PARITY

SPECS_7 = [((6, 5), "contiguous"), ((4, 7), "transposed"), ((), "contiguous"),
           ((0,), "contiguous"), ((5, 6), "slice"), ((33,), "contiguous"),
           ((2, 3, 4, 5), "channels_last")]
CLIP = 0.5
FIRST, THEN = 5, 7  # steps before and after the hand-over


def _problem(spec, dtype, tensor_lr: bool) -> Problem:
    """The spec's state dict groups over seven parameters of every layout (an
    empty and a 0-d one among them); the first group's lr a tensor if asked."""
    cuts = [0, 4, 6, 7][:len(spec.state_dict_groups)] + [7]
    groups = []
    for i, (group, a, b) in enumerate(zip(spec.state_dict_groups, cuts, cuts[1:])):
        group = dict(group, specs=SPECS_7[a:b])
        if i == 0 and tensor_lr:
            group["lr"] = f"tensor:{group['lr']}"
        groups.append(group)
    return Problem(groups=groups, dtype=dtype, grad_std=0.3, seed=77)


def _float64_steps(dtype):
    if dtype == torch.float64:
        torch.set_default_dtype(torch.float64)  # torch's float64 step counters


CASES = [pytest.param(spec, dtype, tensor_lr,
                      id=f"{spec.name}-{str(dtype)[6:]}{'-lrT' if tensor_lr else ''}")
         for spec in SPECS.values() if spec.twin is not None
         for dtype in (torch.float32, torch.float64) for tensor_lr in (False, True)]


@pytest.mark.parametrize("device,spec,dtype,tensor_lr", on_devices(CASES, lambda v: v[0]))
def test_torch_state_dict_into_fused(device, spec, dtype, tensor_lr):
    """torch trains, hands its state dict to the fused optimizer, and both go on."""
    _float64_steps(dtype)
    problem = _problem(spec, dtype, tensor_lr)
    tparams = problem.params(device)
    topt = spec.make_torch(problem, tparams, spec.ctor, device)
    train_steps(topt, flat(tparams), problem, FIRST, 0, torch_side=True, max_norm=CLIP)

    fparams = problem.params(device)
    copy_params(tparams, fparams)
    fopt = spec.make_fused(problem, fparams, spec.ctor, device, clip=CLIP)
    fopt.load_state_dict(copy.deepcopy(topt.state_dict()))
    assert_states_close(fopt, topt, flat(fparams), flat(tparams), TORCH_PARITY[dtype], "loaded")
    for p in flat(fparams):
        if "step" in fopt.state.get(p, {}):
            assert fopt.state[p]["step"].device == p.device

    train_steps(topt, flat(tparams), problem, THEN, FIRST, torch_side=True, max_norm=CLIP)
    train_steps(fopt, flat(fparams), problem, THEN, FIRST, torch_side=False)
    assert_states_close(fopt, topt, flat(fparams), flat(tparams), TORCH_PARITY[dtype],
                        f"{THEN} steps after loading")


@pytest.mark.parametrize("device,spec,dtype,tensor_lr", on_devices(CASES, lambda v: v[0]))
def test_fused_state_dict_into_torch(device, spec, dtype, tensor_lr):
    """The fused optimizer trains, hands its state dict to torch, and both go on."""
    _float64_steps(dtype)
    problem = _problem(spec, dtype, tensor_lr)
    fparams = problem.params(device)
    fopt = spec.make_fused(problem, fparams, spec.ctor, device, clip=CLIP)
    train_steps(fopt, flat(fparams), problem, FIRST, 0, torch_side=False)

    tparams = problem.params(device)
    copy_params(fparams, tparams)
    topt = spec.make_torch(problem, tparams, spec.ctor, device)
    topt.load_state_dict(copy.deepcopy(fopt.state_dict()))
    for tg, fg in zip(topt.param_groups, fopt.param_groups):
        for key in spec.hyper:
            if key in tg and not isinstance(tg[key], torch.Tensor):
                assert tg[key] == fg[key], key
        assert tg["foreach"] is None and tg["fused"] is None and not tg.get("capturable")
    tsd, fsd = topt.state_dict(), fopt.state_dict()
    assert tsd["state"].keys() == fsd["state"].keys()
    for index, state in tsd["state"].items():
        assert state.keys() == fsd["state"][index].keys()

    train_steps(topt, flat(tparams), problem, THEN, FIRST, torch_side=True, max_norm=CLIP)
    train_steps(fopt, flat(fparams), problem, THEN, FIRST, torch_side=False)
    assert_states_close(fopt, topt, flat(fparams), flat(tparams), TORCH_PARITY[dtype],
                        f"{THEN} steps after loading")


@pytest.mark.parametrize("spec", spec_params(twin=True))
def test_state_dict_layout_is_torchs(spec):
    """Same state keys, dtypes, shapes and devices, same hyperparameter keys
    and values, as torch's."""
    problem = _problem(spec, torch.float32, tensor_lr=False)
    tparams, fparams = problem.params(), problem.params()
    topt = spec.make_torch(problem, tparams, spec.ctor)
    fopt = spec.make_fused(problem, fparams, spec.ctor, clip=CLIP)
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
    shared = set(spec.hyper) | {"params"}
    for tg, fg in zip(tsd["param_groups"], fsd["param_groups"]):
        assert shared <= tg.keys() and shared <= fg.keys()
        for key in shared:
            assert tg[key] == fg[key], key


@pytest.mark.parametrize("spec", spec_params(twin=True))
def test_state_dict_before_the_first_step_is_torchs(spec):
    """Before any step the state dict holds what torch's holds (nothing, or
    for state made eagerly, as torch.optim.Adagrad makes it, the same keys,
    dtypes, shapes and values), and it loads into torch, which then trains."""
    problem = _problem(spec, torch.float32, tensor_lr=False)
    tparams, fparams = problem.params(), problem.params()
    topt = spec.make_torch(problem, tparams, spec.ctor)
    fopt = spec.make_fused(problem, fparams, spec.ctor)
    tsd, fsd = topt.state_dict(), fopt.state_dict()
    assert tsd["state"].keys() == fsd["state"].keys()
    if spec.eager_state:
        assert fsd["state"].keys() == set(range(len(flat(fparams))))
    for index, tstate in tsd["state"].items():
        fstate = fsd["state"][index]
        assert tstate.keys() == fstate.keys() == {"step", *spec.state_keys}
        for key, value in tstate.items():
            assert bitwise_equal(fstate[key], value), key
    shared = set(spec.hyper) | {"params"}
    for tg, fg in zip(tsd["param_groups"], fsd["param_groups"]):
        for key in shared & tg.keys():
            assert tg[key] == fg[key], key
    t3 = problem.params()
    topt3 = spec.make_torch(problem, t3, spec.ctor)
    topt3.load_state_dict(copy.deepcopy(fsd))
    before = [p.detach().clone() for p in flat(t3)]
    train_steps(topt3, flat(t3), problem, 1, 0, True)
    assert any(not torch.equal(p.detach(), b) for p, b in zip(flat(t3), before) if p.numel())


@pytest.mark.parametrize("spec", spec_params())
def test_state_dict_round_trip_fused_is_bitwise(spec):
    """A fused optimizer restored from its own state dict continues bit for bit."""
    problem = _problem(spec, torch.float32, tensor_lr=True)
    assert_restores_bitwise(
        lambda params: spec.make_fused(problem, params, spec.ctor,
                                       clip=fusedclip.GlobalNorm(0.5, "inf")),
        problem, FIRST, THEN)


def test_old_torch_checkpoint_without_decoupled_weight_decay():
    """Adam checkpoints from before torch had decoupled_weight_decay load as
    plain (L2) Adam."""
    spec = SPECS["Adam"]
    problem = _problem(spec, torch.float64, tensor_lr=False)
    tparams = problem.params()
    topt = spec.make_torch(problem, tparams)
    train_steps(topt, flat(tparams), problem, FIRST, 0, torch_side=True, max_norm=CLIP)
    sd = copy.deepcopy(topt.state_dict())
    for group in sd["param_groups"]:
        del group["decoupled_weight_decay"]
    fparams = problem.params()
    copy_params(tparams, fparams)
    fopt = spec.make_fused(problem, fparams, clip=CLIP)
    fopt.load_state_dict(sd)
    train_steps(topt, flat(tparams), problem, THEN, FIRST, torch_side=True, max_norm=CLIP)
    train_steps(fopt, flat(fparams), problem, THEN, FIRST, torch_side=False)
    assert_states_close(fopt, topt, flat(fparams), flat(tparams), TORCH_PARITY[torch.float64],
                        "old checkpoint")

"""The layout a step gathers and checks (fusedclip.optim.layout) is kept
across steps: an unchanged one is not gathered again, and every change that
the kept one would get wrong makes the next step gather afresh, with exactly
the result of a fresh optimizer."""

from __future__ import annotations

import copy

import pytest
import torch

import fusedclip
from fusedclip.optim import layout

SHAPES = [(3, 4), (5,), (), (2, 3), (7,), (1,)]


@pytest.fixture
def gathers(monkeypatch) -> list:
    """One entry per call of layout.gather (the step's check of every parameter)."""
    calls = []
    original = layout.gather

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(layout, "gather", counting)
    return calls


def make_params(dtype=torch.float32, seed=0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in SHAPES]


def set_grads(params, step: int, skip=()) -> None:
    """Fresh gradient tensors, as backward() after zero_grad() makes them."""
    gen = torch.Generator().manual_seed(1000 + step)
    for i, p in enumerate(params):
        g = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        p.grad = None if i in skip else g


def train(opt, params, steps: int, start: int = 0, skip=()) -> None:
    for step in range(start, start + steps):
        set_grads(params, step, skip)
        opt.step()
        opt.zero_grad()


def assert_same(opt, fresh) -> None:
    """Bit for bit the same parameters and state."""
    for group, fresh_group in zip(opt.param_groups, fresh.param_groups, strict=True):
        for p, q in zip(group["params"], fresh_group["params"], strict=True):
            assert torch.equal(p, q)
            assert opt.state.get(p, {}).keys() == fresh.state.get(q, {}).keys()
            for key, value in opt.state.get(p, {}).items():
                assert torch.equal(value, fresh.state[q][key]), key
    for key, value in opt.clip_stats.items():
        assert torch.equal(value, fresh.clip_stats[key]) or (
            value.isnan().all() and fresh.clip_stats[key].isnan().all()), key


def step_both(opt, gathers) -> None:
    """Steps ``opt`` (whose layout just changed) and a fresh copy of it made
    now (which has no layout kept); checks that ``opt`` gathered again."""
    fresh = copy.deepcopy(opt)  # parameters and state copied; no layout kept
    for group, fresh_group in zip(opt.param_groups, fresh.param_groups):
        for p, q in zip(group["params"], fresh_group["params"]):
            q.grad = None if p.grad is None else p.grad.clone()  # deepcopy drops them
    before = len(gathers)
    opt.step()
    assert len(gathers) == before + 1, "the changed layout was not gathered again"
    fresh.step()
    assert_same(opt, fresh)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_unchanged_layout_is_gathered_once(gathers, set_to_none):
    params = make_params()
    opt = fusedclip.FusedClipAdamW(params, lr=0.1, clip=1.0)
    fresh_params = make_params()
    reference = fusedclip.FusedClipAdamW(fresh_params, lr=0.1, clip=1.0)
    for step in range(5):
        for ps, o in ((params, opt), (fresh_params, reference)):
            set_grads(ps, step)
            o.step()
            o.zero_grad(set_to_none=set_to_none)
        reference._forget_layout()  # gathers every step
    assert len(gathers) == 1 + 5
    assert_same(opt, reference)


def test_gradient_goes_away_and_comes_back(gathers):
    params = make_params()
    opt = fusedclip.FusedClipAdamW(params, lr=0.1, clip=1.0)
    train(opt, params, 3)
    set_grads(params, 3, skip=(1, 4))
    step_both(opt, gathers)
    set_grads(params, 4)
    step_both(opt, gathers)


def test_parameter_replaced_in_its_group(gathers):
    params = make_params()
    opt = fusedclip.FusedClipAdamW(params, lr=0.1, clip=fusedclip.PerTensorNorm(0.5))
    train(opt, params, 3)
    replacement = torch.nn.Parameter(torch.randn(SHAPES[2]))
    opt.param_groups[0]["params"][2] = replacement  # the same list, one element new
    params[2] = replacement
    set_grads(params, 3)
    step_both(opt, gathers)


def add_group(opt, params):
    opt.add_param_group({"params": params[4:], "lr": 0.01})


def replace_group(opt, params):
    # The same parameters in a new group dict: its hyperparameters apply.
    opt.param_groups[0] = dict(opt.param_groups[0], lr=0.01)


def new_policy(opt, params):
    opt.clip = fusedclip.AGC(0.05)


def load_state(opt, params):
    opt.load_state_dict(opt.state_dict())


@pytest.mark.parametrize("change, clip, first", [
    (add_group, lambda: 1.0, 4),
    (replace_group, lambda: 1.0, None),
    (new_policy, lambda: 1.0, None),
    (load_state, fusedclip.ZClip, None),
], ids=["new_param_group", "param_group_replaced", "new_policy", "state_loaded"])
def test_groups_policy_or_state_changed(gathers, change, clip, first):
    """After a change of param groups, policy or state, the next step gathers
    again (the first `first` parameters trained before it)."""
    params = make_params()
    opt = fusedclip.FusedClipAdamW(params[:first], lr=0.1, clip=clip())
    train(opt, params[:first], 3)
    change(opt, params)
    set_grads(params, 3)
    step_both(opt, gathers)


def test_dtype_change(gathers):
    # Stateless (SGD without momentum), so that the float32 state of the old
    # dtype does not stand in the way; as Module.double() does it.
    params = make_params()
    opt = fusedclip.FusedClipSGD(params, lr=0.1, clip=1.0)
    train(opt, params, 3)
    for p in params:
        p.data = p.data.double()
    set_grads(params, 3)
    step_both(opt, gathers)
    assert all(p.dtype == torch.float64 for p in params)


def test_device_change_is_checked(gathers):
    # A move to a device the fused ops do not run on is refused, as at the
    # first step, and not silently sent to the old device's kernels.
    params = make_params()
    opt = fusedclip.FusedClipAdamW(params, lr=0.1, clip=1.0)
    train(opt, params, 3)
    for p in params:
        # The same Parameter object, now on another device (as Module.to()
        # does under torch.__future__.set_swap_module_params_on_conversion).
        torch.utils.swap_tensors(p, torch.nn.Parameter(p.detach().to("meta")))
        p.grad = torch.zeros_like(p)
    with pytest.raises(RuntimeError, match="supported devices"):
        opt.step()


def test_sparse_gradient_after_steps_is_checked(gathers):
    params = make_params()
    opt = fusedclip.FusedClipAdamW(params, lr=0.1, nonfinite="propagate")
    train(opt, params, 3)
    set_grads(params, 3)
    params[0].grad = params[0].grad.to_sparse()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()

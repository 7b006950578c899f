"""FusedClipLion and SpikeClip: the two additions of the "one house" issue.

Lion has no torch.optim twin: it is checked against its float64 reference
(fusedclip/reference.py, ReferenceLion) with every clip policy, the
non-finite rule, GradScaler and a state_dict here, and by the registry's
generic tests (tests/registry.py: trajectories against the reference, state
dicts, the non-finite rule, torch.compile, opcheck, its op's contract) like
every optimizer. SpikeClip (SPAM's
spike clipping) is checked against RefSpikeClip with FusedClipAdam/AdamW,
and refused by the optimizers that keep no second moment.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import fusedclip
from fusedclip.reference import (
    RefAGC, RefSpikeClip, RefValueClip, ReferenceAdam, ReferenceLion,
)

from tolerances import REFERENCE

SHAPES = [(7,), (33, 17), (), (0,), (40000,), (5, 4, 3)]


def _params(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype))
            for s in SHAPES]


def _grads(params, step, scale=1.0, nan_at=None):
    gen = torch.Generator().manual_seed(100 + step)
    grads = []
    for i, p in enumerate(params):
        g = torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale
        if step == nan_at and i == 0:
            g[0] = math.nan
        grads.append(g.to(p.dtype))
    return grads


def _assert_close(actual, expected, dtype, what):
    rtol, atol = REFERENCE[dtype]
    scale = max((e.abs().max().item() for e in expected if e.numel()), default=1.0)
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a.detach().double(), e, rtol=rtol, atol=atol * scale,
                                   msg=lambda m: f"{what} [{i}]: {m}")


LION_CLIPS = {
    "none": (None, None),
    "GlobalNorm": (1.0, 1.0),
    "ValueClip": (fusedclip.ValueClip(0.3), RefValueClip(0.3)),
    "AGC": (fusedclip.AGC(0.05), RefAGC(0.05)),
}


@pytest.mark.parametrize("clip", list(LION_CLIPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("options", [dict(), dict(weight_decay=0.5, betas=(0.8, 0.95)),
                                     dict(maximize=True, lr=torch.tensor(3e-3))],
                         ids=["default", "wd-betas", "maximize-lr-tensor"])
def test_lion_matches_its_reference(options, dtype, clip):
    params = _params(dtype)
    policy, ref_policy = copy.deepcopy(LION_CLIPS[clip])
    hyper = dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.0, maximize=False)
    hyper.update(options)
    opt = fusedclip.FusedClipLion(params, clip=policy, **hyper)
    ref = ReferenceLion([dict(hyper, params=params, lr=float(hyper["lr"]))], clip=ref_policy,
                        round_to=dtype if dtype == torch.bfloat16 else None)
    for step in range(8):
        grads = _grads(params, step, nan_at=5)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        ref.step(grads)
        _assert_close(params, ref.params(), dtype, f"Lion {clip} step {step}")
        _assert_close([opt.state[p]["exp_avg"] for p in params],
                      [ref.states[(0, i)]["exp_avg"] for i in range(len(params))],
                      dtype, f"Lion exp_avg step {step}")
    assert int(opt.clip_stats["skipped"]) == ref.skipped == 1


def test_lion_under_a_grad_scaler_and_through_a_state_dict():
    params, twin = _params(torch.float32), _params(torch.float32)
    opt = fusedclip.FusedClipLion(params, lr=1e-3, weight_decay=0.1, clip=0.5)
    other = fusedclip.FusedClipLion(twin, lr=1e-3, weight_decay=0.1, clip=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for step in range(6):
        grads = _grads(params, step)
        opt.zero_grad()
        loss = sum((p * g).sum() for p, g in zip(params, grads))
        scaler.scale(loss).backward()  # gradients g * 1024
        scaler.step(opt)  # unscaled inside the step
        scaler.update()
        for q, g in zip(twin, grads):
            q.grad = g.clone()
        other.step()
    for p, q in zip(params, twin):
        assert torch.equal(p, q)
    restored = fusedclip.FusedClipLion(_params(torch.float32, seed=3), lr=1e-3)
    restored.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert all(torch.equal(restored.state[a]["exp_avg"], opt.state[b]["exp_avg"])
               for a, b in zip(restored.param_groups[0]["params"], params))


def test_lion_refuses_bad_hyperparameters():
    with pytest.raises(ValueError, match="Invalid beta parameter at index 1: 1.5"):
        fusedclip.FusedClipLion(None, betas=(0.9, 1.5))
    with pytest.raises(ValueError, match="Invalid weight_decay value: -1"):
        fusedclip.FusedClipLion(_params(torch.float32), weight_decay=-1)
    # (the op's own checks: test_ops.py::test_update_op_errors[lion-...])


# -- SpikeClip ---------------------------------------------------------------------------------
@pytest.mark.parametrize("decoupled", [False, True], ids=["Adam", "AdamW"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("theta", [2.0, 50.0])
def test_spike_clip_matches_its_reference(theta, dtype, decoupled):
    """Spikes (a step of 20x gradients) are clipped against v as it was before
    the step; a first step (v = 0) passes; skipped steps change nothing."""
    params = _params(dtype)
    hyper = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, amsgrad=False,
                 maximize=decoupled, decoupled_weight_decay=decoupled)
    cls = fusedclip.FusedClipAdamW if decoupled else fusedclip.FusedClipAdam
    kwargs = {k: v for k, v in hyper.items() if k != "decoupled_weight_decay" or not decoupled}
    if decoupled:
        kwargs.pop("decoupled_weight_decay", None)
    opt = cls(params, clip=fusedclip.SpikeClip(theta), **kwargs)
    ref = ReferenceAdam([dict(hyper, params=params)], clip=RefSpikeClip(theta),
                        round_to=dtype if dtype == torch.bfloat16 else None)
    clipped_some = False
    for step in range(8):
        grads = _grads(params, step, scale=20.0 if step in (3, 6) else 1.0, nan_at=5)
        for p, g in zip(params, grads):
            p.grad = g
        if step == 3:
            v = [opt.state[p]["exp_avg_sq"].double() for p in params]
            clipped_some = any(bool(((g.double() ** 2) > theta * x)[x > 0].any())
                               for g, x in zip(grads, v) if g.numel())
        opt.step()
        ref.step(grads)
        _assert_close(params, ref.params(), dtype, f"SpikeClip({theta}) step {step}")
    assert clipped_some, "the test must clip a spike"
    assert int(opt.clip_stats["skipped"]) == 1 and float(opt.clip_stats["clip_coef"]) == 1.0


def test_spike_clip_changes_only_spikes():
    """Without a spike, SpikeClip is the plain step bit for bit. (theta is huge:
    after one step v is only (1 - beta2) g^2, and a normal gradient that was
    tiny in the first step is a spike in the second for theta = 1e6.)"""
    a, b = _params(torch.float32), _params(torch.float32)
    clipped = fusedclip.FusedClipAdamW(a, lr=1e-3, clip=fusedclip.SpikeClip(1e30))
    plain = fusedclip.FusedClipAdamW(b, lr=1e-3)
    for step in range(5):
        for p, q, g in zip(a, b, _grads(a, step)):
            p.grad, q.grad = g, g.clone()
        clipped.step()
        plain.step()
    assert all(torch.equal(p, q) for p, q in zip(a, b))


@pytest.mark.parametrize("cls", [fusedclip.FusedClipSGD, fusedclip.FusedClipAdagrad,
                                 fusedclip.FusedClipLion])
def test_spike_clip_needs_a_second_moment(cls):
    with pytest.raises(ValueError, match="reads the optimizer state 'exp_avg_sq'"):
        cls(_params(torch.float32), lr=0.1, clip=fusedclip.SpikeClip())
    opt = cls(_params(torch.float32), lr=0.1)
    with pytest.raises(ValueError, match="reads the optimizer state 'exp_avg_sq'"):
        opt.clip = fusedclip.SpikeClip()
    # (the ops of rules without a second moment refuse spike_theta:
    # test_ops.py::test_update_op_errors[<rule>-spike-without-second-moment])


def test_spike_clip_arguments():
    assert repr(fusedclip.SpikeClip()) == "SpikeClip(theta=5000.0)"
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="theta"):
            fusedclip.SpikeClip(bad)
    with pytest.raises(TypeError, match="theta"):
        fusedclip.SpikeClip("5000")

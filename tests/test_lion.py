"""FusedClipLion's own behaviour (the checks every optimizer shares are the
registry's: test_reference.py, test_state_dict.py, test_nonfinite.py,
test_compile.py, test_ops.py, ...; its clip policies: test_policies.py;
its bad arguments: test_errors.py). Lion has no torch.optim twin, so
test_amp.py's GradScaler recipe, which compares with torch, leaves it out:
here a GradScaler drives it."""

from __future__ import annotations

import copy

import torch

from registry import SPECS

LION = SPECS["Lion"]
SHAPES = [(7,), (33, 17), (), (0,), (40000,), (5, 4, 3)]


def _params(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype))
            for s in SHAPES]


def _grads(params, step):
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) for p in params]


def test_lion_under_a_grad_scaler_and_through_a_state_dict():
    """scaler.step(opt) unscales inside the fused step: the parameters are bit
    for bit those of the same optimizer given the unscaled gradients; its
    state_dict loads into a new optimizer."""
    params, twin = _params(torch.float32), _params(torch.float32)
    opt = LION.fused(params, lr=1e-3, weight_decay=0.1, clip=0.5)
    other = LION.fused(twin, lr=1e-3, weight_decay=0.1, clip=0.5)
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
    restored = LION.fused(_params(torch.float32, seed=3), lr=1e-3)
    restored.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert all(torch.equal(restored.state[a]["exp_avg"], opt.state[b]["exp_avg"])
               for a, b in zip(restored.param_groups[0]["params"], params))

"""Mixed precision: torch.amp.GradScaler with bfloat16 and float16 autocast,
on the CPU and (with a GPU and the CUDA kernels) on CUDA, for every optimizer with a torch.optim twin, against torch's
recipe

    scaler.scale(loss).backward(); scaler.unscale_(opt)
    clip_grad_norm_(params, max_norm); scaler.step(opt); scaler.update()

with the fused optimizer (clip=max_norm) run both ways: the user calls
scaler.unscale_(opt) first (the optimizer then gets no grad_scale: nothing is
unscaled twice), or leaves it out (the fused step unscales as it reads). One
step's input holds an inf: the scaler skips it on both sides and lowers its
scale; growth_interval=2 makes it grow again."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import assert_close, bitwise_equal
from registry import on_devices, spec_params
from tolerances import TORCH_PARITY

MAX_NORM = 0.5
STEPS = 8
INF_STEP = 3


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.GELU(), torch.nn.Linear(32, 5))


def _batch(step: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(16, 12, generator=gen) * 3
    y = torch.randn(16, 5, generator=gen)
    if step == INF_STEP:
        x[2, 4] = math.inf
    return x.to(device), y.to(device)


def _loss(model, x, y, amp_dtype):
    with torch.autocast(x.device.type, dtype=amp_dtype):
        out = model(x)
    return torch.nn.functional.mse_loss(out.float(), y)


@pytest.mark.parametrize("user_unscales", [True, False], ids=["unscale_", "no-unscale_"])
@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("device,spec", on_devices(spec_params(twin=True), lambda v: v[0]))
def test_grad_scaler_recipe(device, spec, amp_dtype, user_unscales):
    kind = spec.name
    tmodel, fmodel = _model(0).to(device), _model(0).to(device)
    topt = spec.twin(tmodel.parameters(), foreach=False, **spec.example, **spec.ctor)
    fopt = spec.fused(fmodel.parameters(), clip=MAX_NORM, **spec.example, **spec.ctor)
    tscaler = torch.amp.GradScaler(device, init_scale=2.0**12, growth_interval=2)
    fscaler = torch.amp.GradScaler(device, init_scale=2.0**12, growth_interval=2)
    clipped = 0
    for step in range(STEPS):
        x, y = _batch(step, device)
        before = [p.detach().clone() for p in fmodel.parameters()]
        scale = fscaler.get_scale()

        tscaler.scale(_loss(tmodel, x, y, amp_dtype)).backward()
        tscaler.unscale_(topt)
        norm = torch.nn.utils.clip_grad_norm_(tmodel.parameters(), MAX_NORM)
        tscaler.step(topt)
        tscaler.update()

        fscaler.scale(_loss(fmodel, x, y, amp_dtype)).backward()
        if user_unscales:
            fscaler.unscale_(fopt)
        fscaler.step(fopt)
        fscaler.update()

        what = f"{kind} {amp_dtype} step {step}"
        assert fscaler.get_scale() == tscaler.get_scale(), what
        if step == INF_STEP:  # skipped on both sides
            assert not math.isfinite(float(norm)), what
            for p, b in zip(fmodel.parameters(), before):
                assert bitwise_equal(p.detach(), b), what
            assert fscaler.get_scale() == scale / 2, what
            scale_after_inf = fscaler.get_scale()
        else:
            clipped += float(norm) > MAX_NORM
            # The fused norm is the unscaled gradients' norm, as torch's.
            assert_close(fopt.clip_stats["grad_norm"].double(), norm.double(),
                         TORCH_PARITY[torch.float32], f"{what} grad_norm")
        for tp, fp in zip(tmodel.parameters(), fmodel.parameters()):
            assert_close(fp.detach(), tp.detach(), TORCH_PARITY[torch.float32], what)
        topt.zero_grad()
        fopt.zero_grad()
    assert clipped >= 3  # the clipping was exercised
    assert fscaler.get_scale() > scale_after_inf  # and the scale grew back
    for p, p0 in zip(fmodel.parameters(), _model(0).to(device).parameters()):
        assert not torch.equal(p.detach(), p0.detach())  # every parameter was trained

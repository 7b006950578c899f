"""No host sync in a CUDA step: every optimizer with every clip policy steps
under ``torch.cuda.set_sync_debug_mode("error")``, which raises on any
synchronizing call (``.item()``, a pageable host-to-device copy, ...).

Runs only on a GPU with the CUDA kernels built (docs/GPU_RUNBOOK.md); on the
CPU, tests/test_policies.py::test_step_reads_no_device_value checks the Python
side the same way for every policy.
"""

from __future__ import annotations

import math

import pytest
import torch

import fusedclip


def _cuda_kernels_built() -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("fusedclip::adam_", "CUDA")
    except Exception:
        return False


pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.skipif(not _cuda_kernels_built(), reason="fusedclip._C has no CUDA kernels"),
]

OPTIMIZERS = {
    "Adam": lambda ps, **kw: fusedclip.FusedClipAdam(ps, lr=1e-3, amsgrad=True, **kw),
    "AdamW": lambda ps, **kw: fusedclip.FusedClipAdamW(ps, lr=1e-3, **kw),
    "SGD": lambda ps, **kw: fusedclip.FusedClipSGD(ps, lr=1e-2, momentum=0.9, **kw),
    "Adagrad": lambda ps, **kw: fusedclip.FusedClipAdagrad(ps, lr=1e-2, **kw),
    "Lion": lambda ps, **kw: fusedclip.FusedClipLion(ps, lr=1e-4, **kw),
}
POLICIES = {
    "none": lambda: None,
    "GlobalNorm": lambda: 1.0,
    "GlobalNorm-inf": lambda: fusedclip.GlobalNorm(1.0, norm_type=math.inf),
    "PerTensorNorm": lambda: fusedclip.PerTensorNorm(0.5),
    "SmoothClip": lambda: fusedclip.SmoothClip(2.0),
    "Normalize": lambda: fusedclip.Normalize(),
    "AutoClip": lambda: fusedclip.AutoClip(history=16),
    "ZClip": lambda: fusedclip.ZClip(warmup_steps=2),
    "AdaGC": lambda: fusedclip.AdaGC(warmup_steps=2),
    "ValueClip": lambda: fusedclip.ValueClip(0.1),
    "AGC": lambda: fusedclip.AGC(0.05),
    "SpikeClip": lambda: fusedclip.SpikeClip(),
}


@pytest.mark.parametrize("lr_kind", ["float", "cuda-tensor", "cpu-tensor"])
@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_cuda_step_never_syncs(kind, policy, lr_kind):
    if policy == "SpikeClip" and kind not in ("Adam", "AdamW"):
        pytest.skip("SpikeClip needs a second moment")
    gen = torch.Generator().manual_seed(0)
    shapes = [(64, 33), (33,), (), (7, 5, 3)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).cuda()) for s in shapes]
    # A second dtype bucket: per-tensor and per-unit coefficients are sliced
    # and reordered across buckets.
    params.append(torch.nn.Parameter(torch.randn(17, 4, generator=gen).to(torch.bfloat16).cuda()))
    opt = OPTIMIZERS[kind](params, clip=POLICIES[policy]())
    if lr_kind != "float":
        device = "cuda" if lr_kind == "cuda-tensor" else "cpu"
        for group in opt.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]), device=device)
    grads = [[torch.randn(p.shape, generator=gen).to(p.dtype).cuda() for p in params]
             for _ in range(4)]
    grads[2][0].view(-1)[0] = math.nan  # one skipped step
    for p, g in zip(params, grads[0]):
        p.grad = g.clone()
    opt.step()  # the first step makes the state (allocations are not syncs, but keep them out)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(1, 4):
            for p, g in zip(params, grads[step]):
                p.grad.copy_(g)
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert int(opt.clip_stats["skipped"]) == 1

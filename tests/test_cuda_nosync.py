"""No host sync in a CUDA step: every optimizer of the registry with every
clip policy it takes steps under ``torch.cuda.set_sync_debug_mode("error")``,
which raises on any synchronizing call (``.item()``, a pageable host-to-device
copy, ...).

Runs only on a GPU with the CUDA kernels built (docs/GPU_RUNBOOK.md); on the
CPU, tests/test_policies.py::test_step_reads_no_device_value checks the Python
side the same way for every policy, and the "cpu" instances of
tests/test_nonfinite.py::test_skip_reads_no_device_value every optimizer.
"""

from __future__ import annotations

import pytest
import torch

from helpers import cuda_skips
from registry import POLICY_CASES, SPECS, step_ops

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


def _cases():
    for spec in SPECS.values():
        for policy in spec.policies:
            yield pytest.param(spec, policy, id=f"{spec.name}-{policy}",
                               marks=cuda_skips(step_ops(spec)))


@pytest.mark.parametrize("lr_kind", ["float", "cuda-tensor", "cpu-tensor"])
@pytest.mark.parametrize("spec,policy", list(_cases()))
def test_cuda_step_never_syncs(spec, policy, lr_kind):
    import math

    gen = torch.Generator().manual_seed(0)
    shapes = [(64, 33), (33,), (), (7, 5, 3)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).cuda()) for s in shapes]
    # A second dtype bucket: per-tensor and per-unit coefficients are sliced
    # and reordered across buckets.
    params.append(torch.nn.Parameter(torch.randn(17, 4, generator=gen).to(torch.bfloat16).cuda()))
    opt = spec.fused(params, clip=POLICY_CASES[policy](), **spec.example, **spec.ctor)
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

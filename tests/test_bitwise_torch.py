"""Bit for bit torch's fused CPU step, where the maths is the same.

With ``clip=None`` and identical parameters, gradients and state, every fused
optimizer gives exactly the parameters and state of its torch.optim twin with
``fused=True``, for every option, on the CPU: float32 and float64 always;
bfloat16 and float16 for Adam and AdamW, and for Adagrad where its
hyperparameters are representable in the parameter's dtype. The option sets
are the registry's (tests/registry.py, ``OptimizerSpec.bitwise``).

Where it cannot be bitwise, and why (README, "Differences from torch.optim"):

- Adagrad, bfloat16/float16: torch 2.13's fused CPU kernel rounds lr, eps and
  weight_decay to the parameter's dtype in its vector loop (not in its scalar
  tail); fusedclip keeps them in float32. Equal once they are representable.
- SGD, bfloat16/float16: torch 2.13's fused CPU kernel leaves the vector part of
  such parameters unchanged (pytorch/pytorch#191763, fixed after 2.13). These
  are checked against the float64 reference in test_reference.py instead.

The sizes cover every tail length of the vector loops (torch runs the last
``numel % width`` elements through scalar code, which rounds SGD's momentum
blend its own way: csrc/include/fusedclip/sgd.h).
"""

from __future__ import annotations

import pytest
import torch

from registry import SPECS, spec_params

# Every tail length of a 16-wide (float32, AVX-512) and 8-wide vector loop,
# full vectors before a tail, a 2-D and a 0-d parameter, and one tensor longer
# than a CPU chunk (16384 elements) with a tail.
SHAPES = [(n,) for n in range(1, 34)] + [(16384 * 2 + 13,), (33, 17), ()]
STEPS = 4


def _id(case) -> str:
    spec, kwargs = case
    return spec.twin.__name__ + "-" + "-".join(f"{k}={v}" for k, v in kwargs.items())


# The registry's option sets (OptimizerSpec.bitwise) of every optimizer with a twin.
TWINNED = [s for s in SPECS.values() if s.twin is not None]
FULL_PRECISION = [(s, kwargs) for s in TWINNED for kwargs in s.bitwise(False)]
LOW_PRECISION = [(s, kwargs) for s in TWINNED for kwargs in s.bitwise(True)]


def run_both(spec, kwargs, dtype, *, lr_tensor=False):
    gen = torch.Generator().manual_seed(0)
    values = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in SHAPES]
    ours = [torch.nn.Parameter(v.clone()) for v in values]
    theirs = [torch.nn.Parameter(v.clone()) for v in values]
    kwargs = dict(kwargs)
    if lr_tensor:
        kwargs["lr"] = torch.tensor(kwargs["lr"])
    torch_opt = spec.twin(theirs, fused=True, **kwargs)
    fused_opt = spec.fused(ours, **kwargs)
    for _ in range(STEPS):
        for a, b in zip(ours, theirs):
            g = torch.randn(a.shape, generator=gen, dtype=torch.float64).to(dtype)
            a.grad, b.grad = g.clone(), g.clone()
        torch_opt.step()
        fused_opt.step()
    return (ours, fused_opt), (theirs, torch_opt)


def assert_bitwise(ours, theirs) -> None:
    (our_params, our_opt), (their_params, their_opt) = ours, theirs
    for i, (a, b) in enumerate(zip(our_params, their_params)):
        where = f"parameter {i} of shape {tuple(a.shape)}"
        assert torch.equal(a, b), f"{where}: {(a != b).sum().item()} elements differ"
        for key, value in their_opt.state[b].items():
            mine = our_opt.state[a][key]
            assert torch.equal(mine.to(value.device), value), f"{where}: state {key!r} differs"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", FULL_PRECISION, ids=_id)
def test_bitwise_torch_fused(case, dtype):
    assert_bitwise(*run_both(*case, dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", LOW_PRECISION, ids=_id)
def test_bitwise_torch_fused_low_precision(case, dtype):
    assert_bitwise(*run_both(*case, dtype))


@pytest.mark.parametrize("spec", spec_params(twin=True))
def test_bitwise_with_tensor_lr(spec):
    assert_bitwise(*run_both(spec, spec.bitwise_tensor_lr, torch.float32, lr_tensor=True))


def test_adagrad_low_precision_deviation_is_the_hyperparameter_rounding():
    """The one bf16 Adagrad difference named above, pinned: with lr and eps
    that bfloat16 cannot hold, the results differ (with representable ones
    they are equal: test_bitwise_torch_fused_low_precision). If this fails,
    torch stopped rounding them, and Adagrad's low-precision option sets
    (registry._adagrad_bitwise) can be its full-precision ones."""
    adagrad = SPECS["Adagrad"]
    (ours, _), (theirs, _) = run_both(adagrad, adagrad.bitwise(False)[0], torch.bfloat16)
    long = SHAPES.index((16384 * 2 + 13,))
    assert not torch.equal(ours[long], theirs[long])

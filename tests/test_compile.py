"""torch.compile(opt.step, fullgraph=True), for every fused optimizer: the step
traces without a graph break and gives what the eager step gives, on the CPU
and (with a GPU and the CUDA kernels) on CUDA.

On the CPU the first compile costs a few seconds (later ones hit inductor's
cache); the cases here are small.
"""

from __future__ import annotations

import math

import pytest
import torch

import fusedclip

from helpers import (
    assert_same_optimizers, assert_states_close, assert_unchanged, make_params,
    params_of, set_step_grads, snapshot,
)
from registry import POLICY_CASES, SPECS, on_devices, spec_params
from tolerances import TORCH_PARITY

# Small, with a 0-d, an empty, a transposed and a strided parameter.
COMPILE_SPECS = [((7,), "contiguous"), ((4, 5), "transposed"), ((), "contiguous"),
                 ((0,), "contiguous"), ((3, 6), "slice"), ((33,), "contiguous")]


def make_opt(spec, params, *, lr_tensor: bool, **kwargs):
    """The spec's example optimizer over `params`, lr 0.01 (a tensor on the
    parameters' device if asked), clip=1.0 unless given."""
    device = params[0].device
    hyper = dict(spec.example, **spec.ctor)
    hyper["lr"] = torch.tensor(0.01, device=device) if lr_tensor else 0.01
    kwargs.setdefault("clip", 1.0)
    return spec.fused(params, **hyper, **kwargs)


def run_compiled_vs_eager(spec, device, *, dtype=torch.float32, lr_tensor=False, steps=3,
                          eager_first=True, poison_step=None, opt_kwargs=None):
    """Runs `steps` steps eagerly on one parameter set and through
    torch.compile(opt.step, fullgraph=True) on another, with the same
    gradients (a NaN in step `poison_step`); returns both (params, opt) pairs.

    With `eager_first`, both first take one eager step, so the compiled step
    finds its state initialized; after its first call it must not recompile.
    """
    opt_kwargs = opt_kwargs or {}
    eager_p = make_params(COMPILE_SPECS, dtype, device=device)
    comp_p = make_params(COMPILE_SPECS, dtype, device=device)
    eager = make_opt(spec, eager_p, lr_tensor=lr_tensor, **opt_kwargs)
    comp = make_opt(spec, comp_p, lr_tensor=lr_tensor, **opt_kwargs)
    torch._dynamo.reset()
    compiled = torch.compile(comp.step, fullgraph=True)
    for step in range(steps):
        set_step_grads(eager_p, step, nan_at=poison_step, in_place=True)
        set_step_grads(comp_p, step, nan_at=poison_step, in_place=True)
        eager.step()
        if eager_first and step == 0:
            comp.step()
        elif eager_first and step >= 2:
            # The state exists since the first eager step: the graph compiled at
            # step 1 must serve every later step.
            with torch.compiler.set_stance("fail_on_recompile"):
                compiled()
        else:
            compiled()
    return (eager_p, eager), (comp_p, comp)


def assert_same_run(eager, comp, dtype=torch.float32, what=""):
    (eager_p, eager_opt), (comp_p, comp_opt) = eager, comp
    # The compiled graph calls the same ops; only the few scalar ops between them
    # (the clip coefficient) may be fused and rounded differently by inductor.
    assert_states_close(comp_opt, eager_opt, comp_p, eager_p, TORCH_PARITY[dtype], what)
    for key in ("grad_norm", "clip_coef", "skipped"):
        assert (key in comp_opt.clip_stats) == (key in eager_opt.clip_stats), key
        if key in eager_opt.clip_stats:
            a, e = comp_opt.clip_stats[key], eager_opt.clip_stats[key]
            assert a.device == e.device and a.dtype == e.dtype, key
            torch.testing.assert_close(a, e, rtol=1e-6, atol=0.0, msg=f"{what} clip_stats[{key}]")


@pytest.fixture(autouse=True)
def _reset_dynamo():
    yield
    torch._dynamo.reset()


def _matches_eager_cases():
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        for lr_tensor in (False, True):
            cases += on_devices([pytest.param(spec, dtype, lr_tensor,
                                              id=f"{spec.name}-{str(dtype)[6:]}-"
                                                 f"{'lr-tensor' if lr_tensor else 'lr-float'}")
                                 for spec in SPECS.values()], lambda values: values[0])
    # On the CPU: float32 with a tensor lr. (A float lr's run there is the
    # every-policy test's GlobalNorm case, and the dtype changes nothing of
    # what compiles.)
    return [c for c in cases if c.values[0] == "cuda" or (c.values[2] == torch.float32
                                                          and c.values[3])]


@pytest.mark.parametrize("device,spec,dtype,lr_tensor", _matches_eager_cases())
def test_compiled_step_matches_eager(device, spec, dtype, lr_tensor):
    """Four steps, the first eager on both sides; a NaN in the first step (with
    a tensor lr: the compiled step then takes the state's first real step,
    SGD's buffer its first) or in the third (with a float lr: a compiled
    skip)."""
    poison_step = 0 if lr_tensor else 2
    eager, comp = run_compiled_vs_eager(spec, device, dtype=dtype, lr_tensor=lr_tensor, steps=4,
                                        poison_step=poison_step)
    assert_same_run(eager, comp, dtype)
    assert int(comp[1].clip_stats["skipped"]) == 1


@pytest.mark.parametrize("spec", spec_params([SPECS["AdamW"]]))
def test_compiled_step_initializes_state(spec):
    """Parameters of every layout, an empty and a 0-d one among them: the
    state made inside the compiled step. (Every optimizer makes its state in
    a compiled first step in test_every_policy_compiles_to_the_eager_step,
    with each policy that has state of its own.)"""
    # No eager step first: the compiled step creates the state (the second call
    # recompiles, for the state that now exists; that is not a graph break).
    eager, comp = run_compiled_vs_eager(spec, "cpu", steps=3, eager_first=False,
                                        opt_kwargs={"clip": fusedclip.GlobalNorm(0.5, math.inf)})
    assert_same_run(eager, comp)


# -- every clip policy with every optimizer ------------------------------------------------------
SHAPES = [(7,), (4, 5), (), (33,)]


def _policy_cases():
    for spec in SPECS.values():
        for policy in spec.policies:
            yield pytest.param(spec, policy, id=f"{spec.name}-{policy}")


@pytest.mark.parametrize("spec,policy", list(_policy_cases()))
def test_every_policy_compiles_to_the_eager_step(spec, policy):
    """torch.compile(opt.step, fullgraph=True) gives, step after step for 40
    steps (two of them skipped for a NaN), the parameters, state, policy
    state and clip_stats of the eager step, bit for bit. A policy with state
    of its own is compiled from the first step (which makes that state and the
    optimizer's: every optimizer's state is so made compiled too), the others
    from the second (the first compiled step of every optimizer:
    test_compiled_step_initializes_state and the stateful policies here); no
    step after the second recompiles, a skipped step changes nothing,
    compiled, and a new torch.compile of the same step reuses the graph."""
    specs = [(s, "contiguous") for s in SHAPES]
    eager = spec.fused(make_params(specs), clip=POLICY_CASES[policy](), **spec.example)
    comp = spec.fused(make_params(specs), clip=POLICY_CASES[policy](), **spec.example)
    own = comp.clip_policy
    stateful = own is not None and bool(
        own.init_state(torch.device("cpu")) or own.init_tensor_state(torch.float32,
                                                                    torch.device("cpu")))
    torch._dynamo.reset()
    compiled = torch.compile(comp.step, fullgraph=True)
    for step in range(40):
        nan_at = step if step in (5, 23) else None
        set_step_grads(params_of(eager), step, nan_at)
        set_step_grads(params_of(comp), step, nan_at)
        eager.step()
        before = snapshot(comp, params_of(comp)) if nan_at is not None else None
        if step == 0 and not stateful:
            comp.step()
        else:
            with torch.compiler.set_stance("fail_on_recompile" if step >= 2 else "default"):
                compiled()
        if before is not None:
            assert_unchanged(comp, params_of(comp), before, f"compiled skipped step {step}")
        assert_same_optimizers(comp, eager, f"{spec.name} {policy} step {step}")
    assert int(comp.clip_stats["skipped"]) == 2
    before = snapshot(comp, params_of(comp))
    set_step_grads(params_of(comp), 40, nan_at=40)
    with torch.compiler.set_stance("fail_on_recompile"):
        torch.compile(comp.step, fullgraph=True)()
    assert_unchanged(comp, params_of(comp), before, "a new compile's skipped step")
    assert int(comp.clip_stats["skipped"]) == 3
    if policy not in ("None", "ValueClip") or comp.nonfinite == "skip":
        assert math.isnan(float(comp.clip_stats["grad_norm"]))

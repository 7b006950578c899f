"""torch.compile(opt.step, fullgraph=True): the step traces without a graph
break and gives what the eager step gives.

The helpers take a device, so tests/test_cuda.py runs the same checks on CUDA.
On the CPU a compile costs a few seconds; the cases here are few and small.
"""

from __future__ import annotations

import math

import pytest
import torch

import fusedclip

from conftest import assert_states_close, assert_unchanged, make_tensor, snapshot
from tolerances import TORCH_PARITY

# Small, with a 0-d, an empty, a transposed and a strided parameter.
COMPILE_SPECS = [((7,), "contiguous"), ((4, 5), "transposed"), ((), "contiguous"),
                 ((0,), "contiguous"), ((3, 6), "slice"), ((33,), "contiguous")]


def make_params(device, dtype=torch.float32, specs=COMPILE_SPECS, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(make_tensor(s, lay, gen, dtype).to(device)) for s, lay in specs]


def set_step_grads(params, step: int, poison: bool = False) -> None:
    """Step `step`'s gradients, the same on every call; `poison` puts a NaN in
    the first one."""
    gen = torch.Generator().manual_seed(1000 + step)
    for i, p in enumerate(params):
        g = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype).to(p.device)
        if poison and i == 0:
            g.view(-1)[1] = math.nan
        if p.grad is None:
            p.grad = g
        else:
            p.grad.copy_(g)  # in place: a captured or compiled step keeps reading .grad


def make_opt(params, *, lr_tensor: bool, **kwargs):
    device = params[0].device
    lr = torch.tensor(0.01, device=device) if lr_tensor else 0.01
    kwargs.setdefault("clip", 1.0)
    return fusedclip.FusedClipAdamW(params, lr=lr, weight_decay=0.1, **kwargs)


def run_compiled_vs_eager(device, *, dtype=torch.float32, lr_tensor=False, steps=3,
                          eager_first=True, poison_step=None, opt_kwargs=None):
    """Runs `steps` steps eagerly on one parameter set and through
    torch.compile(opt.step, fullgraph=True) on another, with the same
    gradients; returns both (params, opt) pairs.

    With `eager_first`, both first take one eager step, so the compiled step
    finds its state initialized; after its first call it must not recompile.
    """
    opt_kwargs = opt_kwargs or {}
    eager_p, comp_p = make_params(device, dtype), make_params(device, dtype)
    eager = make_opt(eager_p, lr_tensor=lr_tensor, **opt_kwargs)
    comp = make_opt(comp_p, lr_tensor=lr_tensor, **opt_kwargs)
    torch._dynamo.reset()
    compiled = torch.compile(comp.step, fullgraph=True)
    for step in range(steps):
        poison = step == poison_step
        set_step_grads(eager_p, step, poison)
        set_step_grads(comp_p, step, poison)
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


@pytest.mark.parametrize("lr_tensor", [False, True], ids=["lr-float", "lr-tensor"])
def test_compiled_step_matches_eager(lr_tensor):
    eager, comp = run_compiled_vs_eager("cpu", lr_tensor=lr_tensor, steps=4)
    assert_same_run(eager, comp)


def test_compiled_step_initializes_state():
    # No eager step first: the compiled step creates the state (the second call
    # recompiles, for the state that now exists; that is not a graph break).
    eager, comp = run_compiled_vs_eager("cpu", steps=3, eager_first=False,
                                        opt_kwargs={"clip": fusedclip.GlobalNorm(0.5, math.inf)})
    assert_same_run(eager, comp)


def test_compiled_step_skips_nonfinite():
    eager, comp = run_compiled_vs_eager("cpu", steps=4, poison_step=2)
    assert_same_run(eager, comp)
    assert int(comp[1].clip_stats["skipped"]) == 1
    # And the skipped step itself changed nothing, compiled.
    params, opt = comp
    before = snapshot(opt, params)
    set_step_grads(params, 9, poison=True)
    with torch.compiler.set_stance("fail_on_recompile"):
        torch.compile(opt.step, fullgraph=True)()
    assert_unchanged(opt, params, before, "compiled skipped step")
    assert int(opt.clip_stats["skipped"]) == 2
    assert math.isnan(float(opt.clip_stats["grad_norm"]))


# -- every clip policy with every optimizer ------------------------------------------------------
POLICY_CASES = {
    "None": lambda: None,
    "GlobalNorm": lambda: 1.0,
    "GlobalNorm-inf": lambda: fusedclip.GlobalNorm(0.5, norm_type=math.inf),
    "PerTensorNorm": lambda: fusedclip.PerTensorNorm(0.4),
    "SmoothClip": lambda: fusedclip.SmoothClip(2.0),
    "Normalize": lambda: fusedclip.Normalize(),
    "AutoClip": lambda: fusedclip.AutoClip(10.0, history=8),
    "ZClip": lambda: fusedclip.ZClip(warmup_steps=3),
    "AdaGC": lambda: fusedclip.AdaGC(warmup_steps=4),
    "ValueClip": lambda: fusedclip.ValueClip(0.3),
    "AGC": lambda: fusedclip.AGC(0.3),
}
OPTIMIZER_CASES = {
    "AdamW": (fusedclip.FusedClipAdamW, dict(lr=0.01, weight_decay=0.1)),
    "Adam": (fusedclip.FusedClipAdam, dict(lr=0.01, amsgrad=True)),
    "SGD": (fusedclip.FusedClipSGD, dict(lr=0.01, momentum=0.9)),
    "Adagrad": (fusedclip.FusedClipAdagrad, dict(lr=0.01)),
}


@pytest.mark.parametrize("policy", list(POLICY_CASES))
@pytest.mark.parametrize("kind", list(OPTIMIZER_CASES))
def test_every_policy_compiles_to_the_eager_step(kind, policy):
    """torch.compile(opt.step, fullgraph=True) gives, step after step for 40
    steps (two of them skipped for a NaN), the parameters, state, policy
    state and clip_stats of the eager step, bit for bit."""
    from test_dropin import assert_same, make_params, set_grads

    cls, kwargs = OPTIMIZER_CASES[kind]
    eager_params, comp_params = make_params(), make_params()
    eager = cls(eager_params, clip=POLICY_CASES[policy](), **kwargs)
    comp = cls(comp_params, clip=POLICY_CASES[policy](), **kwargs)
    torch._dynamo.reset()
    compiled = torch.compile(comp.step, fullgraph=True)
    for step in range(40):
        nan_at = step if step in (5, 23) else None
        set_grads(eager_params, step, nan_at)
        set_grads(comp_params, step, nan_at)
        eager.step()
        compiled()
        assert_same(comp, eager, f"{kind} {policy} step {step}")
    assert int(comp.clip_stats["skipped"]) == 2

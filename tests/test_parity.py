"""Every fused optimizer with a torch.optim twin against that twin preceded by
torch.nn.utils.clip_grad_norm_, over random configurations of every
hyperparameter and many steps (registry.run_parity says how); with default
hyperparameters; and with gradients made by autograd."""

from __future__ import annotations

import pytest
import torch

from helpers import Problem, assert_close, assert_states_close, flat, set_grads
from registry import SPECS, check_coverage, on_devices, run_parity, spec_params
from tolerances import TORCH_NORM, TORCH_PARITY

TWINNED = [s for s in SPECS.values() if s.twin is not None]
CONFIGS = {s.name: s.configs("torch") for s in TWINNED}


@pytest.mark.parametrize("device,config",
                         on_devices([c for s in TWINNED for c in CONFIGS[s.name]],
                                    lambda values: values[0]["spec"]))
def test_parity_with_torch(device, config):
    run_parity(config, device)


@pytest.mark.parametrize("spec", spec_params(twin=True))
def test_configurations_cover_the_spec(spec):
    """The random configurations reach every case the spec lists, those
    against torch alone and with those against the reference (over the
    spec's generator's stream: Adam and AdamW share one)."""
    check_coverage(spec, spec.stream("torch"))
    check_coverage(spec, spec.stream("torch") + spec.stream("reference"))


@pytest.mark.parametrize("spec", spec_params(twin=True))
def test_default_hyperparameters_match_torch(spec):
    """With every hyperparameter left at its default, over a small model with
    several layers, the fused step is torch's, and so are the defaults."""
    problem = Problem(groups=[{"specs": [((8, 4), "contiguous"), ((8,), "contiguous"),
                                         ((3, 8), "contiguous"), ((3,), "contiguous"),
                                         ((), "contiguous")]}], seed=5)
    tparams, fparams = problem.params(), problem.params()
    topt = spec.make_torch(problem, tparams)
    fopt = spec.make_fused(problem, fparams)
    assert fopt.defaults == type(topt)([torch.nn.Parameter(torch.zeros(1))]).defaults
    for step in range(12):
        grads = problem.grads(step)
        set_grads(flat(tparams), grads)
        set_grads(flat(fparams), grads)
        topt.step()
        fopt.step()
    assert_states_close(fopt, topt, flat(fparams), flat(tparams), TORCH_PARITY[torch.float32],
                        spec.name)
    for a, b in zip(flat(fparams), flat(tparams)):  # the same keys, none where torch has none
        assert set(fopt.state.get(a, {})) == set(topt.state.get(b, {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("device,spec", on_devices(spec_params(twin=True), lambda v: v[0]))
def test_parity_with_autograd_gradients(device, spec, dtype):
    """Gradients made by backward() (so a strided-slice parameter gets a
    contiguous gradient, as autograd lays it out) on a small model, clipped."""
    results = []
    for side in ("torch", "fused"):
        gen = torch.Generator().manual_seed(3)
        base = torch.randn(6, 10, generator=gen, dtype=dtype).to(device)
        w1 = torch.nn.Parameter(base[:, ::2])  # not dense
        w2 = torch.nn.Parameter(
            torch.randn(4, 6, generator=gen, dtype=dtype).to(device).t())  # transposed
        b = torch.nn.Parameter(torch.randn((), generator=gen, dtype=dtype).to(device))  # 0-d
        params = [w1, w2, b]
        if side == "torch":
            opt = spec.twin(params, foreach=False, **spec.example)
        else:
            opt = spec.fused(params, clip=0.5, **spec.example)
        data = torch.Generator().manual_seed(4)
        norms = []
        for _ in range(12):
            x = torch.randn(7, 5, generator=data, dtype=dtype).to(device)
            loss = ((torch.tanh(x @ w1.t()) @ w2).sum(1) + b).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            assert w1.grad.is_contiguous() and not w1.is_contiguous()
            if side == "torch":
                norms.append(torch.nn.utils.clip_grad_norm_(params, 0.5))
            opt.step()
            if side == "fused":
                norms.append(opt.clip_stats["grad_norm"].clone())
        results.append((params, opt, norms))
    (tp, topt, tn), (fp, fopt, fn) = results
    for a, e in zip(fn, tn):
        assert_close(a, e, TORCH_NORM[dtype], "grad_norm")
    assert_states_close(fopt, topt, fp, tp, TORCH_PARITY[dtype], "autograd")

"""The public surface: signatures and defaults against torch's, closures,
lr schedulers, clip_stats, empty tensors, and GlobalNorm's properties."""

from __future__ import annotations

import inspect
import math
import pathlib
import re

import pytest
import torch

import fusedclip
from fusedclip.reference import global_norm

from helpers import (
    Problem, assert_close, assert_states_close, assert_unchanged, bitwise_equal, flat, set_grads,
    snapshot, torch_clip,
)
from registry import SPECS, spec_params
from tolerances import NORM, NORM_OUT_DTYPE, TORCH_NORM, TORCH_PARITY

# fusedclip's own arguments, keyword-only, and their defaults.
EXTRAS = {"clip": None, "nonfinite": "skip", "norm_group": None, "master_weights": False,
          "store_param_remainders": False, "state_dtype": None, "stochastic_rounding": False}


# -- signatures ------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", spec_params(twin=True))
def test_signature_matches_torch(spec):
    """Every argument of torch's is ours too (issue 10), with torch's default
    and kind, all in torch's order; fusedclip's own (clip, nonfinite,
    norm_group and the mixed-precision options) are keyword-only extras."""
    ours, theirs = spec.fused, spec.twin
    mine = inspect.signature(ours.__init__).parameters
    torchs = inspect.signature(theirs.__init__).parameters
    assert [n for n in mine if n not in EXTRAS] == list(torchs)
    for name, p in torchs.items():
        assert mine[name].default == p.default, name
        assert mine[name].kind == p.kind, name
    # the positional ones in torch's order
    positional = [n for n, p in torchs.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert [n for n, p in mine.items() if p.kind is p.POSITIONAL_OR_KEYWORD] == positional
    for name, default in EXTRAS.items():
        assert mine[name].kind is inspect.Parameter.KEYWORD_ONLY, name
        assert mine[name].default == default, name


@pytest.mark.parametrize("spec", spec_params(twin=True))
def test_defaults_dict_matches_torch(spec):
    p = torch.nn.Parameter(torch.zeros(2))
    assert spec.fused([p]).defaults == spec.twin([p]).defaults
    for name in spec.hyper:
        assert name in spec.fused([p]).defaults, name
    assert spec.fused([p]).clip_policy is None and spec.fused([p]).nonfinite == "skip"


def test_public_names():
    assert set(fusedclip.__all__) >= {"GlobalNorm", "ClipPolicy"}
    for name in fusedclip.__all__:
        assert hasattr(fusedclip, name)
    for spec in SPECS.values():  # every optimizer of the registry is public
        name = spec.fused.__name__
        assert name in fusedclip.__all__ and name in fusedclip.optim.__all__
        assert getattr(fusedclip, name) is spec.fused
        assert issubclass(spec.fused, torch.optim.Optimizer)
        doc = spec.fused.__doc__
        assert "clip (None, float or ClipPolicy, optional)" in doc and "References:" in doc
    assert "Duchi, Hazan & Singer" in fusedclip.FusedClipAdagrad.__doc__
    assert "Sutskever" in fusedclip.FusedClipSGD.__doc__ and "Polyak" in fusedclip.FusedClipSGD.__doc__
    opt = fusedclip.FusedClipAdam([torch.nn.Parameter(torch.zeros(2))], clip=2.5)
    assert isinstance(opt.clip_policy, fusedclip.GlobalNorm)
    assert opt.clip_policy.max_norm == 2.5 and opt.clip_policy.norm_type == 2.0
    assert "GlobalNorm(max_norm=2.5" in repr(opt.clip_policy)


# -- closures --------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", spec_params(twin=True))
def test_closure(spec):
    """step(closure) evaluates the closure with grad enabled, once, returns its
    loss, and steps with the gradients it made: torch's result."""
    ours, theirs = spec.fused, spec.twin
    results = []
    for cls in (theirs, ours):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 1))
        kwargs = {"clip": 0.3} if cls is ours else {"foreach": False}
        opt = cls(model.parameters(), lr=0.01, **kwargs)
        data = torch.Generator().manual_seed(1)
        calls, losses = [], []
        for _ in range(10):
            x = torch.randn(16, 5, generator=data)
            y = torch.randn(16, 1, generator=data)

            def closure():
                calls.append(torch.is_grad_enabled())
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(model(x), y)
                loss.backward()
                if cls is theirs:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.3)
                return loss

            with torch.no_grad():
                losses.append(opt.step(closure))
        assert calls == [True] * 10
        assert all(isinstance(loss, torch.Tensor) and loss.ndim == 0 for loss in losses)
        results.append((list(model.parameters()), opt, losses))
    (tp, topt, tl), (fp, fopt, fl) = results
    tol = TORCH_PARITY[torch.float32]
    for a, e in zip(fl, tl):
        assert_close(a.detach(), e.detach(), tol, "loss")
    assert_states_close(fopt, topt, fp, tp, tol, "closure")


def test_step_without_gradients():
    p = torch.nn.Parameter(torch.ones(3))
    opt = fusedclip.FusedClipAdam([p], clip=1.0)
    assert opt.step() is None
    assert opt.step(lambda: torch.tensor(2.0)) == torch.tensor(2.0)
    assert torch.equal(p.detach(), torch.ones(3)) and len(opt.state) == 0
    # Every key from the start; nothing measured (tests/test_dropin.py).
    assert set(opt.clip_stats) == {"grad_norm", "clip_coef", "skipped"}
    assert math.isnan(float(opt.clip_stats["grad_norm"]))


# -- lr schedulers -----------------------------------------------------------------------------
SCHEDULERS = {
    "StepLR": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5),
    "LambdaLR": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 / (1 + epoch)),
    "OneCycleLR": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=20),
}


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float-lr", "tensor-lr"])
@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize("kind", ["Adam", "AdamW"])
def test_lr_scheduler(kind, scheduler, tensor_lr):
    """Schedulers drive the fused optimizer's learning rate (a tensor lr is
    updated in place) and the run is torch's."""
    lr = "tensor:0.02" if tensor_lr else 0.02
    problem = Problem(
        groups=[{"specs": [((6, 4), "contiguous"), ((), "contiguous")], "lr": lr},
                {"specs": [((4, 6), "transposed"), ((9,), "contiguous")], "lr": lr,
                 "amsgrad": True}],
        dtype=torch.float32, grad_std=0.5, seed=8,
    )
    tparams, fparams = problem.params(), problem.params()
    topt = SPECS[kind].make_torch(problem, tparams, {})
    fopt = SPECS[kind].make_fused(problem, fparams, {}, clip=1.0)
    tsched, fsched = SCHEDULERS[scheduler](topt), SCHEDULERS[scheduler](fopt)
    lr_objects = [g["lr"] for g in fopt.param_groups]
    seen = set()
    for step in range(12):
        grads = problem.grads(step)
        set_grads(flat(tparams), grads)
        set_grads(flat(fparams), grads)
        torch_clip(flat(tparams), 1.0)
        topt.step()
        fopt.step()
        tsched.step()
        fsched.step()
        for tg, fg in zip(topt.param_groups, fopt.param_groups):
            assert float(fg["lr"]) == float(tg["lr"])
            seen.add(float(fg["lr"]))
    assert len(seen) > 2, "the schedule must change the learning rate"
    if tensor_lr:
        assert all(g["lr"] is lr_object for g, lr_object in zip(fopt.param_groups, lr_objects))
    assert_states_close(fopt, topt, flat(fparams), flat(tparams), TORCH_PARITY[torch.float32],
                        scheduler)


# -- clip_stats --------------------------------------------------------------------------------
@pytest.mark.parametrize("norm_type", [2.0, math.inf], ids=["l2", "inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_grad_norm_is_clip_grad_norms(dtype, norm_type):
    """clip_stats['grad_norm'] is the norm clip_grad_norm_ returns (in float32
    for low-precision gradients, where torch rounds it to their dtype), over
    all groups, and clip_coef is torch's coefficient."""
    problem = Problem(
        groups=[{"specs": [((30, 20), "contiguous"), ((7,), "contiguous")]},
                {"specs": [((5, 9), "transposed"), ((), "contiguous"), ((0,), "contiguous")],
                 "lr": 0.1}],
        dtype=dtype, grad_std=1.0, seed=9,
    )
    tparams, fparams = problem.params(), problem.params()
    opt = SPECS["Adam"].make_fused(problem, fparams, {}, clip=fusedclip.GlobalNorm(1.5, norm_type))
    for step in range(3):
        grads = problem.grads(step)
        set_grads(flat(tparams), grads)
        set_grads(flat(fparams), grads)
        theirs = torch_clip(flat(tparams), ("global", 1.5, norm_type))
        opt.step()
        stats = opt.clip_stats
        assert set(stats) == {"grad_norm", "clip_coef", "skipped"}
        norm, coef = stats["grad_norm"], stats["clip_coef"]
        assert norm.shape == () and norm.dtype == NORM_OUT_DTYPE[dtype]
        assert stats["skipped"].dtype == torch.int64 and int(stats["skipped"]) == 0
        assert_close(norm.to(theirs.dtype), theirs, TORCH_NORM[dtype], "grad_norm vs torch")
        assert_close(norm, global_norm(grads, norm_type).to(norm.dtype), NORM[dtype],
                     "grad_norm vs float64")
        expected_coef = torch.clamp(1.5 / (norm + 1e-6), max=1.0)
        assert bitwise_equal(coef, expected_coef)
        assert float(coef) < 1.0  # the gradients were clipped


def test_clip_stats_without_clipping():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([3.0, 4.0, 0.0])
    opt = fusedclip.FusedClipAdam([p])  # nonfinite="skip" still measures the norm
    opt.step()
    assert set(opt.clip_stats) == {"grad_norm", "clip_coef", "skipped"}
    assert float(opt.clip_stats["grad_norm"]) == 5.0
    assert float(opt.clip_stats["clip_coef"]) == 1.0
    opt = fusedclip.FusedClipAdam([p], nonfinite="propagate")  # nothing to measure
    opt.step()
    assert set(opt.clip_stats) == {"grad_norm", "clip_coef", "skipped"}
    assert math.isnan(float(opt.clip_stats["grad_norm"]))


# -- empty tensors ---------------------------------------------------------------------------
@pytest.mark.parametrize("norm_type", [2.0, math.inf], ids=["l2", "inf"])
def test_empty_tensors_allowed(norm_type):
    """Empty parameters take part (state, step counts) and add 0 to the norm,
    the inf norm included (where torch's clip_grad_norm_ raises)."""
    x = torch.nn.Parameter(torch.tensor([3.0, -4.0]))
    empties = [torch.nn.Parameter(torch.zeros(0)), torch.nn.Parameter(torch.zeros(2, 0, 3))]
    opt = fusedclip.FusedClipAdamW([{"params": empties[:1]}, {"params": [x] + empties[1:]}],
                                   clip=fusedclip.GlobalNorm(1.0, norm_type))
    for p in [x] + empties:
        p.grad = torch.zeros_like(p)
    x.grad = torch.tensor([3.0, -4.0])
    opt.step()
    assert float(opt.clip_stats["grad_norm"]) == (5.0 if norm_type == 2.0 else 4.0)
    for p in empties:
        assert float(opt.state[p]["step"]) == 1 and opt.state[p]["exp_avg"].shape == p.shape

    only_empty = [torch.nn.Parameter(torch.zeros(0)) for _ in range(3)]
    opt = fusedclip.FusedClipAdam(only_empty, clip=fusedclip.GlobalNorm(1.0, norm_type))
    for p in only_empty:
        p.grad = torch.zeros(0)
    opt.step()
    assert float(opt.clip_stats["grad_norm"]) == 0.0 and float(opt.clip_stats["clip_coef"]) == 1.0
    assert int(opt.clip_stats["skipped"]) == 0


# -- GlobalNorm properties ---------------------------------------------------------------------
def _random_grads(seed: int, dtype):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 6, (), generator=g))
    scale = float(10 ** torch.empty(()).uniform_(-3, 3, generator=g))
    return [(torch.randn(int(torch.randint(0, 300, (), generator=g)), generator=g,
                         dtype=torch.float64) * scale).to(dtype) for _ in range(n)]


@pytest.mark.parametrize("norm_type", [2.0, math.inf], ids=["l2", "inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clipped_norm_is_at_most_max_norm(dtype, norm_type):
    """For many random gradient sets and max_norms: after clipping, the global
    norm is at most max_norm (to rounding), and exactly as large as before when
    it already was."""
    eps = torch.finfo(dtype).eps
    for seed in range(60):
        grads = _random_grads(seed, dtype)
        norm_before = float(global_norm(grads, norm_type))
        max_norm = norm_before * [0.01, 0.5, 0.999, 1.5, 100.0][seed % 5]
        policy = fusedclip.GlobalNorm(max_norm, norm_type)
        _, total, _ = fusedclip.ops.multi_tensor_norm(grads, norm_type)
        coef = policy.coefficient(total)
        clipped = [g * coef.to(g.dtype) for g in grads]
        norm_after = float(global_norm(clipped, norm_type))
        assert norm_after <= max_norm * (1 + 8 * eps), (seed, norm_after, max_norm)
        if norm_before + 1e-6 <= max_norm:
            assert float(coef) == 1.0 and all(torch.equal(a, b) for a, b in zip(clipped, grads))
        else:
            # clipping lands on max_norm, less torch's 1e-6 in the denominator
            assert norm_after >= max_norm * norm_before / (norm_before + 1e-6) * (1 - 8 * eps) - 1e-30


@pytest.mark.parametrize("norm_type", [2.0, math.inf], ids=["l2", "inf"])
def test_clipping_clipped_gradients_changes_nothing(norm_type):
    """Gradients already within max_norm step exactly as without clipping; and
    clipping clipped gradients again scales them by 1 less at most torch's
    1e-6 / max_norm."""
    for seed in range(20):
        grads = _random_grads(seed, torch.float64)
        norm = float(global_norm(grads, norm_type))
        max_norm = norm * 0.3 + 1e-3
        policy = fusedclip.GlobalNorm(max_norm, norm_type)
        once = [g * policy.coefficient(global_norm(grads, norm_type)) for g in grads]
        coef_again = float(policy.coefficient(global_norm(once, norm_type)))
        assert 1.0 - 2e-6 / max_norm <= coef_again <= 1.0, seed

    problem = Problem(groups=[{"specs": [((40,), "contiguous"), ((3, 7), "transposed")]}],
                      dtype=torch.float32, grad_std=0.01, seed=13)
    clipped, plain = problem.params(), problem.params()
    copt = SPECS["Adam"].make_fused(problem, clipped, {}, clip=fusedclip.GlobalNorm(10.0, norm_type))
    popt = SPECS["Adam"].make_fused(problem, plain, {})
    for step in range(10):
        grads = problem.grads(step)  # norm far below 10
        set_grads(flat(clipped), grads)
        set_grads(flat(plain), grads)
        copt.step()
        popt.step()
        assert float(copt.clip_stats["clip_coef"]) == 1.0
    for a, b in zip(flat(clipped), flat(plain)):
        assert bitwise_equal(a.detach(), b.detach())


# -- other Optimizer machinery -----------------------------------------------------------------
def test_add_param_group():
    """An added group gets the defaults; a bad one fails the next step before
    anything changes (torch.optim checks only the constructor's arguments)."""
    torch.manual_seed(0)
    a, b, c = (torch.nn.Parameter(torch.randn(5)) for _ in range(3))
    opt = fusedclip.FusedClipAdam([a], lr=0.01, clip=1.0)
    opt.add_param_group({"params": [b], "lr": 0.1})
    assert opt.param_groups[1]["betas"] == (0.9, 0.999)
    for p in (a, b, c):
        p.grad = torch.ones_like(p)
    opt.step()
    opt.add_param_group({"params": [c], "betas": (0.9, 2.0)})
    before = snapshot(opt, [a, b, c])
    with pytest.raises(ValueError, match="Invalid beta parameter at index 1: 2.0"):
        opt.step()
    assert_unchanged(opt, [a, b, c], before, "bad added group")


def test_named_parameters():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = fusedclip.FusedClipAdam(model.named_parameters(), lr=0.01, clip=1.0)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = model.weight.detach().clone()
    opt.step()
    assert not torch.equal(model.weight.detach(), before)
    assert opt.state_dict()["param_groups"][0]["param_names"] == ["weight", "bias"]


def test_no_test_asserts_a_wall_clock_time():
    """Timings belong in bench/, never in an assertion of the test suite."""
    clocks = re.compile(r"\b(" + "|".join(["perf" + "_counter", "time" + r"\.time", "time" + "it",
                                            "mono" + "tonic"]) + r")\b")
    offenders = []
    for path in pathlib.Path(__file__).parent.glob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if clocks.search(line):
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert not offenders, offenders

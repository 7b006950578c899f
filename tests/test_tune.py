"""fusedclip.tune: estimate_smoothness and find_lr.

The contracts of issue 14:
- on f(x) = sum_i cosh(a_i x_i), which is (L0, L1)-smooth with L0 = max a_i^2
  and L1 = max a_i exactly, started far from the minimum, both estimates are
  within a factor 1.5 of the true constants;
- on a quadratic (L1 = 0), L1 comes out near 0 and L0 near the largest eigenvalue;
- find_lr with plain SGD on a quadratic with largest eigenvalue L suggests an
  lr below the stability limit 2/L and within a factor 10 of it;
- neither tool changes the caller's model, gradients, optimizer or RNG state;
- bad input gets a clear error.
"""

from __future__ import annotations

import copy
import math
import pickle
import re
import sys

import pytest
import torch

import fusedclip
from fusedclip import tune


class Vector(torch.nn.Module):
    """One float64 parameter vector x: the model of the toy problems."""

    def __init__(self, x0) -> None:
        super().__init__()
        self.x = torch.nn.Parameter(torch.as_tensor(x0, dtype=torch.float64).clone())


def cosh_loss(a):
    a = torch.as_tensor(a, dtype=torch.float64)
    return lambda model, batch: torch.cosh(a * model.x).sum()


def quadratic(d=20, lam_max=10.0, seed=0):
    """0.5 x^T A x with eigenvalues spread over [lam_max / 100, lam_max]."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    lam = torch.linspace(lam_max / 100, lam_max, d, dtype=torch.float64)
    a = q @ torch.diag(lam) @ q.T
    x0 = 3 * torch.randn(d, generator=gen, dtype=torch.float64)
    return a, x0, (lambda model, batch: 0.5 * model.x @ a @ model.x)


# -- the contracts --------------------------------------------------------------------
# (a, x0): the gradient norm at x0 is far above L0/L1 (3e5 and 2e3 against 4 and 3),
# and the locally safe steps bring it far below.
COSH_CASES = [((1.0, 2.0, 4.0), (3.0, 3.0, 3.0)), ((0.5, 3.0), (4.0, 2.5))]


@pytest.mark.parametrize("a,x0", COSH_CASES)
def test_cosh_estimates_within_factor_1_5(a, x0):
    true_l0, true_l1 = max(a) ** 2, max(a)
    est = tune.estimate_smoothness(Vector(x0), cosh_loss(a), [None])
    assert max(est.grad_norms) > 100 * true_l0 / true_l1  # started far from the minimum
    # The contract's tolerance: a factor 1.5 each way.
    assert true_l0 / 1.5 <= est.L0 <= true_l0 * 1.5, (est.L0, true_l0)
    assert true_l1 / 1.5 <= est.L1 <= true_l1 * 1.5, (est.L1, true_l1)
    assert est.threshold == pytest.approx(est.L0 / est.L1)


def test_quadratic_l1_near_zero_l0_near_top_eigenvalue():
    a, x0, loss = quadratic()
    lam_max = float(torch.linalg.eigvalsh(a).max())
    est = tune.estimate_smoothness(Vector(x0), loss, [None])
    # Each measurement is a power-iteration estimate of ||A||, so never above
    # lam_max (1e-6: finite-difference rounding in float64); within 5% below it
    # once the iteration has converged along the trajectory.
    assert 0.95 * lam_max <= est.L0 <= lam_max * (1 + 1e-6), (est.L0, lam_max)
    # "L1 near 0": over the measured gradient norms the L1 term adds under 1% of L0.
    assert est.L1 * max(est.grad_norms) <= 0.01 * est.L0, (est.L1, est.L0)
    s = est.suggest()
    if est.L1 == 0:
        assert s.clip is None and s.max_norm is None
    assert s.lr == pytest.approx(1 / est.L0)


def test_quadratic_along_an_optimizer_trajectory():
    a, x0, loss = quadratic(seed=1)
    lam_max = float(torch.linalg.eigvalsh(a).max())
    est = tune.estimate_smoothness(Vector(x0), loss, [None], steps=30,
                                   optimizer=lambda p: torch.optim.SGD(p, lr=0.05))
    assert 0.95 * lam_max <= est.L0 <= lam_max * (1 + 1e-6)
    assert est.L1 * max(est.grad_norms) <= 0.01 * est.L0


@pytest.mark.parametrize("optimizer_cls", [torch.optim.SGD, fusedclip.FusedClipSGD])
@pytest.mark.parametrize("lam_max", [10.0, 1000.0])
def test_find_lr_on_a_quadratic_below_2_over_l_within_factor_10(optimizer_cls, lam_max):
    a, x0, loss = quadratic(lam_max=lam_max)
    top = float(torch.linalg.eigvalsh(a).max())
    result = tune.find_lr(Vector(x0), loss, [None], optimizer_cls=optimizer_cls)
    limit = 2 / top
    assert limit / 10 < result.lr < limit, (result.lr, limit)
    assert result.probes[0].lr == 1e-2  # SGD's conventional start
    assert result.edge == pytest.approx(2 * result.lr)
    assert any(p.lr > limit and not p.stable for p in result.probes)  # the edge was bracketed


def test_find_lr_starts_adam_at_1e_3_and_suggests_a_stable_rate():
    a, x0, loss = quadratic(seed=2)
    result = tune.find_lr(Vector(x0), loss, [None])  # FusedClipAdamW by default
    assert result.optimizer == "FusedClipAdamW"
    assert result.probes[0].lr == 1e-3
    stable = [p.lr for p in result.probes if p.stable]
    assert result.edge == max(stable)
    assert all(not p.stable for p in result.probes if p.lr > result.edge)


def test_find_lr_raises_when_no_rate_is_stable():
    a, x0, loss = quadratic()
    with pytest.raises(RuntimeError, match="no stable probe"):
        tune.find_lr(Vector(x0), loss, [None], optimizer_cls=torch.optim.SGD,
                     optimizer_kwargs={"maximize": True}, min_lr=1e-4)


def test_suggest_on_cosh_trains_with_fusedclip():
    a, x0 = COSH_CASES[0]
    est = tune.estimate_smoothness(Vector(x0), cosh_loss(a), [None])
    s = est.suggest()
    assert isinstance(s.clip, fusedclip.SmoothClip)
    assert s.clip.threshold == pytest.approx(est.threshold)
    assert s.max_norm == pytest.approx(est.threshold)
    assert isinstance(s.global_norm, fusedclip.GlobalNorm)
    assert s.lr == pytest.approx(1 / est.L0)
    # The suggestion works: smoothed-clipped GD from x0 reaches the minimum
    # (f* = len(a)) to 1e-6 in 300 steps, where the best fixed step needs
    # about a million (examples/l0l1_clipping.py).
    model, loss = Vector(x0), cosh_loss(a)
    opt = fusedclip.FusedClipSGD(model.parameters(), lr=s.lr, clip=s.clip)
    for _ in range(300):
        opt.zero_grad()
        loss(model, None).backward()
        opt.step()
    assert float(loss(model, None).detach()) - len(a) < 1e-6


# -- fit_envelope ------------------------------------------------------------------------
def test_fit_envelope_ignores_a_few_outliers():
    l0, l1 = 16.0, 4.0
    norms = [10 ** (-2 + 7 * k / 59) for k in range(60)]
    smooth = [math.sqrt(l0 ** 2 + (l1 * n) ** 2) for n in norms]
    clean = tune.fit_envelope(norms, smooth)
    # three points 50x above the curve, at small, middle and large norms
    noisy_n = norms + [0.1, 30.0, 1e4]
    noisy_s = smooth + [50 * math.sqrt(l0 ** 2 + (l1 * n) ** 2) for n in (0.1, 30.0, 1e4)]
    robust = tune.fit_envelope(noisy_n, noisy_s)
    # 3 outliers in 63 points, trim 5% (3 points): the fit is the clean one's to 5%
    assert robust[0] == pytest.approx(clean[0], rel=0.05)
    assert robust[1] == pytest.approx(clean[1], rel=0.05)
    assert clean[0] == pytest.approx(l0, rel=0.05) and clean[1] == pytest.approx(l1, rel=0.01)
    # without trimming the outliers move it (what the test above guards against)
    naive = tune.fit_envelope(noisy_n, noisy_s, trim=0.0)
    assert naive[0] > 3 * clean[0] or naive[1] > 3 * clean[1]


def test_fit_envelope_flat_and_through_origin():
    assert tune.fit_envelope([1.0, 2.0, 3.0], [5.0, 4.0, 5.0], trim=0) == (5.0, 0.0)
    l0, l1 = tune.fit_envelope([1.0, 2.0, 4.0], [2.0, 4.0, 8.0], trim=0)
    assert l0 == pytest.approx(0.0, abs=1e-12) and l1 == pytest.approx(2.0)
    with pytest.raises(ValueError, match="trim"):
        tune.fit_envelope([1.0], [1.0], trim=0.5)
    with pytest.raises(ValueError, match="no point"):
        tune.fit_envelope([1.0], [0.0])


# -- the caller's state is left alone ------------------------------------------------------
class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 16)
        self.bn = torch.nn.BatchNorm1d(16)
        self.drop = torch.nn.Dropout(0.3)
        self.fc2 = torch.nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x)))))


def net_batches(n=4):
    gen = torch.Generator().manual_seed(5)
    return [(torch.randn(32, 8, generator=gen), torch.randint(0, 3, (32,), generator=gen))
            for _ in range(n)]


def net_loss(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


def snapshot(model, opt):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        copy.deepcopy(opt.state_dict()),
        torch.get_rng_state(),
        model.training,
    )


def assert_same(before, after):
    (s0, g0, o0, r0, t0), (s1, g1, o1, r1, t1) = before, after
    assert s0.keys() == s1.keys()
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k  # parameters and BatchNorm buffers
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))
    assert o0["param_groups"] == o1["param_groups"]
    for k, state in o0["state"].items():
        for name, value in state.items():
            assert torch.equal(value, o1["state"][k][name]), (k, name)
    assert torch.equal(r0, r1)  # the global RNG: dropout drew in the copies only
    assert t0 == t1


@pytest.mark.parametrize("tool", ["estimate_smoothness", "find_lr"])
def test_model_optimizer_and_rng_are_unchanged(tool):
    torch.manual_seed(0)
    model = Net()
    opt = fusedclip.FusedClipAdamW(model.parameters(), lr=1e-3, clip=1.0)
    batches = net_batches()
    net_loss(model, batches[0]).backward()
    opt.step()  # the caller's optimizer has state, and the model has gradients
    net_loss(model, batches[1]).backward()
    before = snapshot(model, opt)
    if tool == "estimate_smoothness":
        est = tune.estimate_smoothness(model, net_loss, batches, steps=6, power_iters=1)
        assert len(est.grad_norms) == 6
        # the copy moved (its points differ), the model did not
        assert est.losses[0] != est.losses[-1]
    else:
        result = tune.find_lr(model, net_loss, batches, steps=4, lr0=1e-2, max_lr=1.0)
        assert len(result.probes) >= 2
    assert_same(before, snapshot(model, opt))


# -- bad input ------------------------------------------------------------------------
def run_tool(tool, model, loss_fn, batches=(None,), **kwargs):
    if tool == "estimate_smoothness":
        return tune.estimate_smoothness(model, loss_fn, batches, **kwargs)
    return tune.find_lr(model, loss_fn, batches, optimizer_cls=torch.optim.SGD, **kwargs)


TOOLS = ["estimate_smoothness", "find_lr"]
GOOD = cosh_loss((1.0, 2.0))


@pytest.mark.parametrize("tool", TOOLS)
def test_no_parameter_with_gradients(tool):
    frozen = Vector([1.0, 1.0]).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters with gradients"):
        run_tool(tool, frozen, GOOD)
    # a loss that reaches no parameter
    with pytest.raises(ValueError, match="no parameters with gradients"):
        run_tool(tool, Vector([1.0, 1.0]), lambda m, b: torch.ones((), requires_grad=True) * 2)


@pytest.mark.parametrize("tool", TOOLS)
def test_loss_not_a_scalar(tool):
    with pytest.raises(ValueError, match="scalar loss tensor.*shape \\(2,\\)"):
        run_tool(tool, Vector([1.0, 1.0]), lambda m, b: torch.cosh(m.x))
    with pytest.raises(TypeError, match="scalar loss tensor"):
        run_tool(tool, Vector([1.0, 1.0]), lambda m, b: 1.0)


@pytest.mark.parametrize("tool", TOOLS)
def test_non_finite_loss_at_the_start(tool):
    with pytest.raises(ValueError, match="not finite at the start"):
        run_tool(tool, Vector([1.0, 1.0]), lambda m, b: (m.x * math.inf).sum())
    with pytest.raises(ValueError, match="not finite at the start"):
        run_tool(tool, Vector([1.0, 1.0]), lambda m, b: (m.x * math.nan).sum())


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("steps", [1, 0, -3])
def test_steps_below_2(tool, steps):
    with pytest.raises(ValueError, match="steps must be >= 2"):
        run_tool(tool, Vector([1.0, 1.0]), GOOD, steps=steps)


@pytest.mark.parametrize("tool", TOOLS)
def test_empty_batches_and_bad_arguments(tool):
    with pytest.raises(ValueError, match="batches is empty"):
        run_tool(tool, Vector([1.0, 1.0]), GOOD, batches=[])
    with pytest.raises(TypeError, match="torch.nn.Module"):
        run_tool(tool, torch.zeros(2, requires_grad=True), GOOD)
    with pytest.raises(TypeError, match="steps must be an int"):
        run_tool(tool, Vector([1.0, 1.0]), GOOD, steps=2.5)


# (tool, keyword arguments, error, message); a NaN is out of range like an inf
# (the policies' checks say "must not be NaN").
BAD_TOOL_ARGS = [
    ("estimate_smoothness", lambda m: dict(optimizer=torch.optim.SGD(m.parameters(), lr=0.1)),
     TypeError, "not an optimizer instance"),
    ("estimate_smoothness", lambda m: dict(radius=0.0), ValueError, "radius"),
    ("estimate_smoothness", lambda m: dict(radius=math.nan), ValueError,
     "^radius must be a finite number > 0, got nan$"),
    ("estimate_smoothness", lambda m: dict(step_scale=True), TypeError,
     "^step_scale must be a real number, got True$"),
    ("estimate_smoothness", lambda m: dict(power_iters=1.0), ValueError,
     "^power_iters must be an int >= 0, got 1.0$"),
    ("find_lr", lambda m: dict(optimizer_kwargs={"lr": 0.1}), ValueError, "must not hold lr"),
    ("find_lr", lambda m: dict(min_lr=1.0, max_lr=0.1), ValueError, "min_lr"),
    ("find_lr", lambda m: dict(safety=0.5), ValueError, "safety"),
    ("find_lr", lambda m: dict(lr0=math.nan), ValueError,
     "^lr0 must be a finite number > 0, got nan$"),
    ("find_lr", lambda m: dict(eval_batches=True), ValueError,
     "^eval_batches must be an int >= 1, got True$"),
]


@pytest.mark.parametrize("tool, kwargs, error, match", BAD_TOOL_ARGS)
def test_bad_arguments_of_each_tool(tool, kwargs, error, match):
    model = Vector([1.0, 1.0])
    with pytest.raises(error, match=match):
        getattr(tune, tool)(model, GOOD, [None], **kwargs(model))


# -- the public names and the results' pickles ---------------------------------------------
def test_public_names_and_pickles_of_the_results():
    assert sorted(tune.__all__) == [
        "LRProbe", "LRSuggestion", "SmoothnessEstimate", "SmoothnessSuggestion",
        "estimate_smoothness", "find_lr", "fit_envelope",
    ]
    assert all(callable(getattr(tune, name)) for name in tune.__all__)
    probe = tune.LRProbe(lr=0.01, losses=[2.0, 1.5], before=2.0, after=1.25, status="stable")
    assert repr(probe) == ("LRProbe(lr=0.01, losses=[2.0, 1.5], before=2.0, after=1.25, "
                           "status='stable')")
    results = [
        tune.LRSuggestion(lr=0.005, edge=0.01, probes=[probe], optimizer="SGD"),
        tune.SmoothnessEstimate(L0=16.0, L1=4.0, threshold=4.0, grad_norms=[1.0, 8.0],
                                smoothness=[16.5, 48.0], losses=[3.0, 9.0]),
    ]
    for result in results:
        data = pickle.dumps(result, protocol=2)
        assert pickle.loads(data) == result
        # a pickle written when tune was one module names fusedclip.tune.<class>
        before_split = re.sub(rb"cfusedclip\.tune\.\w+\n", b"cfusedclip.tune\n", data)
        assert before_split != data and pickle.loads(before_split) == result


# -- plots -----------------------------------------------------------------------------
def test_plots_write_pngs(tmp_path):
    pytest.importorskip("matplotlib", reason="plot() needs matplotlib (pip install matplotlib)")
    a, x0 = COSH_CASES[0]
    est = tune.estimate_smoothness(Vector(x0), cosh_loss(a), [None], steps=20)
    est.plot(tmp_path / "smoothness.png", true_constants=(16.0, 4.0))
    _, q0, qloss = quadratic()
    result = tune.find_lr(Vector(q0), qloss, [None], optimizer_cls=torch.optim.SGD, steps=5)
    result.plot(tmp_path / "lr.png", title="quadratic")
    for name in ("smoothness.png", "lr.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name


def test_progress_bar_with_tqdm_quiet_without(capsys, monkeypatch):
    a, x0 = COSH_CASES[0]

    def run(progress):
        est = tune.estimate_smoothness(Vector(x0), cosh_loss(a), [None], steps=3,
                                       progress=progress)
        assert len(est.grad_norms) == 3
        return capsys.readouterr().err

    assert run(False) == ""
    try:
        import tqdm  # noqa: F401
    except ImportError:
        pass
    else:
        assert "estimate_smoothness" in run(True)  # tqdm's bar, on stderr
    # without tqdm: quiet, no error
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    assert run(True) == ""


def test_plots_draw_into_given_axes(tmp_path):
    pytest.importorskip("matplotlib", reason="plot() needs matplotlib (pip install matplotlib)")
    from matplotlib.figure import Figure

    a, x0 = COSH_CASES[0]
    est = tune.estimate_smoothness(Vector(x0), cosh_loss(a), [None], steps=5)
    _, q0, qloss = quadratic()
    result = tune.find_lr(Vector(q0), qloss, [None], optimizer_cls=torch.optim.SGD, steps=3)
    fig = Figure()
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    est.plot(ax=ax1)
    result.plot(axes=(None, ax2), path=tmp_path / "both.png")
    assert ax1.get_xscale() == "log" and ax2.get_xlabel() == "learning rate"
    assert (tmp_path / "both.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="needs a path"):
        est.plot()

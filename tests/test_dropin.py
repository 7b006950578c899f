"""Drop-in behaviour: what a torch.optim user gets by changing the class name.

Copies of an optimizer (deepcopy, pickle, torch.save) step as the original;
state dicts saved by older torch versions load; torch's implementation
keywords are accepted and change nothing; hyperparameters are checked before
the parameters; complex parameters train as torch trains them; clip_stats
has the same keys from construction on; a run that skips step after step
warns; optimizer-wide settings are refused in param groups, and ``opt.clip``
can be replaced; ``print(opt)`` shows the policy.
"""

from __future__ import annotations

import copy
import inspect
import io
import pickle
import warnings

import pytest
import torch

import fusedclip

from helpers import assert_same_optimizers, params_of, set_step_grads
from helpers import make_params as _make_params
from registry import SPECS

# Every optimizer of the registry with its example hyperparameters: torch's
# twin where the test compares with torch (TWINNED), every one where it does not.
EVERY = [pytest.param(spec, id=spec.name) for spec in SPECS.values()]
TWINNED = [p for p in EVERY if p.values[0].twin is not None]
SHAPES = [(7,), (4, 5), (), (33,)]


def kwargs_of(spec) -> dict:
    return dict(spec.example, **spec.ctor)


def make_params(seed: int = 0, dtype=torch.float32):
    return _make_params([(s, "contiguous") for s in SHAPES], dtype, seed)


def set_grads(params, step: int, nan_at: int | None = None) -> None:
    set_step_grads(params, step, nan_at)


assert_same = assert_same_optimizers


# -- copies --------------------------------------------------------------------------------
def _torch_save_load(opt):
    buffer = io.BytesIO()
    torch.save(opt, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


COPIES = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda opt: pickle.loads(pickle.dumps(opt)),
    "torch.save": _torch_save_load,
}


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("clip", ["ZClip", "AdaGC", "AutoClip", "AGC"])
@pytest.mark.parametrize("spec", EVERY)
def test_a_copy_steps_like_the_original(spec, clip, how):
    cls, kwargs = spec.fused, kwargs_of(spec)
    policy = {"ZClip": fusedclip.ZClip(warmup_steps=2), "AdaGC": fusedclip.AdaGC(warmup_steps=2),
              "AutoClip": fusedclip.AutoClip(history=4), "AGC": fusedclip.AGC(0.3)}[clip]
    opt = cls(make_params(), clip=policy, **kwargs)
    for step in range(4):
        set_grads(params_of(opt), step, nan_at=2)
        opt.step()
    twin = COPIES[how](opt)
    assert twin.clip_policy is not opt.clip_policy and repr(twin.clip_policy) == repr(policy)
    assert_same(twin, opt, f"{how}, just copied")
    for step in range(4, 10):
        set_grads(params_of(opt), step, nan_at=7)
        set_grads(params_of(twin), step, nan_at=7)
        opt.step()
        twin.step()
        assert_same(twin, opt, f"{how}, step {step}")
    assert int(twin.clip_stats["skipped"]) == 2


def test_a_copy_before_the_first_momentum_step():
    """SGD's buffers know whether they took their first step (a skipped
    first step leaves the next one a first step): a copy knows it too."""
    opt = fusedclip.FusedClipSGD(make_params(), lr=0.1, momentum=0.9)
    set_grads(params_of(opt), 0, nan_at=0)
    opt.step()  # skipped: the buffers exist, zero, and have not started
    twin = copy.deepcopy(opt)
    for o in (opt, twin):
        set_grads(params_of(o), 1)
        o.step()
    assert_same(twin, opt, "after the first good step")
    grads = [p.grad for p in params_of(opt)]
    assert all(torch.equal(opt.state[p]["momentum_buffer"], g)
               for p, g in zip(params_of(opt), grads))


# -- state dicts of older torch versions -------------------------------------------------------
NEW_KEYS = ("maximize", "foreach", "capturable", "differentiable", "fused",
            "decoupled_weight_decay")


@pytest.mark.parametrize("spec", TWINNED)
def test_old_state_dicts_load_as_torch_loads_them(spec):
    """A state dict without the param group keys newer torch added, and with
    float steps (torch < 1.12), loads into fusedclip as into torch, and both
    go on identically (bit for bit: fp32, no clipping)."""
    twin_cls, cls, kwargs = spec.twin, spec.fused, kwargs_of(spec)
    source = twin_cls(make_params(), **kwargs)
    for step in range(3):
        set_grads(params_of(source), step)
        source.step()
    old = copy.deepcopy(source.state_dict())
    for group in old["param_groups"]:
        for key in NEW_KEYS:
            group.pop(key, None)
    for state in old["state"].values():
        if "step" in state:
            state["step"] = float(state["step"])

    theirs = twin_cls(make_params(1), fused=True, **kwargs)
    ours = cls(make_params(1), **kwargs)
    theirs.load_state_dict(copy.deepcopy(old))
    ours.load_state_dict(copy.deepcopy(old))
    assert ours.state_dict()["param_groups"] == theirs.state_dict()["param_groups"]
    for group in theirs.param_groups:
        group["fused"] = True  # loading took the saved groups' default, fused=None
    for a, b in zip(params_of(ours), params_of(theirs)):
        a.data.copy_(b.data)
    for step in range(3, 7):
        set_grads(params_of(ours), step)
        set_grads(params_of(theirs), step)
        theirs.step()
        ours.step()
    for a, b in zip(params_of(ours), params_of(theirs)):
        assert torch.equal(a, b)
        for key, value in theirs.state[b].items():
            assert torch.equal(ours.state[a][key].cpu(), value.cpu()), key


# -- torch's implementation keywords ---------------------------------------------------------
@pytest.mark.parametrize("flags", [dict(fused=True), dict(fused=False), dict(foreach=True),
                                   dict(foreach=False), dict(differentiable=False),
                                   dict(capturable=True)], ids=str)
@pytest.mark.parametrize("spec", TWINNED)
def test_implementation_keywords_change_nothing(spec, flags):
    twin_cls, cls, kwargs = spec.twin, spec.fused, kwargs_of(spec)
    if "capturable" in flags and "capturable" not in inspect.signature(twin_cls).parameters:
        with pytest.raises(TypeError):  # torch's SGD and Adagrad have no such argument
            cls(make_params(), **flags)
        return
    plain, flagged = cls(make_params(), **kwargs), cls(make_params(), **kwargs, **flags)
    theirs = twin_cls(make_params(), **kwargs, **flags)
    assert flagged.defaults == theirs.defaults
    for step in range(3):
        for o in (plain, flagged):
            set_grads(params_of(o), step)
            o.step()
    for a, b in zip(params_of(plain), params_of(flagged)):
        assert torch.equal(a, b)
    assert flagged.state_dict()["param_groups"] == theirs.state_dict()["param_groups"]


@pytest.mark.parametrize("spec", TWINNED)
def test_implementation_keywords_torch_refuses(spec):
    cls = spec.fused
    with pytest.raises(RuntimeError, match="`fused` and `foreach` cannot be `True` together"):
        cls(make_params(), fused=True, foreach=True)
    with pytest.raises(RuntimeError, match="does not support differentiable=True"):
        cls(make_params(), differentiable=True)


@pytest.mark.parametrize("spec", TWINNED)
def test_hyperparameters_are_checked_before_the_parameters(spec):
    """With params=None torch reports the bad lr, not the missing parameters."""
    twin_cls, cls = spec.twin, spec.fused
    with pytest.raises(ValueError, match="Invalid learning rate: -0.5") as theirs:
        twin_cls(None, lr=-0.5)
    with pytest.raises(ValueError, match="Invalid learning rate: -0.5") as ours:
        cls(None, lr=-0.5)
    assert str(ours.value) == str(theirs.value)


# -- complex parameters ----------------------------------------------------------------------------
@pytest.mark.parametrize("clip", [None, 1.0, "PerTensorNorm", "AGC"])
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128], ids=str)
@pytest.mark.parametrize("spec", TWINNED)
def test_complex_parameters_train_as_torch_trains_them(spec, dtype, clip):
    """Complex parameters are optimized as their real views, state in torch's
    layout (complex tensors). Without clipping: bit for bit torch's fused
    step on the real views (next test); here against torch.optim's own
    complex path (for-loop/foreach, which rounds otherwise) plus torch's own
    clipping of the complex gradients (whose 2-norm is the norm of their real
    view) or, for AGC, timm's formula on the real views: within 1e-5."""
    twin_cls, cls, kwargs = spec.twin, spec.fused, kwargs_of(spec)
    gen = torch.Generator().manual_seed(3)
    shapes = [(4, 3), (5,), (), (2, 3, 2)]
    values = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    real = torch.nn.Parameter(torch.randn(6, generator=gen))
    ours = [torch.nn.Parameter(v.clone()) for v in values] + [torch.nn.Parameter(real.detach().clone())]
    theirs = [torch.nn.Parameter(v.clone()) for v in values] + [torch.nn.Parameter(real.detach().clone())]
    policy = {"PerTensorNorm": fusedclip.PerTensorNorm(0.5), "AGC": fusedclip.AGC(0.05)}.get(clip, clip)
    opt = cls(ours, clip=policy, **kwargs)
    topt = twin_cls(theirs, **kwargs)  # torch's fused step refuses complex parameters
    for step in range(5):
        for a, b in zip(ours, theirs):
            g = torch.randn(a.shape, generator=gen, dtype=a.dtype)
            a.grad, b.grad = g.clone(), g.clone()
        if clip == 1.0:
            norm = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
        elif clip == "PerTensorNorm":
            for p in theirs:
                torch.nn.utils.clip_grad_norm_([p], 0.5)
        elif clip == "AGC":
            for p in theirs:
                r, g = torch.view_as_real(p.detach()) if p.is_complex() else p.detach(), \
                    torch.view_as_real(p.grad) if p.is_complex() else p.grad
                dims = tuple(range(1, r.dim())) if p.dim() > 1 else None
                pn = torch.linalg.vector_norm(r, dim=dims, keepdim=p.dim() > 1).clamp(min=1e-3)
                gn = torch.linalg.vector_norm(g, dim=dims, keepdim=p.dim() > 1)
                max_norm = pn * 0.05
                g.copy_(torch.where(gn < max_norm, g, g * (max_norm / gn.clamp(min=1e-6))))
        topt.step()
        opt.step()
        if clip == 1.0:
            torch.testing.assert_close(opt.clip_stats["grad_norm"], norm.to(
                opt.clip_stats["grad_norm"].dtype))
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        for key, value in topt.state[b].items():
            mine = opt.state[a][key]
            assert mine.dtype == value.dtype and mine.shape == value.shape, key
            torch.testing.assert_close(mine.cpu(), value.cpu(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec", TWINNED)
def test_complex_parameters_are_their_real_views_bitwise(spec):
    """torch's fused step refuses complex parameters; on their real views it
    runs, and fusedclip on the complex parameters gives its bits exactly."""
    twin_cls, cls, kwargs = spec.twin, spec.fused, kwargs_of(spec)
    gen = torch.Generator().manual_seed(4)
    values = [torch.randn(s, generator=gen, dtype=torch.complex64) for s in [(4, 3), (5,), (9, 2)]]
    ours = [torch.nn.Parameter(v.clone()) for v in values]
    views = [torch.nn.Parameter(torch.view_as_real(v.clone())) for v in values]
    opt, topt = cls(ours, **kwargs), twin_cls(views, fused=True, **kwargs)
    for step in range(5):
        for a, b in zip(ours, views):
            g = torch.randn(a.shape, generator=gen, dtype=a.dtype)
            a.grad, b.grad = g.clone(), torch.view_as_real(g.clone())
        opt.step()
        topt.step()
    for a, b in zip(ours, views):
        assert torch.equal(torch.view_as_real(a.detach()), b.detach())
        for key, value in topt.state[b].items():
            mine = opt.state[a][key]
            mine = torch.view_as_real(mine) if mine.is_complex() else mine
            assert torch.equal(mine.cpu(), value.cpu()), key


# -- clip_stats --------------------------------------------------------------------------------------
POLICIES = {
    "none": None, "GlobalNorm": 1.0, "PerTensorNorm": fusedclip.PerTensorNorm(1.0),
    "ValueClip": fusedclip.ValueClip(0.5), "AGC": fusedclip.AGC(), "ZClip": fusedclip.ZClip(),
    "AdaGC": fusedclip.AdaGC(),
}


@pytest.mark.parametrize("nonfinite", ["skip", "propagate"])
@pytest.mark.parametrize("clip", list(POLICIES))
@pytest.mark.parametrize("spec", EVERY)
def test_clip_stats_has_the_same_keys_from_the_start(spec, clip, nonfinite):
    """Safe to log at any time: before the first step, on a gradient
    accumulation micro-step (no step), with clip=None, with nothing measured."""
    cls, kwargs = spec.fused, kwargs_of(spec)
    opt = cls(make_params(), clip=copy.deepcopy(POLICIES[clip]), nonfinite=nonfinite, **kwargs)
    keys = {"grad_norm", "clip_coef", "skipped"}
    if clip in ("PerTensorNorm", "AdaGC"):
        keys.add("tensor_norms")
    assert set(opt.clip_stats) == keys
    assert torch.isnan(opt.clip_stats["grad_norm"])  # nothing measured yet
    assert float(opt.clip_stats["clip_coef"]) == 1.0 and int(opt.clip_stats["skipped"]) == 0
    for step in range(3):
        set_grads(params_of(opt), step)  # a micro-step: gradients, no step()
        assert set(opt.clip_stats) == keys
        opt.step()
        assert set(opt.clip_stats) == keys
        measured = clip not in ("none", "ValueClip") or nonfinite == "skip"
        assert bool(torch.isnan(opt.clip_stats["grad_norm"])) == (not measured)
        if clip in ("none", "ValueClip"):
            assert float(opt.clip_stats["clip_coef"]) == 1.0


# -- a run that skips every step ---------------------------------------------------------------------
def _skipping_run(opt, steps: int, compiled: bool = False):
    step = torch.compile(opt.step) if compiled else opt.step
    caught = []
    for i in range(steps):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            set_grads(params_of(opt), i, nan_at=i)
            step()
            opt.zero_grad()
        caught.extend((i, w) for w in seen if issubclass(w.category, RuntimeWarning)
                      and "were all skipped" in str(w.message))
    return caught


@pytest.mark.parametrize("spec", EVERY)
def test_a_run_that_skips_every_step_says_so(spec):
    cls, kwargs = spec.fused, kwargs_of(spec)
    opt = cls(make_params(), **kwargs)
    caught = _skipping_run(opt, 100)
    assert [i for i, _ in caught] == [9, 99]  # after 10 in a row, then after 100
    assert "the last 10 steps were all skipped" in str(caught[0][1].message)
    assert int(opt.clip_stats["skipped"]) == 100
    assert opt.check_skips() == 100


def test_skip_warning_resets_after_a_good_step_and_can_be_silenced():
    opt = fusedclip.FusedClipAdamW(make_params())
    assert len(_skipping_run(opt, 9)) == 0
    set_grads(params_of(opt), 50)
    opt.step()
    assert opt.check_skips() == 0
    assert len(_skipping_run(opt, 9)) == 0  # the streak started over
    quiet = fusedclip.FusedClipAdamW(make_params())
    quiet.warn_after_skips = 0
    assert _skipping_run(quiet, 20) == []


def test_skip_warning_under_torch_compile():
    """The compiled step reads nothing on the host; zero_grad() does."""
    torch._dynamo.reset()
    opt = fusedclip.FusedClipAdamW(make_params(), clip=1.0)
    caught = _skipping_run(opt, 12, compiled=True)
    assert [i for i, _ in caught] == [9]


# -- settings that apply to a whole optimizer ------------------------------------------------------------
@pytest.mark.parametrize("key,value", [("clip", 1.0), ("nonfinite", "raise")])
@pytest.mark.parametrize("spec", EVERY)
def test_param_groups_may_not_set_optimizer_wide_keys(spec, key, value):
    cls, kwargs = spec.fused, kwargs_of(spec)
    params = make_params()
    with pytest.raises(ValueError, match=f"a param group may not set '{key}'"):
        cls([{"params": params[:2]}, {"params": params[2:], key: value}], **kwargs)
    opt = cls(params[:2], **kwargs)
    with pytest.raises(ValueError, match=f"a param group may not set '{key}'"):
        opt.add_param_group({"params": params[2:], key: value})
    assert len(opt.param_groups) == 1


def test_assigning_clip_replaces_the_policy():
    """opt.clip = ... is the policy from the next step on (it starts fresh)."""
    a, b = make_params(), make_params()
    opt = fusedclip.FusedClipAdamW(a, clip=fusedclip.ZClip(warmup_steps=2))
    ref = fusedclip.FusedClipAdamW(b, clip=0.25)
    for step in range(3):
        set_grads(a, step)
        opt.step()
    assert opt._policy_state
    opt.clip = 0.25
    assert isinstance(opt.clip, fusedclip.GlobalNorm) and opt.clip.max_norm == 0.25
    assert opt._policy_state == {} and int(opt.clip_stats["skipped"]) == 0
    for p, q in zip(a, b):
        q.data.copy_(p.data)
    ref.load_state_dict(copy.deepcopy(opt.state_dict()))  # loading shares tensors
    for step in range(3, 6):
        set_grads(a, step)
        set_grads(b, step)
        opt.step()
        ref.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q)
    with pytest.raises(TypeError, match="clip must be None, a float"):
        opt.clip = "1.0"
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        opt.nonfinite = "ignore"
    opt.nonfinite = "raise"
    set_grads(a, 9, nan_at=9)
    with pytest.raises(RuntimeError, match="inf or nan"):
        opt.step()


def test_print_shows_the_policy():
    opt = fusedclip.FusedClipSGD(make_params(), lr=0.1, clip=fusedclip.AGC(0.02))
    text = repr(opt)
    assert text.startswith("FusedClipSGD (\nParameter Group 0\n")
    assert "Clip policy: AGC(clip_factor=0.02, eps=0.001)" in text and "Nonfinite: skip" in text

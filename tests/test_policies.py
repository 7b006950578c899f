"""The clip policies of the registry (tests/registry.py, POLICIES: every case
of every policy fusedclip exports, each with its float64 reference) with
FusedClipAdam/AdamW: against the float64 reference (fusedclip/reference.py)
step for step, against the behaviour each one is named after (torch's
clip_grad_norm_ and clip_grad_value_, the AutoClip paper's code, zclip 1.0.0,
pytorch_optimizer 4.1.0's AdaGC, timm's adaptive_clip_grad), the skip paths,
state_dict round trips, argument checks and property checks; SpikeClip against
Adam's second moment (and refused by the optimizers without one); and, at the
end, ValueClip and AGC with FusedClipSGD, FusedClipAdagrad and FusedClipLion."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import fusedclip
from fusedclip import reference as ref
from fusedclip.clipping import ClipInputs

from helpers import (
    Problem, assert_close, assert_states_close, assert_unchanged, bitwise_equal, flat, set_grads,
    snapshot,
)
from registry import POLICIES, POLICY_OF_CASE, SPECS as OPTIMIZERS
from registry import (
    UPDATE_ENTRY_POINTS, assert_matches_reference, decode_update_call, policy_case, policy_cases,
    reference_case, spec_params,
)
from tolerances import NORM, REFERENCE, TORCH_PARITY

SPECS = [((5, 7), "contiguous"), ((), "contiguous"), ((0,), "contiguous"), ((6, 4), "transposed"),
         ((3, 8), "slice"), ((97,), "contiguous")]
# Gradient norms that vary, with spikes (steps 4, 7, 10) for the adaptive policies.
FACTORS = [1.0, 1.3, 0.8, 1.1, 6.0, 1.0, 0.9, 3.0, 1.2, 1.0, 12.0, 0.7, 1.0, 0.95]
STEPS = 14

# The policy cases of the registry (tests/registry.py, POLICIES): every case of
# every policy, each with its float64 reference; the optimizer runs below are
# FusedClipAdam/AdamW's, which take every policy.
CASES = policy_cases()
STATEFUL = [c for p in POLICIES.values() for c in p.stateful]


def fused_policy(case):
    return policy_case(case)


def reference_policy(case):
    return reference_case(case)


def _scope(case) -> str:
    return policy_case(case).scope  # a Chain's depends on its members


def _problem(dtype, seed=5) -> Problem:
    return Problem(
        groups=[{"specs": SPECS[:3], "lr": 0.01},
                {"specs": SPECS[3:], "lr": 0.003, "betas": (0.8, 0.99), "amsgrad": True}],
        dtype=dtype, grad_std=0.5, seed=seed,
    )


def _grads(problem, step):
    return [None if g is None else g * FACTORS[step] for g in problem.grads(step)]


def _poison(grads, value=math.inf):
    grads = list(grads)
    grads[0] = grads[0].clone()
    grads[0][1, 2] = value
    return grads


def _recording(policy):
    """Makes a reference policy remember the coefficients of its last call;
    one that keeps them itself (``last``: RefAGC, RefChain) keeps its own."""
    if hasattr(policy, "last"):
        return None
    last = []
    inner = policy.coefficients

    def coefficients(grads, keys):
        out = inner(grads, keys)
        last[:] = out
        return out

    policy.coefficients = coefficients
    return last


def _policy_state(opt) -> dict:
    """Exact copies of the policy's state (its own and per parameter)."""
    return {
        "state": {k: v.clone() for k, v in opt._policy_state.items()},
        "tensors": {id(p): {k: v.clone() for k, v in s.items()}
                    for p, s in opt._policy_tensor_state.items()},
    }


def _assert_same_policy_state(a: dict, b: dict, what: str) -> None:
    assert a["state"].keys() == b["state"].keys(), what
    for k in a["state"]:
        assert bitwise_equal(a["state"][k], b["state"][k]), f"{what}: {k}"
    assert a["tensors"].keys() == b["tensors"].keys(), what
    for pid in a["tensors"]:
        for k, v in a["tensors"][pid].items():
            assert bitwise_equal(v, b["tensors"][pid][k]), f"{what}: tensor state {k}"


def _assert_policy_state_matches(name, fopt, fparams, rpolicy, tol, what):
    """The fused policy's state against the reference policy's."""
    st = fopt._policy_state
    cls = POLICY_OF_CASE[name].name
    if cls == "ZClip" and rpolicy.initialized:
        assert_close(st["mean"], torch.tensor(rpolicy.mean, dtype=torch.float64), tol, f"{what} mean")
        assert_close(st["var"], torch.tensor(rpolicy.var, dtype=torch.float64), tol, f"{what} var")
    if cls == "AutoClip":
        assert_close(st["threshold"], torch.tensor(rpolicy.threshold, dtype=torch.float64), tol,
                     f"{what} threshold")
    if cls == "AdaGC":
        keys = [(gi, pi) for gi, g in enumerate(_problem(torch.float32).groups)
                for pi in range(len(g["specs"]))]
        for p, key in zip(fparams, keys):
            if key in rpolicy.gamma:
                gamma = fopt._policy_tensor_state[p]["gamma"]
                assert_close(gamma, rpolicy.gamma[key].to(gamma.dtype), tol, f"{what} gamma{key}")
                assert int(fopt._policy_tensor_state[p]["step"]) == rpolicy.step[key]


# -- against the float64 reference, step for step ---------------------------------------------
def _run_against_reference(name, dtype, kind="Adam", skip_steps=(), scaler_skip_steps=()):
    problem = _problem(dtype)
    tol = REFERENCE[dtype]
    fparams = problem.params()
    fopt = OPTIMIZERS[kind].make_fused(problem, fparams, {}, clip=fused_policy(name))
    rpolicy = reference_policy(name)
    last = _recording(rpolicy)
    rgroups = problem.reference_groups(problem.params(), OPTIMIZERS[kind].defaults)
    reference = ref.ReferenceAdam(rgroups, clip=rpolicy)
    fflat = flat(fparams)
    seen = []  # AGC's coefficients
    for step in range(STEPS):
        grads = _grads(problem, step)
        if step in skip_steps or step in scaler_skip_steps:
            before = _policy_state(fopt)
            if step in skip_steps:
                set_grads(fflat, _poison(grads))
                fopt.step()
            else:  # a GradScaler's found_inf: finite gradients, still skipped
                set_grads(fflat, [None if g is None else g * 8 for g in grads])
                fopt.grad_scale, fopt.found_inf = torch.tensor(8.0), torch.tensor(1.0)
                fopt.step()
                del fopt.grad_scale, fopt.found_inf
            _assert_same_policy_state(before, _policy_state(fopt), f"{name} skipped step {step}")
            continue
        set_grads(fflat, grads)
        fopt.step()
        reference.step(grads)
        coef = fopt.clip_stats["clip_coef"]
        if _scope(name) == "element":
            assert coef.shape == () and float(coef) == 1.0  # no coefficient: it clamps
        else:
            recorded = rpolicy.last if last is None else last
            if _scope(name) == "unit":  # per unit, gradient after gradient
                expected = torch.cat(recorded)
                seen.append(expected)
            else:
                expected = torch.stack(recorded) if coef.dim() else recorded[0]
            assert_close(coef.double(), expected.double(), tol, f"{name} step {step} clip_coef")
        if "tensor_norms" in fopt.clip_stats:
            present = [g for g in grads if g is not None]
            norms = torch.stack([ref.tensor_norm(g, fopt.clip_policy.norm_type) for g in present])
            got = fopt.clip_stats["tensor_norms"]
            assert_close(got, norms.to(got.dtype), NORM[dtype], f"{name} step {step} tensor_norms")
        _assert_policy_state_matches(name, fopt, fflat, rpolicy, tol, f"{name} step {step}")
        assert_matches_reference(OPTIMIZERS[kind], fopt, fflat, reference, problem, tol,
                                 f"{name} step {step}")
    if POLICY_OF_CASE[name].name == "AGC" and name != "AGC":
        # Both cases of AGC's rule: units clipped and units left alone.
        seen = torch.cat(seen)
        assert bool((seen < 1).any()) and bool((seen == 1).any()), name
    return fopt


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", CASES)
def test_matches_reference(name, dtype):
    _run_against_reference(name, dtype)


@pytest.mark.parametrize("name", CASES)
def test_skipped_steps_change_no_policy_state(name):
    """Non-finite gradients (nonfinite="skip") and a GradScaler's found_inf skip
    the step: the policy's state is bit for bit what it was, and the run goes on
    as the reference's, which never saw those steps."""
    opt = _run_against_reference(name, torch.float32, kind="AdamW", skip_steps=(2, 6),
                                 scaler_skip_steps=(3, 11))
    assert int(opt.clip_stats["skipped"]) == 4


@pytest.mark.parametrize("name", ["PerTensorNorm(0.4)", "AdaGC(warm4)", "ZClip(warm3)",
                                  "AGC(0.3)", "ValueClip(0.3)"])
def test_grad_scaler_unscales_the_norms(name):
    """Under a GradScaler (grad_scale set, gradients scaled), every policy sees
    the norms of the unscaled gradients."""
    problem = _problem(torch.float64)
    plain, scaled = problem.params(), problem.params()
    popt = OPTIMIZERS["Adam"].make_fused(problem, plain, {}, clip=fused_policy(name))
    sopt = OPTIMIZERS["Adam"].make_fused(problem, scaled, {}, clip=fused_policy(name))
    for step in range(8):
        grads = _grads(problem, step)
        set_grads(flat(plain), grads)
        set_grads(flat(scaled), [None if g is None else g * 1024 for g in grads])
        popt.step()
        sopt.grad_scale, sopt.found_inf = torch.tensor(1024.0), torch.tensor(0.0)
        sopt.step()
        del sopt.grad_scale, sopt.found_inf
        if "clip_coef" in popt.clip_stats or "clip_coef" in sopt.clip_stats:
            assert_close(sopt.clip_stats["clip_coef"], popt.clip_stats["clip_coef"],
                         REFERENCE[torch.float64], f"step {step}")
    assert_states_close(sopt, popt, flat(scaled), flat(plain), REFERENCE[torch.float64], name)


# -- against the behaviour each policy is named after ------------------------------------------
def _torch_run(problem, clip_fn, fused, dtype, norm_type=2.0, kind="Adam", defaults=None):
    """torch.optim.Adam after ``clip_fn(params)`` against FusedClipAdam(clip=fused)."""
    tparams, fparams = problem.params(), problem.params()
    topt = OPTIMIZERS[kind].make_torch(problem, tparams, defaults or {})
    fopt = OPTIMIZERS[kind].make_fused(problem, fparams, defaults or {}, clip=fused)
    tflat, fflat = flat(tparams), flat(fparams)
    for step in range(STEPS):
        grads = _grads(problem, step)
        set_grads(tflat, grads)
        set_grads(fflat, grads)
        clip_fn([p for p in tflat if p.grad is not None])
        topt.step()
        fopt.step()
        assert_states_close(fopt, topt, fflat, tflat, TORCH_PARITY[dtype], f"step {step}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("norm_type", [2.0, math.inf], ids=["l2", "inf"])
def test_per_tensor_norm_is_clip_grad_norm_per_tensor(norm_type, dtype):
    def clip(params):
        for p in params:
            if p.numel():  # torch raises on an empty tensor for the inf norm
                torch.nn.utils.clip_grad_norm_([p], 0.4, norm_type=norm_type)
    _torch_run(_problem(dtype), clip, fusedclip.PerTensorNorm(0.4, norm_type), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("policy", ["smooth", "normalize"])
def test_smooth_clip_and_normalize_scale_like_their_formula(policy, dtype):
    def clip(params):
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        coef = 2.0 / (2.0 + norm) if policy == "smooth" else 1.0 / (norm + 1e-6)
        for p in params:
            p.grad.mul_(coef)
    fused = fusedclip.SmoothClip(2.0) if policy == "smooth" else fusedclip.Normalize()
    _torch_run(_problem(dtype), clip, fused, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_autoclip_is_the_papers_autoclip_gradient(dtype):
    """Seetharaman et al.'s code (github.com/pseeth/autoclip): the history of
    norms, np.percentile, clip_grad_norm_; with a history longer than the run."""
    np = pytest.importorskip("numpy")
    history = []

    def autoclip_gradient(params):
        total = sum(p.grad.norm(2).item() ** 2 for p in params) ** 0.5
        history.append(total)
        torch.nn.utils.clip_grad_norm_(params, float(np.percentile(history, 30.0)))
    _torch_run(_problem(dtype), autoclip_gradient, fusedclip.AutoClip(30.0, history=100), dtype)


@pytest.mark.parametrize("history", [1, 2, 5, 7, 30])
@pytest.mark.parametrize("percentile", [0.0, 10.0, 37.5, 50.0, 99.0, 100.0])
def test_autoclip_percentile_is_numpys(percentile, history):
    """The device percentile of the ring buffer against np.percentile of the
    last  norms, and the reference's percentile_linear against both."""
    np = pytest.importorskip("numpy")
    policy = fusedclip.AutoClip(percentile, history)
    state, norms = policy.init_state(torch.device("cpu")), []
    g = torch.Generator().manual_seed(history)
    for step in range(12):
        norm = torch.rand((), generator=g, dtype=torch.float64) * 10
        if step == 5:
            norm = norms[-1] * torch.ones((), dtype=torch.float64)  # a tie
        norms.append(float(norm))
        state = policy.clip(ClipInputs(total_norm=norm, state=state)).state
        expected = float(np.percentile(norms[-history:], percentile))
        assert float(state["threshold"]) == expected
        assert ref.percentile_linear(norms[-history:], percentile) == expected


# zclip 1.0.0 (pip install zclip==1.0.0): values printed by tools/make_policy_pins.py, which, on the problem
# of _pinned_params/_pinned_grads, ran ZClip(**kwargs with max_grad_norm).step(model) and
# torch.optim.Adam(lr=0.01).step() for 12 steps, in float64 (zclip kept mean/var as Python
# floats); pytorch_optimizer 4.1.0 (pip install pytorch_optimizer==4.1.0): AdaGC(lr=0.01,
# weight_decay=0, **kwargs) for 12 steps in float32 (state["gamma"] per parameter). Per step:
# (mean, var) of the ZClip EMA (None during warm-up) or the gammas of the 3 parameters, and
# two parameter entries, p0[0, 0] and p1[2], after the step.
PINNED_SHAPES = [(5, 7), (3,), (4, 4)]
PINNED_ZCLIP_A_KWARGS = dict(alpha=0.8, z_thresh=1.5, max_norm=20.0, warmup_steps=3)
PINNED_ZCLIP_B_KWARGS = dict(alpha=0.9, z_thresh=1.0, max_norm=None, warmup_steps=2, mode="percentile")
PINNED_ADAGC_KWARGS = dict(beta=0.9, lambda_abs=3.0, lambda_rel=1.05, warmup_steps=4)
ZCLIP_A = [(None, None), (None, None), (7.76311220880222, 1.161125770997094), (8.069569548700633, 1.22943214056603), (8.087079658938531, 0.9845268451265629), (8.20832025025899, 0.8346591752492003), (7.91014993475224, 0.9522250587574218), (7.936488566135999, 0.7639999622160801), (7.958160011307106, 0.6127028546874378), (7.758003529912006, 0.6183626582922443), (7.761359694946482, 0.4947261709337592), (7.17109018306879, 1.5107188460344598)] 
ZCLIP_A_PARAMS = [(-2.320411800186323, 1.7440123564992713), (-2.325973420705589, 1.7516720309192002), (-2.330998028712065, 1.7536170435565972), (-2.3381160343865197, 1.7590979330002756), (-2.3462270423468286, 1.7630514447755314), (-2.3540844741583853, 1.7632873414812287), (-2.3617245764739954, 1.7653306312706036), (-2.36860403074749, 1.7666473476416142), (-2.3737937329273415, 1.7671426211607482), (-2.3777395162440222, 1.7685524715096645), (-2.379607503583064, 1.7699079985215738), (-2.3817386587619875, 1.7695738167197979)]
ZCLIP_B = [(None, None), (8.364933384863843, 0.6551224726270589), (8.184387032045356, 0.8536458080444183), (8.276779986757521, 0.8374265376915743), (8.368290999083447, 0.8215154334754342), (8.400790160729185, 0.7479190737400646), (8.232458011928792, 0.9026464361560984), (8.327465718782294, 0.8854961538691326), (8.299203726103217, 0.803416334346776), (8.165021113926056, 0.868914985538658), (8.258236723431045, 0.8524056008134233), (7.913414264643743, 1.73027551821346)] 
ZCLIP_B_PARAMS = [(-2.320411800186323, 1.7440123564992713), (-2.325973420705589, 1.7516720309192002), (-2.330998028712065, 1.7536170435565972), (-2.3381136075238724, 1.7590725655494168), (-2.346232205851122, 1.76290600796859), (-2.3540648265399766, 1.763026487764099), (-2.361655924104504, 1.764987383498103), (-2.368505600543066, 1.7661591379377486), (-2.3737092423727333, 1.7665237412634656), (-2.377695827137916, 1.7678236623621038), (-2.3793916593360733, 1.769096776091317), (-2.3813461219211827, 1.7686857691878206)]
ADAGC_GAMMA = [[2.5092933177948, 0.6246916055679321, 1.5209232568740845], [2.42061710357666, 0.6246916055679321, 1.5209232568740845], [2.1577749252319336, 0.6246916055679321, 1.5209232568740845], [2.1685638427734375, 0.6278150677680969, 1.528527855873108], [2.1794066429138184, 0.6309541463851929, 1.536170482635498], [2.1903035640716553, 0.6341089010238647, 1.543851375579834], [2.2012550830841064, 0.6372794508934021, 1.5515706539154053], [2.212261438369751, 0.6404658555984497, 1.559328556060791], [2.223322629928589, 0.6436681747436523, 1.5671252012252808], [2.2344391345977783, 0.6468865275382996, 1.5749608278274536], [2.2456111907958984, 0.6501209735870361, 1.5828356742858887], [2.2568392753601074, 0.6533715724945068, 1.5907498598098755]] 
ADAGC_PARAMS = [(-2.3204116821289062, 1.7440123558044434), (-2.326181173324585, 1.7515144348144531), (-2.331470489501953, 1.7528060674667358), (-2.3385865688323975, 1.75702965259552), (-2.3467063903808594, 1.759953498840332), (-2.3544955253601074, 1.7591294050216675), (-2.362311840057373, 1.7608577013015747), (-2.3693602085113525, 1.7620207071304321), (-2.3745362758636475, 1.7625054121017456), (-2.3782973289489746, 1.7639062404632568), (-2.3800437450408936, 1.76534903049469), (-2.3825316429138184, 1.7652311325073242)]


def _pinned_params(dtype):
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(dtype))
            for s in PINNED_SHAPES]


def _pinned_grads(step, dtype):
    g = torch.Generator().manual_seed(100 + step)
    return [(torch.randn(s, generator=g, dtype=torch.float64) * FACTORS[step]).to(dtype)
            for s in PINNED_SHAPES]


def _pinned_run(policy, dtype, eps=1e-8):
    params = _pinned_params(dtype)
    opt = fusedclip.FusedClipAdam(params, lr=0.01, eps=eps, clip=policy)
    for step in range(12):
        for p, g in zip(params, _pinned_grads(step, dtype)):
            p.grad = g
        opt.step()
        yield step, opt, params


@pytest.mark.parametrize("kwargs,states,values", [
    pytest.param(PINNED_ZCLIP_A_KWARGS, ZCLIP_A, ZCLIP_A_PARAMS, id="zscore-adaptive"),
    pytest.param(PINNED_ZCLIP_B_KWARGS, ZCLIP_B, ZCLIP_B_PARAMS, id="percentile-nomax"),
])
def test_zclip_matches_zclip_1_0_0(kwargs, states, values):
    tol = REFERENCE[torch.float64]
    for step, opt, params in _pinned_run(fusedclip.ZClip(**kwargs), torch.float64):
        mean, var = states[step]
        if mean is not None:
            assert_close(opt._policy_state["mean"], torch.tensor(mean, dtype=torch.float64), tol, f"mean {step}")
            assert_close(opt._policy_state["var"], torch.tensor(var, dtype=torch.float64), tol, f"var {step}")
        got = torch.stack([params[0][0, 0], params[1][2]]).detach()
        assert_close(got, torch.tensor(values[step], dtype=torch.float64), tol, f"params {step}")


def test_adagc_matches_pytorch_optimizer_4_1_0():
    """pytorch_optimizer's AdaGC sums the squared global norm in float32 (also for
    float64 gradients), so it is pinned in float32."""
    tol = REFERENCE[torch.float32]
    for step, opt, params in _pinned_run(fusedclip.AdaGC(**PINNED_ADAGC_KWARGS), torch.float32):
        gammas = torch.stack([opt._policy_tensor_state[p]["gamma"] for p in params])
        assert_close(gammas, torch.tensor(ADAGC_GAMMA[step]), tol, f"gamma {step}")
        got = torch.stack([params[0][0, 0], params[1][2]]).detach()
        assert_close(got, torch.tensor(ADAGC_PARAMS[step]), tol, f"params {step}")


def test_against_the_installed_packages():
    """Where zclip 1.0.0 and pytorch_optimizer 4.1.0 are installed (not in CI),
    the pinned runs once more against them directly, in float32 and float64."""
    zclip = pytest.importorskip("zclip")
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    from importlib.metadata import version
    if version("zclip") != "1.0.0" or version("pytorch_optimizer") != "4.1.0":
        pytest.skip("other versions installed")

    class Model(torch.nn.Module):
        def __init__(self, ps):
            super().__init__()
            self.ps = torch.nn.ParameterList(ps)

    for dtype in (torch.float32, torch.float64):
        # pytorch_optimizer's float32 global norm: float32 rounding also for float64.
        tol = REFERENCE[torch.float32]
        for kwargs in (PINNED_ZCLIP_A_KWARGS, PINNED_ZCLIP_B_KWARGS):
            theirs = _pinned_params(dtype)
            model, topt = Model(theirs), torch.optim.Adam(theirs, lr=0.01)
            z = zclip.ZClip(**{("max_grad_norm" if k == "max_norm" else k): v for k, v in kwargs.items()})
            for step, opt, ours in _pinned_run(fusedclip.ZClip(**kwargs), dtype):
                for p, g in zip(theirs, _pinned_grads(step, dtype)):
                    p.grad = g
                z.step(model)
                topt.step()
                for a, b in zip(ours, theirs):
                    assert_close(a.detach(), b.detach(), tol, f"zclip {dtype} step {step}")
        theirs = _pinned_params(dtype)
        topt = pytorch_optimizer.AdaGC(theirs, lr=0.01, weight_decay=0.0, **PINNED_ADAGC_KWARGS)
        for step, opt, ours in _pinned_run(fusedclip.AdaGC(**PINNED_ADAGC_KWARGS), dtype):
            for p, g in zip(theirs, _pinned_grads(step, dtype)):
                p.grad = g
            topt.step()
            for a, b in zip(ours, theirs):
                assert_close(a.detach(), b.detach(), tol, f"AdaGC {dtype} step {step}")
                assert_close(opt._policy_tensor_state[a]["gamma"],
                             topt.state[b]["gamma"].to(opt._policy_tensor_state[a]["gamma"].dtype),
                             tol, f"AdaGC gamma {dtype} step {step}")


# -- state_dict ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", STATEFUL)
def test_state_dict_round_trip(name):
    """Saved after 5 steps and loaded into a new optimizer (policy state included,
    per-parameter state keyed by the state_dict's parameter ids), training goes on
    bit for bit as without the hand-over."""
    problem = _problem(torch.float32)
    straight, first = problem.params(), problem.params()
    sopt = OPTIMIZERS["Adam"].make_fused(problem, straight, {}, clip=fused_policy(name))
    fopt = OPTIMIZERS["Adam"].make_fused(problem, first, {}, clip=fused_policy(name))
    for step in range(5):
        grads = _grads(problem, step)
        set_grads(flat(straight), grads)
        set_grads(flat(first), grads)
        sopt.step()
        fopt.step()
    saved = copy.deepcopy(fopt.state_dict())
    assert saved["clip_policy"]["policy"] == POLICY_OF_CASE[name].name
    second = problem.params()
    with torch.no_grad():
        for a, b in zip(flat(first), flat(second)):
            a.add_(1.0)  # the old optimizer's parameters are not the new one's
    nopt = OPTIMIZERS["Adam"].make_fused(problem, second, {}, clip=fused_policy(name))
    with torch.no_grad():
        for a, b in zip(flat(straight), flat(second)):
            b.copy_(a)
    nopt.load_state_dict(saved)
    for step in range(5, STEPS):
        grads = _grads(problem, step)
        set_grads(flat(straight), grads)
        set_grads(flat(second), grads)
        sopt.step()
        nopt.step()
        fopt.step()  # must not share state with nopt
    for a, b in zip(flat(straight), flat(second)):
        assert bitwise_equal(a.detach(), b.detach())
    before = {"state": sopt._policy_state,
              "tensors": {id(p): s for p, s in sopt._policy_tensor_state.items()}}
    after = {"state": nopt._policy_state,
             "tensors": {id(p): s for p, s in zip(flat(straight), [nopt._policy_tensor_state.get(q)
                                                                   for q in flat(second)]) if s}}
    before["tensors"] = {id(p): sopt._policy_tensor_state[p] for p in flat(straight)
                         if p in sopt._policy_tensor_state}
    _assert_same_policy_state(before, after, name)


@pytest.mark.parametrize("name", STATEFUL)
def test_torch_optimizer_loads_a_policy_state_dict(name):
    """torch.optim.Adam loads a fusedclip state_dict with policy state (it reads
    only "state" and "param_groups") and goes on as FusedClipAdam without
    clipping would; a torch state_dict back into fusedclip starts the policy afresh."""
    problem = _problem(torch.float64)
    fparams, tparams = problem.params(), problem.params()
    fopt = OPTIMIZERS["Adam"].make_fused(problem, fparams, {}, clip=fused_policy(name))
    for step in range(4):
        set_grads(flat(fparams), _grads(problem, step))
        fopt.step()
    saved = fopt.state_dict()
    assert "clip_policy" in saved
    topt = OPTIMIZERS["Adam"].make_torch(problem, tparams, {})
    topt.load_state_dict(copy.deepcopy(saved))
    assert "clip_policy" not in topt.state_dict()
    plain = OPTIMIZERS["Adam"].make_fused(problem, fparams, {})
    plain.load_state_dict(copy.deepcopy(saved))
    with torch.no_grad():
        for a, b in zip(flat(fparams), flat(tparams)):
            b.copy_(a)
    for step in range(4, 8):
        grads = _grads(problem, step)
        set_grads(flat(fparams), grads)
        set_grads(flat(tparams), grads)
        plain.step()
        topt.step()
    assert_states_close(plain, topt, flat(fparams), flat(tparams), TORCH_PARITY[torch.float64], name)
    fresh = OPTIMIZERS["Adam"].make_fused(problem, problem.params(), {}, clip=fused_policy(name))
    fresh.load_state_dict(topt.state_dict())
    assert fresh._policy_state == {} and fresh._policy_tensor_state == {}


def test_state_dict_of_another_policy_is_refused():
    problem = _problem(torch.float32)
    params = problem.params()
    opt = OPTIMIZERS["Adam"].make_fused(problem, params, {}, clip=fused_policy("ZClip(warm3)"))
    set_grads(flat(params), _grads(problem, 0))
    opt.step()
    other = OPTIMIZERS["Adam"].make_fused(problem, problem.params(), {}, clip=fusedclip.AutoClip())
    with pytest.raises(ValueError, match="clip policy 'ZClip'"):
        other.load_state_dict(opt.state_dict())


def test_stateless_policies_add_nothing_to_the_state_dict():
    problem = _problem(torch.float32)
    for name in ("PerTensorNorm(0.4)", "SmoothClip(2.0)", "Normalize"):
        params = problem.params()
        opt = OPTIMIZERS["Adam"].make_fused(problem, params, {}, clip=fused_policy(name))
        set_grads(flat(params), _grads(problem, 0))
        opt.step()
        assert set(opt.state_dict()) == {"state", "param_groups"}


@pytest.mark.parametrize("kind,defaults", [("Adam", {}), ("AdamW", dict(maximize=True))],
                         ids=["Adam", "AdamW-maximize"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_value_clip_is_clip_grad_value_(dtype, kind, defaults):
    _torch_run(_problem(dtype), lambda params: torch.nn.utils.clip_grad_value_(params, 0.3),
               fusedclip.ValueClip(0.3), dtype, kind=kind, defaults=defaults)


def test_value_clip_propagates_like_torch():
    """nonfinite="propagate": clip_grad_value_ turns inf into +-clip_value and
    keeps NaN, and so does ValueClip; no norm pass is needed then."""
    problem = _problem(torch.float32)
    tparams, fparams = problem.params(), problem.params()
    topt = OPTIMIZERS["Adam"].make_torch(problem, tparams, {})
    fopt = OPTIMIZERS["Adam"].make_fused(problem, fparams, {}, clip=fusedclip.ValueClip(0.3),
                          nonfinite="propagate")
    tflat, fflat = flat(tparams), flat(fparams)
    for step in range(4):
        grads = _grads(problem, step)
        if step == 1:
            grads = _poison(grads, math.inf)
        if step == 2:
            grads = _poison(grads, math.nan)
        set_grads(tflat, grads)
        set_grads(fflat, grads)
        torch.nn.utils.clip_grad_value_([p for p in tflat if p.grad is not None], 0.3)
        topt.step()
        fopt.step()
        assert torch.isnan(fopt.clip_stats["grad_norm"])  # no norm pass: nothing measured
        assert_states_close(fopt, topt, fflat, tflat, TORCH_PARITY[torch.float32], f"step {step}",
                            equal_nan=True)
    assert bool(fflat[0].isnan().any())


def timm_adaptive_clip_grad(parameters, clip_factor=0.01, eps=1e-3, norm_type=2.0):
    """timm.utils.agc.adaptive_clip_grad (huggingface/pytorch-image-models,
    timm/utils/agc.py), literally."""
    def unitwise_norm(x, norm_type=2.0):
        if x.ndim <= 1:
            return x.norm(norm_type)
        else:
            return x.norm(norm_type, dim=tuple(range(1, x.ndim)), keepdim=True)

    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    for p in parameters:
        if p.grad is None:
            continue
        p_data = p.detach()
        g_data = p.grad.detach()
        max_norm = unitwise_norm(p_data, norm_type=norm_type).clamp_(min=eps).mul_(clip_factor)
        grad_norm = unitwise_norm(g_data, norm_type=norm_type)
        clipped_grad = g_data * (max_norm / grad_norm.clamp(min=1e-6))
        new_grads = torch.where(grad_norm < max_norm, g_data, clipped_grad)
        p.grad.detach().copy_(new_grads)


AGC_SPECS = [((5, 7), "contiguous"), ((4, 3, 2, 2), "channels_last"), ((6, 4), "transposed"),
             ((3, 8), "slice"), ((97,), "contiguous"), ((), "contiguous"), ((0,), "contiguous"),
             ((2, 20000), "contiguous"), ((7000, 3), "contiguous")]


@pytest.mark.parametrize("kind,defaults", [("Adam", {}), ("AdamW", dict(maximize=True))],
                         ids=["Adam", "AdamW-maximize"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("kwargs", [dict(), dict(clip_factor=0.3), dict(clip_factor=0.5, eps=3.0)],
                         ids=["default", "0.3", "0.5-eps3"])
def test_agc_is_timms_adaptive_clip_grad(kwargs, dtype, kind, defaults):
    """timm's adaptive_clip_grad then torch.optim.Adam/AdamW, against
    FusedClipAdam(clip=AGC(...)): every layout (stand-ins for units), units
    that span CPU chunks (2 x 20000) and chunks that start inside a unit."""
    problem = Problem(groups=[{"specs": AGC_SPECS[:4], "lr": 0.01},
                              {"specs": AGC_SPECS[4:], "lr": 0.003, "amsgrad": True}],
                      dtype=dtype, grad_std=0.5, seed=11)
    _torch_run(problem, lambda params: timm_adaptive_clip_grad(params, **kwargs),
               fusedclip.AGC(**kwargs), dtype, kind=kind, defaults=defaults)


def test_agc_unit_norms_come_from_one_read_of_grads_and_params(monkeypatch):
    """The norm pass: one multi_tensor_unit_norm over the gradients (global
    norm, flag, unit norms) and one over the parameters per bucket, and no
    other norm op; the update op gets one coefficient per unit."""
    problem = _problem(torch.float32)
    params = problem.params()
    opt = OPTIMIZERS["Adam"].make_fused(problem, params, {}, clip=fusedclip.AGC(0.3))
    calls = []
    for name in ("multi_tensor_norm", "multi_tensor_unit_norm") + UPDATE_ENTRY_POINTS:
        inner = getattr(fusedclip.ops, name)

        def spy(*args, _inner=inner, _name=name, **kwargs):
            calls.append((_name, args, kwargs))
            return _inner(*args, **kwargs)
        monkeypatch.setattr(fusedclip.ops, name, spy)
    set_grads(flat(params), _grads(problem, 0))
    opt.step()
    present = [p for p in flat(params) if p.grad is not None]
    norm_calls = [c for c in calls if c[0] not in UPDATE_ENTRY_POINTS]
    assert [c[0] for c in norm_calls] == ["multi_tensor_unit_norm"] * 2
    assert all(a is b.grad for a, b in zip(norm_calls[0][1][0], present))
    assert all(a is b for a, b in zip(norm_calls[1][1][0], present))
    updates = [decode_update_call(*c) for c in calls if c[0] in UPDATE_ENTRY_POINTS]
    assert updates
    for call in updates:
        assert call["rule"] == "adam"
        assert call["clip_coef"] is None and call["clip_value"] is None
        assert [c.numel() for c in call["unit_coefs"]] == fusedclip.ops.unit_counts(call["params"])


# -- no host sync ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CASES)
def test_step_reads_no_device_value(name, monkeypatch):
    """With float lr, a step reads no tensor value on the host (no .item(),
    .tolist(), bool/float/int of a tensor), so it never waits on a device."""
    problem = _problem(torch.float32)
    params = problem.params()
    opt = OPTIMIZERS["AdamW"].make_fused(problem, params, {}, clip=fused_policy(name))

    def forbidden(*args, **kwargs):
        raise AssertionError("host sync in the step")

    for step in range(6):
        set_grads(flat(params), _grads(problem, step) if step != 3 else _poison(_grads(problem, step)))
        with monkeypatch.context() as m:
            for attr in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__",
                         "__index__"):
                m.setattr(torch.Tensor, attr, forbidden)
            opt.step()
    assert int(opt.clip_stats["skipped"]) == 1


# -- arguments -------------------------------------------------------------------------------------
BAD = [
    (fusedclip.PerTensorNorm, dict(max_norm=-1.0), ValueError, "max_norm"),
    (fusedclip.PerTensorNorm, dict(max_norm=1.0, norm_type=1.0), ValueError, "norm_type"),
    (fusedclip.PerTensorNorm, dict(max_norm=math.nan), ValueError, "max_norm"),
    (fusedclip.PerTensorNorm, dict(max_norm="1"), TypeError, "max_norm"),
    (fusedclip.SmoothClip, dict(threshold=0.0), ValueError, "threshold"),
    (fusedclip.SmoothClip, dict(threshold=math.inf), ValueError, "threshold"),
    (fusedclip.Normalize, dict(eps=0.0), ValueError, "eps"),
    (fusedclip.Normalize, dict(eps=-1e-6), ValueError, "eps"),
    (fusedclip.AutoClip, dict(percentile=-1.0), ValueError, "percentile"),
    (fusedclip.AutoClip, dict(percentile=100.5), ValueError, "percentile"),
    (fusedclip.AutoClip, dict(history=0), ValueError, "history"),
    (fusedclip.AutoClip, dict(history=2.5), TypeError, "history"),
    (fusedclip.ZClip, dict(alpha=1.0), ValueError, "alpha"),
    (fusedclip.ZClip, dict(alpha=0.0), ValueError, "alpha"),
    (fusedclip.ZClip, dict(z_thresh=0.0), ValueError, "z_thresh"),
    (fusedclip.ZClip, dict(max_norm=0.0), ValueError, "max_norm"),
    (fusedclip.ZClip, dict(eps=-1.0), ValueError, "eps"),
    (fusedclip.ZClip, dict(warmup_steps=-1), ValueError, "warmup_steps"),
    (fusedclip.ZClip, dict(mode="median"), ValueError, "mode"),
    (fusedclip.ZClip, dict(clip_option="max"), ValueError, "clip_option"),
    (fusedclip.ZClip, dict(clip_factor=0.0), ValueError, "clip_factor"),
    (fusedclip.ZClip, dict(skip_update_on_spike=1), TypeError, "skip_update_on_spike"),
    (fusedclip.AdaGC, dict(beta=1.0), ValueError, "beta"),
    (fusedclip.AdaGC, dict(beta=-0.1), ValueError, "beta"),
    (fusedclip.AdaGC, dict(lambda_abs=0.0), ValueError, "lambda_abs"),
    (fusedclip.AdaGC, dict(lambda_rel=-1.0), ValueError, "lambda_rel"),
    (fusedclip.AdaGC, dict(warmup_steps=-1), ValueError, "warmup_steps"),
    (fusedclip.AdaGC, dict(eps=-1e-8), ValueError, "eps"),
    (fusedclip.ValueClip, dict(clip_value=0.0), ValueError, "clip_value"),
    (fusedclip.ValueClip, dict(clip_value=-0.5), ValueError, "clip_value"),
    (fusedclip.ValueClip, dict(clip_value=math.inf), ValueError, "clip_value"),
    (fusedclip.ValueClip, dict(clip_value=math.nan), ValueError, "clip_value"),
    (fusedclip.ValueClip, dict(clip_value="1"), TypeError, "clip_value"),
    (fusedclip.AGC, dict(clip_factor=0.0), ValueError, "clip_factor"),
    (fusedclip.AGC, dict(clip_factor=-0.01), ValueError, "clip_factor"),
    (fusedclip.AGC, dict(clip_factor=math.inf), ValueError, "clip_factor"),
    (fusedclip.AGC, dict(eps=-1e-3), ValueError, "eps"),
    (fusedclip.AGC, dict(eps=math.nan), ValueError, "eps"),
    (fusedclip.SpikeClip, dict(theta=0.0), ValueError, "theta"),
    (fusedclip.SpikeClip, dict(theta=-1.0), ValueError, "theta"),
    (fusedclip.SpikeClip, dict(theta=math.inf), ValueError, "theta"),
    (fusedclip.SpikeClip, dict(theta=math.nan), ValueError, "theta"),
    (fusedclip.SpikeClip, dict(theta="5000"), TypeError, "theta"),
]


@pytest.mark.parametrize("cls,kwargs,error,match", BAD,
                         ids=[f"{c.__name__}-{'-'.join(k)}-{i}" for i, (c, k, _, _) in enumerate(BAD)])
def test_bad_arguments(cls, kwargs, error, match):
    with pytest.raises(error, match=f"{cls.__name__}: {match}"):
        cls(**kwargs)


def test_good_arguments_and_repr():
    for name in CASES:
        policy = fused_policy(name)
        assert repr(policy).startswith(POLICY_OF_CASE[name].name + "(")
    assert fusedclip.ZClip(mode="Percentile").mode == "percentile"
    assert fusedclip.PerTensorNorm(1, norm_type="inf").norm_type == math.inf
    assert fusedclip.AdaGC(warmup_steps=0).warmup_steps == 0
    assert fusedclip.AGC(eps=0).eps == 0.0
    assert fusedclip.ValueClip(2).clip_value == 2.0
    assert repr(fusedclip.SpikeClip()) == "SpikeClip(theta=5000.0)"


# -- properties of GlobalNorm and PerTensorNorm ---------------------------------------------------
def _random_grads(seed: int, dtype):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 6, (), generator=g))
    scale = float(10 ** torch.empty(()).uniform_(-3, 3, generator=g))
    return [(torch.randn(int(torch.randint(0, 300, (), generator=g)), generator=g,
                         dtype=torch.float64) * scale).to(dtype) for _ in range(n)]


def _clip(policy, grads):
    """The gradients as the policy clips them (through its ClipInputs interface)."""
    norms, total, _ = fusedclip.ops.multi_tensor_norm(grads, policy.norm_type)
    coef = policy.clip(ClipInputs(total_norm=total, tensor_norms=[norms], state={})).coef
    if isinstance(coef, list):
        return [g * c.to(g.dtype) for g, c in zip(grads, coef[0])]
    return [g * coef.to(g.dtype) for g in grads]


@pytest.mark.parametrize("norm_type", [2.0, math.inf], ids=["l2", "inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("cls", [fusedclip.GlobalNorm, fusedclip.PerTensorNorm])
def test_clipped_norms_are_at_most_max_norm(cls, dtype, norm_type):
    """After clipping, the global norm (GlobalNorm) or every tensor's norm
    (PerTensorNorm) is at most max_norm to rounding; a tensor already within
    it is left exactly as it was (PerTensorNorm: whatever the others do)."""
    eps = torch.finfo(dtype).eps
    for seed in range(40):
        grads = _random_grads(seed, dtype)
        units = [grads] if cls is fusedclip.GlobalNorm else [[g] for g in grads]
        before = [float(ref.global_norm(u, norm_type)) for u in units]
        max_norm = max(before) * [0.01, 0.5, 0.999, 1.5, 100.0][seed % 5] + 1e-30
        clipped = _clip(cls(max_norm, norm_type), grads)
        cunits = [clipped] if cls is fusedclip.GlobalNorm else [[g] for g in clipped]
        for u, cu, b in zip(units, cunits, before):
            after = float(ref.global_norm(cu, norm_type))
            assert after <= max_norm * (1 + 8 * eps), (seed, after, max_norm)
            if b + 1e-6 <= max_norm:
                assert all(torch.equal(x, y) for x, y in zip(u, cu)), seed


@pytest.mark.parametrize("norm_type", [2.0, math.inf], ids=["l2", "inf"])
@pytest.mark.parametrize("cls", [fusedclip.GlobalNorm, fusedclip.PerTensorNorm])
def test_clipping_twice_changes_nothing(cls, norm_type):
    """Clipping clipped gradients again scales each by 1, less at most torch's
    1e-6 / max_norm."""
    for seed in range(20):
        grads = _random_grads(seed, torch.float64)
        max_norm = float(ref.global_norm(grads, norm_type)) * 0.3 + 1e-3
        policy = cls(max_norm, norm_type)
        once = _clip(policy, grads)
        twice = _clip(policy, once)
        for a, b in zip(once, twice):
            nonzero = a != 0
            ratio = b[nonzero] / a[nonzero]
            assert bool(((ratio <= 1.0) & (ratio >= 1.0 - 2e-6 / max_norm)).all()), seed


def test_agc_with_mixed_dtypes_is_timms():
    """Parameters of two dtypes: two norm buckets, each with its own unit norms
    and coefficients; clip_stats["clip_coef"] lists the units in parameter order."""
    torch.manual_seed(3)
    shapes = [((6, 5), torch.float32), ((4,), torch.float64), ((3, 2, 2), torch.float32),
              ((5, 3), torch.float64)]
    init = [torch.randn(s, dtype=d) for s, d in shapes]
    tparams = [torch.nn.Parameter(x.clone()) for x in init]
    fparams = [torch.nn.Parameter(x.clone()) for x in init]
    topt = torch.optim.Adam(tparams, lr=0.01)
    fopt = fusedclip.FusedClipAdam(fparams, lr=0.01, clip=fusedclip.AGC(0.3))
    for step in range(6):
        grads = [torch.randn_like(x) * (0.5 + step) for x in init]
        for t, f, g in zip(tparams, fparams, grads):
            t.grad, f.grad = g.clone(), g.clone()
        expected = []
        for t in tparams:
            before = t.grad.clone()
            timm_adaptive_clip_grad([t], clip_factor=0.3)
            unit = before if before.dim() <= 1 else before.flatten(1)
            after = t.grad if t.grad.dim() <= 1 else t.grad.flatten(1)
            ratio = (after / unit).reshape(unit.shape[0], -1)[:, 0] if unit.dim() > 1 else (after / unit)[:1]
            expected.append(ratio.double())
        topt.step()
        fopt.step()
        for t, f in zip(tparams, fparams):
            assert_close(f.detach(), t.detach(), TORCH_PARITY[t.dtype], f"step {step}")
        coef = fopt.clip_stats["clip_coef"]
        assert coef.shape == (6 + 1 + 3 + 5,)
        assert_close(coef.double(), torch.cat(expected), TORCH_PARITY[torch.float32], f"coef {step}")


# -- ValueClip and AGC with FusedClipSGD, FusedClipAdagrad and FusedClipLion ------------------
# Every policy works with every optimizer (SpikeClip with those that keep a
# second moment); the per-tensor and global policies reach SGD, Adagrad and
# Lion through clip_coef like Adam (test_parity.py, test_reference.py),
# ValueClip and AGC through the shared gradient transform.
# Configurations as data: id -> (kind, hyperparameters).
FAMILY_CONFIGS = {
    "SGD-momentum": ("SGD", dict(momentum=0.9, dampening=0.1, weight_decay=0.01)),
    "SGD-nesterov-max": ("SGD", dict(momentum=0.8, nesterov=True, maximize=True)),
    "Adagrad": ("Adagrad", dict(lr_decay=0.01, weight_decay=0.01, initial_accumulator_value=0.1)),
    "Lion-wd-betas": ("Lion", dict(weight_decay=0.5, betas=(0.8, 0.95))),
    "Lion-max": ("Lion", dict(maximize=True)),
}
# The configurations of the optimizers with a torch twin (for the runs against torch).
TWIN_CONFIGS = [c for c, (kind, _) in FAMILY_CONFIGS.items() if OPTIMIZERS[kind].twin is not None]
FAMILY_POLICIES = ["ValueClip(0.3)", "AGC(0.3)", "AGC(0.5,eps3)"]
# Steps of the reference run skipped by non-finite gradients (step 0: the first
# step, so SGD's buffers start later) and by a GradScaler's found_inf, and one
# under a GradScaler that is not skipped (scaled gradients, unscaled norms).
FAMILY_NONFINITE_SKIPS, FAMILY_SCALER_SKIPS, FAMILY_SCALED = (0, 6), (3,), (9,)


def _family_problem(dtype, specs=SPECS, seed=5) -> Problem:
    return Problem(groups=[{"specs": specs[:4], "lr": 0.01}, {"specs": specs[4:], "lr": 0.003}],
                   dtype=dtype, grad_std=0.5, seed=seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16],
                         ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("config", list(FAMILY_CONFIGS))
@pytest.mark.parametrize("name", FAMILY_POLICIES)
def test_family_matches_reference(name, config, dtype):
    """FusedClipSGD / FusedClipAdagrad / FusedClipLion with ValueClip and AGC
    against the float64 reference step for step (bfloat16: against the
    reference that rounds to it after every step), with skipped steps (non-finite gradients,
    a GradScaler's found_inf) that change nothing and that the reference never
    sees, and a GradScaler step whose gradients are scaled."""
    kind, defaults = FAMILY_CONFIGS[config]
    problem = _family_problem(dtype)
    tol = REFERENCE[dtype]
    fparams = problem.params()
    fopt = OPTIMIZERS[kind].make_fused(problem, fparams, defaults, clip=fused_policy(name))
    rpolicy = reference_policy(name)
    reference = OPTIMIZERS[kind].make_reference(problem, problem.params(), rpolicy, defaults)
    fflat = flat(fparams)
    agc = _scope(name) == "unit"
    seen = []
    for step in range(STEPS):
        grads = _grads(problem, step)
        if step in FAMILY_NONFINITE_SKIPS or step in FAMILY_SCALER_SKIPS:
            before = snapshot(fopt, fflat)
            stateless = not any(p in fopt.state for p in fflat)
            if step in FAMILY_NONFINITE_SKIPS:
                set_grads(fflat, _poison(grads, math.nan if step else math.inf))
                fopt.step()
            else:
                set_grads(fflat, [None if g is None else g * 8 for g in grads])
                fopt.grad_scale, fopt.found_inf = torch.tensor(8.0), torch.tensor(1.0)
                fopt.step()
                del fopt.grad_scale, fopt.found_inf
            what = f"{name} {config} skipped step {step}"
            if stateless:
                # State made lazily (SGD's buffers, Lion's exp_avg) is made for
                # the first step, and stays zero
                for p, b in zip(fflat, before["params"]):
                    assert bitwise_equal(p.detach(), b), what
                    assert not any(v.any() for v in fopt.state[p].values()), what
            else:
                assert_unchanged(fopt, fflat, before, what)
            continue
        if step in FAMILY_SCALED:
            set_grads(fflat, [None if g is None else g * 1024 for g in grads])
            fopt.grad_scale, fopt.found_inf = torch.tensor(1024.0), torch.tensor(0.0)
            fopt.step()
            del fopt.grad_scale, fopt.found_inf
        else:
            set_grads(fflat, grads)
            fopt.step()
        reference.step(grads)
        coef = fopt.clip_stats.get("clip_coef")
        if agc:
            expected = torch.cat(rpolicy.last)
            seen.append(expected)
            assert_close(coef.double(), expected, tol, f"{name} {config} step {step} clip_coef")
        else:
            assert coef.shape == () and float(coef) == 1.0  # no coefficient: it clamps
        assert_matches_reference(OPTIMIZERS[kind], fopt, fflat, reference, problem, tol,
                                        f"{name} {config} step {step}")
    n_skipped = len(FAMILY_NONFINITE_SKIPS) + len(FAMILY_SCALER_SKIPS)
    assert int(fopt.clip_stats["skipped"]) == n_skipped and reference.skipped == 0
    if agc:  # both cases of the rule: units clipped and units left alone
        seen = torch.cat(seen)
        assert bool((seen < 1).any()) and bool((seen == 1).any()), name
    else:  # the clamp mattered: elements beyond the clip value in every step
        assert all(any(bool((g.abs() > 0.3).any()) for g in _grads(problem, s) if g is not None)
                   for s in range(STEPS))


def _family_torch_run(config, problem, clip_fn, fused, dtype, skip_steps=(2, 7)):
    """torch.optim.SGD/Adagrad after ``clip_fn(params)`` against the fused class
    with clip=fused. In skip_steps the gradients hold inf: the fused step skips
    (nonfinite="skip") and torch does not step at all, as under a GradScaler."""
    kind, defaults = FAMILY_CONFIGS[config]
    tparams, fparams = problem.params(), problem.params()
    topt = OPTIMIZERS[kind].make_torch(problem, tparams, defaults)
    fopt = OPTIMIZERS[kind].make_fused(problem, fparams, defaults, clip=fused)
    tflat, fflat = flat(tparams), flat(fparams)
    for step in range(STEPS):
        grads = _grads(problem, step)
        if step in skip_steps:
            set_grads(fflat, _poison(grads))
            fopt.step()
        else:
            set_grads(tflat, grads)
            set_grads(fflat, grads)
            clip_fn([p for p in tflat if p.grad is not None])
            topt.step()
            fopt.step()
        assert_states_close(fopt, topt, fflat, tflat, TORCH_PARITY[dtype],
                                   f"{config} step {step}")
    assert int(fopt.clip_stats["skipped"]) == len(skip_steps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("config", TWIN_CONFIGS)
def test_family_value_clip_is_clip_grad_value_(config, dtype):
    _family_torch_run(config, _family_problem(dtype),
                      lambda params: torch.nn.utils.clip_grad_value_(params, 0.3),
                      fusedclip.ValueClip(0.3), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("config", TWIN_CONFIGS)
@pytest.mark.parametrize("kwargs", [dict(clip_factor=0.3), dict(clip_factor=0.5, eps=3.0)],
                         ids=["0.3", "0.5-eps3"])
def test_family_agc_is_timms_adaptive_clip_grad(kwargs, config, dtype):
    """timm's adaptive_clip_grad then torch.optim.SGD/Adagrad, against the fused
    class with clip=AGC(...): every layout, units that span CPU chunks and
    chunks that start inside a unit."""
    problem = Problem(groups=[{"specs": AGC_SPECS[:4], "lr": 0.01},
                              {"specs": AGC_SPECS[4:], "lr": 0.003}],
                      dtype=dtype, grad_std=0.5, seed=11)
    _family_torch_run(config, problem, lambda params: timm_adaptive_clip_grad(params, **kwargs),
                      fusedclip.AGC(**kwargs), dtype)


# -- SpikeClip: against Adam's second moment -------------------------------------------------
# Larger than _problem's tensors (one spans CPU chunks), with 20x gradient spikes.
SPIKE_SHAPES = [(7,), (33, 17), (), (0,), (40000,), (5, 4, 3)]
SPIKE_STEPS, SPIKES, SPIKE_NAN = 8, (3, 6), 5


def _spike_params(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype))
            for s in SPIKE_SHAPES]


def _spike_grads(params, step, nan_at=None, spikes=SPIKES):
    gen = torch.Generator().manual_seed(100 + step)
    grads = []
    for i, p in enumerate(params):
        g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        g *= 20.0 if step in spikes else 1.0
        if step == nan_at and i == 0:
            g[0] = math.nan
        grads.append(g.to(p.dtype))
    return grads


@pytest.mark.parametrize("kind", ["Adam", "AdamW"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(POLICIES["SpikeClip"].cases))
def test_spike_clip_clips_spikes_as_its_reference(case, dtype, kind):
    """Spikes (steps of 20x gradients) are clipped against v as it was before
    the step; a first step (v = 0) passes; a step with a NaN gradient is
    skipped and changes nothing. (AdamW: maximize too.)"""
    spec = OPTIMIZERS[kind]
    params = _spike_params(dtype)
    group = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1,
                 maximize=kind == "AdamW")
    opt = spec.fused(params, clip=fused_policy(case), **group)
    reference = spec.reference([{**spec.defaults, **group, "params": params}],
                               clip=reference_policy(case),
                               round_to=dtype if dtype == torch.bfloat16 else None)
    theta = fused_policy(case).theta
    clipped_some = False
    for step in range(SPIKE_STEPS):
        grads = _spike_grads(params, step, nan_at=SPIKE_NAN)
        for p, g in zip(params, grads):
            p.grad = g
        if step == SPIKES[0]:
            v = [opt.state[p]["exp_avg_sq"].double() for p in params]
            clipped_some = any(bool(((g.double() ** 2) > theta * x)[x > 0].any())
                               for g, x in zip(grads, v) if g.numel())
        opt.step()
        reference.step(grads)
        scale = max(float(e.abs().max()) for e in reference.params() if e.numel())
        for i, (p, e) in enumerate(zip(params, reference.params())):
            assert_close(p.detach().double(), e, REFERENCE[dtype], f"{case} step {step} [{i}]",
                         scale=scale)
    assert clipped_some, "the test must clip a spike"
    assert int(opt.clip_stats["skipped"]) == 1 and float(opt.clip_stats["clip_coef"]) == 1.0


def test_spike_clip_changes_only_spikes():
    """Without a spike, SpikeClip is the plain step bit for bit. (theta is huge:
    after one step v is only (1 - beta2) g^2, and a normal gradient that was
    tiny in the first step is a spike in the second for theta = 1e6.)"""
    a, b = _spike_params(torch.float32), _spike_params(torch.float32)
    clipped = fusedclip.FusedClipAdamW(a, lr=1e-3, clip=fusedclip.SpikeClip(1e30))
    plain = fusedclip.FusedClipAdamW(b, lr=1e-3)
    for step in range(5):
        for p, q, g in zip(a, b, _spike_grads(a, step, spikes=())):
            p.grad, q.grad = g, g.clone()
        clipped.step()
        plain.step()
    assert all(torch.equal(p, q) for p, q in zip(a, b))


@pytest.mark.parametrize("spec", spec_params(
    s for s in OPTIMIZERS.values() if not POLICIES["SpikeClip"].applies_to(s)))
def test_spike_clip_needs_a_second_moment(spec):
    """The optimizers whose rule keeps no second moment refuse SpikeClip by
    name, at construction and when assigned. (Their ops refuse spike_theta:
    test_ops.py::test_update_op_errors[<rule>-spike-without-second-moment].)"""
    with pytest.raises(ValueError, match="reads the optimizer state 'exp_avg_sq'"):
        spec.fused(_spike_params(torch.float32), lr=0.1, clip=fusedclip.SpikeClip())
    opt = spec.fused(_spike_params(torch.float32), lr=0.1)
    with pytest.raises(ValueError, match="reads the optimizer state 'exp_avg_sq'"):
        opt.clip = fusedclip.SpikeClip()

"""fusedclip.Chain: clip policies applied one after the other.

Against the float64 reference RefChain (the Ref policies composed in order),
against literal torch sequences (timm's AGC, clip_grad_norm_, clip_grad_value_,
per-tensor clipping, SPAM's spike clip, then torch.optim's fused step), a
chain of one policy against that policy alone, member state through skipped
steps and state_dict hand-overs, and the chains refused. (torch.compile and
the CUDA no-sync check run the registry's Chain entries: tests/registry.py.)
"""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch

import fusedclip
from fusedclip import reference as ref
from fusedclip.clipping import Chain

from helpers import Problem, assert_close, assert_states_close, bitwise_equal, flat, set_grads
from registry import SPECS as OPTIMIZERS
from registry import assert_matches_reference
from tolerances import REFERENCE, TORCH_PARITY

SPECS = [((5, 7), "contiguous"), ((), "contiguous"), ((0,), "contiguous"), ((6, 4), "transposed"),
         ((4, 3, 2, 2), "channels_last"), ((3, 8), "slice"), ((97,), "contiguous"),
         ((0, 3), "contiguous")]
# Gradient norms that vary, with spikes (steps 4, 7, 10) for the adaptive members.
FACTORS = [1.0, 1.3, 0.8, 1.1, 6.0, 1.0, 0.9, 3.0, 1.2, 1.0, 12.0, 0.7, 1.0, 0.95, 1.1, 0.9]
STEPS = len(FACTORS)
INF = math.inf

# The members as data: name -> (class name, kwargs); fusedclip.<class> and
# reference.Ref<class> are made from the same kwargs.
MEMBERS = {
    "GlobalNorm": ("GlobalNorm", dict(max_norm=1.0)),
    "GlobalNorm(0.6)": ("GlobalNorm", dict(max_norm=0.6)),
    "GlobalNorm-inf": ("GlobalNorm", dict(max_norm=0.3, norm_type=INF)),
    "PerTensorNorm": ("PerTensorNorm", dict(max_norm=0.4)),
    "PerTensorNorm-inf": ("PerTensorNorm", dict(max_norm=0.2, norm_type=INF)),
    "SmoothClip": ("SmoothClip", dict(threshold=2.0)),
    "AGC": ("AGC", dict(clip_factor=0.3)),
    "AGC(0.5,eps3)": ("AGC", dict(clip_factor=0.5, eps=3.0)),
    "AutoClip": ("AutoClip", dict(percentile=60.0, history=5)),
    "ZClip": ("ZClip", dict(alpha=0.8, z_thresh=1.5, max_norm=20.0, warmup_steps=3)),
    "ZClip(pct)": ("ZClip", dict(alpha=0.9, z_thresh=0.5, max_norm=None, warmup_steps=4,
                                 mode="percentile", skip_update_on_spike=True)),
    "AdaGC": ("AdaGC", dict(beta=0.9, lambda_abs=3.0, warmup_steps=4)),
    "ValueClip": ("ValueClip", dict(clip_value=0.05)),
    "ValueClip(0.02)": ("ValueClip", dict(clip_value=0.02)),
    "SpikeClip": ("SpikeClip", dict(theta=2.0)),
    "SpikeClip(5)": ("SpikeClip", dict(theta=5.0)),
}
# Chains by the names of their members, in order.
CHAINS = {
    "AGC>GlobalNorm": ("AGC", "GlobalNorm"),
    "GlobalNorm>AGC": ("GlobalNorm(0.6)", "AGC"),
    "PerTensorNorm>GlobalNorm": ("PerTensorNorm", "GlobalNorm(0.6)"),
    "GlobalNorm>PerTensorNorm>ValueClip": ("GlobalNorm", "PerTensorNorm", "ValueClip"),
    "inf:GlobalNorm>PerTensorNorm": ("GlobalNorm-inf", "PerTensorNorm-inf"),
    "AGC>PerTensorNorm>SmoothClip": ("AGC(0.5,eps3)", "PerTensorNorm", "SmoothClip"),
    "PerTensorNorm>AGC": ("PerTensorNorm", "AGC"),
    "ZClip>AdaGC": ("ZClip", "AdaGC"),
    "AutoClip>AGC>AdaGC>ValueClip": ("AutoClip", "AGC", "AdaGC", "ValueClip"),
    "ZClip>ZClip": ("ZClip", "ZClip(pct)"),
    "ValueClip>ValueClip": ("ValueClip", "ValueClip(0.02)"),
    "GlobalNorm>SpikeClip": ("GlobalNorm", "SpikeClip"),
    "AGC>SpikeClip>ValueClip": ("AGC", "SpikeClip", "ValueClip"),
    "SpikeClip>SpikeClip": ("SpikeClip(5)", "SpikeClip"),
}
STATEFUL = ["ZClip>AdaGC", "AutoClip>AGC>AdaGC>ValueClip", "ZClip>ZClip"]


def member(name):
    cls, kwargs = MEMBERS[name]
    return getattr(fusedclip, cls)(**kwargs)


def ref_member(name):
    cls, kwargs = MEMBERS[name]
    return getattr(ref, f"Ref{cls}")(**kwargs)


def fused_chain(name):
    return Chain(*map(member, CHAINS[name]))


def ref_chain(name):
    return ref.RefChain(*map(ref_member, CHAINS[name]))


def applies(name, spec) -> bool:
    """Whether optimizer ``spec`` takes the chain (SpikeClip reads Adam's second moment)."""
    return "SpikeClip" in spec.policies or not any("Spike" in m for m in CHAINS[name])


def _problem(dtype, seed=5) -> Problem:
    return Problem(
        groups=[{"specs": SPECS[:4], "lr": 0.01},
                {"specs": SPECS[4:], "lr": 0.003}],
        dtype=dtype, grad_std=0.5, seed=seed,
    )


def _grads(problem, step):
    return [None if g is None else g * FACTORS[step] for g in problem.grads(step)]


def _poisoned(grads):
    grads = list(grads)
    grads[0] = grads[0].clone()
    grads[0][1, 2] = math.nan
    return grads


def _policy_state(opt) -> dict:
    """Exact copies of the policy's state (its own and per parameter)."""
    return {"state": {k: v.clone() for k, v in opt._policy_state.items()},
            "tensors": [{k: v.clone() for k, v in opt._policy_tensor_state.get(p, {}).items()}
                        for p in flat_params(opt)]}


def flat_params(opt):
    return [p for group in opt.param_groups for p in group["params"]]


def _assert_same_policy_state(a: dict, b: dict, what: str, rename=lambda key: key) -> None:
    """Bit for bit; ``rename`` maps a key of ``a`` to ``b``'s."""
    assert {rename(k) for k in a["state"]} == set(b["state"]), what
    for k, v in a["state"].items():
        assert bitwise_equal(v, b["state"][rename(k)]), f"{what}: {k}"
    for sa, sb in zip(a["tensors"], b["tensors"]):
        assert {rename(k) for k in sa} == set(sb), what
        for k, v in sa.items():
            assert bitwise_equal(v, sb[rename(k)]), f"{what}: tensor state {k}"


def _assert_members_match(fopt, rchain, problem, tol, what):
    """The stateful members' state against their references'."""
    state = fopt._policy_state
    params = flat_params(fopt)
    keys = [(gi, pi) for gi, g in enumerate(problem.groups) for pi in range(len(g["specs"]))]
    for i, (m, r) in enumerate(zip(fopt.clip_policy.policies, rchain.policies)):
        prefix = f"{i}.{type(m).__name__}."
        if isinstance(m, fusedclip.ZClip) and r.initialized:
            assert_close(state[prefix + "mean"], torch.tensor(r.mean, dtype=torch.float64), tol,
                         f"{what} {prefix}mean")
            assert_close(state[prefix + "var"], torch.tensor(r.var, dtype=torch.float64), tol,
                         f"{what} {prefix}var")
        if isinstance(m, fusedclip.AutoClip):
            assert_close(state[prefix + "threshold"],
                         torch.tensor(r.threshold, dtype=torch.float64), tol,
                         f"{what} {prefix}threshold")
        if isinstance(m, fusedclip.AdaGC):
            for p, key in zip(params, keys):
                if key in r.gamma:
                    gamma = fopt._policy_tensor_state[p][prefix + "gamma"]
                    assert_close(gamma, r.gamma[key].to(gamma.dtype), tol, f"{what} gamma{key}")
                    assert int(fopt._policy_tensor_state[p][prefix + "step"]) == r.step[key]


# -- against the float64 reference ---------------------------------------------------------------
def _run_against_reference(name, spec, dtype, skip_steps=()):
    problem = _problem(dtype)
    tol = REFERENCE[dtype]
    fparams = problem.params()
    fopt = spec.make_fused(problem, fparams, spec.ctor, clip=fused_chain(name))
    rchain = ref_chain(name)
    reference = spec.make_reference(problem, problem.params(), clip=rchain, ctor=spec.ctor)
    fflat = flat(fparams)
    for step in range(STEPS):
        grads = _grads(problem, step)
        if step in skip_steps:
            before = _policy_state(fopt)
            set_grads(fflat, _poisoned(grads))
            fopt.step()
            _assert_same_policy_state(before, _policy_state(fopt), f"{name} skipped step {step}")
            continue
        set_grads(fflat, grads)
        fopt.step()
        reference.step(grads)
        _assert_members_match(fopt, rchain, problem, tol, f"{name} step {step}")
        assert_matches_reference(spec, fopt, fflat, reference, problem, tol,
                                 f"{spec.name} {name} step {step}")
    return fopt


DTYPES = [torch.float32, torch.float64, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("name", list(CHAINS))
def test_matches_reference(name, dtype):
    """Every chain, with AdamW (every member applies), in each dtype."""
    _run_against_reference(name, OPTIMIZERS["AdamW"], dtype)


def _optimizer_cases():
    for spec in OPTIMIZERS.values():
        for name in ("AGC>PerTensorNorm>SmoothClip", "AutoClip>AGC>AdaGC>ValueClip",
                     "GlobalNorm>SpikeClip"):
            if applies(name, spec):
                yield pytest.param(spec, name, id=f"{spec.name}-{name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("spec,name", list(_optimizer_cases()))
def test_every_optimizer_matches_reference(spec, name, dtype):
    _run_against_reference(name, spec, dtype)


@pytest.mark.parametrize("name", STATEFUL)
def test_skipped_steps_change_no_member_state(name):
    """Non-finite gradients in steps 3 and 9 skip the step: every member's
    state is bit for bit what it was, and the run goes on as the reference's,
    which never saw those steps."""
    opt = _run_against_reference(name, OPTIMIZERS["Adam"], torch.float32, skip_steps=(3, 9))
    assert int(opt.clip_stats["skipped"]) == 2


def test_buckets_of_several_dtypes_match_reference():
    """float32 and float64 parameters in one optimizer (two norm buckets,
    per-tensor and per-unit coefficients in each, a global norm over both)
    against the reference, within float32's tolerance for all of them (the
    float64 ones are clipped by coefficients of float32 norms too)."""
    dtypes = [torch.float32, torch.float64, torch.float32, torch.float64, torch.float32]
    shapes = [(5, 7), (6, 4), (9,), (), (4, 3, 2)]
    gen = torch.Generator().manual_seed(2)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(d))
              for s, d in zip(shapes, dtypes)]
    chain = Chain(fusedclip.AGC(0.3), fusedclip.ZClip(alpha=0.8, warmup_steps=3),
                  fusedclip.AdaGC(beta=0.9, lambda_abs=3.0, warmup_steps=4),
                  fusedclip.PerTensorNorm(0.4), fusedclip.ValueClip(0.05))
    rchain = ref.RefChain(ref.RefAGC(0.3), ref.RefZClip(alpha=0.8, warmup_steps=3),
                          ref.RefAdaGC(beta=0.9, lambda_abs=3.0, warmup_steps=4),
                          ref.RefPerTensorNorm(0.4), ref.RefValueClip(0.05))
    opt = fusedclip.FusedClipAdamW(params, lr=0.01, clip=chain)
    reference = ref.ReferenceAdam([dict(params=list(params), lr=0.01, betas=(0.9, 0.999),
                                        eps=1e-8, weight_decay=0.01, amsgrad=False,
                                        maximize=False, decoupled_weight_decay=True)],
                                  clip=rchain)
    for step in range(STEPS):
        grads = [torch.randn(s, generator=gen, dtype=torch.float64).to(d) * FACTORS[step] * 0.5
                 for s, d in zip(shapes, dtypes)]
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        reference.step(grads)
        for i, (p, r) in enumerate(zip(params, reference.params())):
            assert_close(p.detach().double(), r, REFERENCE[torch.float32],
                         f"step {step} param {i} {p.dtype}")


# -- against torch: the member's torch functions one after the other -------------------------------
def timm_adaptive_clip_grad(parameters, clip_factor=0.01, eps=1e-3, norm_type=2.0):
    """timm.utils.agc.adaptive_clip_grad, as timm writes it."""
    def unitwise_norm(x, norm_type=2.0):
        if x.ndim <= 1:
            return x.norm(norm_type)
        return x.norm(norm_type, dim=tuple(range(1, x.ndim)), keepdim=True)

    for p in parameters:
        if p.grad is None:
            continue
        p_data, g_data = p.detach(), p.grad.detach()
        max_norm = unitwise_norm(p_data, norm_type=norm_type).clamp_(min=eps).mul_(clip_factor)
        grad_norm = unitwise_norm(g_data, norm_type=norm_type)
        clipped_grad = g_data * (max_norm / grad_norm.clamp(min=1e-6))
        p.grad.detach().copy_(torch.where(grad_norm < max_norm, g_data, clipped_grad))


def per_tensor_clip(parameters, max_norm, norm_type=2.0):
    for p in parameters:
        torch.nn.utils.clip_grad_norm_([p], max_norm, norm_type)


def spike_clip(parameters, opt, theta):
    """SPAM's spike clip against the optimizer's exp_avg_sq before its step."""
    for p in parameters:
        state = opt.state.get(p)
        if not state:
            continue
        v = state["exp_avg_sq"]
        bound = theta * v
        g = p.grad
        g.copy_(torch.where((g * g > bound) & (v > 0), torch.sign(g) * torch.sqrt(bound), g))


# name -> (chain, torch's clipping of (params, torch optimizer), optimizers)
TORCH_SEQUENCES = {
    "AGC>GlobalNorm": (
        lambda: Chain(fusedclip.AGC(0.01), fusedclip.GlobalNorm(1.0)),
        lambda ps, opt: (timm_adaptive_clip_grad(ps, 0.01, eps=1e-3),
                         torch.nn.utils.clip_grad_norm_(ps, 1.0)),
        ("AdamW", "SGD")),
    "GlobalNorm>AGC": (
        lambda: Chain(fusedclip.GlobalNorm(0.6), fusedclip.AGC(0.3)),
        lambda ps, opt: (torch.nn.utils.clip_grad_norm_(ps, 0.6),
                         timm_adaptive_clip_grad(ps, 0.3)),
        ("AdamW",)),
    "PerTensorNorm>GlobalNorm>ValueClip": (
        lambda: Chain(fusedclip.PerTensorNorm(0.4), fusedclip.GlobalNorm(0.6),
                      fusedclip.ValueClip(0.05)),
        lambda ps, opt: (per_tensor_clip(ps, 0.4), torch.nn.utils.clip_grad_norm_(ps, 0.6),
                         torch.nn.utils.clip_grad_value_(ps, 0.05)),
        ("AdamW", "SGD")),
    "inf:AGC>PerTensorNorm": (
        lambda: Chain(fusedclip.AGC(0.3), fusedclip.PerTensorNorm(0.2, norm_type=INF)),
        None,  # (AGC is a 2-norm policy: refused with an inf-norm member, see below)
        ()),
    "inf:GlobalNorm>PerTensorNorm": (
        lambda: Chain(fusedclip.GlobalNorm(0.3, norm_type=INF),
                      fusedclip.PerTensorNorm(0.2, norm_type=INF)),
        lambda ps, opt: (torch.nn.utils.clip_grad_norm_(ps, 0.3, INF),
                         per_tensor_clip(ps, 0.2, INF)),
        ("AdamW", "SGD")),
    "AGC>PerTensorNorm": (
        lambda: Chain(fusedclip.AGC(0.5, eps=3.0), fusedclip.PerTensorNorm(0.4)),
        lambda ps, opt: (timm_adaptive_clip_grad(ps, 0.5, eps=3.0), per_tensor_clip(ps, 0.4)),
        ("AdamW", "SGD")),
    "GlobalNorm>SpikeClip": (
        lambda: Chain(fusedclip.GlobalNorm(1.0), fusedclip.SpikeClip(2.0)),
        lambda ps, opt: (torch.nn.utils.clip_grad_norm_(ps, 1.0), spike_clip(ps, opt, 2.0)),
        ("AdamW",)),
    "AGC>ValueClip>SpikeClip": (
        lambda: Chain(fusedclip.AGC(0.3), fusedclip.ValueClip(0.05), fusedclip.SpikeClip(2.0)),
        lambda ps, opt: (timm_adaptive_clip_grad(ps, 0.3),
                         torch.nn.utils.clip_grad_value_(ps, 0.05), spike_clip(ps, opt, 2.0)),
        ("AdamW",)),
    "AGC>SpikeClip>ValueClip": (
        lambda: Chain(fusedclip.AGC(0.3), fusedclip.SpikeClip(2.0), fusedclip.ValueClip(0.05)),
        lambda ps, opt: (timm_adaptive_clip_grad(ps, 0.3), spike_clip(ps, opt, 2.0),
                         torch.nn.utils.clip_grad_value_(ps, 0.05)),
        ("AdamW",)),
}
# Contiguous (torch's fused CPU steps assume it) and not empty (torch's inf-norm
# clip_grad_norm_ refuses an empty gradient); the reference tests have both.
TORCH_SPECS = [((5, 7), "contiguous"), ((), "contiguous"), ((6, 4), "contiguous"),
               ((4, 3, 2, 2), "contiguous"), ((3, 8), "contiguous"), ((97,), "contiguous")]
TORCH_OPTIMIZERS = {
    "AdamW": (lambda groups: torch.optim.AdamW(groups, fused=True),
              dict(weight_decay=0.1, amsgrad=True)),
    "SGD": (lambda groups: torch.optim.SGD(groups, momentum=0.9, nesterov=True, fused=True),
            dict(momentum=0.9, nesterov=True)),
}


def _torch_cases():
    for name, (_, clip_fn, kinds) in TORCH_SEQUENCES.items():
        for kind in kinds:
            yield pytest.param(name, kind, id=f"{kind}-{name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name,kind", list(_torch_cases()))
def test_is_the_torch_sequence(name, kind, dtype):
    """The chain against its members' torch functions run one after the
    other on the gradients, then torch.optim's fused step, for 16 steps."""
    make_chain, clip_fn, _ = TORCH_SEQUENCES[name]
    make_torch, options = TORCH_OPTIMIZERS[kind]
    problem = Problem(groups=[{"specs": TORCH_SPECS[:3], "lr": 0.01, **options},
                              {"specs": TORCH_SPECS[3:], "lr": 0.003, **options}],
                      dtype=dtype, grad_std=0.5, seed=11)
    tparams, fparams = problem.params(), problem.params()
    topt = make_torch(problem.param_groups(tparams))
    fopt = OPTIMIZERS[kind].make_fused(problem, fparams, {}, clip=make_chain())
    tflat, fflat = flat(tparams), flat(fparams)
    for step in range(STEPS):
        grads = _grads(problem, step)
        set_grads(tflat, grads)
        set_grads(fflat, grads)
        clip_fn([p for p in tflat if p.grad is not None], topt)
        topt.step()
        fopt.step()
        assert_states_close(fopt, topt, fflat, tflat, TORCH_PARITY[dtype], f"{name} step {step}")


def test_value_and_spike_clip_commute():
    """The update clamps the value, then the spikes, whatever the members'
    order: both are clamps of the magnitude, so the orders agree; here on
    elements at both bounds, compared bit for bit in float64 (where torch's
    sqrt is correctly rounded, as the kernels' is)."""
    gen = torch.Generator().manual_seed(3)
    v = torch.rand(4000, generator=gen, dtype=torch.float64) * 4
    v[::7] = 0
    theta = 2.0
    g = torch.sqrt(theta * v) * (1 + (torch.rand(4000, generator=gen, dtype=torch.float64) - .5)
                                 * 1e-12)
    g[1::3] *= -1
    clip = float(g.abs().median())

    def spike(x):
        bound = theta * v
        return torch.where((x * x > bound) & (v > 0), torch.sign(x) * torch.sqrt(bound), x)

    value_first = spike(torch.clamp(g, -clip, clip))
    spike_first = torch.clamp(spike(g), -clip, clip)
    assert bitwise_equal(value_first, spike_first)
    assert bool((value_first != g).any())


# -- a chain of one -------------------------------------------------------------------------------
ONE = ["GlobalNorm", "GlobalNorm-inf", "PerTensorNorm", "SmoothClip", "AGC", "AutoClip", "ZClip",
       "AdaGC", "ValueClip", "SpikeClip"]


@pytest.mark.parametrize("name", ONE)
def test_chain_of_one_is_the_policy(name):
    """Chain(p) is p bit for bit: parameters, optimizer state, clip_stats and
    the member's state (under its prefixed keys), with a skipped step."""
    problem = _problem(torch.float32)
    alone_params, chain_params = problem.params(), problem.params()
    spec = OPTIMIZERS["Adam"]
    alone = spec.make_fused(problem, alone_params, {}, clip=member(name))
    chained = spec.make_fused(problem, chain_params, {}, clip=Chain(member(name)))
    prefix = f"0.{MEMBERS[name][0]}."
    for step in range(STEPS):
        grads = _grads(problem, step)
        if step == 5:
            grads = _poisoned(grads)
        for opt, params in ((alone, alone_params), (chained, chain_params)):
            set_grads(flat(params), grads)
            opt.step()
        what = f"{name} step {step}"
        for a, b in zip(flat(alone_params), flat(chain_params)):
            assert bitwise_equal(a.detach(), b.detach()), what
            for key, value in alone.state.get(a, {}).items():
                assert bitwise_equal(chained.state[b][key], value), f"{what} {key}"
        assert alone.clip_stats.keys() == chained.clip_stats.keys()
        for key, value in alone.clip_stats.items():
            assert bitwise_equal(chained.clip_stats[key], value), f"{what} clip_stats {key}"
        _assert_same_policy_state(_policy_state(alone), _policy_state(chained), what,
                                  rename=lambda key: prefix + key)
    assert int(chained.clip_stats["skipped"]) == 1


# -- state ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", STATEFUL)
def test_state_dict_round_trip(name):
    """Saved after 6 steps (one of them skipped) and loaded into a new
    optimizer, every member's state included, training goes on bit for bit as
    without the hand-over."""
    problem = _problem(torch.float32)
    spec = OPTIMIZERS["AdamW"]
    straight, first = problem.params(), problem.params()
    sopt = spec.make_fused(problem, straight, {}, clip=fused_chain(name))
    fopt = spec.make_fused(problem, first, {}, clip=fused_chain(name))
    for step in range(6):
        grads = _grads(problem, step) if step != 2 else _poisoned(_grads(problem, step))
        for opt, params in ((sopt, straight), (fopt, first)):
            set_grads(flat(params), grads)
            opt.step()
    saved = copy.deepcopy(fopt.state_dict())
    policy = saved["clip_policy"]
    assert policy["policy"] == "Chain"
    # Each member's state under its own prefix: two of one class apart.
    prefixes = {key.split(".")[0] + "." + key.split(".")[1] for key in policy["state"]} | {
        key.split(".")[0] + "." + key.split(".")[1]
        for s in policy["tensor_state"].values() for key in s}
    assert prefixes == {f"{i}.{MEMBERS[m][0]}" for i, m in enumerate(CHAINS[name])
                        if MEMBERS[m][0] in ("AutoClip", "ZClip", "AdaGC")}
    second = problem.params()
    nopt = spec.make_fused(problem, second, {}, clip=fused_chain(name))
    with torch.no_grad():
        for a, b in zip(flat(straight), flat(second)):
            b.copy_(a)
    nopt.load_state_dict(saved)
    for step in range(6, STEPS):
        grads = _grads(problem, step)
        for opt, params in ((sopt, straight), (nopt, second), (fopt, first)):
            set_grads(flat(params), grads)
            opt.step()  # (fopt: it must not share state with nopt)
    for a, b in zip(flat(straight), flat(second)):
        assert bitwise_equal(a.detach(), b.detach())
    _assert_same_policy_state(_policy_state(sopt), _policy_state(nopt), name)


def _adam_after_a_step(problem, params, clip):
    opt = OPTIMIZERS["Adam"].make_fused(problem, params, {}, clip=clip)
    set_grads(flat(params), _grads(problem, 0))
    opt.step()
    return opt


def test_state_dict_of_other_members_is_refused():
    """A Chain's state loads only into a Chain of members that keep the same state."""
    problem = _problem(torch.float32)
    params = problem.params()
    saved = _adam_after_a_step(problem, params, fused_chain("ZClip>ZClip")).state_dict()
    other = OPTIMIZERS["Adam"].make_fused(problem, problem.params(), {}, clip=Chain(
        member("AutoClip"), member("ZClip")))
    with pytest.raises(ValueError, match=r"state has the keys \['0.ZClip.count'.*keeps"):
        other.load_state_dict(saved)
    tensor_saved = OPTIMIZERS["Adam"].make_fused(problem, params, {}, clip=Chain(member("AdaGC")))
    tensor_saved.step()
    moved = OPTIMIZERS["Adam"].make_fused(problem, problem.params(), {}, clip=Chain(
        member("GlobalNorm"), member("AdaGC")))
    with pytest.raises(ValueError, match=r"per-tensor state has the keys \['0.AdaGC.gamma'"):
        moved.load_state_dict(tensor_saved.state_dict())
    same = OPTIMIZERS["Adam"].make_fused(problem, problem.params(), {},
                                         clip=fused_chain("ZClip>ZClip"))
    same.load_state_dict(saved)
    assert set(same._policy_state) == set(saved["clip_policy"]["state"])


@pytest.mark.parametrize("name", STATEFUL)
def test_copies_step_as_the_original(name):
    """deepcopy and pickle keep the chain and every member's state."""
    problem = _problem(torch.float32)
    params = problem.params()
    opt = OPTIMIZERS["Adam"].make_fused(problem, params, {}, clip=fused_chain(name))
    for step in range(5):
        set_grads(flat(params), _grads(problem, step))
        opt.step()
    copies = [copy.deepcopy((opt, params)), pickle.loads(pickle.dumps((opt, params)))]
    for step in range(5, 9):
        grads = _grads(problem, step)
        for o, ps in [(opt, params), *copies]:
            set_grads(flat(ps), grads)
            o.step()
    for o, ps in copies:
        assert repr(o.clip_policy) == repr(opt.clip_policy)
        for a, b in zip(flat(params), flat(ps)):
            assert bitwise_equal(a.detach(), b.detach())
        _assert_same_policy_state(_policy_state(opt), _policy_state(o), name)


# -- what a chain is ------------------------------------------------------------------------------
def test_scope_and_needs_are_the_finest_members():
    g, t, a = fusedclip.GlobalNorm(1.0), fusedclip.PerTensorNorm(1.0), fusedclip.AGC()
    v, s = fusedclip.ValueClip(0.1), fusedclip.SpikeClip()
    assert Chain(g).scope == "global" and not Chain(g).keeps_tensor_state
    assert Chain(g, t).scope == "tensor"
    assert Chain(t, a, g).scope == "unit" and Chain(t, a, g).reads_params
    assert Chain(v, s).scope == "element" and not Chain(v, s).needs_norms
    assert Chain(g, s).reads_state == "exp_avg_sq" and Chain(g, v).reads_state is None
    assert Chain(a, fusedclip.AdaGC()).keeps_tensor_state
    assert Chain(fusedclip.GlobalNorm(1.0, INF), t.__class__(1.0, INF)).norm_type == INF


def test_derives_norms_where_a_member_follows_finer_coefficients():
    """What a distributed optimizer refuses (tests/test_distributed.py): norms
    computed from finer ones of this process's gradients only."""
    g, t, a = fusedclip.GlobalNorm(1.0), fusedclip.PerTensorNorm(1.0), fusedclip.AGC()
    v = fusedclip.ValueClip(0.1)
    for chain in (Chain(g), Chain(g, t), Chain(g, a), Chain(t, v), Chain(a, v), Chain(g, t, v)):
        assert not chain.derives_norms, chain
    for chain in (Chain(t, g), Chain(a, g), Chain(a, a), Chain(t, t), Chain(g, t, a),
                  Chain(a, fusedclip.AdaGC())):
        assert chain.derives_norms, chain
    assert not any(p.derives_norms for p in (g, t, a, v))


def test_nested_chains_flatten_and_repr_shows_the_members():
    g, a, v = fusedclip.GlobalNorm(1.0), fusedclip.AGC(0.01), fusedclip.ValueClip(0.1)
    chain = Chain(Chain(a, g), Chain(v))
    assert chain.policies == (a, g, v)
    assert repr(chain) == f"Chain({a!r}, {g!r}, {v!r})"
    assert "Clip policy: Chain(AGC(" in repr(fusedclip.FusedClipSGD(
        [torch.nn.Parameter(torch.zeros(2))], lr=0.1, clip=chain))


def test_merged_elementwise_bounds():
    """Two ValueClips clamp to the smaller value, two SpikeClips to the smaller theta."""
    from fusedclip.clipping import ClipInputs
    chain = Chain(fusedclip.ValueClip(0.3), fusedclip.SpikeClip(7.0), fusedclip.ValueClip(0.1),
                  fusedclip.SpikeClip(9.0))
    result = chain.clip(ClipInputs(total_norm=torch.tensor(1.0), state={}))
    assert result.coef is None
    assert result.elementwise == fusedclip.clipping.Elementwise(clip_value=0.1, spike_theta=7.0)


BAD = [
    ((), ValueError, "at least one policy"),
    ((1.0,), TypeError, r"write fusedclip.GlobalNorm\(1.0\)"),
    ((fusedclip.AGC(), None), TypeError, "must be a clip policy"),
    ((fusedclip.AGC(), "GlobalNorm"), TypeError, "must be a clip policy"),
    ((fusedclip.ValueClip(0.1), fusedclip.GlobalNorm(1.0)), ValueError,
     "comes after the element-wise ValueClip.*second pass"),
    ((fusedclip.SpikeClip(), fusedclip.AGC()), ValueError,
     "comes after the element-wise SpikeClip.*second pass"),
    ((Chain(fusedclip.GlobalNorm(1.0), fusedclip.ValueClip(0.1)), fusedclip.PerTensorNorm(1.0)),
     ValueError, "comes after the element-wise ValueClip"),
    ((fusedclip.GlobalNorm(1.0, INF), fusedclip.PerTensorNorm(1.0)), ValueError,
     "share one norm_type"),
    ((fusedclip.AGC(), fusedclip.PerTensorNorm(0.2, norm_type=INF)), ValueError,
     "share one norm_type"),
]


@pytest.mark.parametrize("members,error,match", BAD, ids=[
    "empty", "float", "None", "str", "norm-after-value", "unit-after-spike", "nested-order",
    "norm-types", "agc-with-inf"])
def test_refused_chains(members, error, match):
    with pytest.raises(error, match=match):
        Chain(*members)


def test_optimizers_without_a_second_moment_refuse_a_spike_member():
    chain = Chain(fusedclip.GlobalNorm(1.0), fusedclip.SpikeClip())
    for cls in (fusedclip.FusedClipSGD, fusedclip.FusedClipAdagrad, fusedclip.FusedClipLion):
        with pytest.raises(ValueError, match="reads the optimizer state 'exp_avg_sq'"):
            cls([torch.nn.Parameter(torch.zeros(2))], lr=0.1, clip=chain)

"""Mixed precision in the fused step (issue 20): ``master_weights``,
``store_param_remainders``, ``state_dtype`` and ``stochastic_rounding``, for
every optimizer of the registry, on the CPU.

The oracles:

- master weights with ``clip=None``: the master is, bit for bit, torch's
  ``fused=True`` float32 step run on float32 copies of the parameters fed the
  same (bfloat16/float16-valued) gradients (for Lion, which has no twin, the
  fused float32 step, itself bit for bit its float64-checked self); the
  parameter is the master rounded to nearest (bfloat16: ties away from zero,
  fusedclip.optim.precision.split_master; float16: ties to even);
- with ``clip=1.0``: ``clip_grad_norm_`` + torch's fused step, within
  ``TORCH_PARITY[float32]`` (the norm is summed in another order);
- remainders: bit for bit the full-master run, parameters included;
- every policy with master weights, with bfloat16 state and with stochastically
  rounded bfloat16 state: the run without options on float32 copies, within
  ``REFERENCE[bfloat16]`` (one bfloat16 ulp: the state is stored in bfloat16;
  AGC reads the bfloat16 parameters where the float32 run reads float32 ones);
- stochastic rounding: its mean over many elements moves by the exact update
  within a bound stated below, the same seed gives the same run whatever the
  thread count, another seed another run, and a representable result is exact.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import fusedclip
from fusedclip.optim import precision

from helpers import assert_close, assert_unchanged, bitwise_equal, finite_max_abs, snapshot
from registry import POLICY_CASES, SPECS, spec_params
from tolerances import REFERENCE, TORCH_PARITY

# Every tail length around the 16- and 8-wide vector loops would be slow here;
# test_bitwise_torch.py has them for the homogeneous path. These: short tails,
# a tensor longer than a CPU chunk (16384) with a tail, a 2-D and a 0-d one.
SHAPES = [(1,), (7,), (17,), (33,), (16384 * 2 + 13,), (33, 17), ()]
STEPS = 4

MODES = {
    "master": dict(master_weights=True),
    "remainders": dict(master_weights=True, store_param_remainders=True),
    "bf16-state": dict(state_dtype=torch.bfloat16),
    "bf16-state-sr": dict(state_dtype=torch.bfloat16, stochastic_rounding=True),
    "sr": dict(stochastic_rounding=True),
    "master-sr-bf16-state": dict(master_weights=True, stochastic_rounding=True,
                                 state_dtype=torch.bfloat16),
}
# The parameters' dtype of each mode's runs.
MODE_DTYPE = {"master": torch.bfloat16, "remainders": torch.bfloat16,
              "bf16-state": torch.float32, "bf16-state-sr": torch.float32,
              "sr": torch.bfloat16, "master-sr-bf16-state": torch.bfloat16}
TWINNED = [s for s in SPECS.values() if s.twin is not None]


def _values(shapes, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]


def _grads(params, step, dtype=None, nan=False):
    """Step ``step``'s gradients (random normal rounded to ``dtype``, the
    parameters' by default), one NaN in the first where ``nan``."""
    gen = torch.Generator().manual_seed(1000 + step)
    out = []
    for p in params:
        g = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype or p.dtype)
        out.append(g)
    if nan:
        out[0].view(-1)[0] = math.nan
    return out


def _feed(params, grads):
    for p, g in zip(params, grads):
        p.grad = g.to(p.dtype)


def master_of(opt, p) -> torch.Tensor:
    """The float32 master of ``p`` (full, or rebuilt from its remainder), or ``p``."""
    state = opt.state[p]
    if "master_param" in state:
        return state["master_param"]
    if "param_remainder" in state:
        return precision.join_master(p.detach(), state["param_remainder"])
    return p.detach()


def rounded(master: torch.Tensor, dtype) -> torch.Tensor:
    """The parameter a master gives (bfloat16: ties away; float16: ties to even)."""
    return precision.round_master(master) if dtype == torch.bfloat16 else master.to(dtype)


def _configs(spec):
    configs = spec.bitwise(False)
    picked = [configs[0], configs[-1]] + ([configs[-2]] if spec.name.startswith("Adam") else [])
    return picked


def _bitwise_cases():
    for spec in TWINNED:
        for k, kwargs in enumerate(_configs(spec)):
            for dtype, mode in ((torch.bfloat16, "master"), (torch.bfloat16, "remainders"),
                                (torch.float16, "master")):
                yield pytest.param(spec, kwargs, dtype, mode,
                                   id=f"{spec.name}-{k}-{str(dtype)[6:]}-{mode}")


def _step_together(opt, params, oracle, oracle_params):
    """STEPS steps of an optimizer and its oracle, both fed the same
    gradients (made for ``params``, in their dtype) each step."""
    for step in range(STEPS):
        grads = _grads(params, step)
        _feed(params, grads)
        _feed(oracle_params, grads)
        oracle.step()
        opt.step()


# -- master weights against torch's fused float32 step --------------------------------------------
@pytest.mark.parametrize("spec,kwargs,dtype,mode", list(_bitwise_cases()))
def test_master_is_torch_fused_float32(spec, kwargs, dtype, mode):
    values = _values(SHAPES, dtype)
    ours = [torch.nn.Parameter(v.clone()) for v in values]
    theirs = [torch.nn.Parameter(v.float()) for v in values]
    topt = spec.twin(theirs, fused=True, **kwargs)
    fopt = spec.fused(ours, **kwargs, **MODES[mode])
    _step_together(fopt, ours, topt, theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        where = f"parameter {i} of shape {tuple(a.shape)}"
        master = master_of(fopt, a)
        assert master.dtype == torch.float32
        assert bitwise_equal(master, b.detach()), f"{where}: master differs from torch's fp32"
        assert bitwise_equal(a.detach(), rounded(master, dtype)), f"{where}: param != round(master)"
        for key, value in topt.state[b].items():
            mine = fopt.state[a][key]
            if key == "step":
                assert float(mine) == float(value), f"{where}: step"
            else:
                assert mine.dtype == torch.float32, f"{where}: {key} is {mine.dtype}"
                assert bitwise_equal(mine, value), f"{where}: state {key} differs"


def test_lion_master_is_the_float32_step():
    """Lion has no twin: its master is the fused float32 step's parameter."""
    spec = SPECS["Lion"]
    for mode in ("master", "remainders"):
        values = _values(SHAPES, torch.bfloat16)
        ours = [torch.nn.Parameter(v.clone()) for v in values]
        theirs = [torch.nn.Parameter(v.float()) for v in values]
        eopt = spec.fused(theirs, **spec.example)
        fopt = spec.fused(ours, **spec.example, **MODES[mode])
        _step_together(fopt, ours, eopt, theirs)
        for a, b in zip(ours, theirs):
            master = master_of(fopt, a)
            assert bitwise_equal(master, b.detach()), mode
            assert bitwise_equal(a.detach(), rounded(master, torch.bfloat16)), mode
            assert bitwise_equal(fopt.state[a]["exp_avg"], eopt.state[b]["exp_avg"]), mode


@pytest.mark.parametrize("spec", spec_params(twin=True))
def test_master_with_clip_against_clip_grad_norm(spec):
    """clip=1.0 (active: the gradients' norm is ~10x that) against
    clip_grad_norm_ on the float32 copies + torch's fused float32 step."""
    kwargs = _configs(spec)[-1]
    values = _values(SHAPES, torch.bfloat16)
    ours = [torch.nn.Parameter(v.clone()) for v in values]
    theirs = [torch.nn.Parameter(v.float()) for v in values]
    topt = spec.twin(theirs, fused=True, **kwargs)
    fopt = spec.fused(ours, clip=1.0, master_weights=True, **kwargs)
    for step in range(STEPS):
        grads = _grads(ours, step)
        _feed(ours, grads)
        _feed(theirs, grads)
        norm = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
        assert float(norm) > 10.0
        topt.step()
        fopt.step()
    masters = [master_of(fopt, a) for a in ours]
    scale = finite_max_abs([b.detach() for b in theirs])
    for i, (a, b, m) in enumerate(zip(ours, theirs, masters)):
        assert_close(m, b.detach(), TORCH_PARITY[torch.float32], f"master[{i}]", scale=scale)
        assert bitwise_equal(a.detach(), rounded(m, torch.bfloat16)), f"param[{i}]"


# -- remainders ----------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", spec_params())
def test_remainders_are_the_full_master_bit_for_bit(spec):
    """With clip=1.0, a NaN step (skipped) and stochastically rounded bf16 state."""
    runs = []
    for remainders in (False, True):
        params = [torch.nn.Parameter(v) for v in _values(SHAPES, torch.bfloat16)]
        opt = spec.fused(params, clip=1.0, master_weights=True,
                         store_param_remainders=remainders, **spec.example, **spec.ctor)
        for step in range(5):
            _feed(params, _grads(params, step, nan=step == 2))
            opt.step()
        runs.append((params, opt))
    (full_p, full), (rem_p, rem) = runs
    assert int(rem.clip_stats["skipped"]) == 1
    for i, (a, b) in enumerate(zip(full_p, rem_p)):
        assert bitwise_equal(b.detach(), a.detach()), f"param[{i}]"
        assert "master_param" not in rem.state[b]
        assert rem.state[b]["param_remainder"].dtype == torch.int16
        assert bitwise_equal(master_of(rem, b), full.state[a]["master_param"]), f"master[{i}]"


def test_master_halves_round_trip():
    """split_master/join_master (the Python form of precision.h's rule) are
    exact for every float32 class, round ties away from zero, and otherwise
    agree with torch's round-to-nearest-even."""
    x = torch.randn(20000, dtype=torch.float64).float() * torch.logspace(-40, 38, 20000).float()
    bits = torch.randint(0, 2**31 - 1, (4000,), dtype=torch.int64) | 0x8000  # ties
    ties = (bits & ~0x7FFF).to(torch.int32).view(torch.float32)
    specials = torch.tensor([math.nan, math.inf, -math.inf, 0.0, -0.0, 3.4028235e38,
                             -3.4028235e38, 1e-45, -1e-45])
    x = torch.cat([x, ties, -ties, specials])
    high, low = precision.split_master(x)
    back = precision.join_master(high, low)
    finite = ~torch.isnan(x)
    assert torch.equal(back[finite].view(torch.int32), x[finite].view(torch.int32))
    assert torch.isnan(back[~finite]).all() and torch.isnan(high[~finite]).all()
    rne = x.to(torch.bfloat16)
    differ = (high.view(torch.int16) != rne.view(torch.int16)) & finite
    tie = (x.view(torch.int32) & 0xFFFF) == 0x8000
    assert bool(tie[differ].all())  # only ties differ ...
    assert bool((high[differ].float().abs() > x[differ].abs()).all())  # ... rounded away
    assert int(differ.sum()) > 1000


# -- refusals -----------------------------------------------------------------------------------
def _p(dtype=torch.float32, n=3):
    return torch.nn.Parameter(torch.zeros(n, dtype=dtype))


BAD_OPTIONS = [
    (dict(store_param_remainders=True), "store_param_remainders=True needs master_weights"),
    (dict(master_weights=1), "master_weights must be True or False"),
    (dict(stochastic_rounding="yes"), "stochastic_rounding must be True or False"),
    (dict(state_dtype=torch.int32), "state_dtype must be None or a floating dtype"),
    (dict(state_dtype=torch.complex64), "state_dtype must be None or a floating dtype"),
    (dict(state_dtype="bfloat16"), "state_dtype must be None or a floating dtype"),
    (dict(state_dtype=torch.float8_e4m3fn), "state_dtype torch.float8_e4m3fn is narrower"),
    (dict(state_dtype=torch.float8_e5m2), "narrower than bfloat16"),
]
BAD_WITH_PARAMS = [
    (torch.float16, dict(master_weights=True, store_param_remainders=True),
     "store_param_remainders=True with a float16 parameter"),
    (torch.float32, dict(state_dtype=torch.float64), "float64 does not mix"),
    (torch.bfloat16, dict(state_dtype=torch.float64), "float64 does not mix"),
    (torch.float64, dict(state_dtype=torch.bfloat16), "float64 does not mix"),
    (torch.complex64, dict(state_dtype=torch.bfloat16), "applies to real parameters"),
]


@pytest.mark.parametrize("spec", spec_params())
def test_refused_options(spec):
    for options, match in BAD_OPTIONS:
        with pytest.raises(ValueError, match=match):
            spec.fused([_p()], **spec.example, **options)
    for dtype, options, match in BAD_WITH_PARAMS:
        with pytest.raises(ValueError, match=match):
            spec.fused([_p(dtype)], **spec.example, **options)
        # in a group added later: refused, the optimizer as it was
        opt = spec.fused([_p()], **spec.example)
        with pytest.raises(ValueError, match=match):
            opt.add_param_group({"params": [_p(dtype)], **options})
        assert len(opt.param_groups) == 1
    # fine: remainders with fp32 parameters beside bf16 ones (nothing to do for them)
    spec.fused([_p(), _p(torch.bfloat16)], master_weights=True, store_param_remainders=True,
               **spec.example)


@pytest.mark.parametrize("spec", spec_params())
def test_refused_at_the_step_before_anything_changes(spec):
    """A group's option set to a bad value after construction, and a parameter
    whose dtype changed to one its options refuse: the step raises first."""
    params = [torch.nn.Parameter(v) for v in _values([(5,), (3,)], torch.bfloat16)]
    opt = spec.fused(params, state_dtype=torch.bfloat16, **spec.example, **spec.ctor)
    _feed(params, _grads(params, 0))
    opt.step()
    before = snapshot(opt, params)
    opt.param_groups[0]["store_param_remainders"] = True
    _feed(params, _grads(params, 1))
    with pytest.raises(ValueError, match="needs master_weights"):
        opt.step()
    assert_unchanged(opt, params, before)
    opt.param_groups[0]["store_param_remainders"] = False
    with torch.no_grad():
        params[1].data = params[1].data.double()
    params[1].grad = params[1].grad.double()
    with pytest.raises(ValueError, match="float64 does not mix"):
        opt.step()
    assert bitwise_equal(params[0].detach(), before["params"][0])


# -- what a step keeps -------------------------------------------------------------------------
@pytest.mark.parametrize("spec", spec_params())
def test_state_keys_and_dtypes(spec):
    """Per group: a bf16 group with master weights, an fp32 group with bf16 state
    and stochastic rounding, a bf16 group with stochastic rounding only."""
    bf = [torch.nn.Parameter(v) for v in _values([(6,), (2, 3)], torch.bfloat16)]
    fp = [torch.nn.Parameter(v) for v in _values([(5,)], torch.float32)]
    sr = [torch.nn.Parameter(v) for v in _values([(4,)], torch.bfloat16, seed=1)]
    opt = spec.fused([{"params": bf, "master_weights": True},
                      {"params": fp, "state_dtype": torch.bfloat16, "stochastic_rounding": True},
                      {"params": sr, "stochastic_rounding": True}], **spec.example, **spec.ctor)
    assert "master_weights" not in opt.defaults  # defaults are torch's without options
    _feed(bf + fp + sr, _grads(bf + fp + sr, 0))
    opt.step()
    floating = [k for k in spec.state_keys]
    for p in bf:
        s = opt.state[p]
        assert s["master_param"].dtype == torch.float32 and "sr_generator" not in s
        assert s["master_param"].stride() == p.stride()
        assert all(s[k].dtype == torch.float32 for k in floating if k in s)
    for p in fp:
        s = opt.state[p]
        assert "master_param" not in s and s["sr_generator"].dtype == torch.int64
        assert s["sr_generator"].tolist()[1] == 1
        assert all(s[k].dtype == torch.bfloat16 for k in floating if k in s)
    for p in sr:
        s = opt.state[p]
        assert s["sr_generator"].shape == (2,) and "master_param" not in s
        assert all(s[k].dtype == torch.bfloat16 for k in floating if k in s)


# -- skipped steps -------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["master", "remainders", "bf16-state-sr", "sr",
                                  "master-sr-bf16-state"])
@pytest.mark.parametrize("spec", spec_params())
def test_skipped_step_changes_nothing(spec, mode):
    """No parameter, master, remainder, state or generator position changes."""
    params = [torch.nn.Parameter(v) for v in _values(SHAPES[:4], MODE_DTYPE[mode])]
    opt = spec.fused(params, clip=1.0, **spec.example, **spec.ctor, **MODES[mode])
    for step in range(2):
        _feed(params, _grads(params, step))
        opt.step()
    before = snapshot(opt, params)
    _feed(params, _grads(params, 2, nan=True))
    opt.step()
    assert_unchanged(opt, params, before, mode)
    assert int(opt.clip_stats["skipped"]) == 1


# -- every policy -------------------------------------------------------------------------------
def _policy_cases():
    for spec in SPECS.values():
        for policy in spec.policies:
            for mode in ("master", "bf16-state", "bf16-state-sr"):
                yield pytest.param(spec, policy, mode, id=f"{spec.name}-{policy}-{mode}")


@pytest.mark.parametrize("spec,policy,mode", list(_policy_cases()))
def test_every_policy_with_every_option(spec, policy, mode):
    """Six steps (the third skipped) against the run without options on float32
    copies fed the same gradients (the master, or the float32 parameter, and
    the state cast to float32), within REFERENCE[bfloat16]."""
    shapes = [(7,), (4, 5), (), (33,)]
    values = _values(shapes, MODE_DTYPE[mode])
    ours = [torch.nn.Parameter(v.clone()) for v in values]
    theirs = [torch.nn.Parameter(v.float()) for v in values]
    fopt = spec.fused(ours, clip=POLICY_CASES[policy](), **spec.example, **spec.ctor,
                      **MODES[mode])
    eopt = spec.fused(theirs, clip=POLICY_CASES[policy](), **spec.example, **spec.ctor)
    for step in range(6):
        grads = _grads(ours, step, nan=step == 2)
        _feed(ours, grads)
        _feed(theirs, grads)
        fopt.step()
        eopt.step()
    tol = REFERENCE[torch.bfloat16]
    assert int(fopt.clip_stats["skipped"]) == int(eopt.clip_stats["skipped"]) == 1
    scale = finite_max_abs([b.detach() for b in theirs])
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert_close(master_of(fopt, a).float(), b.detach(), tol, f"{mode} master[{i}]",
                     scale=scale)
        for key, value in eopt.state[b].items():
            if key == "step":
                assert float(fopt.state[a][key]) == float(value)
                continue
            vscale = finite_max_abs([eopt.state[t][key] for t in theirs if key in eopt.state[t]])
            assert_close(fopt.state[a][key].float(), value, tol, f"{mode} {key}[{i}]",
                         scale=vscale)


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("spec", spec_params())
def test_state_dtype_against_the_float64_reference(spec, state_dtype):
    """float32 parameters with state kept in ``state_dtype``: the float64
    reference with its state (not its parameters) rounded to that dtype after
    every step, clip=1.0, six steps (the third skipped), within
    REFERENCE[state_dtype] (both round the same value, computed in float64
    there and float32 here: a state ulp now and then)."""
    class StateRounded(spec.reference):
        def update(self, param, grad, state, group):
            super().update(param, grad, state, group)
            for key in self.ROUNDED:
                if state.get(key) is not None:
                    state[key] = state[key].to(state_dtype).to(torch.float64)

    params = [torch.nn.Parameter(v) for v in _values([(7,), (4, 5), (), (33,)], torch.float32)]
    kwargs = dict(spec.example, **spec.ctor)
    opt = spec.fused(params, clip=1.0, state_dtype=state_dtype, **kwargs)
    ref = StateRounded([{**spec.defaults, **kwargs, "params": params}], clip=1.0)
    for step in range(6):
        grads = _grads(params, step, nan=step == 2)
        _feed(params, grads)
        opt.step()
        ref.step(grads)
    assert ref.skipped == int(opt.clip_stats["skipped"]) == 1
    tol = REFERENCE[state_dtype]
    expected = ref.params()
    scale = finite_max_abs(expected)
    for i, (p, e) in enumerate(zip(params, expected)):
        assert_close(p.detach().double(), e, tol, f"param[{i}]", scale=scale)
    for key in spec.state_keys:
        mine = [opt.state[p][key] for p in params if key in opt.state[p]]
        theirs = [ref.states[(0, i)][key] for i in range(len(params))
                  if ref.states[(0, i)].get(key) is not None]
        assert len(mine) == len(theirs), key
        kscale = finite_max_abs(theirs)
        for i, (m, e) in enumerate(zip(mine, theirs)):
            assert m.dtype == state_dtype, key
            assert_close(m.double(), e, tol, f"{key}[{i}]", scale=kscale)


# -- state dicts -------------------------------------------------------------------------------
def _run(spec, params, opt, steps, start=0):
    for step in range(start, start + steps):
        _feed(params, _grads(params, step, nan=step == 4))
        opt.step()


def _assert_same(opt_a, params_a, opt_b, params_b, what=""):
    for i, (a, b) in enumerate(zip(params_a, params_b)):
        assert bitwise_equal(a.detach(), b.detach()), f"{what} param[{i}]"
        sa, sb = opt_a.state.get(a, {}), opt_b.state.get(b, {})
        assert sa.keys() == sb.keys(), f"{what} param[{i}]: {sorted(sa)} vs {sorted(sb)}"
        for key in sa:
            assert bitwise_equal(sa[key], sb[key]), f"{what} param[{i}] {key}"


@pytest.mark.parametrize("mode", ["master", "remainders", "bf16-state-sr", "sr",
                                  "master-sr-bf16-state"])
@pytest.mark.parametrize("spec", spec_params())
def test_state_dict_mid_run_continues_bit_for_bit(spec, mode):
    """Six steps (the fifth skipped) against three, a save and load into a new
    optimizer over copies of the parameters, and three more: masters,
    remainders, low-precision state and generator positions included."""
    def make():
        torch.manual_seed(0)  # the generators' seeds
        params = [torch.nn.Parameter(v) for v in _values(SHAPES[:4] + [(70001,)],
                                                          MODE_DTYPE[mode])]
        return params, spec.fused(params, clip=1.0, **spec.example, **spec.ctor, **MODES[mode])

    straight_p, straight = make()
    _run(spec, straight_p, straight, 6)
    first_p, first = make()
    _run(spec, first_p, first, 3)
    saved = copy.deepcopy(first.state_dict())
    second_p, second = make()
    with torch.no_grad():
        for a, b in zip(first_p, second_p):
            b.copy_(a)
    second.load_state_dict(saved)
    _run(spec, second_p, second, 3, start=3)
    _assert_same(straight, straight_p, second, second_p, mode)


@pytest.mark.parametrize("spec", spec_params())
@pytest.mark.parametrize("direction", ["master-to-remainders", "remainders-to-master"])
def test_state_dict_converts_master_form(spec, direction):
    """A state dict of one master form loads into an optimizer of the other and
    continues bit for bit the uninterrupted run."""
    saving, loading = ((False, True) if direction == "master-to-remainders" else (True, False))

    def make(remainders):
        params = [torch.nn.Parameter(v) for v in _values(SHAPES[:4], torch.bfloat16)]
        return params, spec.fused(params, clip=1.0, master_weights=True,
                                  store_param_remainders=remainders, **spec.example, **spec.ctor)

    straight_p, straight = make(saving)
    _run(spec, straight_p, straight, 6)
    first_p, first = make(saving)
    _run(spec, first_p, first, 3)
    saved = copy.deepcopy(first.state_dict())
    second_p, second = make(loading)
    with torch.no_grad():
        for a, b in zip(first_p, second_p):
            b.copy_(a)
    second.load_state_dict(saved)
    _run(spec, second_p, second, 3, start=3)
    key = "param_remainder" if loading else "master_param"
    for i, (a, b) in enumerate(zip(straight_p, second_p)):
        assert bitwise_equal(b.detach(), a.detach()), f"param[{i}]"
        assert key in second.state[b] and len({"master_param", "param_remainder"}
                                              & second.state[b].keys()) == 1
        assert bitwise_equal(master_of(second, b), master_of(straight, a)), f"master[{i}]"


@pytest.mark.parametrize("mode", ["master", "remainders", "master-sr-bf16-state"])
def test_state_dict_loads_into_torch_adamw(mode):
    """torch.optim.AdamW loads a fusedclip master-weights state dict (casting
    what it keeps to the parameters' dtype) and steps."""
    params = [torch.nn.Parameter(v) for v in _values(SHAPES[:4], torch.bfloat16)]
    opt = fusedclip.FusedClipAdamW(params, lr=0.01, clip=1.0, **MODES[mode])
    _run(None, params, opt, 3)
    saved = opt.state_dict()
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    topt = torch.optim.AdamW(twin, lr=0.01, fused=True)
    topt.load_state_dict(copy.deepcopy(saved))
    for a, b in zip(params, twin):
        assert topt.state[b]["exp_avg"].dtype == torch.bfloat16
        assert torch.equal(topt.state[b]["exp_avg"], opt.state[a]["exp_avg"].to(torch.bfloat16))
    _feed(twin, _grads(twin, 3))
    topt.step()
    assert all(torch.isfinite(b).all() for b in twin)
    assert any(not torch.equal(a, b) for a, b in zip(params, twin))


@pytest.mark.parametrize("spec", spec_params(twin=True))
def test_torch_state_dict_loads_into_master_weights(spec):
    """A torch.optim state dict of bf16 parameters into a master-weights
    optimizer: the moments cast to float32, the master made from the parameter
    at the next step, which is torch's fused float32 step from that state."""
    values = _values(SHAPES[:4], torch.bfloat16)
    tparams = [torch.nn.Parameter(v.clone()) for v in values]
    kwargs = dict(spec.example, **spec.ctor)
    topt = spec.twin(tparams, foreach=False, **kwargs)
    for step in range(3):
        _feed(tparams, _grads(tparams, step))
        topt.step()
    saved = topt.state_dict()
    ours = [torch.nn.Parameter(p.detach().clone()) for p in tparams]
    fopt = spec.fused(ours, master_weights=True, **kwargs)
    fopt.load_state_dict(copy.deepcopy(saved))
    # The oracle: torch's fused float32 step from that state (torch casts it to
    # float32). load_state_dict gives torch's groups the saved `fused=None,
    # foreach=False`, which would step with its for-loop, whose roundings
    # differ: the flags are set back.
    oracle_p = [torch.nn.Parameter(p.detach().float()) for p in tparams]
    oracle = spec.twin(oracle_p, fused=True, **kwargs)
    oracle.load_state_dict(copy.deepcopy(saved))
    for group in oracle.param_groups:
        group.update(fused=True, foreach=False)
    for a, b in zip(ours, oracle_p):
        for key, value in oracle.state[b].items():
            if key != "step":
                assert fopt.state[a][key].dtype == torch.float32, key
                assert bitwise_equal(fopt.state[a][key], value), key
    grads = _grads(ours, 3)
    _feed(ours, grads)
    _feed(oracle_p, grads)
    fopt.step()
    oracle.step()
    for i, (a, b) in enumerate(zip(ours, oracle_p)):
        assert bitwise_equal(fopt.state[a]["master_param"], b.detach()), f"master[{i}]"
        assert bitwise_equal(a.detach(), rounded(b.detach(), torch.bfloat16)), f"param[{i}]"


def test_master_state_dict_into_optimizer_without_options():
    """A fusedclip optimizer without the options loads a master-weights state
    dict as torch would: the moments cast to the parameters' dtype, no master
    (the options are the loading optimizer's)."""
    params = [torch.nn.Parameter(v) for v in _values(SHAPES[:3], torch.bfloat16)]
    opt = fusedclip.FusedClipAdamW(params, lr=0.01, master_weights=True,
                                   stochastic_rounding=True, state_dtype=torch.float32)
    _run(None, params, opt, 2)
    plain = fusedclip.FusedClipAdamW([torch.nn.Parameter(p.detach().clone()) for p in params],
                                     lr=0.01)
    plain.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert not any(k in plain.param_groups[0] for k in precision.OPTIONS)
    for p in plain.param_groups[0]["params"]:
        s = plain.state[p]
        assert set(s) == {"step", "exp_avg", "exp_avg_sq"}
        assert s["exp_avg"].dtype == torch.bfloat16


def test_load_keeps_the_loading_optimizers_options():
    params = [torch.nn.Parameter(v) for v in _values(SHAPES[:2], torch.bfloat16)]
    opt = fusedclip.FusedClipAdamW(params, lr=0.01, master_weights=True)
    _run(None, params, opt, 1)
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["state_dtype"] = torch.int8  # ignored: the options are opt's
    opt.load_state_dict(sd)
    assert "state_dtype" not in opt.param_groups[0] and opt.param_groups[0]["master_weights"]


# -- stochastic rounding, through the optimizers ----------------------------------------------
def _sgd_sr_run(seed, threads=None, steps=3, n=70001):
    torch.manual_seed(seed)
    p = torch.nn.Parameter(torch.full((n,), 1.25, dtype=torch.bfloat16))
    opt = fusedclip.FusedClipSGD([p], lr=2.0**-10, stochastic_rounding=True)
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        for _ in range(steps):
            p.grad = torch.ones_like(p)
            opt.step()
    finally:
        torch.set_num_threads(old)
    return p.detach().clone(), opt.state[p]["sr_generator"].clone()


def test_stochastic_rounding_is_unbiased():
    """bf16 1.25 (ulp 2^-7) moved by 2^-10 per step (an eighth of an ulp:
    rounding to nearest would never move it). After k steps the mean of n
    elements is 1.25 - k 2^-10; each element's distance moved is a sum of k
    independent draws of a ulp with probability 1/8, so the mean's standard
    deviation is 2^-7 sqrt(k p (1 - p) / n) (about 1.4e-5 for k = 3,
    n = 70001): the test allows 6 of them."""
    n, k, p = 70001, 3, 1 / 8
    values, gen = _sgd_sr_run(0, steps=k, n=n)
    mean = values.double().mean().item()
    sigma = 2.0**-7 * math.sqrt(k * p * (1 - p) / n)
    assert abs(mean - (1.25 - k * 2.0**-10)) < 6 * sigma, (mean, sigma)
    assert int(gen[1]) == k
    # the values taken are the two neighbours only
    assert set(values.float().unique().tolist()) <= {1.25 - j * 2.0**-7 for j in range(k + 1)}


def test_stochastic_rounding_is_reproducible():
    """The same seed, 1 or 2 threads: bit for bit; another seed: another run."""
    a, ga = _sgd_sr_run(0, threads=1)
    b, gb = _sgd_sr_run(0, threads=2)
    c, gc = _sgd_sr_run(1)
    assert bitwise_equal(a, b) and torch.equal(ga, gb)
    assert not torch.equal(a, c) and int(ga[0]) != int(gc[0])


def test_stochastic_rounding_keeps_representable_results():
    """A result a bf16 holds (1.25 - 2^-7) is written exactly, every element."""
    p = torch.nn.Parameter(torch.full((1000,), 1.25, dtype=torch.bfloat16))
    opt = fusedclip.FusedClipSGD([p], lr=2.0**-7, stochastic_rounding=True)
    p.grad = torch.ones_like(p)
    opt.step()
    assert torch.equal(p.detach(), torch.full_like(p, 1.25 - 2.0**-7))


# -- torch.compile -------------------------------------------------------------------------------
# Two compiles (each costs seconds on the CPU): a remainder run, and a full
# master with stochastically rounded bf16 state; every optimizer compiles
# without options in test_compile.py, and the options change only the lists
# the op gets.
# Every optimizer and every option in at least one compiled case (a compile costs
# seconds: one mode per optimizer).
COMPILE_CASES = [("AdamW", "remainders"), ("SGD", "master-sr-bf16-state"),
                 ("Adam", "bf16-state-sr"), ("Adagrad", "master"), ("Lion", "sr")]


@pytest.mark.parametrize("name,mode", COMPILE_CASES, ids=[f"{n}-{m}" for n, m in COMPILE_CASES])
def test_compiled_step_is_the_eager_step(name, mode):
    """torch.compile(opt.step, fullgraph=True), from the second step on (the
    first, eager, makes the masters and generators), a NaN in the third: bit
    for bit the eager run, masters and generators included; no recompile."""
    from helpers import make_params, set_step_grads
    from test_compile import COMPILE_SPECS, make_opt

    spec, dtype = SPECS[name], MODE_DTYPE[mode]
    eager_p = make_params(COMPILE_SPECS, dtype)
    comp_p = make_params(COMPILE_SPECS, dtype)
    eager = make_opt(spec, eager_p, lr_tensor=False, **MODES[mode])
    comp = make_opt(spec, comp_p, lr_tensor=False, **MODES[mode])
    torch._dynamo.reset()
    try:
        compiled = torch.compile(comp.step, fullgraph=True)
        for step in range(4):
            set_step_grads(eager_p, step, nan_at=2, in_place=True)
            set_step_grads(comp_p, step, nan_at=2, in_place=True)
            if step == 0:  # both draw the same generator seeds
                torch.manual_seed(0)
                eager.step()
                torch.manual_seed(0)
                comp.step()
                continue
            eager.step()
            with torch.compiler.set_stance("fail_on_recompile" if step >= 2 else "default"):
                compiled()
        _assert_same(comp, comp_p, eager, eager_p, f"{name} {mode}")
        for key in ("grad_norm", "clip_coef", "skipped"):
            assert bitwise_equal(comp.clip_stats[key], eager.clip_stats[key]), key
        assert int(comp.clip_stats["skipped"]) == 1
    finally:
        torch._dynamo.reset()


# -- GradScaler ----------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", spec_params())
def test_grad_scaler_with_master_weights(spec):
    """A bf16 model with master weights under torch.amp.GradScaler (the fused
    step unscales as it reads; one step holds an inf and is skipped by the
    scaler) against the same run without a scaler (whose nonfinite="skip"
    skips that step): the same masters (power-of-two scaling is exact)."""
    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.GELU(),
                                   torch.nn.Linear(32, 5)).to(torch.bfloat16)

    runs = []
    for scaled in (True, False):
        m = model()
        opt = spec.fused(m.parameters(), clip=0.5, master_weights=True, **spec.example,
                         **spec.ctor)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)
        for step in range(6):
            gen = torch.Generator().manual_seed(1000 + step)
            x = torch.randn(16, 12, generator=gen) * 3
            y = torch.randn(16, 5, generator=gen)
            if step == 3:
                x[2, 4] = math.inf
            loss = torch.nn.functional.mse_loss(m(x.bfloat16()).float(), y)
            if scaled:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            opt.zero_grad()
        runs.append((list(m.parameters()), opt))
    (sp, sopt), (up, uopt) = runs
    assert int(sopt.clip_stats["skipped"]) == int(uopt.clip_stats["skipped"]) == 1
    scale = finite_max_abs([master_of(uopt, b) for b in up])
    for i, (a, b) in enumerate(zip(sp, up)):
        assert_close(master_of(sopt, a), master_of(uopt, b), TORCH_PARITY[torch.float32],
                     f"master[{i}]", scale=scale)
        assert bitwise_equal(a.detach(), rounded(master_of(sopt, a), torch.bfloat16))

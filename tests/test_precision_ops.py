"""The mixed-precision update ops (issue 20) on the CPU, at the op level
(fusedclip.ops.update_ with ``masters``, ``sr_generators`` and state lists of
another dtype than the parameters): the roundings of
csrc/include/fusedclip/precision.h against their Python statement in
fusedclip/reference.py, bit for bit where the spec fixes every bit."""

from __future__ import annotations

import math

import pytest
import torch

from fusedclip import ops
from fusedclip import reference as R

from registry import RULES

# Sizes with a vector tail, a 0-d and an empty tensor, one over a CPU chunk
# (16384 elements) and a 2-D one stored transposed.
SHAPES = [((7,), False), ((4, 6), True), ((), False), ((0,), False), ((3, 33), False),
          ((20011,), False)]
RULE_NAMES = ["adam", "sgd", "adagrad", "lion"]
HYPER = {
    "adam": dict(beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.05, amsgrad=True,
                 decoupled_weight_decay=True),
    "sgd": dict(momentum=0.9, dampening=0.0, weight_decay=0.05, nesterov=True),
    "adagrad": dict(lr_decay=0.01, weight_decay=0.05, eps=1e-10),
    "lion": dict(beta1=0.9, beta2=0.99, weight_decay=0.05),
}
LR = {"adam": 1e-2, "sgd": 1e-2, "adagrad": 1e-2, "lion": 1e-3}


def _tensor(shape, transposed, gen, dtype, std=1.0):
    if transposed:
        return (torch.randn(shape[::-1], generator=gen) * std).to(dtype).t()
    return (torch.randn(shape, generator=gen) * std).to(dtype)


class Problem:
    """Parameters, per-step gradients (values of the parameters' dtype), state
    lists and step counters of one rule, all on the CPU."""

    def __init__(self, rule, param_dtype, state_dtype, seed=0, shapes=SHAPES):
        gen = torch.Generator().manual_seed(seed)
        self.rule = rule
        self.hyper = HYPER[rule]
        self.shapes = shapes
        self.params = [_tensor(s, t, gen, param_dtype) for s, t in shapes]
        self.states, self.steps = RULES[rule].make_states(
            gen, [s for s, _ in shapes], torch.float32, self.hyper, True, torch.float32)
        self.states = [[t.to(state_dtype) for t in state] for state in self.states if state]
        self.seed = seed

    def grads(self, step, dtype=None):
        gen = torch.Generator().manual_seed(1000 * self.seed + step + 1)
        return [_tensor(p.shape, False, gen, dtype or p.dtype) for p in self.params]

    def clone(self):
        other = object.__new__(Problem)
        other.__dict__.update(self.__dict__)
        other.params = [clone(p) for p in self.params]
        other.states = [[clone(t) for t in state] for state in self.states]
        other.steps = [s.clone() for s in self.steps]
        return other

    def step(self, grads, **args):
        ops.update_(self.rule, self.params, grads, self.states, self.steps, self.hyper,
                    ops.StepArgs(lr=LR[self.rule], **args))


def clone(t):
    out = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype)
    out.copy_(t)
    return out


def bits(t):
    """A tensor's bits, to compare bit for bit (NaN payloads and -0 included)."""
    t = t.contiguous().reshape(-1)
    if t.dtype in (torch.float32, torch.int32):
        return t.view(torch.int32)
    if t.dtype == torch.float64:
        return t.view(torch.int64)
    return t.view(torch.int16)


def assert_bitwise(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert torch.equal(bits(a), bits(b)), f"{what}: {(a.double() - b.double()).abs().max()}"


def generators(n, seed=5, counter=0):
    return [torch.tensor([seed + 1000 * i, counter], dtype=torch.int64) for i in range(n)]


# -- (a) full master vs remainders ---------------------------------------------------------------
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rule", RULE_NAMES)
def test_remainders_are_the_full_master(rule, state_dtype):
    """bf16 parameters with a full fp32 master and with its int16 remainder:
    10 steps of random bf16 gradients (clip coefficients per tensor), bit for
    bit the same parameters, states and (rebuilt) masters; with bf16 states
    rounded stochastically, to show the keys do not depend on the master."""
    full = Problem(rule, torch.bfloat16, state_dtype, seed=1)
    rem = full.clone()
    masters = [p.float() for p in full.params]
    remainders = [torch.zeros(p.shape, dtype=torch.int16) for p in full.params]
    sr = state_dtype != torch.float32
    gens_full = generators(len(masters)) if sr else None
    gens_rem = generators(len(masters)) if sr else None
    clip = torch.linspace(0.5, 1.0, len(masters))
    for step in range(10):
        grads = full.grads(step)
        full.step(grads, clip_coef=clip, masters=masters, sr_generators=gens_full)
        rem.step(grads, clip_coef=clip, masters=remainders, sr_generators=gens_rem)
    for i, (a, b) in enumerate(zip(full.params, rem.params)):
        assert_bitwise(a, b, f"params[{i}]")
        assert_bitwise(masters[i], R.bf16_rebuild(b, remainders[i]), f"masters[{i}]")
        assert_bitwise(a, R.round_bf16_half_away(masters[i]), f"params[{i}] from the master")
    for sa, sb in zip(full.states, rem.states):
        for i, (a, b) in enumerate(zip(sa, sb)):
            assert_bitwise(a, b, f"state[{i}]")
    # The masters did move off the bf16 grid: the remainders are not all 0.
    assert any(r.ne(0).any() for r in remainders)


# -- (b) master run vs torch's fused fp32 step (the homogeneous float32 op) ----------------------
@pytest.mark.parametrize("units", [False, True], ids=["clip", "unit-coefs"])
@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rule", RULE_NAMES)
def test_master_is_the_fp32_step(rule, param_dtype, units):
    """With fp32 masters and fp32 state, the master is, bit for bit, the same
    op run homogeneous in float32 (bitwise torch's fused fp32 step,
    test_bitwise_torch.py) on float32 copies fed the low-precision gradients
    cast to float32; the parameter is the master rounded to nearest, ties away
    from zero for bfloat16 (reference.round_bf16_half_away), even for float16."""
    low = Problem(rule, param_dtype, torch.float32, seed=2)
    masters = [p.float() for p in low.params]
    high = low.clone()
    high.params = [clone(m) for m in masters]
    for step in range(10):
        grads = low.grads(step)
        if units:
            gen = torch.Generator().manual_seed(step)
            coefs = [torch.rand(ops.unit_counts([p])[0], generator=gen) for p in low.params]
            args = dict(unit_coefs=coefs, grad_scale=torch.tensor(2.0))
        else:
            args = dict(clip_coef=torch.linspace(0.5, 1.0, len(masters)), maximize=True)
        low.step(grads, masters=masters, **args)
        high.step([g.float() for g in grads], **args)
    for i, (m, h) in enumerate(zip(masters, high.params)):
        assert_bitwise(m, h, f"masters[{i}]")
        expected = R.round_bf16_half_away(m) if param_dtype == torch.bfloat16 else m.half()
        assert_bitwise(low.params[i], expected, f"params[{i}]")
    for sa, sb in zip(low.states, high.states):
        for i, (a, b) in enumerate(zip(sa, sb)):
            assert_bitwise(a, b, f"state[{i}]")


def test_round_half_away_ties():
    """reference.round_bf16_half_away: ties go away from zero (both signs), the
    rest to nearest, NaN stays NaN, and the remainder rebuilds the master."""
    m = torch.tensor([1.0 + 2**-8, -(1.0 + 2**-8), 1.0 + 3 * 2**-8, 1.0 + 2**-9, 1.0 + 2**-8 + 2**-20,
                      float("inf"), float("nan"), 3.4e38])
    p = R.round_bf16_half_away(m)
    assert p[:6].tolist() == [1.0 + 2**-7, -(1.0 + 2**-7), 1.0 + 2 * 2**-7, 1.0, 1.0 + 2**-7,
                              float("inf")]
    assert math.isnan(p[6].item()) and math.isinf(p[7].item())
    finite = m[~m.isnan()]
    assert_bitwise(R.bf16_rebuild(R.round_bf16_half_away(finite), R.bf16_remainder(finite)),
                   finite, "rebuilt")


# -- (c) low-precision state vs the float64 reference ---------------------------------------------
@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rule", RULE_NAMES)
def test_low_precision_state_against_reference(rule, state_dtype):
    """float32 parameters with bf16/fp16 state, 10 steps, against the float64
    reference step (registry.RULES[rule].reference_step) whose state is
    rounded to the state dtype after every step. Both round the same state
    value, computed in float64 there and float32 here, so a stored state
    differs by at most one ulp of the state dtype (where that value lies
    within float32 rounding of a rounding boundary: rare), and such an ulp
    moves the next update by at most that relative amount: the parameters must
    agree within steps * lr * 2 * eps(state dtype) * (largest update factor)
    plus float32 rounding (a worst case: measured errors are 100x smaller). Lion's update is lr * sign(u): a one-ulp state
    difference can flip the sign of a u near 0, so a few elements may differ
    by 2 lr per step (counted: at most 0.5%)."""
    fused = Problem(rule, torch.float32, state_dtype, seed=3)
    spec = RULES[rule]
    ref_params = [p.double() for p in fused.params]
    ref_states = [[t.double() for t in state] for state in fused.states]
    ref_steps = [float(s) for s in fused.steps]
    eps = torch.finfo(state_dtype).eps
    steps = 10
    for step in range(steps):
        grads = fused.grads(step)
        fused.step(grads)
        for i, p in enumerate(ref_params):
            n = len(ref_steps) and ref_steps[i]
            states_i = [state[i] for state in ref_states]
            new = spec.reference_step(p, grads[i].double(), states_i, n, fused.hyper,
                                      LR[rule], False)
            for k, t in enumerate(new):
                ref_states[k][i] = t.to(state_dtype).double()
            if ref_steps:
                ref_steps[i] += 1
    lr = LR[rule]
    # The largest update per unit of lr: Adam's m_hat / sqrt(v_hat) is about 1
    # (a few with amsgrad's max), SGD's buffer is a sum of gradients, Adagrad's
    # g / sqrt(sum) at most a few.
    factor = {"adam": 4.0, "sgd": 10.0, "adagrad": 10.0, "lion": 1.0}[rule]
    atol = steps * lr * 2 * eps * factor + 1e-6
    for i, (p, r) in enumerate(zip(fused.params, ref_params)):
        err = (p.double() - r).abs()
        if rule == "lion":
            assert err.le(2 * lr * steps + 1e-6).all()
            assert (err > atol).sum().item() <= 0.005 * p.numel(), f"params[{i}]"
        else:
            assert err.le(atol + 1e-6 * r.abs()).all(), f"params[{i}]: {err.max()} > {atol}"
    # The stored states are the reference's, but for the few elements whose
    # value lies within float32 rounding of a rounding boundary (measured: at
    # most 5 of 20142-60426 per run): at most 0.1% of them differ, each by one
    # ulp of the state dtype (<= eps * |value|) plus the parameters' tiny
    # differences (atol, through weight decay).
    differ = total = 0
    for k, (sa, sb) in enumerate(zip(fused.states, ref_states)):
        for i, (a, b) in enumerate(zip(sa, sb)):
            assert a.dtype == state_dtype
            diff = (a.double() - b).abs()
            assert diff.le(eps * b.abs() + atol).all(), f"state {k}[{i}]: {diff.max()}"
            differ += diff.ne(0).sum().item()
            total += a.numel()
    assert differ <= 0.001 * total, (differ, total)


# -- (d) stochastic rounding ------------------------------------------------------------------------
def _sgd_plain(params, grads, lr, **args):
    hyper = dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False)
    ops.update_("sgd", params, grads, [], [], hyper, ops.StepArgs(lr=lr, **args))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_is_unbiased(dtype):
    """SGD on 10^5 elements of 1.0, each step adding ulp/16 (ulp the spacing
    above 1.0: 2^-7 bf16, 2^-10 fp16), far below half an ulp: each element goes
    up one ulp with probability 1/16 per step, independently, so after S steps
    the mean moved by S * ulp / 16 in expectation, and the number of ups per
    element has variance S (1/16)(15/16). The mean must lie within 5 standard
    deviations of the mean over 10^5 elements (a false failure: < 1e-6).
    Rounding to nearest would move nothing."""
    n, steps = 100_000, 4
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    p = torch.ones(n, dtype=dtype)
    g = torch.full((n,), -ulp / 16, dtype=dtype)
    gens = [torch.tensor([12345, 0])]
    for _ in range(steps):
        _sgd_plain([p], [g], 1.0, sr_generators=gens)
    ups = (p.double() - 1.0) / ulp
    assert torch.equal(ups, ups.round()) and ups.min() >= 0
    expected = steps / 16
    sigma = math.sqrt(steps * (1 / 16) * (15 / 16) / n)
    assert abs(ups.mean().item() - expected) <= 5 * sigma, (ups.mean().item(), expected, sigma)
    assert gens[0].tolist() == [12345, steps]
    q = torch.ones(n, dtype=dtype)
    _sgd_plain([q], [g], 1.0)
    assert torch.equal(q, torch.ones(n, dtype=dtype))


def _adam_lowprec(param_dtype, state_dtype, seed=0, n=150_000):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=gen).to(param_dtype), torch.randn(37, generator=gen).to(param_dtype)]
    grads = [torch.randn(p.shape, generator=gen).to(param_dtype) for p in params]
    states = [[(torch.randn(p.shape, generator=gen) * 0.1).to(state_dtype) for p in params],
              [(torch.rand(p.shape, generator=gen) * 0.1).to(state_dtype) for p in params]]
    steps = [torch.tensor(3.0) for _ in params]
    return params, grads, states, steps


ADAM = dict(beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.01, amsgrad=False,
            decoupled_weight_decay=True)


@pytest.mark.parametrize("param_dtype,state_dtype", [(torch.bfloat16, torch.bfloat16),
                                                     (torch.float16, torch.float16),
                                                     (torch.float32, torch.bfloat16)])
def test_stochastic_rounding_reproducible(param_dtype, state_dtype):
    """The same seed gives the same bits with 1 thread and with 2 (the tensor
    spans many chunks, over the parallel threshold); another seed differs."""
    results = []
    old = torch.get_num_threads()
    try:
        for threads, seed in ((1, 7), (2, 7), (2, 8)):
            torch.set_num_threads(threads)
            params, grads, states, steps = _adam_lowprec(param_dtype, state_dtype)
            gens = generators(len(params), seed=seed)
            for _ in range(2):
                ops.update_("adam", params, grads, states, steps, ADAM,
                            ops.StepArgs(lr=1e-3, sr_generators=gens))
            results.append(params + [t for s in states for t in s])
    finally:
        torch.set_num_threads(old)
    for a, b in zip(results[0], results[1]):
        assert_bitwise(a, b, "1 vs 2 threads")
    assert not torch.equal(results[1][2], results[2][2])  # exp_avg[0], another seed
    if param_dtype != torch.float32:
        assert not torch.equal(results[1][0], results[2][0])


SR_CASES = [("sgd", torch.bfloat16, torch.bfloat16), ("sgd", torch.float16, torch.float16),
            ("adam", torch.float32, torch.bfloat16), ("adam", torch.bfloat16, torch.float16),
            ("adagrad", torch.float16, torch.float32)]


@pytest.mark.parametrize("rule,param_dtype,state_dtype", SR_CASES,
                         ids=[f"{r}-{str(p)[6:]}-{str(s)[6:]}" for r, p, s in SR_CASES])
def test_stochastic_rounding_bits_match_reference(rule, param_dtype, state_dtype):
    """Every stochastically rounded value is, bit for bit, reference.
    stochastic_round of its float32 result with the bits of reference.sr_bits
    under reference.sr_key(seed, counter before the call, slot), slot 0 the
    parameter and 1 + k state k (Adam with amsgrad: three states); the float32
    results are those of the homogeneous float32 op on float32 copies. Two
    calls, so the counter's increment is checked too; seeds and counters past
    2^32 and negative seeds."""
    shapes = [((5003,), False), ((61, 33), True), ((), False)]
    prob = Problem(rule, param_dtype, state_dtype, seed=11, shapes=shapes)
    gens = [torch.tensor([-(2**62) + 17 * i, 2**40 + i]) for i in range(len(shapes))]
    for call in range(2):
        grads = prob.grads(call)
        high = prob.clone()
        high.params = [p.to(torch.float32, copy=True) for p in prob.params]
        high.states = [[t.to(torch.float32, copy=True) for t in state] for state in prob.states]
        high.step([g.float() for g in grads], clip_coef=torch.tensor(0.7))
        keys = [(int(g[0]), int(g[1])) for g in gens]
        prob.step(grads, clip_coef=torch.tensor(0.7), sr_generators=gens)
        for i, (seed, counter) in enumerate(keys):
            arrays = [(prob.params[i], high.params[i])]
            arrays += [(state[i], hstate[i]) for state, hstate in zip(prob.states, high.states)]
            for slot, (got, f32) in enumerate(arrays):
                if got.dtype == torch.float32:
                    assert_bitwise(got, f32, f"call {call}, tensor {i}, slot {slot}")
                    continue
                # The element index is the one of the order the kernel walks:
                # here row-major, as the transposed parameter's arrays do not
                # share its layout (the gradient and states are contiguous), so
                # contiguous stand-ins are walked (flat_tensors.h).
                index = torch.arange(f32.numel())
                r = R.sr_bits(R.sr_key(seed, counter, slot), index)
                expected = R.stochastic_round(f32.reshape(-1), got.dtype, r).reshape(f32.shape)
                assert_bitwise(got, expected, f"call {call}, tensor {i}, slot {slot}")
            assert int(gens[i][1]) == counter + 1
    # Not all values were on the grid: the rounding did choose.
    assert any(not torch.equal(p.float(), h) for p, h in zip(prob.params, high.params)) or \
        param_dtype == torch.float32


def test_stochastic_rounding_keeps_representable_values_and_specials():
    """lr = 0: every parameter is its own fp32 result, exactly representable,
    and stays itself (NaN and inf included); the float16 overflow goes to inf."""
    for dtype in (torch.bfloat16, torch.float16):
        p = torch.randn(3000).to(dtype)
        p[:3] = torch.tensor([float("inf"), -float("inf"), float("nan")])
        before = p.clone()
        _sgd_plain([p], [torch.randn(3000).to(dtype)], 0.0, sr_generators=generators(1))
        assert torch.equal(bits(p[:2]), bits(before[:2])) and p[2].isnan()
        assert torch.equal(bits(p[3:]), bits(before[3:]))
    big = torch.full((100,), 65504.0, dtype=torch.float16)
    _sgd_plain([big], [torch.full((100,), -31.0, dtype=torch.float16)], 1.0,
               sr_generators=generators(1))
    assert big.isinf().any() and (big.isinf() | (big == 65504.0)).all()


def test_skipped_call_changes_nothing():
    """found_inf = 1: no parameter, master, state or generator changes."""
    params, grads, states, steps = _adam_lowprec(torch.bfloat16, torch.bfloat16, n=3000)
    masters = [torch.zeros(p.shape, dtype=torch.int16) for p in params]
    gens = generators(len(params), counter=4)
    before = [t.clone() for t in params + masters + gens + steps + [t for s in states for t in s]]
    ops.update_("adam", params, grads, states, steps, ADAM,
                ops.StepArgs(lr=1e-3, masters=masters, sr_generators=gens,
                             found_inf=torch.tensor(1.0)))
    after = params + masters + gens + steps + [t for s in states for t in s]
    for a, b in zip(after, before):
        assert torch.equal(bits(a) if a.is_floating_point() else a,
                           bits(b) if b.is_floating_point() else b)
    ops.update_("adam", params, grads, states, steps, ADAM,
                ops.StepArgs(lr=1e-3, masters=masters, sr_generators=gens,
                             found_inf=torch.tensor(0.0)))
    assert [int(g[1]) for g in gens] == [5, 5]


def test_mixed_call_opcheck():
    """The schema's aliasing (masters, sr_generators mutated) and the fake kernel."""
    params, grads, states, steps = _adam_lowprec(torch.bfloat16, torch.float32, n=100)
    masters = [p.float() for p in params]
    gens = generators(len(params))
    op = torch.ops.fusedclip.adam_.default
    kwargs = dict(hyper=[float(ADAM[k]) for k in ops.RULES["adam"]], lr=1e-3, lr_tensor=None,
                  clip_coef=None, grad_scale=None, found_inf=None, clip_value=None,
                  spike_theta=None, unit_coefs=None, masters=masters, sr_generators=gens,
                  maximize=False)
    torch.library.opcheck(op, (params, grads, [t for s in states for t in s], steps), kwargs,
                          test_utils=("test_schema", "test_faketensor"))


# -- (e) refused combinations -----------------------------------------------------------------------
def _bad_calls():
    f32, bf16, f16, f64 = torch.float32, torch.bfloat16, torch.float16, torch.float64

    def masters(dtype, pd=bf16, shape=None):
        return dict(param_dtype=pd, masters=lambda ps: [torch.zeros(shape or p.shape, dtype=dtype)
                                                        for p in ps])

    yield "masters-f64", masters(f64), "masters\\[0\\] has dtype Double"
    yield "masters-int32", masters(torch.int32), "masters\\[0\\] has dtype Int"
    yield "remainders-fp16", masters(torch.int16, f16), "int16 masters .* bfloat16 parameters only"
    yield "masters-fp32-params", masters(f32, f32), "float32 masters are for bfloat16 or float16"
    yield "masters-f64-params", masters(f32, f64), "float32 masters are for bfloat16 or float16"
    yield "masters-shape", masters(f32, bf16, (2,)), "masters\\[0\\] has shape"
    yield "masters-count", dict(masters=lambda ps: [torch.zeros(ps[0].shape)]), "masters has 1"
    yield "masters-mixed-dtypes", dict(masters=lambda ps: [torch.zeros(ps[0].shape),
                                                           torch.zeros(ps[1].shape, dtype=torch.int16)]), \
        "all masters must have one dtype"

    def gens(make, pd=bf16):
        return dict(param_dtype=pd, sr_generators=make)

    yield "sr-int32", gens(lambda ps: [torch.zeros(2, dtype=torch.int32) for _ in ps]), \
        "sr_generators\\[0\\] must be a contiguous int64"
    yield "sr-3", gens(lambda ps: [torch.zeros(3, dtype=torch.int64) for _ in ps]), \
        "sr_generators\\[0\\] must be a contiguous int64"
    yield "sr-strided", gens(lambda ps: [torch.zeros(4, dtype=torch.int64)[::2] for _ in ps]), \
        "sr_generators\\[0\\] must be a contiguous int64"
    yield "sr-count", gens(lambda ps: [torch.zeros(2, dtype=torch.int64)]), "sr_generators has 1"
    yield "sr-f64-params", gens(lambda ps: [torch.zeros(2, dtype=torch.int64) for _ in ps], f64), \
        "sr_generators .* float32, bfloat16 or float16 parameters"
    yield "state-f64", dict(param_dtype=f32, state_dtype=f64), "float64 does not mix"
    yield "state-bf16-f64-params", dict(param_dtype=f64, state_dtype=bf16), "float64 does not mix"
    yield "state-list-two-dtypes", dict(param_dtype=f32, state_dtype=bf16, state_last=f16), \
        "exp_avgs\\[1\\] is Half and exp_avgs\\[0\\] BFloat16"
    yield "state-int", dict(param_dtype=f32, state_dtype=torch.int32), "has dtype Int"


@pytest.mark.parametrize("case,error", [pytest.param(c, e, id=i) for i, c, e in _bad_calls()])
def test_refused_before_anything_changes(case, error):
    """Every refused combination raises, naming the argument, before any
    tensor (parameters, states, steps, masters, generators) changes."""
    pd = case.get("param_dtype", torch.bfloat16)
    sd = case.get("state_dtype", pd)
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(5, 3, generator=gen).to(pd), torch.randn(7, generator=gen).to(pd)]
    grads = [torch.randn(p.shape, generator=gen).to(pd) for p in params]
    states = [[torch.rand(p.shape, generator=gen).to(sd) for p in params] for _ in range(2)]
    if "state_last" in case:
        states[0][1] = states[0][1].to(case["state_last"])
    steps = [torch.tensor(1.0) for _ in params]
    masters = case["masters"](params) if "masters" in case else None
    gens = case["sr_generators"](params) if "sr_generators" in case else None
    everything = params + [t for s in states for t in s] + steps + (masters or []) + (gens or [])
    before = [t.clone() for t in everything]
    with pytest.raises(RuntimeError, match=error):
        ops.update_("adam", params, grads, states, steps, ADAM,
                    ops.StepArgs(lr=1e-3, masters=masters, sr_generators=gens))
    for a, b in zip(everything, before):
        assert torch.equal(a, b) or (a.isnan() == b.isnan()).all()

"""The one registry of the tests: what the suite knows about each optimizer,
update rule and clip policy the library exports (test_registry.py fails when
``fusedclip.ops.RULES`` or ``fusedclip.__all__`` holds one that is not here,
or the reverse).

An ``OptimizerSpec`` says, for one fused optimizer: its torch.optim twin (None
where torch has none: Lion; then the tests against torch leave it out and the
float64 reference is its only oracle), its float64 reference
(fusedclip/reference.py), its state keys, its hyperparameters and their
defaults, how its random configurations are drawn (``random_configs``, the
one generator; ``family``: the optimizers drawn from one stream), which
dtypes apply, its update rule, the arguments it refuses, and its option sets
bit for bit against its twin. A ``RuleSpec`` says, for one update rule (one
fused op: Adam and AdamW share ``adam``), how the optimizer's state maps onto
the op's state lists, the hyperparameters the op takes, how to make sample
state for op-level tests, and the rule's float64 reference step. A
``PolicySpec`` (``POLICIES``) says, for one clip policy: its cases, each
making the policy and its float64 reference from the same arguments, its
scope, and the optimizers it applies to (those with a second moment only, for
SpikeClip); the clips an optimizer takes (``OptimizerSpec.policies``) follow
from it.

The generic tests (test_parity.py, test_reference.py, test_state_dict.py,
test_nonfinite.py, test_amp.py, test_compile.py, test_ops.py, test_cuda.py,
test_cuda_nosync.py, test_api.py, test_dropin.py, test_errors.py,
test_bitwise_torch.py, test_policies.py) run their checks for every spec
here, most of them on every device (``on_devices``: "cpu", and "cuda" with a
GPU and the CUDA kernels). Adding an optimizer is adding a spec to ``SPECS``
(and, for a new rule, a RuleSpec to ``RULES``); adding a policy is adding a
PolicySpec to ``POLICIES``.

Every op-level test reaches the update ops through ``call_update`` (the
Python entry point, ``fusedclip.ops.update_``) or ``op_call`` (the registered
op ``torch.ops.fusedclip.<rule>_`` itself, for ``torch.library.opcheck`` and
the op's own argument checks), which take an ``OpSample``: ``rule``,
``params``, ``grads``, ``states`` (one list of tensors per state list of the
rule), ``steps``, ``hyper`` (the rule's hyperparameters by name) and ``args``
(the arguments every update shares: lr, lr_tensor, clip_coef, grad_scale,
found_inf, clip_value, spike_theta, unit_coefs, maximize). Changing the op
interface is a change of those two functions (and of ``decode_update_call``,
which reads a spied call back).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import random
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable, NamedTuple

import pytest
import torch

import fusedclip
from fusedclip import ops
from fusedclip import reference as ref

from helpers import (
    DTYPE_NAMES, LARGE_SPECS, LOW_PRECISION, MANY, PARALLEL_SPEC, SMALL_SPECS, TINY_SHAPES,
    Problem, assert_close, clip_args, clip_name, clip_policy, clone_layout, copy_state,
    cpu_mirror, assert_states_close, flat, make_tensor, set_grads, torch_clip, tree_to_device,
)


# =============================================================================================
# Update rules: the op side
# =============================================================================================
@dataclass
class OpSample:
    """One call of an update op, as data (see the module docstring)."""

    rule: "RuleSpec"
    params: list
    grads: list
    states: list           # one list of tensors per state list of the rule
    steps: list
    hyper: dict            # the rule's hyperparameters
    args: dict             # lr, lr_tensor, clip_coef, grad_scale, found_inf, clip_value,
                           # unit_coefs, maximize

    def lists(self) -> list[list[torch.Tensor]]:
        """params, grads, every state list, steps: every tensor list of the call."""
        return [self.params, self.grads, *self.states, self.steps]

    def with_lists(self, lists) -> "OpSample":
        """The same call over other tensors (lists as ``lists()`` gives them)."""
        n = len(self.states)
        return dataclasses.replace(self, params=list(lists[0]), grads=list(lists[1]),
                                   states=[list(s) for s in lists[2:2 + n]],
                                   steps=list(lists[2 + n]))

    def with_grads(self, grads) -> "OpSample":
        return dataclasses.replace(self, grads=list(grads))

    def with_args(self, **args) -> "OpSample":
        return dataclasses.replace(self, args={**self.args, **args})

    def with_hyper(self, **hyper) -> "OpSample":
        return dataclasses.replace(self, hyper={**self.hyper, **hyper})

    def clone(self) -> "OpSample":
        """Copies of every tensor list (same layouts); args and hyper shared."""
        return self.with_lists([[clone_layout(t) for t in group] for group in self.lists()])

    def to(self, device) -> "OpSample":
        """The call on `device`: every tensor moved, strides kept."""
        moved = self.with_lists(tree_to_device(self.lists(), device))
        return dataclasses.replace(moved, args=tree_to_device(self.args, device))


def step_args(s: OpSample) -> ops.StepArgs:
    """The sample's shared step arguments as the Python entry point takes them
    (a tensor lr, where given, is the lr)."""
    a = s.args
    lr = a["lr_tensor"] if a.get("lr_tensor") is not None else a["lr"]
    return ops.StepArgs(lr=lr, clip_coef=a.get("clip_coef"), grad_scale=a.get("grad_scale"),
                        found_inf=a.get("found_inf"), clip_value=a.get("clip_value"),
                        spike_theta=a.get("spike_theta"), unit_coefs=a.get("unit_coefs"),
                        maximize=a["maximize"], masters=a.get("masters"),
                        sr_generators=a.get("sr_generators"))


def call_update(s: OpSample) -> None:
    """The update, in place, through the Python entry point
    (``fusedclip.ops.update_(rule, params, grads, states, steps, hyper, args)``)."""
    ops.update_(s.rule.name, s.params, s.grads, s.states, s.steps, s.hyper, step_args(s))


def op_call(s: OpSample):
    """``(op overload, args, kwargs)`` of the registered op for this call
    (``torch.ops.fusedclip.<rule>_``: the state lists as one flat list, the
    hyperparameters as a list in the rule's order, the shared step arguments
    as keywords): for torch.library.opcheck and the op's own argument checks."""
    a = s.args
    clip_value, spike_theta = a.get("clip_value"), a.get("spike_theta")
    kwargs = dict(
        hyper=[float(s.hyper[name]) for name in ops.RULES[s.rule.name]],
        lr=float(a["lr"]), lr_tensor=a.get("lr_tensor"), clip_coef=a.get("clip_coef"),
        grad_scale=a.get("grad_scale"), found_inf=a.get("found_inf"),
        clip_value=None if clip_value is None else float(clip_value),
        spike_theta=None if spike_theta is None else float(spike_theta),
        unit_coefs=a.get("unit_coefs"), masters=a.get("masters"),
        sr_generators=a.get("sr_generators"), maximize=bool(a["maximize"]))
    args = (s.params, s.grads, [t for state in s.states for t in state], s.steps)
    return getattr(torch.ops.fusedclip, s.rule.name + "_").default, args, kwargs


def call_op(s: OpSample) -> None:
    """The registered op itself, with no Python wrapper in between."""
    fn, args, kwargs = op_call(s)
    fn(*args, **kwargs)


def run_update(s: OpSample) -> OpSample:
    """The update of a copy of the sample's tensors (the sample is left as it is)."""
    out = s.clone()
    call_update(out)
    return out


# The Python entry points an optimizer's step calls (for tests that spy on them).
UPDATE_ENTRY_POINTS = ("update_",)


def decode_update_call(name: str, args: tuple, kwargs: dict) -> dict:
    """What a spied call of an entry point of UPDATE_ENTRY_POINTS received:
    the rule, ``params``, ``grads`` and the shared step arguments by name."""
    rule, params, grads, states, steps, hyper, step = args
    return dict(step._asdict(), rule=rule, params=params, grads=grads, states=states,
                steps=steps, hyper=hyper)


@dataclass(frozen=True)
class RuleSpec:
    """One update rule (one fused op)."""

    name: str                       # "adam": fusedclip.ops.adam_, torch.ops.fusedclip.adam_
    state_keys: tuple[str, ...]     # what each op state list holds, torch's state keys
    sample_hyper: dict              # the op's hyperparameters in the samples
    sample_maximize: bool           # maximize in the samples
    # (gen, shapes, dtype, hyper, started, step_dtype) -> (states, steps): sample state,
    # drawn from `gen` after the parameters and gradients.
    make_states: Callable
    # (gen, shape, dtype, sample) -> appends one tensor to every state list and a step
    extend_states: Callable
    # (param, grad, states_i, step_i, hyper, lr, maximize) on float64 copies -> the
    # state tensors after one reference step (param updated in place), in list order.
    reference_step: Callable
    # The op's names of its state lists and step list (its error messages name them).
    list_names: tuple = ()
    steps_name: str | None = "steps"   # None: the rule counts no steps
    second_moment: bool = False         # keeps exp_avg_sq (what SpikeClip reads)
    # Whether a NaN gradient element reaches its parameter in the step (Lion's
    # sign(NaN) is 0, as torch.sign's: there it reaches the momentum only).
    nan_reaches_param: bool = True
    # Option sets of the samples that reach the rule's branches (ids -> options).
    variants: dict = field(default_factory=dict)
    base: dict = field(default_factory=dict)   # options of the plain contract samples
    alt: dict = field(default_factory=dict)    # ... and of a second sample per dtype (opcheck)
    # The op's own hyperparameter checks: (id, hyper changes, error regex).
    bad_hyper: tuple = ()

    @property
    def op(self) -> str:
        return f"fusedclip::{self.name}_"

    def __repr__(self) -> str:
        return self.name


SAMPLE_SHAPES = [((7,), "contiguous"), ((4, 6), "contiguous"), ((), "contiguous"),
                 ((0,), "contiguous"), ((3, 33), "contiguous")]
# Shapes added by the gradient-transform samples: units that span CPU chunks
# and chunks that start inside a unit.
TRANSFORM_SHAPES = [(3, 20000), (9000, 3)]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _coef(clip, n):
    return {"none": None, "one": torch.tensor(0.7),
            "per-tensor": torch.linspace(0.2, 1.0, n)}[clip]


def op_sample(rule: "RuleSpec | str", dtype, *, layout="contiguous", lr_tensor=False,
              clip="one", grad_scale=False, found_inf=None, step_dtype=torch.float32,
              started=True, maximize=None, spike_theta=None, seed=0, **hyper) -> OpSample:
    """A sample call of `rule`'s op: five tensors (a 0-d and an empty one among
    them, the second stored as `layout` says), random state, a clip
    coefficient ("none", "one" or "per-tensor"), optionally a tensor lr, a
    grad_scale of 4 and a found_inf flag. ``started=False`` makes every step
    a first one where the rule tells first steps apart (SGD's buffers)."""
    rule = RULES[rule] if isinstance(rule, str) else rule
    g = _gen(seed)
    shapes = list(SAMPLE_SHAPES)
    shapes[1] = ((4, 6), layout if layout != "channels_last" else "contiguous")
    params = [make_tensor(s, lay, g, dtype) for s, lay in shapes]
    grads = [make_tensor(s, "contiguous", g, dtype) for s, _ in shapes]
    hyper = {**rule.sample_hyper, **hyper}
    states, steps = rule.make_states(g, [s for s, _ in shapes], dtype, hyper, started,
                                     step_dtype)
    args = dict(lr=0.01, lr_tensor=torch.tensor([0.02]) if lr_tensor else None,
                clip_coef=_coef(clip, len(shapes)),
                grad_scale=torch.tensor(4.0) if grad_scale else None, found_inf=found_inf,
                clip_value=None, spike_theta=spike_theta, unit_coefs=None,
                maximize=rule.sample_maximize if maximize is None else maximize)
    return OpSample(rule, params, grads, states, steps, hyper, args)


def transform_sample(rule, dtype, *, layout="transposed", coef_dtype=torch.float32, seed=7,
                     large=True, **options) -> tuple[OpSample, list[torch.Tensor]]:
    """A sample without a clip coefficient, with units that span CPU chunks and
    chunks that start inside a unit (unless not `large`), and one coefficient
    per unit (returned beside it, not yet in its args)."""
    s = op_sample(rule, dtype, layout=layout, clip="none", seed=seed, **options)
    g = _gen(seed + 1)
    for shape in TRANSFORM_SHAPES if large else ():
        s.params.append(make_tensor(shape, "contiguous", g, dtype))
        s.grads.append(make_tensor(shape, "contiguous", g, dtype))
        s.rule.extend_states(g, shape, dtype, s)
    coefs = [torch.rand(ops.unit_counts([p])[0], generator=g, dtype=torch.float64).to(coef_dtype)
             for p in s.params]
    return s, coefs


def times_units(grads, coefs):
    """Each gradient times its unit coefficients, in the gradient's dtype."""
    out = []
    for grad, c in zip(grads, coefs):
        c = c.to(grad.dtype)
        out.append(grad * (c.reshape((-1,) + (1,) * (grad.dim() - 1)) if grad.dim() > 1 else c[0]))
    return out


# -- adam_ ---------------------------------------------------------------------------------------
def _adam_states(g, shapes, dtype, hyper, started, step_dtype):
    exp_avgs = [make_tensor(s, "contiguous", g, dtype, 0.1) for s in shapes]
    exp_avg_sqs = [make_tensor(s, "contiguous", g, dtype, 0.1).abs() for s in shapes]
    maxes = [v * 1.5 for v in exp_avg_sqs] if hyper["amsgrad"] else []
    steps = [torch.tensor(float(i + 1) if started else 0.0, dtype=step_dtype)
             for i in range(len(shapes))]
    return [exp_avgs, exp_avg_sqs, maxes], steps


def _adam_extend(g, shape, dtype, s):
    s.states[0].append(make_tensor(shape, "contiguous", g, dtype))
    s.states[1].append(make_tensor(shape, "contiguous", g, dtype, 0.1).abs())
    if s.hyper["amsgrad"]:
        s.states[2].append(make_tensor(shape, "contiguous", g, dtype, 0.1).abs())
    s.steps.append(torch.tensor(2.0))


def _adam_reference(p, grad, states, step, hyper, lr, maximize):
    amsgrad = hyper["amsgrad"]
    state = {"step": float(step), "exp_avg": states[0], "exp_avg_sq": states[1],
             "max_exp_avg_sq": states[2] if amsgrad else None}
    ref.adam_step(p, grad, state, lr=lr, beta1=hyper["beta1"], beta2=hyper["beta2"],
                  eps=hyper["eps"], weight_decay=hyper["weight_decay"], amsgrad=amsgrad,
                  maximize=maximize, decoupled_weight_decay=hyper["decoupled_weight_decay"])
    return [state["exp_avg"], state["exp_avg_sq"]] + ([state["max_exp_avg_sq"]] if amsgrad else [])


# -- sgd_ ----------------------------------------------------------------------------------------
def _sgd_states(g, shapes, dtype, hyper, started, step_dtype):
    if not hyper["momentum"]:
        return [[]], []
    bufs = [make_tensor(s, "contiguous", g, dtype, 0.1) for s in shapes]
    # mixed: some buffers started (counter > 0), the first not
    counters = [torch.tensor(float(i) if started else 0.0, dtype=step_dtype)
                for i in range(len(shapes))]
    return [bufs], counters


def _sgd_extend(g, shape, dtype, s):
    if s.states[0]:  # not without momentum
        s.states[0].append(make_tensor(shape, "contiguous", g, dtype, 0.1).abs())
        s.steps.append(torch.tensor(2.0, dtype=s.steps[0].dtype))


def _sgd_reference(p, grad, states, step, hyper, lr, maximize):
    started = bool(states) and float(step) > 0
    state = {"momentum_buffer": states[0] if started else None}
    ref.sgd_step(p, grad, state, lr=lr, momentum=hyper["momentum"],
                 dampening=hyper["dampening"], weight_decay=hyper["weight_decay"],
                 nesterov=hyper["nesterov"], maximize=maximize)
    return [state["momentum_buffer"]] if hyper["momentum"] else []


# -- adagrad_ ------------------------------------------------------------------------------------
def _adagrad_states(g, shapes, dtype, hyper, started, step_dtype):
    sums = [make_tensor(s, "contiguous", g, dtype, 0.1).abs() for s in shapes]
    steps = [torch.tensor(float(i) if started else 0.0, dtype=step_dtype)
             for i in range(len(shapes))]
    return [sums], steps


def _adagrad_extend(g, shape, dtype, s):
    s.states[0].append(make_tensor(shape, "contiguous", g, dtype, 0.1).abs())
    s.steps.append(torch.tensor(2.0, dtype=s.steps[0].dtype))


def _adagrad_reference(p, grad, states, step, hyper, lr, maximize):
    state = {"step": float(step), "sum": states[0]}
    ref.adagrad_step(p, grad, state, lr=lr, lr_decay=hyper["lr_decay"],
                     weight_decay=hyper["weight_decay"], eps=hyper["eps"], maximize=maximize)
    return [state["sum"]]


# -- lion_ ---------------------------------------------------------------------------------------
def _lion_states(g, shapes, dtype, hyper, started, step_dtype):
    return [[make_tensor(s, "contiguous", g, dtype, 0.1) for s in shapes]], []


def _lion_extend(g, shape, dtype, s):
    s.states[0].append(make_tensor(shape, "contiguous", g, dtype, 0.1))


def _lion_reference(p, grad, states, step, hyper, lr, maximize):
    state = {"exp_avg": states[0]}
    ref.lion_step(p, grad, state, lr=lr, beta1=hyper["beta1"], beta2=hyper["beta2"],
                  weight_decay=hyper["weight_decay"], maximize=maximize)
    return [state["exp_avg"]]


RULES: dict[str, RuleSpec] = {
    "adam": RuleSpec(
        name="adam", state_keys=("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
        sample_hyper=dict(beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.05, amsgrad=False,
                          decoupled_weight_decay=True),
        sample_maximize=False, make_states=_adam_states, extend_states=_adam_extend,
        reference_step=_adam_reference,
        list_names=("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"), second_moment=True,
        bad_hyper=(("eps", dict(eps=-1.0), "invalid eps -1"),
                   ("beta1", dict(beta1=1.0), r"invalid beta1 1 \(must be in \[0, 1\)\)"),
                   ("beta2", dict(beta2=-0.5), "invalid beta2 -0.5"),
                   ("weight-decay", dict(weight_decay=-1.0), "invalid weight_decay -1"),
                   ("amsgrad-no-max", dict(amsgrad=True),
                    r"max_exp_avg_sqs has 0 tensors but params has 5")),
        variants={"adam-ams": dict(amsgrad=True, layout="contiguous"),
                  "adam-ams-max-T": dict(amsgrad=True, maximize=True, layout="transposed"),
                  "adam-slice": dict(layout="slice")},
        base=dict(amsgrad=True)),
    "sgd": RuleSpec(
        name="sgd", state_keys=("momentum_buffer",),
        sample_hyper=dict(momentum=0.9, dampening=0.0, weight_decay=0.05, nesterov=False),
        sample_maximize=False, make_states=_sgd_states, extend_states=_sgd_extend,
        reference_step=_sgd_reference,
        list_names=("momentum_buffers",), steps_name="buffer_steps",
        alt=dict(nesterov=True),
        bad_hyper=(("momentum", dict(momentum=-0.5), r"invalid momentum -0.5 \(must be >= 0\)"),
                   ("wd", dict(weight_decay=-1.0), "invalid weight_decay -1"),
                   ("dampening", dict(dampening=float("nan")), "invalid dampening nan"),
                   ("nesterov", dict(nesterov=True, dampening=0.1),
                    "nesterov momentum requires momentum > 0 and zero dampening"),
                   ("buffers-without-momentum", dict(momentum=0.0),
                    "without momentum, momentum_buffers and buffer_steps must be empty")),
        variants={"sgd-momentum": dict(layout="transposed"),
                  "sgd-nesterov-first": dict(nesterov=True, started=False, layout="transposed")}),
    "adagrad": RuleSpec(
        name="adagrad", state_keys=("sum",),
        sample_hyper=dict(lr_decay=0.1, weight_decay=0.05, eps=1e-10),
        sample_maximize=True, make_states=_adagrad_states, extend_states=_adagrad_extend,
        reference_step=_adagrad_reference,
        list_names=("state_sums",),
        bad_hyper=(("lr-decay", dict(lr_decay=-1.0), "invalid lr_decay -1"),
                   ("eps", dict(eps=-1.0), "invalid eps -1"),
                   ("wd", dict(weight_decay=-1.0), "invalid weight_decay -1")),
        variants={"adagrad": dict(layout="transposed")}),
    "lion": RuleSpec(
        name="lion", state_keys=("exp_avg",),
        sample_hyper=dict(beta1=0.9, beta2=0.99, weight_decay=0.05),
        sample_maximize=False, make_states=_lion_states, extend_states=_lion_extend,
        reference_step=_lion_reference,
        list_names=("exp_avgs",), steps_name=None, nan_reaches_param=False,
        bad_hyper=(("beta2", dict(beta2=1.5), r"invalid beta2 1.5 \(must be in \[0, 1\]\)"),
                   ("wd", dict(weight_decay=-1.0), "invalid weight_decay -1")),
        variants={"lion": dict(layout="transposed"),
                  "lion-max-slice": dict(maximize=True, layout="slice")}),
}


def rule_params(rules=None) -> list:
    return [pytest.param(r, id=r.name) for r in (rules or RULES.values())]


def variant_params() -> list:
    """Every variant of every rule: ``(rule, options)`` pytest params."""
    return [pytest.param(r, options, id=name) for r in RULES.values()
            for name, options in r.variants.items()]


# =============================================================================================
# Clip policies
# =============================================================================================
@dataclass(frozen=True)
class PolicySpec:
    """One clip policy of ``fusedclip.__all__`` (a ClipPolicy subclass).

    Each case is a function of a namespace of classes: called with
    ``fusedclip`` it makes the policy, called with ``REFERENCE_POLICIES`` (the
    same names bound to fusedclip.reference's classes) its float64 reference,
    from the same arguments. A policy made of policies (``Chain``) builds its
    parts from the same namespace: ``lambda m: m.Chain(m.ValueClip(0.3), ...)``.
    """

    name: str                 # the class name, in fusedclip and in a state_dict's "clip_policy"
    reference: type           # its float64 reference (fusedclip/reference.py)
    # "global" (one coefficient), "tensor" (one per tensor), "unit" (one per
    # index of dim 0) or "element" (a transform of the elements: no coefficient,
    # clip_stats["clip_coef"] stays 1)
    scope: str
    cases: dict               # case id -> build(namespace); ids unique over the table
    example: str              # the case of the tests that take one instance per policy
    stateful: tuple = ()      # cases whose state changes from step to step (state_dict tests)

    @property
    def fused(self) -> type:
        return getattr(fusedclip, self.name)

    def applies_to(self, spec: "OptimizerSpec") -> bool:
        """Whether its example applies to `spec` (see ``case_applies``)."""
        return case_applies(self.example, spec)

    def __repr__(self) -> str:
        return self.name


POLICIES: dict[str, PolicySpec] = {p.name: p for p in [
    PolicySpec("GlobalNorm", ref.RefGlobalNorm, "global", {
        "GlobalNorm(1)": lambda m: m.GlobalNorm(1.0),
        "GlobalNorm(0.5,inf)": lambda m: m.GlobalNorm(0.5, norm_type=math.inf),
    }, example="GlobalNorm(0.5,inf)"),
    PolicySpec("PerTensorNorm", ref.RefPerTensorNorm, "tensor", {
        "PerTensorNorm(0.4)": lambda m: m.PerTensorNorm(max_norm=0.4),
        "PerTensorNorm(0.3,inf)": lambda m: m.PerTensorNorm(max_norm=0.3, norm_type=math.inf),
    }, example="PerTensorNorm(0.4)"),
    PolicySpec("SmoothClip", ref.RefSmoothClip, "global", {
        "SmoothClip(2.0)": lambda m: m.SmoothClip(threshold=2.0),
    }, example="SmoothClip(2.0)"),
    PolicySpec("Normalize", ref.RefNormalize, "global", {
        "Normalize": lambda m: m.Normalize(),
        "Normalize(0.5)": lambda m: m.Normalize(eps=0.5),
    }, example="Normalize"),
    PolicySpec("AutoClip", ref.RefAutoClip, "global", {
        "AutoClip(10)": lambda m: m.AutoClip(),
        "AutoClip(10,hist8)": lambda m: m.AutoClip(10.0, history=8),
        "AutoClip(60,hist5)": lambda m: m.AutoClip(percentile=60.0, history=5),
        "AutoClip(100,hist1)": lambda m: m.AutoClip(percentile=100.0, history=1),
    }, example="AutoClip(10,hist8)", stateful=("AutoClip(60,hist5)",)),
    PolicySpec("ZClip", ref.RefZClip, "global", {
        "ZClip(warm3)": lambda m: m.ZClip(alpha=0.8, z_thresh=1.5, max_norm=20.0,
                                          warmup_steps=3),
        "ZClip(defaults,warm3)": lambda m: m.ZClip(warmup_steps=3),
        "ZClip(mean,max1)": lambda m: m.ZClip(alpha=0.9, z_thresh=1.0, warmup_steps=2,
                                              clip_option="mean"),
        "ZClip(pct,nomax,skipspike)": lambda m: m.ZClip(
            alpha=0.9, z_thresh=0.5, max_norm=None, warmup_steps=4, mode="percentile",
            skip_update_on_spike=True),
        "ZClip(factor0.7,warm0)": lambda m: m.ZClip(z_thresh=1.0, clip_factor=0.7,
                                                    warmup_steps=0, max_norm=50.0),
    }, example="ZClip(defaults,warm3)", stateful=("ZClip(warm3)", "ZClip(pct,nomax,skipspike)")),
    PolicySpec("AdaGC", ref.RefAdaGC, "tensor", {
        "AdaGC(warm4)": lambda m: m.AdaGC(beta=0.9, lambda_abs=3.0, warmup_steps=4),
        "AdaGC(defaults,warm4)": lambda m: m.AdaGC(warmup_steps=4),
        "AdaGC(default-ish)": lambda m: m.AdaGC(lambda_abs=0.5, lambda_rel=1.0, warmup_steps=1),
    }, example="AdaGC(defaults,warm4)", stateful=("AdaGC(warm4)",)),
    PolicySpec("ValueClip", ref.RefValueClip, "element", {
        "ValueClip(0.3)": lambda m: m.ValueClip(clip_value=0.3),
    }, example="ValueClip(0.3)"),
    PolicySpec("AGC", ref.RefAGC, "unit", {
        "AGC": lambda m: m.AGC(),
        "AGC(0.3)": lambda m: m.AGC(clip_factor=0.3),
        "AGC(0.5,eps3)": lambda m: m.AGC(clip_factor=0.5, eps=3.0),
    }, example="AGC(0.3)"),
    PolicySpec("SpikeClip", ref.RefSpikeClip, "element", {
        "SpikeClip(2)": lambda m: m.SpikeClip(2.0),
        "SpikeClip(50)": lambda m: m.SpikeClip(theta=50.0),
    }, example="SpikeClip(2)"),
    # A chain's scope is its finest member's: the table's is its example's.
    PolicySpec("Chain", ref.RefChain, "unit", {
        "Chain(AGC,ZClip,AdaGC,ValueClip)": lambda m: m.Chain(
            m.AGC(0.3), m.ZClip(warmup_steps=3), m.AdaGC(warmup_steps=4), m.ValueClip(0.3)),
        "Chain(PerTensorNorm,GlobalNorm)": lambda m: m.Chain(
            m.PerTensorNorm(0.4), m.GlobalNorm(1.0)),
        "Chain(GlobalNorm,SpikeClip)": lambda m: m.Chain(m.GlobalNorm(1.0), m.SpikeClip(2.0)),
    }, example="Chain(AGC,ZClip,AdaGC,ValueClip)",
        stateful=("Chain(AGC,ZClip,AdaGC,ValueClip)",)),
]}
# The same names bound to the reference classes: what a case builds its reference from.
REFERENCE_POLICIES = SimpleNamespace(**{p.name: p.reference for p in POLICIES.values()})
# Every case of every policy: case id -> its policy.
POLICY_OF_CASE: dict[str, PolicySpec] = {c: p for p in POLICIES.values() for c in p.cases}


def policy_case(case: str):
    """A fresh fusedclip policy of the case."""
    return POLICY_OF_CASE[case].cases[case](fusedclip)


def reference_case(case: str) -> ref.ReferencePolicy:
    """A fresh float64 reference policy of the case."""
    return POLICY_OF_CASE[case].cases[case](REFERENCE_POLICIES)


def case_applies(case: str, spec: "OptimizerSpec") -> bool:
    """Whether the case's policy applies to `spec`: one that reads optimizer
    state (``reads_state``: SpikeClip's second moment, alone or in a Chain)
    only to optimizers whose rule keeps a second moment; the others refuse it."""
    return spec.rule.second_moment or policy_case(case).reads_state is None


def policy_cases(spec: "OptimizerSpec | None" = None) -> list[str]:
    """Every case id of every policy (that applies to `spec`)."""
    return [c for p in POLICIES.values() for c in p.cases
            if spec is None or case_applies(c, spec)]


# The clips of the tests that take one instance per kind of clip (compile,
# copies, no-sync): no clip, a float max_norm, and each policy's example.
CLIP_FORMS = {"None": lambda: None, "GlobalNorm": lambda: 1.0}


# name -> the policy whose example it makes: the policy's name, or its example's
# case id where a clip form has the name ("GlobalNorm": the float max_norm).
_EXAMPLE_POLICY = {(p.name if p.name not in CLIP_FORMS else p.example): p
                   for p in POLICIES.values()}
# name -> a fresh clip: the clip forms, then every policy's example.
POLICY_CASES = {**CLIP_FORMS, **{name: functools.partial(policy_case, p.example)
                                 for name, p in _EXAMPLE_POLICY.items()}}


def clip_kinds(spec: "OptimizerSpec") -> tuple[str, ...]:
    """The names of POLICY_CASES that apply to `spec`."""
    return tuple(name for name in POLICY_CASES
                 if name in CLIP_FORMS or _EXAMPLE_POLICY[name].applies_to(spec))
ALL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


# =============================================================================================
# Optimizers
# =============================================================================================


class BadArg(NamedTuple):
    """A constructor argument an optimizer refuses (test_errors.py)."""

    kwargs: dict
    error: type
    match: str                   # regex of the message
    torch_refuses: bool = False  # its torch.optim twin refuses it too (a ValueError)


# What every optimizer refuses: the shared arguments lr, clip and nonfinite.
COMMON_BAD_ARGS = (
    BadArg(dict(lr=-0.1), ValueError, r"Invalid learning rate: -0\.1", torch_refuses=True),
    BadArg(dict(lr=math.nan), ValueError, "Invalid learning rate"),
    BadArg(dict(lr="0.1"), ValueError, "Invalid learning rate"),
    BadArg(dict(lr=torch.tensor(-0.1)), ValueError, "Invalid learning rate", torch_refuses=True),
    BadArg(dict(lr=torch.tensor([0.1, 0.2])), ValueError, "Tensor lr must be 1-element",
           torch_refuses=True),
    BadArg(dict(lr=torch.tensor(1)), ValueError, "Tensor lr must be a real floating tensor"),
    BadArg(dict(clip="1.0"), TypeError, "clip must be None, a float max_norm"),
    BadArg(dict(clip=True), TypeError, "clip must be None, a float max_norm"),
    BadArg(dict(clip=[1.0]), TypeError, "clip must be None, a float max_norm"),
    BadArg(dict(clip=torch.tensor(1.0)), TypeError, "clip must be None, a float max_norm"),
    BadArg(dict(clip=-1.0), ValueError, "max_norm must be >= 0, got -1.0"),
    BadArg(dict(clip=math.nan), ValueError, "max_norm must not be NaN"),
    BadArg(dict(nonfinite="ignore"), ValueError,
           r"nonfinite must be one of \('skip', 'raise', 'propagate'\)"),
    BadArg(dict(nonfinite=None), ValueError, "nonfinite must be one of"),
    BadArg(dict(nonfinite="SKIP"), ValueError, "nonfinite must be one of"),
)
# What every optimizer refuses in a group changed after construction (by hand
# or by a scheduler): (key, value, message regex).
COMMON_BAD_GROUP_VALUES = (
    ("lr", -1e-3, "Invalid learning rate"),
    ("lr", torch.tensor(-1e-3), "Invalid learning rate"),
    ("lr", torch.tensor([math.nan]), "Invalid learning rate"),
)
ADAM_BAD_ARGS = (
    BadArg(dict(eps=-1e-8), ValueError, "Invalid epsilon value: -1e-08", torch_refuses=True),
    BadArg(dict(eps=math.nan), ValueError, "Invalid epsilon value"),
    BadArg(dict(weight_decay=-0.01), ValueError, "Invalid weight_decay value: -0.01",
           torch_refuses=True),
    BadArg(dict(betas=(1.0, 0.999)), ValueError, "Invalid beta parameter at index 0: 1.0",
           torch_refuses=True),
    BadArg(dict(betas=(-0.1, 0.999)), ValueError, "Invalid beta parameter at index 0",
           torch_refuses=True),
    BadArg(dict(betas=(0.9, 1.0)), ValueError, "Invalid beta parameter at index 1: 1.0",
           torch_refuses=True),
    BadArg(dict(betas=(0.9, 1.5)), ValueError, "Invalid beta parameter at index 1",
           torch_refuses=True),
    BadArg(dict(betas=(0.9, math.nan)), ValueError, "Invalid beta parameter at index 1"),
    BadArg(dict(betas=(0.9,)), ValueError, "betas must be a pair"),
    # torch's own message for a float and a Tensor; fusedclip refuses Tensor betas.
    BadArg(dict(betas=(torch.tensor(0.9), 0.999)), ValueError,
           r"betas must be either both floats or both Tensors", torch_refuses=True),
    BadArg(dict(betas=(torch.tensor(0.9), torch.tensor(0.999))), ValueError,
           r"betas\[0\] is a Tensor"),
)
ADAM_BAD_GROUP_VALUES = (
    ("eps", -1.0, "Invalid epsilon value"),
    ("betas", (0.9, 1.0), "Invalid beta parameter at index 1"),
    ("betas", (1.2, 0.9), "Invalid beta parameter at index 0"),
    ("weight_decay", -1.0, "Invalid weight_decay value"),
)


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    fused: type
    twin: type | None             # torch.optim's class; None: tested against the reference only
    reference: type               # fusedclip.reference's float64 optimizer
    rule: RuleSpec
    state_keys: tuple[str, ...]   # state tensors (torch's keys) besides "step"
    hyper: tuple[str, ...]        # hyperparameters a param group holds (besides params)
    # Hyperparameters for tests that need one good configuration (amp,
    # compile, copies, state dicts): every option that changes the state on.
    example: dict
    # (rng, dtype, against) -> a group's random hyperparameters; `against` is
    # "torch" or "reference" (low precision against torch stays where torch's
    # rounding is well conditioned).
    random_group: Callable
    # (key, group) -> whether the state tensor `key` exists for a group
    state_applies: Callable
    flags: Callable               # (hyperparameter dicts) -> id flags
    bool_keys: tuple = ()         # the configurations must reach both values
    numeric_keys: tuple = ()      # ... at least three values
    # Keys configurations sometimes give the constructor instead of the groups.
    ctor_keys: tuple = ()
    ctor_only: Callable | None = None   # (rng) -> constructor-only values
    eager_state: bool = False     # state made when a parameter joins (Adagrad)
    dtypes: tuple = ALL_DTYPES
    parity: tuple = (16, 0)       # (number, seed) of the random configurations vs torch
    against_reference: tuple = (8, 0)
    # The optimizers whose random configurations are drawn from one stream with
    # its own (random_configs; they share parity and against_reference): the
    # Adam family shares its pinned cases (every dtype, many tensors, the
    # multi-threaded path) between Adam and AdamW. () is the spec alone.
    family: tuple = ()
    # Two groups' hyperparameters of the low-precision weight decay case.
    low_precision_groups: tuple = ()
    # Its own constructor refusals (BadArg; COMMON_BAD_ARGS are every optimizer's)
    # and its own refusals of a group changed later ((key, value, regex);
    # COMMON_BAD_GROUP_VALUES likewise): test_errors.py.
    bad_args: tuple = ()
    bad_group_values: tuple = ()
    # Bit for bit torch's fused step with clip=None (test_bitwise_torch.py): the
    # option sets, (low_precision) -> kwargs list, and one option set run with a
    # tensor lr. None where there is no twin.
    bitwise: Callable | None = None
    bitwise_tensor_lr: dict | None = None
    # The groups of the state dict hand-overs: every option the state depends on.
    state_dict_groups: tuple = ()
    # Constructor arguments of those tests (what torch takes from its
    # constructor only: Adagrad's initial_accumulator_value).
    ctor: dict = field(default_factory=dict)
    extra_coverage: Callable | None = None

    def __repr__(self) -> str:
        return self.name

    @property
    def policies(self) -> tuple[str, ...]:
        """The clips it takes (POLICY_CASES' names): every policy that applies."""
        return clip_kinds(self)

    @functools.cached_property
    def defaults(self) -> dict:
        """Every hyperparameter's default, as the fused class states it (the
        parity tests check that these are torch's)."""
        opt = self.fused([torch.nn.Parameter(torch.zeros(1))])
        return {k: opt.defaults[k] for k in self.hyper}

    def make_fused(self, problem: Problem, params, ctor: dict | None = None, device="cpu",
                   **kwargs):
        return self.fused(problem.param_groups(params, device), **(ctor or {}), **kwargs)

    def make_torch(self, problem: Problem, params, ctor: dict | None = None, device="cpu"):
        # foreach=False: torch.optim's for-loop step (what it picks on the CPU anyway).
        return self.twin(problem.param_groups(params, device), foreach=False, **(ctor or {}))

    def make_reference(self, problem: Problem, params, clip=None, ctor: dict | None = None,
                       **kwargs):
        """The float64 reference of a configuration; `ctor` holds the
        constructor arguments the fused optimizer was given; `clip` is a
        configuration's clip (None, max_norm, ("global", ...)) or a reference
        policy."""
        if isinstance(clip, ref.ReferencePolicy):
            kwargs["clip"] = clip
        else:
            args = clip_args(clip)
            kwargs.update(clip=None if args is None else args[0],
                          norm_type=2.0 if args is None else args[1])
        kwargs.setdefault("round_to", problem.dtype if problem.dtype in LOW_PRECISION else None)
        return self.reference(problem.reference_groups(params, {**self.defaults, **(ctor or {})}),
                              **kwargs)

    def configs(self, against: str) -> list:
        """The spec's random configurations against "torch" or "reference"."""
        return [c for c in self.stream(against) if c.values[0]["spec"] is self]

    def stream(self, against: str) -> list:
        """The configurations drawn together with the spec's own (its family's
        stream), over which the coverage of the random configurations is
        checked: the pinned cases fall to one member of a family."""
        n, seed = self.parity if against == "torch" else self.against_reference
        return list(random_configs(self.family or (self.name,), n, seed, against))


NORM_OPS = ("fusedclip::multi_tensor_norm", "fusedclip::multi_tensor_unit_norm")


def step_ops(spec: "OptimizerSpec | RuleSpec | None" = None) -> list[str]:
    """The ops a step of `spec` calls (of every spec: None), whose CUDA
    kernels its CUDA tests need."""
    if spec is None:
        return list(NORM_OPS) + sorted({s.rule.op for s in SPECS.values()})
    rule = spec if isinstance(spec, RuleSpec) else spec.rule
    return list(NORM_OPS) + [rule.op]


def on_devices(cases, spec_of: Callable | None = None) -> list:
    """Every case (pytest params or plain values) on every device, as params
    ``(device, *values)``: "cpu", and "cuda", skipped without a GPU or
    without the CUDA kernels the case needs: ``spec_of(values)`` gives its
    spec or rule (whose step ops it needs) or a list of op names; every step
    op where not given. conftest marks the "cuda" instances `cuda`."""
    from helpers import cuda_skips
    out = []
    for device in ("cpu", "cuda"):
        for case in cases:
            values = tuple(case.values) if hasattr(case, "values") else (case,)
            marks = list(getattr(case, "marks", ()))
            if device == "cuda":
                needs = spec_of(values) if spec_of else None
                marks += cuda_skips(needs if isinstance(needs, (list, tuple))
                                    else step_ops(needs))
            case_id = getattr(case, "id", None)
            out.append(pytest.param(device, *values, marks=marks,
                                    id=None if case_id is None else f"{device}-{case_id}"))
    return out


def spec_params(specs=None, twin: bool | None = None) -> list:
    """pytest params of the specs (``twin=True``: those with a torch twin)."""
    specs = list(specs or SPECS.values())
    if twin is not None:
        specs = [s for s in specs if (s.twin is not None) == twin]
    return [pytest.param(s, id=s.name) for s in specs]


# -- random hyperparameters, per optimizer ------------------------------------------------------
def _lr(rng, choices):
    lr = rng.choice(choices)
    return f"tensor:{lr}" if rng.random() < 0.3 else lr


def _adam_group(decoupled_choice: bool):
    def group(rng: random.Random, dtype, against: str) -> dict:
        low = dtype in LOW_PRECISION
        # Learning rates big enough that low-precision parameters move at all
        # (a 1e-3 step vanishes against a bfloat16 ulp of a unit-size weight).
        h = {"lr": _lr(rng, [1e-2, 3e-2] if low else [1e-3, 3e-3, 1e-2, 0.1])}
        h["betas"] = rng.choice([(0.9, 0.999), (0.8, 0.99), (0.95, 0.95), (0.0, 0.9), (0.3, 0.5)])
        h["eps"] = rng.choice([1e-8, 1e-6, 1e-3] if low else [1e-8, 1e-6, 1e-3, 0.0])
        h["weight_decay"] = rng.choice([0.0, 0.0, 1e-2, 0.1])
        h["amsgrad"] = rng.random() < 0.4
        h["maximize"] = rng.random() < 0.3
        decoupled = not decoupled_choice
        if decoupled_choice:
            decoupled = h["decoupled_weight_decay"] = rng.random() < 0.3
        if low and not decoupled and against == "torch":
            # No L2 weight decay in low precision against torch: torch rounds
            # g + weight_decay * param to bfloat16 before Adam normalises it, and
            # where the two nearly cancel the rounded sum can take the other sign;
            # on a first step m / sqrt(v) turns any sign into a whole +-lr step, so a
            # half-ulp difference becomes a step-sized one. (L2 decay in low precision
            # is compared with the float64 reference: test_reference.py.)
            h["weight_decay"] = 0.0
        return h
    return group


def _adam_flags(hyper: list[dict]) -> list[str]:
    flags = ["ams"] if any(h["amsgrad"] for h in hyper) else []
    flags += ["decoupled"] if any(h.get("decoupled_weight_decay") for h in hyper) else []
    return flags


def _sgd_group(rng: random.Random, dtype, against: str) -> dict:
    low = dtype in LOW_PRECISION
    h = {"lr": _lr(rng, [1e-2, 3e-2, 0.1] if low else [1e-3, 1e-2, 0.1, 0.3])}
    h["weight_decay"] = rng.choice([0.0, 0.0, 1e-2, 0.1])
    h["maximize"] = rng.random() < 0.3
    h["momentum"] = rng.choice([0.0, 0.5, 0.9, 0.9])
    h["nesterov"] = h["momentum"] > 0 and rng.random() < 0.35
    h["dampening"] = 0.0 if h["nesterov"] else rng.choice([0.0, 0.1, 0.5])
    return h


def _sgd_flags(hyper: list[dict]) -> list[str]:
    flags = ["mom"] if any(h["momentum"] for h in hyper) else []
    flags += ["nest"] if any(h["nesterov"] for h in hyper) else []
    flags += ["damp"] if any(h["dampening"] for h in hyper) else []
    return flags


def _sgd_coverage(groups: list[dict]) -> None:
    # momentum with dampening, with Nesterov, and plain SGD
    assert any(g["momentum"] and g["dampening"] for g in groups)
    assert any(g["momentum"] == 0 for g in groups)


def _adagrad_group(rng: random.Random, dtype, against: str) -> dict:
    low = dtype in LOW_PRECISION
    h = {"lr": _lr(rng, [1e-2, 3e-2, 0.1] if low else [1e-3, 1e-2, 0.1, 0.3])}
    h["weight_decay"] = rng.choice([0.0, 0.0, 1e-2, 0.1])
    h["maximize"] = rng.random() < 0.3
    h["lr_decay"] = rng.choice([0.0, 0.0, 1e-2, 0.1])
    h["eps"] = rng.choice([1e-10, 1e-6, 1e-3] if low else [1e-10, 1e-6, 1e-3, 0.0])
    if low and against == "torch":
        # As for Adam: on a first step g / sqrt(g^2) turns the sign of
        # g + weight_decay * param, which torch rounds to the storage dtype
        # first, into a whole +-lr step where the two nearly cancel. L2 decay
        # in low precision is compared with the float64 reference instead.
        h["weight_decay"] = 0.0
    return h


def _adagrad_ctor(rng: random.Random) -> dict:
    # torch.optim.Adagrad fills every sum with its constructor's
    # initial_accumulator_value and ignores a group's own, so the
    # configurations give it to the constructor only (a group's own value is
    # tested in test_adagrad.py).
    return {"initial_accumulator_value": rng.choice([0.0, 0.0, 0.1, 1.0])}


def _adagrad_flags(hyper: list[dict]) -> list[str]:
    flags = ["lrdecay"] if any(h["lr_decay"] for h in hyper) else []
    flags += ["init"] if any(h["initial_accumulator_value"] for h in hyper) else []
    return flags


def _lion_group(rng: random.Random, dtype, against: str) -> dict:
    low = dtype in LOW_PRECISION
    # Lion's steps are lr in every coordinate: its lrs are AdamW's / 3-10.
    h = {"lr": _lr(rng, [1e-3, 3e-3] if low else [1e-4, 3e-4, 1e-3, 3e-3])}
    h["betas"] = rng.choice([(0.9, 0.99), (0.95, 0.98), (0.8, 0.95), (0.0, 0.99), (0.9, 0.9)])
    h["weight_decay"] = rng.choice([0.0, 0.0, 0.01, 0.1, 1.0])
    h["maximize"] = rng.random() < 0.3
    return h


def _lion_flags(hyper: list[dict]) -> list[str]:
    return [f"b{h['betas'][0]}-{h['betas'][1]}" for h in hyper[:1]]


# -- bit for bit against torch's fused step (test_bitwise_torch.py) ------------------------------
# Each generator gives an optimizer's option sets with clip=None: (low_precision)
# -> constructor kwargs; low_precision=True: those for bfloat16/float16, where
# torch's fused CPU step is comparable at all.
def _adam_bitwise(low_precision: bool) -> list[dict]:
    configs = [dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=wd, amsgrad=amsgrad,
                    maximize=maximize)
               for wd, amsgrad, maximize in itertools.product([0.0, 0.1], [False, True],
                                                              [False, True])]
    # beta1 <= 0.5 makes torch's lerp take its weight from the other end.
    return configs + [dict(lr=1e-2, betas=(0.3, 0.9))]


def _sgd_bitwise(low_precision: bool) -> list[dict]:
    if low_precision:
        # torch 2.13's fused CPU kernel leaves the vector part of bfloat16/float16
        # parameters unchanged (pytorch/pytorch#191763): test_reference.py instead.
        return []
    return [dict(lr=1e-2, weight_decay=wd, momentum=momentum, dampening=dampening,
                 nesterov=nesterov, maximize=maximize)
            for wd, momentum, dampening, nesterov, maximize in itertools.product(
                [0.0, 0.1], [0.0, 0.9], [0.0, 0.3], [False, True], [False, True])
            if not (nesterov and (momentum == 0 or dampening != 0))]


def _adagrad_bitwise(low_precision: bool) -> list[dict]:
    # torch 2.13 rounds lr, eps and weight_decay to a bfloat16/float16
    # parameter's dtype in its vector loop: there, powers of two (exact in every
    # dtype) and no lr_decay (the decayed lr is not one).
    lr, wd, eps = (2.0**-6, 0.125, 2.0**-20) if low_precision else (1e-2, 0.1, 1e-10)
    return [dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay, eps=eps,
                 initial_accumulator_value=initial, maximize=maximize)
            for weight_decay, lr_decay, initial, maximize in itertools.product(
                [0.0, wd], [0.0, 0.01], [0.0, 0.1], [False, True])
            if not (low_precision and lr_decay)]


ADAM_HYPER = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize",
              "decoupled_weight_decay")


def _adam_coverage(groups: list[dict]) -> None:
    assert len({g["betas"] for g in groups}) >= 4, "betas"


def _adam_applies(key: str, group: dict) -> bool:
    return key != "max_exp_avg_sq" or bool(group["amsgrad"])


# What Adam and AdamW share in their specs (one rule, one reference, one family).
_ADAM_SHARED = dict(
    reference=ref.ReferenceAdam, rule=RULES["adam"],
    state_keys=("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), hyper=ADAM_HYPER,
    numeric_keys=("eps", "weight_decay"), ctor_keys=("betas", "eps"),
    parity=(56, 20240601), against_reference=(28, 7_000_003),
    family=("Adam", "AdamW"),
    low_precision_groups=(dict(lr=0.01, weight_decay=0.1, eps=1e-6),
                          dict(lr=0.03, weight_decay=0.01, amsgrad=True)),
    state_dict_groups=(dict(lr=0.01, amsgrad=True, weight_decay=0.05),
                       dict(lr=0.003, betas=(0.8, 0.99), maximize=True)),
    bad_args=ADAM_BAD_ARGS, bad_group_values=ADAM_BAD_GROUP_VALUES,
    bitwise=_adam_bitwise, bitwise_tensor_lr=dict(lr=1e-2, weight_decay=0.1),
    extra_coverage=_adam_coverage)


SPECS: dict[str, OptimizerSpec] = {
    "Adam": OptimizerSpec(
        name="Adam", fused=fusedclip.FusedClipAdam, twin=torch.optim.Adam,
        **_ADAM_SHARED,
        example=dict(lr=0.01, amsgrad=True, weight_decay=0.1),
        random_group=_adam_group(decoupled_choice=True), state_applies=_adam_applies,
        flags=_adam_flags, bool_keys=("amsgrad", "maximize", "decoupled_weight_decay")),
    "AdamW": OptimizerSpec(
        name="AdamW", fused=fusedclip.FusedClipAdamW, twin=torch.optim.AdamW,
        **_ADAM_SHARED,
        example=dict(lr=0.01, weight_decay=0.1, amsgrad=True),
        random_group=_adam_group(decoupled_choice=False), state_applies=_adam_applies,
        flags=_adam_flags, bool_keys=("amsgrad", "maximize")),
    "SGD": OptimizerSpec(
        name="SGD", fused=fusedclip.FusedClipSGD, twin=torch.optim.SGD,
        reference=ref.ReferenceSGD, rule=RULES["sgd"], state_keys=("momentum_buffer",),
        hyper=("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize"),
        example=dict(lr=0.01, momentum=0.9, nesterov=True, weight_decay=0.1),
        random_group=_sgd_group,
        state_applies=lambda key, group: bool(group["momentum"]),
        flags=_sgd_flags, bool_keys=("maximize", "nesterov"),
        numeric_keys=("weight_decay", "momentum", "dampening"), ctor_keys=("weight_decay",),
        parity=(16, 31_337), against_reference=(8, 4_242),
        low_precision_groups=(dict(lr=0.03, weight_decay=0.1, momentum=0.9, dampening=0.1),
                              dict(lr=0.01, weight_decay=0.01, momentum=0.8, nesterov=True)),
        state_dict_groups=(dict(lr=0.05, momentum=0.9, dampening=0.25, weight_decay=0.05),
                           dict(lr=0.02, momentum=0.8, nesterov=True, maximize=True),
                           dict(lr=0.03)),  # plain SGD: no state
        # torch lets NaN and tensor momentum, tensor weight decay and NaN dampening through
        bad_args=(
            BadArg(dict(momentum=-0.5), ValueError, r"Invalid momentum value: -0\.5",
                   torch_refuses=True),
            BadArg(dict(momentum=math.nan), ValueError, "Invalid momentum value"),
            BadArg(dict(momentum=torch.tensor(0.9)), ValueError, "momentum is a Tensor"),
            BadArg(dict(weight_decay=-0.01), ValueError, r"Invalid weight_decay value: -0\.01",
                   torch_refuses=True),
            BadArg(dict(weight_decay=torch.tensor(0.1)), ValueError, "weight_decay is a Tensor"),
            BadArg(dict(dampening=math.nan), ValueError, "Invalid dampening value"),
            BadArg(dict(nesterov=True), ValueError,
                   "Nesterov momentum requires a momentum and zero dampening", torch_refuses=True),
            BadArg(dict(nesterov=True, momentum=0.9, dampening=0.1), ValueError,
                   "Nesterov momentum requires a momentum and zero dampening",
                   torch_refuses=True)),
        bad_group_values=(("momentum", -1.0, "Invalid momentum value"),
                          ("weight_decay", -1.0, "Invalid weight_decay value"),
                          ("dampening", math.nan, "Invalid dampening value"),
                          ("nesterov", True, "Nesterov momentum requires")),
        bitwise=_sgd_bitwise, bitwise_tensor_lr=dict(lr=1e-2, momentum=0.9, weight_decay=0.1),
        extra_coverage=_sgd_coverage),
    "Adagrad": OptimizerSpec(
        name="Adagrad", fused=fusedclip.FusedClipAdagrad, twin=torch.optim.Adagrad,
        reference=ref.ReferenceAdagrad, rule=RULES["adagrad"], state_keys=("sum",),
        hyper=("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps",
               "maximize"),
        example=dict(lr=0.01, lr_decay=0.01, weight_decay=0.1),
        random_group=_adagrad_group, state_applies=lambda key, group: True,
        flags=_adagrad_flags, bool_keys=("maximize",),
        numeric_keys=("weight_decay", "lr_decay", "initial_accumulator_value", "eps"),
        ctor_keys=("eps",), ctor_only=_adagrad_ctor, eager_state=True,
        parity=(16, 2012), against_reference=(9, 1_000_005),
        low_precision_groups=(dict(lr=0.03, weight_decay=0.1, lr_decay=0.01),
                              dict(lr=0.01, weight_decay=0.01, initial_accumulator_value=0.1)),
        state_dict_groups=(dict(lr=0.05, lr_decay=0.05, weight_decay=0.05),
                           dict(lr=0.02, eps=1e-6, maximize=True)),
        ctor={"initial_accumulator_value": 0.1},
        bad_args=(
            BadArg(dict(lr_decay=-0.5), ValueError, r"Invalid lr_decay value: -0\.5",
                   torch_refuses=True),
            BadArg(dict(lr_decay=math.nan), ValueError, "Invalid lr_decay value",
                   torch_refuses=True),
            BadArg(dict(weight_decay=-0.01), ValueError, r"Invalid weight_decay value: -0\.01",
                   torch_refuses=True),
            BadArg(dict(initial_accumulator_value=-1.0), ValueError,
                   r"Invalid initial_accumulator_value value: -1\.0", torch_refuses=True),
            BadArg(dict(initial_accumulator_value=math.nan), ValueError,
                   "Invalid initial_accumulator_value value", torch_refuses=True),
            BadArg(dict(eps=-1e-10), ValueError, r"Invalid epsilon value: -1e-10"),
            BadArg(dict(eps=torch.tensor(1e-10)), ValueError, "eps is a Tensor")),
        bad_group_values=(("lr_decay", -1.0, "Invalid lr_decay value"),
                          ("weight_decay", -1.0, "Invalid weight_decay value"),
                          ("eps", -1.0, "Invalid epsilon value"),
                          ("lr", torch.tensor([-1.0]), "Invalid learning rate")),
        bitwise=_adagrad_bitwise, bitwise_tensor_lr=dict(lr=1e-2, lr_decay=0.01)),
    # torch has no Lion: the reference is its only oracle.
    "Lion": OptimizerSpec(
        name="Lion", fused=fusedclip.FusedClipLion, twin=None,
        reference=ref.ReferenceLion, rule=RULES["lion"], state_keys=("exp_avg",),
        hyper=("lr", "betas", "weight_decay", "maximize"),
        example=dict(lr=1e-3, betas=(0.8, 0.95), weight_decay=0.1),
        random_group=_lion_group, state_applies=lambda key, group: True,
        flags=_lion_flags, bool_keys=("maximize",), numeric_keys=("weight_decay",),
        # (Seed 8_808, this generator's stream before 8_810, draws a float16
        # configuration that fails at REFERENCE[float16]: Lion's float16 steps of
        # lr ~ 1e-3 are about half an ulp of a weight in [2, 4), so whether a step
        # moves the weight at all is a rounding tie, which the reference's
        # float64 -> float16 rounding, through float32, can break the other way;
        # the 1-ulp difference then grows over the steps. Not a fusedclip error.)
        ctor_keys=("betas",), against_reference=(10, 8_810),
        low_precision_groups=(dict(lr=1e-3, weight_decay=0.1),
                              dict(lr=3e-3, weight_decay=0.01, betas=(0.8, 0.95))),
        state_dict_groups=(dict(lr=1e-3, weight_decay=0.1),
                           dict(lr=3e-4, betas=(0.8, 0.95), maximize=True)),
        bad_args=(
            BadArg(dict(betas=(0.9, 1.5)), ValueError, "Invalid beta parameter at index 1: 1.5"),
            BadArg(dict(weight_decay=-1), ValueError, "Invalid weight_decay value: -1")),
        bad_group_values=(("betas", (0.9, 1.5), "Invalid beta parameter at index 1"),
                          ("weight_decay", -1.0, "Invalid weight_decay value"))),
}


# -- random configurations ---------------------------------------------------------------------
def _clip(rng: random.Random, dtype, specs, grad_std: float, grad_floor: float, against: str):
    r = rng.random()
    if r < 0.2:
        return None
    norm_type = 2.0 if r < 0.55 else rng.choice([2.0, math.inf])
    if dtype == torch.float16 and against == "torch":
        # float16 configurations clip by a coefficient of at least ~0.5 (see
        # random_configs), so max_norm is a fraction of the expected norm.
        if math.isinf(norm_type):
            expected = grad_floor + 3.0 * grad_std
        else:
            numel = sum(math.prod(shape) for shape, _ in specs)
            mean_sq = grad_floor**2 + 2 * grad_floor * grad_std * math.sqrt(2 / math.pi) + grad_std**2
            expected = math.sqrt(numel * mean_sq)
        max_norm = float(f"{rng.choice([0.6, 1.5]) * expected:.3g}")
    else:
        max_norm = rng.choice([0.1, 1.0, 5.0, 50.0])
    if r < 0.55:
        return max_norm
    return ("global", max_norm, norm_type)


@functools.lru_cache(maxsize=None)
def random_configs(family: tuple[str, ...], n: int, seed: int, against: str) -> tuple:
    """`n` random configurations of the optimizers named in `family` (SPECS'
    names), as pytest params with readable ids; with more than one, each
    configuration draws its optimizer. The first ones pin every dtype, then
    many tiny tensors (more than one CUDA launch takes) and the multi-threaded
    CPU path, each once per member of the family.

    `against` is "torch" or "reference": what the fused optimizer is compared
    with. Against torch, low-precision configurations stay where torch's
    low-precision arithmetic is well conditioned (see the comments below)."""
    assert against in ("torch", "reference")
    rng = random.Random(seed)
    k = len(family)
    many_at, parallel_at = range(4, 4 + k), range(4 + k, 4 + 2 * k)
    configs = []
    for i in range(n):
        spec = SPECS[rng.choice(family) if k > 1 else family[0]]
        dtype = rng.choice([torch.float32] * 4 + [torch.float64] * 2
                           + [torch.bfloat16, torch.float16])
        if i < 4:
            dtype = [torch.float32, torch.float64, torch.bfloat16, torch.float16][i]
        n_groups = rng.choice([1, 2, 3])
        if i in many_at:
            all_specs = [(rng.choice(TINY_SHAPES), "contiguous") for _ in range(MANY)]
        else:
            all_specs = rng.sample(SMALL_SPECS, rng.randint(4, len(SMALL_SPECS)))
            all_specs += rng.sample(LARGE_SPECS, rng.randint(0, 2))
            if i in parallel_at or rng.random() < 0.05:
                all_specs.append(PARALLEL_SPEC)
            rng.shuffle(all_specs)
        # Split the specs into groups (every group gets at least one).
        cuts = sorted(rng.sample(range(1, len(all_specs)), n_groups - 1))
        bounds = [0, *cuts, len(all_specs)]
        groups = [dict(specs=all_specs[a:b], **spec.random_group(rng, dtype, against))
                  for a, b in zip(bounds, bounds[1:])]
        grad_std = rng.choice([0.01, 0.1, 1.0])
        # float16 keeps v = (1 - beta2) g^2 (Adam; Adagrad's sum of squares alike)
        # in its normal range (>= 6.1e-5), as a float16 user must: below it v is
        # subnormal, and torch's two roundings (v * beta2, then + (1 - beta2) g^2)
        # against fusedclip's one differ by a large part of v. So float16
        # gradients are at least 0.5 from zero and clipping scales them by at
        # least ~0.5. (The float64 reference rounds v once, as fusedclip does,
        # so it needs no such care.)
        grad_floor = 0.5 if dtype == torch.float16 and against == "torch" else 0.0
        clip = _clip(rng, dtype, all_specs, grad_std, grad_floor, against)
        # Now and then hyperparameters come from the constructor instead of the
        # groups (the groups that share the first group's values leave them out).
        defaults = {}
        if spec.ctor_keys and rng.random() < 0.3:
            defaults = {key: groups[0][key] for key in spec.ctor_keys}
            for group in groups:
                for key, value in defaults.items():
                    if group[key] == value:
                        del group[key]
        ctor_only = spec.ctor_only(rng) if spec.ctor_only else {}
        config = {
            "spec": spec,
            "problem": Problem(
                groups=groups, dtype=dtype, grad_std=grad_std, grad_floor=grad_floor,
                grad_layout=rng.choice(["contiguous", "like_param"]),
                none_prob=rng.choice([0.0, 0.0, 0.2]), seed=1000 + i,
            ),
            "clip": clip,
            "steps": rng.randint(10, 14),
            # Constructor arguments: what the groups leave out comes from here,
            # or from the defaults.
            "defaults": {**defaults, **ctor_only},
        }
        hyper = [{**spec.defaults, **config["defaults"], **g} for g in groups]
        flags = [f"{i:02d}", spec.name, DTYPE_NAMES[dtype], clip_name(clip), f"{n_groups}g",
                 f"{len(all_specs)}t", f"{config['steps']}steps"]
        flags += ["lrT"] if any(isinstance(g["lr"], str) for g in groups) else []
        flags += ["max"] if any(h["maximize"] for h in hyper) else []
        flags += ["wd"] if any(h["weight_decay"] for h in hyper) else []
        flags += spec.flags(hyper)
        flags += ["gradlike"] if config["problem"].grad_layout == "like_param" else []
        flags += ["nonegrad"] if config["problem"].none_prob else []
        flags += ["ctor"] if defaults else []
        configs.append(pytest.param(config, id="-".join(flags)))
    return tuple(configs)


def config_groups(configs) -> list[dict]:
    """Every group's hyperparameters, constructor arguments filled in."""
    return [{**c["defaults"], **g} for c in configs for g in c["problem"].groups]


def check_coverage(spec: OptimizerSpec, configs) -> None:
    """The random configurations reach every case the spec lists."""
    configs = [p.values[0] if hasattr(p, "values") else p for p in configs]
    problems = [c["problem"] for c in configs]
    groups = config_groups(configs)
    specs = [s for pr in problems for s in pr.specs]
    assert {pr.dtype for pr in problems} == set(spec.dtypes)
    assert any(isinstance(g["lr"], str) for g in groups)
    assert any(isinstance(g["lr"], float) for g in groups)
    for key in spec.bool_keys:
        assert {g.get(key) for g in groups} >= {True, False}, key
    for key in spec.numeric_keys:
        assert len({g[key] for g in groups}) >= 3, key
    if spec.extra_coverage:
        spec.extra_coverage(groups)
    clips = [c["clip"] for c in configs]
    assert None in clips and any(isinstance(c, float) for c in clips)
    assert {c[2] for c in clips if isinstance(c, tuple)} == {2.0, math.inf}
    assert any(len(pr.groups) >= 3 for pr in problems)
    assert all(c["steps"] >= 10 for c in configs)
    assert any(len(pr.specs) > 1000 for pr in problems)
    assert {layout for _, layout in specs} == {"contiguous", "transposed", "slice",
                                               "channels_last"}
    shapes = {shape for shape, _ in specs}
    assert () in shapes and (0,) in shapes and (3, 0) in shapes and PARALLEL_SPEC[0] in shapes
    assert {pr.grad_layout for pr in problems} == {"contiguous", "like_param"}
    assert any(pr.none_prob > 0 for pr in problems)
    if spec.ctor_keys:
        assert any(set(c["defaults"]) & set(spec.ctor_keys) for c in configs)
        assert any(not set(c["defaults"]) & set(spec.ctor_keys) for c in configs)


# -- comparing with the reference -----------------------------------------------------------------
def assert_matches_reference(spec: OptimizerSpec, fopt, fparams, refopt, problem: Problem,
                             tol, what: str) -> None:
    """The fused optimizer's parameters and state against the reference's,
    each quantity judged against its largest value over all parameters."""
    dtype = problem.dtype
    keys = [(gi, pi) for gi, g in enumerate(problem.groups) for pi in range(len(g["specs"]))]
    quantities = {"param": [(p.detach(), r.to(dtype)) for p, r in zip(fparams, refopt.params())]}
    # each parameter's group (every hyperparameter filled in)
    groups = [g for g in refopt.groups for _ in g["params"]]
    for key in spec.state_keys:
        pairs = []
        for i, (p, k) in enumerate(zip(fparams, keys)):
            rstate = refopt.states.get(k)
            if rstate is None:
                # No reference step yet: no fused state either, or (state made
                # eagerly, as torch.optim.Adagrad makes it) still its initial value.
                if spec.eager_state:
                    init = groups[i]["initial_accumulator_value"]
                    assert float(fopt.state[p]["step"]) == 0, f"{what} step[{i}]"
                    pairs.append((fopt.state[p][key], fopt.state[p][key].new_full(p.shape, init)))
                else:
                    assert p not in fopt.state, f"{what}: param[{i}] has state, the reference none"
                continue
            if not spec.state_applies(key, groups[i]):
                assert key not in fopt.state.get(p, {}), f"{what} {key}[{i}] exists"
                continue
            pairs.append((fopt.state[p][key], rstate[key].to(dtype)))
        quantities[key] = pairs
    for name, items in quantities.items():
        scale = max((float(e.abs().max()) for _, e in items if e.numel()), default=0.0)
        for i, (actual, expected) in enumerate(items):
            assert_close(actual, expected, tol, f"{what} {name}[{i}]", scale=scale)
    for i, (p, k) in enumerate(zip(fparams, keys)):
        rstate = refopt.states.get(k)
        if rstate is not None and "step" in rstate:
            assert float(fopt.state[p]["step"]) == rstate["step"], f"{what} step[{i}]"


# -- runs ----------------------------------------------------------------------------------------
def run_parity(config: dict, device="cpu") -> None:
    """The fused optimizer against torch.optim + clip_grad_norm_ from the same
    parameters through the same gradients.

    float64 and float32 run side by side for all steps and are compared at the
    end. bfloat16 and float16 are compared step by step: before each step the
    fused optimizer is given torch's parameters and state, so that each
    comparison measures one step's rounding. (Left to run on their own, the two
    low-precision trajectories drift apart by the integral of those per-step
    differences: torch rounds every intermediate to the storage dtype and, in
    AdamW, rounds the decayed weight before adding the update, so a decay
    smaller than half an ulp is lost in torch and kept in fusedclip. The whole
    low-precision trajectory is compared with the float64 reference, which
    rounds as fusedclip does, in test_reference.py.)
    """
    from tolerances import TORCH_NORM, TORCH_PARITY

    spec, problem, clip = config["spec"], config["problem"], config["clip"]
    tol = TORCH_PARITY[problem.dtype]
    step_by_step = problem.dtype in LOW_PRECISION
    tparams, fparams = problem.params(device), problem.params(device)
    topt = spec.make_torch(problem, tparams, config["defaults"], device)
    fopt = spec.make_fused(problem, fparams, config["defaults"], device, clip=clip_policy(clip))
    tflat, fflat = flat(tparams), flat(fparams)
    storage = [p.data_ptr() for p in fflat]
    strides = [p.stride() for p in fflat]
    name = spec.name
    for step in range(config["steps"]):
        if step_by_step and step > 0:
            copy_state(topt, fopt, tflat, fflat)
        grads = problem.grads(step)
        set_grads(tflat, grads)
        set_grads(fflat, grads)
        fgrads = [None if p.grad is None else p.grad.clone() for p in fflat]
        norm = torch_clip(tflat, clip)
        topt.step()
        fopt.step()
        if norm is not None:
            # clip_grad_norm_ returns its norm in the gradients' dtype (rounded to
            # bfloat16, say); fusedclip's is float32 (float64 for float64).
            fnorm = fopt.clip_stats["grad_norm"]
            assert_close(fnorm.to(norm.dtype), norm, TORCH_NORM[problem.dtype],
                         f"step {step} grad_norm")
        assert int(fopt.clip_stats["skipped"]) == 0
        # The fused step reads the gradients; it never writes them.
        for p, g in zip(fflat, fgrads):
            assert (p.grad is None) == (g is None)
            if g is not None:
                assert torch.equal(p.grad, g), "the fused step changed a gradient"
        if step_by_step:
            assert_states_close(fopt, topt, fflat, tflat, tol, f"{name} step {step}")
    assert_states_close(fopt, topt, fflat, tflat, tol, f"{name} after {config['steps']} steps")
    # Parameters were updated in their own storage and kept their layout.
    assert [p.data_ptr() for p in fflat] == storage
    assert [p.stride() for p in fflat] == strides
    # Hyperparameter groups are untouched (lr tensors included).
    for tg, fg in zip(topt.param_groups, fopt.param_groups):
        for key in spec.hyper:
            if key not in tg:
                continue
            tv, fv = tg[key], fg[key]
            if isinstance(tv, torch.Tensor):
                assert torch.equal(tv, fv)
            else:
                assert tv == fv, key


def run_against_reference(config: dict, device="cpu") -> None:
    """The fused optimizer on `device` through a whole trajectory against the
    float64 reference (rounding to the storage dtype after every step for
    bfloat16 and float16, as fusedclip stores): parameters, state, steps, and
    the global norm of every step. On CUDA the same run on the CPU kernels is
    the second oracle (tolerances.CUDA_VS_CPU), and the norm and the state
    keep the CPU's dtype and the parameters' layouts."""
    from tolerances import CUDA_VS_CPU, NORM, NORM_OUT_DTYPE, REFERENCE

    spec, problem, clip = config["spec"], config["problem"], config["clip"]
    on_cpu = torch.device(device).type == "cpu"
    fparams = problem.params(device)
    fopt = spec.make_fused(problem, fparams, config["defaults"], device, clip=clip_policy(clip))
    refopt = spec.make_reference(problem, problem.params(), clip, config["defaults"])
    cpu_params = cpu_opt = None
    if not on_cpu:
        cpu_params = problem.params()
        cpu_opt = spec.make_fused(problem, cpu_params, config["defaults"],
                                  clip=clip_policy(clip))
    fflat = flat(fparams)
    for step in range(config["steps"]):
        grads = problem.grads(step)
        set_grads(fflat, grads)
        fopt.step()
        refopt.step(grads)
        if cpu_opt is not None:
            set_grads(flat(cpu_params), grads)
            cpu_opt.step()
        norm = fopt.clip_stats["grad_norm"]
        assert norm.device.type == torch.device(device).type
        assert norm.dtype == NORM_OUT_DTYPE[problem.dtype]
        assert_close(norm.cpu(), refopt.last_norm.to(norm.dtype), NORM[problem.dtype],
                     f"step {step} grad_norm")
    what = f"{spec.name} after {config['steps']} steps"
    mirror, mirror_params = cpu_mirror(fopt, fflat) if not on_cpu else (fopt, fflat)
    if cpu_opt is not None:
        cpu_flat = flat(cpu_params)
        assert_states_close(mirror, cpu_opt, mirror_params, cpu_flat, CUDA_VS_CPU[problem.dtype],
                            f"{what}, {device} vs cpu")
        # Layouts stay the parameter's own.
        for p, c in zip(fflat, cpu_flat):
            assert p.stride() == c.stride()
            for key in spec.state_keys:
                if p in fopt.state and key in fopt.state[p] and p.numel():
                    assert fopt.state[p][key].stride() == cpu_opt.state[c][key].stride(), key
    assert_matches_reference(spec, mirror, mirror_params, refopt, problem,
                             REFERENCE[problem.dtype], what)

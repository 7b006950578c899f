"""The registry (tests/registry.py) holds exactly what the library exports:
every update rule registered in C++ (``fusedclip.ops.RULES``), every
optimizer and every clip policy of ``fusedclip.__all__``. A new one without a
registry entry would go untested: these tests fail first. (And the reverse: an
entry for something the library no longer has fails too.)"""

from __future__ import annotations

import inspect

import pytest
import torch

import fusedclip
from fusedclip import ops
from fusedclip import reference as ref

from registry import (
    POLICIES, POLICY_CASES, POLICY_OF_CASE, RULES, SPECS, policy_case, reference_case,
)

# Exported names that are neither an optimizer nor a policy: the policies' base class.
NOT_ENTRIES = {"ClipPolicy"}


def _exported(kind: type) -> set[str]:
    return {name for name in fusedclip.__all__
            if inspect.isclass(getattr(fusedclip, name))
            and issubclass(getattr(fusedclip, name), kind) and name not in NOT_ENTRIES}


def test_every_rule_is_registered():
    """The rules registered in C++ (one fused update op each) are the registry's RULES."""
    assert set(ops.RULES) == set(RULES), (
        f"missing from tests/registry.py RULES: {sorted(set(ops.RULES) - set(RULES))}; "
        f"no longer in fusedclip.ops.RULES: {sorted(set(RULES) - set(ops.RULES))}")
    for name, rule in RULES.items():
        assert rule.name == name
        # Which hyperparameters the op takes is the library's; the samples give each.
        assert set(rule.sample_hyper) == set(ops.RULES[name]), name


def test_every_optimizer_is_registered():
    """The optimizers of fusedclip.__all__ are the fused classes of the registry's SPECS."""
    exported = _exported(torch.optim.Optimizer)
    registered = {spec.fused.__name__ for spec in SPECS.values()}
    assert exported == registered, (
        f"missing from tests/registry.py SPECS: {sorted(exported - registered)}; "
        f"not exported by fusedclip: {sorted(registered - exported)}")
    for name, spec in SPECS.items():
        assert spec.name == name and spec.fused is getattr(fusedclip, spec.fused.__name__)
        assert spec.rule is RULES[spec.rule.name], name
    # Every rule is some optimizer's.
    assert {spec.rule.name for spec in SPECS.values()} == set(RULES)


def test_every_policy_is_registered():
    """The ClipPolicy subclasses of fusedclip.__all__ are the registry's POLICIES."""
    exported = _exported(fusedclip.ClipPolicy)
    assert exported == set(POLICIES), (
        f"missing from tests/registry.py POLICIES: {sorted(exported - set(POLICIES))}; "
        f"not exported by fusedclip: {sorted(set(POLICIES) - exported)}")


def test_every_export_is_classified():
    """Every name fusedclip exports is an optimizer, a policy, or named in
    NOT_ENTRIES: something new of another kind is noticed here."""
    known = (_exported(torch.optim.Optimizer) | _exported(fusedclip.ClipPolicy) | NOT_ENTRIES)
    assert set(fusedclip.__all__) == known


@pytest.mark.parametrize("name", list(POLICIES))
def test_policy_entry(name):
    """Each policy's entry: cases that make the policy and its float64
    reference, an example and stateful cases among its cases, a known scope."""
    policy = POLICIES[name]
    assert policy.name == name and policy.cases
    assert issubclass(policy.reference, ref.ReferencePolicy)
    assert policy.reference is getattr(ref, policy.reference.__name__)
    assert policy.scope in ("global", "tensor", "unit", "element")
    assert policy.example in policy.cases
    assert set(policy.stateful) <= set(policy.cases)
    for case in policy.cases:
        assert POLICY_OF_CASE[case] is policy  # case ids are unique over the table
        assert type(policy_case(case)) is policy.fused, case
        assert type(reference_case(case)) is policy.reference, case
    # A policy that keeps state has cases for the state_dict tests.
    made = policy_case(policy.example)
    keeps_state = bool(made.init_state(torch.device("cpu"))
                       or made.init_tensor_state(torch.float32, torch.device("cpu")))
    assert bool(policy.stateful) == keeps_state, name
    # The policy takes part in the one-instance-per-policy tests.
    assert any(getattr(POLICY_CASES[k](), "__class__", None) is policy.fused
               for k in POLICY_CASES), name


@pytest.mark.parametrize("name", list(SPECS))
def test_optimizer_entry(name):
    """Each optimizer's entry has what the registry-driven suites read: a
    float64 reference of fusedclip.reference, option sets bit for bit against
    its twin where it has one, and its own argument refusals."""
    spec = SPECS[name]
    assert issubclass(spec.reference, ref.ReferenceOptimizer)
    assert spec.reference is getattr(ref, spec.reference.__name__)
    assert (spec.bitwise is not None) == (spec.twin is not None), name
    if spec.twin is not None:
        assert spec.bitwise(False) and spec.bitwise_tensor_lr, name
    assert spec.bad_args and spec.bad_group_values, name

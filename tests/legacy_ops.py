"""The update ops as the tests knew them before one generic op served every
rule (fusedclip.ops.update_): one adapter from those argument lists to
``torch.ops.fusedclip.<rule>_``, so the op-level tests keep their cases.

Legacy calls: ``adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
steps, **kw)``, ``sgd_(params, grads, momentum_buffers, buffer_steps, **kw)``,
``adagrad_(params, grads, state_sums, steps, **kw)``, with the rule's
hyperparameters and the common step arguments as keywords.
"""

from __future__ import annotations

import torch

from fusedclip import ops

# rule -> (how many state lists the legacy call passes, before its steps list)
STATE_LISTS = {"adam": 3, "sgd": 1, "adagrad": 1}
COMMON = ("lr", "lr_tensor", "clip_coef", "grad_scale", "found_inf", "clip_value",
          "spike_theta", "unit_coefs", "maximize")
DEFAULTS = {"clip_value": None, "spike_theta": None, "unit_coefs": None}


def to_op(rule: str, args, kwargs) -> tuple[tuple, dict]:
    """(args, kwargs) of ``torch.ops.fusedclip.<rule>_`` for a legacy call."""
    k = STATE_LISTS[rule]
    params, grads = args[0], args[1]
    states = [t for state in args[2:2 + k] for t in state]
    steps = args[2 + k]
    common = {name: kwargs.get(name, DEFAULTS.get(name)) for name in COMMON}
    hyper = [float(kwargs.get(name, False)) for name in ops.RULES[rule]]
    return (params, grads, states, steps), dict(hyper=hyper, **common)


def op(rule: str):
    return getattr(torch.ops.fusedclip, rule + "_")


def call(rule: str, *args, **kwargs) -> None:
    """A legacy call, run through the rule's op."""
    new_args, new_kwargs = to_op(rule, args, kwargs)
    op(rule)(*new_args, **new_kwargs)


def opcheck(rule: str, args, kwargs, **opcheck_kwargs):
    new_args, new_kwargs = to_op(rule, args, kwargs)
    return torch.library.opcheck(op(rule).default, new_args, new_kwargs, **opcheck_kwargs)

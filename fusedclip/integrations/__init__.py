"""fusedclip inside training frameworks: Hugging Face ``transformers``' Trainer,
Lightning and ``accelerate``.

A fusedclip optimizer clips inside its own step. A framework that clips too
(Trainer's ``max_grad_norm``, Lightning's ``gradient_clip_val``, a call to
``accelerator.clip_grad_norm_``) hands it gradients that are already clipped:
they are clipped twice, ``clip_stats["grad_norm"]`` reports the framework's
clipped norm instead of the true one, and stateful policies (``ZClip``,
``AutoClip``, ``AdaGC``) learn from clipped norms. docs/FRAMEWORKS.md gives the
recipe for each framework; the modules here make them work and warn when both
clip:

- ``fusedclip.integrations.transformers``: ``prepare_trainer(trainer)``
- ``fusedclip.integrations.lightning``: ``FusedClipCallback``
- ``fusedclip.integrations.accelerate``: ``watch_accelerator(accelerator)``

Each of them imports its framework; this module imports none, and
``import fusedclip`` imports none of them.

Frameworks wrap the optimizer (accelerate's ``AcceleratedOptimizer``,
Lightning's ``LightningOptimizer``, Fabric's ``_FabricOptimizer``), and not
every wrapper lets ``clip_stats`` through: :func:`clip_stats` reaches it
through any of them.
"""

from __future__ import annotations

import warnings

from torch.optim import Optimizer

import fusedclip
from fusedclip.caller_clipping import (  # noqa: F401  (re-exported)
    FrameworkClipWarning, check_caller_clipping, clip_message,
)
from fusedclip.optim.base import FusedClipOptimizer

__all__ = [
    "FrameworkClipWarning", "check_caller_clipping", "clip_stats", "fused_optimizer",
    "unwrap_optimizer",
]

# The optimizers clip_stats exists on: every FusedClipOptimizer that fusedclip exports.
OPTIMIZERS = tuple(
    obj for obj in (getattr(fusedclip, name) for name in fusedclip.__all__)
    if isinstance(obj, type) and issubclass(obj, FusedClipOptimizer)
)

# Wrappers keep the optimizer they wrap under one of these instance attributes:
# "_optimizer" (Lightning's LightningOptimizer, Fabric's _FabricOptimizer),
# "optimizer" (accelerate's AcceleratedOptimizer, DeepSpeed's wrappers).
_WRAPPED_ATTRIBUTES = ("_optimizer", "optimizer")
_MAX_WRAPPERS = 16


def unwrap_optimizer(optimizer):
    """The innermost optimizer under framework wrappers (the argument itself
    when it wraps nothing).

    Looks only at the wrappers' own instance attributes (``_optimizer``, then
    ``optimizer``), so a wrapper that forwards unknown attributes to the
    optimizer it wraps is not mistaken for that optimizer.
    """
    opt = optimizer
    for _ in range(_MAX_WRAPPERS):
        attributes = getattr(opt, "__dict__", None) or {}
        inner = None
        for name in _WRAPPED_ATTRIBUTES:
            candidate = attributes.get(name)
            if candidate is not None and candidate is not opt and isinstance(candidate, Optimizer):
                inner = candidate
                break
        if inner is None:
            return opt
        opt = inner
    raise ValueError(f"more than {_MAX_WRAPPERS} optimizer wrappers around {type(opt).__name__}")


def fused_optimizer(optimizer):
    """The fusedclip optimizer under framework wrappers, or None if there is none."""
    inner = unwrap_optimizer(optimizer)
    return inner if isinstance(inner, FusedClipOptimizer) else None


def clip_stats(optimizer) -> dict:
    """``clip_stats`` of a fusedclip optimizer, through any framework wrapper.

    ``fusedclip.integrations.clip_stats(trainer.optimizer)["grad_norm"]`` works
    where ``trainer.optimizer.clip_stats`` raises AttributeError (accelerate's
    ``AcceleratedOptimizer``, which Trainer and ``accelerator.prepare`` hand
    out, does not forward attributes). It returns the optimizer's own dict,
    which every step updates in place: its values are device tensors, and
    reading one (``.item()``) is a sync.
    """
    inner = fused_optimizer(optimizer)
    if inner is None:
        wrapped = unwrap_optimizer(optimizer)
        where = "" if wrapped is optimizer else f" (it wraps {type(wrapped).__name__})"
        raise TypeError(
            f"{type(optimizer).__name__} is not a fusedclip optimizer{where}; clip_stats "
            f"exists only on {', '.join(o.__name__ for o in OPTIMIZERS)}"
        )
    return inner.clip_stats


def clip_policy(optimizer):
    """The clip policy of the fusedclip optimizer under any wrappers, or None
    (no fusedclip optimizer, or one with ``clip=None``)."""
    inner = fused_optimizer(optimizer)
    return None if inner is None else getattr(inner, "clip_policy", None)


def measures_grad_norm(optimizer) -> bool:
    """Whether the fusedclip optimizer under any wrappers measures the global
    gradient norm in every step (its clip policy needs it, or its ``nonfinite``
    mode needs the non-finite flag of the same pass), so that
    ``clip_stats["grad_norm"]`` holds the step's pre-clip norm."""
    inner = fused_optimizer(optimizer)
    if inner is None:
        return False
    policy = getattr(inner, "clip_policy", None)
    if policy is not None and getattr(policy, "needs_norms", True):
        return True
    return getattr(inner, "nonfinite", "skip") != "propagate"


def framework_clip_message(framework: str, setting: str, optimizer, fix: str) -> str | None:
    """The warning for a framework that clips (``setting``, e.g.
    ``"TrainingArguments.max_grad_norm=1.0"``) in front of ``optimizer``, or
    None when ``optimizer`` is no fusedclip optimizer. ``fix`` says how to
    turn the framework's clipping off."""
    inner = fused_optimizer(optimizer)
    return None if inner is None else clip_message(framework, setting, inner, fix)


def warn_framework_clip(framework: str, setting: str, optimizer, fix: str,
                        stacklevel: int = 3) -> bool:
    """Warns (:class:`FrameworkClipWarning`) with :func:`framework_clip_message`;
    returns whether it warned."""
    message = framework_clip_message(framework, setting, optimizer, fix)
    if message is None:
        return False
    warnings.warn(message, FrameworkClipWarning, stacklevel=stacklevel)
    return True

"""The first step's check: is a framework that steps this optimizer set to clip too?

A leaf module: it imports no other part of fusedclip, so the optimizers'
base (``fusedclip.optim.base``) imports it, and ``fusedclip.integrations``,
which imports the optimizers, re-exports from it; nothing imports
``fusedclip.integrations`` back. It recognizes a framework only when the
framework's module is already imported, and imports none.
"""

from __future__ import annotations

import math
import sys
import warnings

__all__ = ["FrameworkClipWarning", "check_caller_clipping", "clip_message", "clips"]


class FrameworkClipWarning(UserWarning):
    """A framework and a fusedclip optimizer both clip the gradients (or the
    framework clips in a separate pass that the optimizer could fuse)."""


def clips(value) -> bool:
    """A framework's clip setting that clips: a finite number > 0."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return False
    return value > 0 and not math.isinf(value)


def clip_message(framework: str, setting: str, optimizer, fix: str) -> str:
    """The warning for a framework that clips (``setting``, e.g.
    ``"TrainingArguments.max_grad_norm=1.0"``) in front of the fusedclip
    ``optimizer`` itself (not a wrapper). ``fix`` says how to turn the
    framework's clipping off."""
    name = type(optimizer).__name__
    policy = getattr(optimizer, "clip_policy", None)
    if policy is not None:
        return (
            f"{framework} clips the gradients ({setting}) before {name} clips them again with "
            f"its own policy {policy!r}: they are clipped twice, and clip_stats['grad_norm'] "
            f"(and any stateful policy) sees the norm {framework} has already clipped. "
            f"{fix} to let the optimizer clip alone (docs/FRAMEWORKS.md)."
        )
    return (
        f"{framework} clips the gradients ({setting}) in a pass of its own before {name}'s "
        f"step; {name}(..., clip=<max_norm>) does the same clip inside its step. "
        f"{fix} and pass clip= to the optimizer to fuse it (docs/FRAMEWORKS.md)."
    )


def _loaded_class(module: str, name: str):
    """``module.name`` if ``module`` is already imported (importing nothing)."""
    mod = sys.modules.get(module)
    return None if mod is None else getattr(mod, name, None)


def check_caller_clipping(optimizer, max_frames: int = 64) -> bool:
    """Warns when the code that is stepping the fusedclip ``optimizer`` right
    now is a framework set to clip the gradients too; returns whether it warned.

    Meant to be called once, from inside the first ``step()`` (it walks the
    Python stack up to ``max_frames`` frames and reads the framework's clip
    setting: about 15 us 40 frames deep, no device work): a user who passes a
    fusedclip optimizer to Trainer (``max_grad_norm`` defaults to 1.0) or to
    Lightning with ``gradient_clip_val`` set, and changes nothing else, is
    told that the gradients are clipped twice. It recognizes a framework only
    when its module is already imported, and imports nothing.
    """
    hf_trainer = _loaded_class("transformers.trainer", "Trainer")
    pl_trainers = tuple(c for c in (
        _loaded_class("lightning.pytorch.trainer.trainer", "Trainer"),
        _loaded_class("pytorch_lightning.trainer.trainer", "Trainer"),
    ) if c is not None)
    if hf_trainer is None and not pl_trainers:
        return False
    frame = sys._getframe(1)
    for _ in range(max_frames):
        if frame is None:
            break
        owner = frame.f_locals.get("self")
        frame = frame.f_back
        if owner is None:
            continue
        if hf_trainer is not None and isinstance(owner, hf_trainer):
            value = getattr(getattr(owner, "args", None), "max_grad_norm", None)
            if clips(value):
                return _warn("transformers' Trainer", f"TrainingArguments.max_grad_norm={value}",
                             optimizer, "Set TrainingArguments(max_grad_norm=0)")
            return False
        if pl_trainers:
            attributes = getattr(owner, "__dict__", None) or {}
            trainer = owner if isinstance(owner, pl_trainers) else None
            for name in ("trainer", "_trainer"):
                if trainer is None and isinstance(attributes.get(name), pl_trainers):
                    trainer = attributes[name]
            if trainer is not None:
                value = getattr(trainer, "gradient_clip_val", None)
                if clips(value):
                    return _warn("Lightning", f"Trainer(gradient_clip_val={value})", optimizer,
                                 "Leave Trainer's gradient_clip_val unset (None)")
                return False
    return False


def _warn(framework: str, setting: str, optimizer, fix: str) -> bool:
    # stacklevel 3: past _warn and check_caller_clipping, at the step() that called it.
    warnings.warn(clip_message(framework, setting, optimizer, fix), FrameworkClipWarning,
                  stacklevel=3)
    return True

"""fusedclip with Hugging Face ``transformers``' Trainer.

What Trainer does (transformers 5.24, ``Trainer._inner_training_loop``), after
the last backward of each optimizer step and before ``optimizer.step()``:

- ``max_grad_norm > 0`` (the default is 1.0): ``accelerator.clip_grad_norm_(
  model.parameters(), max_grad_norm)``, i.e. ``torch.nn.utils.clip_grad_norm_``:
  a norm pass and a multiply of every gradient. A fusedclip optimizer with a
  clip policy then clips gradients that are already clipped.
- ``max_grad_norm == 0``: ``Trainer._get_grad_norm`` still calls
  ``accelerator.clip_grad_norm_(model.parameters(), inf)`` to log
  ``grad_norm``: the same norm pass and a multiply by 1.0. (``None`` is not
  accepted: ``None > 0`` raises TypeError.)

So with ``max_grad_norm=0`` the gradients are clipped once, by the optimizer,
and Trainer logs their true norm, but every step still pays a pass over the
gradients that the optimizer's own norm pass makes again. :func:`prepare_trainer`
removes it: Trainer logs the norm the optimizer measured
(``clip_stats["grad_norm"]``), and warns if Trainer is still set to clip.

Recipe::

    import fusedclip
    from fusedclip.integrations.transformers import prepare_trainer

    args = TrainingArguments(..., max_grad_norm=0)           # the optimizer clips
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      optimizer_cls_and_kwargs=(fusedclip.FusedClipAdamW,
                                                {"lr": 3e-4, "clip": 1.0}))
    prepare_trainer(trainer)
    trainer.train()
"""

from __future__ import annotations

import inspect
import math

import torch
from transformers import TrainerCallback

from fusedclip.integrations import (
    clip_stats, fused_optimizer, measures_grad_norm, warn_framework_clip,
)

__all__ = ["FusedClipCallback", "check_trainer_args", "prepare_trainer"]

_FIX = "Set TrainingArguments(max_grad_norm=0)"


def check_trainer_args(args, optimizer) -> bool:
    """Warns (``FrameworkClipWarning``) when ``args.max_grad_norm`` makes
    Trainer clip in front of the fusedclip optimizer under ``optimizer``
    (twice if it has a clip policy); returns whether it warned."""
    value = getattr(args, "max_grad_norm", None)
    if optimizer is None or value is None or not value > 0 or math.isinf(value):
        return False
    return warn_framework_clip("transformers' Trainer",
                               f"TrainingArguments.max_grad_norm={value}", optimizer, _FIX)


class FusedClipCallback(TrainerCallback):
    """Trainer callback of fusedclip. On its own (``callbacks=[FusedClipCallback()]``)
    it warns at the start of training when Trainer is set to clip in front of
    a fusedclip optimizer. :func:`prepare_trainer` adds one and uses it to
    hand Trainer the optimizer's own pre-clip norm for its ``grad_norm`` log."""

    def __init__(self) -> None:
        # The tensor prepare_trainer's _get_grad_norm handed Trainer in this
        # optimizer step, to be filled once the step has measured the norm.
        self._pending: torch.Tensor | None = None
        self._buffer: torch.Tensor | None = None
        self._checked: set = set()

    def check(self, args, optimizer) -> bool:
        """:func:`check_trainer_args`, once per optimizer and setting."""
        inner = fused_optimizer(optimizer)
        key = (id(inner), getattr(args, "max_grad_norm", None))
        if inner is None or key in self._checked:
            return False
        self._checked.add(key)
        return check_trainer_args(args, optimizer)

    def grad_norm_placeholder(self, device: torch.device) -> torch.Tensor:
        """A 0-d tensor that :meth:`on_optimizer_step` fills with this step's
        ``clip_stats["grad_norm"]`` (NaN until then). Trainer reads it only
        when it logs, after the step."""
        buf = self._buffer
        if buf is None or buf.device != device:
            buf = self._buffer = torch.full((), math.nan, dtype=torch.float32, device=device)
        self._pending = buf
        return buf

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.check(args, optimizer)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        pending, self._pending = self._pending, None
        if pending is None or fused_optimizer(optimizer) is None:
            return
        norm = clip_stats(optimizer).get("grad_norm")
        if norm is None:
            pending.fill_(math.nan)
        else:
            pending.copy_(norm.detach(), non_blocking=True)


def _grad_norm_hook_supported(trainer) -> bool:
    method = getattr(type(trainer), "_get_grad_norm", None)
    if method is None:
        return False
    try:
        parameters = inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False
    return "grad_norm" in parameters


def prepare_trainer(trainer):
    """Lets the fusedclip optimizer of ``trainer`` own clipping; returns ``trainer``.

    - Adds a :class:`FusedClipCallback`: at the start of ``train()`` it warns
      (``FrameworkClipWarning``) if ``TrainingArguments.max_grad_norm`` is > 0,
      i.e. Trainer still clips (the default, 1.0, does).
    - Where Trainer measures the norm for its log with an extra
      ``clip_grad_norm_(params, inf)`` pass when it does not clip (transformers
      5.x, ``Trainer._get_grad_norm``), it gets the norm that the optimizer's
      step measures instead (``clip_stats["grad_norm"]``, the pre-clip norm,
      in the policy's ``norm_type``), so no step reads the gradients for it.
      Trainer still calls its own pass when it clips (``max_grad_norm > 0``),
      when the optimizer is not a fusedclip one or measures no norm
      (``clip=None`` with ``nonfinite="propagate"``), and under DeepSpeed or
      FSDP, whose norms it gets elsewhere.

    Works for any Trainer subclass, and for an optimizer that Trainer creates
    (``optimizer_cls_and_kwargs``) as well as one passed in ``optimizers=``.
    The optimizer's ``clip_stats`` is reachable as
    ``fusedclip.integrations.clip_stats(trainer.optimizer)``.
    """
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, FusedClipCallback):
            break
    else:
        callback = FusedClipCallback()
        trainer.add_callback(callback)
    if trainer.optimizer is not None:
        callback.check(trainer.args, trainer.optimizer)

    if not _grad_norm_hook_supported(trainer):
        # transformers 4.x measures no norm when it does not clip.
        return trainer
    if getattr(trainer, "_fusedclip_prepared", False):
        return trainer
    original = trainer._get_grad_norm

    def _get_grad_norm(model, grad_norm=None):
        if (grad_norm is not None
                or getattr(trainer, "is_deepspeed_enabled", False)
                or getattr(trainer, "is_fsdp_enabled", False)
                or not measures_grad_norm(trainer.optimizer)):
            return original(model, grad_norm=grad_norm)
        device = next(iter(model.parameters())).device
        return callback.grad_norm_placeholder(device)

    trainer._get_grad_norm = _get_grad_norm
    trainer._fusedclip_prepared = True
    return trainer

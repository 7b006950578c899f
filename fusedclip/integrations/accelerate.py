"""fusedclip with Hugging Face ``accelerate``.

accelerate clips only when the training loop calls
``accelerator.clip_grad_norm_(params, max_norm)`` (after unscaling the
gradients of a GradScaler, it is ``torch.nn.utils.clip_grad_norm_``). With a
fusedclip optimizer that clips, leave that call out. ``accelerator.prepare``
wraps the optimizer in an ``AcceleratedOptimizer``, which does not forward
attributes: reach ``clip_stats`` with ``fusedclip.integrations.clip_stats(opt)``
or ``opt.optimizer.clip_stats``.

Recipe::

    import fusedclip
    from fusedclip.integrations import clip_stats

    opt = fusedclip.FusedClipAdamW(model.parameters(), lr=3e-4, clip=1.0)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    for batch in loader:
        with accelerator.accumulate(model):
            accelerator.backward(model(**batch).loss)
            opt.step()                  # no accelerator.clip_grad_norm_: the step clips
            opt.zero_grad()
        log(clip_stats(opt)["grad_norm"])   # the pre-clip norm, a device tensor

:func:`watch_accelerator` makes the accelerator warn when the loop clips too.
"""

from __future__ import annotations

import functools
import math

from fusedclip.integrations import clip_policy, fused_optimizer, warn_framework_clip

__all__ = ["watch_accelerator"]


def watch_accelerator(accelerator):
    """Makes ``accelerator.clip_grad_norm_`` warn (``FrameworkClipWarning``,
    once) when it clips (finite ``max_norm``) parameters that a prepared
    fusedclip optimizer with a clip policy clips again in its step; returns
    ``accelerator``. The clip itself is unchanged. A call with
    ``max_norm=inf`` (a measurement of the norm) is not warned about.

    The check costs one pass over the parameter list in Python, no device
    work, and stops after the first warning."""
    if getattr(accelerator, "_fusedclip_watched", False):
        return accelerator
    original = accelerator.clip_grad_norm_
    state = {"warned": False}

    @functools.wraps(original)
    def clip_grad_norm_(parameters, max_norm, *args, **kwargs):
        if state["warned"] or max_norm is None or math.isinf(float(max_norm)):
            return original(parameters, max_norm, *args, **kwargs)
        parameters = list(parameters)
        ids = {id(p) for p in parameters}
        for optimizer in getattr(accelerator, "_optimizers", ()):
            inner = fused_optimizer(optimizer)
            if inner is None or clip_policy(inner) is None:
                continue
            if any(id(p) in ids for group in inner.param_groups for p in group["params"]):
                state["warned"] = warn_framework_clip(
                    "accelerate", f"accelerator.clip_grad_norm_(..., max_norm={max_norm})",
                    inner, "Leave out the call to accelerator.clip_grad_norm_")
                break
        return original(parameters, max_norm, *args, **kwargs)

    accelerator.clip_grad_norm_ = clip_grad_norm_
    accelerator._fusedclip_watched = True
    return accelerator

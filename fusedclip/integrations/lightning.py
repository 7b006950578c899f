"""fusedclip with Lightning (``lightning.pytorch``, or ``pytorch_lightning``).

What Lightning does (2.6): it clips only when asked. With
``Trainer(gradient_clip_val=None)``, the default, ``configure_gradient_clipping``
reaches ``Precision.clip_gradients(optimizer, 0.0)``, which returns at once:
no norm pass, no extra read of the gradients. With ``gradient_clip_val > 0``
it calls ``torch.nn.utils.clip_grad_norm_`` (or ``clip_grad_value_``) inside
the closure, after ``on_before_optimizer_step`` and before the optimizer's
update, so a fusedclip optimizer with a clip policy clips twice. Under
``precision="16-mixed"`` Lightning refuses its own clipping for a fusedclip
optimizer (RuntimeError "... does not allow for gradient clipping because it
performs unscaling of gradients internally"): fusedclip optimizers unscale
inside their step, as torch's fused ones do, and there only their own clip
can be had.

Lightning logs no gradient norm by default.

Recipe::

    import fusedclip
    from fusedclip.integrations.lightning import FusedClipCallback

    class Module(L.LightningModule):
        def configure_optimizers(self):
            return fusedclip.FusedClipAdamW(self.parameters(), lr=3e-4, clip=1.0)

    trainer = L.Trainer(callbacks=[FusedClipCallback()])   # gradient_clip_val left unset
    trainer.fit(Module(), loader)

``FusedClipCallback`` warns when ``gradient_clip_val`` is set as well and logs
``clip_stats["grad_norm"]`` (the pre-clip norm) as ``"grad_norm"`` after every
optimizer step. ``self.optimizers().clip_stats`` works inside the module
(``LightningOptimizer`` forwards attributes); ``fusedclip.integrations.clip_stats(opt)``
works with any wrapper.

``FusedClipCallback`` derives from ``lightning.pytorch.Callback``; with the
standalone ``pytorch_lightning`` package use ``PLFusedClipCallback``.
"""

from __future__ import annotations

import math

from fusedclip.integrations import clip_stats, fused_optimizer, warn_framework_clip

__all__ = ["FusedClipCallback", "PLFusedClipCallback", "check_trainer"]

_FIX = "Leave Trainer's gradient_clip_val unset (None)"


def check_trainer(trainer, optimizers=None) -> bool:
    """Warns (``FrameworkClipWarning``) when ``trainer.gradient_clip_val`` makes
    Lightning clip in front of a fusedclip optimizer (``optimizers``, by
    default ``trainer.optimizers``); returns whether it warned."""
    value = getattr(trainer, "gradient_clip_val", None)
    if value is None or not value > 0 or math.isinf(value):
        return False
    algorithm = getattr(trainer, "gradient_clip_algorithm", None)
    algorithm = getattr(algorithm, "value", algorithm)
    setting = f"Trainer(gradient_clip_val={value}" + (
        f", gradient_clip_algorithm={algorithm!r})" if algorithm else ")")
    warned = False
    for optimizer in (trainer.optimizers if optimizers is None else optimizers):
        warned |= warn_framework_clip("Lightning", setting, optimizer, _FIX)
    return warned


class _FusedClipCallbackMixin:
    """The body of the Lightning callbacks; see :class:`FusedClipCallback`."""

    def __init__(self, log_grad_norm: str | None = "grad_norm", prog_bar: bool = False) -> None:
        super().__init__()
        self.log_grad_norm = log_grad_norm
        self.prog_bar = prog_bar
        self._last_step = None

    def on_train_start(self, trainer, pl_module) -> None:
        # (trainer.optimizers is still empty in on_fit_start)
        check_trainer(trainer)
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # global_step counts optimizer steps: log once per step, not on the
        # micro-batches of gradient accumulation.
        if self.log_grad_norm is None or trainer.global_step == self._last_step:
            return
        self._last_step = trainer.global_step
        for i, optimizer in enumerate(trainer.optimizers):
            if fused_optimizer(optimizer) is None:
                continue
            norm = clip_stats(optimizer).get("grad_norm")
            if norm is None:
                continue
            name = self.log_grad_norm if i == 0 else f"{self.log_grad_norm}_{i}"
            pl_module.log(name, norm.detach(), on_step=True, on_epoch=False,
                          prog_bar=self.prog_bar, batch_size=1)


def _make(base):
    class FusedClipCallback(_FusedClipCallbackMixin, base):
        """Lightning callback of fusedclip.

        At the start of training it warns (``FrameworkClipWarning``) when
        ``Trainer(gradient_clip_val=...)`` makes Lightning clip in front of a
        fusedclip optimizer. After every optimizer step it logs the pre-clip
        global norm the optimizer measured, ``clip_stats["grad_norm"]``, as
        ``log_grad_norm`` (``"grad_norm"``; ``"grad_norm_1"`` ... for further
        optimizers; None: no logging), a device tensor that Lightning reads
        only when its logger writes.
        """

    return FusedClipCallback


def __getattr__(name: str):
    if name == "FusedClipCallback":
        from lightning.pytorch import Callback
    elif name == "PLFusedClipCallback":
        from pytorch_lightning import Callback
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    cls = _make(Callback)
    cls.__name__ = cls.__qualname__ = name
    globals()[name] = cls
    return cls

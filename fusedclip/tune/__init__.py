r"""Measuring a model's smoothness constants and picking a learning rate.

Two tools, both with the convention ``loss_fn(model, batch) -> scalar loss
tensor`` and ``batches`` an iterable of batches (reused cyclically when it is
shorter than the tool needs):

* :func:`estimate_smoothness` measures the local smoothness
  :math:`\lVert\nabla^2 f(x)\rVert` against the gradient norm along a short
  trajectory and fits the :math:`(L_0, L_1)` envelope
  :math:`\lVert\nabla^2 f(x)\rVert \le L_0 + L_1 \lVert\nabla f(x)\rVert` of
  Zhang, He, Sra & Jadbabaie (2020). Its ``suggest()`` turns the constants
  into a clip threshold :math:`L_0/L_1` (``SmoothClip`` or ``GlobalNorm``) and
  a step size :math:`1/L_0`.
* :func:`find_lr` looks for the largest learning rate with which a few
  optimizer steps train stably, and suggests half of it.

Neither changes the model, optimizer or random number generator state that
the caller passes or holds: both work on deep copies of the model, build their
own optimizers, and run inside :func:`torch.random.fork_rng`, so the global
torch RNG (CPU and the model's CUDA devices) is as it was afterwards. They read
losses and norms on the host (``float(loss)``), which is fine here: they are
tuning tools, not part of a training step.

The modules: ``smoothness`` (estimate_smoothness and its result),
``envelope`` (fit_envelope, the :math:`(L_0, L_1)` fit), ``lr_probe``
(find_lr and its result) and ``_common`` (what both share: argument checks,
batches, the loss check, the progress bar, the plots' figure).
"""

from fusedclip.tune.envelope import fit_envelope
from fusedclip.tune.lr_probe import LRProbe, LRSuggestion, find_lr
from fusedclip.tune.smoothness import SmoothnessEstimate, SmoothnessSuggestion, estimate_smoothness

__all__ = [
    "LRProbe", "LRSuggestion", "SmoothnessEstimate", "SmoothnessSuggestion",
    "estimate_smoothness", "find_lr", "fit_envelope",
]

r"""The learning-rate probe: :func:`find_lr` trains fresh copies of the model
for a few steps at learning rates a factor apart, brackets the edge of
stability and suggests a fraction of it."""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor

from fusedclip._validate import int_arg
from fusedclip.tune._common import (
    check_count, check_loss, check_loss_fn, check_plot_target, check_positive, cuda_devices,
    new_figure, progress_bar, take_batches, trainable,
)

__all__ = ["LRProbe", "LRSuggestion", "find_lr"]


# -- the result --------------------------------------------------------------------------
@dataclass
class LRProbe:
    """One probe of :func:`find_lr`.

    Attributes:
        lr (float): its learning rate.
        losses (list of float): the training loss before each of its steps
            (cut short at the first non-finite one).
        before (float): the mean loss on the evaluation batches before it.
        after (float): the same after its last step (nan if it diverged).
        status (str): ``"stable"``, ``"unstable"`` (no progress, or the loss
            rose too far) or ``"diverged"`` (a non-finite loss).
    """

    lr: float
    losses: list[float]
    before: float
    after: float
    status: str

    @property
    def stable(self) -> bool:
        return self.status == "stable"


@dataclass
class LRSuggestion:
    """The result of :func:`find_lr`.

    Attributes:
        lr (float): the suggested learning rate: ``edge / safety``.
        edge (float): the largest learning rate whose probe was stable.
        probes (list of LRProbe): every probe, in the order they ran.
        optimizer (str): the optimizer class's name.
        safety (float): the factor between ``edge`` and ``lr``.
    """

    lr: float
    edge: float
    probes: list[LRProbe] = field(default_factory=list)
    optimizer: str = ""
    safety: float = 2.0

    def plot(self, path=None, *, axes=None, title: Optional[str] = None) -> None:
        """Plots the loss curve of every probe (colored by lr, log scale) and
        each probe's relative progress ``after / before`` against its lr, with
        the edge and the suggestion marked, and writes it to ``path`` as a PNG
        (with matplotlib's object-oriented API: pyplot and its backend are left
        alone).

        Args:
            path (str or Path, optional): the PNG to write.
            axes (pair of matplotlib Axes, optional): ``(curves, progress)``
                axes of your figure to draw into instead of a new figure;
                either may be None to leave that panel out. With ``path`` too,
                their figure is written there.
            title (str, optional): the figure's title (a new figure only).
        """
        check_plot_target(path, axes)
        if axes is None:
            fig = new_figure(11.5)
            left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
            if title:
                fig.suptitle(title)
        else:
            left, right = axes
            fig = (left if left is not None else right).figure
        if left is not None:
            _plot_curves(left, self.probes, self.optimizer)
        if right is not None:
            _plot_progress(right, self.probes, self.edge, self.lr)
        if path is not None:
            fig.savefig(path, dpi=110)


def _plot_curves(ax, probes: list[LRProbe], optimizer: str) -> None:
    """Each probe's loss curve, colored by its lr (dotted: not stable)."""
    import matplotlib as mpl

    lrs = [p.lr for p in probes]
    norm = mpl.colors.LogNorm(vmin=min(lrs), vmax=max(lrs) * (1 + 1e-9))
    cmap = mpl.colormaps["plasma"]
    for p in sorted(probes, key=lambda q: q.lr):
        style = "-" if p.stable else ":"
        shown = [v for v in p.losses if math.isfinite(v) and v > 0]
        ax.plot(range(len(shown)), shown, style, color=cmap(norm(p.lr)),
                label=f"lr={p.lr:.3g} ({p.status})")
    ax.set_yscale("log")
    ax.set_xlabel("probe step")
    ax.set_ylabel("training loss")
    ax.set_title(f"find_lr probes, {optimizer} (dotted: not stable)")
    ax.legend(fontsize=7, loc="best")
    ax.grid(True, which="both", alpha=0.3)


def _plot_progress(ax, probes: list[LRProbe], edge: float, lr: float) -> None:
    """Each probe's ``after / before`` against its lr (a vertical line where
    there is none to show), the edge and the suggestion."""
    for status, marker, color in (("stable", "o", "C2"), ("unstable", "s", "C1"),
                                  ("diverged", "x", "C3")):
        pts = [(p.lr, p.after / p.before if p.before and math.isfinite(p.after) else None)
               for p in probes if p.status == status]
        shown = [(x, r) for x, r in pts if r is not None and r > 0]
        if shown:
            ax.scatter([x for x, _ in shown], [r for _, r in shown], marker=marker,
                       color=color, label=status, zorder=3)
        for x, r in pts:
            if r is None or r <= 0:
                ax.axvline(x, color=color, lw=1, alpha=0.6)
    ax.axvline(edge, color="k", ls="--", lw=1, label=f"edge {edge:.3g}")
    ax.axvline(lr, color="C0", lw=2, label=f"suggestion {lr:.3g}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss after probe / loss before")
    ax.set_title("progress per probe (vertical lines: diverged)")
    ax.legend(fontsize=8, loc="best")
    ax.grid(True, which="both", alpha=0.3)


# -- the probes --------------------------------------------------------------------------
class _Prober:
    """Runs probes from the model's current parameters, on the same batches in
    the same order, and keeps them in ``probes``. Measures the starting loss
    (every probe's ``before``) when built."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable, data: list, evals: list,
                 optimizer_cls, kwargs: dict, *, steps: int, rise: float, seed: int,
                 progress: Optional[bool]) -> None:
        self.model, self.loss_fn, self.data, self.evals = model, loss_fn, data, evals
        self.optimizer_cls, self.kwargs = optimizer_cls, kwargs
        self.steps, self.rise, self.seed, self.progress = steps, rise, seed, progress
        self.probes: list[LRProbe] = []
        self.before = self._evaluate(copy.deepcopy(model), "at the start")
        if not math.isfinite(self.before):
            raise ValueError(f"the loss is not finite at the start ({self.before})")

    def __call__(self, lr: float) -> LRProbe:
        """One probe: ``steps`` steps of a fresh copy with this lr, judged."""
        work = copy.deepcopy(self.model)
        losses, status = self._train(work, lr)
        after = math.nan
        if status == "stable":
            after, status = self._judge(work, lr, losses)
        result = LRProbe(lr=lr, losses=losses, before=self.before, after=after, status=status)
        self.probes.append(result)
        return result

    def _evaluate(self, work: torch.nn.Module, where: str) -> float:
        """The mean loss on the evaluation batches, without gradients."""
        torch.manual_seed(self.seed + 1)
        with torch.no_grad():
            values = [check_loss(self.loss_fn(work, b), where) for b in self.evals]
        return sum(values) / len(values)

    def _train(self, work: torch.nn.Module, lr: float) -> tuple[list[float], str]:
        """The training losses before each step, and ``"diverged"`` if one
        is not finite (the run stops there), else ``"stable"``."""
        params = trainable(work)
        opt = self.optimizer_cls(params, lr=lr, **self.kwargs)
        torch.manual_seed(self.seed)
        first = not self.probes  # the first probe's first step checks the model
        losses: list[float] = []
        bar = progress_bar(self.steps, self.progress, 50, f"find_lr lr={lr:.3g}")
        try:
            for t in range(self.steps):
                opt.zero_grad(set_to_none=True)
                loss, value = self._loss(work, t, lr, at_start=first and t == 0)
                losses.append(value)
                if not math.isfinite(value):
                    return losses, "diverged"
                loss.reshape(()).backward()
                if first and t == 0 and all(p.grad is None for p in params):
                    raise ValueError("the model has no parameters with gradients: backward "
                                     "gave none")
                opt.step()
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return losses, "stable"

    def _loss(self, work: torch.nn.Module, t: int, lr: float, *,
              at_start: bool) -> tuple[Tensor, float]:
        """The training loss of step ``t``, as a tensor and as a checked float."""
        where = "at the start" if at_start else f"in the probe lr={lr:g}"
        with torch.enable_grad():
            loss = self.loss_fn(work, self.data[t % len(self.data)])
            value = check_loss(loss, where)
            if at_start and not loss.requires_grad:
                raise ValueError("the model has no parameters with gradients: the loss "
                                 "does not depend on any parameter that requires grad")
        return loss, value

    def _judge(self, work: torch.nn.Module, lr: float,
               losses: list[float]) -> tuple[float, str]:
        """A run whose losses stayed finite, judged on the evaluation batches:
        the mean loss after it, and its status."""
        after = self._evaluate(work, f"after the probe lr={lr:g}")
        limit = self.before + self.rise * max(abs(self.before), 1e-12)
        if not math.isfinite(after):
            return after, "diverged"
        if not after < self.before or max(losses) > limit:
            return after, "unstable"
        return after, "stable"


# -- the search --------------------------------------------------------------------------
def _bracket(probe: _Prober, lr0: float, min_lr: float,
             max_lr: float) -> tuple[Optional[float], Optional[float]]:
    """From ``lr0``, multiplies the lr by 10 while probes are stable or divides
    it by 10 while they are not, within [min_lr, max_lr]: the last stable and
    the first unstable lr found (either None if there was none)."""
    stable_lr, unstable_lr = None, None
    lr = lr0
    if probe(lr).stable:
        stable_lr = lr
        while lr < max_lr:
            lr = min(lr * 10, max_lr)
            if probe(lr).stable:
                stable_lr = lr
            else:
                unstable_lr = lr
                break
    else:
        unstable_lr = lr
        while lr > min_lr:
            lr = max(lr / 10, min_lr)
            if probe(lr).stable:
                stable_lr = lr
                break
            unstable_lr = lr
    return stable_lr, unstable_lr


def _narrow(probe: _Prober, stable_lr: float, unstable_lr: float, resolution: float) -> float:
    """Halves the bracket in log scale down to a factor ``resolution``; the
    largest stable lr."""
    while unstable_lr / stable_lr > resolution * (1 + 1e-9):
        mid = math.sqrt(stable_lr * unstable_lr)
        if probe(mid).stable:
            stable_lr = mid
        else:
            unstable_lr = mid
    return stable_lr


# -- the arguments -----------------------------------------------------------------------
def _optimizer(optimizer_cls, optimizer_kwargs: Optional[dict]) -> tuple[Callable, dict]:
    """The optimizer class (FusedClipAdamW by default) and a copy of its other
    arguments, which must leave the lr to find_lr."""
    if optimizer_cls is None:
        from fusedclip.optim import FusedClipAdamW

        optimizer_cls = FusedClipAdamW
    if not callable(optimizer_cls):
        raise TypeError(f"optimizer_cls must be an optimizer class, got {optimizer_cls!r}")
    kwargs = dict(optimizer_kwargs or {})
    if "lr" in kwargs:
        raise ValueError("optimizer_kwargs must not hold lr: find_lr chooses it")
    return optimizer_cls, kwargs


def _lr_range(optimizer_cls, lr0, min_lr, max_lr) -> tuple[float, float, float]:
    """``(min_lr, lr0, max_lr)`` checked, with ``lr0`` (None: the optimizer's
    conventional lr) moved into [min_lr, max_lr]."""
    min_lr = check_positive(min_lr, "min_lr")
    max_lr = check_positive(max_lr, "max_lr")
    if min_lr > max_lr:
        raise ValueError(f"min_lr ({min_lr}) must be <= max_lr ({max_lr})")
    if lr0 is None:
        lr0 = _conventional_lr(optimizer_cls) if isinstance(optimizer_cls, type) else 1e-3
    lr0 = min(max(check_positive(lr0, "lr0"), min_lr), max_lr)
    return min_lr, lr0, max_lr


# The conventional first learning rate of an optimizer family, as the
# practitioners' guides give it (SGD: 1e-2 to 1e-1 with momentum).
_CONVENTIONAL_LR = (("adam", 1e-3), ("adagrad", 1e-2), ("sgd", 1e-2))


def _conventional_lr(optimizer_cls) -> float:
    """The first lr to probe: the conventional one of the optimizer's family
    (found in its classes' names), else its own default lr, else 1e-3."""
    for klass in inspect.getmro(optimizer_cls):
        name = klass.__name__.lower()
        for family, lr in _CONVENTIONAL_LR:
            if family in name:
                return lr
    try:
        default = inspect.signature(optimizer_cls).parameters["lr"].default
        if isinstance(default, (int, float)) and not isinstance(default, bool) and default > 0:
            return float(default)
    except (KeyError, TypeError, ValueError):
        pass
    return 1e-3


# -- the tool ----------------------------------------------------------------------------
def find_lr(model: torch.nn.Module, loss_fn: Callable, batches: Iterable, *,
            optimizer_cls=None, optimizer_kwargs: Optional[dict] = None,
            lr0: Optional[float] = None, steps: int = 20, min_lr: float = 1e-7,
            max_lr: float = 10.0, resolution: float = 10 ** 0.25, safety: float = 2.0,
            rise: float = 0.5, eval_batches: int = 4, seed: int = 0,
            progress: Optional[bool] = None) -> LRSuggestion:
    r"""Finds the largest learning rate that trains stably for a few steps,
    and suggests ``1/safety`` of it.

    This is the short-probe procedure of the practitioners' guides, done
    systematically. A *probe* trains a fresh copy of the model for ``steps``
    steps with one learning rate, on the same batches in the same order as
    every other probe, and is judged:

    * ``"diverged"``: a loss turned inf or nan;
    * ``"unstable"``: the mean loss on the first ``eval_batches`` batches did
      not go down, or a training loss rose above the starting loss by more
      than ``rise`` times its magnitude (an early oscillation or blow-up);
    * ``"stable"`` otherwise.

    The search starts at the conventional value for the optimizer (``lr0``;
    by default 1e-3 for the Adam family, 1e-2 for SGD and Adagrad, else the
    optimizer's own default), multiplies the lr by 10 while probes are stable
    (the guides' "too slow: multiply") or divides it by 10 while they are not
    (the guides' "divergent: divide by 10"), until one stable and one
    unstable lr a factor 10 apart bracket the edge of stability; it then
    halves the bracket in log scale down to a factor ``resolution``. The
    suggestion is the largest stable lr (the *edge*) divided by ``safety``.

    Why the edge over 2: on a quadratic with largest curvature :math:`L`,
    gradient descent is stable exactly below :math:`2/L` and contracts the
    stiffest direction fastest at :math:`1/L`, half the edge; momentum,
    Adam and mini-batch noise all lower the edge, and the probes measure it
    with them, so half the measured edge is a stable rate that is not far
    from the fastest. Why not an exponential range test (Smith 2017, the
    ``lr_find`` of fastai and Lightning): it raises the lr within one run,
    so the loss at a given lr depends on the steps taken at smaller ones and
    divergence shows a few steps (a factor in lr) after the edge; separate
    probes from the same start compare learning rates on equal terms, and
    the bracketing needs only about 5-7 of them.

    A probe's length matters: instabilities that take more than ``steps``
    steps to show (slowly growing oscillations, late loss spikes) are missed,
    so the edge may be overestimated; ``safety`` covers some of that.

    The model, its gradients and buffers, any optimizer the caller holds and
    the global torch RNG state are left unchanged: each probe trains its own
    deep copy of the model with its own optimizer, inside
    :func:`torch.random.fork_rng`, with the RNG seeded to ``seed`` at its
    start (every probe draws the same dropout masks).

    Args:
        model (torch.nn.Module): the model; its current parameters are the
            start of every probe.
        loss_fn (callable): ``loss_fn(model, batch)`` returns the scalar loss.
        batches (iterable): batches for ``loss_fn``; the first ``steps`` are
            taken once and reused cyclically if there are fewer.
        optimizer_cls (type, optional): built as ``optimizer_cls(params,
            lr=lr, **optimizer_kwargs)`` for each probe (default:
            :class:`fusedclip.FusedClipAdamW`)
        optimizer_kwargs (dict, optional): its other arguments, ``clip=``
            included (default: None)
        lr0 (float, optional): the first lr probed (default: conventional, above)
        steps (int, optional): steps per probe, >= 2 (default: 20)
        min_lr (float, optional): the smallest lr probed (default: 1e-7)
        max_lr (float, optional): the largest lr probed (default: 10.0)
        resolution (float, optional): the ratio > 1 between the edge and the
            smallest unstable lr at which the search stops (default: 10**0.25)
        safety (float, optional): edge / suggestion, >= 1 (default: 2.0)
        rise (float, optional): how far, relative to the starting loss's
            magnitude, a training loss may rise above it in a stable probe,
            > 0 (default: 0.5)
        eval_batches (int, optional): how many of the first batches measure a
            probe's progress, >= 1 (default: 4)
        seed (int, optional): the RNG seed of every probe (default: 0)
        progress (bool, optional): a tqdm progress bar over each probe's steps
            (if tqdm is installed); None shows one for probes of 50 steps or
            more (default: None)

    Returns:
        LRSuggestion: ``lr`` (the suggestion), ``edge``, ``probes`` (each lr
        and its loss curve) and ``plot(path)``.

    Raises:
        ValueError: ``steps < 2``; the model has no parameters with gradients;
            the loss is not a scalar or is not finite at the start;
            ``batches`` is empty; bad search arguments.
        TypeError: ``loss_fn`` returns something other than a tensor.
        RuntimeError: no probe is stable, even at ``min_lr``.

    References:
        Smith, *Cyclical learning rates for training neural networks*,
        WACV 2017 (arXiv:1506.01186) (the learning-rate range test).
        Zhang, He, Sra & Jadbabaie, *Why gradient clipping accelerates
        training: a theoretical justification for adaptivity*, ICLR 2020
        (step sizes against local smoothness).
    """
    steps = int_arg(steps, "steps", minimum=2)
    optimizer_cls, kwargs = _optimizer(optimizer_cls, optimizer_kwargs)
    min_lr, lr0, max_lr = _lr_range(optimizer_cls, lr0, min_lr, max_lr)
    resolution = check_positive(resolution, "resolution")
    if not resolution > 1:
        raise ValueError(f"resolution must be > 1, got {resolution}")
    safety = check_positive(safety, "safety")
    if safety < 1:
        raise ValueError(f"safety must be >= 1, got {safety}")
    rise = check_positive(rise, "rise")
    eval_batches = check_count(eval_batches, "eval_batches", 1)
    check_loss_fn(loss_fn)
    trainable(model)
    data = take_batches(batches, steps)
    name = getattr(optimizer_cls, "__name__", repr(optimizer_cls))
    with torch.random.fork_rng(devices=cuda_devices(model)):
        probe = _Prober(model, loss_fn, data, data[:eval_batches], optimizer_cls, kwargs,
                        steps=steps, rise=rise, seed=seed, progress=progress)
        stable_lr, unstable_lr = _bracket(probe, lr0, min_lr, max_lr)
        if stable_lr is None:
            raise RuntimeError(
                f"find_lr: no stable probe down to min_lr={min_lr:g} with {name}; the "
                "loss may be ill-defined, or the optimizer unstable at any step size")
        if unstable_lr is None:
            warnings.warn(f"find_lr: every probe up to max_lr={max_lr:g} was stable; the edge of "
                          "stability lies above it")
        else:
            stable_lr = _narrow(probe, stable_lr, unstable_lr, resolution)
    return LRSuggestion(lr=stable_lr / safety, edge=stable_lr, probes=probe.probes,
                        optimizer=name, safety=safety)

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
"""

from __future__ import annotations

import copy
import inspect
import itertools
import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor

from fusedclip.clipping import GlobalNorm, Normalize, SmoothClip

__all__ = [
    "LRProbe", "LRSuggestion", "SmoothnessEstimate", "SmoothnessSuggestion",
    "estimate_smoothness", "find_lr", "fit_envelope",
]

# -- shared helpers -------------------------------------------------------------------
def _check_steps(steps, name: str = "steps") -> int:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {steps!r}")
    if steps < 2:
        raise ValueError(f"{name} must be >= 2, got {steps}")
    return int(steps)


def _check_positive(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def _take_batches(batches: Iterable, count: int) -> list:
    """The first ``count`` batches of ``batches`` (fewer if it is shorter),
    held in a list so every probe sees the same batches in the same order."""
    if batches is None:
        raise TypeError("batches must be an iterable of batches, got None")
    try:
        iterator = iter(batches)
    except TypeError:
        raise TypeError("batches must be an iterable of batches, got "
                        f"{type(batches).__name__}") from None
    taken = list(itertools.islice(iterator, count))
    if not taken:
        raise ValueError("batches is empty: loss_fn needs at least one batch")
    return taken


def _trainable(model: torch.nn.Module) -> list[Tensor]:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameters with gradients (none has requires_grad=True)")
    return params


def _check_loss(loss, where: str) -> float:
    """The loss as a Python float, after checking it is a finite scalar tensor."""
    if not isinstance(loss, Tensor):
        raise TypeError(
            f"loss_fn must return a scalar loss tensor, got {type(loss).__name__} {where}")
    if loss.numel() != 1:
        raise ValueError(
            f"loss_fn must return a scalar loss tensor, got a tensor of shape {tuple(loss.shape)} "
            f"{where} (reduce it, e.g. with .mean())"
        )
    if loss.is_complex() or not loss.is_floating_point():
        raise TypeError(f"loss_fn must return a real floating-point loss, got {loss.dtype} {where}")
    return float(loss.detach())


def _cuda_devices(model: torch.nn.Module) -> list[int]:
    devices = {p.device.index for p in model.parameters() if p.device.type == "cuda"}
    devices |= {b.device.index for b in model.buffers() if b.device.type == "cuda"}
    return sorted(d if d is not None else torch.cuda.current_device() for d in devices)


def _progress(total: int, show: Optional[bool], long_at: int, desc: str):
    """A tqdm bar when tqdm is installed and ``show`` asks for one (None: only
    for ``total >= long_at`` steps); otherwise None (quiet)."""
    if show is False or (show is None and total < long_at):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=False)


def _new_figure(width: float):
    # The object-oriented API: no pyplot, no change to the user's backend.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, 4.2), layout="constrained")


def _check_plot_target(path, drawn_into) -> None:
    if path is None and drawn_into is None:
        raise ValueError("plot() needs a path to write the PNG to, or axes to draw into")


# -- the (L0, L1) envelope --------------------------------------------------------------
def _upper_hull(x, y) -> list[int]:
    """Indices of the upper convex hull of the points, by increasing x
    (for equal x only the highest point is a candidate)."""
    order = sorted(range(len(x)), key=lambda i: (x[i], -y[i]))
    hull: list[int] = []
    for i in order:
        if hull and x[hull[-1]] == x[i]:
            continue  # same x, lower y
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b if it lies on or below the segment a -> i
            cross = (x[b] - x[a]) * (y[i] - y[a]) - (y[b] - y[a]) * (x[i] - x[a])
            if cross >= 0:
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def _envelope_lp(x: list[float], y: list[float]) -> tuple[float, float]:
    """The line ``L0 + L1 x`` with ``L0, L1 >= 0`` above every point that
    minimises ``sum_k (L0 + L1 x_k) / y_k``: a linear programme in two
    variables, whose optimum is a supporting line of the points' upper convex
    hull (one of its edges) or one of the two lines with ``L1 = 0`` or
    ``L0 = 0``."""
    weight0 = sum(1.0 / v for v in y)
    weight1 = sum(u / v for u, v in zip(x, y))
    candidates = [(max(y), 0.0)]
    if min(x) > 0:
        candidates.append((0.0, max(v / u for u, v in zip(x, y))))
    hull = _upper_hull(x, y)
    for a, b in zip(hull, hull[1:]):
        slope = (y[b] - y[a]) / (x[b] - x[a])
        intercept = y[a] - slope * x[a]
        if slope >= 0 and intercept >= 0:
            candidates.append((intercept, slope))
    best, best_cost = None, math.inf
    for l0, l1 in candidates:
        # feasible: above every point, up to rounding
        if all(l0 + l1 * u >= v * (1 - 1e-9) for u, v in zip(x, y)):
            cost = weight0 * l0 + weight1 * l1
            if cost < best_cost:
                best, best_cost = (l0, l1), cost
    assert best is not None  # (max(y), 0) is always feasible
    return best


def fit_envelope(grad_norms, smoothness, *, trim: float = 0.05) -> tuple[float, float]:
    r"""Fits the upper envelope :math:`L_0 + L_1 n` over points
    :math:`(n_k, \hat L_k)` (gradient norm, local smoothness).

    The envelope is the line with :math:`L_0, L_1 \ge 0` that lies above the
    points and minimises :math:`\sum_k (L_0 + L_1 n_k) / \hat L_k`, its summed
    relative height over them: the tightest line that bounds every measured
    point, judged relative to each point so that the small smoothness values
    near a minimum count as much as the large ones far from it. Over points
    that follow a convex curve (the cosh problem's
    :math:`\sqrt{L_0^2 + L_1^2 n^2}`) it is the chord between the smallest and
    largest gradient norm; over points of constant smoothness (a quadratic) it
    is flat, :math:`L_1 = 0`.

    Robustness: the envelope has to lie above all points but
    ``floor(trim * len(points))``. Those are dropped one by one, each time the
    point (among those the current envelope touches) whose removal lowers it
    most, so a few points far above the rest (a noisy measurement, a batch
    unlike the others) do not move it. The price is that the envelope may
    also pass under that many genuine extreme points.

    Args:
        grad_norms (sequence of float): the gradient norms :math:`n_k`.
        smoothness (sequence of float): the local smoothness :math:`\hat L_k`.
            Points with a non-finite or non-positive smoothness, or a
            non-finite or negative norm, are ignored.
        trim (float, optional): the fraction of points the envelope may pass
            under, in [0, 0.5) (default: 0.05)

    Returns:
        (L0, L1): two floats >= 0.
    """
    if isinstance(trim, bool) or not isinstance(trim, numbers.Real) or not 0.0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim!r}")
    x, y = [], []
    for n, s in zip(grad_norms, smoothness):
        n, s = float(n), float(s)
        if math.isfinite(n) and n >= 0 and math.isfinite(s) and s > 0:
            x.append(n)
            y.append(s)
    if not x:
        raise ValueError(
            "fit_envelope: no point with a finite norm and a positive finite smoothness")
    for _ in range(int(math.floor(trim * len(x)))):
        l0, l1 = _envelope_lp(x, y)
        cost = sum((l0 + l1 * u) / v for u, v in zip(x, y))
        touching = [k for k in range(len(x)) if l0 + l1 * x[k] <= y[k] * (1 + 1e-9)]
        best_k, best_cost = None, math.inf
        for k in touching:
            rest_x, rest_y = x[:k] + x[k + 1:], y[:k] + y[k + 1:]
            r0, r1 = _envelope_lp(rest_x, rest_y)
            # compare over the same points: the ones kept
            c = sum((r0 + r1 * u) / v for u, v in zip(rest_x, rest_y))
            c_old = cost - (l0 + l1 * x[k]) / y[k]
            if c - c_old < best_cost:
                best_k, best_cost = k, c - c_old
        if best_k is None:
            break
        del x[best_k], y[best_k]
    return _envelope_lp(x, y)


# -- estimate_smoothness ----------------------------------------------------------------
@dataclass
class SmoothnessSuggestion:
    """What :meth:`SmoothnessEstimate.suggest` derives from :math:`(L_0, L_1)`.

    Attributes:
        clip (ClipPolicy or None): ``SmoothClip(L0 / L1)``; ``None`` when
            :math:`L_1 = 0` (no clipping needed: the smoothness does not grow
            with the gradient); ``Normalize()`` when :math:`L_0 = 0`.
        max_norm (float or None): the same threshold :math:`L_0/L_1` as a
            ``GlobalNorm`` max_norm (``clip=max_norm``), ``None`` when
            :math:`L_1 = 0` or :math:`L_0 = 0`.
        lr (float): the step size for gradient descent (``FusedClipSGD``
            without momentum): :math:`1/L_0`, or :math:`1/L_1` with
            ``Normalize()`` when :math:`L_0 = 0`.
    """

    clip: Any
    max_norm: Optional[float]
    lr: float

    @property
    def global_norm(self) -> Optional[GlobalNorm]:
        """``GlobalNorm(max_norm)``, or None."""
        return None if self.max_norm is None else GlobalNorm(self.max_norm)


@dataclass
class SmoothnessEstimate:
    r"""The result of :func:`estimate_smoothness`.

    Attributes:
        L0 (float): :math:`L_0`, the smoothness where the gradient vanishes.
        L1 (float): :math:`L_1`, how fast the smoothness grows with the
            gradient norm.
        threshold (float): :math:`L_0 / L_1` (``inf`` when :math:`L_1 = 0`):
            the gradient norm above which the :math:`L_1` term dominates, and
            the clip threshold of Zhang et al.
        grad_norms (list of float): the gradient norm at each measured point.
        smoothness (list of float): the local smoothness measured there.
        losses (list of float): the loss there.
        trim (float): the fraction of points the fit was allowed to pass under.
    """

    L0: float
    L1: float
    threshold: float
    grad_norms: list[float]
    smoothness: list[float]
    losses: list[float]
    trim: float = 0.05

    @property
    def points(self) -> list[tuple[float, float]]:
        """The measured ``(gradient norm, local smoothness)`` pairs."""
        return list(zip(self.grad_norms, self.smoothness))

    def suggest(self) -> SmoothnessSuggestion:
        r"""The clipping and the step size the constants call for.

        With ``clip=SmoothClip(L0 / L1)`` and ``lr = 1 / L0``, a gradient step
        has the size :math:`\frac{1}{L_0} \cdot \frac{L_0/L_1}{L_0/L_1 +
        \lVert g\rVert} = \frac{1}{L_0 + L_1 \lVert g\rVert}`: the inverse of
        the local smoothness bound, the classical safe step of gradient
        descent on an :math:`L`-smooth function, everywhere. ``GlobalNorm``
        with the same max_norm and lr takes the step
        :math:`\min(1/L_0, 1/(L_1\lVert g\rVert))`, at most twice that (at
        :math:`\lVert g\rVert = L_0/L_1`). The lr is for plain gradient
        descent; for Adam and other adaptive methods only the threshold
        carries over, and their lr is better found with :func:`find_lr`.
        """
        l0, l1 = self.L0, self.L1
        if l1 <= 0:
            return SmoothnessSuggestion(clip=None, max_norm=None, lr=1.0 / l0)
        if l0 <= 0:
            return SmoothnessSuggestion(clip=Normalize(), max_norm=None, lr=1.0 / l1)
        return SmoothnessSuggestion(clip=SmoothClip(self.threshold), max_norm=self.threshold,
                                    lr=1.0 / l0)

    def plot(self, path=None, *, ax=None, title: Optional[str] = None,
             true_constants=None) -> None:
        """Plots the local smoothness against the gradient norm (log axes,
        colored by trajectory step), the fitted envelope :math:`L_0 + L_1 n`
        over the points and the threshold :math:`L_0/L_1`, the way Figure 1 of
        Zhang et al. shows them, and writes it to ``path`` as a PNG (with
        matplotlib's object-oriented API: pyplot and its backend are left
        alone).

        Args:
            path (str or Path, optional): the PNG to write.
            ax (matplotlib Axes, optional): draw into these axes (of your
                figure) instead of a new figure; with ``path`` too, the axes'
                figure is written there.
            title (str, optional): the title.
            true_constants (tuple, optional): known ``(L0, L1)``, drawn as a
                dashed envelope.
        """
        _check_plot_target(path, ax)
        if ax is None:
            fig = _new_figure(6.4)
            ax = fig.add_subplot(1, 1, 1)
        fig = ax.figure
        pts = [(n, s, i) for i, (n, s) in enumerate(self.points)
               if n > 0 and s > 0 and math.isfinite(n) and math.isfinite(s)]
        if pts:
            sc = ax.scatter([p[0] for p in pts], [p[1] for p in pts], c=[p[2] for p in pts],
                            cmap="viridis", s=14, label="measured", zorder=3)
            fig.colorbar(sc, ax=ax, label="trajectory step")
            lo = min(p[0] for p in pts) / 2
            hi = max(p[0] for p in pts) * 2
            grid = [lo * (hi / lo) ** (k / 199) for k in range(200)]
            ax.plot(grid, [self.L0 + self.L1 * n for n in grid], color="C3", lw=2,
                    label=f"fit: L0 + L1 n, L0={self.L0:.3g}, L1={self.L1:.3g}")
            if true_constants is not None:
                t0, t1 = true_constants
                ax.plot(grid, [t0 + t1 * n for n in grid], color="k", ls="--", lw=1,
                        label=f"true: L0={t0:.3g}, L1={t1:.3g}")
            if math.isfinite(self.threshold) and lo < self.threshold < hi:
                ax.axvline(self.threshold, color="C3", ls=":", lw=1,
                           label=f"threshold L0/L1 = {self.threshold:.3g}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("gradient norm ‖∇f(x)‖")
        ax.set_ylabel("local smoothness ‖∇²f(x)‖ (measured)")
        ax.set_title(title or "local smoothness against gradient norm")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
        if path is not None:
            fig.savefig(path, dpi=110)


def _flat_grad(params: list[Tensor]) -> Tensor:
    """The gradients of ``params`` as one float64 vector on the first one's
    device (zeros for a missing one)."""
    device = params[0].device
    return torch.cat([
        (p.grad.detach() if p.grad is not None else torch.zeros_like(p)).reshape(-1)
        .to(device=device, dtype=torch.float64)
        for p in params
    ])


def _set_params(params: list[Tensor], base: list[Tensor], direction: Optional[Tensor],
                scale: float) -> None:
    """``params = base + scale * direction`` (direction: a flat float64 vector)."""
    offset = 0
    with torch.no_grad():
        for p, b in zip(params, base):
            n = p.numel()
            if direction is None:
                p.copy_(b)
            else:
                d = direction[offset:offset + n].view_as(p).to(p.device)
                p.copy_((b.to(torch.float64) + scale * d).to(p.dtype))
            offset += n


def _flat_params(params: list[Tensor]) -> Tensor:
    device = params[0].device
    return torch.cat([p.detach().reshape(-1).to(device=device, dtype=torch.float64)
                      for p in params])


def estimate_smoothness(model: torch.nn.Module, loss_fn: Callable, batches: Iterable, *,
                        steps: int = 60, power_iters: int = 2, radius: float = 1e-3,
                        optimizer: Optional[Callable] = None, step_scale: float = 1.0,
                        trim: float = 0.05, seed: int = 0,
                        progress: Optional[bool] = None) -> SmoothnessEstimate:
    r"""Measures the :math:`(L_0, L_1)` smoothness constants of a model's loss
    along a short trajectory.

    A function is :math:`(L_0, L_1)`-smooth when
    :math:`\lVert\nabla^2 f(x)\rVert \le L_0 + L_1 \lVert\nabla f(x)\rVert`
    (Zhang et al. 2020): its curvature may grow with the gradient, which is
    what they measured along the training of LSTMs and ResNets, and what makes
    clipping with the threshold :math:`L_0/L_1` converge faster than any fixed
    step size.

    **Method.** The model is copied, and the copy follows a trajectory of
    ``steps`` points from its current parameters. At each point
    :math:`x_t`, with batch :math:`b_t` (``batches`` in order, cyclically):

    1. the gradient :math:`g_t = \nabla f(x_t; b_t)` and its norm;
    2. the local smoothness: the change of the gradient *on the same batch*
       between :math:`x_t` and a nearby point :math:`x_t + \epsilon d`,
       divided by their distance, :math:`\lVert\nabla f(x_t+\epsilon d; b_t)
       - g_t\rVert / \epsilon \approx \lVert\nabla^2 f(x_t)\, d\rVert`, with
       :math:`\epsilon` = ``radius`` :math:`\cdot \max(\lVert x_t\rVert, 1)`.
       The first direction :math:`d` is the gradient's plus the previous
       point's top curvature direction (at the first point, a random one);
       each of ``power_iters`` more evaluations takes the measured
       :math:`\nabla^2 f\, d` as the next :math:`d`, a power iteration that
       moves :math:`d` towards the direction of largest curvature. The
       point's smoothness :math:`\hat L_t` is the largest ratio measured;
    3. the step to :math:`x_{t+1}`: by default gradient descent with the
       locally safe step :math:`x_{t+1} = x_t - (\text{step\_scale} /
       \hat L_t)\, g_t` (the classical step :math:`1/L` of an
       :math:`L`-smooth function, with the local smoothness for :math:`L`),
       which descends from large gradients to small ones in few steps on
       :math:`(L_0, L_1)`-smooth functions (it is clipped gradient descent
       with the measured smoothness); or a step of
       ``optimizer`` (built once on the copy's parameters), to measure along
       the trajectory of the optimizer you train with.

    The envelope :math:`L_0 + L_1 n` is then fitted over the points
    :math:`(\lVert g_t\rVert, \hat L_t)` by :func:`fit_envelope`: the tightest
    line above all points but a fraction ``trim`` of them.

    Every gradient evaluation at point :math:`t` runs with the torch RNG
    seeded to ``seed + t``, so dropout and other random layers draw the same
    numbers at :math:`x_t` and at its nearby points: the gradient difference
    is the curvature's, not the noise's.

    **Limits.** Each :math:`\hat L_t` is a lower bound of
    :math:`\lVert\nabla^2 f(x_t)\rVert` (a few power iterations need not find
    the top direction), up to the finite-difference error of a step
    :math:`\epsilon`; with float32 or lower-precision parameters, too small a
    ``radius`` measures rounding noise. The fit only knows the gradient norms
    the trajectory visits: :math:`L_0` needs points with gradient norms well
    below :math:`L_0/L_1`, :math:`L_1` points well above it. The constants are
    those of mini-batch losses along one trajectory, not global ones. The
    memory cost is one copy of the model plus a few float64 vectors of its
    size; the time cost is ``steps * (2 + power_iters)`` forward and backward
    passes.

    The model, its gradients and buffers, any optimizer the caller holds and
    the global torch RNG state are left unchanged: the work happens on a deep
    copy, inside :func:`torch.random.fork_rng`.

    Args:
        model (torch.nn.Module): the model; its current parameters are the
            starting point.
        loss_fn (callable): ``loss_fn(model, batch)`` returns the scalar loss.
        batches (iterable): batches for ``loss_fn``; the first ``steps`` are
            taken once and reused cyclically if there are fewer.
        steps (int, optional): the number of trajectory points, >= 2 (default: 60)
        power_iters (int, optional): extra gradient evaluations per point that
            refine the direction of largest curvature, >= 0 (default: 2)
        radius (float, optional): the relative distance :math:`\epsilon /
            \max(\lVert x\rVert, 1)` of the nearby points, > 0 (default: 1e-3)
        optimizer (callable, optional): ``optimizer(params) -> Optimizer``
            that moves the copy between points; None for the locally safe
            gradient step above (default: None)
        step_scale (float, optional): the default step's multiple of
            :math:`1/\hat L_t`, > 0 (default: 1.0)
        trim (float, optional): the fraction of points the fitted envelope may
            pass under, in [0, 0.5) (default: 0.05)
        seed (int, optional): seeds the random first direction and the RNG of
            each gradient evaluation (default: 0)
        progress (bool, optional): a tqdm progress bar (if tqdm is installed);
            None shows one for 50 steps or more (default: None)

    Returns:
        SmoothnessEstimate: ``L0``, ``L1``, ``threshold``, the points,
        ``suggest()`` and ``plot(path)``.

    Raises:
        ValueError: ``steps < 2``; the model has no parameters with gradients
            (none requires grad, or the loss reaches none); the loss is not a
            scalar or is not finite at the starting point; ``batches`` is empty.
        TypeError: ``loss_fn`` returns something other than a tensor.

    References:
        Zhang, He, Sra & Jadbabaie, *Why gradient clipping accelerates
        training: a theoretical justification for adaptivity*, ICLR 2020
        (arXiv:1905.11881).
    """
    steps = _check_steps(steps)
    if (isinstance(power_iters, bool) or not isinstance(power_iters, numbers.Integral)
            or power_iters < 0):
        raise ValueError(f"power_iters must be an int >= 0, got {power_iters!r}")
    radius = _check_positive(radius, "radius")
    step_scale = _check_positive(step_scale, "step_scale")
    if isinstance(trim, bool) or not isinstance(trim, numbers.Real) or not 0.0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim!r}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(model, batch), got {loss_fn!r}")
    if optimizer is not None and (isinstance(optimizer, torch.optim.Optimizer)
                                  or not callable(optimizer)):
        raise TypeError("optimizer must be a callable optimizer(params) -> Optimizer (e.g. "
                        "lambda p: torch.optim.SGD(p, lr=0.1)), not an optimizer instance: "
                        "estimate_smoothness builds its own on a copy of the model; "
                        f"got {optimizer!r}")
    _trainable(model)
    data = _take_batches(batches, steps)

    with torch.random.fork_rng(devices=_cuda_devices(model)):
        work = copy.deepcopy(model)
        params = _trainable(work)
        opt = optimizer(params) if optimizer is not None else None
        gen = torch.Generator().manual_seed(seed)
        norms, smooth, losses = [], [], []
        prev_dir: Optional[Tensor] = None
        bar = _progress(steps, progress, 50, "estimate_smoothness")

        def gradient(t: int, batch, where: str) -> tuple[float, Tensor]:
            torch.manual_seed(seed + t)
            for p in params:
                p.grad = None
            with torch.enable_grad():
                loss = loss_fn(work, batch)
                value = _check_loss(loss, where)
                if not loss.requires_grad:
                    raise ValueError(
                        "the model has no parameters with gradients: the loss does not "
                        f"depend on any parameter that requires grad ({where})"
                    )
                loss.reshape(()).backward()
            if all(p.grad is None for p in params):
                raise ValueError(
                    f"the model has no parameters with gradients: backward gave none ({where})")
            return value, _flat_grad(params)

        try:
            for t in range(steps):
                batch = data[t % len(data)]
                where = "at the starting point" if t == 0 else f"at trajectory step {t}"
                loss, g = gradient(t, batch, where)
                if not math.isfinite(loss) or not bool(torch.isfinite(g).all()):
                    if t == 0:
                        raise ValueError(f"the loss or its gradient is not finite at the starting "
                                         f"point (loss {loss})")
                    warnings.warn(f"estimate_smoothness: the loss became non-finite at trajectory "
                                  f"step {t}; the fit uses the {t} points before it")
                    break
                base = [p.detach().clone() for p in params]
                x_norm = float(_flat_params(params).norm())
                eps = radius * max(x_norm, 1.0)
                g_norm = float(g.norm())
                # the first direction: the gradient's plus the last top-curvature direction
                d = g / g_norm if g_norm > 0 else torch.zeros_like(g)
                if prev_dir is None:
                    prev_dir = torch.randn(g.numel(), generator=gen,
                                           dtype=torch.float64).to(g.device)
                d = d + prev_dir / prev_dir.norm()
                best, best_dir = 0.0, prev_dir
                for _ in range(1 + int(power_iters)):
                    dn = float(d.norm())
                    if not dn > 0:
                        break
                    _set_params(params, base, d / dn, eps)
                    moved = _flat_params(params) - _flat_params(base)
                    dist = float(moved.norm())
                    if dist == 0.0:
                        raise ValueError(
                            f"radius {radius} is too small for the parameters' precision: "
                            "the nearby point rounds to the same parameters")
                    _, g2 = gradient(t, batch, where)
                    hv = (g2 - g) / dist
                    ratio = float(hv.norm())
                    if math.isfinite(ratio) and ratio > best:
                        best, best_dir = ratio, hv
                    d = hv
                _set_params(params, base, None, 0.0)
                prev_dir = best_dir
                norms.append(g_norm)
                smooth.append(best)
                losses.append(loss)
                if bar is not None:
                    bar.update(1)
                if t == steps - 1:
                    break
                # the step to the next point
                if opt is None:
                    if best > 0:
                        _set_params(params, base, g, -step_scale / best)
                else:
                    offset = 0
                    for p in params:
                        n = p.numel()
                        p.grad = g[offset:offset + n].view_as(p).to(p.device, p.dtype)
                        offset += n
                    opt.step()
                    opt.zero_grad()
        finally:
            if bar is not None:
                bar.close()

    if len(norms) < 2:
        raise ValueError(
            "estimate_smoothness needs at least 2 trajectory points with a finite loss")
    l0, l1 = fit_envelope(norms, smooth, trim=trim)
    threshold = math.inf if l1 == 0 else l0 / l1
    return SmoothnessEstimate(L0=l0, L1=l1, threshold=threshold, grad_norms=norms,
                              smoothness=smooth, losses=losses, trim=float(trim))


# -- find_lr ---------------------------------------------------------------------------
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
        import matplotlib as mpl

        _check_plot_target(path, axes)
        if axes is None:
            fig = _new_figure(11.5)
            left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
            if title:
                fig.suptitle(title)
        else:
            left, right = axes
            fig = (left if left is not None else right).figure
        lrs = [p.lr for p in self.probes]
        if left is not None:
            norm = mpl.colors.LogNorm(vmin=min(lrs), vmax=max(lrs) * (1 + 1e-9))
            cmap = mpl.colormaps["plasma"]
            for p in sorted(self.probes, key=lambda q: q.lr):
                style = "-" if p.stable else ":"
                shown = [v for v in p.losses if math.isfinite(v) and v > 0]
                left.plot(range(len(shown)), shown, style, color=cmap(norm(p.lr)),
                          label=f"lr={p.lr:.3g} ({p.status})")
            left.set_yscale("log")
            left.set_xlabel("probe step")
            left.set_ylabel("training loss")
            left.set_title(f"find_lr probes, {self.optimizer} (dotted: not stable)")
            left.legend(fontsize=7, loc="best")
            left.grid(True, which="both", alpha=0.3)
        if right is not None:
            for status, marker, color in (("stable", "o", "C2"), ("unstable", "s", "C1"),
                                          ("diverged", "x", "C3")):
                pts = [(p.lr, p.after / p.before if p.before and math.isfinite(p.after) else None)
                       for p in self.probes if p.status == status]
                shown = [(lr, r) for lr, r in pts if r is not None and r > 0]
                if shown:
                    right.scatter([lr for lr, _ in shown], [r for _, r in shown], marker=marker,
                                  color=color, label=status, zorder=3)
                for lr, r in pts:
                    if r is None or r <= 0:
                        right.axvline(lr, color=color, lw=1, alpha=0.6)
            right.axvline(self.edge, color="k", ls="--", lw=1, label=f"edge {self.edge:.3g}")
            right.axvline(self.lr, color="C0", lw=2, label=f"suggestion {self.lr:.3g}")
            right.axhline(1.0, color="grey", lw=0.8)
            right.set_xscale("log")
            right.set_yscale("log")
            right.set_xlabel("learning rate")
            right.set_ylabel("loss after probe / loss before")
            right.set_title("progress per probe (vertical lines: diverged)")
            right.legend(fontsize=8, loc="best")
            right.grid(True, which="both", alpha=0.3)
        if path is not None:
            fig.savefig(path, dpi=110)


# The conventional first learning rate of an optimizer family, as the
# practitioners' guides give it (SGD: 1e-2 to 1e-1 with momentum).
_CONVENTIONAL_LR = (("adam", 1e-3), ("adagrad", 1e-2), ("sgd", 1e-2))


def _conventional_lr(optimizer_cls) -> float:
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
    steps = _check_steps(steps)
    if optimizer_cls is None:
        from fusedclip.optim import FusedClipAdamW

        optimizer_cls = FusedClipAdamW
    if not callable(optimizer_cls):
        raise TypeError(f"optimizer_cls must be an optimizer class, got {optimizer_cls!r}")
    kwargs = dict(optimizer_kwargs or {})
    if "lr" in kwargs:
        raise ValueError("optimizer_kwargs must not hold lr: find_lr chooses it")
    min_lr = _check_positive(min_lr, "min_lr")
    max_lr = _check_positive(max_lr, "max_lr")
    if min_lr > max_lr:
        raise ValueError(f"min_lr ({min_lr}) must be <= max_lr ({max_lr})")
    if lr0 is None:
        lr0 = _conventional_lr(optimizer_cls) if isinstance(optimizer_cls, type) else 1e-3
    lr0 = min(max(_check_positive(lr0, "lr0"), min_lr), max_lr)
    resolution = _check_positive(resolution, "resolution")
    if not resolution > 1:
        raise ValueError(f"resolution must be > 1, got {resolution}")
    safety = _check_positive(safety, "safety")
    if safety < 1:
        raise ValueError(f"safety must be >= 1, got {safety}")
    rise = _check_positive(rise, "rise")
    if (isinstance(eval_batches, bool) or not isinstance(eval_batches, numbers.Integral)
            or eval_batches < 1):
        raise ValueError(f"eval_batches must be an int >= 1, got {eval_batches!r}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(model, batch), got {loss_fn!r}")
    _trainable(model)
    data = _take_batches(batches, steps)
    evals = data[:eval_batches]
    name = getattr(optimizer_cls, "__name__", repr(optimizer_cls))

    probes: list[LRProbe] = []
    with torch.random.fork_rng(devices=_cuda_devices(model)):

        def evaluate(work, where: str) -> float:
            torch.manual_seed(seed + 1)
            with torch.no_grad():
                values = [_check_loss(loss_fn(work, b), where) for b in evals]
            return sum(values) / len(values)

        # The starting point's checks (and the loss every probe starts from).
        start = copy.deepcopy(model)
        before = evaluate(start, "at the start")
        if not math.isfinite(before):
            raise ValueError(f"the loss is not finite at the start ({before})")
        del start

        def probe(lr: float) -> LRProbe:
            work = copy.deepcopy(model)
            params = _trainable(work)
            opt = optimizer_cls(params, lr=lr, **kwargs)
            torch.manual_seed(seed)
            losses: list[float] = []
            status = "stable"
            bar = _progress(steps, progress, 50, f"find_lr lr={lr:.3g}")
            try:
                for t in range(steps):
                    opt.zero_grad(set_to_none=True)
                    where = "at the start" if not probes and t == 0 else f"in the probe lr={lr:g}"
                    with torch.enable_grad():
                        loss = loss_fn(work, data[t % len(data)])
                        value = _check_loss(loss, where)
                        if not probes and t == 0 and not loss.requires_grad:
                            raise ValueError("the model has no parameters with gradients: the loss "
                                             "does not depend on any parameter that requires grad")
                    losses.append(value)
                    if not math.isfinite(value):
                        status = "diverged"
                        break
                    loss.reshape(()).backward()
                    if not probes and t == 0 and all(p.grad is None for p in params):
                        raise ValueError("the model has no parameters with gradients: backward "
                                         "gave none")
                    opt.step()
                    if bar is not None:
                        bar.update(1)
            finally:
                if bar is not None:
                    bar.close()
            after = math.nan
            if status == "stable":
                after = evaluate(work, f"after the probe lr={lr:g}")
                limit = before + rise * max(abs(before), 1e-12)
                if not math.isfinite(after):
                    status = "diverged"
                elif not after < before or max(losses) > limit:
                    status = "unstable"
            result = LRProbe(lr=lr, losses=losses, before=before, after=after, status=status)
            probes.append(result)
            return result

        # Bracket the edge of stability by factors of 10 from lr0 ...
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
        if stable_lr is None:
            raise RuntimeError(
                f"find_lr: no stable probe down to min_lr={min_lr:g} with {name}; the "
                "loss may be ill-defined, or the optimizer unstable at any step size")
        # ... then halve the bracket in log scale.
        if unstable_lr is None:
            warnings.warn(f"find_lr: every probe up to max_lr={max_lr:g} was stable; the edge of "
                          "stability lies above it")
        else:
            while unstable_lr / stable_lr > resolution * (1 + 1e-9):
                mid = math.sqrt(stable_lr * unstable_lr)
                if probe(mid).stable:
                    stable_lr = mid
                else:
                    unstable_lr = mid

    return LRSuggestion(lr=stable_lr / safety, edge=stable_lr, probes=probes, optimizer=name,
                        safety=safety)

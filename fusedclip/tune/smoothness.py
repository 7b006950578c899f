r"""The :math:`(L_0, L_1)` smoothness estimate: :func:`estimate_smoothness`
measures the local smoothness against the gradient norm along a short
trajectory and fits the envelope :math:`L_0 + L_1 n`; its result suggests a
clip threshold :math:`L_0/L_1` and a step size :math:`1/L_0`."""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor

from fusedclip._validate import int_arg
from fusedclip.clipping import GlobalNorm, Normalize, SmoothClip
from fusedclip.tune._common import (
    check_count, check_loss, check_loss_fn, check_plot_target, check_positive, check_trim,
    cuda_devices, new_figure, progress_bar, take_batches, trainable,
)
from fusedclip.tune.envelope import fit_envelope

__all__ = ["SmoothnessEstimate", "SmoothnessSuggestion", "estimate_smoothness"]


# -- the result --------------------------------------------------------------------------
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
        check_plot_target(path, ax)
        if ax is None:
            fig = new_figure(6.4)
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


# -- flat vectors of the parameters ------------------------------------------------------
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
    """The parameters as one float64 vector on the first one's device."""
    device = params[0].device
    return torch.cat([p.detach().reshape(-1).to(device=device, dtype=torch.float64)
                      for p in params])


def _set_grads(params: list[Tensor], flat: Tensor) -> None:
    """Each parameter's ``.grad`` from its slice of the flat vector ``flat``."""
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.device, p.dtype)
        offset += n


# -- the trajectory ----------------------------------------------------------------------
class _Walk:
    """The model's copy on its trajectory: its gradients, the local smoothness
    measured around a point, and the step to the next point."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable, optimizer: Optional[Callable],
                 *, power_iters: int, radius: float, step_scale: float, seed: int) -> None:
        self.model = copy.deepcopy(model)
        self.params = trainable(self.model)
        self.opt = optimizer(self.params) if optimizer is not None else None
        self.loss_fn = loss_fn
        self.power_iters, self.radius, self.step_scale = power_iters, radius, step_scale
        self.seed = seed
        self.gen = torch.Generator().manual_seed(seed)  # the first direction's

    def gradient(self, t: int, batch, where: str) -> tuple[float, Tensor]:
        """The loss and the flat float64 gradient at the current parameters,
        with the RNG seeded as at every evaluation of point ``t``."""
        torch.manual_seed(self.seed + t)
        for p in self.params:
            p.grad = None
        with torch.enable_grad():
            loss = self.loss_fn(self.model, batch)
            value = check_loss(loss, where)
            if not loss.requires_grad:
                raise ValueError(
                    "the model has no parameters with gradients: the loss does not "
                    f"depend on any parameter that requires grad ({where})"
                )
            loss.reshape(()).backward()
        if all(p.grad is None for p in self.params):
            raise ValueError(
                f"the model has no parameters with gradients: backward gave none ({where})")
        return value, _flat_grad(self.params)

    def smoothness(self, t: int, batch, where: str, base: list[Tensor], g: Tensor,
                   g_norm: float, prev_dir: Optional[Tensor]) -> tuple[float, Tensor]:
        """The local smoothness at ``base`` (gradient ``g``): the largest
        ratio over the power iterations, and its direction (the next point's
        start). The parameters are back at ``base`` afterwards."""
        eps = self.radius * max(float(_flat_params(self.params).norm()), 1.0)
        # the first direction: the gradient's plus the last top-curvature direction
        d = g / g_norm if g_norm > 0 else torch.zeros_like(g)
        if prev_dir is None:
            prev_dir = torch.randn(g.numel(), generator=self.gen,
                                   dtype=torch.float64).to(g.device)
        d = d + prev_dir / prev_dir.norm()
        best, best_dir = 0.0, prev_dir
        for _ in range(1 + self.power_iters):
            dn = float(d.norm())
            if not dn > 0:
                break
            hv = self._curvature_along(t, batch, where, base, g, d / dn, eps)
            ratio = float(hv.norm())
            if math.isfinite(ratio) and ratio > best:
                best, best_dir = ratio, hv
            d = hv
        _set_params(self.params, base, None, 0.0)
        return best, best_dir

    def _curvature_along(self, t: int, batch, where: str, base: list[Tensor], g: Tensor,
                         direction: Tensor, eps: float) -> Tensor:
        """``(gradient at base + eps * direction - g) / distance``: the Hessian
        times ``direction``, by a finite difference on the same batch."""
        _set_params(self.params, base, direction, eps)
        moved = _flat_params(self.params) - _flat_params(base)
        dist = float(moved.norm())
        if dist == 0.0:
            raise ValueError(
                f"radius {self.radius} is too small for the parameters' precision: "
                "the nearby point rounds to the same parameters")
        _, g2 = self.gradient(t, batch, where)
        return (g2 - g) / dist

    def step(self, base: list[Tensor], g: Tensor, smoothness: float) -> None:
        """To the next point: the locally safe gradient step from ``base``, or
        one step of the optimizer with the gradient ``g``."""
        if self.opt is None:
            if smoothness > 0:
                _set_params(self.params, base, g, -self.step_scale / smoothness)
        else:
            _set_grads(self.params, g)
            self.opt.step()
            self.opt.zero_grad()


def _finite(t: int, loss: float, g: Tensor) -> bool:
    """Whether point ``t`` has a finite loss and gradient; a non-finite one
    ends the trajectory with a warning, or is an error at the start."""
    if math.isfinite(loss) and bool(torch.isfinite(g).all()):
        return True
    if t == 0:
        raise ValueError(f"the loss or its gradient is not finite at the starting "
                         f"point (loss {loss})")
    warnings.warn(f"estimate_smoothness: the loss became non-finite at trajectory "
                  f"step {t}; the fit uses the {t} points before it")
    return False


def _trajectory(walk: _Walk, data: list, steps: int,
                progress: Optional[bool]) -> tuple[list[float], list[float], list[float]]:
    """Walks ``steps`` points (fewer if the loss turns non-finite) and returns
    their gradient norms, local smoothness and losses."""
    norms, smooth, losses = [], [], []
    prev_dir: Optional[Tensor] = None
    bar = progress_bar(steps, progress, 50, "estimate_smoothness")
    try:
        for t in range(steps):
            batch = data[t % len(data)]
            where = "at the starting point" if t == 0 else f"at trajectory step {t}"
            loss, g = walk.gradient(t, batch, where)
            if not _finite(t, loss, g):
                break
            base = [p.detach().clone() for p in walk.params]
            g_norm = float(g.norm())
            best, prev_dir = walk.smoothness(t, batch, where, base, g, g_norm, prev_dir)
            norms.append(g_norm)
            smooth.append(best)
            losses.append(loss)
            if bar is not None:
                bar.update(1)
            if t < steps - 1:
                walk.step(base, g, best)
    finally:
        if bar is not None:
            bar.close()
    return norms, smooth, losses


# -- the tool ----------------------------------------------------------------------------
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
    steps = int_arg(steps, "steps", minimum=2)
    power_iters = check_count(power_iters, "power_iters", 0)
    radius = check_positive(radius, "radius")
    step_scale = check_positive(step_scale, "step_scale")
    check_trim(trim)
    check_loss_fn(loss_fn)
    _check_optimizer_factory(optimizer)
    trainable(model)
    data = take_batches(batches, steps)
    with torch.random.fork_rng(devices=cuda_devices(model)):
        walk = _Walk(model, loss_fn, optimizer, power_iters=power_iters, radius=radius,
                     step_scale=step_scale, seed=seed)
        norms, smooth, losses = _trajectory(walk, data, steps, progress)
    if len(norms) < 2:
        raise ValueError(
            "estimate_smoothness needs at least 2 trajectory points with a finite loss")
    l0, l1 = fit_envelope(norms, smooth, trim=trim)
    threshold = math.inf if l1 == 0 else l0 / l1
    return SmoothnessEstimate(L0=l0, L1=l1, threshold=threshold, grad_norms=norms,
                              smoothness=smooth, losses=losses, trim=float(trim))


def _check_optimizer_factory(optimizer) -> None:
    if optimizer is not None and (isinstance(optimizer, torch.optim.Optimizer)
                                  or not callable(optimizer)):
        raise TypeError("optimizer must be a callable optimizer(params) -> Optimizer (e.g. "
                        "lambda p: torch.optim.SGD(p, lr=0.1)), not an optimizer instance: "
                        "estimate_smoothness builds its own on a copy of the model; "
                        f"got {optimizer!r}")

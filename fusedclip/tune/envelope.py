r"""The :math:`(L_0, L_1)` envelope: the line :math:`L_0 + L_1 n` fitted above
measured (gradient norm, local smoothness) points, as a linear programme in two
variables, made robust to a few outliers by trimming."""

from __future__ import annotations

import math
from typing import Optional

from fusedclip.tune._common import check_trim

__all__ = ["fit_envelope"]


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


def _valid_points(grad_norms, smoothness) -> tuple[list[float], list[float]]:
    """The points with a finite norm >= 0 and a finite smoothness > 0, as two
    lists of floats (at least one point)."""
    x, y = [], []
    for n, s in zip(grad_norms, smoothness):
        n, s = float(n), float(s)
        if math.isfinite(n) and n >= 0 and math.isfinite(s) and s > 0:
            x.append(n)
            y.append(s)
    if not x:
        raise ValueError(
            "fit_envelope: no point with a finite norm and a positive finite smoothness")
    return x, y


def _most_lifting_point(x: list[float], y: list[float]) -> Optional[int]:
    """Among the points the envelope touches, the one whose removal lowers it
    most (its cost over the points kept); None if it touches none."""
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
    return best_k


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
    check_trim(trim)
    x, y = _valid_points(grad_norms, smoothness)
    for _ in range(int(math.floor(trim * len(x)))):
        k = _most_lifting_point(x, y)
        if k is None:
            break
        del x[k], y[k]
    return _envelope_lp(x, y)

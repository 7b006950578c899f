"""Clip policies: their arguments, and how norms become clip coefficients.

A policy never touches gradients itself. The optimizer's norm pass measures the
gradients once (``fusedclip.ops.multi_tensor_norm``); the policy turns those
norms into a coefficient with device tensor math only (no ``.item()``, no
Python branch on a device value); the update pass multiplies each gradient by
that coefficient as it reads it.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

__all__ = ["ClipPolicy", "GlobalNorm", "as_policy"]

# The epsilon torch.nn.utils.clip_grad_norm_ adds to the norm.
CLIP_GRAD_NORM_EPS = 1e-6


def _real_number(value, name: str, policy: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{policy}: {name} must be a real number, got {value!r}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{policy}: {name} must not be NaN")
    return value


def _norm_type(value, policy: str) -> float:
    if isinstance(value, str) and value.lower() == "inf":
        return math.inf
    value = _real_number(value, "norm_type", policy)
    if value not in (2.0, math.inf):
        raise ValueError(f"{policy}: norm_type must be 2.0 or inf, got {value}")
    return value


class ClipPolicy:
    """Base class of the clip policies.

    A policy declares which norm its coefficient needs (``norm_type``) and maps
    the pre-clip global norm to a clip coefficient tensor.
    """

    norm_type: float = 2.0

    def coefficient(self, total_norm: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class GlobalNorm(ClipPolicy):
    r"""Clips all gradients together by their global norm, exactly as
    :func:`torch.nn.utils.clip_grad_norm_` does.

    .. math::
        c = \min\Big(1, \frac{\text{max\_norm}}{\lVert g \rVert_p + 10^{-6}}\Big),
        \qquad g \leftarrow c\, g

    where :math:`\lVert g \rVert_p` is the norm of all gradients of all parameter
    groups together. Empty gradients add nothing (for ``p = inf`` too, where
    torch itself raises).

    Args:
        max_norm (float): the largest global norm the clipped gradients may have.
        norm_type (float, optional): 2.0 or ``inf`` (default: 2.0)

    References:
        Pascanu, Mikolov & Bengio, *On the difficulty of training recurrent
        neural networks*, ICML 2013.
    """

    def __init__(self, max_norm: float, norm_type: float = 2.0) -> None:
        self.max_norm = _real_number(max_norm, "max_norm", "GlobalNorm")
        if self.max_norm < 0:
            raise ValueError(f"GlobalNorm: max_norm must be >= 0, got {self.max_norm}")
        self.norm_type = _norm_type(norm_type, "GlobalNorm")

    def coefficient(self, total_norm: Tensor) -> Tensor:
        return torch.clamp(self.max_norm / (total_norm + CLIP_GRAD_NORM_EPS), max=1.0)

    def __repr__(self) -> str:
        return f"GlobalNorm(max_norm={self.max_norm}, norm_type={self.norm_type})"


def as_policy(clip) -> ClipPolicy | None:
    """The policy a ``clip=`` argument names: ``None``, a max_norm, or a policy."""
    if clip is None or isinstance(clip, ClipPolicy):
        return clip
    if isinstance(clip, bool) or not isinstance(clip, numbers.Real):
        raise TypeError(
            "clip must be None, a float max_norm (global L2 norm) or a fusedclip "
            f"policy such as fusedclip.GlobalNorm(1.0); got {clip!r}"
        )
    return GlobalNorm(float(clip))

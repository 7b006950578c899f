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
from dataclasses import dataclass

import torch
from torch import Tensor

# Argument checks shared with fusedclip.tune; each policy passes its name, which
# prefixes the message ("ZClip: alpha must ...").
from fusedclip._validate import (
    int_arg as _int_arg, positive as _positive, real_number as _real_number,
)
from fusedclip import ops

__all__ = [
    "AGC", "AdaGC", "AutoClip", "ClipInputs", "ClipPolicy", "ClipResult", "Elementwise",
    "Chain", "GlobalNorm", "Normalize", "PerTensorNorm", "SmoothClip", "SpikeClip", "ValueClip",
    "ZClip", "as_policy",
]

# The epsilon torch.nn.utils.clip_grad_norm_ adds to the norm.
CLIP_GRAD_NORM_EPS = 1e-6


def _norm_type(value, policy: str) -> float:
    if isinstance(value, str) and value.lower() == "inf":
        return math.inf
    value = _real_number(value, "norm_type", policy)
    if value not in (2.0, math.inf):
        raise ValueError(f"{policy}: norm_type must be 2.0 or inf, got {value}")
    return value


@dataclass
class ClipInputs:
    """What the optimizer hands a policy in each step (see ``ClipPolicy.clip``).

    Attributes:
        total_norm (Tensor): the pre-clip global norm of all gradients (0-d, on
            the first gradient's device; already divided by a GradScaler's scale).
        tensor_norms (list of Tensor or None): for policies of scope "tensor", the
            norm of each gradient, one 1-D tensor per norm bucket (gradients of
            one device and dtype, in parameter-group order), on that bucket's
            device; ``None`` for global policies.
        state (dict): the policy's own state (device tensors, as
            ``init_state`` made them and earlier steps left them), kept by the
            optimizer and saved in its state_dict. Read it; never write it: the
            new values go into ``ClipResult.state``.
        tensor_states (list of list of dict, or None): for policies that
            ``keeps_tensor_state``, one state dict per gradient (as
            ``init_tensor_state`` made it), laid out like ``tensor_norms``;
            each belongs to its parameter and travels with it through
            state_dict save and load. Read only, as ``state``.
        unit_norms (list of Tensor or None): for policies of scope "unit", the norm
            of every unit of every gradient, one 1-D tensor per norm bucket
            holding the units of its gradients one gradient after the other
            (a unit is an index of dim 0; a 0-d or 1-d gradient is one unit;
            see ``fusedclip.ops.unit_counts``); ``None`` otherwise.
        param_unit_norms (list of Tensor or None): the same for the parameters
            (measured before the update), for policies with ``reads_params``.
        unit_counts (list of list of int, or None): for policies of scope
            "unit", per norm bucket the number of units of each gradient
            (how ``unit_norms`` splits into gradients); ``None`` otherwise.
    """

    total_norm: Tensor
    tensor_norms: list[Tensor] | None = None
    state: dict | None = None
    tensor_states: list[list[dict]] | None = None
    unit_norms: list[Tensor] | None = None
    param_unit_norms: list[Tensor] | None = None
    unit_counts: list[list[int]] | None = None


@dataclass(frozen=True)
class Elementwise:
    """An element-wise transform the update op applies to every gradient
    element as it reads it, after the coefficients and a GradScaler's unscale
    (csrc/include/fusedclip/grad_transform.h).

    Attributes:
        clip_value (float or None): clamp to ``[-clip_value, clip_value]``.
        spike_theta (float or None): where ``g**2 > theta * v`` (``v`` the
            optimizer's second moment before this step's update),
            ``g = sign(g) * sqrt(theta * v)``; elements with ``v = 0`` pass.
    """

    clip_value: float | None = None
    spike_theta: float | None = None


@dataclass
class ClipResult:
    """What a policy's ``clip`` returns.

    Attributes:
        coef (Tensor, list of Tensor or None): the clip coefficient: 0-d for
            scope "global", one 1-D tensor per norm bucket for scopes "tensor"
            and "unit" (laid out like ``tensor_norms`` or ``unit_norms``),
            None where there is none.
        elementwise (Elementwise or None): an element-wise transform.
        state (dict or None): the policy's state after this step, a new tensor
            for each key of ``ClipInputs.state`` (None: stateless).
        tensor_states (list of list of dict, or None): the same per gradient,
            laid out like ``ClipInputs.tensor_states``.

    The optimizer, not the policy, writes the new state, and only where the
    step is not skipped (non-finite gradients, a GradScaler's inf): the skip
    rule is applied once, for every policy.
    """

    coef: Tensor | list[Tensor] | None = None
    elementwise: Elementwise | None = None
    state: dict | None = None
    tensor_states: list[list[dict]] | None = None


def keep_if_skipped(skip: Tensor | None, old: Tensor, new: Tensor) -> Tensor:
    """``new``, or ``old`` where the step is skipped: device math, no sync."""
    if skip is None:
        return new
    return torch.where(skip.to(new.device, non_blocking=True) != 0, old, new)


def commit_state(states: list[dict], new_states: list[dict], skip: Tensor | None) -> None:
    """Makes each dict of ``new_states`` the value of its dict of ``states``,
    except where the step is skipped: device math, no sync.

    Eagerly (and while a CUDA graph is captured) the values are written into
    the existing tensors with one ``torch._foreach_copy_``, so a tensor taken
    from the state stays current. Under torch.compile the dicts get the new
    tensors instead: writing into the state tensors there is not safe in torch
    2.13 (``copy_`` into a 0-d float64 graph input is dropped, and inductor
    recomputed ZClip's variance from the already-updated mean), while a dict
    update is replayed by dynamo exactly.
    """
    olds, news = [], []
    for state, new_state in zip(states, new_states):
        for key, value in new_state.items():
            old = state[key]
            olds.append(old)
            news.append(keep_if_skipped(skip, old, value.to(old.dtype)))
    if not olds:
        return
    if torch.compiler.is_compiling():
        values = iter(news)
        for state, new_state in zip(states, new_states):
            for key in new_state:
                state[key] = next(values)
    else:
        torch._foreach_copy_(olds, news)


SCOPES = ("global", "tensor", "unit", "element")


class ClipPolicy:
    """Base class of the clip policies.

    A policy declares what it needs, and returns what it decides:

    - ``norm_type``: the norm its coefficients are of (2.0 or inf);
    - ``scope``: ``"global"`` (one coefficient from the global norm),
      ``"tensor"`` (one per gradient, from ``tensor_norms``), ``"unit"`` (one
      per index of dim 0, from ``unit_norms``) or ``"element"`` (no norm at
      all: an element-wise transform only);
    - ``reads_params``: it also needs the unit norms of the parameters;
    - ``reads_state``: the optimizer state key it reads element by element
      in the update (through ``Elementwise``), or None; an optimizer that keeps
      no such state refuses the policy;
    - its state: ``init_state`` (its own) and ``init_tensor_state`` (per
      parameter, for policies that ``keeps_tensor_state``: by default those of
      scope "tensor"), made by the optimizer before the first step.

    ``clip`` gets a :class:`ClipInputs` once per step and returns a
    :class:`ClipResult` (coefficients, an element-wise transform, the next
    state) with device tensor math only: no ``.item()``, no Python branch on a
    device value, no change to its inputs. The optimizer keeps the next state
    unless the step is skipped. Stateless global policies only implement
    :meth:`coefficient`.
    """

    norm_type: float = 2.0
    scope: str = "global"
    reads_params: bool = False
    reads_state: str | None = None

    @property
    def needs_norms(self) -> bool:
        """Whether the coefficients need the norm pass (one with scope
        "element" still gets it where the optimizer needs the non-finite flag,
        nonfinite != "propagate")."""
        return self.scope != "element"

    @property
    def keeps_tensor_state(self) -> bool:
        """Whether the policy keeps state per parameter (``init_tensor_state``,
        ``ClipInputs.tensor_states``): by default, policies of scope "tensor"."""
        return self.scope == "tensor"

    #: Whether the policy computes norms of a coarser scope from finer ones
    #: itself (a global norm from tensor norms, say). Such norms are of this
    #: process's gradients only, so an optimizer whose norms are reduced across
    #: processes (DTensor parameters, ``norm_group``) refuses the policy.
    derives_norms: bool = False

    def init_state(self, device: torch.device) -> dict:
        """The policy's state before its first step."""
        return {}

    def init_tensor_state(self, norm_dtype: torch.dtype, device: torch.device) -> dict:
        """One parameter's state before its first step (scope "tensor");
        ``norm_dtype`` is the dtype of that parameter's gradient norms."""
        return {}

    def coefficient(self, total_norm: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def clip(self, inputs: ClipInputs) -> ClipResult:
        return ClipResult(coef=self.coefficient(inputs.total_norm))


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


def _norm_coefficient(max_norm, norm: Tensor) -> Tensor:
    """clip_grad_norm_'s coefficient min(1, max_norm / (norm + 1e-6))."""
    return torch.clamp(max_norm / (norm + CLIP_GRAD_NORM_EPS), max=1.0)


class PerTensorNorm(ClipPolicy):
    r"""Clips each gradient by its own norm, as
    :func:`torch.nn.utils.clip_grad_norm_` called on each parameter alone would.

    .. math::
        c_i = \min\Big(1, \frac{\text{max\_norm}}{\lVert g_i \rVert_p + 10^{-6}}\Big),
        \qquad g_i \leftarrow c_i\, g_i

    for every parameter :math:`i` with a gradient. ``opt.clip_stats`` then
    holds ``tensor_norms`` and a per-tensor ``clip_coef`` (1-D, in the order of
    the parameters that have gradients, group by group).

    Args:
        max_norm (float): the largest norm each clipped gradient may have.
        norm_type (float, optional): 2.0 or ``inf`` (default: 2.0)

    References:
        Pascanu, Mikolov & Bengio, *On the difficulty of training recurrent
        neural networks*, ICML 2013.
    """

    scope = "tensor"

    def __init__(self, max_norm: float, norm_type: float = 2.0) -> None:
        self.max_norm = _positive(max_norm, "max_norm", "PerTensorNorm", allow_zero=True)
        self.norm_type = _norm_type(norm_type, "PerTensorNorm")

    def clip(self, inputs: ClipInputs) -> ClipResult:
        return ClipResult(coef=[_norm_coefficient(self.max_norm, norms)
                                for norms in inputs.tensor_norms])

    def __repr__(self) -> str:
        return f"PerTensorNorm(max_norm={self.max_norm}, norm_type={self.norm_type})"


class SmoothClip(ClipPolicy):
    r"""Smoothed clipping for :math:`(L_0, L_1)`-smooth objectives.

    .. math::
        c = \frac{\tau}{\tau + \lVert g \rVert_2}, \qquad g \leftarrow c\, g

    with :math:`\tau` = ``threshold`` :math:`= L_0 / L_1`: about 1 for small
    gradients and about :math:`\tau / \lVert g \rVert` (clipping to norm
    :math:`\tau`) for large ones, without the kink of :math:`\min(1, \cdot)`.

    Args:
        threshold (float): :math:`\tau > 0`, the norm at which the coefficient is 1/2.

    References:
        Zhang, He, Sra & Jadbabaie, *Why gradient clipping accelerates
        training: a theoretical justification for adaptivity*, ICLR 2020.
    """

    def __init__(self, threshold: float) -> None:
        self.threshold = _positive(threshold, "threshold", "SmoothClip")

    def coefficient(self, total_norm: Tensor) -> Tensor:
        return self.threshold / (self.threshold + total_norm)

    def __repr__(self) -> str:
        return f"SmoothClip(threshold={self.threshold})"


class Normalize(ClipPolicy):
    r"""Normalized gradients (normalized SGD): every step uses the direction of
    the gradient only.

    .. math::
        c = \frac{1}{\lVert g \rVert_2 + \epsilon}, \qquad g \leftarrow c\, g

    Args:
        eps (float, optional): :math:`\epsilon > 0`, keeps a zero gradient finite
            (default: 1e-6)

    References:
        Hazan, Levy & Shalev-Shwartz, *Beyond convexity: stochastic
        quasi-convex optimization*, NeurIPS 2015.
        Cutkosky & Mehta, *Momentum improves normalized SGD*, ICML 2020.
    """

    def __init__(self, eps: float = 1e-6) -> None:
        self.eps = _positive(eps, "eps", "Normalize")

    def coefficient(self, total_norm: Tensor) -> Tensor:
        return 1.0 / (total_norm + self.eps)

    def __repr__(self) -> str:
        return f"Normalize(eps={self.eps})"


class AutoClip(ClipPolicy):
    r"""AutoClip: clip to a percentile of the gradient norms seen so far.

    .. math::
        \begin{aligned}
            &H \leftarrow H \cup \{\lVert g_t \rVert_2\}
                \text{ (the last ``history`` norms)}                          \\
            &\eta_t = \operatorname{percentile}_p(H) \text{ (linear interpolation,
                as numpy.percentile)}                                          \\
            &c = \min\Big(1, \frac{\eta_t}{\lVert g_t \rVert_2 + 10^{-6}}\Big),
                \qquad g \leftarrow c\, g
        \end{aligned}

    exactly as the paper's ``autoclip_gradient`` (``np.percentile`` of the
    history, then ``clip_grad_norm_``), except that the history is a device ring
    buffer holding at most ``history`` norms (the paper's list grows without
    bound). The history, its count and the percentile are kept and computed on
    the device (a sort of the buffer per step), in float64 like the paper's
    Python floats. A skipped step adds nothing to the history.

    Args:
        percentile (float, optional): :math:`p \in [0, 100]` (default: 10.0)
        history (int, optional): how many of the latest norms are kept, >= 1
            (default: 10000)

    References:
        Seetharaman, Wichern, Pardo & Le Roux, *AutoClip: Adaptive gradient
        clipping for source separation networks*, MLSP 2020.
    """

    def __init__(self, percentile: float = 10.0, history: int = 10000) -> None:
        self.percentile = _real_number(percentile, "percentile", "AutoClip")
        if not 0.0 <= self.percentile <= 100.0:
            raise ValueError(f"AutoClip: percentile must be in [0, 100], got {self.percentile}")
        self.history = _int_arg(history, "history", "AutoClip", 1)

    def init_state(self, device: torch.device) -> dict:
        return {
            "history": torch.zeros(self.history, dtype=torch.float64, device=device),
            "count": torch.zeros((), dtype=torch.int64, device=device),
            "threshold": torch.zeros((), dtype=torch.float64, device=device),  # for logs
        }

    def clip(self, inputs: ClipInputs) -> ClipResult:
        norm = inputs.total_norm.to(torch.float64)
        device, state = norm.device, inputs.state
        size = self.history
        buf, count = state["history"], state["count"]
        slot = torch.remainder(count, size).view(1)
        new_buf = buf.index_copy(0, slot, norm.view(1))
        n = torch.clamp(count + 1, max=size)  # norms in the history, >= 1
        valid = torch.arange(size, device=device) < n
        ordered = torch.sort(torch.where(valid, new_buf, math.inf)).values
        # numpy's "linear" method: virtual index (n - 1) q, lerp of its neighbours.
        last = n - 1
        virtual = last.to(torch.float64) * (self.percentile / 100.0)
        below = torch.floor(virtual)
        gamma = virtual - below
        lo = torch.clamp(below.to(torch.int64), max=last)
        hi = torch.clamp(lo + 1, max=last)
        a = ordered.gather(0, lo.view(1)).squeeze(0)
        b = ordered.gather(0, hi.view(1)).squeeze(0)
        diff = b - a
        threshold = torch.where(gamma >= 0.5, b - diff * (1 - gamma), a + diff * gamma)
        return ClipResult(
            coef=_norm_coefficient(threshold, norm),
            state={"history": new_buf, "count": count + 1, "threshold": threshold},
        )

    def __repr__(self) -> str:
        return f"AutoClip(percentile={self.percentile}, history={self.history})"


class ZClip(ClipPolicy):
    r"""ZClip: adaptive clipping by a z-score of the gradient norm against its
    exponential moving average (EMA), as ``zclip`` 1.0.0's ``ZClip.step``.

    Let :math:`n_t = \lVert g_t \rVert_2`.

    *Warm-up* (the first ``max(warmup_steps, 1)`` steps): clip as
    :func:`~torch.nn.utils.clip_grad_norm_` with ``max_norm`` (no clipping when
    ``max_norm`` is None) and collect :math:`n_t`; the last warm-up step sets
    :math:`\mu` and :math:`\sigma^2` to the mean and (population) variance of the
    collected norms.

    *Afterwards*, with :math:`\sigma = \sqrt{\sigma^2}`:

    .. math::
        \begin{aligned}
            &\textbf{zscore mode: } z = \frac{n_t - \mu}{\sigma + \epsilon}, \quad
                \text{spike} = z > z_{thr}, \quad
                \kappa = \begin{cases}
                    (\mu + z_{thr}\,\sigma / (z / z_{thr}))\cdot\text{clip\_factor}
                        & \text{adaptive\_scaling} \\
                    \mu & \text{mean} \end{cases}                              \\
            &\textbf{percentile mode: } \kappa = \mu + z_{thr}\,\sigma, \quad
                \text{spike} = n_t > \kappa                                     \\
            &m = \min(\text{spike} \;?\; \kappa : n_t,\ \text{max\_norm}), \qquad
                c = \begin{cases} m / (n_t + 10^{-6}) & n_t > m \\
                    1 & \text{otherwise} \end{cases}                           \\
            &x = \text{spike} \;?\; \kappa : n_t, \quad
                \textbf{unless } \text{spike and skip\_update\_on\_spike}: \\
            &\qquad \mu \leftarrow \alpha \mu + (1 - \alpha) x, \quad
                \sigma^2 \leftarrow \alpha \sigma^2 + (1 - \alpha)(x - \mu)^2
                \text{ (with the new } \mu\text{)}
        \end{aligned}

    zclip decides each case with Python branches on ``.item()`` of the norm;
    here every case is computed and chosen with ``torch.where`` on the device,
    and the warm-up norms are kept in a device buffer. The EMA state is float64,
    like zclip's Python floats. A skipped step changes no state.
    ``clip_factor`` multiplies the whole adaptive threshold, as zclip 1.0.0's
    code does (its docstring says only the :math:`z_{thr}\sigma` term).

    Args:
        alpha (float, optional): EMA factor in (0, 1) (default: 0.97)
        z_thresh (float, optional): z-score threshold, > 0 (default: 2.5)
        max_norm (float or None, optional): cap on the clipped norm, > 0, or
            None for none (zclip's ``max_grad_norm``) (default: 1.0)
        eps (float, optional): added to :math:`\sigma`, >= 0 (default: 1e-6)
        warmup_steps (int, optional): steps before the EMA starts, >= 0; 0 acts
            as 1, as in zclip (default: 25)
        mode (str, optional): ``"zscore"`` or ``"percentile"`` (default: "zscore")
        clip_option (str, optional): ``"adaptive_scaling"`` or ``"mean"``,
            zscore mode only (default: "adaptive_scaling")
        clip_factor (float, optional): > 0, see above (default: 1.0)
        skip_update_on_spike (bool, optional): leave the EMA alone in a step
            with a spike (default: False)

    References:
        Kumar, Owen, Ashraf & Kashyap, *ZClip: Adaptive spike mitigation for
        LLM pre-training*, arXiv:2504.02507, 2025.
    """

    def __init__(self, alpha: float = 0.97, z_thresh: float = 2.5, max_norm: float | None = 1.0,
                 eps: float = 1e-6, warmup_steps: int = 25, mode: str = "zscore",
                 clip_option: str = "adaptive_scaling", clip_factor: float = 1.0,
                 skip_update_on_spike: bool = False) -> None:
        name = "ZClip"
        self.alpha = _real_number(alpha, "alpha", name)
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"ZClip: alpha must be in (0, 1), got {self.alpha}")
        self.z_thresh = _positive(z_thresh, "z_thresh", name)
        self.max_norm = None if max_norm is None else _positive(max_norm, "max_norm", name)
        self.eps = _positive(eps, "eps", name, allow_zero=True)
        self.warmup_steps = _int_arg(warmup_steps, "warmup_steps", name, 0)
        if not isinstance(mode, str) or mode.lower() not in ("zscore", "percentile"):
            raise ValueError(f"ZClip: mode must be 'zscore' or 'percentile', got {mode!r}")
        self.mode = mode.lower()
        if clip_option not in ("adaptive_scaling", "mean"):
            raise ValueError(
                f"ZClip: clip_option must be 'adaptive_scaling' or 'mean', got {clip_option!r}"
            )
        self.clip_option = clip_option
        self.clip_factor = _positive(clip_factor, "clip_factor", name)
        if not isinstance(skip_update_on_spike, bool):
            raise TypeError(f"ZClip: skip_update_on_spike must be a bool, got {skip_update_on_spike!r}")
        self.skip_update_on_spike = skip_update_on_spike

    def init_state(self, device: torch.device) -> dict:
        zero = torch.zeros((), dtype=torch.float64, device=device)
        return {
            "count": torch.zeros((), dtype=torch.int64, device=device),
            "warmup_norms": torch.zeros(max(self.warmup_steps, 1), dtype=torch.float64,
                                        device=device),
            "mean": zero, "var": zero.clone(),
        }

    def clip(self, inputs: ClipInputs) -> ClipResult:
        norm = inputs.total_norm.to(torch.float64)
        state = inputs.state
        warm = max(self.warmup_steps, 1)
        count, buf, mean, var = state["count"], state["warmup_norms"], state["mean"], state["var"]

        # -- warm-up: collect the norm; the last warm-up step starts the EMA.
        warming = count < warm
        slot = torch.clamp(count, max=warm - 1).view(1)
        new_buf = buf.index_copy(0, slot, norm.view(1))
        starts = count == warm - 1
        buf_mean = new_buf.sum() / warm
        buf_var = ((new_buf - buf_mean) ** 2).sum() / warm
        if self.max_norm is None:
            warm_coef = torch.ones_like(norm)
        else:
            warm_coef = _norm_coefficient(self.max_norm, norm)

        # -- after warm-up: threshold, coefficient, EMA update.
        std = torch.sqrt(var)
        if self.mode == "percentile":
            threshold = mean + self.z_thresh * std
            spike = norm > threshold
        else:
            z = (norm - mean) / (std + self.eps)
            spike = z > self.z_thresh
            if self.clip_option == "adaptive_scaling":
                eta = z / self.z_thresh
                threshold = (mean + (self.z_thresh * std) / eta) * self.clip_factor
            else:
                threshold = mean
        adaptive = torch.where(spike, threshold, norm)
        effective = adaptive if self.max_norm is None else torch.clamp(adaptive, max=self.max_norm)
        ema_coef = torch.where(norm > effective, effective / (norm + CLIP_GRAD_NORM_EPS),
                               torch.ones_like(norm))
        x = adaptive
        ema_mean = self.alpha * mean + (1 - self.alpha) * x
        ema_var = self.alpha * var + (1 - self.alpha) * (x - ema_mean) ** 2
        if self.skip_update_on_spike:
            ema_mean = torch.where(spike, mean, ema_mean)
            ema_var = torch.where(spike, var, ema_var)

        return ClipResult(
            coef=torch.where(warming, warm_coef, ema_coef),
            state={
                "count": torch.clamp(count + 1, max=warm),
                "warmup_norms": torch.where(warming, new_buf, buf),
                "mean": torch.where(warming, torch.where(starts, buf_mean, mean), ema_mean),
                "var": torch.where(warming, torch.where(starts, buf_var, var), ema_var),
            },
        )

    def __repr__(self) -> str:
        return (
            f"ZClip(alpha={self.alpha}, z_thresh={self.z_thresh}, max_norm={self.max_norm}, "
            f"eps={self.eps}, warmup_steps={self.warmup_steps}, mode={self.mode!r}, "
            f"clip_option={self.clip_option!r}, clip_factor={self.clip_factor}, "
            f"skip_update_on_spike={self.skip_update_on_spike})"
        )


class AdaGC(ClipPolicy):
    r"""AdaGC: adaptive per-tensor clipping against an EMA of each tensor's own
    clipped gradient norm, as pytorch_optimizer 4.1.0's ``AdaGC`` optimizer clips.

    For each parameter :math:`i`, in its :math:`t`-th step with a gradient:

    .. math::
        \begin{aligned}
            &\textbf{if}\: t = 1 \textbf{ or } t < T_{warm}: \quad
                c_i = \min\Big(1, \frac{\lambda_{abs}}{\lVert g \rVert_2 + \epsilon}\Big)
                \text{ (}\lVert g \rVert\text{: global norm)}, \quad
                \gamma_i \leftarrow \min(\gamma_i, c_i \lVert g_i \rVert_2)
                \text{ (} c_i \lVert g_i \rVert_2 \text{ at } t = 1\text{)}   \\
            &\textbf{else}: \quad
                c_i = \min\Big(1, \frac{\lambda_{rel} \max(\gamma_i, \epsilon)}
                    {\max(\lVert g_i \rVert_2, \epsilon)}\Big), \quad
                \gamma_i \leftarrow \beta \gamma_i + (1 - \beta)\, c_i \lVert g_i \rVert_2 \\
            &g_i \leftarrow c_i\, g_i
        \end{aligned}

    With weight decay 0 and the same ``eps`` for Adam and AdaGC,
    ``FusedClipAdam(params, eps=e, clip=AdaGC(eps=e))`` is pytorch_optimizer's
    ``AdaGC(params, eps=e, weight_decay=0)`` step for step. :math:`\gamma_i` and
    :math:`t` are kept per parameter (``opt.clip_stats`` adds ``tensor_norms``);
    :math:`t` counts the steps the parameter had a gradient and was not skipped
    (pytorch_optimizer counts the group's ``step()`` calls, which is the same
    while every parameter has a gradient in every step). pytorch_optimizer takes
    ``min(lambda_abs / norm, 1.0)`` in Python (a host sync); here it is a device
    clamp. :math:`\gamma_i` has the dtype of the norms (float32, float64 for
    float64 gradients).

    Args:
        beta (float, optional): EMA factor :math:`\beta \in [0, 1)` (default: 0.98)
        lambda_abs (float, optional): absolute threshold of the warm-up, > 0 (default: 1.0)
        lambda_rel (float, optional): relative threshold, > 0 (default: 1.05)
        warmup_steps (int, optional): :math:`T_{warm}`, >= 0 (default: 100)
        eps (float, optional): :math:`\epsilon`, >= 0 (default: 1e-8)

    References:
        Wang et al., *AdaGC: Improving training stability for large language
        model pretraining*, arXiv:2502.11034, 2025.
    """

    scope = "tensor"

    def __init__(self, beta: float = 0.98, lambda_abs: float = 1.0, lambda_rel: float = 1.05,
                 warmup_steps: int = 100, eps: float = 1e-8) -> None:
        self.beta = _real_number(beta, "beta", "AdaGC")
        if not 0.0 <= self.beta < 1.0:
            raise ValueError(f"AdaGC: beta must be in [0, 1), got {self.beta}")
        self.lambda_abs = _positive(lambda_abs, "lambda_abs", "AdaGC")
        self.lambda_rel = _positive(lambda_rel, "lambda_rel", "AdaGC")
        self.warmup_steps = _int_arg(warmup_steps, "warmup_steps", "AdaGC", 0)
        self.eps = _positive(eps, "eps", "AdaGC", allow_zero=True)

    def init_tensor_state(self, norm_dtype: torch.dtype, device: torch.device) -> dict:
        return {"gamma": torch.zeros((), dtype=norm_dtype, device=device),
                "step": torch.zeros((), dtype=torch.int64, device=device)}

    def clip(self, inputs: ClipInputs) -> ClipResult:
        warm_scale = torch.clamp(self.lambda_abs / (inputs.total_norm + self.eps), max=1.0)
        coefs, new_states = [], []
        for norms, states in zip(inputs.tensor_norms, inputs.tensor_states):
            gamma = torch.stack([s["gamma"] for s in states])
            step = torch.stack([s["step"] for s in states])
            scale = warm_scale.to(norms.device, norms.dtype, non_blocking=True)
            first = step == 0
            warming = first | (step + 1 < self.warmup_steps)
            warm_hat = scale * norms
            warm_gamma = torch.where(first, warm_hat, torch.minimum(gamma, warm_hat))
            rel = torch.clamp(
                self.lambda_rel * torch.clamp(gamma, min=self.eps) / torch.clamp(norms, min=self.eps),
                max=1.0,
            )
            # beta gamma + (1 - beta) h as three separately rounded ops: torch.lerp
            # (and add with alpha) round otherwise eagerly than compiled.
            rel_gamma = gamma * self.beta + (rel * norms) * (1.0 - self.beta)
            coefs.append(torch.where(warming, scale, rel))
            new_gamma = torch.where(warming, warm_gamma, rel_gamma)
            new_states.append([{"gamma": g, "step": t}
                               for g, t in zip(new_gamma.unbind(0), (step + 1).unbind(0))])
        return ClipResult(coef=coefs, tensor_states=new_states)

    def __repr__(self) -> str:
        return (
            f"AdaGC(beta={self.beta}, lambda_abs={self.lambda_abs}, lambda_rel={self.lambda_rel}, "
            f"warmup_steps={self.warmup_steps}, eps={self.eps})"
        )


class ValueClip(ClipPolicy):
    r"""Clips every gradient element to :math:`[-v, v]`, exactly as
    :func:`torch.nn.utils.clip_grad_value_` does.

    .. math::
        g_j \leftarrow \min\big(\max(g_j, -v), v\big)
        \quad\text{for every element } j \text{ of every gradient}

    The clamp is applied by the update op as it reads each gradient (after a
    GradScaler's unscaling, so it clips the unscaled gradient); NaN stays NaN,
    like :func:`torch.clamp`. No coefficient is computed: ``opt.clip_stats``
    has no ``clip_coef``, and ``grad_norm`` is the pre-clip global L2 norm
    (measured for ``nonfinite="skip"``/``"raise"``; with ``"propagate"``
    ValueClip needs no norm pass at all).

    Args:
        clip_value (float): :math:`v > 0`, finite: the largest magnitude a
            gradient element may have.

    References:
        Mikolov, *Statistical Language Models Based on Neural Networks*, PhD
        thesis, Brno University of Technology, 2012 (clipping gradient values).
        Pascanu, Mikolov & Bengio, *On the difficulty of training recurrent
        neural networks*, ICML 2013.
    """

    scope = "element"

    def __init__(self, clip_value: float) -> None:
        self.clip_value = _positive(clip_value, "clip_value", "ValueClip")

    def clip(self, inputs: ClipInputs) -> ClipResult:
        return ClipResult(elementwise=Elementwise(clip_value=self.clip_value))

    def __repr__(self) -> str:
        return f"ValueClip(clip_value={self.clip_value})"


# The floor timm's adaptive_clip_grad puts under a unit's gradient norm.
AGC_GRAD_NORM_FLOOR = 1e-6


class AGC(ClipPolicy):
    r"""Adaptive gradient clipping (AGC): each unit's gradient is clipped
    relative to the norm of its weights, as timm's ``adaptive_clip_grad``
    (``timm/utils/agc.py``) does.

    A unit is one index of dim 0 of a parameter (an output row of a linear
    weight, an output channel of a convolution: the norm is taken over all
    other dims); a 0-d or 1-d parameter (a bias, a gain) is one unit. For every
    unit :math:`i` with weights :math:`W_i` and gradient :math:`G_i`:

    .. math::
        \begin{aligned}
            &m_i = \lambda \max(\lVert W_i \rVert_2, \epsilon), \qquad
                c_i = \begin{cases} 1 & \lVert G_i \rVert_2 < m_i \\
                    m_i / \max(\lVert G_i \rVert_2, 10^{-6}) & \text{otherwise}
                \end{cases}                                                     \\
            &G_i \leftarrow c_i\, G_i
        \end{aligned}

    that is :math:`c_i = \min(1, \lambda \max(\lVert W_i\rVert, \epsilon) /
    \max(\lVert G_i\rVert, 10^{-6}))` (they differ only when :math:`m_i <
    10^{-6}` and the gradient is smaller still, where timm, and this policy,
    leave it alone). The norms of all units come from the norm pass: one read of
    every gradient (which also gives the global norm and the non-finite flag)
    and one of every parameter, before the update. ``opt.clip_stats["clip_coef"]``
    holds the coefficients of all units, gradient after gradient.

    The paper exempts the final linear layer; ``clip=`` covers a whole
    optimizer, so give that layer its own optimizer without AGC to do the same.

    Args:
        clip_factor (float, optional): :math:`\lambda > 0`, finite (default: 0.01)
        eps (float, optional): :math:`\epsilon \ge 0`, finite: the smallest weight
            norm used, so zero-initialised units can move (default: 1e-3)

    References:
        Brock, De, Smith & Simonyan, *High-Performance Large-Scale Image
        Recognition Without Normalization*, ICML 2021 (arXiv:2102.06171).
    """

    scope = "unit"
    reads_params = True

    def __init__(self, clip_factor: float = 0.01, eps: float = 1e-3) -> None:
        self.clip_factor = _positive(clip_factor, "clip_factor", "AGC")
        self.eps = _positive(eps, "eps", "AGC", allow_zero=True)

    def clip(self, inputs: ClipInputs) -> list[Tensor]:
        coefs = []
        for grad_norms, param_norms in zip(inputs.unit_norms, inputs.param_unit_norms):
            max_norm = torch.clamp(param_norms, min=self.eps) * self.clip_factor
            scaled = max_norm / torch.clamp(grad_norms, min=AGC_GRAD_NORM_FLOOR)
            coefs.append(torch.where(grad_norms < max_norm, torch.ones_like(scaled), scaled))
        return ClipResult(coef=coefs)

    def __repr__(self) -> str:
        return f"AGC(clip_factor={self.clip_factor}, eps={self.eps})"


class SpikeClip(ClipPolicy):
    r"""Spike clipping of SPAM: every gradient element that is a spike against
    the optimizer's second moment is clipped to the spike threshold.

    .. math::
        g_j \leftarrow \begin{cases}
            \operatorname{sign}(g_j) \sqrt{\theta\, v_j} & g_j^2 > \theta\, v_j \\
            g_j & \text{otherwise}
        \end{cases}

    with :math:`v` Adam's second moment (``exp_avg_sq``) as it was before this
    step's update; an element with :math:`v_j = 0` (its first step) passes as
    it is. The update op applies it as it reads each gradient (after a
    GradScaler's unscale), reading :math:`v`, which it loads anyway: no extra
    pass and no extra bytes. For the Adam family (``FusedClipAdam``,
    ``FusedClipAdamW``); optimizers without a second moment refuse it. SPAM's
    momentum reset is not part of it. ``opt.clip_stats["clip_coef"]`` is 1
    (no coefficient) and ``grad_norm`` the pre-clip norm where measured.

    Args:
        theta (float, optional): :math:`\theta > 0`, finite (default: 5000.0)

    References:
        Huang, Zhu, Jin, Liu, Wang & Liu, *SPAM: Spike-Aware Adam with Momentum
        Reset for Stable LLM Training*, ICLR 2025 (arXiv:2501.06842).
    """

    scope = "element"
    reads_state = "exp_avg_sq"

    def __init__(self, theta: float = 5000.0) -> None:
        self.theta = _positive(theta, "theta", "SpikeClip")

    def clip(self, inputs: ClipInputs) -> ClipResult:
        return ClipResult(elementwise=Elementwise(spike_theta=self.theta))

    def __repr__(self) -> str:
        return f"SpikeClip(theta={self.theta})"


# The scopes from the coarsest to the finest: a Chain asks for the finest any
# member needs, and every coarser norm follows from it.
_FINENESS = {"element": 0, "global": 1, "tensor": 2, "unit": 3}


class Chain(ClipPolicy):
    r"""Clip policies applied one after the other, as optax's ``chain``: each
    member clips the gradients as the members before it left them.

    ``Chain(AGC(0.01), GlobalNorm(1.0))`` is timm's ``adaptive_clip_grad(params,
    0.01)`` followed by ``clip_grad_norm_(params, 1.0)``;
    ``Chain(GlobalNorm(1.0), SpikeClip())`` clips the global norm, then the
    spikes against Adam's second moment. It is still one norm pass and one
    update pass, because coefficients scale norms: after the coefficients
    :math:`c_u` of the units :math:`u` of a gradient (1 where a member has none)

    .. math::
        \lVert g \rVert_2 = \Big(\sum_u c_u^2 \lVert g_u \rVert_2^2\Big)^{1/2},
        \qquad \lVert g \rVert_\infty = \max_u c_u \lVert g_u \rVert_\infty

    (a tensor's and the global norm alike, from the norms of their units, or of
    their tensors). The chain asks the norm pass for the finest scope any member
    needs ("unit" with an AGC, else "tensor" with a per-tensor policy, else
    "global"), hands each member the norms of the gradients as the members
    before it scaled them (the measured ones to the first), and has the update
    apply the product of the coefficients at that scope, then the element-wise
    clamps.

    Element-wise members (``ValueClip``, ``SpikeClip``) clamp magnitudes: two
    ValueClips clamp to the smaller value, two SpikeClips to the smaller theta,
    and a ValueClip and a SpikeClip give the same result in either order (the
    update clamps the value first, then the spikes). A norm-based member after
    an element-wise one is refused: the norm of clamped gradients needs a pass
    of its own. Nested chains are flattened; the members' norm-based policies
    must share one ``norm_type``. A float is refused as a member (``clip=1.0``
    means ``GlobalNorm(1.0)``; in a chain, write that). Where norms are reduced
    across processes (DTensor parameters, ``norm_group``), a chain that computes
    a norm from finer ones (a norm-based member after a per-tensor or per-unit
    one, or a per-tensor member beside a per-unit one: ``derives_norms``) is
    refused: it would see this process's gradients only.

    The state of every member (its own and per parameter) is kept under keys
    prefixed ``"<position>.<class name>."`` (``"0.AutoClip.history"``), so two
    members of one class keep theirs apart, and travels in the state_dict; a
    skipped step changes none of it. ``opt.clip_stats["grad_norm"]`` is the
    pre-clip global norm and ``clip_coef`` the product of the coefficients at
    the chain's scope (per unit, per tensor or one).

    Args:
        *policies (ClipPolicy): the policies, in the order they clip; at least one.

    References:
        DeepMind, *Optax* (``optax.chain``), https://github.com/google-deepmind/optax.
    """

    def __init__(self, *policies: ClipPolicy) -> None:
        members: list[ClipPolicy] = []
        for policy in policies:
            if isinstance(policy, Chain):
                members.extend(policy.policies)
            elif isinstance(policy, ClipPolicy):
                members.append(policy)
            else:
                hint = ""
                if isinstance(policy, numbers.Real) and not isinstance(policy, bool):
                    hint = f"; for global norm clipping write fusedclip.GlobalNorm({policy!r})"
                raise TypeError("Chain: every member must be a clip policy such as "
                                f"fusedclip.GlobalNorm(1.0), got {policy!r}{hint}")
        if not members:
            raise ValueError("Chain needs at least one policy, e.g. Chain(AGC(0.01), "
                             "GlobalNorm(1.0)); for no clipping give clip=None")
        elementwise = None
        for member in members:
            if member.scope == "element":
                elementwise = member
            elif elementwise is not None:
                raise ValueError(
                    f"Chain: {member!r} comes after the element-wise {elementwise!r}: it "
                    "would need the norms of the clamped gradients, which only a second "
                    "pass over the gradients could measure (the fused step measures them "
                    "once, before the update). Put the element-wise policies last.")
        norm_types = {m.norm_type for m in members if m.scope != "element"}
        if len(norm_types) > 1:
            raise ValueError("Chain: its norm-based members must share one norm_type (the "
                             f"norm pass measures one norm), got {sorted(norm_types)}")
        reads = {m.reads_state for m in members if m.reads_state is not None}
        if len(reads) > 1:
            raise ValueError(f"Chain: its members read different optimizer states {sorted(reads)}")
        self.policies = tuple(members)
        self.scope = max((m.scope for m in members), key=_FINENESS.__getitem__)
        self.norm_type = norm_types.pop() if norm_types else 2.0
        self.reads_params = any(m.reads_params for m in members)
        self.reads_state = reads.pop() if reads else None
        self._prefixes = tuple(f"{i}.{type(m).__name__}." for i, m in enumerate(members))
        # A member after per-tensor or per-unit coefficients gets a global norm
        # computed here from tensor or unit norms; a per-tensor member of a
        # chain of scope "unit" (which measures unit norms only) gets tensor
        # norms computed from unit norms.
        after_finer = [m for i, m in enumerate(members) if m.needs_norms and any(
            _FINENESS[e.scope] > _FINENESS["global"] for e in members[:i])]
        self.derives_norms = bool(after_finer) or (
            self.scope == "unit" and any(m.scope == "tensor" for m in members))

    @property
    def keeps_tensor_state(self) -> bool:
        return any(m.keeps_tensor_state for m in self.policies)

    def init_state(self, device: torch.device) -> dict:
        return {prefix + key: value for prefix, m in zip(self._prefixes, self.policies)
                for key, value in m.init_state(device).items()}

    def init_tensor_state(self, norm_dtype: torch.dtype, device: torch.device) -> dict:
        return {prefix + key: value for prefix, m in zip(self._prefixes, self.policies)
                if m.keeps_tensor_state
                for key, value in m.init_tensor_state(norm_dtype, device).items()}

    def clip(self, inputs: ClipInputs) -> ClipResult:
        scaled = _ScaledNorms(inputs, self.norm_type)
        clip_value = spike_theta = None
        state: dict = {}
        tensor_states = None
        if self.keeps_tensor_state:
            tensor_states = [[{} for _ in bucket] for bucket in inputs.tensor_states]
        for prefix, member in zip(self._prefixes, self.policies):
            own_tensor_states = None
            if member.keeps_tensor_state:
                own_tensor_states = [[_unprefixed(s, prefix) for s in bucket]
                                     for bucket in inputs.tensor_states]
            scope = member.scope
            result = member.clip(ClipInputs(
                # (element-wise members read no norm: they get the measured one)
                total_norm=scaled.total() if member.needs_norms else inputs.total_norm,
                tensor_norms=scaled.tensors() if scope == "tensor" else None,
                state=_unprefixed(inputs.state, prefix), tensor_states=own_tensor_states,
                unit_norms=scaled.units() if scope == "unit" else None,
                param_unit_norms=inputs.param_unit_norms if member.reads_params else None,
                unit_counts=inputs.unit_counts if scope == "unit" else None,
            ))
            if result.coef is not None:
                scaled.multiply(result.coef, scope)
            if result.elementwise is not None:
                clip_value = _smaller(clip_value, result.elementwise.clip_value)
                spike_theta = _smaller(spike_theta, result.elementwise.spike_theta)
            if result.state:
                state.update({prefix + key: value for key, value in result.state.items()})
            if result.tensor_states:
                for merged, new in zip(tensor_states, result.tensor_states):
                    for into, values in zip(merged, new):
                        into.update({prefix + key: value for key, value in values.items()})
        elementwise = None
        if clip_value is not None or spike_theta is not None:
            elementwise = Elementwise(clip_value=clip_value, spike_theta=spike_theta)
        return ClipResult(
            coef=scaled.coefficients(self.scope), elementwise=elementwise, state=state or None,
            tensor_states=tensor_states if tensor_states and any(
                s for bucket in tensor_states for s in bucket) else None)

    def __repr__(self) -> str:
        return f"Chain({', '.join(map(repr, self.policies))})"


def _unprefixed(values: dict | None, prefix: str) -> dict:
    """The entries of ``values`` whose key starts with ``prefix``, without it."""
    if not values:
        return {}
    return {key[len(prefix):]: value for key, value in values.items() if key.startswith(prefix)}


def _times(a: Tensor, b: Tensor) -> Tensor:
    """``a * b`` on the device of the 1-D one (a 0-d global coefficient
    broadcasts to a bucket's)."""
    device = b.device if a.dim() == 0 else a.device
    return a.to(device, non_blocking=True) * b.to(device, non_blocking=True)


def _smaller(a: float | None, b: float | None) -> float | None:
    """The smaller bound of two clamps of the magnitude (None: no clamp)."""
    return b if a is None else a if b is None else min(a, b)


class _ScaledNorms:
    """The norms of the gradients as the coefficients so far scaled them,
    computed from one step's measured norms (``ClipInputs``), for the members of
    a :class:`Chain`. ``coef`` is the product of the coefficients so far, at
    ``level``, the finest scope among them: a 0-d tensor ("global") or one 1-D
    tensor per norm bucket ("tensor", "unit"); None: none yet."""

    def __init__(self, inputs: ClipInputs, norm_type: float) -> None:
        self.inputs = inputs
        self.norm_type = norm_type
        self.coef = None
        self.level = None
        self._gradient_of_unit: list[Tensor] | None = None

    # -- the norms a member asks for --------------------------------------------------
    def total(self) -> Tensor:
        total = self.inputs.total_norm
        if self.coef is None:
            return total
        if self.level == "global":
            return self.coef * total
        return self._global(self._at(self.level))

    def tensors(self) -> list[Tensor]:
        if self.level == "unit" or self.inputs.tensor_norms is None:
            # (a chain of scope "unit" has unit norms only: a tensor's follow from them)
            return self._per_tensor(self.units())
        return self._at("tensor")

    def units(self) -> list[Tensor]:
        return self._at("unit")

    # -- the coefficients ---------------------------------------------------------------
    def multiply(self, coef, scope: str) -> None:
        """Takes a member's coefficient(s) of ``scope`` into the product."""
        if self.coef is None:
            self.coef, self.level = coef, scope
            return
        level = max(self.level, scope, key=_FINENESS.__getitem__)
        old, new = self._lift(self.coef, self.level, level), self._lift(coef, scope, level)
        if level == "global":
            self.coef = old * new
        else:
            self.coef = [_times(a, b) for a, b in zip(old, new)]
        self.level = level

    def coefficients(self, scope: str):
        """The product at ``scope`` (the chain's), None where there is none."""
        if self.coef is None or scope == "element":
            return self.coef
        if self.level == "global" and scope != "global":
            # One value per tensor or unit, dense: what the update op takes.
            return [self.coef.to(n.device, non_blocking=True).expand(n.shape).clone()
                    for n in self._base(scope)]
        return self._lift(self.coef, self.level, scope)

    # -- helpers -------------------------------------------------------------------------
    def _base(self, scope: str) -> list[Tensor]:
        """The measured norms of ``scope`` ("tensor" or "unit"), per bucket."""
        if scope == "unit":
            return self.inputs.unit_norms
        if self.inputs.tensor_norms is not None:
            return self.inputs.tensor_norms
        return self._per_tensor(self.inputs.unit_norms)

    def _at(self, scope: str) -> list[Tensor]:
        """The scaled norms of ``scope`` (at least as fine as ``level``), per bucket."""
        base = self._base(scope)
        if self.coef is None:
            return base
        coef = self._lift(self.coef, self.level, scope)
        return [_times(c, n) for c, n in zip(coef, base)]

    def _lift(self, coef, level: str, scope: str):
        """``coef`` of ``level`` as coefficients of the finer ``scope``: a
        global one as it is (it broadcasts) once per bucket, a tensor's
        repeated for each of its units."""
        if level == scope:
            return coef
        if level == "global":
            buckets = self.inputs.unit_norms or self.inputs.tensor_norms
            return [coef] * len(buckets)
        # tensor -> unit
        return [c.index_select(0, index.to(c.device, non_blocking=True))
                for c, index in zip(coef, self._unit_index())]

    def _unit_index(self) -> list[Tensor]:
        """Per bucket, the index of each unit's gradient, on the bucket's device."""
        if self._gradient_of_unit is None:
            self._gradient_of_unit = []
            for counts, norms in zip(self.inputs.unit_counts, self.inputs.unit_norms):
                index = torch.repeat_interleave(torch.arange(len(counts)),
                                                torch.tensor(counts, dtype=torch.int64),
                                                output_size=sum(counts))
                if norms.device.type == "cuda":
                    index = index.pin_memory()  # a copy from pageable memory would sync
                self._gradient_of_unit.append(index.to(norms.device, non_blocking=True))
        return self._gradient_of_unit

    # The norms of norms are taken by the norm op itself, which torch.compile
    # calls as it is: torch's reductions (vector_norm, index_add) round otherwise
    # compiled than eagerly, and the compiled step must be the eager one bit for bit.
    def _per_tensor(self, unit_norms: list[Tensor]) -> list[Tensor]:
        """Each gradient's norm from the norms of its units, per bucket."""
        return [ops.multi_tensor_norm(list(norms.split(counts)), self.norm_type)[0]
                for norms, counts in zip(unit_norms, self.inputs.unit_counts)]

    def _global(self, per_bucket: list[Tensor]) -> Tensor:
        """The global norm from norms of tensors or units, on the measured
        global norm's device, in its dtype."""
        total = self.inputs.total_norm
        values = torch.cat([n.to(total.device, total.dtype, non_blocking=True)
                            for n in per_bucket])
        return ops.multi_tensor_norm([values], self.norm_type)[1]


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

"""FusedClipSGD: SGD with momentum, dampening and Nesterov momentum."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fusedclip import ops
from fusedclip.optim import precision
from fusedclip.optim.base import FusedClipOptimizer, check_lr
from fusedclip.optim.docs import (
    CLIP_ARG_DOC, CLIP_STATS_DOC, IMPL_ARGS_DOC, PRECISION_ARG_DOC, PRECISION_REFERENCES,
)
from fusedclip.optim.layout import kernel_view

__all__ = ["FusedClipSGD"]


def _check_real(value, name: str, where: str = "") -> None:
    if isinstance(value, Tensor):
        raise ValueError(f"{name} is a Tensor{where}; FusedClipSGD takes a float {name}")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"Invalid {name} value: {value!r}")


class FusedClipSGD(FusedClipOptimizer):
    __doc__ = r"""Implements stochastic gradient descent (optionally with momentum) with
    gradient clipping fused into the step.

    Drop-in for ``torch.optim.SGD`` (same arguments, defaults and state),
    plus keyword-only ``clip=``, ``nonfinite=`` and the mixed-precision
    options. With ``momentum=0`` and
    ``clip=fusedclip.Normalize()`` it is normalized SGD.

    .. math::
       \begin{aligned}
            &\textbf{input}: \gamma \text{ (lr)}, \theta_0, \lambda \text{ (weight decay)},
                \mu \text{ (momentum)}, \tau \text{ (dampening)}, \text{clip policy } C,
                \textit{nesterov}, \textit{maximize}                                  \\
            &\textbf{for}\: t=1 \: \textbf{to} \: \ldots \: \textbf{do}             \\
            &\hspace{5mm} g_t \leftarrow \nabla_\theta f_t(\theta_{t-1})              \\
            &\hspace{5mm} \textbf{if}\: \text{any } g_t \text{ is inf/nan and nonfinite = skip}:
                \textbf{continue} \text{ (nothing changes)}                          \\
            &\hspace{5mm} g_t \leftarrow c_t\, g_t, \quad
                c_t = C(\lVert g_t \rVert) \text{ e.g. }
                \min(1, \text{max\_norm} / (\lVert g_t \rVert + 10^{-6}))            \\
            &\hspace{5mm} \textbf{if}\: \textit{maximize}: g_t \leftarrow -g_t        \\
            &\hspace{5mm} \textbf{if}\: \lambda \neq 0: g_t \leftarrow g_t + \lambda \theta_{t-1} \\
            &\hspace{5mm} \textbf{if}\: \mu \neq 0                                    \\
            &\hspace{10mm} \textbf{if}\: \text{the buffer's first (not skipped) step}:
                \textbf{b}_t \leftarrow g_t                                         \\
            &\hspace{10mm} \textbf{else}: \textbf{b}_t \leftarrow \mu \textbf{b}_{t-1}
                + (1-\tau) g_t                                                      \\
            &\hspace{10mm} \textbf{if}\: \textit{nesterov}: g_t \leftarrow g_t + \mu \textbf{b}_t \\
            &\hspace{10mm} \textbf{else}: g_t \leftarrow \textbf{b}_t                 \\
            &\hspace{5mm} \theta_t \leftarrow \theta_{t-1} - \gamma g_t               \\
       \end{aligned}

    Args:
        params (iterable): iterable of parameters or named parameters to
            optimize, or of dicts defining parameter groups.
        lr (float, Tensor, optional): learning rate (default: 1e-3)
        momentum (float, optional): momentum factor (default: 0)
        dampening (float, optional): dampening for momentum (default: 0)
        weight_decay (float, optional): weight decay (L2 penalty) (default: 0)
        nesterov (bool, optional): enables Nesterov momentum; needs
            ``momentum > 0`` and ``dampening == 0`` (default: False)
        maximize (bool, optional): maximize the objective instead of minimizing
            (default: False)
{impl_args}{clip_arg}
{clip_stats}
    The state key is torch's (``momentum_buffer``, only with momentum): state
    dicts move between this optimizer and ``torch.optim.SGD`` both ways.
    Complex parameters are optimized as their real views, as torch.optim does.
    With ``clip=None`` a float32/float64 step is bit for bit torch's
    ``fused=True`` CPU step.

    .. note:: The momentum buffer is allocated (zero) before its first step, so
       that the kernel can write it without a host sync; whether that first
       step happened is kept on the device beside the buffer, not in the state
       dict. A state dict taken after a skipped first step and before any good
       one therefore holds a zero buffer that torch.optim.SGD would treat as
       started (``mu * 0 + (1 - dampening) g`` instead of ``g``). A skipped
       first step leaves the next one a first step: the buffer is then the
       gradient, as in torch.

    References:
        Polyak, *Some methods of speeding up the convergence of iteration
        methods*, USSR Computational Mathematics and Mathematical Physics, 1964
        (heavy-ball momentum).
        Sutskever, Martens, Dahl & Hinton, *On the importance of initialization
        and momentum in deep learning*, ICML 2013 (momentum and Nesterov
        momentum in this form).
        Pascanu, Mikolov & Bengio, *On the difficulty of training recurrent
        neural networks*, ICML 2013 (clipping by the global norm).
{precision_refs}    """.replace("{clip_arg}", PRECISION_ARG_DOC + CLIP_ARG_DOC).replace(
        "{precision_refs}", PRECISION_REFERENCES).replace("{impl_args}", IMPL_ARGS_DOC).replace(
        "{clip_stats}", CLIP_STATS_DOC)

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        master_weights: bool = False,
        store_param_remainders: bool = False,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
        clip=None,
        nonfinite: str = "skip",
        norm_group=None,
    ) -> None:
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, maximize=maximize, foreach=foreach,
            differentiable=differentiable, fused=fused,
        )
        defaults.update(precision.defaults(master_weights, store_param_remainders, state_dtype,
                                           stochastic_rounding))
        # Per parameter (by id), (parameter, buffer, counter): how many steps
        # that buffer has taken, on the parameter's device (see the note
        # above). Keyed by id(param), which hashes in C where a Tensor key
        # hashes in Python; an entry counts only while its buffer is the
        # parameter's own.
        self._buffer_steps: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        super().__init__(params, defaults, clip=clip, nonfinite=nonfinite,
                         norm_group=norm_group)

    # torch.optim.SGD.__setstate__ fills fused=False (its constructor's default is None).
    _legacy_group_defaults = {"fused": False}

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_buffer_steps"] = list(self._buffer_steps.values())  # ids differ in a copy
        return state

    def __setstate__(self, state: dict) -> None:
        entries = state.pop("_buffer_steps", None)
        super().__setstate__(state)
        if entries is not None:
            self._buffer_steps = {id(entry[0]): entry for entry in entries}

    def _check_group(self, group: dict) -> None:
        # torch.optim.SGD's checks, in its order and with its messages, then
        # fusedclip's (float momentum, dampening and weight decay).
        check_lr(group["lr"])
        momentum, dampening = group["momentum"], group["dampening"]
        weight_decay = group["weight_decay"]
        # (NaN is refused too, where torch lets it through.)
        if not isinstance(momentum, Tensor) and not 0.0 <= momentum:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if not isinstance(weight_decay, Tensor) and not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if group["nesterov"] and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        _check_real(momentum, "momentum")
        _check_real(dampening, "dampening")
        if not math.isfinite(dampening):
            raise ValueError(f"Invalid dampening value: {dampening}")
        _check_real(weight_decay, "weight_decay")

    def _init_state(self, param: Tensor, group: dict, state: dict) -> None:
        # torch.optim.SGD keeps no state entry at all without momentum, so
        # the empty one made for this call goes; with momentum the buffer is
        # made by _update (also when momentum is switched on later).
        if not state and group["momentum"] == 0 and not precision.keeps_state(param, group):
            self.state.pop(param, None)

    def _buffers(self, params: list[Tensor], states: list[dict], views: bool,
                 group: dict) -> tuple[list[Tensor], list[Tensor]]:
        """Each parameter's momentum buffer (as the kernel sees it: through
        ``kernel_view`` where ``views``) and its step counter, made where missing."""
        table = self._buffer_steps
        buffers, counters = [], []
        for p, state in zip(params, states):
            buf = state.get("momentum_buffer")
            entry = table.get(id(p))
            if buf is None:
                # Zero until its first step, which overwrites it with the gradient.
                buf = state["momentum_buffer"] = precision.zeros(p, group)
                entry = table[id(p)] = (
                    p, buf, torch.zeros((), dtype=torch.float32, device=p.device))
            elif entry is None or entry[1] is not buf:
                # A buffer that came with a state dict (torch's or ours): started.
                entry = table[id(p)] = (
                    p, buf, torch.ones((), dtype=torch.float32, device=p.device))
            buffers.append(kernel_view(buf) if views else buf)
            counters.append(entry[2])
        return buffers, counters

    state_keys = ("momentum_buffer",)

    def _update(self, group, params, grads, states, *, originals, views, args) -> None:
        momentum = float(group["momentum"])
        buffers, counters = self._buffers(originals, states, views, group) if momentum != 0 else ([], [])
        ops.update_(
            "sgd", params, grads, [buffers] if momentum != 0 else [], counters,
            dict(momentum=momentum, dampening=group["dampening"],
                 weight_decay=group["weight_decay"], nesterov=group["nesterov"]),
            args,
        )

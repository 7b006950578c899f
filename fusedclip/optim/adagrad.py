"""FusedClipAdagrad."""

from __future__ import annotations

import torch
from torch import Tensor

from fusedclip import ops
from fusedclip.optim.base import FusedClipOptimizer, check_lr, scalar_dtype, state_list
from fusedclip.optim import precision
from fusedclip.optim.docs import (
    CLIP_ARG_DOC, CLIP_STATS_DOC, IMPL_ARGS_DOC, PRECISION_ARG_DOC, PRECISION_REFERENCES,
)

__all__ = ["FusedClipAdagrad"]


class FusedClipAdagrad(FusedClipOptimizer):
    __doc__ = r"""Implements Adagrad with gradient clipping fused into the step.

    Drop-in for ``torch.optim.Adagrad`` (same arguments, defaults and state),
    plus keyword-only ``clip=``, ``nonfinite=`` and the mixed-precision
    options. As in torch, the state of
    every parameter (``step``, ``sum``) is made when it joins the optimizer.

    .. math::
       \begin{aligned}
            &\textbf{input}: \gamma \text{ (lr)}, \theta_0, \lambda \text{ (weight decay)},
                \eta \text{ (lr decay)}, \tau \text{ (initial accumulator value)},
                \epsilon, \text{clip policy } C, \textit{maximize}                  \\
            &\textbf{initialize}: state\_sum_0 \leftarrow \tau                       \\
            &\textbf{for}\: t=1 \: \textbf{to} \: \ldots \: \textbf{do}             \\
            &\hspace{5mm} g_t \leftarrow \nabla_\theta f_t(\theta_{t-1})              \\
            &\hspace{5mm} \textbf{if}\: \text{any } g_t \text{ is inf/nan and nonfinite = skip}:
                \textbf{continue} \text{ (nothing changes, } t \text{ included)}     \\
            &\hspace{5mm} g_t \leftarrow c_t\, g_t, \quad
                c_t = C(\lVert g_t \rVert) \text{ e.g. }
                \min(1, \text{max\_norm} / (\lVert g_t \rVert + 10^{-6}))            \\
            &\hspace{5mm} \textbf{if}\: \textit{maximize}: g_t \leftarrow -g_t        \\
            &\hspace{5mm} \tilde{\gamma} \leftarrow \gamma / (1 + (t-1) \eta)         \\
            &\hspace{5mm} \textbf{if}\: \lambda \neq 0: g_t \leftarrow g_t + \lambda \theta_{t-1} \\
            &\hspace{5mm} state\_sum_t \leftarrow state\_sum_{t-1} + g^2_t            \\
            &\hspace{5mm} \theta_t \leftarrow \theta_{t-1} - \tilde{\gamma}
                \frac{g_t}{\sqrt{state\_sum_t} + \epsilon}                            \\
       \end{aligned}

    Args:
        params (iterable): iterable of parameters or named parameters to
            optimize, or of dicts defining parameter groups.
        lr (float, Tensor, optional): learning rate (default: 1e-2)
        lr_decay (float, optional): learning rate decay (default: 0)
        weight_decay (float, optional): weight decay (L2 penalty) (default: 0)
        initial_accumulator_value (float, optional): initial value of the
            sums of squares of gradients (default: 0)
        eps (float, optional): term added to the denominator to improve
            numerical stability (default: 1e-10)
        maximize (bool, optional): maximize the objective instead of minimizing
            (default: False)
{impl_args}{clip_arg}
{clip_stats}
    State keys are torch's (``step``, ``sum``): state dicts move between this
    optimizer and ``torch.optim.Adagrad`` both ways. ``step`` lives on the
    parameter's device (torch.optim keeps it on the CPU; loading a torch state
    dict moves it). Complex parameters are optimized as their real views, as
    torch.optim does. With ``clip=None`` a float32/float64 step is bit for bit
    torch's ``fused=True`` CPU step.

    References:
        Duchi, Hazan & Singer, *Adaptive Subgradient Methods for Online
        Learning and Stochastic Optimization*, JMLR 12, 2011.
        Pascanu, Mikolov & Bengio, *On the difficulty of training recurrent
        neural networks*, ICML 2013 (clipping by the global norm).
{precision_refs}    """.replace("{clip_arg}", PRECISION_ARG_DOC + CLIP_ARG_DOC).replace(
        "{precision_refs}", PRECISION_REFERENCES).replace("{impl_args}", IMPL_ARGS_DOC).replace(
        "{clip_stats}", CLIP_STATS_DOC)

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-2,
        lr_decay: float = 0,
        weight_decay: float = 0,
        initial_accumulator_value: float = 0,
        eps: float = 1e-10,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
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
            lr=lr, lr_decay=lr_decay, eps=eps, weight_decay=weight_decay,
            initial_accumulator_value=initial_accumulator_value, foreach=foreach,
            maximize=maximize, differentiable=differentiable, fused=fused,
        )
        defaults.update(precision.defaults(master_weights, store_param_remainders, state_dtype,
                                           stochastic_rounding))
        super().__init__(params, defaults, clip=clip, nonfinite=nonfinite,
                         norm_group=norm_group)

    def add_param_group(self, param_group: dict) -> None:
        """Adds a group and, as torch.optim.Adagrad does, its parameters' state."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._check_group(group)
        except ValueError:
            self.param_groups.pop()
            raise
        for p in group["params"]:
            state = self.state[p]
            if len(state) == 0:
                self._init_state(p, group, state)

    def _check_group(self, group: dict) -> None:
        # torch.optim.Adagrad's checks, in its order and with its messages.
        check_lr(group["lr"])
        for key, name in (("lr_decay", "lr_decay"), ("weight_decay", "weight_decay"),
                          ("initial_accumulator_value", "initial_accumulator_value"),
                          ("eps", "epsilon")):
            value = group[key]
            if isinstance(value, Tensor):
                raise ValueError(
                    f"{key} is a Tensor; {type(self).__name__} takes a float {key}")
            if (not isinstance(value, (int, float)) or isinstance(value, bool)
                    or not 0.0 <= value):
                raise ValueError(f"Invalid {name} value: {value}")

    def _init_state(self, param: Tensor, group: dict, state: dict) -> None:
        state["step"] = torch.zeros((), dtype=scalar_dtype(), device=param.device)
        value = group["initial_accumulator_value"]
        if param.is_complex():
            value = complex(value, value)  # as torch.optim.Adagrad starts a complex sum
        state["sum"] = precision.full(param, group, value)

    state_keys = ("step", "sum")

    def _update(self, group, params, grads, states, *, originals, views, args) -> None:
        ops.update_(
            "adagrad", params, grads, [state_list(states, "sum", views)],
            state_list(states, "step", views=False),
            dict(lr_decay=group["lr_decay"], weight_decay=group["weight_decay"],
                 eps=group["eps"]),
            args,
        )

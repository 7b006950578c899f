"""FusedClipLion."""

from __future__ import annotations

import torch
from torch import Tensor

from fusedclip import ops
from fusedclip.optim.base import FusedClipOptimizer, check_lr, state_list
from fusedclip.optim import precision
from fusedclip.optim.docs import (
    CLIP_ARG_DOC, CLIP_STATS_DOC, PRECISION_ARG_DOC, PRECISION_REFERENCES,
)

__all__ = ["FusedClipLion"]


class FusedClipLion(FusedClipOptimizer):
    __doc__ = r"""Implements Lion (EvoLved Sign Momentum) with gradient clipping fused
    into the step.

    torch.optim has no Lion; the arguments follow the paper's reference code
    (``lr=1e-4``, ``betas=(0.9, 0.99)``, decoupled ``weight_decay``), plus
    torch's ``maximize`` and fusedclip's keyword-only ``clip=``,
    ``nonfinite=`` and mixed-precision options.

    .. math::
       \begin{aligned}
            &\textbf{input}: \gamma \text{ (lr)}, \beta_1, \beta_2, \theta_0,
                \lambda \text{ (weight decay)}, \text{clip policy } C, \textit{maximize} \\
            &m_0 \leftarrow 0                                                      \\
            &\textbf{for}\: t=1 \: \textbf{to} \: \ldots \: \textbf{do}             \\
            &\hspace{5mm} g_t \leftarrow \nabla_\theta f_t(\theta_{t-1})
                \text{ (}-\nabla\text{ if maximize)}                                 \\
            &\hspace{5mm} \textbf{if}\: \text{any } g_t \text{ is inf/nan and nonfinite = skip}:
                \textbf{continue} \text{ (nothing changes)}                          \\
            &\hspace{5mm} g_t \leftarrow c_t\, g_t, \quad
                c_t = C(\lVert g_t \rVert) \text{ e.g. }
                \min(1, \text{max\_norm} / (\lVert g_t \rVert + 10^{-6}))            \\
            &\hspace{5mm} u_t \leftarrow \beta_1 m_{t-1} + (1 - \beta_1) g_t         \\
            &\hspace{5mm} \theta_t \leftarrow \theta_{t-1} (1 - \gamma \lambda)
                - \gamma\, \operatorname{sign}(u_t)                                   \\
            &\hspace{5mm} m_t \leftarrow \beta_2 m_{t-1} + (1 - \beta_2) g_t         \\
       \end{aligned}

    Lion's update has the same size in every coordinate, so its lr is usually
    3-10x smaller than AdamW's and its weight decay 3-10x larger (the paper's
    advice). A clip coefficient changes only the momentum's blend, not the
    step's size: clipping matters less for Lion than for Adam.

    Args:
        params (iterable): iterable of parameters or named parameters to
            optimize, or of dicts defining parameter groups.
        lr (float, Tensor, optional): learning rate (default: 1e-4)
        betas (Tuple[float, float], optional): the interpolation factor of the
            update direction and the decay of the momentum, each in [0, 1]
            (default: (0.9, 0.99))
        weight_decay (float, optional): decoupled weight decay (default: 0)
        maximize (bool, optional): maximize the objective instead of minimizing
            (default: False)
{clip_arg}
{clip_stats}
    State key: ``exp_avg`` (the momentum). Complex parameters are optimized as
    their real views.

    References:
        Chen, Liang, Huang, Real, Wang, Pham, Dong, Luong, Hsieh, Lu & Le,
        *Symbolic Discovery of Optimization Algorithms*, NeurIPS 2023
        (arXiv:2302.06675).
{precision_refs}    """.replace("{clip_arg}", PRECISION_ARG_DOC + CLIP_ARG_DOC).replace(
        "{precision_refs}", PRECISION_REFERENCES).replace("{clip_stats}", CLIP_STATS_DOC)

    state_keys = ("exp_avg",)

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        master_weights: bool = False,
        store_param_remainders: bool = False,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
        clip=None,
        nonfinite: str = "skip",
        norm_group=None,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize)
        defaults.update(precision.defaults(master_weights, store_param_remainders, state_dtype,
                                           stochastic_rounding))
        super().__init__(params, defaults, clip=clip, nonfinite=nonfinite,
                         norm_group=norm_group)

    def _check_group(self, group: dict) -> None:
        check_lr(group["lr"])
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair of floats, got {betas!r}")
        for i, beta in enumerate(betas):
            if isinstance(beta, Tensor):
                raise ValueError(f"betas[{i}] is a Tensor; {type(self).__name__} takes float betas")
            if not 0.0 <= beta <= 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
        weight_decay = group["weight_decay"]
        if isinstance(weight_decay, Tensor) or not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")

    def _init_state(self, param: Tensor, group: dict, state: dict) -> None:
        state["exp_avg"] = precision.zeros(param, group)

    def _update(self, group, params, grads, states, *, originals, views, args) -> None:
        beta1, beta2 = group["betas"]
        ops.update_(
            "lion", params, grads, [state_list(states, "exp_avg", views)], [],
            dict(beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"]), args,
        )

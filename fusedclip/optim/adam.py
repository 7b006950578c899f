"""FusedClipAdam and FusedClipAdamW."""

from __future__ import annotations

import torch
from torch import Tensor

from fusedclip import ops
from fusedclip.optim import precision
from fusedclip.optim.base import FusedClipOptimizer, check_lr, state_list
from fusedclip.optim.docs import (
    CAPTURABLE_ARG_DOC, CLIP_ARG_DOC, CLIP_STATS_DOC, IMPL_ARGS_DOC, PRECISION_ARG_DOC,
    PRECISION_REFERENCES,
)
from fusedclip.optim.base import scalar_dtype as _scalar_dtype

__all__ = ["FusedClipAdam", "FusedClipAdamW"]


_ALGORITHM = r"""
    .. math::
       \begin{aligned}
            &\textbf{input}: \gamma \text{ (lr)}, \beta_1, \beta_2, \theta_0, \epsilon,
                \lambda \text{ (weight decay)}, \text{clip policy } C, \textit{amsgrad},
                \textit{maximize}                                                    \\
            &m_0, v_0, v_0^{max} \leftarrow 0                                        \\
            &\textbf{for}\: t=1 \: \textbf{to} \: \ldots \: \textbf{do}             \\
            &\hspace{5mm} g_t \leftarrow \nabla_\theta f_t(\theta_{t-1})
                \text{ (}-\nabla\text{ if maximize)}                                 \\
            &\hspace{5mm} \textbf{if}\: \text{any } g_t \text{ is inf/nan and nonfinite = skip}:
                \textbf{continue} \text{ (nothing changes, } t \text{ included)}     \\
            &\hspace{5mm} g_t \leftarrow c_t\, g_t, \quad
                c_t = C(\lVert g_t \rVert) \text{ e.g. }
                \min(1, \text{max\_norm} / (\lVert g_t \rVert + 10^{-6}))            \\
            &\hspace{5mm} {WEIGHT_DECAY}                                            \\
            &\hspace{5mm} m_t \leftarrow \beta_1 m_{t-1} + (1 - \beta_1) g_t         \\
            &\hspace{5mm} v_t \leftarrow \beta_2 v_{t-1} + (1-\beta_2) g^2_t         \\
            &\hspace{5mm} \textbf{if}\: \textit{amsgrad}:
                v_t^{max} \leftarrow \max(v_{t-1}^{max}, v_t), \; v_t \leftarrow v_t^{max} \\
            &\hspace{5mm} \theta_t \leftarrow \theta_t - \gamma \frac{m_t / (1-\beta_1^t)}
                {\sqrt{v_t / (1-\beta_2^t)} + \epsilon}                              \\
       \end{aligned}
"""

_ARGS = """
    Args:
        params (iterable): iterable of parameters or named parameters to
            optimize, or of dicts defining parameter groups.
        lr (float, Tensor, optional): learning rate (default: {lr})
        betas (Tuple[float, float], optional): coefficients used for computing
            running averages of gradient and its square (default: (0.9, 0.999))
        eps (float, optional): term added to the denominator to improve
            numerical stability (default: 1e-8)
        weight_decay (float, optional): weight decay coefficient (default: {wd})
        amsgrad (bool, optional): whether to use the AMSGrad variant
            (default: False)
        maximize (bool, optional): maximize the objective instead of minimizing
            (default: False){extra}
{impl_args}{clip_arg}
{clip_stats}
    State keys are torch's (``step``, ``exp_avg``, ``exp_avg_sq``,
    ``max_exp_avg_sq``): state dicts move between this optimizer and its
    torch.optim twin both ways. Complex parameters are optimized as their real
    views, as torch.optim does; the norm of a complex gradient is the norm of
    its real view. With ``clip=None`` a step is bit for bit torch's
    ``fused=True`` CPU step.

    .. note:: Unlike torch's fused optimizers, a GradScaler's unscaling is never
       written back into ``.grad``: the gradients keep their scaled values.

    References:
        Kingma & Ba, *Adam: A Method for Stochastic Optimization*, ICLR 2015.
        Loshchilov & Hutter, *Decoupled Weight Decay Regularization*, ICLR 2019.
        Reddi, Kale & Kumar, *On the Convergence of Adam and Beyond*, ICLR 2018.
        Pascanu, Mikolov & Bengio, *On the difficulty of training recurrent
        neural networks*, ICML 2013 (clipping by the global norm).
{precision_refs}"""


class FusedClipAdam(FusedClipOptimizer):
    __doc__ = (
        "Implements Adam with gradient clipping fused into the step.\n"
        "\n    Drop-in for ``torch.optim.Adam`` (same arguments, defaults and state),\n"
        "    plus keyword-only ``clip=``, ``nonfinite=`` and the mixed-precision options.\n"
        + _ALGORITHM.replace(
            "{WEIGHT_DECAY}",
            r"\textbf{if}\: \lambda \neq 0: \textbf{if} \textit{ decoupled}: "
            r"\theta_t \leftarrow \theta_{t-1} - \gamma \lambda \theta_{t-1} "
            r"\textbf{ else } g_t \leftarrow g_t + \lambda \theta_{t-1}",
        )
        + _ARGS.format(
            clip_arg=PRECISION_ARG_DOC + CLIP_ARG_DOC, precision_refs=PRECISION_REFERENCES, impl_args=IMPL_ARGS_DOC + CAPTURABLE_ARG_DOC,
            clip_stats=CLIP_STATS_DOC, lr="1e-3", wd="0",
            extra="\n        decoupled_weight_decay (bool, optional): if True, this optimizer is\n"
            "            equivalent to AdamW (default: False)",
        )
    )

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        master_weights: bool = False,
        store_param_remainders: bool = False,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
        clip=None,
        nonfinite: str = "skip",
        norm_group=None,
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize, foreach=foreach, capturable=capturable,
            differentiable=differentiable, fused=fused,
            decoupled_weight_decay=decoupled_weight_decay,
        )
        defaults.update(precision.defaults(master_weights, store_param_remainders, state_dtype,
                                           stochastic_rounding))
        super().__init__(params, defaults, clip=clip, nonfinite=nonfinite,
                         norm_group=norm_group)

    def _check_group(self, group: dict) -> None:
        # torch.optim.Adam's checks, in its order and with its messages; then
        # fusedclip's one refusal (tensor betas).
        lr, betas = group["lr"], group["betas"]
        tensor_flags_refused = group.get("foreach") and not group.get("capturable")
        if isinstance(lr, Tensor) and tensor_flags_refused:
            raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
        check_lr(lr)
        if not 0.0 <= group["eps"]:
            raise ValueError(f"Invalid epsilon value: {group['eps']}")
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair of floats, got {betas!r}")
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
        if not 0.0 <= group["weight_decay"]:
            raise ValueError(f"Invalid weight_decay value: {group['weight_decay']}")
        tensors = [isinstance(beta, Tensor) for beta in betas]
        if any(tensors):
            if not all(tensors):
                raise ValueError("betas must be either both floats or both Tensors")
            for i, beta in enumerate(betas):
                if tensor_flags_refused:
                    raise ValueError(f"betas[{i}] as a Tensor is not supported for "
                                     "capturable=False and foreach=True")
                if beta.numel() != 1:
                    raise ValueError(f"Tensor betas[{i}] must be 1-element")
            raise ValueError(f"betas[0] is a Tensor; {type(self).__name__} takes float betas")

    def _init_state(self, param: Tensor, group: dict, state: dict) -> None:
        state["step"] = torch.zeros((), dtype=_scalar_dtype(), device=param.device)
        state["exp_avg"] = precision.zeros(param, group)
        state["exp_avg_sq"] = precision.zeros(param, group)
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = precision.zeros(param, group)

    state_keys = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def _update(self, group, params, grads, states, *, originals, views, args) -> None:
        amsgrad = group["amsgrad"]
        if amsgrad:
            for p, s in zip(originals, states):
                if "max_exp_avg_sq" not in s:  # amsgrad switched on after the first step
                    s["max_exp_avg_sq"] = precision.zeros(p, group)
        keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if amsgrad else ("exp_avg", "exp_avg_sq")
        beta1, beta2 = group["betas"]
        ops.update_(
            "adam", params, grads, [state_list(states, key, views) for key in keys],
            state_list(states, "step", views=False),
            dict(beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                 amsgrad=amsgrad,
                 decoupled_weight_decay=group.get("decoupled_weight_decay", False)),
            args,
        )


class FusedClipAdamW(FusedClipAdam):
    __doc__ = (
        "Implements AdamW (Adam with decoupled weight decay) with gradient\n"
        "    clipping fused into the step.\n"
        "\n    Drop-in for ``torch.optim.AdamW`` (same arguments, defaults and state),\n"
        "    plus keyword-only ``clip=``, ``nonfinite=`` and the mixed-precision options.\n"
        + _ALGORITHM.replace(
            "{WEIGHT_DECAY}", r"\theta_t \leftarrow \theta_{t-1} - \gamma \lambda \theta_{t-1}"
        )
        + _ARGS.format(clip_arg=PRECISION_ARG_DOC + CLIP_ARG_DOC, precision_refs=PRECISION_REFERENCES, impl_args=IMPL_ARGS_DOC + CAPTURABLE_ARG_DOC,
                       clip_stats=CLIP_STATS_DOC, lr="1e-3", wd="1e-2", extra="")
    )

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
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
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            foreach=foreach, maximize=maximize, capturable=capturable,
            differentiable=differentiable, fused=fused, decoupled_weight_decay=True,
            master_weights=master_weights, store_param_remainders=store_param_remainders,
            state_dtype=state_dtype, stochastic_rounding=stochastic_rounding,
            clip=clip, nonfinite=nonfinite, norm_group=norm_group,
        )

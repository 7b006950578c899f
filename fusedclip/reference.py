"""Float64 reference formulas: the oracle of the tests.

Every optimizer and clip policy of fusedclip is written here once more, as
literally as the papers and torch.optim's documentation state it, in float64,
one tensor at a time, with no attempt at speed. Nothing in the library imports
this module.

``round_to`` emulates storage: after each step, parameters and state are
rounded to the dtype the fused optimizer keeps them in (bfloat16, say), so a
low-precision run can be compared with the reference step for step.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

CLIP_GRAD_NORM_EPS = 1e-6


def global_norm(grads: list[Tensor], norm_type: float = 2.0) -> Tensor:
    """The norm of all gradients together, in float64 (empty tensors add 0)."""
    grads = [g.detach().to(torch.float64).flatten() for g in grads]
    flat = torch.cat(grads) if grads else torch.zeros(0, dtype=torch.float64)
    if flat.numel() == 0:
        return torch.zeros((), dtype=torch.float64)
    if math.isinf(norm_type):
        return flat.abs().max()
    return flat.pow(2).sum().sqrt()


def global_norm_coefficient(total_norm: Tensor, max_norm: float) -> Tensor:
    """clip_grad_norm_'s coefficient: min(1, max_norm / (norm + 1e-6))."""
    return torch.clamp(max_norm / (total_norm + CLIP_GRAD_NORM_EPS), max=1.0)


def adam_step(param: Tensor, grad: Tensor, state: dict, *, lr: float, beta1: float,
              beta2: float, eps: float, weight_decay: float, amsgrad: bool,
              maximize: bool, decoupled_weight_decay: bool) -> None:
    """One Adam (or AdamW) step on one float64 parameter, in place.

    Kingma & Ba 2015, Algorithm 1, with torch.optim.Adam's options: L2 weight
    decay added to the gradient, or decoupled (Loshchilov & Hutter 2019);
    AMSGrad's running maximum of v (Reddi et al. 2018); maximize.
    """
    g = -grad if maximize else grad.clone()
    if weight_decay != 0:
        if decoupled_weight_decay:
            param.mul_(1 - lr * weight_decay)
        else:
            g = g + weight_decay * param
    state["step"] += 1
    t = state["step"]
    m = state["exp_avg"] = beta1 * state["exp_avg"] + (1 - beta1) * g
    v = state["exp_avg_sq"] = beta2 * state["exp_avg_sq"] + (1 - beta2) * g * g
    if amsgrad:
        v = state["max_exp_avg_sq"] = torch.maximum(state["max_exp_avg_sq"], v)
    m_hat = m / (1 - beta1 ** t)
    v_hat = v / (1 - beta2 ** t)
    param.sub_(lr * m_hat / (v_hat.sqrt() + eps))


def sgd_step(param: Tensor, grad: Tensor, state: dict, *, lr: float, momentum: float,
             dampening: float, weight_decay: float, nesterov: bool, maximize: bool) -> None:
    """One SGD step on one float64 parameter, in place, as torch.optim.SGD
    documents it: L2 weight decay; heavy-ball momentum (Polyak 1964) whose
    buffer starts as the first gradient; Nesterov momentum in the form of
    Sutskever et al. 2013; maximize."""
    g = -grad if maximize else grad.clone()
    if weight_decay != 0:
        g = g + weight_decay * param
    if momentum != 0:
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = g.clone()
        else:
            buf = momentum * buf + (1 - dampening) * g
        state["momentum_buffer"] = buf
        g = g + momentum * buf if nesterov else buf
    param.sub_(lr * g)


def adagrad_step(param: Tensor, grad: Tensor, state: dict, *, lr: float, lr_decay: float,
                 weight_decay: float, eps: float, maximize: bool) -> None:
    """One Adagrad step on one float64 parameter, in place: Duchi, Hazan &
    Singer 2011 (diagonal), with torch.optim.Adagrad's decayed learning rate,
    L2 weight decay and maximize."""
    g = -grad if maximize else grad.clone()
    state["step"] += 1
    t = state["step"]
    if weight_decay != 0:
        g = g + weight_decay * param
    clr = lr / (1 + (t - 1) * lr_decay)
    state["sum"] = state["sum"] + g * g
    param.sub_(clr * g / (state["sum"].sqrt() + eps))


class ReferenceOptimizer:
    """What every reference optimizer shares: float64 copies of the parameters,
    the global norm, clipping and the non-finite policy. Subclasses say how
    a parameter's state starts (``new_state``), how one parameter steps
    (``update``) and which state tensors are stored rounded (``ROUNDED``).

    ``step(grads)`` takes one gradient per parameter (None where a parameter
    has no gradient). Parameters are given as a list of groups: dicts with
    ``params`` (tensors, copied) and hyperparameters.
    """

    ROUNDED: tuple[str, ...] = ()

    def __init__(self, groups: list[dict], *, clip: float | None = None,
                 norm_type: float = 2.0, nonfinite: str = "skip",
                 round_to: torch.dtype | None = None) -> None:
        self.groups = []
        for group in groups:
            group = dict(group)
            group["params"] = [p.detach().to(torch.float64).clone() for p in group["params"]]
            self.groups.append(group)
        self.clip = clip
        self.norm_type = norm_type
        self.nonfinite = nonfinite
        self.round_to = round_to
        self.states: dict[tuple[int, int], dict] = {}
        self.skipped = 0
        self.last_norm: Tensor | None = None

    def params(self) -> list[Tensor]:
        return [p for group in self.groups for p in group["params"]]

    def _round(self, t: Tensor) -> Tensor:
        if self.round_to is None:
            return t
        return t.to(self.round_to).to(torch.float64)

    def new_state(self, param: Tensor, group: dict) -> dict:
        raise NotImplementedError

    def update(self, param: Tensor, grad: Tensor, state: dict, group: dict) -> None:
        raise NotImplementedError

    def step(self, grads: list[Tensor | None]) -> None:
        grads = [None if g is None else g.detach().to(torch.float64) for g in grads]
        present = [g for g in grads if g is not None]
        total = global_norm(present, self.norm_type)
        self.last_norm = total
        if not torch.isfinite(total):
            if self.nonfinite == "skip":
                self.skipped += 1
                return
            if self.nonfinite == "raise":
                raise RuntimeError("non-finite gradients")
        coef = 1.0 if self.clip is None else global_norm_coefficient(total, self.clip)
        index = 0
        for gi, group in enumerate(self.groups):
            for pi, p in enumerate(group["params"]):
                g = grads[index]
                index += 1
                if g is None:
                    continue
                state = self.states.setdefault((gi, pi), self.new_state(p, group))
                self.update(p, g * coef, state, group)
                p.copy_(self._round(p))
                for key in self.ROUNDED:
                    if state.get(key) is not None:
                        state[key] = self._round(state[key])


class ReferenceAdam(ReferenceOptimizer):
    """FusedClipAdam / FusedClipAdamW, literally, in float64."""

    ROUNDED = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def new_state(self, param: Tensor, group: dict) -> dict:
        return {
            "step": 0,
            "exp_avg": torch.zeros_like(param),
            "exp_avg_sq": torch.zeros_like(param),
            "max_exp_avg_sq": torch.zeros_like(param),
        }

    def update(self, param: Tensor, grad: Tensor, state: dict, group: dict) -> None:
        beta1, beta2 = group["betas"]
        adam_step(
            param, grad, state, lr=group["lr"], beta1=beta1, beta2=beta2,
            eps=group["eps"], weight_decay=group["weight_decay"],
            amsgrad=group["amsgrad"], maximize=group["maximize"],
            decoupled_weight_decay=group["decoupled_weight_decay"],
        )


class ReferenceSGD(ReferenceOptimizer):
    """FusedClipSGD, literally, in float64. ``momentum_buffer`` is absent (or
    None) until a parameter's first step that is not skipped."""

    ROUNDED = ("momentum_buffer",)

    def new_state(self, param: Tensor, group: dict) -> dict:
        return {}

    def update(self, param: Tensor, grad: Tensor, state: dict, group: dict) -> None:
        sgd_step(
            param, grad, state, lr=group["lr"], momentum=group["momentum"],
            dampening=group["dampening"], weight_decay=group["weight_decay"],
            nesterov=group["nesterov"], maximize=group["maximize"],
        )


class ReferenceAdagrad(ReferenceOptimizer):
    """FusedClipAdagrad, literally, in float64."""

    ROUNDED = ("sum",)

    def new_state(self, param: Tensor, group: dict) -> dict:
        return {"step": 0,
                "sum": torch.full_like(param, float(group["initial_accumulator_value"]))}

    def update(self, param: Tensor, grad: Tensor, state: dict, group: dict) -> None:
        adagrad_step(
            param, grad, state, lr=group["lr"], lr_decay=group["lr_decay"],
            weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
        )

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


def lion_step(param: Tensor, grad: Tensor, state: dict, *, lr: float, beta1: float,
              beta2: float, weight_decay: float, maximize: bool) -> None:
    """Chen et al. 2023, Lion: u = beta1 m + (1 - beta1) g; p = p (1 - lr wd) -
    lr sign(u); m = beta2 m + (1 - beta2) g."""
    g = -grad if maximize else grad
    m = state["exp_avg"]
    u = beta1 * m + (1 - beta1) * g
    param.mul_(1 - lr * weight_decay).sub_(lr * torch.sign(u))
    state["exp_avg"] = beta2 * m + (1 - beta2) * g


class ReferenceOptimizer:
    """What every reference optimizer shares: float64 copies of the parameters,
    the global norm, clipping and the non-finite policy. Subclasses say how
    a parameter's state starts (``new_state``), how one parameter steps
    (``update``) and which state tensors are stored rounded (``ROUNDED``).

    ``step(grads)`` takes one gradient per parameter (None where a parameter
    has no gradient). Parameters are given as a list of groups: dicts with
    ``params`` (tensors, copied) and hyperparameters. ``clip`` is a max_norm
    (global norm clipping) or a reference policy of the "Clip policies"
    section below, which is called only in steps that are not skipped.
    """

    ROUNDED: tuple[str, ...] = ()

    def __init__(self, groups: list[dict], *, clip=None,
                 norm_type: float = 2.0, nonfinite: str = "skip",
                 round_to: torch.dtype | None = None) -> None:
        self.groups = []
        for group in groups:
            group = dict(group)
            group["params"] = [p.detach().to(torch.float64).clone() for p in group["params"]]
            self.groups.append(group)
        # A max_norm is global norm clipping: that policy's reference below.
        self.clip = RefGlobalNorm(clip, norm_type) if isinstance(clip, (int, float)) else clip
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
        clipped = None
        if self.clip is not None:
            keys = [(gi, pi) for gi, group in enumerate(self.groups)
                    for pi in range(len(group["params"]))]
            present_keys = [k for k, g in zip(keys, grads) if g is not None]
            present_params = [p for p, g in zip(self.params(), grads) if g is not None]
            # The optimizer state of each, as it is before this step's update.
            self.clip.states = [
                self.states.setdefault(k, self.new_state(p, self.groups[k[0]]))
                for k, p in zip(present_keys, present_params)]
            clipped = iter(self.clip.clip_grads(present, present_keys, present_params))
        index = 0
        for gi, group in enumerate(self.groups):
            for pi, p in enumerate(group["params"]):
                g = grads[index]
                index += 1
                if g is None:
                    continue
                if clipped is not None:
                    g = next(clipped)
                state = self.states.setdefault((gi, pi), self.new_state(p, group))
                self.update(p, g, state, group)
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


class ReferenceLion(ReferenceOptimizer):
    """FusedClipLion, literally, in float64."""

    ROUNDED = ("exp_avg",)

    def new_state(self, param: Tensor, group: dict) -> dict:
        return {"exp_avg": torch.zeros_like(param)}

    def update(self, param: Tensor, grad: Tensor, state: dict, group: dict) -> None:
        beta1, beta2 = group["betas"]
        lion_step(param, grad, state, lr=group["lr"], beta1=beta1, beta2=beta2,
                  weight_decay=group["weight_decay"], maximize=group["maximize"])


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


# =========================================================================================
# Clip policies (fusedclip.clipping): the float64 formulas of each policy, literally as
# their sources state them. ``coefficients(grads, keys)`` gets the float64 gradients that
# are present in a step (never a skipped step: ReferenceOptimizer skips before it asks) and a
# key per gradient (its (group, index)), and returns one coefficient per gradient.
# ``clip_grads(grads, keys, params)`` returns the clipped gradients themselves (by default
# each gradient times its coefficient); policies that are not one coefficient per gradient
# (element-wise, per unit) override it. ``params`` are the float64 parameters of the
# gradients, before this step's update.
# =========================================================================================
class ReferencePolicy:
    def coefficients(self, grads: list[Tensor], keys: list) -> list[Tensor]:  # pragma: no cover
        raise NotImplementedError

    def clip_grads(self, grads: list[Tensor], keys: list, params: list[Tensor]) -> list[Tensor]:
        return [g * c for g, c in zip(grads, self.coefficients(grads, keys))]


def tensor_norm(grad: Tensor, norm_type: float = 2.0) -> Tensor:
    """The norm of one gradient, in float64 (an empty one has norm 0)."""
    return global_norm([grad], norm_type)


class RefGlobalNorm(ReferencePolicy):
    """clip_grad_norm_: c = min(1, max_norm / (||g|| + 1e-6)) for all gradients."""

    def __init__(self, max_norm: float, norm_type: float = 2.0) -> None:
        self.max_norm, self.norm_type = max_norm, norm_type

    def coefficients(self, grads, keys):
        c = global_norm_coefficient(global_norm(grads, self.norm_type), self.max_norm)
        return [c] * len(grads)


class RefPerTensorNorm(ReferencePolicy):
    """clip_grad_norm_ on each gradient alone: c_i = min(1, max_norm / (||g_i|| + 1e-6))."""

    def __init__(self, max_norm: float, norm_type: float = 2.0) -> None:
        self.max_norm, self.norm_type = max_norm, norm_type

    def coefficients(self, grads, keys):
        return [global_norm_coefficient(tensor_norm(g, self.norm_type), self.max_norm)
                for g in grads]


class RefSmoothClip(ReferencePolicy):
    """Zhang, He, Sra & Jadbabaie 2020: c = threshold / (threshold + ||g||)."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def coefficients(self, grads, keys):
        c = self.threshold / (self.threshold + global_norm(grads))
        return [c] * len(grads)


class RefNormalize(ReferencePolicy):
    """Normalized gradient: c = 1 / (||g|| + eps)."""

    def __init__(self, eps: float = 1e-6) -> None:
        self.eps = eps

    def coefficients(self, grads, keys):
        c = 1.0 / (global_norm(grads) + self.eps)
        return [c] * len(grads)


def percentile_linear(values: list[float], percentile: float) -> float:
    """numpy.percentile(values, percentile) with its default "linear" method,
    as numpy computes it: virtual index (n - 1) q, and numpy's _lerp of the
    two neighbours (from the upper one when the weight is >= 0.5)."""
    x = sorted(values)
    n = len(x)
    virtual = (n - 1) * (percentile / 100)
    below = math.floor(virtual)
    weight = virtual - below
    if virtual >= n - 1:
        a = b = x[-1]
    else:
        a, b = x[below], x[below + 1]
    diff = b - a
    return b - diff * (1 - weight) if weight >= 0.5 else a + diff * weight


class RefAutoClip(ReferencePolicy):
    """Seetharaman et al. 2020's autoclip_gradient: append the global norm to
    the history, clip_grad_norm_ with max_norm = np.percentile(history, p).
    The history keeps the last `history` norms (the paper's keeps all)."""

    def __init__(self, percentile: float = 10.0, history: int = 10000) -> None:
        self.percentile, self.history = percentile, history
        self.norms: list[float] = []
        self.threshold: float | None = None

    def coefficients(self, grads, keys):
        total = global_norm(grads)
        self.norms.append(float(total))
        self.norms = self.norms[-self.history:]
        self.threshold = percentile_linear(self.norms, self.percentile)
        c = global_norm_coefficient(total, self.threshold)
        return [c] * len(grads)


class RefZClip(ReferencePolicy):
    """zclip 1.0.0's ZClip.step, line by line, on Python floats (zclip takes
    the norm's .item()): warm-up buffer and clip_grad_norm_(max_grad_norm),
    then z-score (or percentile) thresholds and the EMA of mean and variance."""

    def __init__(self, alpha=0.97, z_thresh=2.5, max_norm=1.0, eps=1e-6, warmup_steps=25,
                 mode="zscore", clip_option="adaptive_scaling", clip_factor=1.0,
                 skip_update_on_spike=False) -> None:
        self.alpha, self.z_thresh, self.max_grad_norm, self.eps = alpha, z_thresh, max_norm, eps
        self.warmup_steps, self.mode, self.clip_option = warmup_steps, mode, clip_option
        self.clip_factor, self.skip_update_on_spike = clip_factor, skip_update_on_spike
        self.buffer: list[float] = []
        self.initialized = False
        self.mean = self.var = None

    def _compute_clip_val(self, grad_norm):
        std = self.var ** 0.5
        if self.mode == "percentile":
            threshold = self.mean + self.z_thresh * std
            if grad_norm > threshold:
                return threshold
        else:
            z = (grad_norm - self.mean) / (std + self.eps)
            if z > self.z_thresh:
                if self.clip_option == "adaptive_scaling":
                    eta = z / self.z_thresh
                    threshold = self.mean + (self.z_thresh * std) / eta
                    threshold = threshold * self.clip_factor
                else:
                    threshold = self.mean
                return threshold
        return None

    def coefficients(self, grads, keys):
        total_norm = float(global_norm(grads))
        if not self.initialized:
            self.buffer.append(total_norm)
            if len(self.buffer) >= self.warmup_steps:
                self.mean = sum(self.buffer) / len(self.buffer)
                self.var = sum((x - self.mean) ** 2 for x in self.buffer) / len(self.buffer)
                self.initialized = True
                self.buffer = []
            c = 1.0
            if self.max_grad_norm is not None:
                c = float(global_norm_coefficient(torch.tensor(total_norm, dtype=torch.float64),
                                                  self.max_grad_norm))
            return [torch.tensor(c, dtype=torch.float64)] * len(grads)
        clip_val = self._compute_clip_val(total_norm)
        adaptive_clip = clip_val if clip_val is not None else total_norm
        effective = adaptive_clip if self.max_grad_norm is None else min(adaptive_clip, self.max_grad_norm)
        c = (effective / (total_norm + 1e-6)) if total_norm > effective else 1.0
        if not (clip_val is not None and self.skip_update_on_spike):
            x = clip_val if clip_val is not None else total_norm
            self.mean = self.alpha * self.mean + (1 - self.alpha) * x
            self.var = self.alpha * self.var + (1 - self.alpha) * (x - self.mean) ** 2
        return [torch.tensor(c, dtype=torch.float64)] * len(grads)


class RefAdaGC(ReferencePolicy):
    """The clipping of pytorch_optimizer 4.1.0's AdaGC optimizer, per tensor:
    in a tensor's first step, or while its step < warmup_steps, the global
    scale min(lambda_abs / (||g|| + eps), 1) and gamma = min(gamma, ||g_hat||);
    afterwards h = min(1, lambda_rel max(gamma, eps) / max(||g_i||, eps)) and
    gamma <- lerp(gamma, ||g_hat||, 1 - beta). The step is counted per tensor."""

    def __init__(self, beta=0.98, lambda_abs=1.0, lambda_rel=1.05, warmup_steps=100, eps=1e-8):
        self.beta, self.lambda_abs, self.lambda_rel = beta, lambda_abs, lambda_rel
        self.warmup_steps, self.eps = warmup_steps, eps
        self.gamma: dict = {}
        self.step: dict = {}

    def coefficients(self, grads, keys):
        total = global_norm(grads)
        warm_scale = torch.clamp(self.lambda_abs / (total + self.eps), max=1.0)
        out = []
        for g, key in zip(grads, keys):
            self.step[key] = self.step.get(key, 0) + 1
            gamma = self.gamma.get(key)
            if gamma is None or self.step[key] < self.warmup_steps:
                g_hat_norm = tensor_norm(g * warm_scale)
                self.gamma[key] = g_hat_norm if gamma is None else torch.minimum(gamma, g_hat_norm)
                out.append(warm_scale)
            else:
                h = torch.clamp(self.lambda_rel * torch.clamp(gamma, min=self.eps)
                                / torch.clamp(tensor_norm(g), min=self.eps), max=1.0)
                self.gamma[key] = gamma + (1 - self.beta) * (tensor_norm(g * h) - gamma)
                out.append(h)
        return out


class RefValueClip(ReferencePolicy):
    """torch.nn.utils.clip_grad_value_: every element clamped to [-v, v]."""

    def __init__(self, clip_value: float) -> None:
        self.clip_value = clip_value

    def clip_grads(self, grads, keys, params):
        return [torch.clamp(g, -self.clip_value, self.clip_value) for g in grads]


class RefSpikeClip(ReferencePolicy):
    """Huang et al. 2025 (SPAM), spike clipping: where g^2 > theta * v, with v
    the optimizer's second moment before this step (exp_avg_sq), g becomes
    sign(g) * sqrt(theta * v); elements with v = 0 are left alone."""

    def __init__(self, theta: float = 5000.0) -> None:
        self.theta = theta

    def clip_grads(self, grads, keys, params):
        out = []
        for g, state in zip(grads, self.states):
            v = state["exp_avg_sq"]
            bound = self.theta * v
            spike = (g * g > bound) & (v > 0)
            out.append(torch.where(spike, torch.sign(g) * torch.sqrt(bound), g))
        return out


def unitwise_norm(x: Tensor) -> Tensor:
    """The L2 norm of every unit of x, in float64: one per index of dim 0 (over
    all other dims), a single one for 0-d and 1-d x; always 1-D."""
    x = x.to(torch.float64)
    if x.dim() <= 1:
        return x.norm(2).reshape(1)
    return x.flatten(1).norm(2, dim=1)  # (flatten: a (0, n) x has no unit)


class RefAGC(ReferencePolicy):
    """Brock, De, Smith & Simonyan 2021, adaptive gradient clipping, as timm's
    adaptive_clip_grad computes it, per unit i (index of dim 0; the whole tensor
    for ndim <= 1): m_i = clip_factor * max(||W_i||, eps); the gradient of the
    unit is kept where ||G_i|| < m_i, else scaled by m_i / max(||G_i||, 1e-6).
    That is c_i = min(1, clip_factor max(||W_i||, eps) / max(||G_i||, 1e-6))
    except where m_i < 1e-6. ``last`` keeps the coefficients of the last call,
    one 1-D tensor per gradient."""

    def __init__(self, clip_factor: float = 0.01, eps: float = 1e-3) -> None:
        self.clip_factor, self.eps = clip_factor, eps
        self.last: list[Tensor] = []

    def clip_grads(self, grads, keys, params):
        out, self.last = [], []
        for g, p in zip(grads, params):
            max_norm = torch.clamp(unitwise_norm(p), min=self.eps) * self.clip_factor
            g_norm = unitwise_norm(g)
            c = torch.where(g_norm < max_norm, torch.ones_like(g_norm),
                            max_norm / torch.clamp(g_norm, min=1e-6))
            self.last.append(c)
            out.append(g * c.reshape((-1,) + (1,) * (g.dim() - 1)) if g.dim() > 1 else g * c[0])
        return out


class RefChain(ReferencePolicy):
    """fusedclip.Chain: the policies one after the other, each clipping the
    gradients the one before it returned (SpikeClip reading the optimizer
    state as it is before this step's update, as alone)."""

    def __init__(self, *policies: ReferencePolicy) -> None:
        self.policies = policies
        self.last: list[Tensor] = []

    def clip_grads(self, grads, keys, params):
        """``last`` keeps the product of the members' coefficients of this
        call, one per gradient (1-D, one per unit, after a per-unit member;
        else 0-d): what the fused chain reports as ``clip_coef``."""
        coefs = [torch.ones((), dtype=torch.float64)] * len(grads)
        for policy in self.policies:
            policy.states = getattr(self, "states", None)
            if type(policy).coefficients is not ReferencePolicy.coefficients:
                member = policy.coefficients(grads, keys)  # a coefficient per gradient
                grads = [g * c for g, c in zip(grads, member)]
            else:  # per unit (``last``) or element-wise (no coefficient)
                grads = policy.clip_grads(grads, keys, params)
                member = getattr(policy, "last", None) or [1.0] * len(grads)
            coefs = [a * c for a, c in zip(coefs, member)]
        self.last = coefs
        return grads


# -- Mixed precision: the roundings of csrc/include/fusedclip/precision.h -------------------
# Written with integer tensor ops (int64, masked to 32 bits) and Python ints, so
# the kernels' bits can be checked bit for bit.

MASK32 = 0xFFFFFFFF
MASK64 = 0xFFFFFFFFFFFFFFFF


def _float_bits(x: Tensor) -> Tensor:
    """The bits of a float32 tensor as int64 values in [0, 2^32)."""
    return x.to(torch.float32).contiguous().view(torch.int32).to(torch.int64) & MASK32


def _bf16_from_bits(bits: Tensor) -> Tensor:
    """bfloat16 values from int64 bit patterns in [0, 2^16)."""
    signed = torch.where(bits >= 0x8000, bits - 0x10000, bits)
    return signed.to(torch.int16).view(torch.bfloat16)


def _is_nan_bits(m: Tensor) -> Tensor:
    return (m & 0x7FFFFFFF) > 0x7F800000


def round_bf16_half_away(master: Tensor) -> Tensor:
    """The bfloat16 parameter of an fp32 master: to nearest, ties away from zero,
    by bits ((m + 0x8000) >> 16); NaN gives a quiet NaN."""
    m = _float_bits(master)
    bits = torch.where(_is_nan_bits(m), (m >> 16) | 0x0040, (m + 0x8000) >> 16) & 0xFFFF
    return _bf16_from_bits(bits).reshape(master.shape)


def bf16_remainder(master: Tensor) -> Tensor:
    """The int16 low bits that rebuild the fp32 master from round_bf16_half_away (0 for NaN)."""
    m = _float_bits(master)
    low = torch.where(_is_nan_bits(m), torch.zeros_like(m), m & 0xFFFF)
    return torch.where(low >= 0x8000, low - 0x10000, low).to(torch.int16).reshape(master.shape)


def bf16_rebuild(param: Tensor, remainder: Tensor) -> Tensor:
    """The fp32 master of a bfloat16 parameter and its int16 remainder:
    (bits(param) << 16) + remainder, a signed add modulo 2^32."""
    p = param.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF
    m = ((p << 16) + remainder.to(torch.int64)) & MASK32
    m = torch.where(m >= 2**31, m - 2**32, m)
    return m.to(torch.int32).view(torch.float32).reshape(param.shape)


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def sr_key(seed: int, counter: int, slot: int) -> tuple[int, int]:
    """The key (k0, k1) of one array of one call: a parameter's [seed, counter]
    (the counter before the call's increment) and the array's slot (0 the
    parameter, 1 + k state k)."""
    z = _splitmix64(seed & MASK64)
    z = _splitmix64(z ^ (counter & MASK64))
    k0 = z & MASK32  # the same for every slot (the kernels share the first round)
    z = _splitmix64(z ^ (slot & MASK64))
    return k0, z >> 32


def _mul32(x: Tensor, c: int) -> Tensor:
    """x * c modulo 2^32 for x in [0, 2^32), without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & MASK32


def _lowbias32(x: Tensor) -> Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x21F0AAAD)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x735A2D97)
    return x ^ (x >> 15)


def sr_bits(key: tuple[int, int], index: Tensor) -> Tensor:
    """The random bits (int64 values in [0, 2^32)) of the elements `index`
    (their flat indices in the array the kernel walks) of the array keyed
    `key`: 16 per element, the high half (the low half zero). In every aligned
    span of 512 elements, elements j and j + 256 share one hash h of the word
    w = (low32(index) >> 9) * 256 + (index & 255) and the high 32 bits: h's
    low half is element j's, its high half element j + 256's."""
    k0, k1 = key
    index = index.to(torch.int64)
    low = index & MASK32
    word = ((low >> 9) << 8) | (low & 0xFF)
    x = _lowbias32(word ^ k0)
    x = x ^ k1 ^ _lowbias32(index >> 32)
    h = _lowbias32(x)
    return torch.where((index & 0x100) != 0, h & 0xFFFF0000, (h << 16) & MASK32)


def stochastic_round(x: Tensor, dtype: torch.dtype, bits: Tensor) -> Tensor:
    """x (float32) rounded to bfloat16 or float16 stochastically with random
    bits per element (int64 in [0, 2^32), as sr_bits gives them), as the
    kernels round: bfloat16 by bits(x) + (r >> 16), truncated; float16 by
    (floor(q) + (u < frac(q))) * ulp with q = |x| / ulp, ulp the float16
    spacing at |x| and u = (r >> 8) * 2^-24."""
    x = x.to(torch.float32).reshape(-1)
    bits = bits.reshape(-1)
    if dtype == torch.bfloat16:
        m = _float_bits(x)
        out = torch.where(_is_nan_bits(m), (m >> 16) | 0x0040, (m + (bits >> 16)) >> 16) & 0xFFFF
        return _bf16_from_bits(out)
    assert dtype == torch.float16
    ax = x.abs().to(torch.float64)
    _, exp = torch.frexp(ax)                     # ax = mantissa * 2^exp, mantissa in [0.5, 1)
    e = torch.clamp(exp.to(torch.int64) - 1, min=-14)
    e = torch.where(ax == 0, torch.full_like(e, -14), e)
    ulp = torch.pow(2.0, (e - 10).to(torch.float64))
    q = ax / ulp
    whole = torch.floor(q)
    u = (bits >> 8).to(torch.float64) * 2.0**-24
    rounded = (whole + (u < q - whole).to(torch.float64)) * ulp
    out = torch.copysign(rounded, x.to(torch.float64)).to(torch.float16)
    keep = ~torch.isfinite(x)
    return torch.where(keep, x.to(torch.float16), out)

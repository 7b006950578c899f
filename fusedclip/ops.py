"""Thin Python wrappers over ``torch.ops.fusedclip.*``, and their fake kernels.

The fake kernels describe each op's outputs without computing them, so
``torch.compile`` can trace through an optimizer step and
``torch.library.opcheck`` can test the registrations.
"""

from __future__ import annotations

import torch

from fusedclip import _extension

_extension.load()

_ops = torch.ops.fusedclip
# Reports a bad FUSEDCLIP_CPU_PREFETCH at import, not at the first step.
_ops.cpu_tuning(None)


def multi_tensor_norm(tensors: list[torch.Tensor], norm_type: float = 2.0):
    """Per-tensor norms, the global norm and a non-finite flag, in one read.

    Returns ``(tensor_norms, total_norm, nonfinite)``: a 1-D tensor of
    ``len(tensors)`` norms, the norm of all tensors together (what
    ``torch.nn.utils.clip_grad_norm_`` computes), and a float32 0/1 flag that is
    1 when that global norm is not finite. Norms are float64 for float64 inputs,
    float32 otherwise. ``norm_type`` is 2.0 or ``inf``.
    """
    if len(tensors) == 0:
        # The dispatcher cannot route a call without a tensor, so the empty
        # list is answered here, as the kernel and the fake kernel would
        # (no norms, a zero global norm, finite), after the same argument check.
        if float(norm_type) not in (2.0, float("inf")):
            raise RuntimeError(f"fusedclip: norm_type must be 2.0 or inf, got {float(norm_type)}")
        return torch.zeros(0), torch.zeros(()), torch.zeros(())
    return _ops.multi_tensor_norm(tensors, float(norm_type))


@torch.library.register_fake("fusedclip::multi_tensor_norm")
def _multi_tensor_norm_fake(tensors, norm_type):
    if len(tensors) == 0:
        device, dtype = torch.device("cpu"), torch.float32
    else:
        device = tensors[0].device
        dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    return (
        torch.empty(len(tensors), dtype=dtype, device=device),
        torch.empty((), dtype=dtype, device=device),
        torch.empty((), dtype=torch.float32, device=device),
    )


def multi_tensor_unit_norm(tensors: list[torch.Tensor], norm_type: float = 2.0):
    """Per-unit norms, per-tensor norms, the global norm and a non-finite flag,
    in one read of every tensor.

    A unit is one index of dim 0 (the norm over all other dims, as timm's
    ``unitwise_norm``), and the whole tensor for 0-d and 1-d tensors. Returns
    ``(unit_norms, tensor_norms, total_norm, nonfinite)``: ``unit_norms`` is one
    1-D tensor with the units of all tensors, tensor by tensor (``size(0)``
    norms each, or 1 for ndim <= 1: see :func:`unit_counts`; ``split`` gives
    one tensor per input), the rest as :func:`multi_tensor_norm` returns them.
    """
    if len(tensors) == 0:
        if float(norm_type) not in (2.0, float("inf")):
            raise RuntimeError(f"fusedclip: norm_type must be 2.0 or inf, got {float(norm_type)}")
        return torch.zeros(0), torch.zeros(0), torch.zeros(()), torch.zeros(())
    return _ops.multi_tensor_unit_norm(tensors, float(norm_type))


def unit_counts(tensors: list[torch.Tensor]) -> list[int]:
    """Units of each tensor: ``size(0)``, or 1 for 0-d and 1-d tensors."""
    return [t.shape[0] if t.dim() > 1 else 1 for t in tensors]


@torch.library.register_fake("fusedclip::multi_tensor_unit_norm")
def _multi_tensor_unit_norm_fake(tensors, norm_type):
    norms, total, flag = _multi_tensor_norm_fake(tensors, norm_type)
    units = sum(unit_counts(tensors))
    return torch.empty(units, dtype=norms.dtype, device=norms.device), norms, total, flag


def adam_(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *,
    lr: float, lr_tensor: torch.Tensor | None, beta1: float, beta2: float, eps: float,
    weight_decay: float, amsgrad: bool, maximize: bool, decoupled_weight_decay: bool,
    clip_coef: torch.Tensor | None, grad_scale: torch.Tensor | None,
    found_inf: torch.Tensor | None, clip_value: float | None = None,
    unit_coefs: list[torch.Tensor] | None = None,
) -> None:
    """Adam/AdamW over many tensors in place (see csrc/ops.cpp for the schema).

    The gradient used is ``clamp(grad * clip_coef * unit_coef / grad_scale,
    -clip_value, clip_value)`` (negated when ``maximize``), with ``unit_coefs``
    one tensor per parameter holding a coefficient per index of dim 0 (one for
    0-d and 1-d parameters); where ``found_inf`` is non-zero nothing changes, step
    counters included. Each ``steps[i]`` is incremented before its bias
    corrections are computed.
    """
    _ops.adam_(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
        lr=lr, lr_tensor=lr_tensor, beta1=beta1, beta2=beta2, eps=eps,
        weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
        decoupled_weight_decay=decoupled_weight_decay, clip_coef=clip_coef,
        grad_scale=grad_scale, found_inf=found_inf,
        clip_value=None if clip_value is None else float(clip_value), unit_coefs=unit_coefs,
    )


@torch.library.register_fake("fusedclip::adam_")
def _adam_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *,
               lr, lr_tensor, beta1, beta2, eps, weight_decay, amsgrad, maximize,
               decoupled_weight_decay, clip_coef, grad_scale, found_inf, clip_value=None,
               unit_coefs=None):
    return None


def sgd_(
    params, grads, momentum_buffers, buffer_steps, *,
    lr: float, lr_tensor: torch.Tensor | None, momentum: float, dampening: float,
    weight_decay: float, nesterov: bool, maximize: bool,
    clip_coef: torch.Tensor | None, grad_scale: torch.Tensor | None,
    found_inf: torch.Tensor | None, clip_value: float | None = None,
    unit_coefs: list[torch.Tensor] | None = None,
) -> None:
    """SGD (momentum, dampening, Nesterov) over many tensors in place (see
    csrc/ops.cpp for the schema).

    Without momentum, ``momentum_buffers`` and ``buffer_steps`` are empty.
    ``buffer_steps[i]`` counts the steps buffer i has taken: where it is 0 the
    gradient is copied into the buffer (torch.optim.SGD's first step), after
    which it is incremented. The gradient used is, as for :func:`adam_`,
    ``clamp(grad * clip_coef * unit_coef / grad_scale, -clip_value,
    clip_value)`` (negated when ``maximize``); where ``found_inf`` is non-zero
    nothing changes, ``buffer_steps`` included.
    """
    _ops.sgd_(
        params, grads, momentum_buffers, buffer_steps,
        lr=lr, lr_tensor=lr_tensor, momentum=momentum, dampening=dampening,
        weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
        clip_coef=clip_coef, grad_scale=grad_scale, found_inf=found_inf,
        clip_value=None if clip_value is None else float(clip_value), unit_coefs=unit_coefs,
    )


@torch.library.register_fake("fusedclip::sgd_")
def _sgd_fake(params, grads, momentum_buffers, buffer_steps, *, lr, lr_tensor, momentum,
              dampening, weight_decay, nesterov, maximize, clip_coef, grad_scale, found_inf,
              clip_value=None, unit_coefs=None):
    return None


def adagrad_(
    params, grads, state_sums, steps, *,
    lr: float, lr_tensor: torch.Tensor | None, lr_decay: float, weight_decay: float,
    eps: float, maximize: bool, clip_coef: torch.Tensor | None,
    grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None,
    clip_value: float | None = None, unit_coefs: list[torch.Tensor] | None = None,
) -> None:
    """Adagrad over many tensors in place (see csrc/ops.cpp for the schema).

    Each ``steps[i]`` is incremented before the decayed learning rate
    ``lr / (1 + (step - 1) * lr_decay)`` is computed. Gradient (``clip_coef``,
    ``grad_scale``, ``clip_value``, ``unit_coefs``), ``found_inf`` and
    ``lr_tensor`` as for :func:`adam_`.
    """
    _ops.adagrad_(
        params, grads, state_sums, steps,
        lr=lr, lr_tensor=lr_tensor, lr_decay=lr_decay, weight_decay=weight_decay, eps=eps,
        maximize=maximize, clip_coef=clip_coef, grad_scale=grad_scale, found_inf=found_inf,
        clip_value=None if clip_value is None else float(clip_value), unit_coefs=unit_coefs,
    )


@torch.library.register_fake("fusedclip::adagrad_")
def _adagrad_fake(params, grads, state_sums, steps, *, lr, lr_tensor, lr_decay, weight_decay,
                  eps, maximize, clip_coef, grad_scale, found_inf, clip_value=None,
                  unit_coefs=None):
    return None


def cpu_tuning(prefetch_distance: int | None = None) -> tuple[str, int]:
    """How the CPU kernels run on this machine: ``(vector_arch,
    prefetch_distance)``, the SIMD set they were compiled for (``"avx512"``,
    ``"avx2"`` or ``"default"``) and how many bytes ahead their loops prefetch
    in software (0: not at all).

    The distance starts from the environment variable
    ``FUSEDCLIP_CPU_PREFETCH`` where set, else from the CPU (none on AMD,
    2048 elsewhere: see csrc/cpu/cpu_tuning.cpp). Passing
    ``prefetch_distance`` sets it for the whole process first; results never
    depend on it, only speed does (bench/bench_prefetch.py compares settings).
    """
    if prefetch_distance is not None:
        prefetch_distance = int(prefetch_distance)
    return tuple(_ops.cpu_tuning(prefetch_distance))

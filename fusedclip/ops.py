"""Thin Python wrappers over ``torch.ops.fusedclip.*``, and their fake kernels.

The fake kernels describe each op's outputs without computing them, so
``torch.compile`` can trace through an optimizer step and
``torch.library.opcheck`` can test the registrations.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch

from fusedclip import _extension

_extension.load()

_ops = torch.ops.fusedclip
# Reports a bad FUSEDCLIP_CPU_PREFETCH or FUSEDCLIP_CPU_CAPABILITY at import, not at the
# first step.
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


class StepArgs(NamedTuple):
    """The arguments every update op takes (csrc/update_op.h), whatever its rule.

    The gradient a rule sees is ``spike(clamp(grad * clip_coef * unit_coef /
    grad_scale, -clip_value, clip_value), v)``, negated when ``maximize``
    (csrc/include/fusedclip/grad_transform.h); where ``found_inf`` is non-zero
    nothing changes, step counters included.

    Attributes:
        lr (float or Tensor): the learning rate; a 1-element tensor is read
            by the kernel (on the parameters' device without a sync; a CPU
            tensor on the host).
        clip_coef (Tensor, optional): one coefficient, or one per tensor.
        grad_scale, found_inf (Tensor, optional): a GradScaler's.
        clip_value (float, optional): clamp each gradient element to +-it.
        spike_theta (float, optional): clip elements whose square exceeds
            theta times the second moment (rules that keep one).
        unit_coefs (list of Tensor, optional): per tensor, one coefficient per
            index of dim 0 (one for 0-d and 1-d tensors).
        maximize (bool): negate the gradient.
        masters (list of Tensor, optional): per parameter, its fp32 master
            weights: float32 (bfloat16/float16 parameters), or int16, the
            low 16 bits of the fp32 master (bfloat16 parameters: the
            parameter and its remainder are the master exactly). The math
            reads and writes the master; the parameter is written from it,
            rounded to nearest (csrc/include/fusedclip/precision.h).
        sr_generators (list of Tensor, optional): per parameter, an int64
            tensor ``[seed, counter]`` on its device: every bfloat16/float16
            value written from fp32 math (a parameter without master, states
            of those dtypes) is rounded stochastically, with random bits
            keyed by the seed, the counter, the array and the element; the
            counter is incremented after each call that is not skipped.
    """

    lr: float | torch.Tensor
    clip_coef: torch.Tensor | None = None
    grad_scale: torch.Tensor | None = None
    found_inf: torch.Tensor | None = None
    clip_value: float | None = None
    spike_theta: float | None = None
    unit_coefs: list[torch.Tensor] | None = None
    maximize: bool = False
    masters: list[torch.Tensor] | None = None
    sr_generators: list[torch.Tensor] | None = None


# Every update rule (csrc/include/fusedclip/rules.h) and the names of its
# hyperparameters, in the order its op takes them (as its header states them).
RULES: dict[str, list[str]] = {
    rule: list(_ops.rule_hyperparameters(rule)) for rule in _ops.update_rules()
}


def update_(rule: str, params: list[torch.Tensor], grads: list[torch.Tensor],
            states: list[list[torch.Tensor]], steps: list[torch.Tensor], hyper: dict,
            args: StepArgs) -> None:
    """One step of the update rule ``rule`` (a key of ``RULES``) over many
    tensors in place: ``torch.ops.fusedclip.<rule>_``.

    ``states`` holds the rule's state lists, one tensor per parameter each,
    in the order its header (csrc/include/fusedclip/<rule>.h) gives, e.g.
    Adam's exp_avg, exp_avg_sq and, with amsgrad, max_exp_avg_sq. ``steps``
    holds one 0-d counter per parameter where the rule counts steps (Adam,
    Adagrad; SGD with momentum, where it counts the buffer's steps: its first
    step copies the gradient in), else is empty; each is incremented before
    it is used. ``hyper`` maps every name of ``RULES[rule]`` to its value.
    A state list may have another dtype than the parameters (float32,
    bfloat16, float16: the math is then float32; float64 does not mix).
    """
    lr = args.lr
    lr_tensor = None
    if isinstance(lr, torch.Tensor):
        lr, lr_tensor = 0.0, lr
    getattr(_ops, rule + "_")(
        params, grads, list(itertools.chain.from_iterable(states)), steps,
        hyper=[float(hyper[name]) for name in RULES[rule]],
        lr=float(lr), lr_tensor=lr_tensor, clip_coef=args.clip_coef,
        grad_scale=args.grad_scale, found_inf=args.found_inf,
        clip_value=None if args.clip_value is None else float(args.clip_value),
        spike_theta=None if args.spike_theta is None else float(args.spike_theta),
        unit_coefs=args.unit_coefs, masters=args.masters, sr_generators=args.sr_generators,
        maximize=bool(args.maximize),
    )


def _update_fake(params, grads, states, steps, *, hyper, lr, lr_tensor, clip_coef, grad_scale,
                 found_inf, clip_value, spike_theta, unit_coefs, masters, sr_generators,
                 maximize):
    return None


for _rule in RULES:
    torch.library.register_fake(f"fusedclip::{_rule}_")(_update_fake)


def tensors_like(tensors: list[torch.Tensor], dtype: torch.dtype, device: torch.device) -> bool:
    """Whether every tensor is a dense (strided) tensor of ``dtype`` on
    ``device``: one call for a list (metadata only, no device sync)."""
    return _ops.tensors_like(tensors, dtype, device)


def cpu_tuning(prefetch_distance: int | None = None) -> tuple[str, int]:
    """How the CPU kernels run on this machine: ``(vector_arch,
    prefetch_distance)``, the SIMD set they run with (``"avx512"``, ``"avx2"``
    or ``"default"``) and how many bytes ahead their loops prefetch in software
    (0: not at all).

    The kernels are compiled once per set; when the library loads it picks the
    widest the CPU supports, capped by the environment variable
    ``FUSEDCLIP_CPU_CAPABILITY`` (``default``, ``avx2`` or ``avx512``, as
    ``ATEN_CPU_CAPABILITY`` caps torch's kernels; see csrc/cpu/dispatch.cpp).

    The distance starts from the environment variable
    ``FUSEDCLIP_CPU_PREFETCH`` where set, else from the CPU (none on AMD,
    2048 elsewhere: see csrc/cpu/cpu_tuning.cpp). Passing
    ``prefetch_distance`` sets it for the whole process first; results never
    depend on it, only speed does (bench/bench_prefetch.py compares settings).
    """
    if prefetch_distance is not None:
        prefetch_distance = int(prefetch_distance)
    return tuple(_ops.cpu_tuning(prefetch_distance))

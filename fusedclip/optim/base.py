"""What every fused optimizer shares: input checks, the norm pass, the clip
policy, the non-finite policy and the GradScaler hand-off.

One ``step()``:

1. checks every group and gradient (nothing has changed if this raises);
2. norm pass: one ``multi_tensor_norm`` per (device, dtype) over all gradients
   of all groups, combined into the global norm and a non-finite flag;
3. the clip policy turns the norm into a coefficient, on the device;
4. update pass: the subclass's fused op per group and (device, dtype), which
   applies coefficient, ``grad_scale`` and the skip flag as it reads each
   gradient.

Nothing in it reads a device value on the host, except ``nonfinite="raise"``,
which must know whether to raise.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import Tensor
from torch.optim import Optimizer

from fusedclip import ops
from fusedclip.clipping import as_policy

NONFINITE_POLICIES = ("skip", "raise", "propagate")
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_lr(lr, where: str = "") -> None:
    """torch.optim's learning-rate rule: a float >= 0 or a 1-element tensor."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Tensor lr must be 1-element{where}, got {lr.numel()} elements")
        if lr.is_complex() or not lr.is_floating_point():
            raise ValueError(f"Tensor lr must be a real floating tensor{where}, got {lr.dtype}")
        # A CPU value costs no device sync to read, so it is checked here, before
        # any group is updated (the kernel's own check would fire only when that
        # group's turn comes, after earlier groups have changed).
        if lr.device.type == "cpu" and not float(lr) >= 0.0:
            raise ValueError(f"Invalid learning rate: {float(lr)}{where}")
        return
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}{where}")


def scalar_dtype() -> torch.dtype:
    """torch.optim's dtype for `step` counters (float64 under a float64 default dtype)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def lr_args(lr, device: torch.device) -> tuple[float, Tensor | None]:
    """A group's lr as the fused ops take it: ``(lr, None)`` for a float,
    ``(0.0, tensor on device)`` for a tensor (read by the kernel, no sync)."""
    if isinstance(lr, Tensor):
        return 0.0, (lr if lr.device == device else lr.to(device, non_blocking=True))
    return float(lr), None


def bucket_by_device_and_dtype(params: list[Tensor]) -> dict[tuple, list[int]]:
    """Indices of `params` grouped by (device, dtype), in first-seen order."""
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        buckets[(p.device, p.dtype)].append(i)
    return buckets


class _OnDevice:
    """Copies of a few small tensors (coefficient, flags) per device, made once
    per step with non-blocking copies."""

    def __init__(self, tensor: Tensor | None) -> None:
        self.tensor = tensor
        self.copies: dict[torch.device, Tensor] = {}

    def on(self, device: torch.device) -> Tensor | None:
        t = self.tensor
        if t is None or t.device == device:
            return t
        if device not in self.copies:
            self.copies[device] = t.to(device, non_blocking=True)
        return self.copies[device]


class FusedClipOptimizer(Optimizer):
    """Base class of the fused optimizers (not for direct use).

    Subclasses implement ``_check_group`` (hyperparameters), ``_init_state``
    (torch.optim's state keys) and ``_update`` (one fused op call).
    """

    # torch.amp.GradScaler hands this optimizer grad_scale and found_inf
    # instead of unscaling the gradients itself.
    _step_supports_amp_scaling = True

    def __init__(self, params, defaults: dict, *, clip=None, nonfinite: str = "skip") -> None:
        self.clip_policy = as_policy(clip)
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(
                f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}"
            )
        self.nonfinite = nonfinite
        super().__init__(params, defaults)
        for group in self.param_groups:
            self._check_group(group)
        self.clip_stats: dict[str, Tensor] = {}
        self._skipped: Tensor | None = None

    # -- subclass interface ---------------------------------------------------
    def _check_group(self, group: dict) -> None:
        raise NotImplementedError

    def _init_state(self, param: Tensor, group: dict, state: dict) -> None:
        raise NotImplementedError

    def _update(self, group: dict, params: list[Tensor], *, device: torch.device,
                clip_coef: Tensor | None, grad_scale: Tensor | None,
                found_inf: Tensor | None) -> None:
        raise NotImplementedError

    # -- the step ---------------------------------------------------------------
    def _params_with_grads(self) -> list[list[Tensor]]:
        name = type(self).__name__
        per_group = []
        for group in self.param_groups:
            self._check_group(group)
            params = []
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError(f"{name} does not support sparse gradients")
                if p.dtype not in SUPPORTED_DTYPES:
                    if p.is_complex():
                        raise RuntimeError(
                            f"{name} does not support complex parameters (got {p.dtype}); "
                            "optimize torch.view_as_real(param) instead"
                        )
                    raise RuntimeError(
                        f"{name} supports float32, float64, float16 and bfloat16 "
                        f"parameters, got {p.dtype}"
                    )
                params.append(p)
            per_group.append(params)
        return per_group

    def _norm_pass(self, grads: list[Tensor], norm_type: float):
        """Global norm and non-finite flag of all gradients, on the first
        gradient's device."""
        buckets = bucket_by_device_and_dtype(grads)
        totals, flags = [], []
        for indices in buckets.values():
            _, total, flag = ops.multi_tensor_norm([grads[i] for i in indices], norm_type)
            totals.append(total)
            flags.append(flag)
        if len(totals) == 1:
            return totals[0], flags[0]
        device = totals[0].device
        totals = torch.stack([t.to(device, non_blocking=True) for t in totals])
        flags = torch.stack([f.to(device, non_blocking=True) for f in flags])
        if math.isinf(norm_type):
            return totals.max(), flags.max()  # max propagates NaN
        return torch.linalg.vector_norm(totals), flags.max()

    @torch.no_grad()
    def step(self, closure=None):
        """Performs a single optimization step, clipping included.

        Args:
            closure (Callable, optional): A closure that reevaluates the model
                and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        per_group = self._params_with_grads()
        grads = [p.grad for params in per_group for p in params]
        if not grads:
            return loss
        # Set by torch.amp.GradScaler.step(): the gradients are still scaled by
        # grad_scale (None once the user called scaler.unscale_), and found_inf
        # says whether the scaler saw an inf.
        grad_scale: Tensor | None = getattr(self, "grad_scale", None)
        scaler_found_inf: Tensor | None = getattr(self, "found_inf", None)

        policy = self.clip_policy
        total_norm = nonfinite = clip_coef = None
        if policy is not None or self.nonfinite != "propagate":
            norm_type = policy.norm_type if policy is not None else 2.0
            total_norm, nonfinite = self._norm_pass(grads, norm_type)
            if grad_scale is not None:
                # The norm of the unscaled gradients, without an unscale pass.
                total_norm = total_norm / grad_scale.to(total_norm.device, non_blocking=True)
            if self.nonfinite == "raise" and scaler_found_inf is None:
                if bool(nonfinite):  # sync-ok: "raise" has to know
                    raise RuntimeError(
                        f"{type(self).__name__}: the gradients hold inf or nan "
                        f"(global norm {float(total_norm)}); no parameter or state "  # sync-ok
                        "was changed (nonfinite='raise')"
                    )
            if policy is not None:
                clip_coef = policy.coefficient(total_norm)

        skip = nonfinite if self.nonfinite == "skip" else None
        if scaler_found_inf is not None:
            inf = scaler_found_inf.to(grads[0].device, non_blocking=True)
            skip = inf if skip is None else torch.maximum(skip, inf)

        coef_on, scale_on, skip_on = _OnDevice(clip_coef), _OnDevice(grad_scale), _OnDevice(skip)
        for group, params in zip(self.param_groups, per_group):
            for p in params:
                state = self.state[p]
                if len(state) == 0:
                    self._init_state(p, group, state)
            for (device, _), indices in bucket_by_device_and_dtype(params).items():
                self._update(
                    group, [params[i] for i in indices], device=device,
                    clip_coef=coef_on.on(device), grad_scale=scale_on.on(device),
                    found_inf=skip_on.on(device),
                )

        self._record_stats(total_norm, clip_coef, skip, grads[0].device)
        return loss

    def _record_stats(self, total_norm, clip_coef, skip, device) -> None:
        if self._skipped is None:
            self._skipped = torch.zeros((), dtype=torch.int64, device=device)
        if skip is not None:
            self._skipped += skip.to(self._skipped.device, torch.int64, non_blocking=True)
        stats = {"skipped": self._skipped}
        if total_norm is not None:
            stats["grad_norm"] = total_norm
        if clip_coef is not None:
            stats["clip_coef"] = clip_coef
        self.clip_stats = stats

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        # torch.optim keeps a non-fused optimizer's step counters on the CPU;
        # the fused ops read them where the parameter lives.
        for group in self.param_groups:
            for p in group["params"]:
                step = self.state.get(p, {}).get("step")
                if isinstance(step, Tensor) and step.device != p.device:
                    self.state[p]["step"] = step.to(p.device)

"""What every fused optimizer shares: input checks, the norm pass, the clip
policy, the non-finite policy and the GradScaler hand-off.

One ``step()``:

1. checks every group and gradient (nothing has changed if this raises);
2. norm pass: one ``multi_tensor_norm`` per (device, dtype) over all gradients
   of all groups, combined into the global norm and a non-finite flag;
3. the clip policy turns the norms (and its state) into coefficients, on the
   device: ``policy.clip(ClipInputs(...))`` gets the global norm, the
   per-tensor norms of each norm bucket (per-tensor policies), the skip flag
   (a skipped step must not change the policy's state), the policy's state
   dict and, per parameter, its per-tensor state dict; it returns one 0-d
   coefficient, or one 1-D tensor of coefficients per norm bucket;
   Per-unit policies (AGC) get, from the same single read of every gradient,
   the norm of every unit (``multi_tensor_unit_norm``), and the unit norms of
   the parameters from one read of every parameter; they return one
   coefficient per unit;
4. update pass: the subclass's fused op per group and (device, dtype), which
   applies coefficient (global, per tensor, or per unit as ``unit_coefs``),
   ``grad_scale``, the element-wise clamp of ``ValueClip`` (``clip_value``) and
   the skip flag as it reads each gradient. The gradients of one such call are a contiguous run of their
   norm bucket (buckets list the gradients group by group), so a per-tensor
   coefficient is a slice (a view) of the bucket's coefficients.

The policy's state travels in the state_dict under the extra top-level key
``"clip_policy"`` (torch.optim's ``load_state_dict`` reads only ``"state"`` and
``"param_groups"``, so a torch optimizer loads a fusedclip state_dict), with
per-parameter state keyed by the state_dict's parameter ids.

Nothing in it reads a device value on the host, except ``nonfinite="raise"``,
which must know whether to raise.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.optim import Optimizer

from fusedclip import ops
from fusedclip.clipping import ClipInputs, as_policy

NONFINITE_POLICIES = ("skip", "raise", "propagate")

# The `clip` argument, as every optimizer's docstring states it at "{clip_arg}".
CLIP_ARG_DOC = """        clip (None, float or ClipPolicy, optional): gradient clipping fused into
            the step: ``None`` for none, a float for the global L2 norm with that
            ``max_norm`` (exactly ``clip_grad_norm_``), or a policy such as
            ``fusedclip.GlobalNorm(max_norm, norm_type=inf)``,
            ``fusedclip.ValueClip(clip_value)`` (``clip_grad_value_``) or
            ``fusedclip.AGC(clip_factor)`` (per-unit adaptive clipping). One
            global norm covers all parameter groups. (default: None)
"""
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
        # group's turn comes, after earlier groups have changed). Not while
        # torch.compile traces: there float(lr) is a data-dependent read that
        # breaks the graph, and the kernel's check still rejects a negative lr.
        if (lr.device.type == "cpu" and not torch.compiler.is_compiling()
                and not float(lr) >= 0.0):
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


def group_by_key(keys: list) -> dict:
    """Indices of `keys` grouped by key, in first-seen order."""
    if keys and keys.count(keys[0]) == len(keys):  # the common case, 2.4x faster
        return {keys[0]: list(range(len(keys)))}
    buckets: dict = {}
    for i, key in enumerate(keys):
        indices = buckets.get(key)
        if indices is None:
            indices = buckets[key] = []
        indices.append(i)
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
    # The subclass's op takes clip_value and unit_coefs (the shared gradient
    # transform of csrc/include/fusedclip/grad_transform.h), and its _update
    # passes them: ValueClip and AGC need it.
    _supports_grad_transform = False

    def __init__(self, params, defaults: dict, *, clip=None, nonfinite: str = "skip") -> None:
        self.clip_policy = as_policy(clip)
        policy = self.clip_policy
        if policy is not None and not self._supports_grad_transform and (
                policy.per_unit or policy.elementwise_clip_value is not None):
            raise ValueError(f"{type(self).__name__} does not support the clip policy {policy!r}")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(
                f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}"
            )
        self.nonfinite = nonfinite
        super().__init__(params, defaults)
        for group in self.param_groups:
            self._check_group(group)
        # Updated in place by every step, never re-bound (see _record_stats).
        self.clip_stats: dict[str, Tensor] = {}
        # The clip policy's state: its own dict, and one dict per parameter.
        self._policy_state: dict = {}
        self._policy_tensor_state: dict = {}

    # -- subclass interface ---------------------------------------------------
    def _check_group(self, group: dict) -> None:
        raise NotImplementedError

    def _init_state(self, param: Tensor, group: dict, state: dict) -> None:
        raise NotImplementedError

    def _update(self, group: dict, params: list[Tensor], grads: list[Tensor],
                states: list[dict], *, device: torch.device,
                clip_coef: Tensor | None, grad_scale: Tensor | None,
                found_inf: Tensor | None, clip_value: float | None = None,
                unit_coefs: list[Tensor] | None = None) -> None:
        """One fused op call over ``params`` (all on ``device``, of one dtype),
        their gradients and their state dicts (``self.state[p]``, after
        ``_init_state``). ``clip_value`` and ``unit_coefs`` (one 1-D tensor
        of per-unit coefficients per parameter) come only to subclasses with
        ``_supports_grad_transform``, and go to their op unchanged."""
        raise NotImplementedError

    # -- the step ---------------------------------------------------------------
    def _params_with_grads(self) -> list[tuple[list[Tensor], list[Tensor], list[tuple]]]:
        """Per group: the parameters that have a gradient, their gradients, and
        their (device, dtype) keys, after checking every group and gradient
        (nothing has changed if this raises). One pass, since with many small
        tensors the per-parameter Python work is a good part of a step."""
        name = type(self).__name__
        per_group = []
        for group in self.param_groups:
            self._check_group(group)
            params, grads, keys = [], [], []
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError(f"{name} does not support sparse gradients")
                dtype = p.dtype
                if dtype not in SUPPORTED_DTYPES:
                    if p.is_complex():
                        raise RuntimeError(
                            f"{name} does not support complex parameters (got {dtype}); "
                            "optimize torch.view_as_real(param) instead"
                        )
                    raise RuntimeError(
                        f"{name} supports float32, float64, float16 and bfloat16 "
                        f"parameters, got {dtype}"
                    )
                params.append(p)
                grads.append(grad)
                keys.append((p.device, dtype))
            per_group.append((params, grads, keys))
        return per_group

    def _norm_pass(self, grads: list[Tensor], keys: list[tuple], norm_type: float,
                   params: list[Tensor] | None = None):
        """Global norm and non-finite flag of all gradients, on the first
        gradient's device, and the per-tensor norms of each norm bucket
        (``keys``: each gradient's (device, dtype), its parameter's).

        Returns ``(total_norm, nonfinite, buckets, tensor_norms, unit_norms,
        param_unit_norms)``: ``buckets`` lists the indices (into ``grads``) of
        each (device, dtype) bucket in increasing order, ``tensor_norms`` one
        1-D tensor per bucket. With ``params`` (per-unit policies), the same
        single read of the gradients also gives ``unit_norms``, the norms of
        all units of each bucket (one 1-D tensor per bucket), and one read of
        the parameters gives ``param_unit_norms``; otherwise both are None."""
        buckets = list(group_by_key(keys).values())
        totals, flags, tensor_norms = [], [], []
        unit_norms = param_unit_norms = None
        if params is not None:
            unit_norms, param_unit_norms = [], []
        for indices in buckets:
            if params is None:
                norms, total, flag = ops.multi_tensor_norm([grads[i] for i in indices], norm_type)
            else:
                units, norms, total, flag = ops.multi_tensor_unit_norm(
                    [grads[i] for i in indices], norm_type)
                unit_norms.append(units)
                param_unit_norms.append(ops.multi_tensor_unit_norm(
                    [params[i] for i in indices], norm_type)[0])
            tensor_norms.append(norms)
            totals.append(total)
            flags.append(flag)
        total, flag = self._combine(totals, flags, norm_type)
        return total, flag, buckets, tensor_norms, unit_norms, param_unit_norms

    @staticmethod
    def _combine(totals: list[Tensor], flags: list[Tensor], norm_type: float):
        """The global norm and flag from those of the buckets."""
        if len(totals) == 1:
            return totals[0], flags[0]
        device = totals[0].device
        totals = torch.stack([t.to(device, non_blocking=True) for t in totals])
        flags = torch.stack([f.to(device, non_blocking=True) for f in flags])
        if math.isinf(norm_type):
            return totals.max(), flags.max()  # max propagates NaN
        return torch.linalg.vector_norm(totals), flags.max()

    def _policy_coefficients(self, policy, params: list[Tensor], total_norm: Tensor,
                             buckets: list[list[int]], tensor_norms: list[Tensor],
                             skip: Tensor | None, unit_norms=None, param_unit_norms=None):
        """The policy's coefficient(s): a 0-d tensor, or one 1-D tensor per
        norm bucket for per-tensor policies. `params` are the parameters of
        the gradients, in the norm pass's order."""
        state = self._policy_state
        for key, value in state.items():
            # After load_state_dict from another device (a metadata check, no sync).
            if isinstance(value, Tensor) and value.device != total_norm.device:
                state[key] = value.to(total_norm.device)
        tensor_states = None
        if policy.has_tensor_state:
            tensor_states = [
                [self._policy_tensor_state.setdefault(params[i], {}) for i in indices]
                for indices in buckets
            ]
        return policy.clip(ClipInputs(
            total_norm=total_norm,
            tensor_norms=tensor_norms if policy.per_tensor else None,
            skip=skip, state=state, tensor_states=tensor_states,
            unit_norms=unit_norms, param_unit_norms=param_unit_norms,
        ))

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
        grads = [g for _, group_grads, _ in per_group for g in group_grads]
        if not grads:
            return loss
        # Set by torch.amp.GradScaler.step(): the gradients are still scaled by
        # grad_scale (None once the user called scaler.unscale_), and found_inf
        # says whether the scaler saw an inf.
        grad_scale: Tensor | None = getattr(self, "grad_scale", None)
        scaler_found_inf: Tensor | None = getattr(self, "found_inf", None)

        policy = self.clip_policy
        per_tensor = policy is not None and policy.per_tensor
        per_unit = policy is not None and policy.per_unit
        clip_value = None if policy is None else policy.elementwise_clip_value
        total_norm = nonfinite = clip_coef = tensor_norms = buckets = None
        unit_norms = param_unit_norms = None
        flat_params = [p for params, _, _ in per_group for p in params]
        if (policy is not None and policy.needs_norms) or self.nonfinite != "propagate":
            norm_type = policy.norm_type if policy is not None else 2.0
            total_norm, nonfinite, buckets, tensor_norms, unit_norms, param_unit_norms = (
                self._norm_pass(grads, [k for _, _, keys in per_group for k in keys], norm_type,
                                flat_params if per_unit else None))
            if grad_scale is not None:
                # The norm of the unscaled gradients, without an unscale pass.
                total_norm = total_norm / grad_scale.to(total_norm.device, non_blocking=True)
                if per_tensor:
                    tensor_norms = [n / grad_scale.to(n.device, non_blocking=True)
                                    for n in tensor_norms]
                if per_unit:
                    unit_norms = [n / grad_scale.to(n.device, non_blocking=True)
                                  for n in unit_norms]
            if self.nonfinite == "raise" and scaler_found_inf is None:
                if bool(nonfinite):  # sync-ok: "raise" has to know
                    raise RuntimeError(
                        f"{type(self).__name__}: the gradients hold inf or nan "
                        f"(global norm {float(total_norm)}); no parameter or state "  # sync-ok
                        "was changed (nonfinite='raise')"
                    )

        skip = nonfinite if self.nonfinite == "skip" else None
        if scaler_found_inf is not None:
            inf = scaler_found_inf.to(grads[0].device, non_blocking=True)
            skip = inf if skip is None else torch.maximum(skip, inf)

        if policy is not None:
            clip_coef = self._policy_coefficients(
                policy, flat_params, total_norm, buckets, tensor_norms, skip,
                unit_norms, param_unit_norms)
        # Per-unit coefficients: one view per gradient of its bucket's coefficients.
        unit_coefs = None
        if per_unit:
            unit_coefs = [list(c.split(ops.unit_counts([grads[i] for i in indices])))
                          for c, indices in zip(clip_coef, buckets)]

        # Where each gradient sits in its norm bucket, for per-tensor and
        # per-unit coefficients.
        where: list[tuple[int, int]] = []
        if per_tensor or per_unit:
            where = [(0, 0)] * len(grads)
            for b, indices in enumerate(buckets):
                for k, i in enumerate(indices):
                    where[i] = (b, k)

        coef_on, scale_on, skip_on = _OnDevice(clip_coef), _OnDevice(grad_scale), _OnDevice(skip)
        offset = 0
        for group, (params, group_grads, keys) in zip(self.param_groups, per_group):
            states = []
            for p in params:
                state = self.state[p]
                if len(state) == 0:
                    self._init_state(p, group, state)
                states.append(state)
            for (device, _), indices in group_by_key(keys).items():
                coef = units = None
                if per_tensor or per_unit:
                    b, start = where[offset + indices[0]]
                    # The call's gradients are a contiguous run of bucket b.
                    assert where[offset + indices[-1]] == (b, start + len(indices) - 1)
                    if per_tensor:
                        coef = clip_coef[b][start:start + len(indices)]
                    else:
                        units = unit_coefs[b][start:start + len(indices)]
                else:
                    coef = coef_on.on(device)
                extra = {}
                if clip_value is not None or units is not None:
                    extra = dict(clip_value=clip_value, unit_coefs=units)
                if len(indices) == len(params):  # one bucket: no sublists to make
                    call_params, call_grads, call_states = params, group_grads, states
                else:
                    call_params = [params[i] for i in indices]
                    call_grads = [group_grads[i] for i in indices]
                    call_states = [states[i] for i in indices]
                self._update(
                    group, call_params, call_grads, call_states, device=device,
                    clip_coef=coef, grad_scale=scale_on.on(device),
                    found_inf=skip_on.on(device), **extra,
                )
            offset += len(params)

        if per_tensor:
            tensor_norms = self._in_param_order(tensor_norms, buckets, len(grads))
            clip_coef = self._in_param_order(clip_coef, buckets, len(grads))
        if per_unit:
            clip_coef = self._units_in_param_order(unit_coefs, buckets, len(grads))
        self._record_stats(total_norm, clip_coef, skip, grads[0].device,
                           tensor_norms if per_tensor else None)
        return loss

    @staticmethod
    def _in_param_order(per_bucket: list[Tensor], buckets: list[list[int]], n: int) -> Tensor:
        """One 1-D tensor, in the order of the gradients, from per-bucket tensors."""
        if len(per_bucket) == 1:
            return per_bucket[0]
        device = per_bucket[0].device
        joined = torch.cat([t.to(device, non_blocking=True) for t in per_bucket])
        position = [0] * n
        for k, i in enumerate(i for indices in buckets for i in indices):
            position[i] = k
        return joined[torch.tensor(position, device=device)]

    @staticmethod
    def _units_in_param_order(per_bucket: list[list[Tensor]], buckets: list[list[int]],
                              n: int) -> Tensor:
        """All unit coefficients in one 1-D tensor, gradient after gradient."""
        if len(per_bucket) == 1:
            return torch.cat(per_bucket[0])
        ordered: list[Tensor | None] = [None] * n
        for tensors, indices in zip(per_bucket, buckets):
            for t, i in zip(tensors, indices):
                ordered[i] = t
        device = ordered[0].device
        return torch.cat([t.to(device, non_blocking=True) for t in ordered])

    def _record_stats(self, total_norm, clip_coef, skip, device, tensor_norms=None) -> None:
        # The dict is filled in place and the skipped counter kept in it rather
        # than in an attribute of its own: inside torch.compile(opt.step),
        # dynamo silently drops attribute assignments on an Optimizer (torch
        # 2.13; `self.x = ...` never happens), while it replays the mutation of
        # a dict the optimizer holds. Each step's tensors are new ones, so a
        # tensor a caller kept from an earlier step keeps its value.
        stats = self.clip_stats
        skipped = stats.get("skipped")
        if skipped is None:
            skipped = torch.zeros((), dtype=torch.int64, device=device)
        if skip is not None:
            skipped += skip.to(skipped.device, torch.int64, non_blocking=True)
        stats.clear()
        stats["skipped"] = skipped
        if total_norm is not None:
            stats["grad_norm"] = total_norm
        if clip_coef is not None:
            stats["clip_coef"] = clip_coef
        if tensor_norms is not None:
            stats["tensor_norms"] = tensor_norms

    # -- state_dict: the clip policy's state ----------------------------------------
    def state_dict(self):
        """torch.optim's state_dict, plus the clip policy's state (if it keeps
        any) under ``"clip_policy"``: ``{"policy": class name, "state": {...},
        "tensor_state": {param id: {...}}}``, with the parameter ids of
        ``"state"``. torch.optim's ``load_state_dict`` ignores that key."""
        state_dict = super().state_dict()
        policy = self.clip_policy
        if policy is not None and (policy.stateful or policy.has_tensor_state):
            ids = {}
            for saved, group in zip(state_dict["param_groups"], self.param_groups):
                for pid, p in zip(saved["params"], group["params"]):
                    ids[p] = pid
            state_dict["clip_policy"] = {
                "policy": type(policy).__name__,
                "state": dict(self._policy_state),
                "tensor_state": {
                    ids[p]: dict(s) for p, s in self._policy_tensor_state.items()
                    if p in ids and s
                },
            }
        return state_dict

    def load_state_dict(self, state_dict) -> None:
        """torch.optim's load_state_dict; a state_dict without ``"clip_policy"``
        (torch.optim's, say) starts the clip policy afresh. An optimizer without
        a policy ignores a saved policy state; one with another policy refuses it."""
        saved = state_dict.get("clip_policy")
        policy = self.clip_policy
        if policy is None:
            saved = None
        if saved is not None and saved.get("policy") != type(policy).__name__:
            raise ValueError(
                f"this state_dict holds the state of clip policy {saved.get('policy')!r}, "
                f"but this optimizer's policy is {policy!r}"
            )
        super().load_state_dict(state_dict)
        self._policy_state = {}
        self._policy_tensor_state = {}
        if saved is not None:
            self._policy_state = {k: v.clone() if isinstance(v, Tensor) else v
                                  for k, v in saved["state"].items()}
            params = {}
            for saved_group, group in zip(state_dict["param_groups"], self.param_groups):
                for pid, p in zip(saved_group["params"], group["params"]):
                    params[pid] = p
            for pid, s in saved["tensor_state"].items():
                if pid in params:
                    p = params[pid]
                    self._policy_tensor_state[p] = {
                        k: v.to(p.device, copy=True) if isinstance(v, Tensor) else v
                        for k, v in s.items()
                    }
        # torch.optim keeps a non-fused optimizer's step counters on the CPU;
        # the fused ops read them where the parameter lives.
        for group in self.param_groups:
            for p in group["params"]:
                step = self.state.get(p, {}).get("step")
                if isinstance(step, Tensor) and step.device != p.device:
                    self.state[p]["step"] = step.to(p.device)

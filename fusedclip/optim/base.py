"""What every fused optimizer shares: input checks, the step in named phases,
the clip policy, the non-finite policy and the GradScaler hand-off.

One ``step()``:

1. **gather**: every group's parameters with a gradient, their gradients and
   state, complex ones as real views, bucketed by (device, dtype); the layout
   is checked (nothing has changed if this raises) and kept while it holds
   (``fusedclip.optim.layout``);
2. **measure**: the norm pass, one ``multi_tensor_norm`` (or, for per-unit
   policies, ``multi_tensor_unit_norm``) per bucket over all gradients of all
   groups: per-tensor norms, the global norm and a non-finite flag;
3. **reduce**: across processes (``fusedclip.distributed``): the norms of
   DTensor shards summed over the mesh dims they are sharded on, and the total
   over ``norm_group``, in one packed all-reduce per group (a no-op in one
   process, for plain tensors without ``norm_group``, and under DDP);
4. **coefficients**: the clip policy turns the norms and its state into clip
   coefficients and its next state (``fusedclip.clipping``), on the device;
   the state is kept unless the step is skipped;
5. **apply**: the subclass's fused op per group and (device, dtype), which
   applies coefficient (global, per tensor, or per unit), ``grad_scale``, the
   element-wise clamp of ``ValueClip`` and the skip flag as it reads each
   gradient;
6. **record**: ``clip_stats``, the same keys every step, and the count of
   consecutive skipped steps.

The policy's state travels in the state_dict under the extra top-level key
``"clip_policy"`` (torch.optim's ``load_state_dict`` reads only ``"state"`` and
``"param_groups"``, so a torch optimizer loads a fusedclip state_dict), with
per-parameter state keyed by the state_dict's parameter ids: torch.optim's
state_dict hooks put it there and take it back (``fusedclip.optim.policy_state``).

Nothing in it reads a device value on the host, except ``nonfinite="raise"``,
which must know whether to raise.
"""

from __future__ import annotations

import itertools
import math
import operator
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.optim import Optimizer

from fusedclip import distributed, ops
from fusedclip.caller_clipping import check_caller_clipping
from fusedclip.clipping import ClipInputs, as_policy, commit_state
from fusedclip.optim import layout, policy_state, precision
from fusedclip.optim.layout import Batch, kernel_view
from fusedclip.optim.policy_state import OPTIMIZER_WIDE
from fusedclip.optim.skip_monitor import SkipMonitor

NONFINITE_POLICIES = ("skip", "raise", "propagate")



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
        # breaks the graph, and the kernels' host-side check of a CPU lr tensor
        # still rejects a negative lr. A CUDA lr tensor is never read on the
        # host, so a negative value there is not checked (that would be a sync).
        if (lr.device.type == "cpu" and not torch.compiler.is_compiling()
                and not float(lr) >= 0.0):
            raise ValueError(f"Invalid learning rate: {float(lr)}{where}")
        return
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}{where}")


def check_impl_flags(name: str, defaults: dict) -> None:
    """torch's errors for its implementation flags, in torch's order, and the
    one fusedclip cannot honour."""
    if defaults.get("differentiable"):
        raise RuntimeError(
            f"{name} does not support differentiable=True: the fused step is not "
            "differentiable (`fused` does not support `differentiable` in torch.optim either)")
    if defaults.get("fused") and defaults.get("foreach"):
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")


def scalar_dtype() -> torch.dtype:
    """torch.optim's dtype for `step` counters (float64 under a float64 default dtype)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def state_list(states: list[dict], key: str, views: bool) -> list[Tensor]:
    """The state tensors ``key`` of an ``_update`` call as the kernels see
    them: through ``kernel_view`` where the call's tensors are ``views``
    (complex or DTensor parameters), else the tensors themselves."""
    values = list(map(operator.itemgetter(key), states))
    return [kernel_view(t) for t in values] if views else values


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


@dataclass
class _Norms:
    """Phase 2's result (all on the first gradient's device but the per-bucket lists)."""

    total: Tensor
    nonfinite: Tensor
    tensor_norms: list[Tensor]
    unit_norms: list[Tensor] | None = None
    param_unit_norms: list[Tensor] | None = None


class FusedClipOptimizer(Optimizer):
    """Base class of the fused optimizers (not for direct use).

    Subclasses implement ``_check_group`` (hyperparameters), ``_init_state``
    (torch.optim's state keys, listed in ``state_keys``; every floating buffer
    made by ``precision.zeros`` / ``precision.full``, in the group's state
    dtype) and ``_update`` (one fused op call). The mixed-precision options
    (``fusedclip.optim.precision``: master weights, remainders, generators) are
    the base's: ``_apply`` hands each call's lists to the op in ``StepArgs``.

    ``state_dict()`` and ``load_state_dict()`` are torch.optim's, with the
    clip policy's state carried under ``"clip_policy"`` by state_dict hooks
    (see ``fusedclip.optim.policy_state``).

    Attributes:
        warn_after_skips (int): a ``RuntimeWarning`` is issued when this many
            steps in a row were skipped (non-finite gradients or a GradScaler's
            inf), and again at 10x, 100x that many; 0 turns it off. The count
            is read without a device sync: on the CPU as it is, on CUDA from a
            copy made in the previous step (so a warning may come one step
            late). It is checked in ``zero_grad()`` (or ``check_skips()``),
            never in ``step()``, which reads no value on the host.
            (default: 10)
    """

    # torch.amp.GradScaler hands this optimizer grad_scale and found_inf
    # instead of unscaling the gradients itself.
    _step_supports_amp_scaling = True
    warn_after_skips: int = 10
    # What the twin's __setstate__ fills into param groups that lack a key
    # where that is not the constructor's default.
    _legacy_group_defaults: dict = {}
    #: the optimizer's per-parameter state keys (torch.optim's).
    state_keys: tuple = ()

    def __init__(self, params, defaults: dict, *, clip=None, nonfinite: str = "skip",
                 norm_group=None) -> None:
        # torch validates hyperparameters before it looks at the parameters.
        check_impl_flags(type(self).__name__, defaults)
        self._check_group(defaults)
        precision.check_options(defaults)
        self.clip = clip
        self.nonfinite = nonfinite
        self._norm_group = distributed.resolve_norm_group(norm_group, type(self).__name__)
        self._dist_cache = {}
        # The last step's layout (fusedclip.optim.layout) under "kept".
        self._layout_cache: dict = {}
        # What add_param_group accepts in a group as the optimizer's own setting.
        self._wide_given = {"clip": clip, "nonfinite": nonfinite, "norm_group": norm_group}
        super().__init__(params, defaults)
        for group in self.param_groups:
            self._check_group(group)
        device = next((p.device for g in self.param_groups for p in g["params"]),
                      torch.device("cpu"))
        # Updated in place by every step, never re-bound (see _record).
        self.clip_stats: dict[str, Tensor] = {}
        self._skips = {"streak": torch.zeros((), dtype=torch.int64, device=device)}
        self._check_caller = {"pending": True}
        self._skip_monitor = SkipMonitor()
        self._reset_stats(device)
        policy_state.install(self)
        precision.install(self)

    # -- settings: clip, nonfinite ----------------------------------------------------------
    @property
    def clip(self):
        """The clip policy (None: no clipping). Assigning a float or a policy
        replaces it; the new policy starts from its initial state."""
        return self.clip_policy

    @clip.setter
    def clip(self, value) -> None:
        policy = as_policy(value)
        if policy is not None and policy.reads_state not in (None, *self.state_keys):
            raise ValueError(
                f"{policy!r} reads the optimizer state {policy.reads_state!r}, which "
                f"{type(self).__name__} does not keep (its state: {', '.join(self.state_keys)})")
        self.clip_policy = policy
        self._forget_layout()
        self._policy_state: dict = {}
        self._policy_tensor_state: dict = {}
        if "clip_stats" in self.__dict__:
            self._reset_stats(self._skips["streak"].device, keep_skipped=True)

    @property
    def nonfinite(self) -> str:
        """What a step with inf/nan gradients does: "skip", "raise" or "propagate"."""
        return self._nonfinite

    @nonfinite.setter
    def nonfinite(self, value: str) -> None:
        if value not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {value!r}")
        self._nonfinite = value
        self._forget_layout()

    @property
    def norm_group(self):
        """The ``norm_group`` given at construction (None: none): the process
        group over which the clip norm's total is also summed."""
        return None if self._norm_group is None else self._norm_group.given

    def add_param_group(self, param_group: dict) -> None:
        given = self.__dict__.get("_wide_given", {})
        for key in (*OPTIMIZER_WIDE, "norm_group"):
            if isinstance(param_group, dict) and key in param_group:
                value = param_group[key]
                if key in given and (value is given[key] or (
                        isinstance(value, (int, float, str)) and value == given[key])):
                    # The optimizer's own setting: ZeroRedundancyOptimizer passes
                    # its keyword arguments to the constructor and in every group.
                    param_group = {k: v for k, v in param_group.items() if k != key}
                    continue
                raise ValueError(
                    f"a param group may not set {key!r}: {key}= applies to the whole "
                    f"{type(self).__name__} (one global norm covers every group); give "
                    "parameters that need another policy an optimizer of their own")
        super().add_param_group(param_group)
        try:  # the mixed-precision options, against this group's parameters
            group = self.param_groups[-1]
            precision.check_options(group)
            precision.check_params(group, f" (param group {len(self.param_groups) - 1})")
        except ValueError:
            self.param_groups.pop()
            raise
        self._forget_layout()

    def _forget_layout(self) -> None:
        """The next step gathers and checks its layout afresh: after a change
        of policy, param groups or loaded state."""
        cache = self.__dict__.get("_layout_cache")
        if cache:
            cache.clear()

    def __repr__(self) -> str:
        text = super().__repr__()
        return text[:-1] + f"Clip policy: {self.clip_policy!r}\nNonfinite: {self.nonfinite}\n)"

    # -- copies and old state dicts -----------------------------------------------------------
    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.update(
            clip_policy=self.clip_policy, _nonfinite=self._nonfinite,
            clip_stats=self.clip_stats, _unmeasured=self._unmeasured, _skips=self._skips,
            _policy_state=self._policy_state, _policy_tensor_state=self._policy_tensor_state,
            _norm_group=self._norm_group,
        )
        return state

    def __setstate__(self, state: dict) -> None:
        # torch's load_state_dict calls this with only "state" and
        # "param_groups": the attributes not given are kept.
        super().__setstate__(state)
        policy_state.install(self)
        precision.install(self)
        if "_skip_monitor" not in self.__dict__:
            self._skip_monitor = SkipMonitor()
            self._check_caller = {"pending": True}
        if "_dist_cache" not in self.__dict__:
            self._dist_cache = {}
            self.__dict__.setdefault("_norm_group", None)
        # Also load_state_dict's call: its state is checked afresh.
        self.__dict__.setdefault("_layout_cache", {}).clear()
        # What torch does for state dicts saved by older versions: param group
        # keys added since take their defaults, and a float step becomes a
        # tensor (on the parameter's device, where the fused ops read it).
        for group in self.param_groups:
            for key, value in {**self.defaults, **self._legacy_group_defaults}.items():
                group.setdefault(key, value)
            for p in group["params"]:
                p_state = self.state.get(p)
                if p_state and "step" in p_state:
                    step = p_state["step"]
                    if not torch.is_tensor(step):
                        p_state["step"] = torch.tensor(float(step), dtype=scalar_dtype(),
                                                       device=p.device)
                    elif step.device != p.device:
                        # torch.optim keeps a non-fused optimizer's counters on the CPU.
                        p_state["step"] = step.to(p.device)

    # -- subclass interface ---------------------------------------------------
    def _check_group(self, group: dict) -> None:
        raise NotImplementedError

    def _init_state(self, param: Tensor, group: dict, state: dict) -> None:
        raise NotImplementedError

    def _update(self, group: dict, params: list[Tensor], grads: list[Tensor],
                states: list[dict], *, originals: list[Tensor], args: ops.StepArgs) -> None:
        """One ``ops.update_`` call over ``params`` (all on one device, of one
        dtype, as the kernels see them: complex parameters as real views),
        their gradients and their state dicts (``self.state[p]``, after
        ``_init_state``; pass state tensors through ``state_list``), with the
        arguments every step shares, ``args``, as they are. ``originals`` are
        the parameters themselves (make state like them)."""
        raise NotImplementedError

    # -- the step ---------------------------------------------------------------
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

        if self._check_caller["pending"] and not torch.compiler.is_compiling():
            # Once: is a framework stepping this optimizer set to clip too?
            self._check_caller["pending"] = False
            if self.clip_policy is not None:
                check_caller_clipping(self)
        batch = self._gather()
        if not batch.grads:
            if self._norm_group is not None and self._needs_norms():
                # The other members of norm_group wait for this rank's share.
                policy = self.clip_policy
                distributed.join_without_gradients(
                    self._norm_group.group, policy.norm_type if policy is not None else 2.0,
                    self._skips["streak"].device)
            return loss
        # Set by torch.amp.GradScaler.step(): the gradients are still scaled by
        # grad_scale (None once the user called scaler.unscale_), and found_inf
        # says whether the scaler saw an inf.
        grad_scale: Tensor | None = getattr(self, "grad_scale", None)
        scaler_found_inf: Tensor | None = getattr(self, "found_inf", None)

        norms = self._measure(batch, grad_scale)
        norms = self._reduce(batch, norms)
        if norms is not None and self.nonfinite == "raise" and scaler_found_inf is None:
            if bool(norms.nonfinite):  # sync-ok: "raise" has to know
                raise RuntimeError(
                    f"{type(self).__name__}: the gradients hold inf or nan "
                    f"(global norm {float(norms.total)}); no parameter or state "  # sync-ok
                    "was changed (nonfinite='raise')"
                )
        skip = norms.nonfinite if norms is not None and self.nonfinite == "skip" else None
        if scaler_found_inf is not None:
            inf = scaler_found_inf.to(batch.grads[0].device, non_blocking=True)
            skip = inf if skip is None else torch.maximum(skip, inf)

        result = self._coefficients(batch, norms, skip)
        coef = result.coef if result is not None else None
        unit_coefs = self._unit_coefs(batch, coef)
        elementwise = result.elementwise if result is not None else None
        self._apply(batch, coef, unit_coefs, elementwise, grad_scale, skip)
        self._record(batch, norms, coef, unit_coefs, skip)
        return loss

    def _gather(self) -> Batch:
        """Phase 1: per group, the parameters that have a gradient (complex
        ones as real views), their gradients and (device, dtype) buckets
        (``fusedclip.optim.layout``). Every group's hyperparameters are
        checked each step; the parameters and gradients once per layout,
        before anything changes: a step whose layout is the last one's reads
        ``p.grad`` once per parameter and checks nothing more."""
        groups = self.param_groups
        for group in groups:
            self._check_group(group)
            precision.check_options(group)
        all_grads = [[p.grad for p in group["params"]] for group in groups]
        # Under torch.compile the layout is made afresh in the traced code
        # (dynamo guards on what it depends on) and not kept.
        compiling = torch.compiler.is_compiling()
        kept = None if compiling else self._layout_cache.get("kept")
        grads = kept.grads(groups, all_grads) if kept is not None else None
        if grads is None:
            kept = layout.gather(type(self).__name__, groups, all_grads, self._dist_cache)
            for g, group in enumerate(groups):  # (parameters may have changed dtype)
                precision.check_params(group, f" (param group {g})")
            if not compiling:
                self._forget_layout()
                if kept.reusable:
                    self._layout_cache["kept"] = kept
            grads = [list(itertools.compress(g, gl.has_grad)) if gl.has_grad is not None else g
                     for gl, g in zip(kept.groups, all_grads)]
        batch = kept.batch(grads)
        if batch.grads and (kept.specs is not None or self._norm_group is not None):
            batch.plan = self._plan(batch, kept.specs)
        return batch

    def _needs_norms(self) -> bool:
        policy = self.clip_policy
        return (policy is not None and policy.needs_norms) or self.nonfinite != "propagate"

    def _plan(self, batch: Batch, specs: list | None) -> distributed.Plan | None:
        """The reduce phase's plan for this layout of gradients (None: nothing
        to reduce), made once and kept while the layout, the policy and
        ``norm_group`` stay the same. Refuses a ``norm_group`` that overlaps a
        DTensor's mesh, before anything changes."""
        policy = self.clip_policy
        if policy is not None and policy.derives_norms:
            raise ValueError(
                f"{type(self).__name__}: {policy!r} computes norms from finer ones of this "
                "process's gradients only, but this optimizer's norms are reduced across "
                "processes (DTensor parameters or norm_group); use a policy that takes its "
                "norms from the norm pass here (see its derives_norms)")
        if not self._needs_norms():
            return None
        scope = policy.scope if policy is not None else "global"
        reads_params = bool(policy is not None and policy.reads_params)
        norm_type = policy.norm_type if policy is not None else 2.0
        device = batch.grads[0].device
        if specs is None:
            specs = [None] * len(batch.grads)
        units = self._unit_counts(batch)  # per-unit policies: made once a step, kept on batch
        group = self._norm_group.group if self._norm_group is not None else None
        key = (scope, reads_params, norm_type, device, id(group), tuple(map(id, specs)),
               tuple(map(tuple, batch.buckets)),
               tuple(map(tuple, units)) if units is not None else None)
        cached = self._dist_cache.get("plan")
        if cached is not None and cached[0] == key:
            return cached[1]
        plan = distributed.Plan(specs, batch.buckets, scope=scope, reads_params=reads_params,
                                norm_type=norm_type, norm_group=group, device=device,
                                unit_counts=units)
        plan.check_norm_group(
            specs, lambda i: f"the parameter of shape {tuple(batch.originals[i].shape)}")
        plan = None if plan.empty else plan
        self._dist_cache["plan"] = (key, plan)
        return plan

    def _measure(self, batch: Batch, grad_scale: Tensor | None) -> _Norms | None:
        """Phase 2: the norm pass over all gradients (None where neither the
        policy nor the non-finite rule needs it): the global norm and
        non-finite flag on the first gradient's device, per-tensor norms per
        bucket and, for per-unit policies, the norms of every unit of the
        gradients and (one read of every parameter) of the parameters.
        Norms are of the unscaled gradients (divided by a GradScaler's scale)."""
        policy = self.clip_policy
        if not ((policy is not None and policy.needs_norms) or self.nonfinite != "propagate"):
            return None
        norm_type = policy.norm_type if policy is not None else 2.0
        per_unit = policy is not None and policy.scope == "unit"
        grads, params = batch.grads, batch.params
        totals, flags, tensor_norms = [], [], []
        unit_norms = param_unit_norms = None
        if per_unit:
            unit_norms, param_unit_norms = [], []
        one_bucket = len(batch.buckets) == 1  # then it holds every gradient, in order
        for indices in batch.buckets:
            bucket_grads = grads if one_bucket else [grads[i] for i in indices]
            if not per_unit:
                norms, total, flag = ops.multi_tensor_norm(bucket_grads, norm_type)
            else:
                units, norms, total, flag = ops.multi_tensor_unit_norm(bucket_grads, norm_type)
                unit_norms.append(units)
                if policy.reads_params:
                    param_unit_norms.append(ops.multi_tensor_unit_norm(
                        params if one_bucket else [params[i] for i in indices], norm_type)[0])
            tensor_norms.append(norms)
            totals.append(total)
            flags.append(flag)
        total, flag = self._combine(totals, flags, norm_type)
        if grad_scale is not None:
            # The norm of the unscaled gradients, without an unscale pass.
            total = total / grad_scale.to(total.device, non_blocking=True)
            tensor_norms = [n / grad_scale.to(n.device, non_blocking=True) for n in tensor_norms]
            if per_unit:
                unit_norms = [n / grad_scale.to(n.device, non_blocking=True) for n in unit_norms]
        return _Norms(total, flag, tensor_norms, unit_norms, param_unit_norms)

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

    def _reduce(self, batch: Batch, norms: _Norms | None) -> _Norms | None:
        """Phase 3: the norms across processes (``fusedclip.distributed``):
        those of DTensor shards summed (or, for the inf norm, maxed) over the
        mesh dims they are sharded on, the total over ``norm_group``, the
        non-finite flag everywhere, in one packed all-reduce per group, on the
        device. One process, plain tensors without ``norm_group``: nothing to do."""
        if norms is None or batch.plan is None:
            return norms
        return _Norms(*batch.plan.reduce(norms.total, norms.nonfinite, norms.tensor_norms,
                                         norms.unit_norms, norms.param_unit_norms))

    def _coefficients(self, batch: Batch, norms: _Norms | None, skip: Tensor | None):
        """Phase 4: the policy's result (None without a policy): its
        coefficient(s) (a 0-d tensor, or one 1-D tensor per norm bucket for
        scopes "tensor" and "unit", or None) and element-wise transform. Its
        new state is kept unless the step is skipped."""
        policy = self.clip_policy
        if policy is None:
            return None
        device = norms.total.device if norms is not None else batch.grads[0].device
        state = self._policy_state
        if not state:
            state.update(policy.init_state(device))
        for key, value in state.items():
            # After load_state_dict from another device (a metadata check, no sync).
            if isinstance(value, Tensor) and value.device != device:
                state[key] = value.to(device)
        tensor_states = None
        if norms is None:  # a policy that needs no norm (ValueClip), none measured
            norms = _Norms(None, None, [])
        if policy.keeps_tensor_state:
            tensor_states = []
            for indices, bucket_norms in zip(batch.buckets, norms.tensor_norms):
                bucket = []
                for i in indices:
                    p = batch.originals[i]
                    s = self._policy_tensor_state.get(p)
                    if not s:
                        s = self._policy_tensor_state[p] = policy.init_tensor_state(
                            bucket_norms.dtype, bucket_norms.device)
                    bucket.append(s)
                tensor_states.append(bucket)
        result = policy.clip(ClipInputs(
            total_norm=norms.total,
            tensor_norms=norms.tensor_norms if policy.scope == "tensor" else None,
            state=state, tensor_states=tensor_states,
            unit_norms=norms.unit_norms, param_unit_norms=norms.param_unit_norms,
            unit_counts=self._unit_counts(batch),
        ))
        olds, news = [], []
        if result.state:
            olds.append(state)
            news.append(result.state)
        if result.tensor_states:
            for old_bucket, new_bucket in zip(tensor_states, result.tensor_states):
                olds.extend(old_bucket)
                news.extend(new_bucket)
        commit_state(olds, news, skip)
        return result

    def _unit_counts(self, batch: Batch) -> list[list[int]] | None:
        """For a per-unit policy, the units of each gradient, bucket by bucket."""
        if self.clip_policy is None or self.clip_policy.scope != "unit":
            return None
        if batch.unit_counts is None:
            batch.unit_counts = [ops.unit_counts([batch.grads[i] for i in indices])
                                 for indices in batch.buckets]
        return batch.unit_counts

    def _unit_coefs(self, batch: Batch, coef) -> list[list[Tensor]] | None:
        """Per-unit coefficients as one view per gradient, bucket by bucket."""
        counts = self._unit_counts(batch)
        if counts is None:
            return None
        return [list(c.split(n)) for c, n in zip(coef, counts)]

    def _apply(self, batch: Batch, coef, unit_coefs: list[list[Tensor]] | None,
               elementwise, grad_scale: Tensor | None, skip: Tensor | None) -> None:
        """Phase 5: one fused op per group and (device, dtype), with the
        arguments every update op shares built here, once (``ops.StepArgs``).
        The gradients of one such call are a contiguous run of their norm
        bucket (buckets list the gradients group by group), so a per-tensor or
        per-unit coefficient is a slice (a view) of the bucket's coefficients."""
        policy = self.clip_policy
        scope = policy.scope if policy is not None else "global"
        sliced = scope in ("tensor", "unit")
        where = batch.layout.positions
        clip_value = elementwise.clip_value if elementwise is not None else None
        spike_theta = elementwise.spike_theta if elementwise is not None else None
        coef_on = _OnDevice(None if sliced else coef)
        scale_on, skip_on = _OnDevice(grad_scale), _OnDevice(skip)
        offset = 0
        for part in batch.groups:
            gl, params, grads = part.layout, part.params, part.grads
            group, originals, views = gl.group, gl.originals, gl.views
            # State is made here, after every check and the "raise" rule.
            states = list(map(self.state.__getitem__, originals))
            if not all(states):
                for p, state in zip(originals, states):
                    if len(state) == 0:
                        self._init_state(p, group, state)
            for device, indices in gl.calls:
                call_coef = units = None
                if sliced:
                    b, start = where[offset + indices[0]]
                    # The call's gradients are a contiguous run of bucket b.
                    assert where[offset + indices[-1]] == (b, start + len(indices) - 1)
                    if scope == "tensor":
                        call_coef = coef[b][start:start + len(indices)]
                    else:
                        units = unit_coefs[b][start:start + len(indices)]
                else:
                    call_coef = coef_on.on(device)
                if len(indices) == len(params):  # one bucket: no sublists to make
                    call_params, call_grads, call_states = params, grads, states
                    call_originals = originals
                else:
                    call_params = [params[i] for i in indices]
                    call_grads = [grads[i] for i in indices]
                    call_states = [states[i] for i in indices]
                    call_originals = call_params if not views else [originals[i] for i in indices]
                # A tensor lr goes to the op as it is: on the device it is read
                # by the kernel, on the CPU by the host (no device sync either;
                # no copy to the device, which from pageable memory would be one).
                lr = group["lr"]
                if isinstance(lr, Tensor) and lr.dim() > 1:
                    lr = lr.reshape(())  # torch takes any 1-element tensor; a view
                # Master weights and generators (None, None without those options).
                masters, generators = precision.step_lists(
                    group, call_params[0].dtype, call_originals, call_states, views)
                args = ops.StepArgs(
                    lr=lr, clip_coef=call_coef, grad_scale=scale_on.on(device),
                    found_inf=skip_on.on(device), clip_value=clip_value,
                    spike_theta=spike_theta, unit_coefs=units,
                    masters=masters, sr_generators=generators,
                    maximize=bool(group.get("maximize", False)))
                self._update(group, call_params, call_grads, call_states,
                             originals=call_originals, views=views, args=args)
            offset += len(params)

    def _record(self, batch: Batch, norms: _Norms | None, coef,
                unit_coefs: list[list[Tensor]] | None, skip: Tensor | None) -> None:
        """Phase 6: ``clip_stats`` and the skip streak.

        The dict is filled in place and the counters kept in dicts rather than
        in attributes of their own: inside torch.compile(opt.step), dynamo
        silently drops attribute assignments on an Optimizer (torch 2.13;
        ``self.x = ...`` never happens), while it replays the mutation of a
        dict the optimizer holds. Each step's tensors are new ones, so a tensor
        a caller kept from an earlier step keeps its value."""
        policy = self.clip_policy
        stats = self.clip_stats
        device = batch.grads[0].device
        if policy is not None and policy.scope in ("tensor", "unit"):
            # The buckets in the gradients' order: a few contiguous runs.
            order = batch.layout.order
            if unit_coefs is not None:
                coef = _in_order([torch.cat(c) if c else torch.zeros(0, device=device)
                                  for c in unit_coefs], order, device, unit_coefs)
            else:
                coef = _in_order(coef, order, device)
            if policy.scope == "tensor":
                stats["tensor_norms"] = _in_order(norms.tensor_norms, order, device)
        stats["grad_norm"] = norms.total if norms is not None else self._unmeasured["grad_norm"]
        stats["clip_coef"] = coef if coef is not None else self._unmeasured["clip_coef"]
        if skip is not None:
            flag = skip.to(stats["skipped"].device, torch.int64, non_blocking=True)
            stats["skipped"] += flag
            streak = self._skips["streak"]
            flag = flag.to(streak.device, non_blocking=True)
            streak.copy_((streak + flag) * flag)

    def _reset_stats(self, device: torch.device, keep_skipped: bool = False) -> None:
        """``clip_stats`` before a step: every key there, nothing measured."""
        stats = self.clip_stats
        skipped = stats.get("skipped") if keep_skipped else None
        # What a step that measured nothing records (reused, never written).
        self._unmeasured = {"grad_norm": torch.full((), math.nan, device=device),
                            "clip_coef": torch.ones((), device=device)}
        stats.clear()
        stats.update(self._unmeasured)
        stats["skipped"] = (skipped if skipped is not None
                            else torch.zeros((), dtype=torch.int64, device=device))
        policy = self.clip_policy
        if policy is not None and policy.scope == "tensor":
            stats["tensor_norms"] = torch.zeros(0, device=device)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        if not torch.compiler.is_compiling():
            self.check_skips()

    def check_skips(self) -> int | None:
        """Warns if the last ``warn_after_skips`` steps or more were all
        skipped, and returns how many steps in a row were (None where the
        count is not known yet). Called by ``zero_grad()``; a loop that
        clears gradients another way (``model.zero_grad()``) can call it
        instead. It never waits on the device: a CPU count is read as it is,
        a CUDA one from an asynchronous copy made at the previous call."""
        return self._skip_monitor.check(self)


def _in_order(per_bucket: list[Tensor], order, device,
              pieces: list[list[Tensor]] | None = None) -> Tensor:
    """One 1-D tensor in the order of the gradients, from per-bucket tensors
    and the runs (``runs``) that walk them in that order. With ``pieces``
    (per bucket, one tensor per gradient) a run takes those gradients' pieces."""
    if len(per_bucket) == 1:
        return per_bucket[0]
    if pieces is not None:
        parts = [t for b, k, n in order for t in pieces[b][k:k + n]]
    else:
        parts = [per_bucket[b][k:k + n] for b, k, n in order]
    return torch.cat([t.to(device, non_blocking=True) for t in parts])

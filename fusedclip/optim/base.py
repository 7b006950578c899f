"""What every fused optimizer shares: input checks, the step in named phases,
the clip policy, the non-finite policy and the GradScaler hand-off.

One ``step()``:

1. **gather**: every group's parameters with a gradient, their gradients and
   state, checked (nothing has changed if this raises), complex ones as real
   views, bucketed by (device, dtype);
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
per-parameter state keyed by the state_dict's parameter ids.

Nothing in it reads a device value on the host, except ``nonfinite="raise"``,
which must know whether to raise.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.optim import Optimizer

from fusedclip import distributed, ops
from fusedclip.clipping import ClipInputs, as_policy, commit_state

NONFINITE_POLICIES = ("skip", "raise", "propagate")

# The optimizer-wide arguments (`clip`, `norm_group`, `nonfinite`), as every
# optimizer's docstring states them at "{clip_arg}".
CLIP_ARG_DOC = """        clip (None, float or ClipPolicy, optional): gradient clipping fused into
            the step: ``None`` for none, a float for the global L2 norm with that
            ``max_norm`` (exactly ``clip_grad_norm_``), or a policy such as
            ``fusedclip.GlobalNorm(max_norm, norm_type=inf)``,
            ``fusedclip.ValueClip(clip_value)`` (``clip_grad_value_``) or
            ``fusedclip.AGC(clip_factor)`` (per-unit adaptive clipping). One
            global norm covers all parameter groups; ``opt.clip`` reads or
            replaces the policy. (default: None)
        norm_group (ProcessGroup or 1-D DeviceMesh, optional): keyword-only;
            for an optimizer that holds only part of the model (ZeRO's
            per-rank optimizer, a pipeline stage): the clip norm is summed over
            this group's members, so every one of them clips by the whole
            model's norm and skips together. DTensor parameters (FSDP2, tensor
            parallel) need none: their norms are reduced over their mesh.
            (default: None)
        nonfinite (str, optional): what a step whose gradients hold inf or nan
            does: ``"skip"`` changes no parameter and no state (step counts,
            momentum buffers and the policy's state included) and counts it in
            ``clip_stats["skipped"]``; ``"raise"`` raises before anything
            changes (and so reads one flag on the host); ``"propagate"`` lets
            inf/nan flow into the update as torch.optim does. Under
            ``torch.amp.GradScaler`` a step the scaler finds inf in is always
            skipped. (default: "skip")
"""
# torch's implementation flags, as every optimizer's docstring states them.
IMPL_ARGS_DOC = """        foreach, fused (bool, optional): accepted for torch.optim's signature and
            kept in the param groups; the step is always one fused multi-tensor
            op, so they change nothing. ``foreach=True`` with ``fused=True`` is
            refused as torch refuses it. (default: None)
        differentiable (bool, optional): must be False: the fused step is not
            differentiable (torch's fused optimizers refuse it too). (default: False)
"""
CAPTURABLE_ARG_DOC = """        capturable (bool, optional): accepted and kept; the step is always
            capturable in a CUDA graph (no host sync, step counters on the
            parameter's device), whatever its value. (default: False)
"""
CLIP_STATS_DOC = """    ``opt.clip_stats`` holds device tensors under the same keys from the
    optimizer's construction on: ``grad_norm`` (the pre-clip global norm of the
    last step; NaN before the first step and where no norm was measured, that
    is with ``nonfinite="propagate"`` and a policy that needs none),
    ``clip_coef`` (the last step's coefficient: 1 before the first step and
    without clipping; one per tensor or per unit for such policies) and
    ``skipped`` (the number of skipped steps); per-tensor policies add
    ``tensor_norms``. Reading them is the caller's host sync. A run that skips
    ``warn_after_skips`` (10) steps in a row warns at ``zero_grad()`` (see
    ``FusedClipOptimizer``).
"""
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
COMPLEX_DTYPES = (torch.complex64, torch.complex128)
# Keys a param group may not hold: clipping and its non-finite rule are one
# decision for the whole optimizer (one global norm covers every group).
OPTIMIZER_WIDE = ("clip", "nonfinite")


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


def kernel_view(t: Tensor) -> Tensor:
    """The tensor the fused ops see: itself, or for a complex tensor its real
    view (torch.optim's treatment of complex parameters), with 0-d and 1-d
    tensors given a leading unit dim so that they stay one unit for per-unit
    policies, as the complex tensor is. A DTensor is its local shard (same
    storage: updating it updates the DTensor)."""
    if not distributed.is_plain(t):
        t = distributed.local(t)
    if not t.is_complex():
        return t
    return torch.view_as_real(t if t.dim() >= 2 else t.unsqueeze(0))


def state_list(states: list[dict], key: str, params: list[Tensor],
               originals: list[Tensor]) -> list[Tensor]:
    """The state tensors ``key`` of an ``_update`` call as the kernels see them.
    The base passes ``originals`` as the very list ``params`` where no tensor of
    the call needs a view (no complex or DTensor parameter): then no
    ``kernel_view`` call per tensor, a good part of a step of many small ones."""
    values = [s[key] for s in states]
    return values if params is originals else [kernel_view(t) for t in values]


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


def runs(positions: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """``(bucket, start, length)`` runs of consecutive positions: a list that
    walks buckets in another order as a few contiguous slices of each."""
    out: list[list[int]] = []
    for b, k in positions:
        if out and out[-1][0] == b and out[-1][1] + out[-1][2] == k:
            out[-1][2] += 1
        else:
            out.append([b, k, 1])
    return [tuple(r) for r in out]


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
class _Gathered:
    """Phase 1's result: per group, the parameters with a gradient (as the
    kernels see them), their gradients, state dicts and (device, dtype) keys;
    and the norm buckets over all of them."""

    groups: list[tuple[dict, list[Tensor], list[Tensor], list[Tensor], list[tuple]]]
    params: list[Tensor] = field(default_factory=list)      # kernel views, all groups
    originals: list[Tensor] = field(default_factory=list)   # the parameters themselves
    grads: list[Tensor] = field(default_factory=list)
    buckets: list[list[int]] = field(default_factory=list)  # indices into grads
    plan: distributed.Plan | None = None  # the reduce phase's, where there is one
    unit_counts: list[list[int]] | None = None  # per bucket (per-unit policies; made once)


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
    (torch.optim's state keys, listed in ``state_keys``) and ``_update`` (one
    fused op call).

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
        self.clip = clip
        self.nonfinite = nonfinite
        self._norm_group = distributed.resolve_norm_group(norm_group, type(self).__name__)
        self._dist_cache = {}
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
        self._skip_monitor = _SkipMonitor()
        self._reset_stats(device)

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
        if "_skip_monitor" not in self.__dict__:
            self._skip_monitor = _SkipMonitor()
            self._check_caller = {"pending": True}
        if "_dist_cache" not in self.__dict__:
            self._dist_cache = {}
            self.__dict__.setdefault("_norm_group", None)
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
            from fusedclip.integrations import check_caller_clipping
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

    def _gather(self) -> _Gathered:
        """Phase 1: per group, the parameters that have a gradient (complex
        ones as real views), their gradients and (device, dtype) keys, after
        checking every group and gradient: nothing has changed if this
        raises. One pass, since with many small tensors the per-parameter
        Python work is a good part of a step."""
        name = type(self).__name__
        checked = []
        specs = None  # per gradient, how its norms are reduced (DTensors; None: plain)
        n_grads = 0
        plain_types = distributed.PLAIN_TYPES  # distributed.is_plain, inlined: a hot loop
        for g, group in enumerate(self.param_groups):
            self._check_group(group)
            params, grads, keys = [], [], []
            needs_views = False  # a complex or DTensor parameter
            for k, p in enumerate(group["params"]):
                grad = p.grad
                if grad is None:
                    continue
                if type(p) not in plain_types or type(grad) not in plain_types:
                    needs_views = True
                    spec = distributed.spec_of(p, grad, f"{name}: parameter {k} of param group {g}",
                                               self._dist_cache)
                    if spec is not None and specs is None:
                        specs = [None] * n_grads
                    if specs is not None:
                        specs.append(spec)
                elif specs is not None:
                    specs.append(None)
                n_grads += 1
                if grad.is_sparse:
                    raise RuntimeError(f"{name} does not support sparse gradients")
                dtype = p.dtype
                if dtype not in SUPPORTED_DTYPES:
                    if dtype not in COMPLEX_DTYPES:
                        raise RuntimeError(
                            f"{name} supports float32, float64, float16 and bfloat16 "
                            f"parameters and complex64/complex128 ones, got {dtype}")
                    if grad.dtype != dtype:
                        raise RuntimeError(
                            f"{name}: the gradient of a {dtype} parameter is {grad.dtype}")
                    needs_views = True
                params.append(p)
                grads.append(grad)
                keys.append((p.device, dtype))
            checked.append((group, params, grads, keys, needs_views))

        batch = _Gathered(groups=[])
        keys_all = []
        for group, params, grads, keys, needs_views in checked:
            if needs_views:
                views = [kernel_view(p) for p in params]
                grad_views = [kernel_view(g) for g in grads]
                real_keys = [(d, v.dtype) for (d, _), v in zip(keys, views)]
            else:  # the same list objects: state_list() then makes no views either
                views, grad_views, real_keys = params, grads, keys
            batch.groups.append((group, params, views, grad_views, real_keys))
            batch.params.extend(views)
            batch.originals.extend(params)
            batch.grads.extend(grad_views)
            keys_all.extend(real_keys)
        by_key = group_by_key(keys_all)
        for device, dtype in by_key:  # once per key, not per parameter: device.type costs ~0.4 us
            if device.type not in ("cpu", "cuda"):
                # torch's fused steps refuse these too (a meta parameter would
                # reach the fake kernels, which change nothing).
                raise RuntimeError(
                    "`fused=True` requires all the params to be floating point Tensors "
                    f"of supported devices: ['cpu', 'cuda'] but {dtype} and {device}; "
                    f"{name} runs on the CPU and CUDA")
        batch.buckets = list(by_key.values())
        if batch.grads and (specs is not None or self._norm_group is not None):
            batch.plan = self._plan(batch, specs)
        return batch

    def _needs_norms(self) -> bool:
        policy = self.clip_policy
        return (policy is not None and policy.needs_norms) or self.nonfinite != "propagate"

    def _plan(self, batch: _Gathered, specs: list | None) -> distributed.Plan | None:
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
        units = None
        if scope == "unit":
            units = [ops.unit_counts([batch.grads[i] for i in indices])
                     for indices in batch.buckets]
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

    def _measure(self, batch: _Gathered, grad_scale: Tensor | None) -> _Norms | None:
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
        for indices in batch.buckets:
            if not per_unit:
                norms, total, flag = ops.multi_tensor_norm([grads[i] for i in indices], norm_type)
            else:
                units, norms, total, flag = ops.multi_tensor_unit_norm(
                    [grads[i] for i in indices], norm_type)
                unit_norms.append(units)
                if policy.reads_params:
                    param_unit_norms.append(ops.multi_tensor_unit_norm(
                        [params[i] for i in indices], norm_type)[0])
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

    def _reduce(self, batch: _Gathered, norms: _Norms | None) -> _Norms | None:
        """Phase 3: the norms across processes (``fusedclip.distributed``):
        those of DTensor shards summed (or, for the inf norm, maxed) over the
        mesh dims they are sharded on, the total over ``norm_group``, the
        non-finite flag everywhere, in one packed all-reduce per group, on the
        device. One process, plain tensors without ``norm_group``: nothing to do."""
        if norms is None or batch.plan is None:
            return norms
        return _Norms(*batch.plan.reduce(norms.total, norms.nonfinite, norms.tensor_norms,
                                         norms.unit_norms, norms.param_unit_norms))

    def _coefficients(self, batch: _Gathered, norms: _Norms | None, skip: Tensor | None):
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

    def _unit_counts(self, batch: _Gathered) -> list[list[int]] | None:
        """For a per-unit policy, the units of each gradient, bucket by bucket."""
        if self.clip_policy is None or self.clip_policy.scope != "unit":
            return None
        if batch.unit_counts is None:
            batch.unit_counts = [ops.unit_counts([batch.grads[i] for i in indices])
                                 for indices in batch.buckets]
        return batch.unit_counts

    def _unit_coefs(self, batch: _Gathered, coef) -> list[list[Tensor]] | None:
        """Per-unit coefficients as one view per gradient, bucket by bucket."""
        counts = self._unit_counts(batch)
        if counts is None:
            return None
        return [list(c.split(n)) for c, n in zip(coef, counts)]

    def _apply(self, batch: _Gathered, coef, unit_coefs: list[list[Tensor]] | None,
               elementwise, grad_scale: Tensor | None, skip: Tensor | None) -> None:
        """Phase 5: one fused op per group and (device, dtype), with the
        arguments every update op shares built here, once (``ops.StepArgs``).
        The gradients of one such call are a contiguous run of their norm
        bucket (buckets list the gradients group by group), so a per-tensor or
        per-unit coefficient is a slice (a view) of the bucket's coefficients."""
        policy = self.clip_policy
        scope = policy.scope if policy is not None else "global"
        sliced = scope in ("tensor", "unit")
        where = self._positions(batch) if sliced else []
        clip_value = elementwise.clip_value if elementwise is not None else None
        spike_theta = elementwise.spike_theta if elementwise is not None else None
        coef_on = _OnDevice(None if sliced else coef)
        scale_on, skip_on = _OnDevice(grad_scale), _OnDevice(skip)
        offset = 0
        for group, originals, params, grads, keys in batch.groups:
            # State is made here, after every check and the "raise" rule.
            states = []
            for p in originals:
                state = self.state[p]
                if len(state) == 0:
                    self._init_state(p, group, state)
                states.append(state)
            for (device, _), indices in group_by_key(keys).items():
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
                    # Kept the very list where no views were made (state_list).
                    call_originals = (call_params if params is originals
                                      else [originals[i] for i in indices])
                # A tensor lr goes to the op as it is: on the device it is read
                # by the kernel, on the CPU by the host (no device sync either;
                # no copy to the device, which from pageable memory would be one).
                lr = group["lr"]
                if isinstance(lr, Tensor) and lr.dim() > 1:
                    lr = lr.reshape(())  # torch takes any 1-element tensor; a view
                args = ops.StepArgs(
                    lr=lr, clip_coef=call_coef, grad_scale=scale_on.on(device),
                    found_inf=skip_on.on(device), clip_value=clip_value,
                    spike_theta=spike_theta, unit_coefs=units,
                    maximize=bool(group.get("maximize", False)))
                self._update(group, call_params, call_grads, call_states,
                             originals=call_originals, args=args)
            offset += len(params)

    @staticmethod
    def _positions(batch: _Gathered) -> list[tuple[int, int]]:
        """Where each gradient sits in its norm bucket: (bucket, index)."""
        where = [(0, 0)] * len(batch.grads)
        for b, indices in enumerate(batch.buckets):
            for k, i in enumerate(indices):
                where[i] = (b, k)
        return where

    def _record(self, batch: _Gathered, norms: _Norms | None, coef,
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
            order = runs(self._positions(batch))
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

    # -- state_dict: the clip policy's state ----------------------------------------
    def state_dict(self):
        """torch.optim's state_dict, plus the clip policy's state (if it keeps
        any) under ``"clip_policy"``: ``{"policy": class name, "state": {...},
        "tensor_state": {param id: {...}}}``, with the parameter ids of
        ``"state"``. torch.optim's ``load_state_dict`` ignores that key.

        In a distributed run (torch.distributed initialized, DTensor
        parameters or a ``norm_group``) the policy's state is kept in the
        per-parameter state instead (see ``_nest_policy_state``): torch's
        ``get_optimizer_state_dict`` and ``torch.distributed.checkpoint``
        carry only ``"state"`` and ``"param_groups"``. Either form loads."""
        state_dict = super().state_dict()
        for group in state_dict["param_groups"]:
            # Copied into the groups by ZeroRedundancyOptimizer each step; the
            # optimizer's, not the groups' (and a process group does not pickle).
            for key in (*OPTIMIZER_WIDE, "norm_group"):
                group.pop(key, None)
        policy = self.clip_policy
        if policy is not None and self._is_distributed():
            self._nest_policy_state(state_dict)
        elif policy is not None and (self._policy_state
                                     or any(self._policy_tensor_state.values())):
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

    def _is_distributed(self) -> bool:
        """Whether this optimizer's state dict is a distributed one (see state_dict)."""
        return self._norm_group is not None or distributed.initialized() or any(
            not distributed.is_plain(p) and distributed.is_dtensor(p)
            for group in self.param_groups for p in group["params"])

    def _nest_policy_state(self, state_dict: dict) -> None:
        """Puts the policy's state into ``state_dict["state"]``, where torch's
        distributed state_dict helpers keep it: under the key ``"clip_policy"``
        of the first parameter's entry ``{"state": {...}}`` and of every
        parameter's entry with per-tensor state ``{"tensor_state": {...}}``.
        Tensors only (no class name: torch.optim's load_state_dict would turn a
        string into a generator, and the flattened DCP form refuses one); a
        policy whose state has other keys refuses it on load. The state is
        there from construction on (the policy's initial state before the first
        step), so that the state_dict a checkpoint is loaded into already has
        every key. Entries are copies: the optimizer's own state dicts are not
        changed."""
        policy = self.clip_policy
        first = None
        device = self._skips["streak"].device
        for saved, group in zip(state_dict["param_groups"], self.param_groups):
            for pid, p in zip(saved["params"], group["params"]):
                entry = {}
                if first is None:
                    first = pid
                    global_state = self._policy_state or policy.init_state(device)
                    if global_state:
                        entry["state"] = dict(global_state)
                if policy.keeps_tensor_state:
                    tensor_state = self._policy_tensor_state.get(p)
                    if not tensor_state:
                        wide = p.dtype in (torch.float64, torch.complex128)
                        tensor_state = policy.init_tensor_state(
                            torch.float64 if wide else torch.float32, p.device)
                    if tensor_state:
                        entry["tensor_state"] = dict(tensor_state)
                if entry:
                    state_dict["state"][pid] = {**state_dict["state"].get(pid, {}),
                                                "clip_policy": entry}

    def load_state_dict(self, state_dict) -> None:
        """torch.optim's load_state_dict; a state_dict without ``"clip_policy"``
        (torch.optim's, say) starts the clip policy afresh. An optimizer without
        a policy ignores a saved policy state; one with another policy refuses it.
        Param groups saved by older torch versions (without ``maximize``,
        ``foreach``, ... or with float step counts) load as torch loads them.
        The policy state of a distributed optimizer's state_dict (in the
        per-parameter state) loads into any fusedclip optimizer."""
        saved = state_dict.get("clip_policy")
        nested = _unnest_policy_state(state_dict, self.clip_policy, self._skips["streak"].device)
        if nested is not None:
            saved, state_dict = nested
        policy = self.clip_policy
        if policy is None:
            saved = None
        if saved is not None and saved.get("policy") != type(policy).__name__:
            raise ValueError(
                f"this state_dict holds the state of clip policy {saved.get('policy')!r}, "
                f"but this optimizer's policy is {policy!r}"
            )
        if saved is not None:
            # A policy of the same class may keep other state (one made of other policies).
            cpu = torch.device("cpu")
            keys = sorted(policy.init_state(cpu))
            tensor_keys = (sorted(policy.init_tensor_state(torch.float32, cpu))
                           if policy.keeps_tensor_state else [])
            for what, got, own in [("", saved["state"], keys)] + [
                    (" per-tensor", s, tensor_keys) for s in saved["tensor_state"].values()]:
                if got and sorted(got) != own:
                    raise ValueError(
                        f"this state_dict's clip policy{what} state has the keys "
                        f"{sorted(got)}, but this optimizer's policy {policy!r} keeps {own}")
        for group in state_dict.get("param_groups", []):
            for key in OPTIMIZER_WIDE:
                if key in group:
                    raise ValueError(f"this state_dict's param groups set {key!r}, "
                                     "which applies to a whole optimizer")
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


def _unnest_policy_state(state_dict: dict, policy, device):
    """``(saved policy state in the top-level form, state_dict without it)``
    for a state_dict that keeps the policy state in its per-parameter state
    (``FusedClipOptimizer._nest_policy_state``), else None. The values get the
    dtypes of ``policy``'s own state where it has the key: a torch.optim
    optimizer that loaded such a state_dict casts every tensor of a
    parameter's state to the parameter's dtype (an int64 count to float32)."""
    per_param = state_dict.get("state", {})
    if not any(isinstance(s, dict) and "clip_policy" in s for s in per_param.values()):
        return None
    saved = {"policy": None, "state": {}, "tensor_state": {}}
    initial = policy.init_state(device) if policy is not None else {}
    initial_tensor = (policy.init_tensor_state(torch.float32, device)
                      if policy is not None and policy.keeps_tensor_state else {})
    state = {}
    for pid, s in per_param.items():
        entry = s.get("clip_policy") if isinstance(s, dict) else None
        if entry is None:
            state[pid] = s
            continue
        rest = {k: v for k, v in s.items() if k != "clip_policy"}
        if rest:
            state[pid] = rest
        if "state" in entry:
            saved["state"] = _like(entry["state"], initial)
        if entry.get("tensor_state"):
            # (floating values keep their dtype: the norms', the parameter's)
            saved["tensor_state"][pid] = _like(entry["tensor_state"], initial_tensor,
                                               floating=False)
    # The saved state is this policy's if it has this policy's keys.
    keys = sorted(saved["state"])
    tensor_keys = sorted({k for s in saved["tensor_state"].values() for k in s})
    if keys == sorted(initial) and tensor_keys in ([], sorted(initial_tensor)):
        saved["policy"] = type(policy).__name__ if policy is not None else None
    else:
        saved["policy"] = f"<a policy with state {keys} and per-tensor state {tensor_keys}>"
    return saved, {**state_dict, "state": state}


def _like(values: dict, initial: dict, floating: bool = True) -> dict:
    """``values`` with the dtype of ``initial``'s tensor of the same key (only
    where that is not a floating dtype, unless ``floating``)."""
    out = {}
    for key, value in values.items():
        ref = initial.get(key)
        if (isinstance(value, Tensor) and isinstance(ref, Tensor) and value.dtype != ref.dtype
                and (floating or not ref.is_floating_point())):
            value = value.to(ref.dtype)
        out[key] = value
    return out


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


class _SkipMonitor:
    """Warns when many steps in a row were skipped, without a device sync:
    a CPU count is read as it is; a CUDA one from a pinned copy made
    asynchronously at the previous check, once its event has completed."""

    def __init__(self) -> None:
        self.warned_at = 0
        self.pending = None  # (pinned host tensor, event)

    def check(self, opt: FusedClipOptimizer) -> int | None:
        streak = opt._skips["streak"]
        if streak.device.type == "cpu":
            seen = int(streak)  # sync-ok: CPU memory
        else:
            seen = None
            if self.pending is not None and self.pending[1].query():
                seen = int(self.pending[0])  # sync-ok: a completed pinned copy
                self.pending = None
            if self.pending is None and streak.device.type == "cuda":
                host = torch.empty((), dtype=streak.dtype, pin_memory=True)
                host.copy_(streak, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                self.pending = (host, event)
        limit = opt.warn_after_skips
        if seen is None or not limit:
            return seen
        if seen < limit:
            self.warned_at = 0
        elif seen >= max(limit, 10 * self.warned_at):
            self.warned_at = seen
            warnings.warn(
                f"{type(opt).__name__}: the last {seen} steps were all skipped: the gradients "
                f"held inf or nan (nonfinite={opt.nonfinite!r}) or a GradScaler found inf, so "
                "no parameter has changed since. Check the loss and the gradients; "
                "nonfinite='raise' stops at the first such step. (Set warn_after_skips=0 "
                "to silence this.)", RuntimeWarning, stacklevel=4)
        return seen

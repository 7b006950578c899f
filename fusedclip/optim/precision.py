"""The four mixed-precision options of every fused optimizer (issue 20):
``master_weights``, ``store_param_remainders``, ``state_dtype`` and
``stochastic_rounding``: their checks, the state they add, the per-call lists
the update ops take (``ops.StepArgs.masters`` / ``.sr_generators``) and the
state_dict hooks that keep that state as saved.

The options are per param group, as torch.optim's options are. A key is put
into ``defaults`` (and so into every group) only when the constructor is given
a value other than its default; a group may set any of them itself. Without
them, ``defaults``, the param groups and state dicts are torch.optim's exactly
(``group.get(key, default)`` reads them).

State keys, besides torch.optim's:

- ``"master_param"``: the float32 master of a bfloat16/float16 parameter
  (``master_weights``), or ``"param_remainder"``: the low 16 bits of the float32
  master of a bfloat16 parameter as int16 (``store_param_remainders``; the
  parameter holds the high 16 bits rounded to nearest, ties away from zero, so
  the pair is the master exactly: csrc/include/fusedclip/precision.h);
- ``"sr_generator"``: int64 ``[seed, counter]`` on the parameter's device
  (``stochastic_rounding``), where the step writes a bfloat16/float16 value from
  float32 math: a low-precision parameter without a master, or low-precision
  state. The seed is drawn from torch's default generator (of the parameter's
  device) when it is made; the op advances the counter after each step it does
  not skip.

Masters and generators are made at the step that first needs them (not when a
parameter joins: Adagrad's eager state would copy the parameters before a
checkpoint is loaded into the model), from the parameter as it is then; a
master in the other form (a remainder where the group keeps full masters or
the reverse, after a state dict of the other mode was loaded or the option
changed) is converted there too, from the parameter as it is then.

``load_state_dict``: torch.optim casts every tensor of a parameter's state to
the parameter's dtype; the pre hook takes the state this module owns (masters,
remainders, generators and, where a group sets an option, the floating state)
out of what torch loads and the post hook puts it back, the floating state
cast to the group's state dtype. Unlike the hyperparameters (lr, betas: the
saved ones win, as in torch.optim), the options stay the loading optimizer's:
they say how this optimizer keeps its state, and a state dict of another form
is converted (a torch.optim state dict gets its masters made from the
parameters, a full master becomes a remainder or the reverse, at the next step;
masters and generators the loading optimizer does not use are dropped).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusedclip.optim.layout import kernel_view

#: the options and their defaults
DEFAULTS = {"master_weights": False, "store_param_remainders": False, "state_dtype": None,
            "stochastic_rounding": False}
OPTIONS = tuple(DEFAULTS)
#: the state keys this module adds
KEYS = ("master_param", "param_remainder", "sr_generator")
LOW = (torch.bfloat16, torch.float16)
STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# Where the load pre hook leaves what it took out for the post hook.
_LOADING = "_loading_precision_state"


def defaults(master_weights, store_param_remainders, state_dtype, stochastic_rounding) -> dict:
    """The options given to a constructor, as its ``defaults`` keep them: only
    those not at their default."""
    given = {"master_weights": master_weights, "store_param_remainders": store_param_remainders,
             "state_dtype": state_dtype, "stochastic_rounding": stochastic_rounding}
    return {k: v for k, v in given.items() if v is not DEFAULTS[k]}


def active(group: dict) -> bool:
    """Whether any option is on in ``group`` (the fast path's test)."""
    return bool(group.get("master_weights") or group.get("stochastic_rounding")
                or group.get("state_dtype") is not None)


def check_options(group: dict) -> None:
    """The options' values (ValueError naming the option): in the constructor,
    ``add_param_group`` and every step, before anything changes."""
    for key in ("master_weights", "store_param_remainders", "stochastic_rounding"):
        value = group.get(key, False)
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be True or False, got {value!r}")
    if group.get("store_param_remainders") and not group.get("master_weights"):
        raise ValueError(
            "store_param_remainders=True needs master_weights=True: the remainders are the "
            "low 16 bits of the float32 master weights")
    dtype = group.get("state_dtype")
    if dtype is None:
        return
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"state_dtype must be None or a floating dtype (torch.float32, "
                         f"torch.bfloat16, torch.float16, torch.float64), got {dtype!r}")
    if dtype not in STATE_DTYPES:
        raise ValueError(f"state_dtype {dtype} is narrower than bfloat16: the optimizer state "
                         "is kept in float32, bfloat16, float16 or float64")


def check_params(group: dict, where: str = "") -> None:
    """The options against the group's parameters' dtypes (ValueError naming
    the option): when a group is added and when a step finds a new layout,
    before anything changes. The kernels' math is float32 for every mixed
    call, so float64 does not mix."""
    if not active(group):
        return
    state_dtype = group.get("state_dtype")
    remainders = group.get("store_param_remainders")
    for p in group["params"]:
        dtype = p.dtype
        if state_dtype is not None:
            if dtype.is_complex:
                raise ValueError(f"state_dtype={state_dtype} applies to real parameters; "
                                 f"a {dtype} parameter keeps {dtype} state{where}")
            if (state_dtype == torch.float64) != (dtype == torch.float64):
                raise ValueError(
                    f"state_dtype={state_dtype} with a {dtype} parameter{where}: float64 does "
                    "not mix with other dtypes (the math of a mixed step is float32)")
        if remainders and group.get("master_weights") and dtype == torch.float16:
            raise ValueError(
                f"store_param_remainders=True with a float16 parameter{where}: remainders "
                "need bfloat16 parameters (the high 16 bits of the float32 master); use "
                "store_param_remainders=False (a full float32 master) for float16")


# -- state -----------------------------------------------------------------------------------
def state_dtype(param: Tensor, group: dict) -> torch.dtype:
    """The dtype of the parameter's floating state buffers: ``state_dtype``,
    else float32 for a bfloat16/float16 parameter under master weights, else
    the parameter's."""
    dtype = group.get("state_dtype")
    if dtype is not None:
        return dtype
    if param.dtype in LOW and group.get("master_weights"):
        return torch.float32
    return param.dtype


def zeros(param: Tensor, group: dict) -> Tensor:
    """A zero state buffer for ``param`` (``torch.zeros_like``, of the group's state dtype)."""
    return torch.zeros_like(param, dtype=state_dtype(param, group),
                            memory_format=torch.preserve_format)


def full(param: Tensor, group: dict, value) -> Tensor:
    """A state buffer for ``param`` filled with ``value``."""
    return torch.full_like(param, value, dtype=state_dtype(param, group),
                           memory_format=torch.preserve_format)


def master_key(dtype: torch.dtype, group: dict) -> str | None:
    """The state key of the master of a parameter of (kernel) ``dtype`` in
    ``group``: "master_param", "param_remainder", or None (no master)."""
    if dtype not in LOW or not group.get("master_weights"):
        return None
    return "param_remainder" if group.get("store_param_remainders") else "master_param"


def needs_generator(param: Tensor, group: dict) -> bool:
    """Whether a step of ``param`` writes a bfloat16/float16 value from float32
    math with ``stochastic_rounding`` on: its generator is needed."""
    if not group.get("stochastic_rounding"):
        return False
    return ((param.dtype in LOW and master_key(param.dtype, group) is None)
            or state_dtype(param, group) in LOW)


def keeps_state(param: Tensor, group: dict) -> bool:
    """Whether ``param`` has state of this module's (SGD without momentum keeps
    no state entry otherwise)."""
    return master_key(param.dtype, group) is not None or needs_generator(param, group)


def step_lists(group: dict, dtype: torch.dtype, originals: list[Tensor], states: list[dict],
               views: bool) -> tuple[list[Tensor] | None, list[Tensor] | None]:
    """``(masters, sr_generators)`` of one update call: a group's parameters
    of one (device, kernel dtype), so one decision for all; each list None
    where not needed. Makes what is missing (and converts a master of the
    other form), from the parameters as they are now."""
    if not (group.get("master_weights") or group.get("stochastic_rounding")):
        return None, None
    key = master_key(dtype, group)
    masters = None
    if key is not None:
        masters = []
        for p, s in zip(originals, states):
            m = s.get(key)
            if m is None:
                m = _make_master(p, s, key)
            masters.append(kernel_view(m) if views else m)
    generators = None
    if group.get("stochastic_rounding") and originals and needs_generator(originals[0], group):
        missing = [s for s in states if "sr_generator" not in s]
        if missing:
            for s, g in zip(missing, new_generators(len(missing), originals[0].device)):
                s["sr_generator"] = g
        generators = [s["sr_generator"] for s in states]
    return masters, generators


def new_generators(n: int, device) -> list[Tensor]:
    """``n`` generator states ``[seed, 0]`` (int64), the seeds drawn from
    torch's default generator of ``device``."""
    seeds = torch.randint(0, 2**63 - 1, (n,), dtype=torch.int64, device=device)
    pairs = torch.stack([seeds, torch.zeros_like(seeds)], 1)
    return [pair.clone() for pair in pairs.unbind(0)]


def _make_master(param: Tensor, state: dict, key: str) -> Tensor:
    """The master of ``param`` in the form ``key``, from a master of the other
    form in ``state`` where there is one (taken out), else from the parameter."""
    if key == "master_param":
        remainder = state.pop("param_remainder", None)
        master = torch.empty_like(param, dtype=torch.float32, memory_format=torch.preserve_format)
        if remainder is None:
            master.copy_(param.detach())
        else:
            kernel_view(master).copy_(join_master(kernel_view(param.detach()),
                                                  kernel_view(remainder)))
    else:
        full_master = state.pop("master_param", None)
        master = torch.zeros_like(param, dtype=torch.int16, memory_format=torch.preserve_format)
        if full_master is not None:
            high, low = split_master(kernel_view(full_master))
            kernel_view(param.detach()).copy_(high)
            kernel_view(master).copy_(low)
    state[key] = master
    return master


# -- the bf16 master's two halves (csrc/include/fusedclip/precision.h), in torch ops ----------
def _wrap(values: Tensor, bits: int, dtype: torch.dtype) -> Tensor:
    """int64 ``values`` in [0, 2**bits) as the signed integers of ``dtype`` with those bits."""
    return torch.where(values >= 2 ** (bits - 1), values - 2 ** bits, values).to(dtype)


def split_master(master: Tensor) -> tuple[Tensor, Tensor]:
    """``(bfloat16 parameter, int16 remainder)`` of a float32 master: the
    parameter rounded to nearest, ties away from zero (bits(m) + 0x8000, high
    half), the remainder the low 16 bits; a NaN master gives a quiet NaN and
    remainder 0."""
    bits = master.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    nan = torch.isnan(master)
    high = torch.where(nan, (bits >> 16) | 0x0040, (bits + 0x8000) >> 16) & 0xFFFF
    low = torch.where(nan, 0, bits & 0xFFFF)
    return _wrap(high, 16, torch.int16).view(torch.bfloat16), _wrap(low, 16, torch.int16)


def join_master(param: Tensor, remainder: Tensor) -> Tensor:
    """The float32 master of a bfloat16 parameter and its int16 remainder:
    ``(bits(param) << 16) + remainder`` (a signed add)."""
    high = param.view(torch.int16).to(torch.int64) & 0xFFFF
    bits = ((high << 16) + remainder.to(torch.int64)) & 0xFFFFFFFF
    return _wrap(bits, 32, torch.int32).view(torch.float32)


def round_master(master: Tensor) -> Tensor:
    """The bfloat16 parameter of a float32 master (round to nearest, ties away)."""
    return split_master(master)[0]


# -- state_dict hooks ----------------------------------------------------------------------------
def install(opt) -> None:
    """Registers the load_state_dict hooks where they are not (after
    ``policy_state``'s: its pre hook unnests the policy state first)."""
    if take_out not in opt._optimizer_load_state_dict_pre_hooks.values():
        opt.register_load_state_dict_pre_hook(take_out)
    if put_back not in opt._optimizer_load_state_dict_post_hooks.values():
        opt.register_load_state_dict_post_hook(put_back)


def take_out(opt, state_dict: dict) -> dict:
    """load_state_dict pre hook: the state dict torch.optim loads, without
    what torch would cast to the parameter's dtype and this module keeps
    (left for ``put_back``), its groups given the loading optimizer's options
    where they have none. The caller's dict is not changed."""
    opt.__dict__.pop(_LOADING, None)
    saved_groups = state_dict.get("param_groups")
    if not isinstance(saved_groups, list) or len(saved_groups) != len(opt.param_groups):
        return state_dict  # torch's own check raises
    groups = []
    for saved, current in zip(saved_groups, opt.param_groups):
        # The options say how this optimizer keeps its state: its own, not the saved ones.
        if any(k in saved or k in current for k in OPTIONS):
            saved = {k: v for k, v in saved.items() if k not in OPTIONS}
            saved.update((k, current[k]) for k in OPTIONS if k in current)
        groups.append(saved)
    state = state_dict.get("state", {})
    kept, taken = {}, {}
    wanted = {pid for g in groups if active(g) for pid in g["params"]}
    for pid, s in state.items():
        if not isinstance(s, dict):
            kept[pid] = s
            continue
        own = {k: v for k, v in s.items() if isinstance(v, Tensor) and (
            k in KEYS or (pid in wanted and k != "step" and v.is_floating_point()))}
        if own:
            taken[pid] = own
            kept[pid] = {k: v for k, v in s.items() if k not in own}
        else:
            kept[pid] = s
    if taken:
        opt.__dict__[_LOADING] = ([list(g["params"]) for g in groups], taken)
    return {**state_dict, "param_groups": groups, "state": kept}


def put_back(opt) -> None:
    """load_state_dict post hook: puts back what ``take_out`` took, the
    floating state cast to the group's state dtype, masters and generators as
    saved (on the parameter's device); those the group does not use are left
    out."""
    loading = opt.__dict__.pop(_LOADING, None)
    if loading is None:
        return
    saved_ids, taken = loading
    for ids, group in zip(saved_ids, opt.param_groups):
        for pid, p in zip(ids, group["params"]):
            own = taken.get(pid)
            if own is None:
                continue
            state = opt.state[p]
            key = master_key(p.dtype, group)
            for k, v in own.items():
                if k in ("master_param", "param_remainder"):
                    if key is not None:  # converted at the step where of the other form
                        state[k] = v.to(device=p.device)
                elif k == "sr_generator":
                    if group.get("stochastic_rounding"):
                        state[k] = v.to(dtype=torch.int64, device=p.device)
                elif p.is_floating_point():
                    state[k] = v.to(dtype=state_dtype(p, group), device=p.device)
                else:
                    state[k] = v.to(device=p.device)
            if "master_param" in state and "param_remainder" in state:
                state.pop("param_remainder" if key == "master_param" else "master_param")

"""The clip policy's state in the optimizer's state_dict, through torch.optim's
state_dict hooks (``install`` registers them on an optimizer).

``state_dict()`` is torch.optim's, plus the clip policy's state (if it keeps
any) under ``"clip_policy"``: ``{"policy": class name, "state": {...},
"tensor_state": {param id: {...}}}``, with the parameter ids of ``"state"``.
torch.optim's ``load_state_dict`` ignores that key, so a torch optimizer loads
a fusedclip state_dict.

In a distributed run (torch.distributed initialized, DTensor parameters or a
``norm_group``) the policy's state is kept in the per-parameter state instead
(see ``nest``): torch's ``get_optimizer_state_dict`` and
``torch.distributed.checkpoint`` carry only ``"state"`` and
``"param_groups"``. Either form loads.

``load_state_dict()`` is torch.optim's; a state_dict without the policy's
state (torch.optim's, say) starts the clip policy afresh. An optimizer
without a policy ignores a saved policy state; one with another policy
refuses it, before anything changes. The policy state of a distributed
optimizer's state_dict (in the per-parameter state) loads into any fusedclip
optimizer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusedclip import distributed

# Keys a param group may not hold: clipping and its non-finite rule are one
# decision for the whole optimizer (one global norm covers every group).
OPTIMIZER_WIDE = ("clip", "nonfinite")
# Where the load pre hook leaves the saved policy state for the post hook.
_LOADING = "_loading_policy_state"


def install(opt) -> None:
    """Registers the hooks on ``opt`` where they are not (a new optimizer, or
    one unpickled: torch.optim does not keep hooks in its pickled state)."""
    if save not in opt._optimizer_state_dict_post_hooks.values():
        opt.register_state_dict_post_hook(save)
    if check_and_unnest not in opt._optimizer_load_state_dict_pre_hooks.values():
        opt.register_load_state_dict_pre_hook(check_and_unnest)
    if restore not in opt._optimizer_load_state_dict_post_hooks.values():
        opt.register_load_state_dict_post_hook(restore)


def is_distributed(opt) -> bool:
    """Whether ``opt``'s state dict is a distributed one (see the module's docstring)."""
    return opt._norm_group is not None or distributed.initialized() or any(
        not distributed.is_plain(p) and distributed.is_dtensor(p)
        for group in opt.param_groups for p in group["params"])


def save(opt, state_dict: dict) -> dict:
    """state_dict post hook: the optimizer-wide keys out of the groups, the
    policy's state in."""
    for group in state_dict["param_groups"]:
        # Copied into the groups by ZeroRedundancyOptimizer each step; the
        # optimizer's, not the groups' (and a process group does not pickle).
        for key in (*OPTIMIZER_WIDE, "norm_group"):
            group.pop(key, None)
    policy = opt.clip_policy
    if policy is not None and is_distributed(opt):
        nest(opt, state_dict)
    elif policy is not None and (opt._policy_state or any(opt._policy_tensor_state.values())):
        ids = {}
        for saved, group in zip(state_dict["param_groups"], opt.param_groups):
            for pid, p in zip(saved["params"], group["params"]):
                ids[p] = pid
        state_dict["clip_policy"] = {
            "policy": type(policy).__name__,
            "state": dict(opt._policy_state),
            "tensor_state": {
                ids[p]: dict(s) for p, s in opt._policy_tensor_state.items()
                if p in ids and s
            },
        }
    return state_dict


def nest(opt, state_dict: dict) -> None:
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
    policy = opt.clip_policy
    first = None
    device = opt._skips["streak"].device
    for saved, group in zip(state_dict["param_groups"], opt.param_groups):
        for pid, p in zip(saved["params"], group["params"]):
            entry = {}
            if first is None:
                first = pid
                global_state = opt._policy_state or policy.init_state(device)
                if global_state:
                    entry["state"] = dict(global_state)
            if policy.keeps_tensor_state:
                tensor_state = opt._policy_tensor_state.get(p)
                if not tensor_state:
                    wide = p.dtype in (torch.float64, torch.complex128)
                    tensor_state = policy.init_tensor_state(
                        torch.float64 if wide else torch.float32, p.device)
                if tensor_state:
                    entry["tensor_state"] = dict(tensor_state)
            if entry:
                state_dict["state"][pid] = {**state_dict["state"].get(pid, {}),
                                            "clip_policy": entry}


def check_and_unnest(opt, state_dict: dict) -> dict:
    """load_state_dict pre hook: refuses a policy state of another policy and
    param groups that set an optimizer-wide key, before anything changes;
    returns the state_dict torch.optim loads (the policy state taken out of
    the per-parameter state) and leaves the policy state for ``restore``,
    with the parameters its per-tensor entries belong to."""
    opt.__dict__.pop(_LOADING, None)
    saved = state_dict.get("clip_policy")
    nested = unnest(state_dict, opt.clip_policy, opt._skips["streak"].device)
    if nested is not None:
        saved, state_dict = nested
    policy = opt.clip_policy
    if policy is None:
        saved = None
    if saved is not None and saved.get("policy") != type(policy).__name__:
        raise ValueError(
            f"this state_dict holds the state of clip policy {saved.get('policy')!r}, "
            f"but this optimizer's policy is {policy!r}"
        )
    if saved is not None:
        _check_keys(saved, policy)
    for group in state_dict.get("param_groups", []):
        for key in OPTIMIZER_WIDE:
            if key in group:
                raise ValueError(f"this state_dict's param groups set {key!r}, "
                                 "which applies to a whole optimizer")
    params = {}
    if saved is not None:
        for saved_group, group in zip(state_dict["param_groups"], opt.param_groups):
            for pid, p in zip(saved_group["params"], group["params"]):
                params[pid] = p
    opt.__dict__[_LOADING] = (saved, params)
    return state_dict


def _check_keys(saved: dict, policy) -> None:
    """Refuses a saved policy state whose keys (its own or per-tensor) are not
    the policy's: a policy of the same class may keep other state (one made of
    other policies), which would otherwise fail at the next step."""
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


def restore(opt) -> None:
    """load_state_dict post hook: the policy state that ``check_and_unnest``
    found (copies, the per-tensor ones on their parameters' devices), or a
    fresh start."""
    saved, params = opt.__dict__.pop(_LOADING, (None, {}))
    opt._policy_state = {}
    opt._policy_tensor_state = {}
    if saved is None:
        return
    opt._policy_state = {k: v.clone() if isinstance(v, Tensor) else v
                         for k, v in saved["state"].items()}
    for pid, s in saved["tensor_state"].items():
        if pid in params:
            p = params[pid]
            opt._policy_tensor_state[p] = {
                k: v.to(p.device, copy=True) if isinstance(v, Tensor) else v
                for k, v in s.items()
            }


def unnest(state_dict: dict, policy, device):
    """``(saved policy state in the top-level form, state_dict without it)``
    for a state_dict that keeps the policy state in its per-parameter state
    (``nest``), else None. The values get the dtypes of ``policy``'s own
    state where it has the key: a torch.optim optimizer that loaded such a
    state_dict casts every tensor of a parameter's state to the parameter's
    dtype (an int64 count to float32)."""
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

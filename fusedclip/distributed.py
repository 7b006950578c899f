"""Clipping across processes: over which processes each parameter's norms are
summed, and the packed all-reduces that make them the norms of the whole model.

A fused optimizer's norm pass measures what this process holds: the local
shards of DTensor parameters (FSDP2, tensor parallel, both on a 2-D mesh) and
plain tensors whole. Its ``reduce`` phase (``FusedClipOptimizer._reduce``) then
makes those norms global, on every rank, before the clip policy sees them:

- **DTensor parameters**: a tensor's contribution (its sum of squares for
  ``p = 2``, its largest magnitude for ``p = inf``) is summed (or maxed) over
  exactly the mesh dimensions on which it is ``Shard``-ed (``_StridedShard``
  included); on a ``Replicate`` dimension every rank holds the same values,
  which are counted once. ``Partial`` placements (of a parameter or of its
  gradient) are refused: the norm of a sum of partial gradients is not a
  function of their norms, and the update needs the summed gradient anyway
  (redistribute it to the parameter's placements first). Mesh dimensions of
  size 1 are ignored, whatever their placement.
- **per-tensor norms** (policies of scope ``"tensor"``: ``PerTensorNorm``,
  ``AdaGC``): one entry per sharded tensor, reduced like the total.
- **per-unit norms** (scope ``"unit"``: ``AGC``; a unit is an index of dim 0,
  and a 0-d/1-d tensor is one unit): reduced over the mesh dimensions that
  split a unit: ``Shard(d)`` with ``d >= 1`` (tensor parallel's row-wise
  weights), and any shard of a 0-d/1-d tensor. ``Shard(0)`` of a tensor with
  two dims or more (FSDP2's layout) leaves each unit whole on one rank, so its
  unit norms are exact as measured.
- **plain tensors** count as they are on each rank (replicated, as under DDP,
  or a plain layer beside tensor-parallel ones), unless ``norm_group`` says that
  the group's members hold different parts of the model (ZeRO's partitions,
  pipeline stages): then the total is also summed over ``norm_group``, last.
- the **non-finite flag** of every rank travels in every packet, and a global
  norm that is not finite sets it too, so every rank skips (or raises) together.

The values one reduction group needs (per-class sums, per-tensor and per-unit
entries, the flag) go in one float64 tensor and one ``all_reduce`` (SUM for
``p = 2``; for ``p = inf`` MAX, with NaN carried by flags of its own since MAX
reductions drop NaN): at most one collective per mesh dimension used and one for
``norm_group``, issued in an order every rank shares (the mesh dimensions in the
order the parameters first use them, then ``norm_group``), on the current
stream (NCCL orders it after the norm pass and the next kernels after it), and
never read on the host.

Rounding: the norm pass returns norms, not sums of squares, so the sums are the
squares of the shards' norms, taken in float64. A float32 norm squares exactly
in float64, so the cost is the float32 rounding of each shard's norm (at most
2**-24 relative, 2**-23 on its square): a global norm is within about 1e-7
relative of the single-process one, not bit for bit equal.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.nn import Parameter

__all__ = ["is_plain", "local", "spec_of", "resolve_norm_group", "GroupRef", "Plan"]

_PLAIN_TYPES = (Tensor, Parameter)
PLAIN_TYPES = _PLAIN_TYPES  # for the optimizers' hot loop, which inlines is_plain


def is_plain(t: Tensor) -> bool:
    """True for a plain tensor or parameter (a fast check that torch.compile traces)."""
    return type(t) in _PLAIN_TYPES


_DTENSOR = []  # DTensor's class, once torch.distributed.tensor is imported


def _dtensor_type():
    """DTensor's class, or None while ``torch.distributed.tensor`` is not
    imported (no DTensor can exist then; importing it costs 0.4 s)."""
    if not _DTENSOR:
        cls = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
        if cls is None:
            return None
        _DTENSOR.append(cls)
    return _DTENSOR[0]


def is_dtensor(t) -> bool:
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def local(t: Tensor) -> Tensor:
    """The tensor the fused ops see for ``t``: its local shard for a DTensor
    (the same storage: in-place updates of it update the DTensor), else itself."""
    cls = _dtensor_type()
    if cls is not None and isinstance(t, cls):
        return t.to_local()
    return t


# -- reduction groups -------------------------------------------------------------------------
@dataclass(eq=False)
class Group:
    """A process group over which norms are reduced."""

    pg: object  # torch.distributed.ProcessGroup
    name: str
    ranks: tuple

    @property
    def size(self) -> int:
        return len(self.ranks)


class GroupRef:
    """Holds a ``norm_group`` for the optimizer: a copy of the optimizer shares
    it (a process group is a handle, not data), and pickling says why it cannot
    be pickled instead of pybind's bare error."""

    def __init__(self, given, group: Group) -> None:
        self.given = given
        self.group = group

    def __deepcopy__(self, memo):
        return self

    def __copy__(self):
        return self

    def __reduce__(self):
        raise TypeError(
            "an optimizer with a norm_group cannot be pickled (a process group is a handle "
            "to this run's processes); save its state_dict() instead")


def initialized() -> bool:
    """Whether this process is part of a torch.distributed run."""
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()


def _dist():
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("fusedclip: torch.distributed is not available in this build of torch")
    return dist


def resolve_norm_group(norm_group, owner: str) -> GroupRef | None:
    """Checks a ``norm_group=`` argument: None, a ProcessGroup this rank belongs
    to, or a 1-D DeviceMesh (its group)."""
    if norm_group is None:
        return None
    dist = _dist()
    mesh_module = sys.modules.get("torch.distributed.device_mesh")
    mesh_type = getattr(mesh_module, "DeviceMesh", None)
    if mesh_type is not None and isinstance(norm_group, mesh_type):
        if norm_group.ndim != 1:
            raise ValueError(
                f"{owner}: norm_group must be a ProcessGroup or a 1-D DeviceMesh, got a "
                f"{norm_group.ndim}-D DeviceMesh {norm_group}; pass one of its dims "
                "(mesh['name']) or its flattened mesh")
        if norm_group.get_coordinate() is None:
            raise ValueError(f"{owner}: this rank is not in norm_group {norm_group}")
        pg = norm_group.get_group()
    elif isinstance(norm_group, dist.ProcessGroup):
        pg = norm_group
    else:
        raise TypeError(
            f"{owner}: norm_group must be None, a torch.distributed ProcessGroup or a 1-D "
            f"DeviceMesh, got {type(norm_group).__name__}")
    if not dist.is_initialized():
        raise RuntimeError(f"{owner}: norm_group given but torch.distributed is not initialized")
    ranks = tuple(dist.get_process_group_ranks(pg))
    if dist.get_rank() not in ranks:
        raise ValueError(
            f"{owner}: this rank ({dist.get_rank()}) is not a member of norm_group "
            f"(ranks {list(ranks)})")
    return GroupRef(norm_group, Group(pg, pg.group_name, ranks))


# -- what each DTensor parameter needs ---------------------------------------------------------
@dataclass(eq=False)
class Spec:
    """Over which groups a DTensor's norm and its units' norms are reduced."""

    norm: tuple  # of Group, in mesh-dim order
    unit: tuple  # of Group: the dims that split a unit
    mesh_ranks: frozenset
    mesh: object = field(repr=False, default=None)


def _shard_dim(placement, ndim: int):
    """The tensor dim a placement shards (normalized), None for Replicate, or
    raise for what the optimizer cannot update shard by shard."""
    from torch.distributed.tensor.placement_types import Replicate, Shard, _StridedShard

    if isinstance(placement, (Shard, _StridedShard)):
        return placement.dim % max(ndim, 1)
    if isinstance(placement, Replicate):
        return None
    raise ValueError(placement)


def _make_spec(mesh, placements, ndim: int, what: str, groups: dict) -> Spec:
    dist = _dist()
    if mesh.get_coordinate() is None:
        raise RuntimeError(f"{what}: this rank ({dist.get_rank()}) is not in its DeviceMesh {mesh}")
    names = mesh.mesh_dim_names
    norm, unit = [], []
    for i, placement in enumerate(placements):
        if mesh.size(i) == 1:
            continue
        try:
            dim = _shard_dim(placement, ndim)
        except ValueError:
            partial = getattr(placement, "is_partial", lambda: False)()
            kind = "Partial" if partial else type(placement).__name__
            raise ValueError(
                f"{what} is a DTensor with placement {placement} ({kind}) on mesh dim "
                f"{names[i] if names else i} of {mesh}: fused clipping updates each rank's "
                "local shard and supports Shard and Replicate placements (FSDP2, tensor "
                "parallel). Redistribute it, e.g. p.grad = p.grad.redistribute("
                "p.device_mesh, p.placements), or keep it out of this optimizer") from None
        if dim is None:
            continue
        pg = mesh.get_group(i)
        group = groups.get(pg.group_name)
        if group is None or group.pg is not pg:
            group = groups[pg.group_name] = Group(
                pg, pg.group_name, tuple(dist.get_process_group_ranks(pg)))
        norm.append(group)
        if ndim <= 1 or dim >= 1:
            unit.append(group)
    ranks = frozenset(mesh.mesh.flatten().tolist())  # sync-ok: DeviceMesh.mesh is a CPU tensor
    return Spec(tuple(norm), tuple(unit), ranks, mesh)


def spec_of(param: Tensor, grad: Tensor, what: str, cache: dict) -> Spec | None:
    """The reduction spec of a parameter and its gradient: None for plain
    tensors (and tensor subclasses other than DTensor), else a (cached) Spec,
    after the checks that a shard-by-shard update needs."""
    p_dt, g_dt = is_dtensor(param), is_dtensor(grad)
    if not p_dt and not g_dt:
        return None
    if not g_dt:
        raise RuntimeError(f"{what} is a DTensor but its gradient is a {type(grad).__name__}")
    if not p_dt:
        raise RuntimeError(f"{what} is a {type(param).__name__} but its gradient is a DTensor")
    mesh, placements = param.device_mesh, param.placements
    if (grad.device_mesh is not mesh and grad.device_mesh != mesh) or grad.placements != placements:
        raise RuntimeError(
            f"{what} is a DTensor on {mesh} with placements {placements}, but its gradient is "
            f"on {grad.device_mesh} with placements {grad.placements}: the update pairs local "
            "shards, which needs the same layout (redistribute the gradient: p.grad = "
            "p.grad.redistribute(p.device_mesh, p.placements))")
    key = (id(mesh), placements, param.dim())
    hit = cache.get(key)
    if hit is not None and hit.mesh is mesh:
        return hit
    spec = cache[key] = _make_spec(mesh, placements, param.dim(), what,
                                   cache.setdefault("groups", {}))
    return spec


# -- the plan: which entries each group reduces -----------------------------------------------
def _all_reduce(packet: Tensor, group: Group, use_max: bool) -> Tensor:
    dist = _dist()
    if not use_max:
        dist.all_reduce(packet, op=dist.ReduceOp.SUM, group=group.pg)
        return packet
    # MAX reductions (gloo's std::max, NCCL's fmax) drop NaN: carry it as a flag.
    nan = torch.isnan(packet)
    both = torch.cat([packet.masked_fill(nan, 0.0), nan.to(packet.dtype)])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group.pg)
    values, nans = both.chunk(2)
    return values.masked_fill(nans > 0, float("nan"))


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """A CPU tensor made at plan time, on ``device`` without a host sync (a
    copy from pageable memory to a GPU would wait for it)."""
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


class Plan:
    """The reductions of one step's norms for one layout of parameters (cached
    by the optimizer while the layout stays the same).

    ``specs`` is aligned with the gathered gradients (None for plain tensors),
    ``buckets`` the norm buckets (indices into them), ``unit_counts`` per bucket
    the units of each gradient (scope "unit" only)."""

    def __init__(self, specs: list, buckets: list[list[int]], *, scope: str, reads_params: bool,
                 norm_type: float, norm_group: Group | None, device: torch.device,
                 unit_counts: list[list[int]] | None = None) -> None:
        self.use_max = norm_type == float("inf")
        self.norm_group = norm_group
        self.device = device
        # The mesh groups, in the order the parameters first use them: the same
        # on every rank of a group, since they all hold the same parameters.
        order: dict[str, int] = {}
        self.groups: list[Group] = []
        for spec in specs:
            if spec is None:
                continue
            for group in spec.norm + spec.unit:
                if group.name not in order:
                    order[group.name] = len(self.groups)
                    self.groups.append(group)
        self.empty = not self.groups and (norm_group is None or norm_group.size == 1)
        if self.empty:
            return
        # Classes of tensors by the groups their norm is summed over; class 0: none.
        classes: dict[tuple, int] = {(): 0}
        class_of = []
        for spec in specs:
            key = tuple(sorted(order[g.name] for g in spec.norm)) if spec is not None else ()
            class_of.append(classes.setdefault(key, len(classes)))
        class_groups = list(classes)
        n_classes = len(class_groups)
        # Entries of the packed vector V: classes 1.., then per-tensor, per-unit
        # (gradient, then parameter) entries, then the flag.
        entry_groups: list[tuple] = list(class_groups[1:])
        self.masks, self.tensor_pos, self.unit_pos = [], [], []
        for b, indices in enumerate(buckets):
            cls = torch.tensor([class_of[i] for i in indices], dtype=torch.int64)
            self.masks.append(_to_device(
                cls.unsqueeze(0) == torch.arange(n_classes).unsqueeze(1), device))
            if scope == "tensor":
                pos = [k for k, i in enumerate(indices) if class_of[i] != 0]
                if pos:
                    self.tensor_pos.append((b, _to_device(torch.tensor(pos), device)))
                    entry_groups.extend(class_groups[class_of[indices[k]]] for k in pos)
        if scope == "unit":
            unit_entries: list[tuple] = []
            for b, indices in enumerate(buckets):
                pos, offset = [], 0
                for i, count in zip(indices, unit_counts[b]):
                    spec = specs[i]
                    if spec is not None and spec.unit:
                        pos.extend(range(offset, offset + count))
                        key = tuple(sorted(order[g.name] for g in spec.unit))
                        unit_entries.extend([key] * count)
                    offset += count
                if pos:
                    self.unit_pos.append((b, _to_device(torch.tensor(pos), device)))
            entry_groups.extend(unit_entries)
            if reads_params:
                entry_groups.extend(unit_entries)
        self.reads_params = reads_params and scope == "unit"
        self.n_class_entries = n_classes - 1
        entry_groups.append(tuple(range(len(self.groups))))  # the flag goes everywhere
        self.group_index = []
        for g in range(len(self.groups)):
            idx = [e for e, groups in enumerate(entry_groups) if g in groups]
            self.group_index.append(_to_device(torch.tensor(idx, dtype=torch.int64), device))

    def check_norm_group(self, specs: list, describe) -> None:
        """Refuses a norm_group that shares two ranks or more with a DTensor's
        mesh: that DTensor's norms are summed over its mesh already, and
        summing them over norm_group too would count them more than once."""
        group = self.norm_group
        if group is None:
            return
        ranks = frozenset(group.ranks)
        for i, spec in enumerate(specs):
            if spec is not None and len(spec.mesh_ranks & ranks) > 1:
                raise ValueError(
                    f"norm_group (ranks {sorted(ranks)}) shares ranks "
                    f"{sorted(spec.mesh_ranks & ranks)} with the DeviceMesh of {describe(i)} "
                    f"({spec.mesh}): a DTensor's norms are already summed over its mesh, and "
                    "norm_group would count them again. norm_group is for ranks that hold "
                    "different parts of the model (ZeRO partitions, pipeline stages): leave it "
                    "out under FSDP2/tensor parallel, or pass the group across stages only")

    def _prep(self, t: Tensor) -> Tensor:
        t = t.to(self.device, torch.float64, non_blocking=True)
        return t if self.use_max else t * t

    def _fold(self, t: Tensor, dim=None) -> Tensor:
        if self.use_max:
            return t.amax() if dim is None else t.amax(dim)  # amax propagates NaN
        return t.sum() if dim is None else t.sum(dim)

    def _finish(self, t: Tensor, like: Tensor) -> Tensor:
        t = t if self.use_max else t.sqrt()
        return t.to(like.device, like.dtype, non_blocking=True)

    def reduce(self, total: Tensor, flag: Tensor, tensor_norms: list[Tensor],
               unit_norms: list[Tensor] | None, param_unit_norms: list[Tensor] | None):
        """The global ``(total, flag, tensor_norms, unit_norms, param_unit_norms)``
        from this rank's: device math and collectives only."""
        local_flag = flag.to(self.device, torch.float64, non_blocking=True).reshape(1)
        if not self.groups:  # norm_group only: the measured total as it is
            local_total = self._prep(total).reshape(())
            flags = local_flag
        else:
            prepped = [self._prep(n) for n in tensor_norms]
            sums = [self._fold(torch.where(mask, v.unsqueeze(0), 0.0), 1)
                    for mask, v in zip(self.masks, prepped)]
            class_sums = sums[0] if len(sums) == 1 else self._fold(torch.stack(sums), 0)
            parts = [class_sums[1:]]
            parts += [prepped[b].index_select(0, pos) for b, pos in self.tensor_pos]
            prepped_units = prepped_params = None
            if self.unit_pos:
                prepped_units = {b: self._prep(unit_norms[b]) for b, _ in self.unit_pos}
                parts += [prepped_units[b].index_select(0, pos) for b, pos in self.unit_pos]
                if self.reads_params:
                    prepped_params = {b: self._prep(param_unit_norms[b]) for b, _ in self.unit_pos}
                    parts += [prepped_params[b].index_select(0, pos) for b, pos in self.unit_pos]
            parts.append(local_flag)
            values = torch.cat(parts)
            for group, idx in zip(self.groups, self.group_index):
                packet = _all_reduce(values.index_select(0, idx), group, self.use_max)
                values = values.index_copy(0, idx, packet)
            n = self.n_class_entries
            local_total = self._fold(torch.cat([class_sums[:1], values[:n]]))
            flags = values[-1:]
            at = n
            tensor_norms = list(tensor_norms)
            for b, pos in self.tensor_pos:
                k = pos.numel()
                tensor_norms[b] = self._scatter(tensor_norms[b], pos, values[at:at + k])
                at += k
            if self.unit_pos:
                unit_norms = list(unit_norms)
                for b, pos in self.unit_pos:
                    k = pos.numel()
                    unit_norms[b] = self._scatter(unit_norms[b], pos, values[at:at + k])
                    at += k
                if self.reads_params:
                    param_unit_norms = list(param_unit_norms)
                    for b, pos in self.unit_pos:
                        k = pos.numel()
                        param_unit_norms[b] = self._scatter(param_unit_norms[b], pos,
                                                            values[at:at + k])
                        at += k
        if self.norm_group is not None and self.norm_group.size > 1:
            packet = _all_reduce(torch.cat([local_total.reshape(1), flags]), self.norm_group,
                                 self.use_max)
            local_total, flags = packet[0], packet[1:]
        total_out = self._finish(local_total, total)
        nonfinite = (flags.reshape(()) > 0) | ~torch.isfinite(total_out)
        return (total_out, nonfinite.to(flag.device, flag.dtype, non_blocking=True),
                tensor_norms, unit_norms, param_unit_norms)

    def _scatter(self, norms: Tensor, pos: Tensor, values: Tensor) -> Tensor:
        main = norms.to(self.device, non_blocking=True)
        out = main.index_copy(0, pos, self._finish(values, main))
        return out.to(norms.device, non_blocking=True)


def join_without_gradients(norm_group: Group | None, norm_type: float, device) -> None:
    """A step of a rank that holds no gradient this time still joins
    ``norm_group``'s all-reduce (with nothing to add), so the others do not wait
    for it; there is nothing of its own to clip or update."""
    if norm_group is None or norm_group.size == 1:
        return
    _all_reduce(torch.zeros(2, dtype=torch.float64, device=device), norm_group,
                norm_type == float("inf"))

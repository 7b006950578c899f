"""Phase 1 of a step, gather: which parameters have a gradient, as the fused
ops see them, in which (device, dtype) buckets; checked once per layout.

The layout (``Layout``) is what does not change from one step to the next:
which parameters of which groups have a gradient, their (device, dtype) keys,
the norm buckets and the update calls. ``gather`` builds it and runs every
check (nothing has changed if one raises); ``Layout.grads`` reads this step's
gradients and says whether the layout still holds. Gradient tensors are new
objects each step (``zero_grad()`` sets them to None, ``backward()`` makes
new ones), so the lists of them are rebuilt every step, with one read of
``p.grad`` per parameter, while the checks are not repeated.

A layout is given up when a group is added or replaced or its parameters are, a
gradient appears or goes away, a gradient's type (a DTensor, a subclass),
dtype, layout (sparse) or device changes, and by the optimizer when a policy is assigned or a
state dict loaded. A gradient's dtype and device stand for its parameter's:
torch makes and accepts only gradients of the parameter's dtype and device
(``p.grad = g`` refuses others), and ``Module.to()`` moves both. Layouts
with a DTensor are made afresh each step (their placements decide how norms
are reduced), as are the kernel views of complex parameters (``p.data = x``
would leave a kept view on the old storage).
"""

from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from fusedclip import distributed, ops

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
COMPLEX_DTYPES = (torch.complex64, torch.complex128)

_dtype = operator.attrgetter("dtype")
_layout = operator.attrgetter("layout")
_device = operator.attrgetter("device")


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


class GroupLayout(NamedTuple):
    """One param group's part of a layout."""

    group: dict
    #: the group's parameters when the layout was made (to see them replaced)
    members: tuple
    #: per member, the type of its gradient (NoneType where it has none)
    grad_types: list
    #: per member, whether it has a gradient (None: all have one)
    has_grad: list | None
    #: the parameters with a gradient, the tensors themselves
    originals: list[Tensor]
    #: their gradients' dtypes, layouts (torch.strided: a sparse one is
    #: refused) and devices when the layout was made
    grad_dtypes: list
    grad_layouts: list
    grad_devices: list
    #: (dtype, device) where every gradient is a plain strided tensor of that
    #: dtype and device (checked in one call, ``ops.tensors_like``), else None
    grad_key: tuple | None
    #: whether the fused ops see them through ``kernel_view`` (complex or
    #: DTensor parameters); else the ops get the very tensors and state
    views: bool
    #: (device, dtype) per parameter, as the kernels see it
    keys: list[tuple]
    #: one update call per (device, dtype): (device, indices into originals)
    calls: list[tuple[torch.device, list[int]]]


@dataclass
class Layout:
    """What ``gather`` found and checked: per group a ``GroupLayout``, and the
    norm buckets over the parameters with a gradient of all groups."""

    groups: list[GroupLayout]
    #: per gradient of all groups, how its norms are reduced (None: all plain)
    specs: list | None
    #: indices into all groups' gradients, one list per (device, dtype)
    buckets: list[list[int]]
    #: all groups' parameters with a gradient, the tensors themselves
    originals: list[Tensor]
    #: per gradient of all groups, where it sits in its norm bucket: (bucket, index)
    positions: list[tuple[int, int]]
    #: the buckets in the gradients' order: a few contiguous ``runs``
    order: list[tuple[int, int, int]]
    #: whether it can serve later steps (no DTensor)
    reusable: bool

    def grads(self, param_groups: list[dict], grads_by_group: list[list]
              ) -> list[list[Tensor]] | None:
        """Per group, the gradients of this layout's parameters from this
        step's ``[p.grad for p in group["params"]]`` per group of
        ``param_groups``, or None if the layout no longer holds for them."""
        if len(param_groups) != len(self.groups):
            return None
        out = []
        for gl, group, grads in zip(self.groups, param_groups, grads_by_group):
            params = group["params"]
            if (group is not gl.group or len(params) != len(gl.members)
                    or not all(map(operator.is_, params, gl.members))
                    or list(map(type, grads)) != gl.grad_types):
                return None
            if gl.has_grad is not None:
                grads = list(itertools.compress(grads, gl.has_grad))
            if gl.grad_key is not None:
                if not ops.tensors_like(grads, *gl.grad_key):
                    return None
            elif (not all(map(operator.is_, map(_dtype, grads), gl.grad_dtypes))
                    or not all(map(operator.is_, map(_layout, grads), gl.grad_layouts))
                    or list(map(_device, grads)) != gl.grad_devices):
                return None
            out.append(grads)
        return out

    def batch(self, grads_by_group: list[list[Tensor]]) -> Batch:
        """This step's tensors as the kernels see them, from the gradients
        that ``grads`` returned."""
        groups = []
        for gl, grads in zip(self.groups, grads_by_group):
            params = gl.originals
            if gl.views:
                params = [kernel_view(p) for p in params]
                grads = [kernel_view(g) for g in grads]
            groups.append(GroupBatch(gl, params, grads))
        if len(groups) == 1:
            all_params, all_grads = groups[0].params, groups[0].grads
        else:
            all_params = list(itertools.chain.from_iterable(g.params for g in groups))
            all_grads = list(itertools.chain.from_iterable(g.grads for g in groups))
        return Batch(self, groups, all_params, self.originals, all_grads)


class GroupBatch(NamedTuple):
    """One group's tensors of one step."""

    layout: GroupLayout
    params: list[Tensor]  # as the kernels see them
    grads: list[Tensor]   # as the kernels see them


@dataclass
class Batch:
    """Phase 1's result for one step: the layout and this step's tensors."""

    layout: Layout
    groups: list[GroupBatch]
    params: list[Tensor]     # kernel views, all groups
    originals: list[Tensor]  # the parameters themselves, all groups
    grads: list[Tensor]      # kernel views, all groups
    plan: distributed.Plan | None = None  # the reduce phase's, where there is one
    unit_counts: list[list[int]] | None = None  # per bucket (per-unit policies; made once a step)

    @property
    def buckets(self) -> list[list[int]]:
        return self.layout.buckets


def gather(name: str, param_groups: list[dict], grads_by_group: list[list],
           dist_cache: dict) -> Layout:
    """The layout of ``param_groups`` with this step's gradients
    (``[p.grad for p in group["params"]]`` per group), after checking every
    parameter and gradient: nothing has changed if this raises. ``name``
    (the optimizer's) goes into the errors; ``dist_cache`` is
    ``distributed.spec_of``'s."""
    specs = None  # per gradient, how its norms are reduced (DTensors; None: plain)
    n_grads = 0
    plain_types = distributed.PLAIN_TYPES  # distributed.is_plain, inlined: a loop per parameter
    dtensors = False  # a DTensor parameter or gradient
    groups = []
    for g, (group, all_grads) in enumerate(zip(param_groups, grads_by_group)):
        members = tuple(group["params"])
        params, grads, keys = [], [], []
        needs_views = False  # a complex or DTensor parameter
        for k, (p, grad) in enumerate(zip(members, all_grads)):
            if grad is None:
                continue
            if type(p) not in plain_types or type(grad) not in plain_types:
                needs_views = dtensors = True
                spec = distributed.spec_of(p, grad, f"{name}: parameter {k} of param group {g}",
                                           dist_cache)
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
        if needs_views:
            keys = [(d, kernel_view(p).dtype) for (d, _), p in zip(keys, params)]
        has_grad = [grad is not None for grad in all_grads]
        grad_types = [type(grad) for grad in all_grads]
        grad_dtypes = [grad.dtype for grad in grads]
        grad_layouts = [grad.layout for grad in grads]
        grad_devices = [grad.device for grad in grads]
        grad_key = None
        if (grads and all(t is Tensor for t in itertools.compress(grad_types, has_grad))
                and grad_layouts.count(torch.strided) == len(grads)
                and grad_dtypes.count(grad_dtypes[0]) == len(grads)
                and grad_devices.count(grad_devices[0]) == len(grads)):
            grad_key = (grad_dtypes[0], grad_devices[0])
        groups.append(GroupLayout(
            group=group, members=members, grad_types=grad_types,
            has_grad=None if all(has_grad) else has_grad, originals=params,
            grad_dtypes=grad_dtypes, grad_layouts=grad_layouts,
            grad_devices=grad_devices, grad_key=grad_key,
            views=needs_views, keys=keys, calls=[]))

    by_key = group_by_key([key for gl in groups for key in gl.keys])
    for device, dtype in by_key:  # once per key, not per parameter: device.type costs ~0.4 us
        if device.type not in ("cpu", "cuda"):
            # torch's fused steps refuse these too (a meta parameter would
            # reach the fake kernels, which change nothing).
            raise RuntimeError(
                "`fused=True` requires all the params to be floating point Tensors "
                f"of supported devices: ['cpu', 'cuda'] but {dtype} and {device}; "
                f"{name} runs on the CPU and CUDA")
    for gl in groups:
        gl.calls.extend((device, indices) for (device, _), indices in group_by_key(gl.keys).items())
    buckets = list(by_key.values())
    positions = [(0, 0)] * n_grads
    for b, indices in enumerate(buckets):
        for k, i in enumerate(indices):
            positions[i] = (b, k)
    return Layout(
        groups=groups, specs=specs, buckets=buckets,
        originals=[p for gl in groups for p in gl.originals],
        positions=positions, order=runs(positions), reusable=not dtensors)

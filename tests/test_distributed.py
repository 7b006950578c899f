"""Fused clipping across processes: FSDP2, tensor parallel, FSDP2 x TP on a
2x2 mesh, DDP, ZeroRedundancyOptimizer and pipeline stages with ``norm_group``,
and distributed checkpointing (fusedclip/distributed.py, the reduce phase of
fusedclip/optim/base.py).

Every case runs in worker processes (gloo on the CPU, 127.0.0.1, the port of a
TCPStore this process opens on a free port) and is compared with a run in this
process of ``torch.optim`` and torch's clipping (``clip_grad_norm_`` on all
gradients, on each gradient alone, timm's ``adaptive_clip_grad`` formula) on
the whole model and the whole batch. The workers are started once per module
and world size (2 ranks; 4 for the 2x2 mesh) and run the cases one after the
other, so that the module stays well under 3 minutes on 2 cores.

Tolerances (float32): the distributed runs differ from the single-process one
by (a) the gradient: FSDP2/DDP average the gradients of two half-batch means
where the reference takes the mean of the whole batch (a few ulps per element),
(b) the clip norm: sums of the squares of float32 shard norms (see
fusedclip/distributed.py, about 1e-7 relative) where torch takes the norm of
the per-tensor norms, and (c) AdamW itself (torch's fused CPU AdamW in the
reference, bit for bit fusedclip's step on the same inputs). Measured over the
4 steps of lr 1e-2 of every case here: parameters within 8.2e-8 (1 + |p|), norms
within 1.1e-7 relative (one float32 ulp). The parameters are compared with
``atol = rtol = 1e-6`` (PARAM_TOL) and the norms with ``rtol = 1e-6``
(NORM_RTOL): about 10x those, and far below what a norm that is not global does
(a shard's norm is ~0.7 of the whole; clipping moves the parameters by 5e-3
here, and it is active in every case: the reference norms are asserted above
max_norm). Runs with the reduction removed, with replicated dims counted, with
split AGC units left local or with NaN dropped by the MAX all-reduce each fail
some of these tests. The reported
``grad_norm`` is bitwise equal on every rank (every rank computes it from the
same reduced values), and the DCP round trip is bitwise.
"""

from __future__ import annotations

import copy
import math
import pickle
import traceback
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

import fusedclip

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with gloo is not available")

PARAM_TOL = 1e-6
NORM_RTOL = 1e-6
STEPS = 4
LR = 1e-2
WD = 0.1
BATCH = 8
CASE_TIMEOUT_S = 120  # a hung collective fails the test instead of the suite


# -- the model, the data, the reference -----------------------------------------------------
def _mlp() -> nn.Sequential:
    """Linear(6, 12) - Tanh - Linear(12, 12) - LayerNorm(12) - Tanh - Linear(12, 5):
    even and uneven (5 rows over 2 ranks) dim-0 shards, 1-D tensors (one AGC
    unit each) split across ranks, and under tensor parallelism a colwise, a
    rowwise (units split along dim 1) and two plain layers."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.LayerNorm(12),
                         nn.Tanh(), nn.Linear(12, 5))


def _batch(step: int):
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(BATCH, 6, generator=gen) * 2.0
    y = torch.randn(BATCH, 5, generator=gen) * 3.0
    return x, y


def _loss(out, y):
    return ((out - y) ** 2).mean()


def _fused_policy(spec):
    kind, args = spec
    if kind == "global":
        return fusedclip.GlobalNorm(*args)
    if kind == "tensor":
        return fusedclip.PerTensorNorm(*args)
    if kind == "agc":
        return fusedclip.AGC(*args)
    if kind == "zclip":
        return fusedclip.ZClip(**args)
    if kind == "adagc":
        return fusedclip.AdaGC(**args)
    raise ValueError(kind)


def _unitwise(x):
    return x.norm() if x.ndim <= 1 else x.norm(dim=tuple(range(1, x.ndim)), keepdim=True)


def _torch_clip(params, spec) -> float:
    """torch's clipping of ``spec`` in place; returns the pre-clip global norm."""
    kind, args = spec
    grads = [p.grad for p in params]
    norm_type = args[1] if kind in ("global", "tensor") and len(args) > 1 else 2.0
    total = torch.nn.utils.get_total_norm(grads, norm_type)
    if kind == "global":
        torch.nn.utils.clip_grad_norm_(params, args[0], norm_type)
    elif kind == "tensor":
        for p in params:
            torch.nn.utils.clip_grad_norm_([p], args[0], norm_type)
    elif kind == "agc":  # timm.utils.agc.adaptive_clip_grad
        clip_factor, eps = args[0], (args[1] if len(args) > 1 else 1e-3)
        for p in params:
            max_norm = _unitwise(p.detach()).clamp_(min=eps).mul_(clip_factor)
            grad_norm = _unitwise(p.grad)
            clipped = p.grad * (max_norm / grad_norm.clamp(min=1e-6))
            p.grad.copy_(torch.where(grad_norm < max_norm, p.grad, clipped))
    else:
        raise ValueError(kind)
    return float(total)


def _reference(spec, steps=STEPS, skip_steps=(), optimizer="adamw"):
    """The single-process run: the whole model, the whole batch, torch.optim
    (or, for the stateful policies ZClip and AdaGC, whose single-process
    behaviour tests/test_policies.py checks against their sources, fusedclip
    itself) and torch's clipping. Steps in ``skip_steps`` are skipped."""
    model = _mlp()
    params = list(model.parameters())
    fused = spec[0] in ("zclip", "adagc")
    if fused:
        cls = fusedclip.FusedClipAdamW if optimizer == "adamw" else fusedclip.FusedClipAdagrad
        kwargs = dict(lr=LR, weight_decay=WD) if optimizer == "adamw" else dict(lr=LR)
        opt = cls(params, clip=_fused_policy(spec), **kwargs)
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=LR, weight_decay=WD, fused=True)
    else:
        raise ValueError(optimizer)
    norms = []
    for step in range(steps):
        x, y = _batch(step)
        _loss(model(x), y).backward()
        if step in skip_steps:
            norms.append(math.nan)
        elif fused:
            opt.step()
            norms.append(float(opt.clip_stats["grad_norm"]))
        else:
            norms.append(_torch_clip(params, spec))
            opt.step()
        opt.zero_grad()
    return [p.detach().numpy().copy() for p in params], norms


def _assert_params_close(got, expected, what):
    assert len(got) == len(expected), what
    for i, (a, b) in enumerate(zip(got, expected)):
        assert a.shape == b.shape, (what, i, a.shape, b.shape)
        err = np.abs(a.astype(np.float64) - b.astype(np.float64))
        bound = PARAM_TOL + PARAM_TOL * np.abs(b.astype(np.float64))
        assert (err <= bound).all(), (
            f"{what}: parameter {i} differs from the reference by up to {err.max():.3g}")


def _assert_norms(results, expected, max_norm, what):
    """Every rank reports the same norms, bitwise, and they are the reference's."""
    first = results[0]["norms"]
    for rank, res in enumerate(results):
        assert all(t == "Tensor" for t in res["norm_types"]), (what, res["norm_types"])
        assert np.array_equal(np.array(res["norms"]), np.array(first), equal_nan=True), (
            f"{what}: rank {rank} reported {res['norms']}, rank 0 {first}")
    np.testing.assert_allclose(first, expected, rtol=NORM_RTOL, atol=0, equal_nan=True,
                               err_msg=what)
    if max_norm is not None:  # the case clips: a local norm would show
        assert all(n > max_norm for n in expected if not math.isnan(n)), (what, expected)


# -- the worker pool -------------------------------------------------------------------------
def _worker(rank: int, world: int, port: int, conn) -> None:
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        while True:
            message = conn.recv()
            if message is None:
                break
            name, kwargs = message
            try:
                result = CASES[name](rank, world, **kwargs)
                dist.barrier()
                conn.send(("ok", result))
            except BaseException:  # noqa: BLE001 - reported to the test
                conn.send(("error", traceback.format_exc()))
    finally:
        dist.destroy_process_group()


class _Pool:
    """``world`` worker processes in one gloo process group, started once."""

    def __init__(self, world: int) -> None:
        ctx = torch.multiprocessing.get_context("spawn")
        # This process holds the rendezvous store on a port the OS picks.
        self.store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                   timeout=timedelta(seconds=60))
        self.conns, self.procs = [], []
        for rank in range(world):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(rank, world, self.store.port, child),
                               daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)
        self.broken = False

    def run(self, name: str, **kwargs) -> list:
        if self.broken:
            pytest.fail("the worker processes were lost in an earlier case")
        for conn in self.conns:
            conn.send((name, kwargs))
        replies = []
        for rank, conn in enumerate(self.conns):
            if not conn.poll(CASE_TIMEOUT_S):
                self.broken = True
                pytest.fail(f"{name}: rank {rank} did not answer within {CASE_TIMEOUT_S} s")
            try:
                replies.append(conn.recv())
            except (EOFError, OSError) as exc:
                self.broken = True
                pytest.fail(f"{name}: rank {rank} exited ({exc!r}); its error is above")
        errors = [f"rank {r}:\n{v}" for r, (status, v) in enumerate(replies) if status != "ok"]
        if errors:
            pytest.fail(f"{name} failed:\n" + "\n".join(errors))
        return [v for _, v in replies]

    def close(self) -> None:
        for conn, proc in zip(self.conns, self.procs):
            try:
                if not self.broken:
                    conn.send(None)
            except OSError:
                pass
        for proc in self.procs:
            proc.join(timeout=20)
            if proc.is_alive():
                proc.kill()
                proc.join()


@pytest.fixture(scope="module")
def pool2():
    pool = _Pool(2)
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def pool4():
    pool = _Pool(4)
    yield pool
    pool.close()


# -- worker-side helpers ---------------------------------------------------------------------
def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _full(params) -> list:
    return [(p.full_tensor() if _is_dtensor(p) else p).detach().numpy().copy() for p in params]


def _fsdp_model(mesh=None):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if mesh is None:
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = _mlp()
    for layer in model:
        if isinstance(layer, (nn.Linear, nn.LayerNorm)):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _local_batch(step, part, parts):
    x, y = _batch(step)
    rows = BATCH // parts
    return x[part * rows:(part + 1) * rows], y[part * rows:(part + 1) * rows]


def _poison(model, rank, value):
    """Puts ``value`` into one element of rank ``rank``'s first non-empty local gradient."""
    if dist.get_rank() != rank:
        return
    for p in model.parameters():
        g = p.grad.to_local() if _is_dtensor(p.grad) else p.grad
        if g.numel():
            g.view(-1)[0] = value
            return


class _NoHostReads(torch.overrides.TorchFunctionMode):
    """Records every read of a tensor value on the host (item, bool, float, ...)."""

    BAD = {torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__float__,
           torch.Tensor.__int__, torch.Tensor.tolist}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.BAD:
            self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))


def _train(model, opt, steps, part, parts, poison=None, watch_from=None):
    """``steps`` steps on this rank's part of each batch; ``poison`` =
    ``{step: (rank, value)}`` puts a non-finite value into one rank's gradient.
    Returns the per-step reports and whether the watched steps read the host."""
    norms, types, host_reads = [], [], []
    for step in range(steps):
        x, y = _local_batch(step, part, parts)
        _loss(model(x), y).backward()
        if poison and step in poison:
            _poison(model, *poison[step])
        if watch_from is not None and step >= watch_from:
            with _NoHostReads() as mode:
                opt.step()
            host_reads.extend(mode.seen)
        else:
            opt.step()
        stats = getattr(opt, "optim", opt).clip_stats  # ZeroRedundancyOptimizer: its .optim
        types.append(type(stats["grad_norm"]).__name__)
        norms.append(float(stats["grad_norm"]))
        opt.zero_grad()
    stats = getattr(opt, "optim", opt).clip_stats
    return {"norms": norms, "norm_types": types, "skipped": int(stats["skipped"]),
            "host_reads": host_reads}


# -- cases (run on every rank) ---------------------------------------------------------------
def case_fsdp(rank, world, spec, poison=None, nonfinite="skip"):
    model = _fsdp_model()
    opt = fusedclip.FusedClipAdamW(model.parameters(), lr=LR, weight_decay=WD,
                                   clip=_fused_policy(spec), nonfinite=nonfinite)
    out = _train(model, opt, STEPS, rank, world, poison=poison, watch_from=1)
    out["params"] = _full(model.parameters())
    out["placements"] = [str(p.placements) for p in model.parameters()]
    return out


def case_skip_unchanged(rank, world, spec):
    """A non-finite gradient on rank 1 only, in the first step: no rank changes anything."""
    model = _fsdp_model()
    opt = fusedclip.FusedClipAdamW(model.parameters(), lr=LR, weight_decay=WD,
                                   clip=_fused_policy(spec))
    before = _full(model.parameters())
    x, y = _local_batch(0, rank, world)
    _loss(model(x), y).backward()
    _poison(model, 1, math.inf)
    opt.step()
    after = _full(model.parameters())
    state = {k: (v.full_tensor() if _is_dtensor(v) else v).numpy().tolist()
             for s in opt.state.values() for k, v in s.items() if k == "step"}
    return {"unchanged": all(np.array_equal(a, b) for a, b in zip(before, after)),
            "skipped": int(opt.clip_stats["skipped"]), "norm": float(opt.clip_stats["grad_norm"]),
            "steps": state}


def _tp_model(mesh):
    from torch.distributed.tensor.parallel import (
        ColwiseParallel, RowwiseParallel, parallelize_module,
    )

    model = _mlp()
    parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    return model


def case_tp(rank, world, spec):
    from torch.distributed.device_mesh import init_device_mesh

    model = _tp_model(init_device_mesh("cpu", (world,)))
    kinds = ["DTensor" if _is_dtensor(p) else "plain" for p in model.parameters()]
    opt = fusedclip.FusedClipAdamW(model.parameters(), lr=LR, weight_decay=WD,
                                   clip=_fused_policy(spec))
    out = _train(model, opt, STEPS, 0, 1)  # every TP rank sees the whole batch
    out["params"] = _full(model.parameters())
    out["kinds"] = kinds
    return out


def case_fsdp_tp(rank, world, specs):
    """FSDP2 over "dp" x tensor parallel over "tp" on a 2x2 mesh, one run per policy."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    outs = []
    for spec in specs:
        model = _tp_model(mesh["tp"])
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, (nn.Linear, nn.LayerNorm)):
                fully_shard(layer, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
        opt = fusedclip.FusedClipAdamW(model.parameters(), lr=LR, weight_decay=WD,
                                       clip=_fused_policy(spec))
        out = _train(model, opt, STEPS, mesh.get_coordinate()[0], 2, watch_from=1)
        out["params"] = _full(model.parameters())
        out["placements"] = [str(getattr(p, "placements", "plain")) for p in model.parameters()]
        outs.append(out)
    return outs


def case_hsdp(rank, world, spec):
    """FSDP2 on a 2-D (replicate, shard) mesh: HSDP, placements (Replicate, Shard(0))."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    model = _fsdp_model(mesh)
    opt = fusedclip.FusedClipAdamW(model.parameters(), lr=LR, weight_decay=WD,
                                   clip=_fused_policy(spec))
    out = _train(model, opt, STEPS, rank, world)
    out["params"] = _full(model.parameters())
    out["placements"] = [str(p.placements) for p in model.parameters()]
    return out


def case_ddp(rank, world, spec):
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(_mlp())
    opt = fusedclip.FusedClipAdamW(model.parameters(), lr=LR, weight_decay=WD,
                                   clip=_fused_policy(spec))
    out = _train(model, opt, STEPS, rank, world)
    out["params"] = _full(model.module.parameters())
    return out


def case_ddp_state(rank, world, spec):
    """Under DDP (plain parameters; torch.distributed initialized) the policy's
    state rides in the per-parameter state, so torch's get/set_optimizer_state_dict
    carry it; a torch.optim.AdamW that loads it (casting it to float32) hands it
    back with the policy's dtypes."""
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict, set_optimizer_state_dict,
    )
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(_mlp())

    def make():
        return fusedclip.FusedClipAdamW(model.parameters(), lr=LR, weight_decay=WD,
                                        clip=_fused_policy(spec))

    opt = make()
    _train(model, opt, 3, rank, world)
    osd = get_optimizer_state_dict(model, opt)
    fresh = make()
    set_optimizer_state_dict(model, fresh, osd)

    def described(o):
        return {k: (str(v.dtype), v.tolist()) for k, v in sorted(o._policy_state.items())}

    topt = torch.optim.AdamW(model.parameters(), lr=LR)
    topt.load_state_dict(opt.state_dict())
    back = make()
    back.load_state_dict(topt.state_dict())
    return {"nested": [k for k, s in osd["state"].items() if "clip_policy" in s],
            "restored": described(fresh) == described(opt),
            "dtypes": {k: v[0] for k, v in described(back).items()},
            "expected_dtypes": {k: v[0] for k, v in described(opt).items()},
            "count": (int(back._policy_state["count"]), int(opt._policy_state["count"]))}


def case_zero(rank, world, spec, norm_group=True):
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(_mlp())
    kwargs = dict(norm_group=dist.group.WORLD) if norm_group else {}
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=fusedclip.FusedClipAdamW,
                                  lr=LR, weight_decay=WD, clip=_fused_policy(spec), **kwargs)
    out = _train(model, opt, STEPS, rank, world)
    out["params"] = _full(model.module.parameters())
    out["local_params"] = sum(len(g["params"]) for g in opt.optim.param_groups)
    # ZeRO's checkpoint path: every rank's optimizer state_dict is pickled to rank 0.
    opt.consolidate_state_dict(to=0)
    out["consolidated"] = len(opt.state_dict()["state"]) if rank == 0 else None
    return out


def case_pipeline(rank, world, spec, poison=None):
    """Two stages, one per rank: rank 0 runs layers 0-2 and sends the
    activations, rank 1 runs the rest and the loss and sends their gradient back."""
    model = _mlp()
    stage = model[:3] if rank == 0 else model[3:]
    opt = fusedclip.FusedClipAdamW(stage.parameters(), lr=LR, weight_decay=WD,
                                   clip=_fused_policy(spec), norm_group=dist.group.WORLD)
    norms, types = [], []
    for step in range(STEPS):
        x, y = _batch(step)
        if rank == 0:
            h = stage(x)
            dist.send(h.detach(), 1)
            grad_h = torch.empty_like(h)
            dist.recv(grad_h, 1)
            h.backward(grad_h)
        else:
            h = torch.empty(BATCH, 12)
            dist.recv(h, 0)
            h.requires_grad_(True)
            _loss(stage(h), y).backward()
            dist.send(h.grad, 0)
        if poison and step in poison:
            _poison(stage, *poison[step])
        opt.step()
        types.append(type(opt.clip_stats["grad_norm"]).__name__)
        norms.append(float(opt.clip_stats["grad_norm"]))
        opt.zero_grad()
    out = {"norms": norms, "norm_types": types, "skipped": int(opt.clip_stats["skipped"]),
           "params": _full(stage.parameters())}
    # A step in which stage 0 has no gradient: it joins norm_group's
    # all-reduce with nothing to add, and stage 1 clips by its own norm.
    if rank == 1:
        h = torch.randn(BATCH, 12, generator=torch.Generator().manual_seed(7))
        _loss(stage(h), _batch(0)[1]).backward()
        own = float(torch.nn.utils.get_total_norm([p.grad for p in stage.parameters()]))
    opt.step()
    out["alone"] = (own, float(opt.clip_stats["grad_norm"])) if rank == 1 else None
    return out


def _full_dict(d, full):
    return {k: full(v) for k, v in sorted(d.items())}


def case_dcp(rank, world, spec, optimizer, path):
    """A run checkpointed with torch.distributed.checkpoint after 2 steps and
    resumed in a new model and optimizer, against the same run uninterrupted."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict, get_optimizer_state_dict, set_model_state_dict,
        set_optimizer_state_dict,
    )

    def make():
        model = _fsdp_model()
        if optimizer == "adamw":
            opt = fusedclip.FusedClipAdamW(model.parameters(), lr=LR, weight_decay=WD,
                                           clip=_fused_policy(spec))
        else:
            opt = fusedclip.FusedClipAdagrad(model.parameters(), lr=LR,
                                             clip=_fused_policy(spec))
        return model, opt

    def train(model, opt, steps):
        norms = []
        for step in steps:
            x, y = _local_batch(step, rank, world)
            _loss(model(x), y).backward()
            opt.step()
            norms.append(float(opt.clip_stats["grad_norm"]))
            opt.zero_grad()
        return norms

    def snapshot(model, opt):
        def full(v):
            if _is_dtensor(v):
                v = v.full_tensor()
            return v.numpy().copy() if isinstance(v, torch.Tensor) else v

        params = list(model.parameters())
        state = [{k: full(v) for k, v in sorted(opt.state[p].items())} for p in params]
        policy = {k: full(v) for k, v in sorted(opt._policy_state.items())}
        tensor_policy = [_full_dict(opt._policy_tensor_state.get(p, {}), full)
                         for p in params]
        return {"params": _full(params), "state": state, "policy": policy,
                "tensor_policy": tensor_policy}

    straight, sopt = make()
    straight_norms = train(straight, sopt, range(6))

    first, fopt = make()
    first_norms = train(first, fopt, range(3))
    osd = get_optimizer_state_dict(first, fopt)
    layout = {k: sorted(v) for k, v in osd["state"].items()}
    dcp.save({"model": get_model_state_dict(first), "optim": osd}, checkpoint_id=path)
    del first, fopt

    second, nopt = make()
    state = {"model": get_model_state_dict(second), "optim": get_optimizer_state_dict(second, nopt)}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(second, state["model"])
    set_optimizer_state_dict(second, nopt, state["optim"])
    resumed_norms = first_norms + train(second, nopt, range(3, 6))
    a, b = snapshot(straight, sopt), snapshot(second, nopt)

    def same(x, y):
        if isinstance(x, dict):
            return x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
        if isinstance(x, list):
            return len(x) == len(y) and all(same(u, v) for u, v in zip(x, y))
        if isinstance(x, np.ndarray):
            return x.dtype == y.dtype and np.array_equal(x, y, equal_nan=True)
        return x == y

    return {"same": {k: same(a[k], b[k]) for k in a}, "norms": straight_norms == resumed_norms,
            "layout": layout, "policy_keys": sorted(a["policy"]),
            "policy_nonempty": bool(a["policy"]) or any(a["tensor_policy"])}


def case_torch_layout(rank, world):
    """The per-parameter state of a fusedclip optimizer under FSDP2 is laid out
    as torch.optim.AdamW's: same keys, DTensors of the parameter's placements
    (plain 0-d step counters), in the optimizer's and in torch's distributed
    state_dict (get_optimizer_state_dict)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    def describe(osd):
        out = {}
        for pid, s in osd["state"].items():
            out[str(pid)] = {k: (type(v).__name__, str(getattr(v, "placements", None)),
                                 str(v.dtype), tuple(v.shape))
                             for k, v in s.items() if isinstance(v, torch.Tensor)}
        return out

    layouts = []
    for make in (lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=WD),
                 lambda ps: fusedclip.FusedClipAdamW(ps, lr=LR, weight_decay=WD, clip=0.05)):
        model = _fsdp_model()
        opt = make(model.parameters())
        x, y = _local_batch(0, rank, world)
        _loss(model(x), y).backward()
        opt.step()
        layouts.append((describe(opt.state_dict()),
                        describe(get_optimizer_state_dict(model, opt))))
    return layouts


def case_errors(rank, world):
    """What is refused, before anything changes, and how copies treat norm_group."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial

    out = {}

    def refused(fn):
        try:
            fn()
        except (TypeError, ValueError, RuntimeError) as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    def _refused_unchanged(opt, model, rank, world):
        """Whether opt.step() after a backward of `model` is refused, and
        leaves the parameters and the optimizer state as they were."""
        x, y = _local_batch(0, rank, world)
        _loss(model(x), y).backward()
        before = _full(model.parameters())
        refusal = refused(opt.step)
        return refusal, (all(np.array_equal(a, b) for a, b in
                             zip(before, _full(model.parameters()))) and len(opt.state) == 0)

    # norm_group arguments
    out["bad_type"] = refused(lambda: fusedclip.FusedClipAdamW(_mlp().parameters(),
                                                               norm_group="world"))
    mesh2d = init_device_mesh("cpu", (1, world), mesh_dim_names=("a", "b"))
    out["mesh_2d"] = refused(lambda: fusedclip.FusedClipSGD(_mlp().parameters(), lr=0.1,
                                                            norm_group=mesh2d))
    out["mesh_1d_ok"] = refused(lambda: fusedclip.FusedClipSGD(_mlp().parameters(), lr=0.1,
                                                               norm_group=mesh2d["b"]))
    # norm_group over the ranks of an FSDP2 mesh: counted twice
    model = _fsdp_model()
    before = _full(model.parameters())
    out["overlap"], out["overlap_unchanged"] = _refused_unchanged(
        fusedclip.FusedClipAdamW(model.parameters(), lr=LR, clip=0.05,
                                 norm_group=dist.group.WORLD), model, rank, world)
    # a Partial gradient
    p = next(model.parameters())
    good = p.grad
    p.grad = DTensor.from_local(good.to_local(), p.device_mesh, [Partial()],
                                shape=p.shape, stride=p.stride())
    opt2 = fusedclip.FusedClipAdamW(model.parameters(), lr=LR, clip=0.05)
    out["partial"] = refused(opt2.step)
    # a plain gradient on a DTensor parameter
    try:
        p.grad = torch.zeros(p.shape)
    except RuntimeError:  # torch may refuse it itself
        out["plain_grad"] = "RuntimeError: refused by torch: DTensor"
    else:
        out["plain_grad"] = refused(opt2.step)
    out["partial_unchanged"] = (all(np.array_equal(a, b) for a, b in
                                    zip(before, _full(model.parameters())))
                                and len(opt2.state) == 0)
    # a Partial parameter
    mesh = p.device_mesh
    partial = nn.Parameter(DTensor.from_local(torch.ones(3), mesh, [Partial()]))
    partial.grad = DTensor.from_local(torch.ones(3), mesh, [Partial()])
    out["partial_param"] = refused(fusedclip.FusedClipSGD([partial], lr=0.1, clip=1.0).step)
    # copies share the group, pickling says why it cannot
    zopt = fusedclip.FusedClipAdamW(_mlp().parameters(), clip=1.0, norm_group=dist.group.WORLD)
    out["deepcopy_shares"] = copy.deepcopy(zopt).norm_group is dist.group.WORLD
    out["pickle"] = refused(lambda: pickle.dumps(zopt))
    # a Chain that would compute a global norm from this rank's unit norms only
    model = _mlp()
    out["chain"], out["chain_unchanged"] = _refused_unchanged(fusedclip.FusedClipAdamW(
        model.parameters(), lr=LR, norm_group=dist.group.WORLD,
        clip=fusedclip.Chain(fusedclip.AGC(0.05), fusedclip.GlobalNorm(MAX_NORM))),
        model, rank, world)
    return out


def case_precision(rank, world, path):
    """DTensor parameters in bfloat16 (Shard(0), Replicate, Shard(1) on a 1-D
    mesh) with the mixed-precision options: one group with master weights,
    stochastic rounding and bfloat16 state, one with remainders. Masters,
    remainders and state are DTensors of the parameter's placements, each
    local parameter is its local master rounded, and a
    torch.distributed.checkpoint round trip after 2 steps continues bit for bit
    the uninterrupted 4 steps (generators included: plain tensors, the same
    on every rank, as every rank seeds torch alike)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict, set_optimizer_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard

    from fusedclip.optim import precision

    mesh = init_device_mesh("cpu", (world,))
    layout = [((8, 3), Shard(0)), ((5,), Replicate()), ((6, 4), Shard(1))]

    def shard(full, placement):
        if isinstance(placement, Shard):
            full = full.chunk(world, dim=placement.dim)[rank]
        return DTensor.from_local(full.contiguous(), mesh, [placement], run_check=False)

    def values(seed):
        gen = torch.Generator().manual_seed(seed)
        return [torch.randn(shape, generator=gen, dtype=torch.float64).to(torch.bfloat16)
                for shape, _ in layout]

    def make():
        torch.manual_seed(0)
        module = nn.Module()
        module.params = nn.ParameterList(
            [nn.Parameter(shard(v, pl)) for v, (_, pl) in zip(values(0), layout)])
        ps = list(module.params)
        opt = fusedclip.FusedClipAdamW(
            [{"params": ps[:2], "stochastic_rounding": True, "state_dtype": torch.bfloat16},
             {"params": ps[2:], "store_param_remainders": True}],
            lr=LR, weight_decay=WD, clip=0.5, master_weights=True)
        return module, opt

    def train(module, opt, steps):
        for step in steps:
            for p, g, (_, pl) in zip(module.params, values(100 + step), layout):
                p.grad = shard(g, pl)
            opt.step()
            opt.zero_grad()

    def bits(t):
        t = t.to_local() if _is_dtensor(t) else t
        width = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
        return t.contiguous().view(width)

    out = {}
    straight, sopt = make()
    train(straight, sopt, range(4))
    kinds = []
    for p in straight.params:
        state = sopt.state[p]
        for key, value in state.items():
            if key in ("step", "sr_generator"):
                continue
            kinds.append((key, type(value).__name__, value.placements == p.placements,
                          str(value.dtype)))
        key = "master_param" if "master_param" in state else "param_remainder"
        master = state[key].to_local()
        if key == "param_remainder":
            master = precision.join_master(p.to_local().detach(), master)
        kinds.append(("rounded", bool(torch.equal(bits(precision.round_master(master)),
                                                  bits(p.detach())))))
    out["kinds"] = kinds

    first, fopt = make()
    train(first, fopt, range(2))
    dcp.save({"optim": get_optimizer_state_dict(first, fopt)}, checkpoint_id=path)
    second, nopt = make()
    state = {"optim": get_optimizer_state_dict(second, nopt)}
    dcp.load(state, checkpoint_id=path)
    set_optimizer_state_dict(second, nopt, state["optim"])
    with torch.no_grad():
        for a, b in zip(first.params, second.params):
            b.to_local().copy_(a.to_local())
    train(second, nopt, range(2, 4))
    same = []
    for a, b in zip(straight.params, second.params):
        same.append(("param", bool(torch.equal(bits(a.detach()), bits(b.detach())))))
        sa, sb = sopt.state[a], nopt.state[b]
        same.append(("keys", sorted(sa) == sorted(sb)))
        for key in sa:
            same.append((key, bool(torch.equal(bits(sa[key]), bits(sb[key])))))
    out["same"] = same
    return out


CASES = {name[len("case_"):]: fn for name, fn in list(globals().items())
         if name.startswith("case_")}


# -- the tests --------------------------------------------------------------------------------
MAX_NORM = 0.5


@pytest.mark.parametrize("spec", [
    ("global", (MAX_NORM,)),
    ("global", (0.2, math.inf)),
    ("tensor", (0.3,)),
    ("agc", (0.05,)),
], ids=["GlobalNorm", "GlobalNorm-inf", "PerTensorNorm", "AGC"])
def test_fsdp2_matches_single_process(pool2, spec):
    results = pool2.run("fsdp", spec=spec)
    params, norms = _reference(spec)
    for res in results:
        _assert_params_close(res["params"], params, f"FSDP2 {spec}")
        assert res["host_reads"] == [], res["host_reads"]
        assert res["skipped"] == 0
    assert any("Shard" in p for p in results[0]["placements"])
    _assert_norms(results, norms, spec[1][0] if spec[0] == "global" else None, f"FSDP2 {spec}")


@pytest.mark.parametrize("spec", [
    ("zclip", dict(warmup_steps=2, z_thresh=1.0, max_norm=0.8)),
    ("adagc", dict(warmup_steps=2, lambda_abs=0.5, lambda_rel=1.0)),
], ids=["ZClip", "AdaGC"])
def test_fsdp2_stateful_policies(pool2, spec):
    """ZClip (global norm, state) and AdaGC (per-tensor norms and state) under
    FSDP2 equal the same policy on the whole model in one process."""
    results = pool2.run("fsdp", spec=spec)
    params, norms = _reference(spec)
    for res in results:
        _assert_params_close(res["params"], params, f"FSDP2 {spec[0]}")
    _assert_norms(results, norms, None, f"FSDP2 {spec[0]}")


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_fsdp2_nonfinite_on_one_rank_skips_everywhere(pool2, norm_type):
    """A NaN in rank 1's gradient shard at step 1 (rank 0's shards are finite):
    every rank skips that step and reports a NaN norm; the run goes on as the
    reference run without that step."""
    spec = ("global", (MAX_NORM, norm_type))
    results = pool2.run("fsdp", spec=spec, poison={1: (1, math.nan)})
    params, norms = _reference(spec, skip_steps={1})
    for res in results:
        assert res["skipped"] == 1
        _assert_params_close(res["params"], params, "FSDP2 NaN on rank 1")
    _assert_norms(results, norms, None, "FSDP2 NaN on rank 1")
    assert math.isnan(results[0]["norms"][1])


def test_fsdp2_inf_on_one_rank_changes_nothing(pool2):
    results = pool2.run("skip_unchanged", spec=("global", (MAX_NORM,)))
    for res in results:
        assert res["unchanged"] and res["skipped"] == 1 and res["norm"] == math.inf
        assert res["steps"] in ({}, {"step": 0.0})  # no step counted (state made or not)


@pytest.mark.parametrize("spec", [
    ("global", (MAX_NORM,)), ("tensor", (0.3,)), ("agc", (0.05,)),
], ids=["GlobalNorm", "PerTensorNorm", "AGC"])
def test_tensor_parallel_with_a_plain_layer(pool2, spec):
    """Colwise and rowwise layers (DTensors) and a LayerNorm and a Linear left
    plain, in one optimizer (torch's own clip_grad_norm_ fails on this model)."""
    results = pool2.run("tp", spec=spec)
    params, norms = _reference(spec)
    assert results[0]["kinds"].count("plain") == 4 and results[0]["kinds"].count("DTensor") == 4
    for res in results:
        _assert_params_close(res["params"], params, f"TP {spec}")
    _assert_norms(results, norms, spec[1][0] if spec[0] == "global" else None, f"TP {spec}")


def test_fsdp2_x_tp_on_a_2x2_mesh(pool4):
    specs = [("global", (MAX_NORM,)), ("tensor", (0.3,)), ("agc", (0.05,))]
    results = pool4.run("fsdp_tp", specs=specs)
    for i, spec in enumerate(specs):
        params, norms = _reference(spec)
        per_rank = [res[i] for res in results]
        assert any("Shard(dim=1)" in p for p in per_rank[0]["placements"])  # rowwise
        for res in per_rank:
            _assert_params_close(res["params"], params, f"FSDP2 x TP {spec}")
            assert res["host_reads"] == [], res["host_reads"]
        _assert_norms(per_rank, norms, spec[1][0] if spec[0] == "global" else None,
                      f"FSDP2 x TP {spec}")


@pytest.mark.parametrize("spec", [("global", (MAX_NORM,)), ("agc", (0.05,))],
                         ids=["GlobalNorm", "AGC"])
def test_hsdp_replicate_and_shard(pool4, spec):
    """The replicated mesh dim is not counted: 4 ranks, each pair holding the same shards."""
    results = pool4.run("hsdp", spec=spec)
    params, norms = _reference(spec)
    assert results[0]["placements"][0] == "(Replicate(), Shard(dim=0))"
    for res in results:
        _assert_params_close(res["params"], params, f"HSDP {spec}")
    _assert_norms(results, norms, spec[1][0] if spec[0] == "global" else None, f"HSDP {spec}")


def test_ddp(pool2):
    spec = ("global", (MAX_NORM,))
    results = pool2.run("ddp", spec=spec)
    params, norms = _reference(spec)
    for res in results:
        _assert_params_close(res["params"], params, "DDP")
    _assert_norms(results, norms, MAX_NORM, "DDP")


def test_ddp_policy_state_in_distributed_state_dict(pool2):
    res = pool2.run("ddp_state", spec=("zclip", dict(warmup_steps=2, z_thresh=1.0)))[0]
    assert len(res["nested"]) == 1
    assert res["restored"]
    assert res["dtypes"] == res["expected_dtypes"] and res["dtypes"]["count"] == "torch.int64"
    assert res["count"][0] == res["count"][1] == 2


def test_zero_redundancy_optimizer_with_norm_group(pool2):
    """ZeroRedundancyOptimizer(optimizer_class=FusedClipAdamW, norm_group=WORLD):
    each rank's optimizer holds some of the parameters, and clips by the norm
    of all of them. Without norm_group each rank clips by its own part's norm
    (the silent error the issue reports): the norms differ from the reference."""
    spec = ("global", (MAX_NORM,))
    results = pool2.run("zero", spec=spec)
    params, norms = _reference(spec)
    assert all(0 < res["local_params"] < 8 for res in results)
    assert results[0]["consolidated"] == 8
    for res in results:
        _assert_params_close(res["params"], params, "ZeRO")
    _assert_norms(results, norms, MAX_NORM, "ZeRO")
    without = pool2.run("zero", spec=spec, norm_group=False)
    assert all(res["norms"][0] < norms[0] * (1 - 1e-3) for res in without)


def test_pipeline_stages_with_norm_group(pool2):
    """Two pipeline stages, one per rank, each with its own optimizer and
    norm_group=WORLD: one global norm; a NaN in stage 1 (step 2) skips both."""
    spec = ("global", (MAX_NORM,))
    results = pool2.run("pipeline", spec=spec, poison={2: (1, math.nan)})
    params, norms = _reference(spec, skip_steps={2})
    _assert_params_close(results[0]["params"] + results[1]["params"], params, "pipeline")
    assert [res["skipped"] for res in results] == [1, 1]
    _assert_norms(results, norms, None, "pipeline")
    own, reported = results[1]["alone"]
    assert reported == pytest.approx(own, rel=NORM_RTOL, abs=0)


@pytest.mark.parametrize("spec,optimizer", [
    (("zclip", dict(warmup_steps=2, z_thresh=1.0, max_norm=0.8)), "adamw"),
    (("adagc", dict(warmup_steps=2, lambda_abs=0.5)), "adagrad"),
], ids=["AdamW-ZClip", "Adagrad-AdaGC"])
def test_distributed_checkpoint_round_trip(pool2, tmp_path, spec, optimizer):
    """torch.distributed.checkpoint save/load with get/set_optimizer_state_dict
    under FSDP2: the resumed run equals the uninterrupted one bitwise (parameters,
    optimizer state, the policy's state, the reported norms)."""
    results = pool2.run("dcp", spec=spec, optimizer=optimizer, path=str(tmp_path / "ckpt"))
    for res in results:
        assert res["same"] == {"params": True, "state": True, "policy": True,
                               "tensor_policy": True}, res["same"]
        assert res["norms"]
        assert res["policy_nonempty"]
        assert any("clip_policy" in keys for keys in res["layout"].values()), res["layout"]


def test_state_is_laid_out_as_torch_does(pool2):
    results = pool2.run("torch_layout")
    for (torch_sd, torch_dsd), (ours_sd, ours_dsd) in results:
        assert ours_sd == torch_sd
        assert ours_dsd == torch_dsd
        assert any(v["exp_avg"][0] == "DTensor" for v in torch_sd.values())


def test_clear_errors(pool2):
    res = pool2.run("errors")[0]
    assert res["bad_type"].startswith("TypeError") and "norm_group" in res["bad_type"]
    assert res["mesh_2d"].startswith("ValueError") and "1-D DeviceMesh" in res["mesh_2d"]
    assert res["mesh_1d_ok"] is None
    assert res["overlap"].startswith("ValueError") and "norm_group" in res["overlap"]
    assert "more than once" in res["overlap"] or "count them again" in res["overlap"]
    assert res["overlap_unchanged"]
    assert res["partial"].startswith("RuntimeError") and "Partial" in res["partial"]
    assert "redistribute" in res["partial"]
    assert res["plain_grad"].startswith("RuntimeError") and "DTensor" in res["plain_grad"]
    assert res["partial_unchanged"]
    assert res["partial_param"].startswith("ValueError") and "Partial" in res["partial_param"]
    assert "Shard and Replicate" in res["partial_param"]
    assert res["deepcopy_shares"]
    assert res["pickle"].startswith("TypeError") and "state_dict" in res["pickle"]
    assert res["chain"].startswith("ValueError") and "Chain(AGC(" in res["chain"]
    assert "reduced across processes" in res["chain"] and res["chain_unchanged"]


def test_precision_dtensor_master_state_and_dcp(pool2, tmp_path):
    """Mixed precision with DTensor parameters (case_precision)."""
    results = pool2.run("precision", path=str(tmp_path / "ckpt"))
    for res in results:
        for kind in res["kinds"]:
            if kind[0] == "rounded":
                assert kind[1], res["kinds"]
            else:
                key, type_name, same_placements, dtype = kind
                assert type_name == "DTensor" and same_placements, kind
                expected = {"master_param": "torch.float32", "param_remainder": "torch.int16"}
                assert dtype == expected.get(key, dtype), kind
        assert any(k[0] == "param_remainder" for k in res["kinds"])
        assert any(k[0] == "exp_avg" and k[3] == "torch.bfloat16" for k in res["kinds"])
        assert all(ok for _, ok in res["same"]), res["same"]

"""Shared helpers of the fusedclip tests: test problems as data, tensors of
every layout, devices, clipping as a torch.optim user does it, and the
comparisons. Nothing here knows one optimizer from another: what differs per
optimizer lives in tests/registry.py.

A test problem is plain data: parameter groups (hyperparameters and parameter
specs), a dtype, a gradient scale and a seed. From it the helpers build any
number of identical parameter sets (same values, same memory layouts), one for
torch.optim and one for fusedclip, and the same gradients for every step.

Parameter specs are ``(shape, layout)`` with layout one of
``"contiguous"``, ``"transposed"`` (a 2-D parameter stored as the transpose of
a contiguous tensor), ``"slice"`` (``nn.Parameter(t[:, ::2])``: not dense, so
torch.optim's state for it is contiguous while the parameter is not) and
``"channels_last"`` (4-D). Gradients are either contiguous or laid out like
their parameter (``grad_layout``), which for a slice is a strided, non-dense
gradient.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch

import fusedclip

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
LOW_PRECISION = (torch.bfloat16, torch.float16)
DTYPE_NAMES = {
    torch.float64: "fp64", torch.float32: "fp32", torch.bfloat16: "bf16",
    torch.float16: "fp16",
}


def dname(dtype) -> str:
    """``float32`` for torch.float32: the dtype part of a test id."""
    return str(dtype).removeprefix("torch.")


# -- devices ------------------------------------------------------------------------------------
def has_cuda_kernel(op: str) -> bool:
    """Whether the dispatcher has a CUDA kernel for ``op`` ("fusedclip::adam_")."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")
    except Exception:  # the private helper moved or changed: treat as absent
        return False


def cuda_skips(ops_needed) -> list:
    """The skip marks of a CUDA test: a device, and the CUDA kernels of `ops_needed`."""
    return [
        pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
        pytest.mark.skipif(
            not all(has_cuda_kernel(op) for op in ops_needed),
            reason="fusedclip._C was built without CUDA kernels "
                   "(rebuild with FUSEDCLIP_CUDA=1; see docs/GPU_RUNBOOK.md)"),
    ]


def device_params(ops_needed, cpu: bool = True) -> list:
    """The `device` parameter of a test: "cpu" always (unless ``cpu=False``:
    a test of what only the CUDA kernels have, launch limits say), and "cuda",
    skipped without a GPU or without the CUDA kernels of `ops_needed`.
    conftest marks the "cuda" instances `cuda` (tools/gpu_check.sh runs them
    with ``-m cuda``)."""
    out = [pytest.param("cpu", id="cpu")] if cpu else []
    out.append(pytest.param("cuda", id="cuda", marks=cuda_skips(ops_needed)))
    return out


def to_device(t: torch.Tensor, device="cuda") -> torch.Tensor:
    """A copy on `device` with the same strides (also for non-dense tensors)."""
    out = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=device)
    out.copy_(t)
    return out


def tree_to_device(x, device):
    """Every tensor of a nest of lists, tuples and dicts, copied to `device`
    with its strides; anything else as it is."""
    if isinstance(x, torch.Tensor):
        return to_device(x, device)
    if isinstance(x, (list, tuple)):
        return type(x)(tree_to_device(v, device) for v in x)
    if isinstance(x, dict):
        return {k: tree_to_device(v, device) for k, v in x.items()}
    return x


def misaligned_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of `t` on its device at storage offset 1 (so not
    16-byte aligned)."""
    base = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = base[1:].view(t.shape)
    view.copy_(t)
    return view


def cpu_mirror(opt, params):
    """CPU copies of parameters and state, dressed as an optimizer for the
    comparison helpers (``state`` and ``param_groups``)."""
    cpu_params = [p.detach().cpu() for p in params]
    state = {}
    for p, c in zip(params, cpu_params):
        if p in opt.state:
            state[c] = {k: (v.cpu() if isinstance(v, torch.Tensor) else v)
                        for k, v in opt.state[p].items()}
    index = {id(p): c for p, c in zip(params, cpu_params)}
    groups = [dict(g, params=[index[id(p)] for p in g["params"] if id(p) in index])
              for g in opt.param_groups]
    return SimpleNamespace(state=state, param_groups=groups), cpu_params


@contextlib.contextmanager
def no_host_reads(device, monkeypatch=None):
    """Fails on a host read of a device value inside: on CUDA through torch's
    sync debug mode; on the CPU (where reading costs nothing, so torch cannot
    tell) by making every Tensor method that reads a value raise."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return

    def forbidden(*args, **kwargs):
        raise AssertionError("host read of a tensor value in the step")

    with pytest.MonkeyPatch.context() as m:
        for attr in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__",
                     "__index__"):
            m.setattr(torch.Tensor, attr, forbidden)
        yield


# -- building tensors ---------------------------------------------------------------------------
def _randn(shape, gen: torch.Generator, dtype: torch.dtype, std: float = 1.0,
           floor: float = 0.0) -> torch.Tensor:
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * std
    if floor:
        x = torch.sign(x) * (floor + x.abs())
    return x.to(dtype)


def make_tensor(shape, layout: str, gen: torch.Generator, dtype: torch.dtype,
                std: float = 1.0, floor: float = 0.0) -> torch.Tensor:
    """A tensor of `shape` with random normal values (times `std`, moved
    `floor` away from zero), stored as `layout` says."""
    shape = tuple(shape)
    if layout == "contiguous":
        return _randn(shape, gen, dtype, std, floor)
    if layout == "transposed":
        assert len(shape) == 2
        return _randn((shape[1], shape[0]), gen, dtype, std, floor).t()
    if layout == "slice":
        assert len(shape) == 2
        return _randn((shape[0], 2 * shape[1]), gen, dtype, std, floor)[:, ::2]
    if layout == "channels_last":
        assert len(shape) == 4
        return _randn(shape, gen, dtype, std, floor).contiguous(memory_format=torch.channels_last)
    raise ValueError(f"unknown layout {layout!r}")


def clone_layout(t: torch.Tensor) -> torch.Tensor:
    """A copy with the same strides, also for non-dense (strided) tensors."""
    # empty_strided allocates the whole span a (possibly non-dense) layout covers
    out = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=t.device)
    out.copy_(t)
    return out


def make_params(specs, dtype=torch.float32, seed=0, device="cpu") -> list[torch.nn.Parameter]:
    """Parameters of the given (shape, layout) specs, random normal, on `device`."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(to_device(make_tensor(s, lay, gen, dtype), device))
            for s, lay in specs]


def set_step_grads(params, step: int, nan_at: int | None = None, poison: int = 0,
                   in_place: bool = False) -> None:
    """Step `step`'s gradients, the same on every call (random normal in
    float64, rounded to each parameter's dtype). Where ``step == nan_at`` the
    gradient of parameter `poison` holds a NaN. ``in_place`` writes into the
    existing ``.grad`` tensors (a captured or compiled step keeps reading them)."""
    gen = torch.Generator().manual_seed(1000 + step)
    for i, p in enumerate(params):
        g = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype).to(p.device)
        if step == nan_at and i == poison and g.numel():
            g.view(-1)[min(1, g.numel() - 1)] = math.nan
        if in_place and p.grad is not None:
            p.grad.copy_(g)
        else:
            p.grad = g


def poisoned(grads, index=0, value=math.nan, element=0):
    """The gradients with element `element` of gradient `index` set to `value`."""
    grads = list(grads)
    g = grads[index].clone()
    assert g.is_contiguous()
    g.view(-1)[element] = value
    grads[index] = g
    return grads


@dataclass
class Problem:
    """Parameter groups, dtype and gradients of one optimization run.

    ``groups`` is a list of dicts: ``specs`` (a list of ``(shape, layout)``)
    and the group's hyperparameters (any of the optimizer's). ``lr`` may be
    the string ``"tensor:<value>"`` for a 1-element tensor learning rate.
    """

    groups: list[dict]
    dtype: torch.dtype = torch.float32
    grad_std: float = 1.0
    # Gradients are at least this far from zero (see the float16 configurations).
    grad_floor: float = 0.0
    grad_layout: str = "contiguous"  # or "like_param"
    # Probability that a parameter has no gradient in a step (never for index 0).
    none_prob: float = 0.0
    seed: int = 0
    specs: list = field(init=False)

    def __post_init__(self) -> None:
        self.specs = [spec for group in self.groups for spec in group["specs"]]

    # Parameters -------------------------------------------------------------------
    def params(self, device="cpu") -> list[list[torch.nn.Parameter]]:
        """Fresh parameters, per group; every call gives the same values and
        layouts (on `device`, same strides)."""
        gen = torch.Generator().manual_seed(self.seed)
        out = []
        for group in self.groups:
            out.append([
                torch.nn.Parameter(to_device(make_tensor(shape, layout, gen, self.dtype), device))
                for shape, layout in group["specs"]
            ])
        return out

    def _lr(self, lr, device="cpu"):
        if isinstance(lr, str) and lr.startswith("tensor:"):
            # float64 parameters get a float64 lr: torch computes lr / (1 -
            # beta1^t) in the lr tensor's dtype, fusedclip in float64.
            dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
            return torch.tensor([float(lr.split(":")[1])], dtype=dtype, device=device)
        return lr

    def hyper(self, group: dict, device="cpu") -> dict:
        h = {k: v for k, v in group.items() if k != "specs"}
        if "lr" in h:
            h["lr"] = self._lr(h["lr"], device)
        return h

    def param_groups(self, params: list[list[torch.nn.Parameter]], device="cpu") -> list[dict]:
        """Optimizer param groups (fresh lr tensors, on `device`) for `params`."""
        return [dict(self.hyper(g, device), params=ps) for g, ps in zip(self.groups, params)]

    def reference_groups(self, params, defaults: dict) -> list[dict]:
        """Groups for a fusedclip.reference optimizer: every key, float lr."""
        out = []
        for group, ps in zip(self.param_groups(params), params):
            full = dict(defaults)
            full.update({k: v for k, v in group.items() if k != "params"})
            lr = full["lr"]
            full["lr"] = float(lr.item()) if isinstance(lr, torch.Tensor) else float(lr)
            full["params"] = ps
            out.append(full)
        return out

    # Gradients --------------------------------------------------------------------
    def grads(self, step: int) -> list[torch.Tensor | None]:
        """The gradients of step `step`, one per parameter in group order (None
        where the parameter has none in that step), on the CPU."""
        gen = torch.Generator().manual_seed(self.seed * 1000003 + step + 1)
        choose = torch.Generator().manual_seed(self.seed * 7919 + step)
        out = []
        for i, (shape, layout) in enumerate(self.specs):
            g_layout = layout if self.grad_layout == "like_param" else "contiguous"
            g = make_tensor(shape, g_layout, gen, self.dtype, self.grad_std, self.grad_floor)
            if i > 0 and self.none_prob > 0 and float(torch.rand((), generator=choose)) < self.none_prob:
                g = None
            out.append(g)
        return out


def flat(params: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    return [p for group in params for p in group]


def set_grads(params: list[torch.Tensor], grads: list[torch.Tensor | None]) -> None:
    """Gives every parameter its own copy of its gradient (same layout, on the
    parameter's device)."""
    for p, g in zip(params, grads):
        p.grad = None if g is None else to_device(g, p.device)


def copy_params(src: list[list[torch.Tensor]], dst: list[list[torch.Tensor]]) -> None:
    with torch.no_grad():
        for a, b in zip(flat(src), flat(dst)):
            b.copy_(a)


# -- clipping as a torch.optim user does it -------------------------------------------------------
def clip_policy(clip):
    """`clip` of a configuration: None, a float, or ("global", max_norm, norm_type)."""
    if isinstance(clip, tuple):
        return fusedclip.GlobalNorm(clip[1], norm_type=clip[2])
    return clip


def clip_args(clip) -> tuple[float, float] | None:
    """(max_norm, norm_type) of a configuration's clip, or None."""
    if clip is None:
        return None
    if isinstance(clip, tuple):
        return float(clip[1]), float(clip[2])
    return float(clip), 2.0


def clip_name(clip) -> str:
    if clip is None:
        return "noclip"
    if isinstance(clip, tuple):
        return f"GN({clip[1]},{'inf' if math.isinf(clip[2]) else 2})"
    return f"clip{clip}"


def torch_clip(params: list[torch.Tensor], clip) -> torch.Tensor | None:
    """torch.nn.utils.clip_grad_norm_ as a user calls it before optimizer.step().

    torch raises on an empty gradient for the inf norm; empty gradients add
    nothing to any norm, so they are left out of torch's call (for every norm
    type, so that both norms see the same list)."""
    args = clip_args(clip)
    if args is None:
        return None
    max_norm, norm_type = args
    with_grads = [p for p in params if p.grad is not None and p.numel() > 0]
    return torch.nn.utils.clip_grad_norm_(with_grads, max_norm, norm_type=norm_type)


def train_steps(opt, params: list[torch.Tensor], problem: Problem, steps: int, start: int,
                torch_side: bool, max_norm: float = 0.5) -> None:
    """`steps` steps from step `start` of the problem's gradients; the torch
    side clips them first with clip_grad_norm_(max_norm)."""
    for step in range(start, start + steps):
        set_grads(params, problem.grads(step))
        if torch_side:
            torch_clip(params, max_norm)
        opt.step()


def assert_restores_bitwise(make_opt, problem: Problem, first: int, then: int) -> None:
    """A fused optimizer (make_opt(params) makes it) restored from its own
    state dict after `first` steps continues bit for bit for `then` more."""
    params = problem.params()
    opt = make_opt(params)
    train_steps(opt, flat(params), problem, first, 0, torch_side=False)
    saved = copy.deepcopy(opt.state_dict())
    saved_params = [p.detach().clone() for p in flat(params)]

    twin = problem.params()
    copy_params(params, twin)
    opt2 = make_opt(twin)
    opt2.load_state_dict(saved)
    train_steps(opt, flat(params), problem, then, first, torch_side=False)
    train_steps(opt2, flat(twin), problem, then, first, torch_side=False)
    for a, b, before in zip(flat(params), flat(twin), saved_params):
        assert bitwise_equal(a.detach(), b.detach())
        if a.numel():
            assert not torch.equal(a.detach(), before)  # they did train
        for key, value in opt.state[a].items():
            assert bitwise_equal(opt2.state[b][key], value), key


# -- comparing ---------------------------------------------------------------------------------
def finite_max_abs(tensors) -> float:
    best = 0.0
    for t in tensors:
        finite = t[torch.isfinite(t)]
        if finite.numel():
            best = max(best, float(finite.abs().max()))
    return best


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: tuple[float, float],
                 what: str = "", equal_nan: bool = False, scale: float | None = None) -> None:
    """|actual - expected| <= atol + rtol |expected|, atol = atol_scale * scale
    (see tolerances.py), where `scale` is max|expected| unless given; dtypes and
    shapes must match."""
    rtol, atol_scale = tol
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if scale is None:
        scale = finite_max_abs([expected])
    atol = atol_scale * scale
    # Compared in float64 (exact for every dtype here, and faster than
    # torch.testing on half-precision CPU tensors).
    a, e = actual.detach().double(), expected.detach().double()
    bad = ~((a - e).abs() <= atol + rtol * e.abs())
    both_nan = a.isnan() & e.isnan()
    same_inf = a.isinf() & (a == e)
    bad &= ~same_inf
    bad &= ~both_nan if equal_nan else torch.ones_like(bad)
    if bad.any():
        index = tuple(int(i) for i in torch.nonzero(bad)[0]) if bad.dim() else ()
        diff = (a - e).abs()
        diff = diff[torch.isfinite(diff)]
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements differ; first at "
            f"{index}: {float(a[index])!r} vs expected {float(e[index])!r}; largest "
            f"|difference| {float(diff.max()) if diff.numel() else float('nan'):.3g} "
            f"(allowed atol {atol:.3g} + rtol {rtol:.3g} * |expected|)"
        )


def state_tensor_keys(opts_and_params) -> list[str]:
    """The tensor state keys (besides ``step``) found in any of the optimizers'
    states, in first-seen order."""
    keys: list[str] = []
    for opt, params in opts_and_params:
        for p in params:
            for key, value in opt.state.get(p, {}).items():
                if key != "step" and isinstance(value, torch.Tensor) and key not in keys:
                    keys.append(key)
    return keys


def assert_states_close(actual_opt, expected_opt, actual_params, expected_params,
                        tol, what: str = "", equal_nan: bool = False) -> None:
    """Parameters, state keys, steps and every state tensor agree.

    The absolute part of the tolerance scales with the largest value of the same
    quantity over all parameters (the largest |param|, the largest |exp_avg|,
    ...), as a normwise comparison of the whole model's state would: a 0-d
    parameter whose first moment has cancelled to a small value is judged
    against the size of the terms it was summed from, not against its remains."""
    keys = state_tensor_keys([(expected_opt, expected_params), (actual_opt, actual_params)])
    scales = {"param": finite_max_abs([p.detach() for p in expected_params])}
    for key in keys:
        scales[key] = finite_max_abs(
            [expected_opt.state[p][key] for p in expected_params
             if key in expected_opt.state.get(p, {})])
    for i, (pa, pe) in enumerate(zip(actual_params, expected_params)):
        assert_close(pa.detach(), pe.detach(), tol, f"{what} param[{i}]", equal_nan,
                     scales["param"])
        sa, se = actual_opt.state.get(pa, {}), expected_opt.state.get(pe, {})
        assert set(sa) == set(se), f"{what} param[{i}]: state keys {set(sa)} vs {set(se)}"
        if "step" in se:
            assert float(sa["step"]) == float(se["step"]), (
                f"{what} param[{i}]: step {float(sa['step'])} != {float(se['step'])}")
            assert sa["step"].dtype == se["step"].dtype, f"{what} param[{i}]: step dtype"
        for key in keys:
            if key in se:
                assert_close(sa[key], se[key], tol, f"{what} param[{i}] {key}", equal_nan,
                             scales[key])


def copy_state(src_opt, dst_opt, src_params, dst_params) -> None:
    """Copies parameter values and every state tensor but ``step`` from one
    optimizer into another's (same layouts kept); the step counts must agree."""
    with torch.no_grad():
        for s, d in zip(src_params, dst_params):
            d.copy_(s)
            src, dst = src_opt.state.get(s, {}), dst_opt.state.get(d, {})
            assert set(src) == set(dst), f"state keys {set(src)} vs {set(dst)}"
            for key, value in src.items():
                if key == "step":
                    assert float(dst[key]) == float(value)
                else:
                    dst[key].copy_(value)


def snapshot(opt, params: list[torch.Tensor]) -> dict:
    """Exact copies of parameters and all optimizer state, for bitwise checks."""
    return {
        "params": [p.detach().clone() for p in params],
        "strides": [p.stride() for p in params],
        "state": [
            {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.state.get(p, {}).items()}
            for p in params
        ],
    }


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits (NaNs included, their payloads too)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    if a.device != b.device:
        b = b.to(a.device)
    if a.is_complex():
        a, b = torch.view_as_real(a.resolve_conj()), torch.view_as_real(b.resolve_conj())
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(width), b.contiguous().view(width))


def identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and values, NaN where NaN (whatever its payload)."""
    return a.shape == b.shape and a.dtype == b.dtype and bool(
        (a.view(-1).isnan() == b.view(-1).isnan()).all()) and torch.equal(
        a.view(-1)[~a.view(-1).isnan()], b.view(-1)[~b.view(-1).isnan()])


def params_of(opt) -> list[torch.Tensor]:
    return [p for group in opt.param_groups for p in group["params"]]


def assert_same_optimizers(a_opt, b_opt, what: str) -> None:
    """Parameters, torch.optim state, policy state and clip_stats, bit for bit
    (NaN where NaN)."""
    for i, (a, b) in enumerate(zip(params_of(a_opt), params_of(b_opt))):
        assert identical(a, b), f"{what}: parameter {i}"
        sa, sb = a_opt.state.get(a, {}), b_opt.state.get(b, {})
        assert sa.keys() == sb.keys(), f"{what}: state keys of parameter {i}"
        for key in sa:
            assert identical(sa[key], sb[key]), f"{what}: state {key} of parameter {i}"
    assert a_opt._policy_state.keys() == b_opt._policy_state.keys(), what
    for key, value in a_opt._policy_state.items():
        assert identical(value, b_opt._policy_state[key]), f"{what}: policy state {key}"
    assert len(a_opt._policy_tensor_state) == len(b_opt._policy_tensor_state), what
    for (pa, sa), (pb, sb) in zip(a_opt._policy_tensor_state.items(),
                                  b_opt._policy_tensor_state.items()):
        for key in sa:
            assert identical(sa[key], sb[key]), f"{what}: policy tensor state {key}"
    assert a_opt.clip_stats.keys() == b_opt.clip_stats.keys(), what
    for key, value in a_opt.clip_stats.items():
        assert identical(value, b_opt.clip_stats[key]), f"{what}: clip_stats {key}"


def assert_same_step(actual: list, expected: list, what: str = "") -> None:
    """Lists of tensors (params, states, steps), tensor by tensor within
    tolerances.TRANSFORM_PATHS of their dtype: the same step computed by two
    element loops. A NaN matches a NaN (its payload may differ)."""
    from tolerances import TRANSFORM_PATHS
    for k, (xs, ys) in enumerate(zip(actual, expected)):
        assert len(xs) == len(ys), f"{what}: list {k} has {len(xs)} tensors, expected {len(ys)}"
        for i, (x, y) in enumerate(zip(xs, ys)):
            tol = TRANSFORM_PATHS.get(y.dtype, (0.0, 0.0))  # integer counters: exact
            assert_close(x, y, tol, f"{what}: list {k} [{i}]", equal_nan=True)


def assert_unchanged(opt, params: list[torch.Tensor], before: dict, what: str = "") -> None:
    """Parameters and every state tensor (step included) bit-identical to `before`."""
    for i, p in enumerate(params):
        assert bitwise_equal(p.detach(), before["params"][i]), f"{what}: param[{i}] changed"
        assert p.stride() == before["strides"][i], f"{what}: param[{i}] layout changed"
        state = opt.state.get(p, {})
        old = before["state"][i]
        assert set(state) == set(old), f"{what}: param[{i}] state keys {set(old)} -> {set(state)}"
        for key, value in old.items():
            if isinstance(value, torch.Tensor):
                assert bitwise_equal(state[key], value), f"{what}: param[{i}] state {key} changed"
            else:
                assert state[key] == value, f"{what}: param[{i}] state {key} changed"


# -- parameter specs of the random configurations ----------------------------------------------
# Odd sizes around the SIMD widths (8 floats, 16 half) and around the CPU chunk
# size (16384).
SMALL_SPECS = [
    ((), "contiguous"), ((0,), "contiguous"), ((3, 0), "contiguous"), ((1,), "contiguous"),
    ((7,), "contiguous"), ((17,), "contiguous"), ((33,), "contiguous"), ((5, 3), "contiguous"),
    ((3, 5), "transposed"), ((6, 9), "transposed"), ((4, 5), "slice"), ((3, 17), "slice"),
    ((2, 3, 4, 5), "channels_last"), ((11, 13), "contiguous"), ((255,), "contiguous"),
]
LARGE_SPECS = [((1031,), "contiguous"), ((16385,), "contiguous"), ((129, 67), "transposed")]
# Enough elements in one call to take the multi-threaded path (65536).
PARALLEL_SPEC = ((70001,), "contiguous")
# Shapes of the many-tensor configurations: tiny, with 0-d and empty ones.
TINY_SHAPES = [(), (0,), (1,), (2,), (3,), (5,), (2, 2), (1, 3)]
MANY = 1100

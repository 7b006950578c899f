"""Shared helpers of the fusedclip tests.

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

import copy
import math
import random
from dataclasses import dataclass, field

import pytest
import torch

import fusedclip

LOW_PRECISION = (torch.bfloat16, torch.float16)
DTYPE_NAMES = {
    torch.float64: "fp64", torch.float32: "fp32", torch.bfloat16: "bf16",
    torch.float16: "fp16",
}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long or memory-hungry (tests/test_cuda.py)")


@pytest.fixture(autouse=True)
def _default_dtype():
    """Every test starts from float32 as the default dtype."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(saved)


# -- building tensors ---------------------------------------------------------------
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


@dataclass
class Problem:
    """Parameter groups, dtype and gradients of one optimization run.

    ``groups`` is a list of dicts: ``specs`` (a list of ``(shape, layout)``)
    and the group's hyperparameters (any of lr, betas, eps, weight_decay,
    amsgrad, maximize, decoupled_weight_decay). ``lr`` may be the string
    ``"tensor:<value>"`` for a 1-element tensor learning rate.
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
    def params(self) -> list[list[torch.nn.Parameter]]:
        """Fresh parameters, per group; every call gives the same values and layouts."""
        gen = torch.Generator().manual_seed(self.seed)
        out = []
        for group in self.groups:
            out.append([
                torch.nn.Parameter(make_tensor(shape, layout, gen, self.dtype))
                for shape, layout in group["specs"]
            ])
        return out

    def _lr(self, lr):
        if isinstance(lr, str) and lr.startswith("tensor:"):
            # float64 parameters get a float64 lr: torch computes lr / (1 -
            # beta1^t) in the lr tensor's dtype, fusedclip in float64.
            dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
            return torch.tensor([float(lr.split(":")[1])], dtype=dtype)
        return lr

    def hyper(self, group: dict) -> dict:
        h = {k: v for k, v in group.items() if k != "specs"}
        if "lr" in h:
            h["lr"] = self._lr(h["lr"])
        return h

    def param_groups(self, params: list[list[torch.nn.Parameter]]) -> list[dict]:
        """Optimizer param groups (fresh lr tensors) for `params`."""
        return [dict(self.hyper(g), params=ps) for g, ps in zip(self.groups, params)]

    def reference_groups(self, params, defaults: dict) -> list[dict]:
        """Groups for fusedclip.reference.ReferenceAdam: every key, float lr."""
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
        where the parameter has none in that step)."""
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
    """Gives every parameter its own copy of its gradient (same layout)."""
    for p, g in zip(params, grads):
        p.grad = None if g is None else clone_layout(g)


def clone_layout(t: torch.Tensor) -> torch.Tensor:
    """A copy with the same strides, also for non-dense (strided) tensors."""
    # empty_strided allocates the whole span a (possibly non-dense) layout covers
    out = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=t.device)
    out.copy_(t)
    return out


# -- running the optimizers ------------------------------------------------------------
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


# -- state dict hand-overs (test_state_dict.py, test_sgd.py, test_adagrad.py) ----------
def train_steps(opt, params: list[torch.Tensor], problem: Problem, steps: int, start: int,
                torch_side: bool, max_norm: float = 0.5) -> None:
    """`steps` steps from step `start` of the problem's gradients; the torch
    side clips them first with clip_grad_norm_(max_norm)."""
    for step in range(start, start + steps):
        set_grads(params, problem.grads(step))
        if torch_side:
            torch_clip(params, max_norm)
        opt.step()


def copy_params(src: list[list[torch.Tensor]], dst: list[list[torch.Tensor]]) -> None:
    with torch.no_grad():
        for a, b in zip(flat(src), flat(dst)):
            b.copy_(a)


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


TORCH_CLASSES = {"Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW}
FUSED_CLASSES = {"Adam": fusedclip.FusedClipAdam, "AdamW": fusedclip.FusedClipAdamW}


def make_torch_opt(kind: str, problem: Problem, params, defaults: dict):
    # foreach=False is what torch.optim picks on the CPU anyway; stated to be sure.
    return TORCH_CLASSES[kind](problem.param_groups(params), foreach=False, **defaults)


def make_fused_opt(kind: str, problem: Problem, params, defaults: dict, **kwargs):
    return FUSED_CLASSES[kind](problem.param_groups(params), **defaults, **kwargs)


def torch_defaults(kind: str) -> dict:
    """The defaults of every Adam hyperparameter as torch's class states them."""
    opt = TORCH_CLASSES[kind]([torch.nn.Parameter(torch.zeros(1))])
    d = dict(opt.defaults)
    d.setdefault("decoupled_weight_decay", kind == "AdamW")
    keys = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "decoupled_weight_decay")
    return {k: d[k] for k in keys}


# -- comparing -------------------------------------------------------------------------
def _finite_max_abs(tensors) -> float:
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
        scale = _finite_max_abs([expected])
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


STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def assert_states_close(actual_opt, expected_opt, actual_params, expected_params,
                        tol, what: str = "", equal_nan: bool = False) -> None:
    """Parameters and every state tensor (step included) agree.

    The absolute part of the tolerance scales with the largest value of the same
    quantity over all parameters (the largest |param|, the largest |exp_avg|,
    ...), as a normwise comparison of the whole model's state would: a 0-d
    parameter whose first moment has cancelled to a small value is judged
    against the size of the terms it was summed from, not against its remains."""
    scales = {"param": _finite_max_abs([p.detach() for p in expected_params])}
    for key in STATE_KEYS:
        scales[key] = _finite_max_abs(
            [expected_opt.state[p][key] for p in expected_params
             if key in expected_opt.state.get(p, {})])
    for i, (pa, pe) in enumerate(zip(actual_params, expected_params)):
        assert_close(pa.detach(), pe.detach(), tol, f"{what} param[{i}]", equal_nan,
                     scales["param"])
        sa, se = actual_opt.state.get(pa, {}), expected_opt.state.get(pe, {})
        assert ("step" in sa) == ("step" in se), f"{what} param[{i}]: state keys {set(sa)} vs {set(se)}"
        if "step" not in se:
            continue
        assert float(sa["step"]) == float(se["step"]), (
            f"{what} param[{i}]: step {float(sa['step'])} != {float(se['step'])}")
        assert sa["step"].dtype == se["step"].dtype, f"{what} param[{i}]: step dtype"
        for key in STATE_KEYS:
            if key in se or key in sa:
                assert key in sa and key in se, f"{what} param[{i}]: {key} missing on one side"
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
    """Same dtype, shape and bits (NaNs included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    if a.is_complex():
        a, b = torch.view_as_real(a.resolve_conj()), torch.view_as_real(b.resolve_conj())
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(width), b.contiguous().view(width))


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


# -- random configurations --------------------------------------------------------------
# Parameter specs: (shape, layout). Odd sizes around the SIMD widths (8 floats,
# 16 half) and around the CPU chunk size (16384).
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


def _group(rng: random.Random, dtype, kind: str, specs, against: str) -> dict:
    low = dtype in LOW_PRECISION
    group = {"specs": specs}
    # Learning rates big enough that low-precision parameters move at all
    # (a 1e-3 step vanishes against a bfloat16 ulp of a unit-size weight).
    lr = rng.choice([1e-2, 3e-2] if low else [1e-3, 3e-3, 1e-2, 0.1])
    group["lr"] = f"tensor:{lr}" if rng.random() < 0.3 else lr
    group["betas"] = rng.choice([(0.9, 0.999), (0.8, 0.99), (0.95, 0.95), (0.0, 0.9), (0.3, 0.5)])
    group["eps"] = rng.choice([1e-8, 1e-6, 1e-3] if low else [1e-8, 1e-6, 1e-3, 0.0])
    group["weight_decay"] = rng.choice([0.0, 0.0, 1e-2, 0.1])
    group["amsgrad"] = rng.random() < 0.4
    group["maximize"] = rng.random() < 0.3
    decoupled = kind == "AdamW"
    if kind == "Adam":
        decoupled = group["decoupled_weight_decay"] = rng.random() < 0.3
    if low and not decoupled and against == "torch":
        # No L2 weight decay in low precision against torch: torch rounds
        # g + weight_decay * param to bfloat16 before Adam normalises it, and
        # where the two nearly cancel the rounded sum can take the other sign;
        # on a first step m / sqrt(v) turns any sign into a whole +-lr step, so a
        # half-ulp difference becomes a step-sized one. (L2 decay in low precision
        # is compared with the float64 reference in test_reference.py.)
        group["weight_decay"] = 0.0
    return group


def _clip(rng: random.Random, dtype, specs, grad_std: float, grad_floor: float, against: str):
    r = rng.random()
    if r < 0.2:
        return None
    norm_type = 2.0 if r < 0.55 else rng.choice([2.0, math.inf])
    if dtype == torch.float16 and against == "torch":
        # float16 configurations clip by a coefficient of at least ~0.5 (see
        # make_configs), so max_norm is a fraction of the expected norm.
        if math.isinf(norm_type):
            expected = grad_floor + 3.0 * grad_std
        else:
            numel = sum(math.prod(shape) for shape, _ in specs)
            mean_sq = grad_floor**2 + 2 * grad_floor * grad_std * math.sqrt(2 / math.pi) + grad_std**2
            expected = math.sqrt(numel * mean_sq)
        max_norm = float(f"{rng.choice([0.6, 1.5]) * expected:.3g}")
    else:
        max_norm = rng.choice([0.1, 1.0, 5.0, 50.0])
    if r < 0.55:
        return max_norm
    return ("global", max_norm, norm_type)


def _clip_name(clip) -> str:
    if clip is None:
        return "noclip"
    if isinstance(clip, tuple):
        return f"GN({clip[1]},{'inf' if math.isinf(clip[2]) else 2})"
    return f"clip{clip}"


def random_configs(n: int, seed: int, against: str) -> list:
    """`n` random configurations as pytest params with readable ids; the first
    few pin down the cases that must always be present (every dtype, many
    tensors, the multi-threaded path).

    `against` is "torch" or "reference": what the fused optimizer is compared
    with. Against torch, low-precision configurations stay where torch's
    low-precision arithmetic is well conditioned (see the comments below).
    """
    assert against in ("torch", "reference")
    rng = random.Random(seed)
    configs = []
    for i in range(n):
        kind = rng.choice(["Adam", "AdamW"])
        dtype = rng.choice([torch.float32] * 4 + [torch.float64] * 2
                           + [torch.bfloat16, torch.float16])
        many = False
        if i < 4:
            dtype = [torch.float32, torch.float64, torch.bfloat16, torch.float16][i]
        elif i in (4, 5):
            many = True
        n_groups = rng.choice([1, 2, 3])
        all_specs = []
        if many:
            all_specs = [(rng.choice(TINY_SHAPES), "contiguous") for _ in range(MANY)]
        else:
            all_specs = rng.sample(SMALL_SPECS, rng.randint(4, len(SMALL_SPECS)))
            all_specs += rng.sample(LARGE_SPECS, rng.randint(0, 2))
            if i in (6, 7) or rng.random() < 0.05:
                all_specs.append(PARALLEL_SPEC)
            rng.shuffle(all_specs)
        # Split the specs into groups (every group gets at least one).
        cuts = sorted(rng.sample(range(1, len(all_specs)), n_groups - 1))
        bounds = [0, *cuts, len(all_specs)]
        groups = [_group(rng, dtype, kind, all_specs[a:b], against)
                  for a, b in zip(bounds, bounds[1:])]
        grad_std = rng.choice([0.01, 0.1, 1.0])
        # float16 keeps v = (1 - beta2) g^2 in its normal range (>= 6.1e-5), as a
        # float16 user must: below it v is subnormal, and torch's two roundings
        # (v * beta2, then + (1 - beta2) g^2) against fusedclip's one differ by a
        # large part of v. So float16 gradients are at least 0.5 from zero and
        # clipping scales them by at least ~0.5.
        # (The float64 reference rounds v once, as fusedclip does, so it needs
        # no such care.)
        grad_floor = 0.5 if dtype == torch.float16 and against == "torch" else 0.0
        clip = _clip(rng, dtype, all_specs, grad_std, grad_floor, against)
        # Now and then betas and eps come from the constructor instead of the
        # groups (the groups that share the first group's values leave them out).
        defaults = {}
        if rng.random() < 0.3:
            defaults = {"betas": groups[0]["betas"], "eps": groups[0]["eps"]}
            for group in groups:
                for key, value in defaults.items():
                    if group[key] == value:
                        del group[key]
        config = {
            "kind": kind,
            "problem": Problem(
                groups=groups, dtype=dtype, grad_std=grad_std, grad_floor=grad_floor,
                grad_layout=rng.choice(["contiguous", "like_param"]),
                none_prob=rng.choice([0.0, 0.0, 0.2]),
                seed=1000 + i,
            ),
            "clip": clip,
            "steps": rng.randint(10, 14),
            # Constructor arguments: what the groups leave out comes from here,
            # or from torch's defaults.
            "defaults": defaults,
        }
        tensor_lr = any(isinstance(g.get("lr"), str) for g in groups)
        flags = [
            f"{i:02d}", kind, DTYPE_NAMES[dtype], _clip_name(clip), f"{n_groups}g",
            f"{len(all_specs)}t", f"{config['steps']}steps",
        ]
        flags += ["lrT"] if tensor_lr else []
        flags += ["ams"] if any(g["amsgrad"] for g in groups) else []
        flags += ["max"] if any(g["maximize"] for g in groups) else []
        flags += ["decoupled"] if any(g.get("decoupled_weight_decay") for g in groups) else []
        flags += ["gradlike"] if config["problem"].grad_layout == "like_param" else []
        flags += ["nonegrad"] if config["problem"].none_prob else []
        flags += ["ctor"] if defaults else []
        configs.append(pytest.param(config, id="-".join(flags)))
    return configs


# -- the `cuda` marker: tools/gpu_check.sh runs the CUDA tests first with `-m cuda` ------------
def pytest_collection_modifyitems(config, items):
    config.addinivalue_line("markers", "cuda: runs on a CUDA device (added by conftest)")
    for item in items:
        params = getattr(item, "callspec", None)
        values = params.params.values() if params is not None else ()
        if "cuda" in item.nodeid.split("::")[0].rsplit("/", 1)[-1] or any(
                (isinstance(v, (str, torch.device)) and str(v).startswith("cuda")) for v in values):
            item.add_marker(pytest.mark.cuda)

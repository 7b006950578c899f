"""Clipped gradient descent against the best fixed step on an (L0, L1)-smooth problem.

f(x) = sum_i cosh(a_i x_i) with a = (1, 2, 4) is exactly (L0, L1)-smooth with
L0 = max a_i^2 = 16 and L1 = max a_i = 4 (Zhang, He, Sra & Jadbabaie 2020):
its curvature a_i^2 cosh(a_i x_i) grows with its gradient a_i sinh(a_i x_i).

1. fusedclip.tune.estimate_smoothness measures (L0, L1) from the farthest start,
   against the true constants.
2. From several starts, gradient descent with the suggested clipping
   (FusedClipSGD, lr = 1/L0, clip = GlobalNorm(L0/L1) or SmoothClip(L0/L1)) races
   gradient descent with the best fixed step of a grid: steps until
   f(x) - f* <= target.

    python examples/l0l1_clipping.py            # the README's numbers and plot
    python examples/l0l1_clipping.py --fast     # a few seconds (CI)

Writes l0l1_clipping.png (docs/img/ by default; a temporary folder with --fast).
"""

from __future__ import annotations

import math
import sys
import time

import torch

import _common
import fusedclip
from fusedclip import tune

A = (1.0, 2.0, 4.0)
TRUE_L0, TRUE_L1 = max(A) ** 2, max(A)
F_STAR = float(len(A))  # cosh(0) = 1 per coordinate
STARTS = (0.5, 1.0, 2.0, 3.0)  # x0 = c * (1, 1, 1)
TARGET = 1e-6  # f(x) - f* at which a run has arrived


class Vector(torch.nn.Module):
    def __init__(self, x0) -> None:
        super().__init__()
        self.x = torch.nn.Parameter(torch.as_tensor(x0, dtype=torch.float64).clone())


def loss_fn(model, batch):
    return torch.cosh(torch.tensor(A, dtype=torch.float64) * model.x).sum()


def fixed_step_grid(c: float, steps: torch.Tensor, max_steps: int):
    """Gradient descent with every fixed step of the grid at once (rows of X):
    the steps each needs to reach the target (None if it did not in max_steps,
    "diverged" if it blew up), the gap f - f* each ended at, and the loss curve
    of each."""
    a = torch.tensor(A, dtype=torch.float64)
    x = torch.full((len(steps), len(A)), c, dtype=torch.float64)
    h = steps.to(torch.float64).unsqueeze(1)
    reached = [None] * len(steps)
    alive = torch.ones(len(steps), dtype=torch.bool)
    curves = [[] for _ in steps]
    # the plot's points: every step up to 200, then 100 per decade
    record = set(range(201)) | {int(round(10 ** (k / 100))) for k in range(700)}
    for t in range(max_steps + 1):
        gap = torch.cosh(a * x).sum(1) - F_STAR
        finite = torch.isfinite(gap)
        if t in record:
            for i, g in enumerate(gap.tolist()):
                curves[i].append((t, g))
        done = (gap <= TARGET) & finite
        for i in torch.nonzero(done & alive).flatten().tolist():
            reached[i] = t
        for i in torch.nonzero(~finite & alive).flatten().tolist():
            reached[i] = "diverged"
        alive &= ~done & finite
        if not bool(alive.any()) or t == max_steps:
            break
        with torch.no_grad():
            x = torch.where(alive.unsqueeze(1), x - h * a * torch.sinh(a * x), x)
    return reached, gap.tolist(), curves, x


def fixed_step_alone(c: float, h: float, start_step: int, x_start, limit: int):
    """One fixed-step run continued in plain Python floats from x_start (the
    grid's point after start_step steps) until the target or ``limit`` steps."""
    x = list(x_start)
    for t in range(start_step, limit + 1):
        gap = sum(math.cosh(a * xi) for a, xi in zip(A, x)) - F_STAR
        if gap <= TARGET:
            return t
        x = [xi - h * a * math.sinh(a * xi) for a, xi in zip(A, x)]
    return None


def clipped_run(c: float, lr: float, clip, max_steps: int):
    """FusedClipSGD from x0 = c (1, 1, 1): steps to the target and the loss curve."""
    model = Vector([c] * len(A))
    opt = fusedclip.FusedClipSGD(model.parameters(), lr=lr, clip=clip)
    curve = []
    for t in range(max_steps + 1):
        opt.zero_grad()
        loss = loss_fn(model, None)
        gap = float(loss.detach()) - F_STAR
        curve.append(gap)
        if not math.isfinite(gap):
            return "diverged", curve
        if gap <= TARGET:
            return t, curve
        if t == max_steps:
            return None, curve
        loss.backward()
        opt.step()
    return None, curve


def fmt_steps(value, max_steps: int) -> str:
    if value is None:
        return f"> {max_steps}"
    return str(value)


def main(argv=None) -> int:
    parser = _common.parser(__doc__)
    return _common.run_with_threads(run, parser.parse_args(argv))


def run(args) -> int:
    out = _common.output_dir(args)
    max_steps = 2000 if args.fast else 100_000
    grid = torch.logspace(-8, 0, 9 if args.fast else 49)  # 6 per decade in full mode
    starts = STARTS[-2:] if args.fast else STARTS
    t0 = time.perf_counter()

    # 1. the estimate, from the farthest start
    far = Vector([max(starts)] * len(A))
    est = tune.estimate_smoothness(far, loss_fn, [None], steps=20 if args.fast else 60,
                                   progress=False)
    s = est.suggest()
    print(f"f(x) = sum cosh(a_i x_i), a = {A}; estimate from x0 = {max(starts)} (1, 1, 1), "
          f"{len(est.grad_norms)} trajectory points")
    print()
    print("| constant | true | estimated | estimated / true |")
    print("|---|---|---|---|")
    print(f"| L0 | {TRUE_L0:g} | {est.L0:.3f} | {est.L0 / TRUE_L0:.3f} |")
    print(f"| L1 | {TRUE_L1:g} | {est.L1:.3f} | {est.L1 / TRUE_L1:.3f} |")
    print(f"| L0/L1 | {TRUE_L0 / TRUE_L1:g} | {est.threshold:.3f} | "
          f"{est.threshold / (TRUE_L0 / TRUE_L1):.3f} |")
    print(f"\nsuggest(): clip={s.clip!r}, max_norm={s.max_norm:.4g}, lr={s.lr:.4g}")

    # 2. the race
    methods = [
        ("GD + GlobalNorm(L0/L1), lr 1/L0", s.lr, fusedclip.GlobalNorm(s.max_norm)),
        ("GD + SmoothClip(L0/L1), lr 1/L0", s.lr, s.clip),
    ]
    print(f"\nsteps until f(x) - f* <= {TARGET:g} (at most {max_steps}); the fixed step is the "
          f"best of {len(grid)} on a log grid 1e-8 .. 1")
    print()
    print("| x0 | ‖∇f(x0)‖ | best fixed step | its steps | " + " | ".join(m[0] for m in methods)
          + " |")
    print("|---|---|---|---|" + "---|" * len(methods))
    curves_far = {}
    for c in starts:
        reached, final_gap, fixed_curves, x_end = fixed_step_grid(c, grid, max_steps)
        finished = [(r, i) for i, r in enumerate(reached) if isinstance(r, int)]
        if finished:
            best_steps, best_i = min(finished)
            best = (f"{float(grid[best_i]):.3g}", str(best_steps))
        else:
            # none arrived: the best is the one that got closest
            ok = [i for i, r in enumerate(reached) if r != "diverged"]
            best_i = min(ok, key=lambda i: final_gap[i]) if ok else None
            best = ((f"{float(grid[best_i]):.3g}" if best_i is not None else "none"),
                    f"> {max_steps} (gap {final_gap[best_i]:.2g})" if best_i is not None
                    else f"> {max_steps}")
            if best_i is not None and not args.fast:
                # how far it still had to go: that step alone, continued
                more = fixed_step_alone(c, float(grid[best_i]), max_steps,
                                        x_end[best_i].tolist(), 30 * max_steps)
                if more is not None:
                    best = (best[0], f"{more} (continued alone past {max_steps})")
        runs = [clipped_run(c, lr, clip, max_steps) for _, lr, clip in methods]
        g0 = float(torch.linalg.vector_norm(torch.tensor(A) * torch.sinh(torch.tensor(A) * c)))
        print(f"| {c:g} (1, 1, 1) | {g0:.3g} | {best[0]} | {best[1]} | "
              + " | ".join(fmt_steps(r, max_steps) for r, _ in runs) + " |")
        if c == max(starts):
            curves_far = {"fixed": (float(grid[best_i]), fixed_curves[best_i])
                          if best_i is not None else None,
                          "runs": [(m[0], curve) for m, (_, curve) in zip(methods, runs)]}

    # 3. the plot
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12.5, 4.6), layout="constrained")
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    est.plot(ax=ax1, true_constants=(TRUE_L0, TRUE_L1),
             title=f"cosh problem, a = {A}: measured smoothness")
    c = max(starts)
    if curves_far.get("fixed"):
        h, curve = curves_far["fixed"]
        shown = [(t, v) for t, v in curve if v > 0 and math.isfinite(v)]
        ax2.plot([t + 1 for t, _ in shown], [v for _, v in shown], color="k",
                 label=f"GD, best fixed step {h:.3g} (first {max_steps} steps)")
    for (name, curve), color in zip(curves_far.get("runs", []), ("C0", "C1")):
        shown = [(t, v) for t, v in enumerate(curve) if v > 0 and math.isfinite(v)]
        ax2.plot([t + 1 for t, _ in shown], [v for _, v in shown], color=color, label=name)
    ax2.axhline(TARGET, color="grey", ls=":", lw=1, label=f"target {TARGET:g}")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("step + 1")
    ax2.set_ylabel("f(x) - f*")
    ax2.set_title(f"from x0 = {c:g} (1, 1, 1)")
    ax2.legend(fontsize=8)
    ax2.grid(True, which="both", alpha=0.3)
    path = out / "l0l1_clipping.png"
    fig.savefig(path, dpi=110)
    print(f"\nwrote {path} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Why Adagrad helps on an ill-scaled problem: its step shrinks where the gradients are large.

f(x) = 1/2 sum_i h_i (x_i - xi_i)^2 with curvatures h = (100, 10, 1, 0.1), from
x0 = (1, 1, 1, 1), where each step draws the noise xi ~ N(0, 0.01^2) afresh (its
gradient noise scales with the curvature, as in a least-squares problem); the
excess loss is f(x) - f* = 1/2 sum_i h_i x_i^2.
Gradient descent has one step size for every coordinate, and it must stay under
2 / max h = 0.02 or the stiff coordinate blows up, so the flat one (h = 0.1) moves by
a factor (1 - 0.1 lr) per step. Adagrad divides each coordinate's step by the root of
its summed squared gradients: lr / (sqrt(sum_s g_i,s^2) + eps). Where gradients are
large (stiff coordinates) the step is small, where they are small it is large: the
effective step of coordinate i is about c / h_i, a diagonal preconditioner found from
the gradients alone. The noise adds to the sums, so every step also shrinks over
time (slowly here, where the first, large gradients dominate the sums).

Both optimizers get their learning rate from fusedclip.tune.find_lr (FusedClipSGD,
FusedClipAdagrad); the plot shows each coordinate's effective step lr / (sqrt(sum) +
eps), read from Adagrad's state, against SGD's single lr, and the loss of both.

    python examples/adagrad_intuition.py            # the README's numbers and plot
    python examples/adagrad_intuition.py --fast     # a few seconds (CI)

Writes adagrad_intuition.png (docs/img/ by default; a temporary folder with --fast).
"""

from __future__ import annotations

import sys
import time

import torch

import _common
import fusedclip
from fusedclip import tune

H = (100.0, 10.0, 1.0, 0.1)
NOISE = 0.01


class Vector(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.x = torch.nn.Parameter(torch.ones(len(H), dtype=torch.float64))


def loss_fn(model, batch):
    """One noisy sample of the loss; ``batch`` is the noise xi."""
    return 0.5 * (torch.tensor(H, dtype=torch.float64) * (model.x - batch) ** 2).sum()


def excess(model) -> float:
    return 0.5 * float((torch.tensor(H, dtype=torch.float64) * model.x.detach() ** 2).sum())


def noise(steps: int) -> list:
    gen = torch.Generator().manual_seed(0)
    return [NOISE * torch.randn(len(H), generator=gen, dtype=torch.float64) for _ in range(steps)]


def optimize(optimizer_cls, lr: float, batches: list):
    """Excess loss per step, |x_i| per step and the effective step per coordinate."""
    model = Vector()
    opt = optimizer_cls(model.parameters(), lr=lr)
    losses, xs, eff = [], [], []
    for batch in batches:
        opt.zero_grad()
        losses.append(excess(model))
        xs.append(model.x.detach().abs().tolist())
        loss_fn(model, batch).backward()
        opt.step()
        state = opt.state[model.x]
        if "sum" in state:  # Adagrad: the step it just took per coordinate
            group = opt.param_groups[0]
            eff.append((group["lr"] / (state["sum"].sqrt() + group["eps"])).tolist())
        else:
            eff.append([lr] * len(H))
    return losses, xs, eff


def main(argv=None) -> int:
    parser = _common.parser(__doc__)
    return _common.run_with_threads(run, parser.parse_args(argv))


def run(args) -> int:
    out = _common.output_dir(args)
    steps = 60 if args.fast else 2000
    probe = 5 if args.fast else 20
    t0 = time.perf_counter()

    batches = noise(steps)
    lrs = {}
    for name, cls in (("SGD", fusedclip.FusedClipSGD), ("Adagrad", fusedclip.FusedClipAdagrad)):
        found = tune.find_lr(Vector(), loss_fn, batches, optimizer_cls=cls, steps=probe,
                             progress=False)
        lrs[name] = found.lr
        print(f"find_lr, {cls.__name__}: edge {found.edge:.3g}, suggestion {found.lr:.3g} "
              f"({len(found.probes)} probes of {probe} steps)")
    sgd = optimize(fusedclip.FusedClipSGD, lrs["SGD"], batches)
    ada = optimize(fusedclip.FusedClipAdagrad, lrs["Adagrad"], batches)
    print(f"\nSGD's stability limit 2/max h = {2 / max(H):g}; f(x0) - f* = {sgd[0][0]:g}")

    checkpoints = [t for t in (1, 10, 100, 1000) if t <= steps]
    print("\neffective step per coordinate (times its curvature h_i: SGD is stable only where "
          "this is < 2)\n")
    print("| coordinate | h_i | SGD lr·h_i | " +
          " | ".join(f"Adagrad step·h_i, t={t}" for t in checkpoints) +
          " |")
    print("|---|---|---|" + "---|" * len(checkpoints))
    for i, h in enumerate(H):
        ada_steps = " | ".join(f"{ada[2][t - 1][i] * h:.3g}" for t in checkpoints)
        print(f"| {i} | {h:g} | {lrs['SGD'] * h:.3g} | {ada_steps} |")
    print("\n| step | " + " | ".join(f"\\|x_{i}\\|, SGD / Adagrad" for i in range(len(H)))
          + " | f - f*, SGD | f - f*, Adagrad |")
    print("|---|" + "---|" * len(H) + "---|---|")
    for t in checkpoints + ([steps] if steps not in checkpoints else []):
        cells = " | ".join(f"{sgd[1][t - 1][i]:.1e} / {ada[1][t - 1][i]:.1e}"
                           for i in range(len(H)))
        print(f"| {t} | {cells} | {sgd[0][t - 1]:.2e} | {ada[0][t - 1]:.2e} |")

    from matplotlib.figure import Figure

    fig = Figure(figsize=(12.5, 4.4), layout="constrained")
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    t = list(range(1, steps + 1))
    for i, h in enumerate(H):
        ax1.plot(t, [e[i] for e in ada[2]], color=f"C{i}", label=f"Adagrad, h = {h:g}")
    ax1.axhline(lrs["SGD"], color="k", ls="--",
                label=f"SGD, every coordinate (lr {lrs['SGD']:.3g})")
    ax1.axhline(2 / max(H), color="grey", ls=":", label="SGD's limit 2 / max h")
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel("step")
    ax1.set_ylabel("effective step size  lr / (√Σg² + eps)")
    ax1.set_title("Adagrad's per-coordinate step: small where gradients are large")
    ax1.legend(fontsize=8)
    ax1.grid(True, which="both", alpha=0.3)
    window = 20
    for curve, color, label in ((sgd[0], "k", f"SGD, lr {lrs['SGD']:.3g}"),
                                (ada[0], "C3", f"Adagrad, lr {lrs['Adagrad']:.3g}")):
        ax2.plot(t, curve, color=color, lw=0.5, alpha=0.35)
        # a running mean whose window grows to `window` steps (raw at the start, on log axes)
        mean = []
        for k in range(len(curve)):
            w = max(1, min(window, (k + 1) // 5))
            mean.append(sum(curve[k + 1 - w:k + 1]) / w)
        ax2.plot(t, mean, color=color, lw=2, label=f"{label} (running mean, up to {window})")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("step")
    ax2.set_ylabel("f(x) - f*")
    ax2.set_title(f"f(x) = ½ Σ h_i (x_i - ξ_i)², h = {H}, ξ ~ N(0, {NOISE}²)")
    ax2.legend(fontsize=8)
    ax2.grid(True, which="both", alpha=0.3)
    path = out / "adagrad_intuition.png"
    fig.savefig(path, dpi=110)
    print(f"\nwrote {path} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Gradient spikes and a non-finite step: what each clip policy does with them.

A small MLP learns a synthetic 5-class problem with FusedClipAdamW. Into its
gradients go a few spikes (every gradient multiplied by 1e4, as a bad batch or a
loss-scale accident would) and, once, a NaN. The runs differ only in clip= and
nonfinite=:

- no clipping, nonfinite="propagate" (what torch.optim does: the NaN reaches the weights)
- no clipping, nonfinite="skip" (fusedclip's default: the NaN step changes nothing)
- GlobalNorm(1.0), ZClip(), AdaGC(), SpikeClip(theta=5000.0), all with nonfinite="skip"

Adam normalises its update by the root of its second moment v, so one spike hurts
twice: the step it takes is large, and the inflated v (decaying with beta2 = 0.999)
then shrinks every step for the next thousand or so.

    python examples/spikes.py            # the README's numbers and plot
    python examples/spikes.py --fast     # a few seconds (CI)

Writes spikes.png (docs/img/ by default; a temporary folder with --fast).
"""

from __future__ import annotations

import math
import sys
import time

import torch
import torch.nn.functional as F

import _common
import fusedclip

LR = 3e-3
SPIKE = 1e4
BATCH = 64


def make_data(n_train: int, n_test: int, seed: int = 0):
    """Inputs and labels of a noisy linear teacher: (train, test)."""
    gen = torch.Generator().manual_seed(seed)
    n = n_train + n_test
    x = torch.randn(n, 20, generator=gen)
    teacher = torch.randn(20, 5, generator=gen)
    y = (x @ teacher + 0.5 * torch.randn(n, 5, generator=gen)).argmax(1)
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 5))


def policies() -> list:
    runs = [
        ("no clipping, nonfinite='propagate'", None, "propagate"),
        ("no clipping, nonfinite='skip'", None, "skip"),
        ("GlobalNorm(1.0)", fusedclip.GlobalNorm(1.0), "skip"),
        ("ZClip()", fusedclip.ZClip(), "skip"),
        ("AdaGC()", fusedclip.AdaGC(), "skip"),
    ]
    runs.append(("SpikeClip(theta=5000.0)", fusedclip.SpikeClip(theta=5000.0), "skip"))
    return runs


def train(model, clip, nonfinite: str, data, test, steps: int, spikes: set, nan_step: int):
    """Training loss per step, the test loss at the end, and the steps skipped."""
    x, y = data
    opt = fusedclip.FusedClipAdamW(model.parameters(), lr=LR, weight_decay=0.0, clip=clip,
                                   nonfinite=nonfinite)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for t in range(steps):
        idx = torch.randint(0, len(x), (BATCH,), generator=gen)
        opt.zero_grad()
        loss = F.cross_entropy(model(x[idx]), y[idx])
        losses.append(float(loss.detach()))
        loss.backward()
        if t in spikes:
            for p in model.parameters():
                p.grad.mul_(SPIKE)
        if t == nan_step:
            next(model.parameters()).grad.view(-1)[0] = math.nan
        opt.step()
    with torch.no_grad():
        test_loss = float(F.cross_entropy(model(test[0]), test[1]))
    skipped = int(opt.clip_stats["skipped"]) if "skipped" in opt.clip_stats else 0
    return losses, test_loss, skipped


def mean(values) -> float:
    return sum(values) / len(values)


def main(argv=None) -> int:
    parser = _common.parser(__doc__, "torch threads (default 1: the model is tiny)")
    return _common.run_with_threads(run, parser.parse_args(argv))


def run(args) -> int:
    out = _common.output_dir(args)
    steps = 60 if args.fast else 1500
    # spikes and the NaN at fixed fractions of the run
    spikes = {int(steps * f) for f in (0.2, 0.4, 0.401, 0.6)}
    nan_step = int(steps * 0.3)
    t0 = time.perf_counter()
    data, test = make_data(4000, 1000)
    init = make_model()

    print(f"FusedClipAdamW(lr={LR}), {steps} steps of batches of {BATCH}; gradients x{SPIKE:g} at "
          f"steps {sorted(spikes)}, a NaN gradient at step {nan_step}\n")
    results = []
    for name, clip, nonfinite in policies():
        model = make_model()
        model.load_state_dict(init.state_dict())
        results.append((name, *train(model, clip, nonfinite, data, test, steps, spikes, nan_step)))

    first = min(spikes)
    before = slice(max(0, first - steps // 10), first)
    print("| run | train loss before the first spike | train loss, last 10% of steps | "
          "largest train loss after the first spike | test loss | steps skipped |")
    print("|---|---|---|---|---|---|")
    for name, losses, test_loss, skipped in results:
        last = losses[-max(1, steps // 10):]
        after = [v for v in losses[first:] if math.isfinite(v)]
        peak = f"{max(after):.3g}" if after else "nan"
        print(f"| {name} | {mean(losses[before]):.3f} | {mean(last):.3f} | {peak} | "
              f"{test_loss:.3f} | {skipped} |")

    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 5.2), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    window = max(1, steps // 100)
    styles = ["-", "-", "-", "--", ":", "-."]
    for k, (name, losses, _, _) in enumerate(results):
        smooth = []
        for i in range(len(losses)):
            chunk = losses[max(0, i - window + 1):i + 1]
            smooth.append(mean(chunk) if all(math.isfinite(v) for v in chunk) else math.nan)
        lw = 4 if k == 0 else 1.5  # the first run hides under the second until its NaN
        ax.plot(range(len(smooth)), smooth, styles[k % len(styles)], color=f"C{k}", lw=lw,
                alpha=0.6 if k == 0 else 1.0, label=name)
        finite = [i for i, v in enumerate(losses) if math.isfinite(v)]
        if len(finite) < len(losses):  # where the loss turned NaN for good
            end = finite[-1] if finite else 0
            ax.plot([end], [smooth[end] if math.isfinite(smooth[end]) else losses[end]], "X",
                    color=f"C{k}", ms=12)
            ax.annotate("loss NaN from here on", (end, losses[end]), textcoords="offset points",
                        xytext=(8, 12), color=f"C{k}", fontsize=9)
    for s in sorted(spikes):
        ax.axvline(s, color="grey", ls=":", lw=1)
    ax.axvline(nan_step, color="red", ls="--", lw=1, label="NaN gradient")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (mean of the last {window} steps)")
    ax.set_title(f"gradient spikes (x{SPIKE:g}, dotted) and a NaN gradient: FusedClipAdamW")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    path = out / "spikes.png"
    fig.savefig(path, dpi=110)
    print(f"\nwrote {path} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tune, then train: a small network on scikit-learn's bundled digits data (no download).

1. fusedclip.tune.find_lr picks the learning rate of FusedClipAdamW (short probes
   from Adam's conventional 1e-3 to the edge of stability, half of it);
2. fusedclip.tune.estimate_smoothness measures (L0, L1) along AdamW's own trajectory
   at that rate and picks the clip threshold L0/L1 (as a GlobalNorm max_norm);
3. FusedClipAdamW(lr, clip=max_norm) trains (the lr decayed to 0 on a cosine, as
   usual), beside torch.optim.AdamW +
   torch.nn.utils.clip_grad_norm_ with the same settings, the same initial weights and
   the same batches (the two should agree to float32 rounding), and beside the guessed
   defaults lr=1e-3, max_norm=1.0.

    python examples/train_digits.py            # the README's numbers and plot
    python examples/train_digits.py --fast     # a few seconds (CI)

Needs scikit-learn (pip install scikit-learn). Writes train_digits.png (docs/img/ by
default; a temporary folder with --fast).
"""

from __future__ import annotations

import copy
import sys
import time

import torch
import torch.nn.functional as F

import _common
import fusedclip
from fusedclip import tune

BATCH = 64
WEIGHT_DECAY = 1e-2


def load(seed: int = 0):
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("train_digits.py needs scikit-learn: pip install scikit-learn") from None
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_train = int(0.8 * len(x))
    train, test = perm[:n_train], perm[n_train:]
    return (x[train], y[train]), (x[test], y[test])


def epoch_batches(data, epoch: int) -> list:
    x, y = data
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1000 + epoch))
    return [(x[perm[i:i + BATCH]], y[perm[i:i + BATCH]]) for i in range(0, len(x), BATCH)]


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def accuracy(model, data) -> float:
    x, y = data
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def train(model, train_data, test_data, epochs: int, lr: float, max_norm, fused: bool):
    """Per-step training losses, the test accuracy after each epoch, and the
    fraction of steps whose gradients were clipped."""
    model = copy.deepcopy(model)
    if fused:
        opt = fusedclip.FusedClipAdamW(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY,
                                       clip=max_norm)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    total = epochs * len(epoch_batches(train_data, 0))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    losses, accs, clipped = [], [], 0
    for epoch in range(epochs):
        for batch in epoch_batches(train_data, epoch):
            opt.zero_grad()
            loss = loss_fn(model, batch)
            loss.backward()
            if fused:
                opt.step()
                if max_norm is not None:
                    clipped += int(float(opt.clip_stats["clip_coef"]) < 1.0)  # a sync, fine here
            else:
                if max_norm is not None:
                    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
                    clipped += int(float(norm) > max_norm)
                opt.step()
            schedule.step()
            losses.append(float(loss.detach()))
        accs.append(accuracy(model, test_data))
    return losses, accs, clipped / max(len(losses), 1)


def main(argv=None) -> int:
    parser = _common.parser(__doc__)
    return _common.run_with_threads(run, parser.parse_args(argv))


def run(args) -> int:
    out = _common.output_dir(args)
    epochs = 1 if args.fast else 30
    probe_steps = 4 if args.fast else 20
    smooth_steps = 4 if args.fast else 60
    t0 = time.perf_counter()

    train_data, test_data = load()
    model = make_model()
    batches = epoch_batches(train_data, 0) * 3  # 69 batches, reused cyclically if short
    print(f"digits: {len(train_data[0])} training and {len(test_data[0])} test images, "
          f"batches of {BATCH}, MLP 64-128-10 ({sum(p.numel() for p in model.parameters())} "
          "parameters)\n")

    # 1. the learning rate
    found = tune.find_lr(model, loss_fn, batches, optimizer_cls=fusedclip.FusedClipAdamW,
                         optimizer_kwargs={"weight_decay": WEIGHT_DECAY}, steps=probe_steps,
                         progress=False)
    lr = found.lr
    print(f"find_lr (FusedClipAdamW, {probe_steps}-step probes):")
    print("| lr | status | loss before | loss after |")
    print("|---|---|---|---|")
    for p in found.probes:
        print(f"| {p.lr:.3g} | {p.status} | {p.before:.3f} | {p.after:.3f} |")
    print(f"edge of stability {found.edge:.3g}, suggestion lr = {lr:.3g}\n")

    # 2. the clip threshold, along AdamW's trajectory at that lr
    est = tune.estimate_smoothness(
        model, loss_fn, batches, steps=smooth_steps, progress=False,
        optimizer=lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=WEIGHT_DECAY))
    sug = est.suggest()
    max_norm = sug.max_norm
    print(f"estimate_smoothness ({len(est.grad_norms)} points along AdamW at lr {lr:.3g}): "
          f"L0 = {est.L0:.4g}, L1 = {est.L1:.4g}, threshold L0/L1 = {est.threshold:.4g}; "
          f"gradient norms {min(est.grad_norms):.3g} .. {max(est.grad_norms):.3g}")
    print(f"clip: GlobalNorm(max_norm={max_norm if max_norm is None else f'{max_norm:.4g}'})\n")

    # 3. training
    runs = {
        "FusedClipAdamW, tuned": train(model, train_data, test_data, epochs, lr, max_norm, True),
        "torch AdamW + clip_grad_norm_, tuned": train(model, train_data, test_data, epochs, lr,
                                                      max_norm, False),
        "FusedClipAdamW, tuned lr, no clipping": train(model, train_data, test_data, epochs, lr,
                                                       None, True),
        "FusedClipAdamW, guessed (lr 1e-3, max_norm 1.0)": train(model, train_data, test_data,
                                                                epochs, 1e-3, 1.0, True),
    }
    steps_per_epoch = len(epoch_batches(train_data, 0))
    print(f"training: {epochs} epochs of {steps_per_epoch} steps, cosine decay of the lr to 0\n")
    print("| run | lr | max_norm | steps clipped | train loss, last epoch | test accuracy |")
    print("|---|---|---|---|---|---|")
    settings = [(lr, max_norm), (lr, max_norm), (lr, None), (1e-3, 1.0)]
    for (name, (losses, accs, frac)), (run_lr, run_norm) in zip(runs.items(), settings):
        last = losses[-steps_per_epoch:]
        print(f"| {name} | {run_lr:.3g} | {run_norm if run_norm is None else f'{run_norm:.3g}'} | "
              f"{100 * frac:.0f}% | {sum(last) / len(last):.4f} | {100 * accs[-1]:.1f}% |")
    fused, ref = runs["FusedClipAdamW, tuned"][0], runs["torch AdamW + clip_grad_norm_, tuned"][0]
    diffs = [abs(a - b) for a, b in zip(fused, ref)]
    early = min(3 * steps_per_epoch, len(diffs))
    apart = next((k for k, d in enumerate(diffs) if d > 1e-3), None)
    print(f"\nFusedClipAdamW against torch AdamW + clip_grad_norm_: the loss curves differ by at "
          f"most {max(diffs[:early]):.1e} over the first {early} steps (float32 rounding); "
          + ("they never differ by more than 1e-3" if apart is None else
             f"the rounding differences grow until they first differ by more than 1e-3 at step "
             f"{apart + 1}, and by {max(diffs):.2g} at most"))

    from matplotlib.figure import Figure

    fig = Figure(figsize=(17, 4.6), layout="constrained")
    ax1, ax2, ax3 = (fig.add_subplot(1, 3, k) for k in (1, 2, 3))
    found.plot(axes=(None, ax1))
    ax1.set_title(f"find_lr: FusedClipAdamW, suggestion {lr:.3g}")
    est.plot(ax=ax2, title="estimate_smoothness along AdamW")
    for (name, (losses, _, _)), style in zip(runs.items(), ("-", "--", "-", "-")):
        window = steps_per_epoch
        mean = [sum(losses[max(0, k - window + 1):k + 1]) / (k + 1 - max(0, k - window + 1))
                for k in range(len(losses))]
        ax3.plot(range(1, len(mean) + 1), mean, style, lw=2 if style == "-" else 1.5,
                 label=name)
    ax3.set_yscale("log")
    ax3.set_xlabel("step")
    ax3.set_ylabel(f"training loss (mean of the last {steps_per_epoch} steps)")
    ax3.set_title("training (torch's curve dashed)")
    ax3.legend(fontsize=8)
    ax3.grid(True, which="both", alpha=0.3)
    path = out / "train_digits.png"
    fig.savefig(path, dpi=110)
    print(f"\nwrote {path} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training in bfloat16: why pure bf16 stalls, and what fusedclip's precision options do about it.

A small character-level transformer learns to write Python from the standard
library's own sources (a fixed list of modules read from the running Python's
lib folder: nothing downloaded). It trains the same number of steps, from the
same weights on the same batches, five ways, all with FusedClipAdamW(clip=1.0):

- fp32: float32 parameters and state (the yardstick)
- pure bf16: the model in bfloat16, state in bfloat16, no option
- bf16 + stochastic_rounding=True: the parameter and state writes rounded stochastically
- bf16 + master_weights=True: an fp32 master copy updated in the step, the bf16
  parameter written from it (moments in fp32)
- fp32 + state_dtype=torch.bfloat16: fp32 parameters, bf16 moments

With a learning rate well below the weights' half-ulp in bfloat16 (1e-3 here:
a weight near 1.0, such as a LayerNorm scale or an embedding entry, has a bf16
half-ulp of 0.0039), most of pure bf16's updates round back to the weight they
started from, and its loss stalls above fp32's.

The parameters, gradients and optimizer state are in the run's dtypes; the
forward and backward compute in float32 by default (the bf16 parameters cast
inside the graph, so their gradients come back in bf16): a CPU without bf16
matrix units runs bf16 matrix products >10x slower, and where they round is not
what this example is about. --compute params runs them in the parameters' dtype.

    python examples/bf16_training.py            # the README's numbers and plot
    python examples/bf16_training.py --fast     # a few seconds (CI)

Writes bf16_training.png (docs/img/ by default; a temporary folder with --fast)
and prints a markdown table: the loss at the end, memory per parameter of the
parameters, optimizer state and master, and the time of the optimizer step and
of the whole training step.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from typing import NamedTuple
from pathlib import Path

import torch
import torch.nn.functional as F

import _common
import fusedclip

# The standard library modules the text comes from, in this order (each is in
# every CPython 3.8+ as a plain .py file; one missing is skipped).
SOURCES = ["argparse.py", "textwrap.py", "functools.py", "collections/__init__.py", "dataclasses.py",
           "enum.py", "pathlib.py", "inspect.py", "typing.py", "ast.py", "shutil.py", "tempfile.py",
           "subprocess.py", "threading.py", "logging/__init__.py", "json/decoder.py", "json/encoder.py",
           "random.py", "statistics.py", "fractions.py", "heapq.py", "bisect.py", "contextlib.py",
           "string.py", "difflib.py", "pprint.py", "copy.py", "tokenize.py"]
# Printable ASCII, newline and tab; anything else reads as '?'.
ALPHABET = "\n\t" + "".join(chr(c) for c in range(32, 127))

LR = 1e-3
WEIGHT_DECAY = 0.01
CLIP = 1.0
BF16 = torch.bfloat16
# name, parameter dtype, FusedClipAdamW options
RUNS = [
    ("fp32", torch.float32, {}),
    ("pure bf16", BF16, {}),
    ("bf16 + stochastic_rounding", BF16, dict(stochastic_rounding=True)),
    ("bf16 + master_weights", BF16, dict(master_weights=True)),
    ("fp32 + state_dtype=bf16", torch.float32, dict(state_dtype=BF16)),
]


def load_text(max_chars: int) -> torch.Tensor:
    """The sources as one tensor of character ids (uint8), at most max_chars."""
    lib = Path(os.path.dirname(os.__file__))
    index = {c: i for i, c in enumerate(ALPHABET)}
    unknown = index["?"]
    parts, total = [], 0
    for name in SOURCES:
        path = lib / name
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(bytes(index.get(c, unknown) for c in text))
        total += len(text)
        if total >= max_chars:
            break
    data = b"".join(parts)[:max_chars]
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


class CharTransformer(torch.nn.Module):
    """A decoder-only transformer from torch.nn's pieces: token and position
    embeddings, pre-norm encoder layers under a causal mask, a final norm and
    a linear head."""

    def __init__(self, vocab: int, context: int, width: int, layers: int, heads: int):
        super().__init__()
        self.tokens = torch.nn.Embedding(vocab, width)
        self.positions = torch.nn.Embedding(context, width)
        layer = torch.nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=0.0,
                                                 activation="gelu", batch_first=True, norm_first=True)
        self.blocks = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, vocab)
        self.register_buffer("mask", torch.nn.Transformer.generate_square_subsequent_mask(context),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        h = self.tokens(x) + self.positions.weight[:t]
        mask = self.mask[:t, :t].to(h.dtype)
        h = self.blocks(h, mask=mask, is_causal=True)
        return self.head(self.norm(h))


def batches(data: torch.Tensor, steps: int, batch: int, context: int, seed: int):
    """The same (inputs, targets) batches for every run."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        start = torch.randint(0, len(data) - context - 1, (batch,), generator=gen)
        idx = start[:, None] + torch.arange(context + 1)
        chunk = data[idx]
        yield chunk[:, :-1], chunk[:, 1:]


def memory_per_param(opt: torch.optim.Optimizer, params) -> float:
    """Bytes per parameter of the parameters and their optimizer state
    (moments, master or remainder; not the step counters or generators)."""
    total = 0
    for p in params:
        total += p.numel() * p.element_size()
        for v in opt.state[p].values():
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.numel() == p.numel():
                total += v.numel() * v.element_size()
    return total / sum(p.numel() for p in params)


class Setup(NamedTuple):
    steps: int
    batch: int
    context: int
    width: int
    layers: int
    heads: int
    chars: int
    eval_batches: int


FULL = Setup(steps=800, batch=16, context=64, width=48, layers=2, heads=4, chars=400_000, eval_batches=8)
FAST = Setup(steps=20, batch=4, context=32, width=32, layers=1, heads=2, chars=50_000, eval_batches=2)


def make_model(setup: Setup) -> CharTransformer:
    return CharTransformer(len(ALPHABET), setup.context, setup.width, setup.layers, setup.heads)


def forward(model: torch.nn.Module, x: torch.Tensor, compute: torch.dtype | None) -> torch.Tensor:
    """The model's logits, computed in `compute` (None: the parameters' own
    dtype). Casting the parameters inside the graph keeps the gradients in the
    parameters' dtype: the optimizer sees what it would see computing in it."""
    if compute is None:
        return model(x)
    weights = {name: p.to(compute) for name, p in model.named_parameters()}
    return torch.func.functional_call(model, weights, (x,))


def train(setup: Setup, init: dict, dtype, options: dict, data, held_out,
          compute: torch.dtype | None) -> dict:
    """One run from the weights `init`: the loss per step, the held-out loss at
    the end, memory per parameter and the median times."""
    torch.manual_seed(1)  # stochastic rounding's seeds come from torch's default generator
    model = make_model(setup)
    model.load_state_dict(init)
    model.to(dtype)
    params = list(model.parameters())
    opt = fusedclip.FusedClipAdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, clip=CLIP, **options)
    losses, opt_times, step_times = [], [], []
    for x, y in batches(data, setup.steps, setup.batch, setup.context, seed=2):
        start = time.perf_counter()
        logits = forward(model, x, compute)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        mid = time.perf_counter()
        opt.step()
        end = time.perf_counter()
        losses.append(loss.item())
        opt_times.append(end - mid)
        step_times.append(end - start)
    with torch.no_grad():
        held = [F.cross_entropy(forward(model, x, compute).float().flatten(0, 1), y.flatten()).item()
                for x, y in held_out]
    return {"losses": losses, "held_out": statistics.mean(held), "memory": memory_per_param(opt, params),
            "opt_ms": statistics.median(opt_times) * 1e3, "step_ms": statistics.median(step_times) * 1e3}


def main(argv=None) -> int:
    parser = _common.parser(
        __doc__, "torch threads (default 1: the model is tiny, and a second thread only waits)",
        fast_flags=("--fast", "--quick"))
    parser.add_argument("--compute", choices=["float32", "params"], default="float32",
                        help="the forward and backward's dtype: float32 (default; the bf16 parameters "
                             "cast in the graph, their gradients bf16) or the parameters' own (bf16 "
                             "matrix products: on a CPU without bf16 units, >10x slower)")
    return _common.run_with_threads(run, parser.parse_args(argv))


def run(args) -> int:
    out = _common.output_dir(args)
    setup = FAST if args.fast else FULL
    compute = torch.float32 if args.compute == "float32" else None
    t0 = time.perf_counter()
    text = load_text(setup.chars)
    split = int(0.9 * len(text))
    data, held = text[:split], text[split:]
    held_out = list(batches(held, setup.eval_batches, setup.batch, setup.context, seed=3))
    torch.manual_seed(0)
    init = make_model(setup).state_dict()
    n_params = sum(v.numel() for v in init.values())
    print(f"a character-level transformer ({setup.layers} layers, width {setup.width}, context "
          f"{setup.context}; {n_params / 1e3:.0f}k parameters) on {len(text) / 1e3:.0f}k characters of the "
          f"standard library's sources; FusedClipAdamW(lr={LR}, weight_decay={WEIGHT_DECAY}, clip={CLIP}), "
          f"{setup.steps} steps of {setup.batch} x {setup.context} characters, {torch.get_num_threads()} "
          f"threads; forward and backward in {'float32' if compute else 'the parameters dtype'}\n", flush=True)
    results = []
    for name, dtype, options in RUNS:
        results.append((name, options, train(setup, init, dtype, options, data, held_out, compute)))

    last = max(1, setup.steps // 10)
    print(f"| run | options | train loss, last {last} steps | held-out loss | memory B/param "
          f"| optimizer step ms | training step ms |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, options, r in results:
        opts = ", ".join(f"{k}={'bf16' if v is BF16 else v}" for k, v in options.items()) or "-"
        print(f"| {name} | {opts} | {statistics.mean(r['losses'][-last:]):.3f} | {r['held_out']:.3f} | "
              f"{r['memory']:.0f} | {r['opt_ms']:.2f} | {r['step_ms']:.1f} |")
    print("memory: parameters + optimizer state + master (gradients left out); times: medians over the steps")

    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 5), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    window = max(1, setup.steps // 50)
    styles = ["-", "-", "--", "-.", ":"]
    for k, (name, _, r) in enumerate(results):
        losses = r["losses"]
        smooth = [statistics.mean(losses[max(0, i - window + 1):i + 1]) for i in range(len(losses))]
        ax.plot(range(1, len(smooth) + 1), smooth, styles[k % len(styles)], color=f"C{k}",
                lw=2.5 if k == 0 else 1.5, label=name)
    finals = [statistics.mean(r["losses"][-last:]) for _, _, r in results]
    if all(math.isfinite(v) for v in finals):
        top = max(smooth_start(r["losses"], window) for _, _, r in results)
        ax.set_ylim(min(finals) - 0.1, min(top, max(finals) + 1.0))
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (mean of the last {window} steps)")
    ax.set_title(f"character-level transformer, FusedClipAdamW(lr={LR}, clip={CLIP}): bf16 precision modes")
    ax.legend()
    ax.grid(True, alpha=0.3)
    path = out / "bf16_training.png"
    fig.savefig(path, dpi=110)
    print(f"\nwrote {path} ({time.perf_counter() - t0:.1f} s)")
    return 0


def smooth_start(losses: list, window: int) -> float:
    """The smoothed loss a tenth of the way in: the plot's top (the first
    steps' loss would flatten the part that differs)."""
    i = max(window, len(losses) // 10)
    return statistics.mean(losses[max(0, i - window):i])


if __name__ == "__main__":
    sys.exit(main())

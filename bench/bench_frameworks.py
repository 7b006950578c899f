"""The optimizer step of a GPT-2-small training run under Hugging Face Trainer,
with fusedclip as users plug it in, against the docs/FRAMEWORKS.md recipe and
torch's fused AdamW with Trainer's own clipping (issue 10, item 11).

Variants, all AdamW (lr 1e-4, weight decay 0.01) on the same model:

  fusedclip, Trainer defaults   FusedClipAdamW(clip=1.0), max_grad_norm=1.0 (the
                                default): Trainer clips, then the optimizer again
  fusedclip, max_grad_norm=0    FusedClipAdamW(clip=1.0), max_grad_norm=0: one clip,
                                but Trainer still measures the norm for its log
                                with clip_grad_norm_(params, inf)
  fusedclip, recipe             as above + fusedclip.integrations.transformers.
                                prepare_trainer(trainer): the optimizer's step only
  torch fused + Trainer clip    AdamW(fused=True), max_grad_norm=1.0
  torch fused, no clip          AdamW(fused=True), max_grad_norm=0 (Trainer's
                                measuring pass included)

Each optimizer step is timed three ways: "window", from the end of the last
backward (Trainer.training_step) to the end of optimizer.step() (what the step
costs inside Trainer: its clip or norm call, the step and Trainer's bookkeeping
in between); "clip", the time in accelerator.clip_grad_norm_; "step", the
time in the optimizer's own step (from its step pre- to its post-hook).
After one untimed run (the first Trainer of a process pays one-off costs),
every round trains each variant for --warmup + --steps optimizer steps (new
optimizer, same model), in a shuffled order; the first --warmup steps of each
(state allocation) are not timed. Times are medians over all timed steps;
ratios are medians of per-round ratios of the per-round medians.

Run on an idle machine: the script prints the load average before and after.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_info, write_results  # noqa: E402

import fusedclip  # noqa: E402

VARIANTS = {
    "fusedclip_default": "fusedclip, Trainer defaults (max_grad_norm=1.0: two clips)",
    "fusedclip_mgn0": "fusedclip, max_grad_norm=0 (Trainer's norm pass)",
    "fusedclip_recipe": "fusedclip, recipe (max_grad_norm=0 + prepare_trainer)",
    "torch_fused_clip": "torch AdamW(fused=True) + Trainer's clip (max_grad_norm=1.0)",
    "torch_fused_noclip": "torch AdamW(fused=True), max_grad_norm=0 (Trainer's norm pass)",
}


def make_optimizer(name: str, params):
    if name.startswith("fusedclip"):
        return fusedclip.FusedClipAdamW(params, lr=1e-4, weight_decay=0.01, clip=1.0)
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=True)


class StepTimer:
    """Per optimizer step: window, clip and step times (seconds)."""

    def __init__(self) -> None:
        self.backward_end = None
        self.clip = 0.0
        self.step_start = None
        self.step = None
        self.records: list[dict] = []
        self.norms: list[float] = []

    def pre_hook(self, optimizer, args, kwargs):
        self.step_start = time.perf_counter()

    def post_hook(self, optimizer, args, kwargs):
        self.step = time.perf_counter() - self.step_start

    def step_done(self) -> None:
        now = time.perf_counter()
        self.records.append({"window_s": now - self.backward_end, "clip_s": self.clip,
                             "step_s": self.step})
        self.clip = 0.0


def run_variant(name: str, model, data, steps: int, warmup: int, out_dir: str) -> dict:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from fusedclip.integrations import fused_optimizer
    from fusedclip.integrations.transformers import prepare_trainer

    timer = StepTimer()

    class Timing(TrainerCallback):
        def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            timer.step_done()
            inner = fused_optimizer(optimizer)
            if inner is not None:
                timer.norms.append(float(inner.clip_stats["grad_norm"]))

    max_grad_norm = 0.0 if name in ("fusedclip_mgn0", "fusedclip_recipe", "torch_fused_noclip") else 1.0
    args = TrainingArguments(
        output_dir=out_dir, max_steps=warmup + steps, per_device_train_batch_size=1,
        max_grad_norm=max_grad_norm, logging_steps=10**9, report_to="none", use_cpu=True,
        save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, log_level="error")
    opt = make_optimizer(name, model.parameters())
    opt.register_step_pre_hook(timer.pre_hook)
    opt.register_step_post_hook(timer.post_hook)
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None),
                      callbacks=[Timing()])
    if name == "fusedclip_recipe":
        prepare_trainer(trainer)

    training_step = trainer.training_step

    def timed_training_step(*a, **k):
        loss = training_step(*a, **k)
        timer.backward_end = time.perf_counter()
        return loss

    trainer.training_step = timed_training_step
    clip = trainer.accelerator.clip_grad_norm_
    clip_calls = []

    def timed_clip(parameters, max_norm, *a, **k):
        start = time.perf_counter()
        result = clip(parameters, max_norm, *a, **k)
        timer.clip += time.perf_counter() - start
        clip_calls.append(float(max_norm))
        return result

    trainer.accelerator.clip_grad_norm_ = timed_clip
    trainer.train()
    records = timer.records[warmup:]
    assert len(records) == steps, (name, len(timer.records))
    result = {
        key: statistics.median(r[key] for r in records) for key in ("window_s", "clip_s", "step_s")
    }
    result["clip_calls_per_step"] = len(clip_calls) / (warmup + steps)
    result["clip_max_norms"] = sorted(set(clip_calls))
    result["samples"] = records
    result["load_1min_after"] = os.getloadavg()[0]
    result["grad_norms"] = timer.norms
    del trainer, opt
    model.zero_grad(set_to_none=True)
    gc.collect()
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--seq", type=int, default=16, help="tokens per sample (batch size 1)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps per run")
    parser.add_argument("--no-write", action="store_true", help="do not write bench/results/")
    args = parser.parse_args(argv)

    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    load_before = os.getloadavg()
    torch.manual_seed(0)
    config = GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=args.heads,
                        vocab_size=args.vocab, n_positions=1024, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    n_params = sum(p.numel() for p in model.parameters())
    n_tensors = sum(1 for _ in model.parameters())
    gen = torch.Generator().manual_seed(1)
    n_samples = args.warmup + args.steps
    tokens = torch.randint(0, args.vocab, (n_samples, args.seq), generator=gen)
    data = [{"input_ids": t, "labels": t} for t in tokens]
    print(f"GPT-2 ({args.layers} layers, width {args.width}, vocab {args.vocab}): "
          f"{n_params / 1e6:.1f}M params in {n_tensors} tensors; torch {torch.__version__}, "
          f"transformers {transformers.__version__}, {torch.get_num_threads()} threads; "
          f"load average before: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}")

    rng = random.Random(0)
    names = list(VARIANTS)
    per_round: list[dict] = []
    runs: dict[str, list[dict]] = {name: [] for name in names}
    out_dir = os.path.join("/tmp", f"bench_frameworks_{os.getpid()}")
    # One untimed run first: the first Trainer of a process pays one-off costs.
    run_variant("fusedclip_recipe", model, data, 1, args.warmup, out_dir)
    for r in range(args.rounds):
        order = names[:]
        rng.shuffle(order)
        medians = {}
        for name in order:
            result = run_variant(name, model, data, args.steps, args.warmup, out_dir)
            runs[name].append(result)
            medians[name] = result
            print(f"round {r + 1} {name:20s} window {result['window_s'] * 1e3:7.1f} ms  "
                  f"clip {result['clip_s'] * 1e3:6.1f} ms  step {result['step_s'] * 1e3:6.1f} ms  "
                  f"(load {result['load_1min_after']:.2f})",
                  flush=True)
        per_round.append(medians)
    load_after = os.getloadavg()

    summary = {}
    for name in names:
        samples = [s for run in runs[name] for s in run["samples"]]
        summary[name] = {
            key: statistics.median(s[key] for s in samples) for key in ("window_s", "clip_s", "step_s")
        }
        summary[name]["clip_calls_per_step"] = runs[name][0]["clip_calls_per_step"]
        summary[name]["clip_max_norms"] = runs[name][0]["clip_max_norms"]

    def ratio(a: str, b: str, key: str = "window_s") -> float:
        return statistics.median(rnd[a][key] / rnd[b][key] for rnd in per_round)

    print()
    print(f"| variant | step window ms | in clip_grad_norm_ ms | in optimizer.step ms | "
          f"clip calls / step | window / recipe |")
    print("|---|---|---|---|---|---|")
    for name in names:
        s = summary[name]
        calls = s["clip_calls_per_step"]
        norms = ", ".join("inf" if n == float("inf") else f"{n:g}" for n in s["clip_max_norms"])
        print(f"| {VARIANTS[name]} | {s['window_s'] * 1e3:.1f} | {s['clip_s'] * 1e3:.1f} | "
              f"{s['step_s'] * 1e3:.1f} | {calls:g}{f' (max_norm {norms})' if norms else ''} | "
              f"{ratio(name, 'fusedclip_recipe'):.2f}x |")
    print()
    print(f"recipe vs Trainer defaults: {1 / ratio('fusedclip_default', 'fusedclip_recipe'):.2f}x "
          f"the time ({ratio('fusedclip_default', 'fusedclip_recipe'):.2f}x faster); "
          f"torch fused + clip / recipe: {ratio('torch_fused_clip', 'fusedclip_recipe'):.2f}x")
    print(f"load average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    norms = runs["fusedclip_default"][0]["grad_norms"]
    print(f"clip_stats['grad_norm'] under Trainer defaults (first run): "
          f"{', '.join(f'{n:.3f}' for n in norms)}; with the recipe: "
          f"{', '.join(f'{n:.3f}' for n in runs['fusedclip_recipe'][0]['grad_norms'])}")

    if not args.no_write:
        payload = {
            "machine": machine_info(),
            "transformers": transformers.__version__,
            "model": {"layers": args.layers, "width": args.width, "vocab": args.vocab,
                      "params": n_params, "tensors": n_tensors, "seq": args.seq},
            "rounds": args.rounds, "steps": args.steps, "warmup": args.warmup,
            "load_average_before": load_before, "load_average_after": load_after,
            "variants": VARIANTS,
            "summary": summary,
            "ratios_window_vs_recipe": {name: ratio(name, "fusedclip_recipe") for name in names},
            "runs": runs,
        }
        print("wrote", write_results("frameworks-trainer", payload))


if __name__ == "__main__":
    main()

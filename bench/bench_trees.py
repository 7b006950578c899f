"""A/B of source trees on a shared, noisy machine: the clipped fusedclip step
over torch's unclipped fused step, per tree, measured in paired slices.

    python bench/bench_trees.py TREE [TREE ...] [--case small] [--optim adamw]
                                [--dtype float32] [--rounds 16] [--steps 5] [--threads 2]

Each TREE is a source tree with its extension built in place (a worktree of
another commit, say). One worker process per tree imports fusedclip from its
tree, makes the case's parameters (bench/common.py, the same for every tree)
(of `--dtype`: float32, bfloat16 or float16) and two optimizers over them: fusedclip's with clip=1.0 and torch's
``fused=True`` one without clipping (bench_optim.py's hyperparameters). A
slice times `--steps` pairs of steps, one of each, back to back, and reports
the median of their ratios (fusedclip / torch); the trees take turns slice by
slice, in alternating order, for `--rounds` rounds. A ratio of two steps
timed a few milliseconds apart cancels the machine's slow swings of speed,
which move absolute times by 1.5x here within minutes; a tree's result is the
median (and quartiles) of its slices. This is the fraction that issue 19's
item 6 targets (bench_optim.py prints it as "the time of torch fused without
clipping"). Prints a table; writes nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))

# Runs in the tree's directory, with the tree first on sys.path.
WORKER = r"""
import os, sys, time
sys.path.insert(0, os.getcwd())
sys.path.insert(1, {bench_dir!r})
import torch
import bench_optim, common
import fusedclip

torch.set_num_threads({threads})
family = bench_optim.FAMILIES[{optim!r}]
params = common.make_params(bench_optim.CASES[{case!r}][1](), torch.{dtype})
ours = family.fused_cls(params, clip=bench_optim.MAX_NORM, **family.hyper)
theirs = family.torch_cls(params, fused=True, **family.hyper)
for _ in range(3):
    ours.step()
    theirs.step()
print("ready", flush=True)
for line in sys.stdin:
    ratios = []
    for _ in range(int(line)):
        t0 = time.perf_counter()
        ours.step()
        t1 = time.perf_counter()
        theirs.step()
        t2 = time.perf_counter()
        ratios.append((t1 - t0) / (t2 - t1))
    print(sorted(ratios)[len(ratios) // 2], flush=True)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs="+", help="source trees with the extension built in place")
    parser.add_argument("--case", default="small", help="a case of bench_optim.py (small, gpt2)")
    parser.add_argument("--optim", default="adamw", help="a family of bench_optim.py")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="the parameters' (and so the state's) dtype")
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="pairs of steps per slice")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    code = WORKER.format(bench_dir=BENCH_DIR, threads=args.threads, optim=args.optim,
                         case=args.case, dtype=args.dtype)
    workers = []
    for tree in args.trees:
        worker = subprocess.Popen([sys.executable, "-c", code], cwd=tree, text=True,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        if worker.stdout.readline().strip() != "ready":
            sys.exit(f"bench_trees: the worker for {tree} did not start")
        workers.append(worker)
    slices: list[list[float]] = [[] for _ in workers]
    for r in range(args.rounds):
        order = range(len(workers)) if r % 2 == 0 else reversed(range(len(workers)))
        for i in order:
            workers[i].stdin.write(f"{args.steps}\n")
            workers[i].stdin.flush()
            slices[i].append(float(workers[i].stdout.readline()))
    for worker in workers:
        worker.stdin.close()
        worker.wait()

    print(f"{args.optim}, case {args.case}, {args.dtype}: fusedclip clip=1.0 step / torch fused unclipped step, "
          f"{args.rounds} slices of {args.steps} pairs per tree, {args.threads} threads")
    print(f"{'tree':<40} {'median':>7} {'q1':>7} {'q3':>7}")
    for tree, s in zip(args.trees, slices):
        q1, _, q3 = statistics.quantiles(s, n=4)
        print(f"{tree:<40} {statistics.median(s):>7.3f} {q1:>7.3f} {q3:>7.3f}")


if __name__ == "__main__":
    main()

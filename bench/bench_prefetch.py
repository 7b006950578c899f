"""Software prefetch on or off, side by side: the CPU update and norm passes
of every optimizer family with each prefetch distance, in one run.

    python bench/bench_prefetch.py [--optim adamw,sgd,adagrad] [--cases gpt2,small]
                                   [--dtypes float32,bfloat16] [--distances 0,2048]
                                   [--rounds 11]

The kernels prefetch ``fusedclip.ops.cpu_tuning()[1]`` bytes ahead of each
loop (0: not at all); the default depends on the CPU (csrc/cpu/cpu_tuning.cpp).
This script times each pass with every distance in interleaved rounds on the
same tensors, and prints each distance's time over the first one's (medians of
per-round ratios: below 1 is faster), and writes JSON under bench/results/. The
setting the process started with is restored at the end.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from bench_optim import CASES, FAMILIES  # noqa: E402

from fusedclip import ops  # noqa: E402


def with_distance(distance: int, fn):
    def run():
        ops.cpu_tuning(distance)
        fn()
    return run


def time_case(family, shapes, dtype, distances, rounds) -> dict:
    params = common.make_params(shapes, dtype)
    update = family.fused_cls(params, clip=None, nonfinite="propagate", **family.hyper)
    grads = [p.grad for p in params]
    variants = {}
    for d in distances:
        variants[("update", d)] = with_distance(d, update.step)
        variants[("norm", d)] = with_distance(d, lambda: ops.multi_tensor_norm(grads, 2.0))
    timings = common.interleaved_medians(variants, rounds=rounds)
    return {key: (t["median_s"], common.paired_ratio(timings, key, (key[0], distances[0])))
            for key, t in timings.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--optim", default="adamw,sgd,adagrad")
    parser.add_argument("--cases", default="gpt2,small")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--distances", default="0,2048",
                        help="comma list of prefetch distances in bytes; the first is the baseline")
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--no-write", action="store_true", help="print only, write no JSON")
    args = parser.parse_args(argv)
    distances = [int(d) for d in args.distances.split(",")]
    started = ops.cpu_tuning()
    machine = common.machine_info()
    print(f"torch {machine['torch']}, {machine['cpu']}, {machine['threads']} threads; "
          f"kernels built for {started[0]}, default prefetch distance {started[1]} bytes")
    print(f"time with each distance over the time with {distances[0]} bytes "
          f"(medians of per-round ratios; median ms in brackets)")
    header = f"{'case':<40} {'pass':<7}" + "".join(f" {str(d) + ' B':>16}" for d in distances)
    print(header)
    rows = []
    try:
        for optim in args.optim.split(","):
            family = FAMILIES[optim]
            for dtype_name in args.dtypes.split(","):
                for case in args.cases.split(","):
                    title, shapes = CASES[case]
                    result = time_case(family, shapes(), getattr(torch, dtype_name), distances,
                                       args.rounds)
                    label = f"{optim} {dtype_name} {case}"
                    for kind in ("update", "norm"):
                        cells = "".join(
                            f" {result[(kind, d)][1]:>6.3f} ({result[(kind, d)][0] * 1e3:6.2f})"
                            for d in distances)
                        print(f"{label:<40} {kind:<7}{cells}")
                        rows.append({
                            "optimizer": optim, "dtype": dtype_name, "case": title, "pass": kind,
                            "median_ms": {str(d): result[(kind, d)][0] * 1e3 for d in distances},
                            "time_over_first": {str(d): result[(kind, d)][1] for d in distances},
                        })
    finally:
        ops.cpu_tuning(started[1])
    if not args.no_write:
        path = common.write_results("prefetch", {
            "machine": machine, "distances": distances, "rounds": args.rounds, "rows": rows})
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

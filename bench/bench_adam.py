"""FusedClipAdamW(clip=1.0) against torch.optim.AdamW, on the CPU.

    python bench/bench_adam.py [--cases gpt2,small] [--dtype float32] [--rounds 7]

Each case times, in interleaved rounds on the same parameters and gradients:
fusedclip's clipped step; torch AdamW with fused=True and with foreach=True,
each with and without clip_grad_norm_(foreach=True); and fusedclip's two passes
on their own (the norm pass, and the update with no clipping). It prints the
medians, their ratio to fusedclip's step, the bytes each variant moves per
parameter, the GB/s that makes, and the copy bandwidth measured in the same run,
and writes everything as JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import fusedclip  # noqa: E402
from fusedclip import ops  # noqa: E402

MAX_NORM = 1.0
HYPER = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)

# Memory traffic per parameter, counted in elements read + written
# (multiply by the element size). Optimizer state is in the parameter's dtype.
#   fusedclip, clipped: norm pass reads g (1); update reads g, p, m, v and
#     writes p, m, v (7).
#   torch fused: the update (7); clip_grad_norm_ adds a norm read of g and a
#     read + write of g to scale it (3).
#   torch foreach AdamW (torch/optim/adam.py, _multi_tensor_adam): decay p (2),
#     lerp m (3), scale v (2), addcmul v (3), sqrt v into a temporary (2),
#     divide it (2), add eps (2), addcdiv p (4) = 20.
ELEMENTS_MOVED = {
    "fusedclip AdamW clip": 8,
    "torch AdamW fused + clip": 10,
    "torch AdamW fused": 7,
    "torch AdamW foreach + clip": 23,
    "torch AdamW foreach": 20,
    "fusedclip norm pass": 1,
    "fusedclip update pass": 7,
}
REFERENCE = "fusedclip AdamW clip"


def make_variants(params: list[torch.nn.Parameter]) -> dict:
    ours = fusedclip.FusedClipAdamW(params, clip=MAX_NORM, **HYPER)
    update_only = fusedclip.FusedClipAdamW(params, clip=None, nonfinite="propagate", **HYPER)
    fused = torch.optim.AdamW(params, fused=True, **HYPER)
    foreach = torch.optim.AdamW(params, foreach=True, **HYPER)
    grads = [p.grad for p in params]

    def clipped(opt):
        def run():
            torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=True)
            opt.step()
        return run

    return {
        "fusedclip AdamW clip": ours.step,
        "torch AdamW fused + clip": clipped(fused),
        "torch AdamW fused": fused.step,
        "torch AdamW foreach + clip": clipped(foreach),
        "torch AdamW foreach": foreach.step,
        "fusedclip norm pass": lambda: ops.multi_tensor_norm(grads, 2.0),
        "fusedclip update pass": update_only.step,
    }


def run_case(name: str, shapes, dtype: torch.dtype, rounds: int, bandwidth: float) -> dict:
    params = common.make_params(shapes, dtype)
    n = sum(p.numel() for p in params)
    timings = common.interleaved_medians(make_variants(params), rounds=rounds)
    element_size = torch.empty((), dtype=dtype).element_size()
    ref = timings[REFERENCE]["median_s"]
    rows = {}
    for variant, t in timings.items():
        bytes_per_param = ELEMENTS_MOVED[variant] * element_size
        rows[variant] = {
            "median_ms": t["median_s"] * 1e3,
            "time_over_fusedclip": t["median_s"] / ref,
            "bytes_per_param": bytes_per_param,
            "gb_per_s": bytes_per_param * n / t["median_s"] / 1e9,
            "samples_ms": [s * 1e3 for s in t["samples_s"]],
        }
    floor_s = ELEMENTS_MOVED[REFERENCE] * element_size * n / bandwidth
    del params
    return {
        "case": name, "dtype": str(dtype).replace("torch.", ""), "params": n,
        "tensors": len(shapes), "rounds": rounds, "floor_ms": floor_s * 1e3,
        "fusedclip_over_floor": ref / floor_s, "variants": rows,
    }


def print_case(result: dict, bandwidth: float) -> None:
    print(f"\n## {result['case']}: {result['params'] / 1e6:.1f}M {result['dtype']} params in "
          f"{result['tensors']} tensors (median of {result['rounds']} interleaved rounds)")
    print(f"{'variant':<28} {'median ms':>10} {'x fusedclip':>12} {'B/param':>8} {'GB/s':>7}")
    for variant, row in result["variants"].items():
        print(f"{variant:<28} {row['median_ms']:>10.2f} {row['time_over_fusedclip']:>12.2f} "
              f"{row['bytes_per_param']:>8d} {row['gb_per_s']:>7.1f}")
    v = result["variants"]
    print(f"fusedclip vs torch fused + clip: {v['torch AdamW fused + clip']['median_ms'] / v[REFERENCE]['median_ms']:.2f}x faster;"
          f" vs torch fused without clipping: {v[REFERENCE]['median_ms'] / v['torch AdamW fused']['median_ms']:.2f}x the time"
          f" (ideal 32/28 = 1.14x)")
    print(f"bandwidth floor ({bandwidth / 1e9:.1f} GB/s, best STREAM-like kernel): {result['floor_ms']:.2f} ms; "
          f"fusedclip at {result['fusedclip_over_floor']:.2f}x the floor")


CASES = {
    "gpt2": ("GPT-2 small", common.gpt2_small_shapes),
    "small": ("2000 small tensors (1k-8k elements)", common.small_tensor_shapes),
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="gpt2,small", help="comma list of: " + ", ".join(CASES))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-write", action="store_true", help="print only, write no JSON")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)

    machine = common.machine_info()
    print(f"fusedclip {fusedclip.__version__}, torch {machine['torch']}, {machine['cpu']}, "
          f"{machine['threads']} threads")
    streams = common.stream_bandwidth()
    bandwidth = streams["best"] * 1e9
    print("memory bandwidth, GB/s: " + ", ".join(f"{k} {v:.1f}" for k, v in streams.items()))
    results = []
    for key in args.cases.split(","):
        title, shapes = CASES[key]
        result = run_case(title, shapes(), dtype, args.rounds, bandwidth)
        print_case(result, bandwidth)
        results.append(result)
    if not args.no_write:
        path = common.write_results(
            f"adam-{args.dtype}",
            {"machine": machine, "stream_gb_s": streams, "cases": results})
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

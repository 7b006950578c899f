"""CPU step time against model size: fusedclip against torch.optim, with the
memory-bandwidth floor, as a table, JSON and a PNG plot.

    python bench/bench_cpu.py [--sizes 1,3,10,30,124,350] [--dtype float32] [--rounds 7]

For each size (millions of parameters, GPT-2-like shapes of that size), times
in interleaved rounds: FusedClipAdamW(clip=1.0); torch AdamW(fused=True) after
clip_grad_norm_(foreach=True); and torch AdamW(fused=True) without clipping.
The floor is fusedclip's 32 bytes per fp32 parameter over the best bandwidth a
STREAM-like kernel reached in the same run. Speed-ups are medians of per-round
ratios (common.paired_ratio).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import fusedclip  # noqa: E402

MAX_NORM = 1.0
HYPER = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
FUSEDCLIP_ELEMENTS = 8  # elements read + written per parameter (bench_adam.ELEMENTS_MOVED)
VARIANTS = ["fusedclip AdamW clip", "torch AdamW fused + clip", "torch AdamW fused"]


def time_size(millions: float, dtype: torch.dtype, rounds: int) -> dict:
    shapes = common.scaled_transformer_shapes(int(millions * 1e6))
    params = common.make_params(shapes, dtype)
    ours = fusedclip.FusedClipAdamW(params, clip=MAX_NORM, **HYPER)
    fused = torch.optim.AdamW(params, fused=True, **HYPER)

    def fused_clipped():
        torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=True)
        fused.step()

    timings = common.interleaved_medians(
        {VARIANTS[0]: ours.step, VARIANTS[1]: fused_clipped, VARIANTS[2]: fused.step},
        rounds=rounds)
    return {
        "params": sum(p.numel() for p in params),
        "tensors": len(shapes),
        "median_ms": {k: v["median_s"] * 1e3 for k, v in timings.items()},
        # Medians of per-round ratios (common.paired_ratio).
        "speedup_over_fused_clip": common.paired_ratio(timings, VARIANTS[1], VARIANTS[0]),
        "time_over_fused": common.paired_ratio(timings, VARIANTS[0], VARIANTS[2]),
    }


def plot(results: list[dict], floor_gb_s: float, element_size: int, dtype: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r["params"] for r in results]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant, style in zip(VARIANTS, ["o-", "s--", "^:"]):
        ax.plot(sizes, [r["median_ms"][variant] for r in results], style, label=variant)
    floor = [FUSEDCLIP_ELEMENTS * element_size * n / (floor_gb_s * 1e9) * 1e3 for n in sizes]
    ax.plot(sizes, floor, "k-", lw=1, alpha=0.6,
            label=f"bandwidth floor, {FUSEDCLIP_ELEMENTS * element_size} B/param at {floor_gb_s:.0f} GB/s")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("step time, ms (median)")
    ax.set_title(f"CPU optimizer step, {dtype}, {torch.get_num_threads()} threads")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1,3,10,30,124,350",
                        help="model sizes in millions of parameters")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--plot", default=None, help="PNG path (default: next to the JSON)")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    element_size = torch.empty((), dtype=dtype).element_size()

    machine = common.machine_info()
    streams = common.stream_bandwidth()
    print(f"torch {machine['torch']}, {machine['cpu']}, {machine['threads']} threads; "
          f"fusedclip built for {machine['fusedclip_vector_arch']}, software prefetch "
          f"{machine['fusedclip_prefetch_distance']} bytes ahead; "
          "bandwidth GB/s: " + ", ".join(f"{k} {v:.1f}" for k, v in streams.items()))
    print(f"{'params':>10} {'fusedclip ms':>13} {'fused+clip ms':>14} {'fused ms':>9} "
          f"{'speedup':>8} {'x unclipped':>12} {'x floor':>8}")
    results = []
    for millions in (float(s) for s in args.sizes.split(",")):
        r = time_size(millions, dtype, args.rounds)
        m = r["median_ms"]
        floor_ms = FUSEDCLIP_ELEMENTS * element_size * r["params"] / (streams["best"] * 1e9) * 1e3
        r["floor_ms"] = floor_ms
        print(f"{r['params'] / 1e6:>9.1f}M {m[VARIANTS[0]]:>13.2f} {m[VARIANTS[1]]:>14.2f} "
              f"{m[VARIANTS[2]]:>9.2f} {r['speedup_over_fused_clip']:>7.2f}x "
              f"{r['time_over_fused']:>11.2f}x {m[VARIANTS[0]] / floor_ms:>7.2f}x")
        results.append(r)
    path = common.write_results(f"cpu-sweep-{args.dtype}", {
        "machine": machine, "stream_gb_s": streams, "dtype": args.dtype, "sizes": results})
    png = args.plot or path[:-len(".json")] + ".png"
    plot(results, streams["best"], element_size, args.dtype, png)
    print(f"wrote {path}\nwrote {png}")


if __name__ == "__main__":
    main()

"""Every fused optimizer against its torch.optim twin, and every clip policy's
extra cost, on the CPU.

    python bench/bench_optim.py [--optim adamw,sgd,adagrad] [--cases gpt2,small]
                                [--dtype float32] [--rounds 11] [--policies]

For each optimizer family and case, times in interleaved rounds on the same
parameters and gradients: fusedclip's clipped step (clip=1.0); the torch twin
with fused=True and with foreach=True, each with and without
clip_grad_norm_(foreach=True); and fusedclip's two passes alone (norm pass;
update with no clipping). Prints medians, ratios to fusedclip's step, bytes
moved per parameter, GB/s, and the floor from a STREAM-like bandwidth measured
in the same run; writes JSON under bench/results/. Ratios are medians of the
per-round ratios (common.paired_ratio), and with an odd number of rounds the
median of a ratio's inverse is the inverse of its median. With --policies it also
times FusedClipAdamW under every clip policy against GlobalNorm.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import fusedclip  # noqa: E402
from fusedclip import ops  # noqa: E402

MAX_NORM = 1.0
# clip_grad_norm_(foreach=True) reads every gradient once for the norm, then
# reads and writes it to scale it: 3 elements per parameter.
CLIP_ELEMENTS = 3


@dataclass
class Family:
    fused_cls: type
    torch_cls: type
    hyper: dict
    # Elements read + written per parameter by one update (state in the
    # parameter's dtype). fusedclip adds one read of the gradient (the norm).
    update_elements: int
    # torch's foreach implementation (torch/optim/*.py, _multi_tensor_*), op by op.
    foreach_elements: int
    note: str


FAMILIES = {
    # update: read g p m v, write p m v. foreach AdamW: decay p (2), lerp m (3),
    # scale v (2), addcmul v (3), sqrt v to a temporary (2), divide it (2), add
    # eps (2), addcdiv p (4).
    "adamw": Family(fusedclip.FusedClipAdamW, torch.optim.AdamW,
                    dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1), 7, 20,
                    "AdamW, weight_decay=0.1"),
    # update: read g p buf, write p buf. foreach SGD: scale buf (2), add g (3), add to p (3).
    "sgd": Family(fusedclip.FusedClipSGD, torch.optim.SGD,
                  dict(lr=1e-3, momentum=0.9), 5, 8, "SGD, momentum=0.9"),
    # update: read g p sum, write p sum. foreach Adagrad: addcmul sum (3),
    # sqrt to a temporary (2), add eps (2), addcdiv p (4).
    "adagrad": Family(fusedclip.FusedClipAdagrad, torch.optim.Adagrad,
                      dict(lr=1e-2, eps=1e-10), 5, 11, "Adagrad"),
}

CASES = {
    "gpt2": ("GPT-2 small", common.gpt2_small_shapes),
    "small": ("2000 small tensors (1k-8k elements)", common.small_tensor_shapes),
}

REFERENCE = "fusedclip clip"


def family_variants(family: Family, params) -> tuple[dict, dict]:
    """The timed callables and the elements each moves per parameter."""
    ours = family.fused_cls(params, clip=MAX_NORM, **family.hyper)
    update_only = family.fused_cls(params, clip=None, nonfinite="propagate", **family.hyper)
    fused = family.torch_cls(params, fused=True, **family.hyper)
    foreach = family.torch_cls(params, foreach=True, **family.hyper)
    grads = [p.grad for p in params]

    def clipped(opt):
        def run():
            torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=True)
            opt.step()
        return run

    u, f = family.update_elements, family.foreach_elements
    variants = {
        REFERENCE: (ours.step, u + 1),
        "torch fused + clip": (clipped(fused), u + CLIP_ELEMENTS),
        "torch fused": (fused.step, u),
        "torch foreach + clip": (clipped(foreach), f + CLIP_ELEMENTS),
        "torch foreach": (foreach.step, f),
        "fusedclip norm pass": (lambda: ops.multi_tensor_norm(grads, 2.0), 1),
        "fusedclip update pass": (update_only.step, u),
    }
    return ({k: v[0] for k, v in variants.items()}, {k: v[1] for k, v in variants.items()})


def policy_variants(params) -> tuple[dict, dict]:
    """FusedClipAdamW under each clip policy (all read the gradient twice)."""
    hyper = FAMILIES["adamw"].hyper
    policies = {
        "GlobalNorm(1.0)": fusedclip.GlobalNorm(1.0),
        "GlobalNorm(1.0, inf)": fusedclip.GlobalNorm(1.0, norm_type=float("inf")),
        "PerTensorNorm(1.0)": fusedclip.PerTensorNorm(1.0),
        "SmoothClip(1.0)": fusedclip.SmoothClip(1.0),
        "Normalize()": fusedclip.Normalize(),
        "AutoClip()": fusedclip.AutoClip(),
        "ZClip()": fusedclip.ZClip(),
        "AdaGC()": fusedclip.AdaGC(),
    }
    for name in ("ValueClip", "AGC"):  # the policies that exist in this build
        if hasattr(fusedclip, name):
            policy = fusedclip.ValueClip(1e-3) if name == "ValueClip" else fusedclip.AGC()
            policies[f"{name}()"] = policy
    variants = {name: fusedclip.FusedClipAdamW(params, clip=policy, **hyper).step
                for name, policy in policies.items()}
    # Every policy's norm pass reads the gradients once; AGC's also reads the
    # parameters (their unit norms).
    elements = {name: FAMILIES["adamw"].update_elements + (2 if name == "AGC()" else 1)
                for name in variants}
    return variants, elements


def run_case(title: str, shapes, dtype, rounds: int, bandwidth: float, variants_of,
             reference: str) -> dict:
    params = common.make_params(shapes, dtype)
    n = sum(p.numel() for p in params)
    variants, elements = variants_of(params)
    timings = common.interleaved_medians(variants, rounds=rounds)
    element_size = torch.empty((), dtype=dtype).element_size()
    ref = timings[reference]["median_s"]
    rows = {}
    for name, t in timings.items():
        bytes_per_param = elements[name] * element_size
        rows[name] = {
            "median_ms": t["median_s"] * 1e3,
            "time_over_reference": common.paired_ratio(timings, name, reference),
            "bytes_per_param": bytes_per_param,
            "gb_per_s": bytes_per_param * n / t["median_s"] / 1e9,
            "samples_ms": [s * 1e3 for s in t["samples_s"]],
        }
    floor_s = elements[reference] * element_size * n / bandwidth
    del params, variants
    return {"case": title, "dtype": str(dtype).replace("torch.", ""), "params": n,
            "tensors": len(shapes), "rounds": rounds, "reference": reference,
            "floor_ms": floor_s * 1e3, "reference_over_floor": ref / floor_s, "variants": rows}


def print_case(result: dict, heading: str) -> None:
    ref = result["reference"]
    print(f"\n## {heading}, {result['case']}: {result['params'] / 1e6:.1f}M {result['dtype']} params "
          f"in {result['tensors']} tensors (median of {result['rounds']} interleaved rounds)")
    print(f"{'variant':<26} {'median ms':>10} {'x ' + ref:>22} {'B/param':>8} {'GB/s':>7}")
    for name, row in result["variants"].items():
        print(f"{name:<26} {row['median_ms']:>10.2f} {row['time_over_reference']:>22.2f} "
              f"{row['bytes_per_param']:>8d} {row['gb_per_s']:>7.1f}")
    v = result["variants"]
    if "torch fused" in v:
        print(f"fusedclip: {v['torch fused + clip']['time_over_reference']:.2f}x faster "
              f"than torch fused + clip; {1 / v['torch fused']['time_over_reference']:.2f}x "
              f"the time of torch fused without clipping (medians of per-round ratios)")
    print(f"bandwidth floor: {result['floor_ms']:.2f} ms; {ref} at "
          f"{result['reference_over_floor']:.2f}x the floor")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--optim", default="adamw,sgd,adagrad", help="comma list of: " + ", ".join(FAMILIES))
    parser.add_argument("--cases", default="gpt2,small", help="comma list of: " + ", ".join(CASES))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--policies", action="store_true",
                        help="also time FusedClipAdamW under every clip policy (GPT-2 case)")
    parser.add_argument("--no-write", action="store_true", help="print only, write no JSON")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)

    machine = common.machine_info()
    print(f"fusedclip {fusedclip.__version__}, torch {machine['torch']}, {machine['cpu']}, "
          f"{machine['threads']} threads; kernels built for {machine['fusedclip_vector_arch']}, "
          f"software prefetch {machine['fusedclip_prefetch_distance']} bytes ahead")
    streams = common.stream_bandwidth()
    bandwidth = streams["best"] * 1e9
    print("memory bandwidth (STREAM-like, GB/s): " + ", ".join(f"{k} {v:.1f}" for k, v in streams.items()))

    results = []
    for optim in args.optim.split(","):
        family = FAMILIES[optim]
        for case in args.cases.split(","):
            title, shapes = CASES[case]
            result = run_case(title, shapes(), dtype, args.rounds, bandwidth,
                              lambda params: family_variants(family, params), REFERENCE)
            result["optimizer"] = family.note
            print_case(result, family.note)
            results.append(result)
    if args.policies:
        title, shapes = CASES["gpt2"]
        result = run_case(title, shapes(), dtype, args.rounds, bandwidth, policy_variants,
                          "GlobalNorm(1.0)")
        result["optimizer"] = "AdamW under each clip policy"
        print_case(result, "FusedClipAdamW, extra cost of each clip policy")
        results.append(result)
    if not args.no_write:
        path = common.write_results(f"optim-{args.dtype}", {
            "machine": machine, "stream_gb_s": streams, "cases": results})
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

"""FusedClipAdamW(clip=1.0) against torch.optim.AdamW + clip_grad_norm_, on a GPU.

    python bench/bench_cuda.py [--cases gpt2,small] [--dtypes float32,bfloat16]
                               [--rounds 21] [--quick] [--budget-s S]
                               [--json PATH | --no-write] [--rehearse]

Each case times, in interleaved rounds with CUDA events (warm-up first, medians
reported), on the same parameters and gradients: fusedclip's clipped step;
torch AdamW(fused=True) and AdamW(foreach=True), each with and without
clip_grad_norm_(foreach=True); and fusedclip's two passes alone (the norm pass,
and the update with no clipping). A device-to-device copy of a 1 GiB buffer is
timed in the same run, before the cases (the fractions use it) and after them
(a check that the GPU did not change pace): copy bandwidth = (bytes read +
bytes written) / time.

Printed per variant: median ms, time over fusedclip's, bytes moved per
parameter (bench_adam.py's ELEMENTS_MOVED times the element size: 32 for
fusedclip fp32 clipped, 4 norm + 28 update), achieved GB/s; and fusedclip's
fraction of the copy bandwidth. Targets: fp32 GPT-2 small at >= 85% of copy
bandwidth and >= 1.25x faster than torch fused + clip; 10,000 small tensors
>= 2x faster than torch fused + clip. JSON goes to
bench/results/<date>-cuda-adam-<gpu>.json, or to --json PATH; it is rewritten
after every case, so a run cut short keeps what it measured.

Cases run fp32 first (GPT-2 small, then the small tensors), then bf16.
--quick takes 7 rounds (and 5 for the copy); --budget-s S starts a case only
while the time left of S seconds (counted from the start) covers, with a
margin, what the same case took in the first dtype (else the longest case so
far), and lists the cases it left out. --rehearse runs
every step on the CPU with shrunken cases (a 2M-parameter transformer, 200
small tensors), 3 rounds, so the script itself can be tried where there is no
GPU; its numbers mean nothing, and it writes JSON only to --json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

MAX_NORM = 1.0
HYPER = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
REFERENCE = "fusedclip AdamW clip"
FUSED_CLIP = "torch AdamW fused + clip"
COPY_TARGET = 0.85     # fp32 GPT-2 small: fusedclip's GB/s over the copy's
GPT2_SPEEDUP = 1.25    # fp32 GPT-2 small: torch fused + clip time over fusedclip's
SMALL_SPEEDUP = 2.0    # 10,000 small tensors: the same ratio

CASES = {
    "gpt2": ("GPT-2 small", common.gpt2_small_shapes),
    "small": ("10,000 small tensors (1k-8k elements)",
              lambda: common.small_tensor_shapes(count=10_000)),
}
# --rehearse: the same cases shrunk to run in seconds on a CPU.
REHEARSAL_CASES = {
    "gpt2": ("GPT-2-style 2M params (rehearsal)",
             lambda: common.transformer_shapes(width=128, layers=2, vocab=8192, context=256)),
    "small": ("200 small tensors (rehearsal)", lambda: common.small_tensor_shapes(count=200)),
}
MARGIN = 1.25          # --budget-s: a case is started if MARGIN x its expected time fits


def cuda_problem() -> str | None:
    """Why this benchmark cannot run here, or None."""
    if not torch.cuda.is_available():
        return "no CUDA device is available (torch.cuda.is_available() is False)"
    try:
        from fusedclip import ops  # noqa: F401
    except ImportError as error:
        return str(error)
    built = all(torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")
                for op in ("fusedclip::multi_tensor_norm", "fusedclip::adam_"))
    if not built:
        return ("fusedclip._C was built without CUDA kernels; rebuild with "
                "FUSEDCLIP_CUDA=1 python setup.py build_ext --inplace")
    return None


def make_variants(params: list[torch.nn.Parameter]) -> dict:
    import fusedclip
    from fusedclip import ops

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
        REFERENCE: ours.step,
        FUSED_CLIP: clipped(fused),
        "torch AdamW fused": fused.step,
        "torch AdamW foreach + clip": clipped(foreach),
        "torch AdamW foreach": foreach.step,
        "fusedclip norm pass": lambda: ops.multi_tensor_norm(grads, 2.0),
        "fusedclip update pass": update_only.step,
    }


def time_variants(variants: dict, rounds: int, inner: int, device: str) -> dict:
    if device == "cuda":
        return common.cuda_interleaved_medians(variants, rounds=rounds, inner=inner)
    return common.interleaved_medians(variants, rounds=rounds, warmup=1)


def copy_bandwidth(device: str, rounds: int) -> float:
    """Bytes read + written per second by a buffer copy on `device`."""
    if device == "cuda":
        return common.cuda_copy_bandwidth(rounds=rounds)
    nbytes = 1 << 26
    src = torch.rand(nbytes // 4)
    dst = torch.empty_like(src)
    timing = common.interleaved_medians({"copy": lambda: dst.copy_(src)}, rounds=rounds,
                                        warmup=1)
    return 2 * nbytes / timing["copy"]["median_s"]


def run_case(key: str, dtype: torch.dtype, rounds: int, bandwidth: float,
             device: str = "cuda", cases: dict = CASES) -> dict:
    from bench_adam import ELEMENTS_MOVED

    title, shapes_fn = cases[key]
    shapes = shapes_fn()
    params = []
    for cpu in common.make_params(shapes, dtype):
        p = torch.nn.Parameter(cpu.detach().to(device))
        p.grad = cpu.grad.to(device)
        params.append(p)
    n = sum(p.numel() for p in params)
    # Many small tensors: several calls per timed sample, so launch gaps
    # between samples do not count.
    inner = 1 if key == "gpt2" else 3
    timings = time_variants(make_variants(params), rounds, inner, device)
    element_size = torch.empty((), dtype=dtype).element_size()
    ref = timings[REFERENCE]["median_s"]
    rows = {}
    for variant, t in timings.items():
        bytes_per_param = ELEMENTS_MOVED[variant] * element_size
        gb_s = bytes_per_param * n / t["median_s"] / 1e9
        rows[variant] = {
            "median_ms": t["median_s"] * 1e3,
            "time_over_fusedclip": t["median_s"] / ref,
            "bytes_per_param": bytes_per_param,
            "gb_per_s": gb_s,
            "fraction_of_copy_bandwidth": gb_s * 1e9 / bandwidth,
            "samples_ms": [s * 1e3 for s in t["samples_s"]],
        }
    del params
    if device == "cuda":
        torch.cuda.empty_cache()
    speedup = rows[FUSED_CLIP]["median_ms"] / rows[REFERENCE]["median_ms"]
    fraction = rows[REFERENCE]["fraction_of_copy_bandwidth"]
    targets = {}
    if key == "gpt2" and dtype == torch.float32:
        targets = {f"copy fraction >= {COPY_TARGET}": fraction >= COPY_TARGET,
                   f"speedup vs torch fused + clip >= {GPT2_SPEEDUP}": speedup >= GPT2_SPEEDUP}
    elif key == "small":
        targets = {f"speedup vs torch fused + clip >= {SMALL_SPEEDUP}": speedup >= SMALL_SPEEDUP}
    return {
        "case": title, "key": key, "dtype": str(dtype).replace("torch.", ""), "params": n,
        "tensors": len(shapes), "rounds": rounds, "calls_per_sample": inner,
        "speedup_vs_torch_fused_clip": speedup, "fusedclip_fraction_of_copy": fraction,
        "targets": targets, "variants": rows,
    }


def print_case(result: dict) -> None:
    print(f"\n## {result['case']}: {result['params'] / 1e6:.1f}M {result['dtype']} params in "
          f"{result['tensors']} tensors (median of {result['rounds']} interleaved rounds)")
    print(f"{'variant':<28} {'median ms':>10} {'x fusedclip':>12} {'B/param':>8} {'GB/s':>8}"
          f" {'of copy':>8}")
    for variant, row in result["variants"].items():
        print(f"{variant:<28} {row['median_ms']:>10.3f} {row['time_over_fusedclip']:>12.2f} "
              f"{row['bytes_per_param']:>8d} {row['gb_per_s']:>8.1f}"
              f" {row['fraction_of_copy_bandwidth']:>8.1%}")
    print(f"fusedclip: {result['speedup_vs_torch_fused_clip']:.2f}x faster than torch fused + "
          f"clip; {result['fusedclip_fraction_of_copy']:.1%} of copy bandwidth")
    for target, met in result["targets"].items():
        print(f"  target {target}: {'MET' if met else 'MISSED'}")


def main(argv=None) -> int:
    start = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="gpt2,small", help="comma list of: " + ", ".join(CASES))
    parser.add_argument("--dtypes", default="float32,bfloat16",
                        help="comma list of: float32, bfloat16")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds per case (default 21; 7 with --quick, 3 with "
                             "--rehearse)")
    parser.add_argument("--quick", action="store_true",
                        help="7 rounds per case and 5 for the copy bandwidth")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start a case only while the time left of this many seconds "
                             f"covers {MARGIN}x what it is expected to take")
    parser.add_argument("--json", default=None, help="write the JSON here instead of "
                        "bench/results/<date>-cuda-adam-<gpu>.json")
    parser.add_argument("--no-write", action="store_true", help="print only, write no JSON")
    parser.add_argument("--rehearse", action="store_true",
                        help="run on the CPU with shrunken cases (no GPU needed; numbers "
                             "meaningless)")
    args = parser.parse_args(argv)
    cases = args.cases.split(",")
    dtypes = args.dtypes.split(",")
    for c in cases:
        if c not in CASES:
            parser.error(f"unknown case {c!r}")
    for d in dtypes:
        if d not in ("float32", "bfloat16"):
            parser.error(f"unknown dtype {d!r}")
    rounds = args.rounds or (3 if args.rehearse else 7 if args.quick else 21)
    copy_rounds = 5 if args.quick or args.rehearse else 11
    device = "cpu" if args.rehearse else "cuda"
    case_table = REHEARSAL_CASES if args.rehearse else CASES

    if not args.rehearse:
        problem = cuda_problem()
        if problem is not None:
            print(f"bench_cuda.py: cannot run: {problem}", file=sys.stderr)
            return 2

    import fusedclip

    machine = common.machine_info(device)
    if args.rehearse:
        print(f"fusedclip {fusedclip.__version__}, torch {machine['torch']}: REHEARSAL on the "
              f"CPU ({machine['cpu']}, {machine['threads']} threads); the numbers mean nothing")
    else:
        print(f"fusedclip {fusedclip.__version__}, torch {machine['torch']} (CUDA "
              f"{machine['cuda']}), {machine['gpu']}, driver {machine['driver']}")
    path = None if args.no_write or (args.rehearse and not args.json) else args.json
    payload = {"machine": machine, "mode": {"rehearsal": args.rehearse, "quick": args.quick,
                                            "rounds": rounds, "budget_s": args.budget_s},
               "copy_bandwidth_gb_s": {}, "cases": [], "skipped_cases": []}

    def write():
        nonlocal path
        if args.no_write or (args.rehearse and not args.json):
            return
        payload["elapsed_s"] = time.perf_counter() - start
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump(payload, f, indent=1)
            path = args.json
        else:
            path = common.write_results("cuda-adam", payload)

    copy_before = copy_bandwidth(device, copy_rounds)
    payload["copy_bandwidth_gb_s"]["before"] = copy_before / 1e9
    print(f"copy bandwidth (read + write): {copy_before / 1e9:.0f} GB/s", flush=True)
    longest = 0.0
    took: dict[str, float] = {}   # seconds per case key, in the first dtype that ran it
    # fp32 first: its GPT-2 case carries the main targets.
    for d in dtypes:
        for key in cases:
            left = None if args.budget_s is None else args.budget_s - (time.perf_counter() - start)
            expect = took.get(key, longest)
            if left is not None and expect and left < MARGIN * expect:
                payload["skipped_cases"].append({"key": key, "dtype": d, "reason":
                                                 f"budget: {left:.0f} s left, the case is "
                                                 f"expected to take {expect:.0f} s"})
                print(f"\n## {key} {d}: SKIPPED ({payload['skipped_cases'][-1]['reason']})",
                      flush=True)
                continue
            case_start = time.perf_counter()
            result = run_case(key, getattr(torch, d), rounds, copy_before, device, case_table)
            result["seconds"] = time.perf_counter() - case_start
            longest = max(longest, result["seconds"])
            took.setdefault(key, result["seconds"])
            print_case(result)
            sys.stdout.flush()
            payload["cases"].append(result)
            write()
    left = None if args.budget_s is None else args.budget_s - (time.perf_counter() - start)
    if left is None or left > 10:
        copy_after = copy_bandwidth(device, copy_rounds)
        payload["copy_bandwidth_gb_s"]["after"] = copy_after / 1e9
        print(f"\ncopy bandwidth (read + write): {copy_before / 1e9:.0f} GB/s before, "
              f"{copy_after / 1e9:.0f} GB/s after the cases")
    write()
    if path:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

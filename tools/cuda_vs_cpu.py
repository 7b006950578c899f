"""How far the CUDA kernels' trajectories are from the CPU kernels', per dtype.

    python tools/cuda_vs_cpu.py [--device cuda] [--steps 10] [--budget-s S] [--json PATH]

Runs the same short training (same parameters, same gradients, every step) of
FusedClipAdam / AdamW / SGD / Adagrad with several clip policies once on the
CPU and once on `--device`, in float64, float32, bfloat16 and float16, and
compares parameters and every state tensor (exp_avg, exp_avg_sq,
max_exp_avg_sq, momentum_buffer, sum) element by element:

- ulps: |cuda - cpu| in units in the last place of the storage dtype at the
  CPU value (the largest over all elements; how many elements differ at all);
- rel: |cuda - cpu| / |cpu| over elements with |cpu| >= 1e-3 x the largest
  |value| of that quantity (smaller ones are all rounding noise relative to it);
- of_tol: the largest |cuda - cpu| / (atol + rtol |cpu|) with tests/tolerances.py's
  CUDA_VS_CPU for the dtype, atol = atol_scale x the largest |value| of the
  quantity over all parameters, as tests/helpers.py's assert_states_close
  judges it: 1.0 is the edge of the tolerance the CUDA tests use.

This is the measurement issue 13 asks for before CUDA_VS_CPU's bfloat16 and
float16 entries are settled (they are "not yet measured"); it changes nothing.
tools/gpu_check.sh runs it on the GPU. `--device cpu` compares the CPU with
itself (every difference 0): a rehearsal of this script without a GPU.
bfloat16 and float16 come first; with --budget-s, no new run starts after S
seconds, and the output says which runs were left out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import fusedclip  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
          "float64": torch.float64}
MANTISSA_BITS = {torch.float64: 52, torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}
STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "sum")
# A 0-d, an empty, a transposed, a strided and a channels-last parameter among
# plain ones, sizes around the kernels' vector widths and chunks.
SPECS = [((5, 7), "contiguous"), ((), "contiguous"), ((0,), "contiguous"),
         ((6, 4), "transposed"), ((3, 8), "slice"), ((2, 3, 4, 5), "channels_last"),
         ((1031,), "contiguous"), ((70001,), "contiguous"), ((257, 129), "contiguous")]
OPTIMIZERS = {
    "Adam": (fusedclip.FusedClipAdam, dict(weight_decay=0.1)),
    "Adam-amsgrad-max": (fusedclip.FusedClipAdam, dict(amsgrad=True, maximize=True,
                                                       weight_decay=0.1)),
    "AdamW": (fusedclip.FusedClipAdamW, dict(weight_decay=0.1)),
    "SGD-momentum": (fusedclip.FusedClipSGD, dict(momentum=0.9, dampening=0.1,
                                                  weight_decay=0.01)),
    "SGD-nesterov": (fusedclip.FusedClipSGD, dict(momentum=0.9, nesterov=True)),
    "Adagrad": (fusedclip.FusedClipAdagrad, dict(lr_decay=0.01, weight_decay=0.01,
                                                 initial_accumulator_value=0.1)),
}
CLIPS = {
    "none": lambda: None,
    "global-1.0": lambda: 1.0,
    "global-inf-0.5": lambda: fusedclip.GlobalNorm(0.5, norm_type=math.inf),
    "per-tensor-0.5": lambda: fusedclip.PerTensorNorm(0.5),
    "value-0.05": lambda: fusedclip.ValueClip(0.05),
    "agc-0.3": lambda: fusedclip.AGC(0.3),
}


def cuda_vs_cpu_tolerances() -> dict | None:
    try:
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        from tolerances import CUDA_VS_CPU
        return CUDA_VS_CPU
    except Exception:  # the tests moved: report without the of_tol column
        return None


def make_tensor(shape, layout: str, gen: torch.Generator, dtype) -> torch.Tensor:
    def randn(s):
        return torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)
    if layout == "transposed":
        return randn((shape[1], shape[0])).t()
    if layout == "slice":
        return randn((shape[0], 2 * shape[1]))[:, ::2]
    if layout == "channels_last":
        return randn(shape).contiguous(memory_format=torch.channels_last)
    return randn(shape)


def on_device(t: torch.Tensor, device: str) -> torch.Tensor:
    """A copy on `device` with the same strides."""
    out = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=device)
    out.copy_(t)
    return out


def run(opt_name: str, clip_name: str, dtype, device: str, steps: int, seed: int):
    cls, kwargs = OPTIMIZERS[opt_name]
    lr = 3e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-2
    gen = torch.Generator().manual_seed(seed)
    base = [make_tensor(s, lay, gen, dtype) for s, lay in SPECS]
    runs = []
    for dev in ("cpu", device):
        params = [torch.nn.Parameter(on_device(t, dev)) for t in base]
        runs.append((params, cls(params, lr=lr, clip=CLIPS[clip_name](), **kwargs)))
    for step in range(steps):
        g = torch.Generator().manual_seed(seed * 1000 + step)
        grads = [(torch.randn(t.shape, generator=g, dtype=torch.float64) * 0.1).to(dtype)
                 for t in base]
        for params, opt in runs:
            for p, grad in zip(params, grads):
                p.grad = on_device(grad, p.device.type)
            opt.step()
    if device != "cpu":
        torch.cuda.synchronize()
    return runs


def ulp(x: torch.Tensor, dtype) -> torch.Tensor:
    """The spacing of `dtype` at each |x| (float64 in), its smallest normal
    spacing for 0 and subnormals."""
    finfo = torch.finfo(dtype)
    _, exp = torch.frexp(x.abs().clamp_min(finfo.tiny))
    return torch.ldexp(torch.ones_like(x), exp - 1 - MANTISSA_BITS[dtype])


def compare(runs, dtype, tol) -> dict:
    """Largest differences of the device run from the CPU run, per quantity."""
    (cpu_params, cpu_opt), (dev_params, dev_opt) = runs
    pairs: dict[str, list] = {"param": []}
    for pc, pd in zip(cpu_params, dev_params):
        pairs["param"].append((pc.detach(), pd.detach().cpu()))
        for key in STATE_KEYS:
            if key in cpu_opt.state.get(pc, {}):
                pairs.setdefault(key, []).append(
                    (cpu_opt.state[pc][key], dev_opt.state[pd][key].cpu()))
    out = {}
    for key, tensors in pairs.items():
        exp = [e.double().flatten() for e, _ in tensors if e.numel()]
        act = [a.double().flatten() for _, a in tensors if a.numel()]
        e, a = torch.cat(exp), torch.cat(act)
        finite = torch.isfinite(e) & torch.isfinite(a)
        mismatched_nonfinite = int((~finite & ~((a == e) | (a.isnan() & e.isnan()))).sum())
        e, a = e[finite], a[finite]
        diff = (a - e).abs()
        scale = float(e.abs().max()) if e.numel() else 0.0
        big = e.abs() >= 1e-3 * scale
        row = {
            "elements": int(e.numel()),
            "differ": int((diff > 0).sum()),
            "nonfinite_mismatch": mismatched_nonfinite,
            "max_ulps": float((diff / ulp(e, dtype)).max()) if e.numel() else 0.0,
            "max_rel": float((diff[big] / e[big].abs()).max()) if bool(big.any()) else 0.0,
            "max_abs_over_scale": float(diff.max()) / scale if scale else 0.0,
        }
        if tol is not None:
            rtol, atol_scale = tol
            allowed = atol_scale * scale + rtol * e.abs()
            row["of_tol"] = float((diff / allowed.clamp_min(1e-300)).max()) if e.numel() else 0.0
        out[key] = row
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu to rehearse")
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no new run after this many seconds")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.device != "cpu" and not torch.cuda.is_available():
        print("cuda_vs_cpu.py: no CUDA device", file=sys.stderr)
        return 2
    tolerances = cuda_vs_cpu_tolerances()
    start = time.perf_counter()
    results = {"device": args.device, "steps": args.steps, "specs": [list(map(str, s)) for s in SPECS],
               "tolerances": None if tolerances is None else
               {str(k).replace("torch.", ""): list(v) for k, v in tolerances.items()},
               "runs": [], "per_dtype": {}, "left_out": []}
    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname]
        tol = None if tolerances is None else tolerances[dtype]
        worst: dict = {}
        for seed, (opt_name, clip_name) in enumerate(
                (o, c) for o in OPTIMIZERS for c in CLIPS):
            if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
                results["left_out"].append(f"{dname} {opt_name} clip={clip_name}")
                continue
            rows = compare(run(opt_name, clip_name, dtype, args.device, args.steps, 7 + seed),
                           dtype, tol)
            results["runs"].append({"dtype": dname, "optimizer": opt_name, "clip": clip_name,
                                    "quantities": rows})
            for key, row in rows.items():
                for metric in ("max_ulps", "max_rel", "max_abs_over_scale", "of_tol"):
                    if metric in row and row[metric] >= worst.get(metric, (-1.0,))[0]:
                        worst[metric] = (row[metric], f"{opt_name} clip={clip_name} {key}")
                worst["differ"] = (worst.get("differ", (0,))[0] + row["differ"], "")
                worst["elements"] = (worst.get("elements", (0,))[0] + row["elements"], "")
                worst["nonfinite_mismatch"] = (
                    worst.get("nonfinite_mismatch", (0,))[0] + row["nonfinite_mismatch"], "")
        if worst:
            results["per_dtype"][dname] = {k: {"value": v[0], "where": v[1]}
                                           for k, v in worst.items()}
    results["seconds"] = time.perf_counter() - start

    print(f"CUDA vs CPU trajectories ({args.device} vs cpu, {args.steps} steps, "
          f"{len(OPTIMIZERS)} optimizers x {len(CLIPS)} clips per dtype)")
    print(f"{'dtype':<9} {'max ulps':>9} {'max rel':>9} {'max |d|/scale':>13} {'of tol':>7} "
          f"{'differ':>14}  worst ulps at")
    for dname, w in results["per_dtype"].items():
        of_tol = w.get("of_tol", {}).get("value")
        print(f"{dname:<9} {w['max_ulps']['value']:>9.3g} {w['max_rel']['value']:>9.2e} "
              f"{w['max_abs_over_scale']['value']:>13.2e} "
              f"{'-' if of_tol is None else f'{of_tol:.0%}':>7} "
              f"{w['differ']['value']:>6}/{w['elements']['value']:<7}  "
              f"{w['max_ulps']['where'] if w['max_ulps']['value'] else '-'}"
              + (f"  NONFINITE MISMATCH x{w['nonfinite_mismatch']['value']}"
                 if w["nonfinite_mismatch"]["value"] else ""))
    print("(of tol: the largest difference as a fraction of tests/tolerances.py CUDA_VS_CPU; "
          "above 100% the CUDA tests would fail)")
    if results["left_out"]:
        print(f"left out for the time budget ({len(results['left_out'])} runs): "
              + ", ".join(results["left_out"][:8]) + (" ..." if len(results["left_out"]) > 8 else ""))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

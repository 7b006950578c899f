"""Mixed precision: fusedclip's clipped AdamW step in every precision mode,
against what a user would run instead, on the CPU.

    python bench/bench_precision.py [--cases small,gpt2] [--modes all] [--rounds 11]
                                    [--no-torchao] [--warm-cache] [--no-write]

For each case, times in interleaved rounds (common.interleaved_medians) the
clipped step (AdamW, clip=1.0) of FusedClipAdamW in each mode (fp32; bf16 pure;
bf16 with stochastic rounding; bf16 with an fp32 master, full or as 16-bit
remainders; fp32 or bf16-with-master parameters with bf16 state) and, in the
same rounds, torch's fused AdamW + clip_grad_norm_ on fp32 and on bf16
parameters and torchao's _AdamW(bf16_stochastic_round=True) + clip_grad_norm_.
torchao compiles one graph per parameter shape at its first step: that step is
timed apart (with an empty inductor cache unless --warm-cache) and the rounds
time its steady state.

Per variant it prints: the bytes one step moves per parameter, counted from
the dtypes of the arrays it touches (fusedclip: the norm pass reads the
gradients, the update reads and writes each state array at its own dtype, and
writes the parameter; torch: clip_grad_norm_(foreach=True) reads the gradients
twice and writes them once, the fused update reads and writes its arrays); the
memory per parameter of parameter, state and master (measured from the
tensors; gradients, the same for every variant of a dtype, left out); the
median time; time over fusedclip's fp32 step (median of per-round ratios); GB/s;
and bandwidth (bytes/s) over the fp32 step's. Then the issue's targets, met or
not. Writes JSON under bench/results/. `make bench` runs it after
bench_optim.py. It waits while a compiler (cc1plus, nvcc) runs on the machine
(--no-wait: a smoke test). The issue's CPU targets were set for an AVX-512 build;
FUSEDCLIP_CPU_CAPABILITY=avx2 gives the AVX2 build's figures on such a machine.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import fusedclip  # noqa: E402

MAX_NORM = 1.0
HYPER = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
# The targets (CPU): every mode moves its bytes at least this fast
# relative to the fp32 clipped step; bf16 + SR at least this much faster than
# torchao's steady-state step.
BANDWIDTH_TARGET = 0.8
TORCHAO_TARGET = 3.0

CASES = {
    # 21.5M parameters in 52 tensors of 9 shapes (torchao compiles one graph
    # per shape): every array well beyond the 32 MiB L3 in every mode.
    "small": ("GPT-2-style, width 512, 4 layers, 16k vocabulary",
              lambda: common.transformer_shapes(width=512, layers=4, vocab=16384)),
    "gpt2": ("GPT-2 small", common.gpt2_small_shapes),
}


@dataclass
class Mode:
    dtype: torch.dtype
    options: dict = field(default_factory=dict)


BF16 = torch.bfloat16
MODES = {
    "fp32": Mode(torch.float32),
    "bf16": Mode(BF16),
    "bf16 + SR": Mode(BF16, dict(stochastic_rounding=True)),
    "bf16 + master": Mode(BF16, dict(master_weights=True)),
    "bf16 + master + remainders": Mode(BF16, dict(master_weights=True, store_param_remainders=True)),
    "fp32 + bf16 state": Mode(torch.float32, dict(state_dtype=BF16)),
    "bf16 + master + bf16 state": Mode(BF16, dict(master_weights=True, state_dtype=BF16)),
    "bf16 + remainders + bf16 state": Mode(BF16, dict(master_weights=True, store_param_remainders=True,
                                                      state_dtype=BF16)),
}
REFERENCE = "fusedclip fp32"
TORCH_FP32 = "torch fused fp32 + clip"
TORCH_BF16 = "torch fused bf16 + clip"
TORCHAO = "torchao _AdamW bf16 SR + clip"


def fused_name(mode: str) -> str:
    return f"fusedclip {mode}"


def arrays_of(opt: torch.optim.Optimizer, p: torch.Tensor) -> dict[str, torch.Tensor]:
    """The state tensors of p with one element per parameter element (not the
    step counter or the 2-element generator)."""
    return {k: v for k, v in opt.state[p].items()
            if isinstance(v, torch.Tensor) and v.numel() == p.numel() and v.dim() > 0}


def memory_per_param(opt: torch.optim.Optimizer, params) -> float:
    total = sum(p.numel() * p.element_size()
                + sum(t.numel() * t.element_size() for t in arrays_of(opt, p).values())
                for p in params)
    return total / sum(p.numel() for p in params)


def fused_bytes(opt: torch.optim.Optimizer, params) -> float:
    """Bytes per parameter of fusedclip's clipped step: the norm pass reads the
    gradient; the update reads it again, reads and writes every state array;
    with a full fp32 master it only writes the parameter, otherwise (no master,
    or a remainder, which rebuilds the master from the parameter) it reads and
    writes it."""
    total = 0
    for p in params:
        arrays = arrays_of(opt, p)
        g = p.grad.element_size()
        state = sum(2 * t.element_size() for t in arrays.values())
        param = (1 if "master_param" in arrays else 2) * p.element_size()
        total += p.numel() * (2 * g + state + param)
    return total / sum(p.numel() for p in params)


def torch_bytes(opt: torch.optim.Optimizer, params) -> float:
    """torch's clip_grad_norm_(foreach=True) (read g for the norm, read and
    write it to scale it) and a fused update (read g, read and write p and each
    state array)."""
    total = 0
    for p in params:
        g = p.grad.element_size()
        state = sum(2 * t.element_size() for t in arrays_of(opt, p).values())
        total += p.numel() * (3 * g + g + 2 * p.element_size() + state)
    return total / sum(p.numel() for p in params)


def clipped(opt: torch.optim.Optimizer, params):
    def run():
        torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=True)
        opt.step()
    return run


def import_torchao():
    """torchao's _AdamW, or None with the reason. Its import logs the CUDA
    libraries it cannot load on a CPU-only torch: quieted."""
    logging.getLogger("torchao").setLevel(logging.ERROR)
    try:
        import torchao
        from torchao.optim import _AdamW
    except ImportError as e:
        return None, None, f"torchao not importable ({e}); pip install torchao (pin torch beside it)"
    return _AdamW, torchao.__version__, None


WAIT = True


def wait_for_quiet_machine(max_wait_s: float = 1800, poll_s: float = 10) -> None:
    """Never time beside a C++/CUDA build: waits while cc1plus or nvcc runs."""
    if not WAIT:
        return
    waited = 0.0
    while waited < max_wait_s:
        found = subprocess.run(["pgrep", "-f", "cc1plus|nvcc"], capture_output=True, text=True)
        if not found.stdout.strip():
            return
        if waited == 0:
            print("a compiler is running on this machine (pgrep cc1plus|nvcc): waiting before timing",
                  flush=True)
        time.sleep(poll_s)
        waited += poll_s
    print(f"still compiling after {max_wait_s:.0f} s: timing anyway, numbers suspect", flush=True)


def run_case(title: str, shapes, modes: list[str], rounds: int, bandwidth: float,
             torchao_cls, warm_cache: bool) -> dict:
    wait_for_quiet_machine()
    fp32_params = common.make_params(shapes, torch.float32)
    bf16_params = common.make_params(shapes, BF16)
    n = sum(p.numel() for p in fp32_params)
    variants, bytes_pp, memory_pp, notes = {}, {}, {}, {}

    # The optimizers make their state at the first step: one untimed step each
    # (the rounds' warm-up steps follow), then the state tells the bytes.
    for mode in modes:
        spec = MODES[mode]
        params = fp32_params if spec.dtype == torch.float32 else bf16_params
        try:
            opt = fusedclip.FusedClipAdamW(params, clip=MAX_NORM, **HYPER, **spec.options)
            opt.step()
        except (TypeError, ValueError, RuntimeError) as e:
            notes[fused_name(mode)] = f"not run: {type(e).__name__}: {e}"
            continue
        name = fused_name(mode)
        variants[name] = opt.step
        bytes_pp[name] = fused_bytes(opt, params)
        memory_pp[name] = memory_per_param(opt, params)

    for name, params in ((TORCH_FP32, fp32_params), (TORCH_BF16, bf16_params)):
        opt = torch.optim.AdamW(params, fused=True, **HYPER)
        step = clipped(opt, params)
        step()
        variants[name] = step
        bytes_pp[name] = torch_bytes(opt, params)
        memory_pp[name] = memory_per_param(opt, params)

    compile_s = steady_first_s = None
    if torchao_cls is not None:
        cache = None
        if not warm_cache:
            # An empty inductor cache: the compile a first run pays.
            cache = tempfile.mkdtemp(prefix="bench-precision-inductor-")
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        torch._dynamo.reset()
        opt = torchao_cls(bf16_params, bf16_stochastic_round=True, **HYPER)
        step = clipped(opt, bf16_params)
        start = time.perf_counter()
        step()
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        step()
        steady_first_s = time.perf_counter() - start
        variants[TORCHAO] = step
        bytes_pp[TORCHAO] = torch_bytes(opt, bf16_params)
        memory_pp[TORCHAO] = memory_per_param(opt, bf16_params)
        if cache is not None:
            shutil.rmtree(cache, ignore_errors=True)

    wait_for_quiet_machine()
    timings = common.interleaved_medians(variants, rounds=rounds)
    ref = REFERENCE if REFERENCE in timings else next(iter(timings))
    ref_bw = bytes_pp[ref] / timings[ref]["median_s"]
    rows = {}
    for name, t in timings.items():
        ratio = common.paired_ratio(timings, name, ref)
        rows[name] = {
            "bytes_per_param": bytes_pp[name],
            "memory_per_param": memory_pp[name],
            "median_ms": t["median_s"] * 1e3,
            "time_over_reference": ratio,
            "gb_per_s": bytes_pp[name] * n / t["median_s"] / 1e9,
            # bytes/s over the reference's, from the paired time ratio
            "bandwidth_over_reference": bytes_pp[name] / bytes_pp[ref] / ratio,
            "samples_ms": [s * 1e3 for s in t["samples_s"]],
        }
    floor_s = bytes_pp[ref] * n / bandwidth
    result = {"case": title, "params": n, "tensors": len(shapes), "distinct_shapes": len(set(shapes)),
              "rounds": rounds, "reference": ref, "hyper": {**HYPER, "clip": MAX_NORM},
              "floor_ms": floor_s * 1e3, "reference_over_floor": timings[ref]["median_s"] / floor_s,
              "variants": rows, "not_run": notes}
    if compile_s is not None:
        result["torchao"] = {"first_step_s": compile_s, "second_step_s": steady_first_s,
                             "compile_s": compile_s - rows[TORCHAO]["median_ms"] / 1e3,
                             "cold_inductor_cache": not warm_cache}
    result["targets"] = targets(result)
    del fp32_params, bf16_params, variants
    return result


def targets(result: dict) -> list[dict]:
    """The issue's targets, each with its measured value and whether met."""
    rows, ref = result["variants"], result["reference"]
    out = []
    fused = [name for name in rows if name.startswith("fusedclip ") and name != ref]
    if fused:
        worst = min(fused, key=lambda name: rows[name]["bandwidth_over_reference"])
        value = rows[worst]["bandwidth_over_reference"]
        out.append({"target": f"every mode's bytes/s >= {BANDWIDTH_TARGET}x the fp32 clipped step's",
                    "value": f"lowest {value:.2f}x ({worst})", "met": value >= BANDWIDTH_TARGET})
    master = fused_name("bf16 + master")
    if master in rows and TORCH_FP32 in rows:
        speedup = rows[TORCH_FP32]["median_ms"] / rows[master]["median_ms"]
        out.append({"target": f"{master} faster than {TORCH_FP32}",
                    "value": f"{speedup:.2f}x faster", "met": speedup > 1})
    sr = fused_name("bf16 + SR")
    if sr in rows and TORCHAO in rows:
        speedup = rows[TORCHAO]["median_ms"] / rows[sr]["median_ms"]
        out.append({"target": f"{sr} >= {TORCHAO_TARGET:.0f}x faster than torchao's steady-state step",
                    "value": f"{speedup:.2f}x faster", "met": speedup >= TORCHAO_TARGET})
    return out


def print_case(result: dict) -> None:
    ref = result["reference"]
    print(f"\n## AdamW + clip=1.0 by precision, {result['case']}: {result['params'] / 1e6:.1f}M params "
          f"in {result['tensors']} tensors (median of {result['rounds']} interleaved rounds)")
    print("| variant | B moved/param | memory B/param | median ms | time x fp32 | GB/s | bytes/s x fp32 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, row in result["variants"].items():
        print(f"| {name} | {row['bytes_per_param']:.0f} | {row['memory_per_param']:.0f} | "
              f"{row['median_ms']:.1f} | {row['time_over_reference']:.2f} | {row['gb_per_s']:.1f} | "
              f"{row['bandwidth_over_reference']:.2f} |")
    for name, note in result["not_run"].items():
        print(f"{name}: {note}")
    print("memory: parameter + optimizer state + master (gradients left out: 4 B/param fp32, 2 bf16)")
    if "torchao" in result:
        t = result["torchao"]
        print(f"torchao first step {t['first_step_s']:.1f} s ({'empty' if t['cold_inductor_cache'] else 'warm'}"
              f" inductor cache, {result['distinct_shapes']} shapes): {t['compile_s']:.1f} s of compile "
              f"beside its steady-state step")
    print(f"bandwidth floor of {ref}: {result['floor_ms']:.1f} ms; it runs at "
          f"{result['reference_over_floor']:.2f}x the floor")
    for t in result["targets"]:
        print(f"target: {t['target']}: {t['value']}: {'met' if t['met'] else 'NOT met'}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="small", help="comma list of: " + ", ".join(CASES))
    parser.add_argument("--modes", default="all",
                        help="comma list (or 'all') of: " + "; ".join(MODES))
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--no-torchao", action="store_true", help="leave torchao out")
    parser.add_argument("--warm-cache", action="store_true",
                        help="time torchao's first step with the user's inductor cache (default: empty)")
    parser.add_argument("--no-write", action="store_true", help="print only, write no JSON")
    parser.add_argument("--no-wait", action="store_true",
                        help="time even while a compiler runs on this machine (a smoke test, not a measurement)")
    args = parser.parse_args(argv)
    global WAIT
    WAIT = not args.no_wait
    modes = list(MODES) if args.modes == "all" else [m.strip() for m in args.modes.split(",")]
    for mode in modes:
        if mode not in MODES:
            parser.error(f"unknown mode {mode!r}; modes: " + "; ".join(MODES))
    if "fp32" not in modes:
        modes.insert(0, "fp32")  # the reference

    torchao_cls, torchao_version, why = (None, None, "left out (--no-torchao)") if args.no_torchao \
        else import_torchao()
    machine = common.machine_info()
    machine["torchao"] = torchao_version
    print(f"fusedclip {fusedclip.__version__}, torch {machine['torch']}, torchao {torchao_version or '-'}, "
          f"{machine['cpu']}, {machine['threads']} threads; kernels built for "
          f"{machine['fusedclip_vector_arch']}")
    if why:
        print(f"torchao: {why}")
    wait_for_quiet_machine()
    streams = common.stream_bandwidth(nbytes=1 << 28, rounds=5)
    print("memory bandwidth (STREAM-like, GB/s): " + ", ".join(f"{k} {v:.1f}" for k, v in streams.items()))

    results = []
    for case in args.cases.split(","):
        title, shapes = CASES[case]
        result = run_case(title, shapes(), modes, args.rounds, streams["best"] * 1e9, torchao_cls,
                          args.warm_cache)
        print_case(result)
        results.append(result)
    if not args.no_write:
        path = common.write_results("precision", {"machine": machine, "stream_gb_s": streams,
                                                  "cases": results})
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

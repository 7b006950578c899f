"""Shared pieces of the benchmarks: parameter shapes, a timing harness that
interleaves the variants round by round, a STREAM-like bandwidth probe, and
the results file.

Benchmarks compare variants side by side in one run and report ratios: the
machines are shared and noisy, so absolute times from different runs mean
little.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import time
from typing import Callable

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def gpt2_small_shapes() -> list[tuple[int, ...]]:
    """GPT-2 small (124.4M parameters in 148 tensors), in model order."""
    return transformer_shapes(width=768, layers=12, vocab=50257)


def small_tensor_shapes(count: int = 2000, low: int = 1024, high: int = 8192,
                        seed: int = 0) -> list[tuple[int, ...]]:
    """`count` 1-D tensors of `low` to `high` elements."""
    rng = random.Random(seed)
    return [(rng.randint(low, high),) for _ in range(count)]


def transformer_shapes(width: int, layers: int, vocab: int, context: int = 1024) -> list[tuple[int, ...]]:
    """The parameter shapes of a GPT-2-style decoder."""
    d = width
    shapes: list[tuple[int, ...]] = [(vocab, d), (context, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,),
                   (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


def scaled_transformer_shapes(target_params: int) -> list[tuple[int, ...]]:
    """GPT-2-style shapes whose total is closest to `target_params`, over widths
    in steps of 64, 4 to 24 layers and a 1k to 50k vocabulary (GPT-2 small and
    medium are exactly among them)."""
    best = None
    for layers in (4, 12, 24):
        for vocab in (1024, 8192, 50257):
            for width in range(64, 4097, 64):
                shapes = transformer_shapes(width, layers, vocab)
                total = sum(numel(s) for s in shapes)
                if best is None or abs(total - target_params) < abs(best[0] - target_params):
                    best = (total, shapes)
    return best[1]


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def make_params(shapes, dtype=torch.float32, seed: int = 0) -> list[torch.nn.Parameter]:
    """Parameters with gradients set, both random (never zeros: zeros can run
    faster than real data and hide mistakes)."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype))
        p.grad = (torch.randn(shape, generator=gen, dtype=torch.float32) * 1e-2).to(dtype)
        params.append(p)
    return params


def interleaved_medians(variants: dict[str, Callable[[], None]], rounds: int,
                        warmup: int = 2, seed: int = 0,
                        min_sample_s: float = 0.05) -> dict[str, dict]:
    """Times every variant once per round, in a shuffled order each round, after
    `warmup` untimed rounds. A sample of a variant faster than `min_sample_s`
    is several back-to-back calls (as many as the last warm-up call says fill
    it), divided by their number: a 15 ms call timed alone is at the mercy of
    every hiccup of a shared machine. Returns the median and all samples per
    call, in seconds, and the calls per sample."""
    rng = random.Random(seed)
    names = list(variants)
    samples: dict[str, list[float]] = {name: [] for name in names}
    calls = {name: 1 for name in names}
    for r in range(warmup + rounds):
        order = names[:]
        rng.shuffle(order)
        for name in order:
            fn, n = variants[name], calls[name]
            start = time.perf_counter()
            for _ in range(n):
                fn()
            elapsed = (time.perf_counter() - start) / n
            if r >= warmup:
                samples[name].append(elapsed)
            elif r == warmup - 1:
                calls[name] = max(1, min(64, round(min_sample_s / elapsed)))
    return {name: {"median_s": statistics.median(s), "samples_s": s, "calls_per_sample": calls[name]}
            for name, s in samples.items()}


def paired_ratio(timings: dict, numerator: str, denominator: str) -> float:
    """The median over rounds of numerator's time over denominator's time in the
    same round (timings from interleaved_medians). Each round times every
    variant once, close together, so the slow swings of a shared machine's
    bandwidth cancel in each round's ratio; a ratio of the two medians mixes
    rounds and keeps them."""
    pairs = zip(timings[numerator]["samples_s"], timings[denominator]["samples_s"])
    return statistics.median(a / b for a, b in pairs)


def stream_bandwidth(nbytes: int = 1 << 29, rounds: int = 7) -> dict[str, float]:
    """STREAM-like memory bandwidths in GB/s (bytes read + bytes written per
    second), measured with torch's own multithreaded element-wise kernels on
    arrays of `nbytes` bytes each, far larger than the caches that matter.

    In-place kernels are the fair yardstick for an optimizer step, which
    rewrites the arrays it reads; a copy into another array also pays the
    write-allocate read of the destination, which STREAM does not count.
    ``best`` is the fastest of them: the floor a step's bytes are held to.
    """
    n = nbytes // 4
    a, b, c, d = torch.rand(n), torch.rand(n), torch.rand(n), torch.empty(n)
    kernels = {
        "copy": (lambda: d.copy_(a), 2),
        "scale_inplace": (lambda: a.mul_(1.0000001), 2),
        "add_inplace": (lambda: a.add_(b, alpha=1e-7), 3),
        "addcmul_inplace": (lambda: a.addcmul_(b, c, value=1e-7), 4),
        "triad": (lambda: torch.add(a, b, alpha=1e-7, out=d), 3),
        "read": (lambda: a.sum(), 1),
    }
    result = {}
    for name, (fn, arrays) in kernels.items():
        fn()
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        result[name] = arrays * nbytes / statistics.median(times) / 1e9
    result["best"] = max(result.values())
    return result


def machine_info(device: str = "cpu") -> dict:
    """What ran the benchmark. With device="cuda", also the GPU (name, memory,
    compute capability, count), torch's CUDA version and the driver's."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=os.path.dirname(__file__)).stdout.strip()
    except OSError:
        commit = ""
    info = {
        "date": datetime.date.today().isoformat(),
        "device": "cpu",
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "commit": commit,
    }
    try:
        from fusedclip import ops
    except ImportError:
        pass
    else:
        # How fusedclip's CPU kernels were built and run (csrc/cpu/cpu_tuning.h).
        info["fusedclip_vector_arch"], info["fusedclip_prefetch_distance"] = ops.cpu_tuning()
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        try:
            driver = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True).stdout.strip().splitlines()[0]
        except (OSError, IndexError):
            driver = ""
        info.update({
            "device": "cuda",
            "gpu": props.name,
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "compute_capability": f"{props.major}.{props.minor}",
            "gpu_count": torch.cuda.device_count(),
            "cuda": torch.version.cuda,
            "driver": driver,
        })
    return info


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-").lower() or "unknown"


def write_results(name: str, payload: dict, out_dir: str = RESULTS_DIR) -> str:
    """Writes payload as JSON under bench/results/: <date>-<name>-cpu-<threads>t.json,
    or <date>-<name>-<gpu name>.json for a CUDA run."""
    os.makedirs(out_dir, exist_ok=True)
    info = payload["machine"]
    if info["device"] == "cuda":
        file = f"{info['date']}-{name}-{_slug(info['gpu'])}.json"
    else:
        file = f"{info['date']}-{name}-{info['device']}-{info['threads']}t.json"
    path = os.path.join(out_dir, file)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    return path


# -- CUDA timing ---------------------------------------------------------------------------------
def cuda_interleaved_medians(variants: dict[str, Callable[[], None]], rounds: int,
                             warmup: int = 3, inner: int = 1, seed: int = 0) -> dict[str, dict]:
    """interleaved_medians on the GPU: every variant once per round, in a
    shuffled order, timed with CUDA events around `inner` back-to-back calls
    (the time per call is reported). Returns medians and samples in seconds."""
    rng = random.Random(seed)
    names = list(variants)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(warmup + rounds):
        order = names[:]
        rng.shuffle(order)
        for name in order:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(inner):
                variants[name]()
            end.record()
            end.synchronize()
            if r >= warmup:
                samples[name].append(start.elapsed_time(end) / 1e3 / inner)
    return {name: {"median_s": statistics.median(s), "samples_s": s}
            for name, s in samples.items()}


def cuda_copy_bandwidth(nbytes: int = 1 << 30, rounds: int = 11) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written),
    of a `nbytes` buffer, timed with CUDA events (median of `rounds`)."""
    src = torch.rand(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    timing = cuda_interleaved_medians({"copy": lambda: dst.copy_(src)}, rounds=rounds)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / timing["copy"]["median_s"]

"""The optimizer step under FSDP2: FusedClipAdamW(clip=1.0) against torch's
AdamW(fused=True) + clip_grad_norm_ (issue 12).

A GPT-2-small-like stack of layers (the shapes of bench/common.py's
transformer_shapes: 124.4M parameters in 148 tensors by default) is sharded
with FSDP2's fully_shard (one unit per block, the embeddings and the final
LayerNorm, then the root) over --world ranks: processes on this machine
(gloo on the CPU, each with cpu_count / world threads), or one GPU per rank
with --device cuda (NCCL). Every rank gets random gradients (DTensors of
the parameters' placements, set once), and each round times, in a shuffled
order that every rank shares, one call of each variant on the same
parameters:

  fusedclip              FusedClipAdamW(lr, weight_decay, clip=1.0).step(): the
                         norm pass, one packed all-reduce, the fused update
  torch fused + clip     clip_grad_norm_(params, 1.0) (its DTensor norm is
                         all-reduced by DTensor) + AdamW(fused=True).step()
  torch fused, no clip   AdamW(fused=True).step() (the unclipped floor)

A call is timed on every rank from a barrier to its end; a sample is the
slowest rank's time. Times are medians over --rounds rounds (after --warmup
untimed ones); ratios are medians of the per-round ratios (the slow swings
of a shared machine cancel in each round). The script also counts
fusedclip's all-reduces per step and their elements.

    python bench/bench_distributed.py               # 2 CPU ranks, GPT-2 small
    python bench/bench_distributed.py --quick       # a small stack, to try it
    python bench/bench_distributed.py --device cuda --world 2   # NCCL, 2 GPUs
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_info, numel, transformer_shapes, write_results  # noqa: E402

VARIANTS = {
    "fusedclip": "FusedClipAdamW(clip=1.0)",
    "torch_fused_clip": "clip_grad_norm_(1.0) + AdamW(fused=True)",
    "torch_fused_noclip": "AdamW(fused=True), no clipping",
}


class _Holder(nn.Module):
    """Parameters of the given shapes (one FSDP2 unit)."""

    def __init__(self, shapes, gen):
        super().__init__()
        self.params = nn.ParameterList(
            [nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes])


def _model(width: int, layers: int, vocab: int) -> tuple[nn.Module, list]:
    """A module tree with a GPT-2-style decoder's parameter shapes: embeddings,
    ``layers`` blocks of 12 tensors, the final LayerNorm."""
    shapes = transformer_shapes(width, layers, vocab)
    gen = torch.Generator().manual_seed(0)
    root = nn.Module()
    root.embed = _Holder(shapes[:2], gen)
    root.blocks = nn.ModuleList(
        [_Holder(shapes[2 + 12 * i:2 + 12 * (i + 1)], gen) for i in range(layers)])
    root.final = _Holder(shapes[2 + 12 * layers:], gen)
    return root, shapes


def _rank_main(rank: int, world: int, port: int, args, conn) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    import fusedclip

    if args.device == "cuda":
        torch.cuda.set_device(rank)
        device, backend = torch.device("cuda", rank), "nccl"
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        device, backend = torch.device("cpu"), "gloo"
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=300))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    try:
        mesh = init_device_mesh(device.type, (world,))
        model, shapes = _model(args.width, args.layers, args.vocab)
        model.to(device)
        for unit in [model.embed, *model.blocks, model.final]:
            fully_shard(unit, mesh=mesh)
        fully_shard(model, mesh=mesh)
        params = list(model.parameters())
        gen = torch.Generator().manual_seed(1 + rank)
        for p in params:
            local = p.to_local()
            g = (torch.randn(local.shape, generator=gen) * 1e-2).to(device)
            p.grad = DTensor.from_local(g, p.device_mesh, p.placements, shape=p.shape,
                                        stride=p.stride())
        fused = fusedclip.FusedClipAdamW(params, lr=1e-4, weight_decay=0.01, clip=1.0)
        tfused = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=True)

        def torch_clip_step():
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            tfused.step()

        fns = {"fusedclip": fused.step, "torch_fused_clip": torch_clip_step,
               "torch_fused_noclip": tfused.step}

        def sync():
            if device.type == "cuda":
                torch.cuda.synchronize()

        # fusedclip's collectives in one step
        calls = []
        real = dist.all_reduce

        def counting(tensor, *a, **k):
            calls.append(tensor.numel())
            return real(tensor, *a, **k)

        dist.all_reduce = counting
        try:
            fused.step()
        finally:
            dist.all_reduce = real
        sync()

        rng = random.Random(0)  # the same order on every rank
        names = list(fns)
        samples = {name: [] for name in names}
        for r in range(args.warmup + args.rounds):
            order = names[:]
            rng.shuffle(order)
            for name in order:
                sync()
                dist.barrier()
                start = time.perf_counter()
                fns[name]()
                sync()
                elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank
                if r >= args.warmup:
                    samples[name].append(float(elapsed))
        if rank == 0:
            conn.send({"samples_s": samples, "all_reduce_elements": calls,
                       "params": sum(numel(s) for s in shapes), "tensors": len(shapes),
                       "local_params": sum(p.to_local().numel() for p in params),
                       "threads": torch.get_num_threads(),
                       "grad_norm": float(fused.clip_stats["grad_norm"])})
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true",
                        help="a 2-layer, width-256, 1k-vocabulary stack, 5 rounds")
    parser.add_argument("--no-write", action="store_true", help="do not write bench/results/")
    args = parser.parse_args()
    if args.quick:
        args.width, args.layers, args.vocab, args.rounds = 256, 2, 1024, 5

    ctx = torch.multiprocessing.get_context("spawn")
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=300))
    parent, child = ctx.Pipe()
    load_before = os.getloadavg()
    procs = [ctx.Process(target=_rank_main, args=(rank, args.world, store.port, args, child))
             for rank in range(args.world)]
    for proc in procs:
        proc.start()
    result = parent.recv()
    for proc in procs:
        proc.join()
    load_after = os.getloadavg()

    samples = result["samples_s"]
    medians = {name: statistics.median(s) for name, s in samples.items()}

    def ratio(a, b):
        return statistics.median(x / y for x, y in zip(samples[a], samples[b]))

    ratios = {
        "torch_fused_clip / fusedclip (speed-up)": ratio("torch_fused_clip", "fusedclip"),
        "fusedclip / torch_fused_noclip (time / unclipped)": ratio("fusedclip",
                                                                   "torch_fused_noclip"),
    }
    print(f"FSDP2, {args.world} {args.device} ranks ({result['threads']} threads each), "
          f"{result['params'] / 1e6:.1f}M parameters in {result['tensors']} tensors "
          f"({result['local_params'] / 1e6:.1f}M on rank 0), {args.rounds} rounds")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    for name, label in VARIANTS.items():
        print(f"  {label:45s} {medians[name] * 1e3:9.1f} ms")
    for label, value in ratios.items():
        print(f"  {label:45s} {value:9.2f}x")
    print(f"  fusedclip all-reduces per step: {len(result['all_reduce_elements'])} "
          f"({result['all_reduce_elements']} float64 elements)")
    if not args.no_write:
        info = machine_info(args.device)
        info["threads"] = result["threads"]
        payload = {"machine": info, "world": args.world, "backend":
                   "nccl" if args.device == "cuda" else "gloo",
                   "model": {"width": args.width, "layers": args.layers, "vocab": args.vocab,
                             "params": result["params"], "tensors": result["tensors"]},
                   "rounds": args.rounds, "warmup": args.warmup,
                   "variants": VARIANTS, "median_s": medians, "samples_s": samples,
                   "ratios": ratios, "fusedclip_all_reduce_elements":
                       result["all_reduce_elements"],
                   "load_average": {"before": load_before, "after": load_after}}
        name = f"distributed-fsdp2-{args.world}ranks" + ("-quick" if args.quick else "")
        print("wrote", write_results(name, payload))


if __name__ == "__main__":
    main()

"""FusedClipAdamW(clip=1.0) against torch.optim.AdamW, on the CPU.

    python bench/bench_adam.py [--cases gpt2,small] [--dtype float32] [--rounds 7]

The AdamW part of bench_optim.py (see there): fusedclip's clipped step against
torch AdamW with fused=True and foreach=True, each with and without
clip_grad_norm_(foreach=True), on GPT-2-small shapes and on 2000 small tensors.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_optim  # noqa: E402

_ADAMW = bench_optim.FAMILIES["adamw"]
# Elements read + written per parameter, by variant (bench_cuda.py's names).
ELEMENTS_MOVED = {
    "fusedclip AdamW clip": _ADAMW.update_elements + 1,
    "torch AdamW fused + clip": _ADAMW.update_elements + bench_optim.CLIP_ELEMENTS,
    "torch AdamW fused": _ADAMW.update_elements,
    "torch AdamW foreach + clip": _ADAMW.foreach_elements + bench_optim.CLIP_ELEMENTS,
    "torch AdamW foreach": _ADAMW.foreach_elements,
    "fusedclip norm pass": 1,
    "fusedclip update pass": _ADAMW.update_elements,
}

if __name__ == "__main__":
    bench_optim.main(["--optim", "adamw", *sys.argv[1:]])

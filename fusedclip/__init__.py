"""fusedclip: gradient clipping fused into PyTorch optimizer steps.

``FusedClipAdam(params, lr=..., clip=1.0)`` replaces
``torch.nn.utils.clip_grad_norm_(params, 1.0)`` followed by
``torch.optim.Adam(params, lr=...).step()`` with one fused step that reads each
gradient twice instead of three times and never waits on the device.
"""

from fusedclip import ops  # noqa: F401  (loads the compiled ops first)
from fusedclip.clipping import (
    AGC, AdaGC, AutoClip, Chain, ClipPolicy, GlobalNorm, Normalize, PerTensorNorm, SmoothClip,
    SpikeClip, ValueClip, ZClip,
)
from fusedclip.optim import (
    FusedClipAdagrad, FusedClipAdam, FusedClipAdamW, FusedClipLion, FusedClipSGD,
)
from fusedclip import tune  # noqa: F401

__all__ = [
    "AGC", "AdaGC", "AutoClip", "Chain", "ClipPolicy", "FusedClipAdagrad", "FusedClipAdam",
    "FusedClipAdamW", "FusedClipLion", "FusedClipSGD", "GlobalNorm", "Normalize",
    "PerTensorNorm", "SmoothClip", "SpikeClip", "ValueClip", "ZClip",
]
__version__ = "0.1.0"

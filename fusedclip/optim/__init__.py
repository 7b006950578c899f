"""The fused optimizers."""

from fusedclip.optim.adam import FusedClipAdam, FusedClipAdamW

__all__ = ["FusedClipAdam", "FusedClipAdamW"]

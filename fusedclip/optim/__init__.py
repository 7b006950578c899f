"""The fused optimizers."""

from fusedclip.optim.adagrad import FusedClipAdagrad
from fusedclip.optim.adam import FusedClipAdam, FusedClipAdamW
from fusedclip.optim.lion import FusedClipLion
from fusedclip.optim.sgd import FusedClipSGD

__all__ = ["FusedClipAdagrad", "FusedClipAdam", "FusedClipAdamW", "FusedClipLion", "FusedClipSGD"]

"""The warning that many steps in a row were skipped, given without a device sync."""

from __future__ import annotations

import warnings

import torch


class SkipMonitor:
    """Warns when many steps in a row were skipped, without a device sync:
    a CPU count is read as it is; a CUDA one from a pinned copy made
    asynchronously at the previous check, once its event has completed."""

    def __init__(self) -> None:
        self.warned_at = 0
        self.pending = None  # (pinned host tensor, event)

    def check(self, opt) -> int | None:
        streak = opt._skips["streak"]
        if streak.device.type == "cpu":
            seen = int(streak)  # sync-ok: CPU memory
        else:
            seen = None
            if self.pending is not None and self.pending[1].query():
                seen = int(self.pending[0])  # sync-ok: a completed pinned copy
                self.pending = None
            if self.pending is None and streak.device.type == "cuda":
                host = torch.empty((), dtype=streak.dtype, pin_memory=True)
                host.copy_(streak, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                self.pending = (host, event)
        limit = opt.warn_after_skips
        if seen is None or not limit:
            return seen
        if seen < limit:
            self.warned_at = 0
        elif seen >= max(limit, 10 * self.warned_at):
            self.warned_at = seen
            warnings.warn(
                f"{type(opt).__name__}: the last {seen} steps were all skipped: the gradients "
                f"held inf or nan (nonfinite={opt.nonfinite!r}) or a GradScaler found inf, so "
                "no parameter has changed since. Check the loss and the gradients; "
                "nonfinite='raise' stops at the first such step. (Set warn_after_skips=0 "
                "to silence this.)", RuntimeWarning, stacklevel=4)
        return seen

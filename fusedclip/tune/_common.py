"""What both tuning tools share: their argument checks, the batches, the model's
trainable parameters, the loss check, the RNG devices, the progress bar and the
plots' figure."""

from __future__ import annotations

import itertools
import numbers
from typing import Iterable, Optional

import torch
from torch import Tensor

from fusedclip._validate import positive


# -- arguments ---------------------------------------------------------------------------
def check_positive(value, name: str) -> float:
    """``value`` as a finite float > 0 (a NaN is out of range like an inf)."""
    return positive(value, name, nan_message=False)


def check_count(value, name: str, minimum: int) -> int:
    """``value`` as an int >= ``minimum`` (a wrong type is a ValueError too)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_trim(trim) -> None:
    if isinstance(trim, bool) or not isinstance(trim, numbers.Real) or not 0.0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim!r}")


def check_loss_fn(loss_fn) -> None:
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(model, batch), got {loss_fn!r}")


def take_batches(batches: Iterable, count: int) -> list:
    """The first ``count`` batches of ``batches`` (fewer if it is shorter),
    held in a list so every probe sees the same batches in the same order."""
    if batches is None:
        raise TypeError("batches must be an iterable of batches, got None")
    try:
        iterator = iter(batches)
    except TypeError:
        raise TypeError("batches must be an iterable of batches, got "
                        f"{type(batches).__name__}") from None
    taken = list(itertools.islice(iterator, count))
    if not taken:
        raise ValueError("batches is empty: loss_fn needs at least one batch")
    return taken


def trainable(model: torch.nn.Module) -> list[Tensor]:
    """The model's parameters that require grad (at least one)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameters with gradients (none has requires_grad=True)")
    return params


def check_loss(loss, where: str) -> float:
    """The loss as a Python float, after checking it is a real floating-point
    scalar tensor (whether it is finite is for the caller to judge)."""
    if not isinstance(loss, Tensor):
        raise TypeError(
            f"loss_fn must return a scalar loss tensor, got {type(loss).__name__} {where}")
    if loss.numel() != 1:
        raise ValueError(
            f"loss_fn must return a scalar loss tensor, got a tensor of shape {tuple(loss.shape)} "
            f"{where} (reduce it, e.g. with .mean())"
        )
    if loss.is_complex() or not loss.is_floating_point():
        raise TypeError(f"loss_fn must return a real floating-point loss, got {loss.dtype} {where}")
    return float(loss.detach())


# -- the run's surroundings --------------------------------------------------------------
def cuda_devices(model: torch.nn.Module) -> list[int]:
    """The CUDA devices of the model's parameters and buffers: those whose RNG
    :func:`torch.random.fork_rng` must save and restore."""
    devices = {p.device.index for p in model.parameters() if p.device.type == "cuda"}
    devices |= {b.device.index for b in model.buffers() if b.device.type == "cuda"}
    return sorted(d if d is not None else torch.cuda.current_device() for d in devices)


def progress_bar(total: int, show: Optional[bool], long_at: int, desc: str):
    """A tqdm bar when tqdm is installed and ``show`` asks for one (None: only
    for ``total >= long_at`` steps); otherwise None (quiet)."""
    if show is False or (show is None and total < long_at):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=False)


# -- plots -------------------------------------------------------------------------------
def new_figure(width: float):
    # The object-oriented API: no pyplot, no change to the user's backend.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, 4.2), layout="constrained")


def check_plot_target(path, drawn_into) -> None:
    if path is None and drawn_into is None:
        raise ValueError("plot() needs a path to write the PNG to, or axes to draw into")

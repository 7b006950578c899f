"""Argument checks shared by the clip policies (``clipping.py``) and the tuning
tools (``tune/``).

Each check returns the value converted (a float or an int) or raises
``TypeError`` (wrong type: a bool is never a number here) or ``ValueError``
(out of range). ``owner``, when given, names what takes the argument and
prefixes the message (``"GlobalNorm: max_norm must ..."``); the tuning tools
give none. A leaf module: it imports nothing from fusedclip.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

__all__ = ["int_arg", "positive", "real_number"]


def _prefix(owner: Optional[str]) -> str:
    return "" if owner is None else f"{owner}: "


def _as_float(value, name: str, owner: Optional[str]) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{_prefix(owner)}{name} must be a real number, got {value!r}")
    return float(value)


def real_number(value, name: str, owner: Optional[str] = None) -> float:
    """``value`` as a float: any real number (inf included) but NaN."""
    value = _as_float(value, name, owner)
    if math.isnan(value):
        raise ValueError(f"{_prefix(owner)}{name} must not be NaN")
    return value


def positive(value, name: str, owner: Optional[str] = None, *, allow_zero: bool = False,
             nan_message: bool = True) -> float:
    """``value`` as a finite float > 0 (>= 0 with ``allow_zero``).

    With ``nan_message`` a NaN gets its own message, as in :func:`real_number`
    (the policies' wording); without, it fails the range check like an inf
    (the tuning tools' wording).
    """
    value = real_number(value, name, owner) if nan_message else _as_float(value, name, owner)
    if not math.isfinite(value) or (value < 0 if allow_zero else value <= 0):
        raise ValueError(
            f"{_prefix(owner)}{name} must be a finite number {'>=' if allow_zero else '>'} 0, "
            f"got {value}"
        )
    return value


def int_arg(value, name: str, owner: Optional[str] = None, minimum: int = 0) -> int:
    """``value`` as an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{_prefix(owner)}{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{_prefix(owner)}{name} must be >= {minimum}, got {value}")
    return int(value)

"""What the examples share: their command line (``--fast``, ``--out``,
``--threads``), a run under a thread count that is put back afterwards, and
the folder their plot goes to (``docs/img`` for a full run, a temporary
folder for a ``--fast`` one, or ``--out``).

The examples import it as ``_common`` from their own folder, which Python
puts first on ``sys.path`` when it runs one of them as a script.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch

DOCS_IMG = Path(__file__).resolve().parent.parent / "docs" / "img"


def parser(doc: str, threads_help: str = "torch threads (default 1: the problem is tiny)",
           fast_flags: tuple[str, ...] = ("--fast",)) -> argparse.ArgumentParser:
    """An example's argument parser, described by the first line of its
    docstring, with the options every example takes."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument(*fast_flags, dest="fast", action="store_true",
                   default=os.environ.get("FUSEDCLIP_EXAMPLES_FAST") == "1",
                   help="a few seconds (also FUSEDCLIP_EXAMPLES_FAST=1)")
    p.add_argument("--out", type=Path, default=None, help="folder for the PNG")
    p.add_argument("--threads", type=int, default=1, help=threads_help)
    return p


def run_with_threads(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """``run(args)`` with torch set to ``args.threads`` threads (0: as it
    is), the caller's count put back afterwards (the tests run the examples
    in their own process)."""
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def output_dir(args: argparse.Namespace) -> Path:
    """Where the plot goes, made if missing."""
    if args.out is not None:
        out = args.out
    elif args.fast:
        out = Path(tempfile.gettempdir()) / "fusedclip-examples"
    else:
        out = DOCS_IMG
    out.mkdir(parents=True, exist_ok=True)
    return out

"""examples/ run in their fast mode, so they never rot.

Each example is imported from its file and its main() run with --fast and a
temporary output folder (in this process: no second torch import); one is also
run as the command a user types, with FUSEDCLIP_EXAMPLES_FAST=1. Each must
return 0, print its table and write its PNG.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NEEDS_MATPLOTLIB = "the examples plot with matplotlib (pip install matplotlib)"


def load(name: str):
    # The examples import their shared helpers (_common.py) from their own
    # folder, which is on sys.path when one runs as a script.
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f"fusedclip_example_{name}",
                                                  EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_fast(name: str, tmp_path, capsys) -> str:
    pytest.importorskip("matplotlib", reason=NEEDS_MATPLOTLIB)
    import torch

    with torch.random.fork_rng():  # the examples seed torch; the other tests keep their RNG
        assert load(name).main(["--fast", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    png = tmp_path / f"{name}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{name} wrote no PNG"
    return out


def test_l0l1_clipping(tmp_path, capsys):
    out = run_fast("l0l1_clipping", tmp_path, capsys)
    assert "| L0 | 16 |" in out and "| L1 | 4 |" in out
    assert "| x0 | ‖∇f(x0)‖ | best fixed step | its steps |" in out
    # the clipped runs reach the target from x0 = 3 (1, 1, 1) within the fast mode's 2000 steps
    row = next(line for line in out.splitlines() if line.startswith("| 3 (1, 1, 1)"))
    clipped = [cell.strip() for cell in row.strip("|").split("|")][-2:]
    assert all(cell.isdigit() for cell in clipped), row


def test_adagrad_intuition(tmp_path, capsys):
    out = run_fast("adagrad_intuition", tmp_path, capsys)
    assert "| coordinate | h_i | SGD lr·h_i |" in out
    assert "find_lr, FusedClipSGD" in out and "find_lr, FusedClipAdagrad" in out


def test_train_digits(tmp_path, capsys):
    pytest.importorskip("sklearn",
                        reason="train_digits.py needs scikit-learn (pip install scikit-learn)")
    out = run_fast("train_digits", tmp_path, capsys)
    assert "| run | lr | max_norm | steps clipped |" in out
    assert "| FusedClipAdamW, tuned |" in out and "| torch AdamW + clip_grad_norm_, tuned |" in out
    # FusedClipAdamW(clip=max_norm) and torch AdamW + clip_grad_norm_ from the same
    # weights on the same batches: over the fast mode's 23 steps their float32
    # losses agree to rounding (1e-5: about 100 float32 ulps of a loss near 1).
    diff = float(re.search(r"differ by at most ([0-9.e+-]+) over", out).group(1))
    assert diff <= 1e-5, out


def test_spikes(tmp_path, capsys):
    out = run_fast("spikes", tmp_path, capsys)
    assert "| run | train loss before the first spike |" in out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert "SpikeClip(theta=5000.0)" in rows
    # nonfinite='propagate' lets the NaN reach the weights; 'skip' skips that one step
    assert rows["no clipping, nonfinite='propagate'"].split("|")[5].strip() == "nan"
    for name in ("no clipping, nonfinite='skip'", "GlobalNorm(1.0)", "ZClip()", "AdaGC()"):
        cells = [c.strip() for c in rows[name].split("|")]
        assert cells[5] != "nan" and cells[6] == "1", rows[name]


def test_an_example_as_a_command(tmp_path):
    """`python examples/spikes.py`, fast mode from the environment."""
    pytest.importorskip("matplotlib", reason=NEEDS_MATPLOTLIB)
    env = dict(os.environ, FUSEDCLIP_EXAMPLES_FAST="1")
    done = subprocess.run([sys.executable, str(EXAMPLES / "spikes.py"), "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "| run | train loss before the first spike |" in done.stdout
    assert (tmp_path / "spikes.png").exists()


def test_bf16_training(tmp_path, capsys):
    out = run_fast("bf16_training", tmp_path, capsys)
    assert "| run | options | train loss, last" in out
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip().strip("|").split("|")]
            for line in out.splitlines() if line.startswith("| ") and not line.startswith("| run ")}
    # memory per parameter: parameter + Adam's two moments (+ the fp32 master)
    memory = {"fp32": 12, "pure bf16": 6, "bf16 + stochastic_rounding": 6,
              "bf16 + master_weights": 14, "fp32 + state_dtype=bf16": 8}
    assert set(rows) == set(memory), out
    for name, bytes_per_param in memory.items():
        loss, held_out, mem = rows[name][2:5]
        assert float(loss) < 10 and float(held_out) < 10, rows[name]  # finite, not diverged
        assert int(mem) == bytes_per_param, rows[name]

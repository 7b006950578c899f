"""The CPU kernels' tuning (fusedclip.ops.cpu_tuning): what it reports, how the
software-prefetch distance is set and refused, and that the distance changes
no result, only the speed."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

import fusedclip
from fusedclip import ops

OPTIMIZERS = {
    "adamw": lambda params: fusedclip.FusedClipAdamW(params, lr=1e-2, clip=1.0),
    "sgd": lambda params: fusedclip.FusedClipSGD(params, lr=0.1, momentum=0.9, clip=1.0),
    "adagrad": lambda params: fusedclip.FusedClipAdagrad(params, lr=0.1, clip=1.0),
}
# Enough elements for the parallel path and several chunks, with odd tails.
SHAPES = [(300, 257), (70001,), (1000,), (5,), ()]


@pytest.fixture
def restore_distance():
    saved = ops.cpu_tuning()[1]
    yield
    ops.cpu_tuning(saved)


def test_reports_the_vector_set_and_the_distance():
    arch, distance = ops.cpu_tuning()
    assert arch in ("avx512", "avx2", "default")
    assert 0 <= distance <= 1 << 20


def test_sets_the_distance(restore_distance):
    arch = ops.cpu_tuning()[0]
    assert ops.cpu_tuning(4096) == (arch, 4096)
    assert ops.cpu_tuning() == (arch, 4096)
    assert ops.cpu_tuning(0) == (arch, 0)


@pytest.mark.parametrize("bad", [-1, (1 << 20) + 1])
def test_a_bad_distance_is_refused_and_changes_nothing(restore_distance, bad):
    before = ops.cpu_tuning(512)
    with pytest.raises(RuntimeError, match=r"prefetch_distance must be a prefetch distance in bytes"):
        ops.cpu_tuning(bad)
    assert ops.cpu_tuning() == before


def run_python(code: str, prefetch_env: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, FUSEDCLIP_CPU_PREFETCH=prefetch_env)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)


def test_the_environment_sets_the_starting_distance():
    result = run_python("from fusedclip import ops; print(ops.cpu_tuning()[1])", "1024")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1024"


@pytest.mark.parametrize("value, message", [
    ("abc", r"FUSEDCLIP_CPU_PREFETCH must be a number of bytes, got 'abc'"),
    ("-64", r"FUSEDCLIP_CPU_PREFETCH must be a prefetch distance in bytes from 0 \(none\)"),
])
def test_a_bad_environment_fails_at_import(value, message):
    result = run_python("import fusedclip", value)
    assert result.returncode != 0
    assert re.search(message, result.stderr), result.stderr


def train(kind: str, dtype: torch.dtype, distance: int) -> tuple[list, list, list]:
    """Three clipped steps from the same start, with the given prefetch
    distance: the parameters, the state tensors and the global norms."""
    ops.cpu_tuning(distance)
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]
    opt = OPTIMIZERS[kind](params)
    norms = []
    for _ in range(3):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) * 0.1).to(dtype)
        opt.step()
        norms.append(opt.clip_stats["grad_norm"])
    state = [v for p in params for v in opt.state[p].values() if isinstance(v, torch.Tensor)]
    return params, state, norms


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_the_distance_changes_no_result(restore_distance, kind, dtype):
    expected = train(kind, dtype, 0)
    for distance in (64, 2048):
        actual = train(kind, dtype, distance)
        for what, a_list, e_list in zip(("params", "state", "norms"), actual, expected):
            assert len(a_list) == len(e_list)
            for a, e in zip(a_list, e_list):
                assert torch.equal(a, e), f"{kind} {dtype}: {what} differ with distance {distance}"

"""Fixtures and hooks of the fusedclip tests (and nothing else): the shared
helpers are in tests/helpers.py, what the suite knows about each optimizer in
tests/registry.py."""

from __future__ import annotations

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long or memory-hungry (CUDA-only tests)")
    config.addinivalue_line("markers", "cuda: runs on a CUDA device (added by conftest)")


@pytest.fixture(autouse=True)
def _default_dtype():
    """Every test starts from float32 as the default dtype."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(saved)


# -- the `cuda` marker: tools/gpu_check.sh runs the CUDA tests first with `-m cuda` ------------
def pytest_collection_modifyitems(config, items):
    """Marks `cuda` every test in a file whose name holds "cuda" and every
    instance of a test with a CUDA device among its parameters (the "cuda"
    instances of the device-parametrized tests, see helpers.device_params)."""
    for item in items:
        params = getattr(item, "callspec", None)
        values = params.params.values() if params is not None else ()
        if "cuda" in item.nodeid.split("::")[0].rsplit("/", 1)[-1] or any(
                (isinstance(v, (str, torch.device)) and str(v).startswith("cuda")) for v in values):
            item.add_marker(pytest.mark.cuda)

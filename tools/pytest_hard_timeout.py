"""A per-test hard time limit for tools/gpu_check.sh where pytest-timeout is
not installed: `-p pytest_hard_timeout` with tools/ on sys.path, and
FUSEDCLIP_TEST_TIMEOUT_S=<seconds> (no limit when unset or 0).

A test still running after that many seconds (setup, call and teardown
together) gets every thread's Python stack dumped to stderr and the pytest
process ended with status 1. faulthandler's watchdog is a C thread, so it fires
even while the main thread is stuck in a call that holds the GIL (a CUDA
synchronize inside an op, say). The stage then ends at once instead of waiting
out its budget; with -v its log names the test that hung.

It uses faulthandler's one dump_traceback_later slot, as pytest's own
faulthandler_timeout does: do not set both.
"""

import faulthandler
import os
import sys

import pytest

LIMIT = float(os.environ.get("FUSEDCLIP_TEST_TIMEOUT_S") or 0)
_STDERR_FD = None


def pytest_configure(config):
    # The real stderr, duplicated before tests run: while a test runs, pytest's
    # output capture points fd 2 at a temporary file that dies with the process.
    global _STDERR_FD
    _STDERR_FD = os.dup(sys.stderr.fileno())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if LIMIT > 0:
        faulthandler.dump_traceback_later(LIMIT, exit=True, file=_STDERR_FD)
    try:
        yield
    finally:
        if LIMIT > 0:
            faulthandler.cancel_dump_traceback_later()

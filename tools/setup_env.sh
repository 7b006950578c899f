#!/usr/bin/env bash
# Creates the project's virtual environment on a machine with nothing set up:
# a venv that sees the system's packages (so an importable torch is used as
# is), torch==2.13.0 (a CPU build) when none is importable, and the build and
# test tools. Safe to run again: it only adds what is missing.
set -euo pipefail

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv --system-site-packages "$VENV"
fi
PY="$VENV/bin/python"

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "setup_env: no importable torch; installing $TORCH_SPEC"
  "$PY" -m pip install -q "$TORCH_SPEC"
fi

missing=()
"$PY" -c "import ninja" >/dev/null 2>&1 || missing+=(ninja)
"$PY" -c "import pytest" >/dev/null 2>&1 || missing+=(pytest)
"$PY" -c "import numpy" >/dev/null 2>&1 || missing+=(numpy)
"$PY" -c "import matplotlib" >/dev/null 2>&1 || missing+=(matplotlib)
"$PY" -c "import setuptools, wheel" >/dev/null 2>&1 || missing+=(setuptools wheel)
# torch.testing._internal.common_optimizers (tests/test_torch_optiminfo.py) imports it.
"$PY" -c "import expecttest" >/dev/null 2>&1 || missing+=(expecttest)
if [ ${#missing[@]} -gt 0 ]; then
  "$PY" -m pip install -q "${missing[@]}"
fi
# Optional: scikit-learn (examples/train_digits.py) and tqdm (fusedclip.tune's
# progress bars). The tests skip what they cannot import, so a failed install
# (offline, say) only says so.
optional=()
"$PY" -c "import sklearn" >/dev/null 2>&1 || optional+=(scikit-learn)
"$PY" -c "import tqdm" >/dev/null 2>&1 || optional+=(tqdm)
if [ ${#optional[@]} -gt 0 ] \
    && ! "$PY" -m pip install -q --retries 1 --timeout 15 "${optional[@]}"; then
  echo "setup_env: could not install ${optional[*]}; the tests that need them will skip"
fi
"$PY" -c "import torch; print('setup_env: torch', torch.__version__, 'at', torch.__file__)"

# --- Frameworks for tests/test_frameworks.py (optional) -----------------------
# transformers, accelerate and lightning (and torchao, which bench/bench_precision.py
# compares with), installed in one pip command together
# with a pin of the torch already installed, so pip never swaps torch (for a
# CUDA build, say). The versions are the ones the tests were run with;
# FRAMEWORKS_SPEC overrides them, FUSEDCLIP_FRAMEWORKS=0 skips this block.
# Offline, or where these versions do not install, it says so and goes on:
# tests/test_frameworks.py then skips what it cannot import.
FRAMEWORKS_SPEC=${FRAMEWORKS_SPEC:-"transformers==5.24.0 accelerate==1.15.0 lightning==2.6.6 torchao==0.18.0"}
if [ "${FUSEDCLIP_FRAMEWORKS:-1}" != 0 ] \
    && ! "$PY" -c "import transformers, accelerate, lightning, torchao" >/dev/null 2>&1; then
  torch_pin="torch==$("$PY" -c "import torch; print(torch.__version__)")"
  echo "setup_env: installing $FRAMEWORKS_SPEC with $torch_pin"
  # shellcheck disable=SC2086  # FRAMEWORKS_SPEC is a list of requirements
  if ! "$PY" -m pip install -q --retries 1 --timeout 15 $FRAMEWORKS_SPEC "$torch_pin"; then
    echo "setup_env: could not install the frameworks (offline?); tests/test_frameworks.py will skip them"
  fi
fi

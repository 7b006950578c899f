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

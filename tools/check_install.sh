#!/usr/bin/env bash
# What a user installs, tested: builds the sdist, builds a wheel from that
# sdist (not from the tree), installs the wheel into a fresh venv (no system
# packages), and from a folder outside the source tree runs a smoke test, the
# test suite (the sdist's own tests/ and examples/) against the installed
# package (less its two slowest files), and the bit-for-bit torch checks once more with the CPU kernels
# capped one vector set below the widest this CPU runs, torch capped to match.
# A module, header or test file missing from the sdist or the wheel fails here.
#
#   PYTHON     an interpreter with torch (make env's venv): its torch version is
#              the one installed into the fresh venv, which builds everything
#   WORK       scratch folder (default: a new temporary one, removed at the end)
#   SUITE=0    skip the full suite (the smoke test and bitwise run still run)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
if [ -z "${WORK:-}" ]; then
  WORK=$(mktemp -d /tmp/fusedclip-install.XXXXXX)
  trap 'rm -rf "$WORK"' EXIT
fi
mkdir -p "$WORK"
stage() { echo "check_install: $* ($(date +%T))"; }

stage "fresh venv"
TORCH_VERSION=$("$PYTHON" -c "import torch; print(torch.__version__)")  # with its +cpu/+cuXYZ
VENV="$WORK/venv"
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
VPY="$VENV/bin/python"
"$VPY" -m pip install -q "torch==$TORCH_VERSION" setuptools wheel ninja build pytest numpy expecttest

stage "sdist"
rm -rf "$WORK/dist"
(cd "$ROOT" && "$VPY" -m build --sdist --no-isolation --outdir "$WORK/dist" . >"$WORK/sdist.log" 2>&1) \
  || { cat "$WORK/sdist.log"; exit 1; }
SDIST=$(ls "$WORK"/dist/fusedclip-*.tar.gz)
echo "check_install: $(basename "$SDIST"): $(tar tzf "$SDIST" | grep -vc '/$') files"

stage "wheel from the sdist"
# --no-build-isolation: built against the torch just installed (README, "Installing").
"$VPY" -m pip wheel -q --no-build-isolation --no-deps -w "$WORK/dist" "$SDIST"
WHEEL=$(ls "$WORK"/dist/fusedclip-*.whl)
echo "check_install: $(basename "$WHEEL"): $(du -k "$WHEEL" | cut -f1) KiB"
"$VPY" -m pip install -q "$WHEEL[tune]"

# The tests and examples as the sdist ships them, in a folder that holds no
# fusedclip package: `import fusedclip` can only find the installed one.
RUN="$WORK/run"
rm -rf "$RUN" && mkdir -p "$RUN"
tar xzf "$SDIST" -C "$RUN" --strip-components=1 --wildcards '*/tests/*' '*/examples/*'
cd "$RUN"

stage "smoke test"
"$VPY" - <<'PY'
import importlib.metadata
import os
import sysconfig

import torch

import fusedclip

site = os.path.realpath(sysconfig.get_paths()["purelib"])
where = os.path.realpath(fusedclip.__file__)
assert where.startswith(site + os.sep), f"fusedclip imported from {where}, not from {site}"
assert importlib.metadata.version("fusedclip") == fusedclip.__version__
model = torch.nn.Linear(64, 8)
opt = fusedclip.FusedClipAdamW(model.parameters(), lr=1e-3, clip=1.0)
model(torch.randn(4, 64)).square().sum().backward()
opt.step()
assert torch.isfinite(opt.clip_stats["grad_norm"])
print(f"check_install: fusedclip {fusedclip.__version__} from {where}, "
      f"cpu_tuning {fusedclip.ops.cpu_tuning()}")
PY

if [ "${SUITE:-1}" != 0 ]; then
  stage "suite against the installed package"
  # Less the two slowest files, test_compile (inductor compiles) and test_distributed
  # (spawned gloo processes): the tree's run covers their code paths, which are pure Python
  # over the same ops; what can differ here (a missing module, header or test file, the
  # wheel's .so) every other file still reaches. CI's time budget is why.
  "$VPY" -m pytest -q -p no:cacheprovider tests \
    --ignore=tests/test_compile.py --ignore=tests/test_distributed.py
fi

# One vector set below the widest this CPU runs (nothing below default).
WIDEST=$("$VPY" -c "import fusedclip; print(fusedclip.ops.cpu_tuning()[0])")
case "$WIDEST" in
  avx512) LOWER=avx2 ;;
  avx2) LOWER=default ;;
  *) LOWER= ;;
esac
if [ -n "$LOWER" ]; then
  stage "bitwise torch checks with FUSEDCLIP_CPU_CAPABILITY=$LOWER ATEN_CPU_CAPABILITY=$LOWER"
  export FUSEDCLIP_CPU_CAPABILITY=$LOWER ATEN_CPU_CAPABILITY=$LOWER
  "$VPY" -c "import fusedclip, sys; got = fusedclip.ops.cpu_tuning()[0]; sys.exit(got != '$LOWER' and f'runs {got}, not $LOWER')"
  "$VPY" -m pytest -q -p no:cacheprovider tests/test_bitwise_torch.py tests/test_torch_optiminfo.py
else
  echo "check_install: the CPU kernels run the default set: no lower set to check"
fi
stage "done"

#!/usr/bin/env bash
# Everything a run on a lent GPU machine does, in one command that ends within
# a fixed budget (default 450 s) and always exits 0, so that its logs come back:
#
#   bash tools/gpu_check.sh OUTDIR               # on the GPU machine: bash tools/gpu_check.sh "$OUT"
#   bash tools/gpu_check.sh --rehearse OUTDIR    # anywhere: every stage, the GPU parts skipped
#
# Stages, each under `timeout` with its own budget (the time left, less what the
# later stages need), in this order:
#   versions   GPU, driver, torch, CUDA, nvcc, compilers, cores   -> versions.json
#   build      python setup.py build_ext --inplace, FUSEDCLIP_CUDA=1 and
#              TORCH_CUDA_ARCH_LIST from the GPU's compute capability, MAX_JOBS = all cores
#   kernels    every fusedclip op has its CUDA kernel registered   -> kernels.json
#   cuda-tests pytest -m cuda (tests/conftest.py marks them), one pytest per file,
#              kernel-only checks (test_cuda.py) first, --maxfail, a per-test limit
#   cuda-vs-cpu  tools/cuda_vs_cpu.py: the largest CUDA-vs-CPU trajectory differences
#              per dtype (ulps, relative, fraction of CUDA_VS_CPU) -> cuda_vs_cpu.json
#   bench      bench/bench_cuda.py (--quick below 90 s)            -> bench_cuda.json
#   suite      the rest of the suite (pytest -m 'not cuda'), which CI runs too: last,
#              in whatever time is left, --maxfail, the same limit
#   summary    results.json and summary.txt (one screen, printed last)
# OUTDIR gets (the device tool brings back at most 8 files): gpu_check.log (the
# console), summary.txt, results.json, versions.json, cuda_vs_cpu.json,
# bench_cuda.json and logs.tar.gz (every stage's <stage>.log, junit-*.xml,
# stages.tsv: one line per stage), refreshed after every stage.
#
# --rehearse (automatic when torch sees no GPU): the same stages with the GPU
# parts skipped: the build is setup.py's default (the CUDA kernels too where the
# torch has CUDA and a toolkit is found), the CUDA tests skip themselves,
# cuda_vs_cpu.py compares the CPU with itself and bench_cuda.py runs shrunken
# cases on the CPU. The budget is then GPU_CHECK_BUDGET_S or 1800 s, each stage's
# cap 4x.
#
#   PYTHON               interpreter (default: python3, else python: the first that imports torch)
#   GPU_CHECK_BUDGET_S   total budget in seconds (default 450; 1800 rehearsing)
#   GPU_CHECK_TEST_TIMEOUT_S  hard limit per test (default 120 s; 4x rehearsing)
#   FUSEDCLIP_CUDA, TORCH_CUDA_ARCH_LIST, MAX_JOBS  override the build's choices

set -u
# Everything below is one function, called on the last line: bash has read the
# whole file before the first stage starts (an edit to the file during a run
# cannot change it).
main() {
START=$SECONDS
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 0

MODE=auto
OUTDIR=
for arg in "$@"; do
  case "$arg" in
    --rehearse) MODE=rehearse ;;
    -h|--help) sed -n '2,34p' "${BASH_SOURCE[0]}"; exit 0 ;;
    -*) echo "gpu_check: unknown option $arg" >&2; exit 2 ;;
    *) OUTDIR=$arg ;;
  esac
done
if [[ -z "$OUTDIR" ]]; then
  echo "usage: bash tools/gpu_check.sh [--rehearse] OUTDIR" >&2
  exit 2
fi
mkdir -p "$OUTDIR" && OUTDIR=$(cd "$OUTDIR" && pwd) || exit 0
# The stages write into WORK; OUTDIR receives at most 8 files (what the device
# tool brings back): the console, a tarball of WORK refreshed after every stage
# (so a run cut short still returns its logs), and the summary and JSON results.
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 0
: > "$WORK/stages.tsv"
exec > >(tee -a "$OUTDIR/gpu_check.log") 2>&1

if [[ -z "${PYTHON:-}" ]]; then
  # The first of python3, python that imports torch (on the GPU machine, python3).
  PYTHON=python3
  for candidate in python3 python; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import torch' >/dev/null 2>&1; then
      PYTHON=$(command -v "$candidate")
      break
    fi
  done
fi
export PYTHONPATH="$ROOT:$ROOT/tools${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONFAULTHANDLER=1 PYTHONUNBUFFERED=1

HAS_GPU=$("$PYTHON" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
if [[ "$MODE" == auto ]]; then
  if [[ "$HAS_GPU" == 1 ]]; then MODE=gpu; else MODE=rehearse; fi
fi
if [[ "$MODE" == gpu ]]; then
  BUDGET=${GPU_CHECK_BUDGET_S:-450}; CAP_FACTOR=1
else
  BUDGET=${GPU_CHECK_BUDGET_S:-1800}; CAP_FACTOR=4
fi
TEST_TIMEOUT=${GPU_CHECK_TEST_TIMEOUT_S:-$((120 * CAP_FACTOR))}
DEADLINE=$((START + BUDGET))
CORES=$(nproc 2>/dev/null || echo 1)
echo "gpu_check: mode $MODE, budget ${BUDGET} s, python $PYTHON, $CORES cores, out $OUTDIR" \
     "(work $WORK),"  \
     "started $(date -u +%Y-%m-%dT%H:%M:%SZ)"
[[ "$MODE" == rehearse ]] && echo "gpu_check: REHEARSAL (no GPU in use): the GPU parts are skipped"

# run_stage NAME CAP RESERVE CMD...: runs CMD under `timeout` for at most CAP
# seconds (times CAP_FACTOR) and never into the last RESERVE seconds of the
# budget (kept for the later stages); output to WORK/NAME.log; one line to
# stages.tsv: name, status (ok, FAIL, TIMEOUT: the stage's or one test's limit,
# SKIP), exit code, seconds, budget.
STAGE_RC=0
run_stage() {
  local name=$1 cap=$(($2 * CAP_FACTOR)) reserve=$3
  shift 3
  local left=$((DEADLINE - SECONDS - reserve))
  local budget=$((cap < left ? cap : left))
  local log="$WORK/$name.log"
  if ((budget < 5)); then
    printf '%s\tSKIP\t-\t0\t%s\tno time left\n' "$name" "$budget" >> "$WORK/stages.tsv"
    echo "== $name: SKIP (no time left)"
    STAGE_RC=125
    publish
    return
  fi
  echo "== $name (budget ${budget} s): $*"
  local t0=$SECONDS status
  timeout --kill-after=10 "$budget" "$@" > "$log" 2>&1 < /dev/null
  STAGE_RC=$?
  case $STAGE_RC in
    0) status=ok ;;
    124|137) status=TIMEOUT ;;
    *) status=FAIL ;;
  esac
  # A test past its hard limit ended pytest (faulthandler's or pytest-timeout's dump).
  if [[ $status == FAIL ]] && grep -q '^Timeout ([0-9:]*)!\|^+* Timeout +*$' "$log"; then
    status=TIMEOUT
  fi
  printf '%s\t%s\t%s\t%s\t%s\t\n' "$name" "$status" "$STAGE_RC" "$((SECONDS - t0))" "$budget" \
    >> "$WORK/stages.tsv"
  echo "   $status (exit $STAGE_RC, $((SECONDS - t0)) s); log $log"
  if [[ $status != ok ]]; then
    tail -n 15 "$log" | awk '{ print "   | " $0 }'   # (awk ends a cut-off last line)
  fi
  publish
}

skip_stage() {
  printf '%s\tSKIP\t-\t0\t0\t%s\n' "$1" "$2" >> "$WORK/stages.tsv"
  echo "== $1: SKIP ($2)"
  publish
}

# WORK -> OUTDIR: logs.tar.gz (everything) and the result files that exist.
publish() {
  tar -czf "$OUTDIR/logs.tar.gz.part" -C "$WORK" . 2>/dev/null \
    && mv -f "$OUTDIR/logs.tar.gz.part" "$OUTDIR/logs.tar.gz"
  local f
  for f in summary.txt results.json bench_cuda.json cuda_vs_cpu.json versions.json; do
    [[ -f "$WORK/$f" ]] && cp -f "$WORK/$f" "$OUTDIR/$f"
  done
}

# pytest's per-test hard limit: pytest-timeout where installed, else
# tools/pytest_hard_timeout.py (faulthandler's watchdog: dumps every stack and
# ends pytest). Either way the stage's `timeout` is the last resort.
if "$PYTHON" -c 'import pytest_timeout' >/dev/null 2>&1; then
  TIMEOUT_ARGS=(--timeout="$TEST_TIMEOUT" --timeout-method=thread)
else
  TIMEOUT_ARGS=(-p pytest_hard_timeout)
  export FUSEDCLIP_TEST_TIMEOUT_S=$TEST_TIMEOUT
fi
# -o log_level=WARNING: a failure's report leaves out torch's DEBUG log records.
PYTEST=("$PYTHON" -m pytest -v -rfEs -p no:cacheprovider -o log_level=WARNING
        "${TIMEOUT_ARGS[@]}")

# -- versions ---------------------------------------------------------------------------------
run_stage versions 60 0 "$PYTHON" tools/gpu_check_report.py versions "$WORK"
cat "$WORK/versions.log" 2>/dev/null

# -- build -------------------------------------------------------------------------------------
if [[ "$MODE" == gpu ]]; then
  export FUSEDCLIP_CUDA=${FUSEDCLIP_CUDA:-1}
  if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
    TORCH_CUDA_ARCH_LIST=$("$PYTHON" -c \
      'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null)
    export TORCH_CUDA_ARCH_LIST
  fi
else
  # setup.py's default; with a CUDA torch and a toolkit the kernels are built
  # (for the H100/H200's 9.0) and checked for registration, not run.
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
fi
export MAX_JOBS=${MAX_JOBS:-$CORES}
echo "gpu_check: build with FUSEDCLIP_CUDA=${FUSEDCLIP_CUDA:-<auto>}" \
     "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
# What a stale build left must not pass for this one.
rm -f fusedclip/_C*.so
run_stage build 300 165 "$PYTHON" setup.py build_ext --inplace
BUILD_OK=$([[ $STAGE_RC == 0 ]] && echo 1 || echo 0)

# -- kernels -----------------------------------------------------------------------------------
if [[ $BUILD_OK == 1 ]]; then
  run_stage kernels 60 150 "$PYTHON" tools/gpu_check_report.py kernels "$WORK" "$MODE"
  cat "$WORK/kernels.log" 2>/dev/null
else
  skip_stage kernels "no build"
fi

# -- CUDA tests, one pytest per file -------------------------------------------------------------
if [[ $BUILD_OK == 1 ]]; then
  run_stage cuda-collect 60 150 "$PYTHON" -m pytest -p no:cacheprovider --collect-only -q \
    -m cuda tests
  # Kernel-only checks first, then the trajectories, the no-sync test, the rest;
  # files not named here after them.
  PRIORITY="test_cuda test_cuda_precision test_ops test_reference test_parity test_cuda_nosync"
  PRIORITY="$PRIORITY test_nonfinite"
  PRIORITY="$PRIORITY test_state_dict test_amp test_compile"
  mapfile -t FOUND < <(sed -n 's/^\(tests\/[^:]*\.py\)::.*/\1/p' "$WORK/cuda-collect.log" \
                       | sort -u)
  CUDA_FILES=()
  for name in $PRIORITY; do
    for f in "${FOUND[@]}"; do [[ "$f" == "tests/$name.py" ]] && CUDA_FILES+=("$f"); done
  done
  for f in "${FOUND[@]}"; do
    [[ " ${CUDA_FILES[*]} " == *" $f "* ]] || CUDA_FILES+=("$f")
  done
  echo "   files with CUDA tests: ${CUDA_FILES[*]:-none}"
  # The CUDA tests' share: up to 240 s (x CAP_FACTOR), never into the last
  # 165 s (cuda-vs-cpu, bench and summary); each file leaves 15 s to each after it.
  CUDA_END=$((SECONDS + 240 * CAP_FACTOR))
  ((CUDA_END > DEADLINE - 165)) && CUDA_END=$((DEADLINE - 165))
  for i in "${!CUDA_FILES[@]}"; do
    file=${CUDA_FILES[$i]}
    after=$((${#CUDA_FILES[@]} - i - 1))
    base=$(basename "$file" .py)
    run_stage "cuda-tests-$base" 180 $((DEADLINE - CUDA_END + 15 * after)) \
      "${PYTEST[@]}" -m cuda --maxfail=20 --junitxml="$WORK/junit-cuda-tests-$base.xml" "$file"
  done
else
  skip_stage cuda-tests "no build"
fi

# -- CUDA vs CPU trajectories (CUDA_VS_CPU's bfloat16/float16 entries) --------------------------
if [[ $BUILD_OK == 1 ]]; then
  DEVICE=$([[ "$MODE" == gpu ]] && echo cuda || echo cpu)
  # No new run after the stage's budget less 15 s, so that it writes its JSON.
  left=$((DEADLINE - SECONDS - 105))
  ((left > 60 * CAP_FACTOR)) && left=$((60 * CAP_FACTOR))
  run_stage cuda-vs-cpu 60 105 "$PYTHON" tools/cuda_vs_cpu.py --device "$DEVICE" \
    --budget-s $((left > 25 ? left - 15 : 10)) --json "$WORK/cuda_vs_cpu.json"
  cat "$WORK/cuda-vs-cpu.log" 2>/dev/null
else
  skip_stage cuda-vs-cpu "no build"
fi

# -- benchmark ----------------------------------------------------------------------------------
if [[ $BUILD_OK == 1 ]]; then
  # Its own budget: the stage's (cap, or the time left) less 20 s, so that it
  # ends its last case and writes its JSON before `timeout` would stop it. The
  # full run (21 rounds) is expected to take well under a minute on an H200.
  left=$((DEADLINE - SECONDS - 15))
  ((left > 120 * CAP_FACTOR)) && left=$((120 * CAP_FACTOR))
  BENCH_ARGS=(--json "$WORK/bench_cuda.json" --budget-s $((left > 25 ? left - 20 : 5)))
  [[ "$MODE" != gpu ]] && BENCH_ARGS+=(--rehearse)
  ((left < 90)) && BENCH_ARGS+=(--quick)
  run_stage bench 120 15 "$PYTHON" bench/bench_cuda.py "${BENCH_ARGS[@]}"
  tail -n 40 "$WORK/bench.log" 2>/dev/null
else
  skip_stage bench "no build"
fi

# -- the rest of the suite (CI runs it too: last, in whatever time is left) ------------------------------------------------------------------------
if [[ $BUILD_OK == 1 ]]; then
  run_stage suite 240 15 "${PYTEST[@]}" -m "not cuda" --maxfail=10 \
    --junitxml="$WORK/junit-suite.xml" tests
else
  skip_stage suite "no build"
fi

# -- summary ------------------------------------------------------------------------------------
echo "gpu_check: finished the stages in $((SECONDS - START)) s"
if ! timeout 60 "$PYTHON" tools/gpu_check_report.py summary "$WORK" "$MODE" "$BUDGET" \
    > "$WORK/summary.log" 2>&1; then
  cat "$WORK/summary.log"
  { echo "gpu_check: the summary script failed; the stages:"; cat "$WORK/stages.tsv"; } \
    > "$WORK/summary.txt"
fi
publish
echo
cat "$WORK/summary.txt"
rm -rf "$WORK"   # all of it is in OUTDIR/logs.tar.gz
exit 0
}

main "$@"

# make bench: set up, build, and benchmark fusedclip against torch.optim (bench_optim.py),
#             then its precision modes against torch and torchao (bench_precision.py).
# make test:  set up, build, and run the test suite.
# Both work on a fresh machine: tools/setup_env.sh makes .venv (using an
# importable torch, else torch==2.13.0) and the build runs against that torch.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
SOURCES := setup.py $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')

.PHONY: bench test build env cuda-check install-check clean

bench: build
	$(PY) bench/bench_optim.py
	$(PY) bench/bench_precision.py

test: build
	$(PY) -m pytest -q tests

build: $(VENV)/.fusedclip-built

env: $(VENV)/.env-ready

$(VENV)/.env-ready: tools/setup_env.sh
	PYTHON=$(PYTHON) VENV=$(VENV) bash tools/setup_env.sh
	touch $@

# pip builds the extension in place (editable install) against the venv's torch.
$(VENV)/.fusedclip-built: $(VENV)/.env-ready $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

# Compiles every CUDA source with nvcc for sm_80 and sm_90, then links them with
# csrc/ops.cpp against the toolkit's cudart and torch's libraries as the build
# does (no GPU needed; with a CPU-only torch, c10_cuda/torch_cuda are left out).
cuda-check: env
	PYTHON=$(PY) bash tools/check_cuda_compile.sh

# What users install, tested: the sdist, a wheel built from it, installed into a
# fresh venv and tested from outside the source tree (tools/check_install.sh).
install-check: env
	PYTHON=$(PY) bash tools/check_install.sh

clean:
	rm -rf build fusedclip/_C*.so *.egg-info $(VENV)/.fusedclip-built

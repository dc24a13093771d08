# Two entry points (see README): `make demo` and `make test` (`make test-fast`: its fast tier). They create .venv
# and install on a fresh machine.
# The CPU torch wheel is installed first and pinned so that resolving `torch>=2.4` never pulls a CUDA build;
# on a GPU machine set TORCH_SPEC (e.g. TORCH_SPEC=torch) to take the default build.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE=1
export HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false

.PHONY: setup demo test test-fast lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,eval]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/dwm demo --out runs/demo

test: setup
	$(PY) -m pytest tests

# the fast tier (under a minute on 2 cores): no subprocess, multi-process or multi-second tests; fails if a
# dwm module is imported by no test of the tier (tests/conftest.py)
test-fast: setup
	DWM_FAST_COVERAGE=1 $(PY) -m pytest tests -m "not slow"

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf runs .pytest_cache

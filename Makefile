# diffq on a fresh machine: `make up` runs the service, `make test` runs the checks and the tests.
# Both first create .venv and install diffq into it (once; again when pyproject.toml changes).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed first and pinned: a bare `torch` requirement would let pip pick a
# multi-GB CUDA build on a CPU-only machine. Override for another build, e.g. TORCH='torch==2.13.0+cu128'.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.diffq-installed

.PHONY: install up check test

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet '$(TORCH)'
	$(BIN)/python -m pip install --quiet -e '.[api,worker,embedded,test]'
	touch $(STAMP)

up: install
	$(BIN)/diffq up

# Lint and type checks of app/, worker/ and model/ (settings in pyproject.toml); must be clean.
check: install
	$(BIN)/ruff check
	$(BIN)/ruff format --check
	$(BIN)/mypy

test: check
	$(BIN)/python -m pytest

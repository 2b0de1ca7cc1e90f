# Two commands set everything up on a fresh machine: `make sweep` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SWEEP ?= sweeps/plateau.yaml
WORKERS ?= $(shell nproc 2>/dev/null || echo 1)

.PHONY: sweep test test-slow lint report ui browser clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

sweep: $(STAMP)
	$(BIN)/lstm-sweep run $(SWEEP) --workers $(WORKERS)
	$(BIN)/lstm-sweep report $(SWEEP)

test: lint
	$(BIN)/pytest -q -m "not slow"

test-slow: $(STAMP)
	$(BIN)/pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

report: $(STAMP)
	$(BIN)/lstm-sweep report $(SWEEP)

ui: $(STAMP)
	$(BIN)/lstm-sweep ui

browser:
	scripts/install-browser.sh

clean:
	rm -rf $(VENV) results/*/ results/mlflow.db

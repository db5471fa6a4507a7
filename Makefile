# make run: set up .venv and run the default sparsification on the bundled MNIST subset.
# make test: set up .venv if needed, lint, and run the whole test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py src/probmask/kernels/_cpu.c
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/probmask run

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs

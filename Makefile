# make run: set up .venv and run the default sparsification on the bundled MNIST subset.
# make test: set up .venv if needed, lint, run the whole test suite (with the fused kernels), then the
#            mask, projection and ProbMask tests again with the kernels off (PROBMASK_KERNELS=0).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint venv clean

venv: $(STAMP)

KERNELS_OFF_TESTS := tests/test_masks.py tests/test_projection.py tests/test_sparsifier.py

$(STAMP): pyproject.toml setup.py src/probmask/kernels/_cpu.c
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/probmask run

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/python -m pytest
	PROBMASK_KERNELS=0 $(BIN)/python -m pytest $(KERNELS_OFF_TESTS)

clean:
	rm -rf $(VENV) runs

# Quick start:  make run   (set up, train the nano preset on the sample data, evaluate)
#               make test  (set up, run the whole test suite)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test test-fast test-slow test-unit test-integration bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	# libtpu (the version jax pins) in a folder of its own, for the AOT TPU
	# compile test only: ordinary CPU runs never load the TPU runtime.
	$(BIN)/pip install --quiet --target $(VENV)/libtpu "$$($(BIN)/python -c "import importlib.metadata as m; print([r.split(';')[0].strip() for r in m.requires('jax') if r.startswith('libtpu')][0])")"
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/python train.py configs/nano.yaml
	$(BIN)/python eval.py configs/nano.yaml

# The suite in two passes: everything but the slow end-to-end runs (under
# 10 minutes on 2 cores), then those (tests marked `slow`).
test: test-fast test-slow

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --durations=15 -m 'not slow'

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --durations=15 -m slow

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 tests/unit

test-integration: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 tests/integration

bench: $(STAMP)
	$(BIN)/python bench/train_step.py

clean:
	rm -rf runs $(VENV)

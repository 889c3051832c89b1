# Quick start:  make run   (set up, train the nano preset on the sample data, evaluate)
#               make test  (set up, run the whole test suite)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run lock test test-fast test-slow test-unit test-integration bench clean

$(STAMP): pyproject.toml requirements.lock
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The tested versions (requirements.lock), then gemjax itself.
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e '.[dev]'
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

# Re-resolves pyproject's dependency ranges (core + dev) in a scratch venv
# and writes the versions it got to requirements.lock.
lock:
	rm -rf .venv-lock
	$(PY) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet --upgrade pip
	.venv-lock/bin/pip install --quiet -e '.[dev]'
	{ echo '# Exact versions the test suite passed with (CPython 3.11, Linux x86_64).'; \
	  echo '# make setup installs these, then gemjax itself with --no-deps.'; \
	  echo '# Regenerate from pyproject'"'"'s ranges with: make lock'; \
	  .venv-lock/bin/pip freeze --exclude-editable; } > requirements.lock
	rm -rf .venv-lock

clean:
	rm -rf runs $(VENV)

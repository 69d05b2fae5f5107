# Each target creates .venv and installs everything it needs from nothing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: demo test lint format clean bench bench-full

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	$(PY) examples/prune_fashion_mnist.py

test: $(VENV)/.installed
	$(PY) -m pytest $(PYTEST_ARGS)

# Speed and memory vs tfmot 0.8.1 and plain Keras (about 20 minutes; the
# full run about an hour). Tables: benchmarks/README.md.
bench: $(VENV)/.installed
	bash benchmarks/bench.sh

bench-full: $(VENV)/.installed
	bash benchmarks/bench.sh --full

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests examples benchmarks
	$(VENV)/bin/ruff format --check src tests examples benchmarks

format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix src tests examples benchmarks
	$(VENV)/bin/ruff format src tests examples benchmarks

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache

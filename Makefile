# Each target creates .venv and installs everything it needs from nothing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# Tests run in parallel, one worker per core (pytest-xdist), at most 4: each
# worker is a process of its own with TensorFlow loaded. PYTEST_JOBS= runs
# them in this process, one after another.
PYTEST_JOBS ?= -n auto --maxprocesses 4

.PHONY: demo test test-all lint format clean bench bench-full bench-latency \
	bench-equal-size docs

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

# JAX and torch, about a third of the install: only for test-all and for
# a target run with KERAS_BACKEND=jax or torch.
$(VENV)/.backends: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[dev,backends]"
	touch $@

# What a target needs to run on the backend KERAS_BACKEND names
# (TensorFlow when unset).
ON_BACKEND := $(VENV)/.installed \
	$(if $(filter jax torch,$(KERAS_BACKEND)),$(VENV)/.backends)

demo: $(ON_BACKEND)
	$(PY) examples/prune_fashion_mnist.py

# The fast suite (no slow tests, a few minutes); the backend comes from
# KERAS_BACKEND (tensorflow when unset). PYTEST_ARGS="-m slow" runs the slow
# tests only, PYTEST_ARGS="-m ''" all of them.
test: $(ON_BACKEND)
	$(PY) -m pytest $(PYTEST_JOBS) -m "not slow" $(PYTEST_ARGS)

# Every test, slow ones included, on each backend (what CI runs).
test-all: $(VENV)/.backends
	KERAS_BACKEND=tensorflow $(PY) -m pytest $(PYTEST_JOBS) $(PYTEST_ARGS)
	KERAS_BACKEND=jax $(PY) -m pytest $(PYTEST_JOBS) $(PYTEST_ARGS)
	KERAS_BACKEND=torch $(PY) -m pytest $(PYTEST_JOBS) $(PYTEST_ARGS)

# Speed and memory vs tfmot 0.8.1 and plain Keras (about 20 minutes; the
# full run about an hour). Tables: benchmarks/README.md.
bench: $(ON_BACKEND)
	bash benchmarks/bench.sh

bench-full: $(ON_BACKEND)
	bash benchmarks/bench.sh --full

# Dense vs structured-pruned CPU latency, Keras and LiteRT, for ResNet50,
# MobileNetV2 and a BERT encoder (issue 13; about 6 minutes on 2 cores;
# BENCH_ARGS=--quick for a smoke run). Keras also times both models with
# BatchNormalization folded. Levers for both models alike:
# BENCH_ARGS="--tf-threads 1", TF_ENABLE_ONEDNN_OPTS=0 make bench-latency.
# Table: benchmarks/README.md.
BENCH_ARGS ?=
bench-latency: $(VENV)/.installed
	KERAS_BACKEND=tensorflow $(PY) benchmarks/latency.py $(BENCH_ARGS)
	$(PY) benchmarks/latency.py --summary $(filter --quick,$(BENCH_ARGS))

# Test accuracy at equal parameter count on Fashion-MNIST (32x32x3,
# MobileNetV2): structured-pruned and shrunk vs unstructured vs a narrower
# dense model, 3 seeds (issue 13; 20 to 36 minutes on 2 busy cores;
# BENCH_ARGS=--quick for a smoke run). Table: benchmarks/README.md.
bench-equal-size: $(ON_BACKEND)
	$(PY) benchmarks/equal_size_accuracy.py $(BENCH_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests examples benchmarks
	$(VENV)/bin/ruff format --check src tests examples benchmarks

format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix src tests examples benchmarks
	$(VENV)/bin/ruff format src tests examples benchmarks

$(VENV)/.docs-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[docs]"
	touch $@

# The API reference and the guides in docs/, into site/; any warning (a
# broken link, a docstring argument the signature lacks) fails the build.
docs: $(VENV)/.docs-installed
	$(VENV)/bin/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) out site .pytest_cache .ruff_cache

# Two commands do everything on a fresh machine: `make demo` and `make test`.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.maxq-installed
FMNIST  := /usr/share/datasets/fashion-mnist
SUDO    := $(shell [ "$$(id -u)" -ne 0 ] && command -v sudo)

# The package requires version ranges (pyproject.toml); make installs our exact versions (constraints/dev.txt).
CONSTRAINTS := constraints/dev.txt
EXTRAS      := dev,onnx,lightning,hf,docs
# The oldest PyTorch we support (make test-oldest): its own venv, its own pins.
OLDEST_VENV ?= .venv-oldest
OLDEST_PY   := $(OLDEST_VENV)/bin/python

.PHONY: demo test test-oldest docs docs-serve lint format data install clean

# pip byte-compiles what it installs on one core (about 50 s of a fresh install); compileall does it on every core.
# Failures there are pip's too (files it would skip): they do not stop the install.
$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-compile -c $(CONSTRAINTS) -e '.[$(EXTRAS)]'
	@$(PY) -m compileall -q -q -j 0 $(VENV)/lib >/dev/null 2>&1 || true
	@touch $(STAMP)

install: $(STAMP)

# The embedded default dataset: Debian's dataset-fashion-mnist, where apt exists (no download at run time).
data:
	@if [ -f $(FMNIST)/train-images-idx3-ubyte.gz ]; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist >/dev/null \
	  || echo "warning: could not install dataset-fashion-mnist; Fashion-MNIST runs will say where to put the files"; \
	else echo "note: no apt-get; Fashion-MNIST runs will say where to put the files"; fi

# Each demo writes a fresh run folder (runs are never overwritten).
demo: $(STAMP) data
	$(PY) -m maxq train --config configs/demo.yaml --out runs/demo-$$(date +%Y%m%d-%H%M%S)

# Includes the strict docs build (tests/test_docs.py) and the wheel smoke test (tests/test_wheel.py). Two
# pytest-xdist workers of one torch thread each (tests/conftest.py) keep two cores busy; files whose module
# fixtures are costly or shared on disk stay in one worker (xdist_group, --dist loadgroup). The 15 slowest tests
# are listed at the end.
TEST_WORKERS ?= 2
test: $(STAMP) data
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=15

# The core and engine tests against the oldest supported PyTorch (constraints/oldest.txt); not part of `make test`.
$(OLDEST_VENV)/.maxq-installed: pyproject.toml constraints/oldest.txt
	@test -x $(OLDEST_PY) || $(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_PY) -m pip install --quiet --disable-pip-version-check -c constraints/oldest.txt -e '.[dev]'
	@touch $@

test-oldest: $(OLDEST_VENV)/.maxq-installed
	$(OLDEST_PY) -c 'import torch; print("torch", torch.__version__)'
	$(OLDEST_PY) -m pytest -q tests/core tests/engine

# The documentation site (mkdocs.yml, docs/) into site/; strict: a broken link, an unknown name or raw
# reStructuredText in a docstring fails. Open site/index.html (links and search work from the disk), or
# `make docs-serve` for http://127.0.0.1:8000 that rebuilds as you edit.
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict --site-dir site

docs-serve: $(STAMP)
	$(VENV)/bin/mkdocs serve --strict

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests benchmarks scripts

format: $(STAMP)
	$(VENV)/bin/ruff format src tests benchmarks scripts
	$(VENV)/bin/ruff check --fix src tests benchmarks scripts

clean:
	rm -rf $(VENV) $(OLDEST_VENV) build dist site src/*.egg-info .pytest_cache .ruff_cache

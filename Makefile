# Two commands do everything on a fresh machine: `make demo` and `make test`.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.maxq-installed
FMNIST  := /usr/share/datasets/fashion-mnist
SUDO    := $(shell [ "$$(id -u)" -ne 0 ] && command -v sudo)

.PHONY: demo test lint format data install clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,onnx]'
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

test: $(STAMP) data
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests benchmarks scripts

format: $(STAMP)
	$(VENV)/bin/ruff format src tests benchmarks scripts
	$(VENV)/bin/ruff check --fix src tests benchmarks scripts

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache

# Two commands for a fresh machine: `make run` (set up, train the default CNN on real Fashion-MNIST,
# write the report) and `make test` (set up, run the tests). Each does all of its set-up itself.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build that lies on this machine's disk. A plain `torch` would pull a multi-GB CUDA build.
TORCH_VERSION ?= 2.13.0
FASHION_DIR ?= /usr/share/datasets/fashion-mnist
RUN_ARGS ?=

.PHONY: setup data run test test-fast bench clean

setup: $(VENV)/.installed data

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(PY) -m pip install --quiet -e ".[dev,tensorboard,lightning,notebook]"
	touch $@

# Debian's dataset-fashion-mnist holds the real IDX files. Without root or apt, deepscope can still read
# a folder you name with --data-dir / $$DEEPSCOPE_DATA, or download the official files into its cache.
data:
	@if [ -f "$(FASHION_DIR)/train-images-idx3-ubyte.gz" ]; then \
		echo "Fashion-MNIST found in $(FASHION_DIR)"; \
	elif command -v apt-get >/dev/null 2>&1; then \
		SUDO=""; [ "$$(id -u)" = 0 ] || SUDO="sudo"; \
		echo "Installing Debian's dataset-fashion-mnist ..."; \
		$$SUDO apt-get update -qq >/dev/null && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null || \
		echo "warning: could not install dataset-fashion-mnist; tests that need the real data will skip"; \
	else \
		echo "warning: no apt-get here; set DEEPSCOPE_DATA to a folder with the Fashion-MNIST IDX files"; \
	fi

run: setup
	$(VENV)/bin/deepscope train $(RUN_ARGS)

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) benchmarks/loop_overhead.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache

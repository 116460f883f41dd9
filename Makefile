# edgefleet — the two commands of the README are `make demo` and `make test`; both set themselves up.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.edgefleet-installed
PYTEST_ARGS ?=

.PHONY: help setup venv mosquitto models check test demo bench clean

help:
	@echo "make test   - set up (venv, mosquitto, test models), then make check and the whole test suite"
	@echo "make demo   - set up, then run the whole story on this box (broker, controller, two agents, a real model)"
	@echo "make check  - ruff (lint + format), mypy (strict), import layering"
	@echo "make bench  - benchmarks under bench/ (JSON + PNG into .cache/bench/)"

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "edgefleet needs Python >= 3.11")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || { \
	  echo "cannot create a venv: install python3-venv (Debian: apt-get install python3-venv)"; exit 1; }
	$(PY) -m pip install --quiet --upgrade pip
	@echo "installing edgefleet and its dev extras (llama-cpp-python compiles once, ~5 min on 2 cores)"
	$(PY) -m pip install --quiet --progress-bar off -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

mosquitto:
	@if command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's mosquitto package"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mosquitto; \
	  systemctl disable --now mosquitto >/dev/null 2>&1 || true; \
	else \
	  echo "mosquitto (>= 2.0) is needed for the tests: install it (Debian/Ubuntu: sudo apt-get install mosquitto)"; \
	  exit 1; \
	fi

models: venv
	$(PY) tests/fetch_models.py

setup: venv mosquitto models

check: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(PY) tests/check_layers.py
	bash systemd/check-units.sh

test: setup
	$(MAKE) --no-print-directory check
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	bash deploy/demo.sh

bench: setup
	bench/build-llama-tools.sh
	$(PY) bench/models.py
	$(PY) bench/inference.py
	$(PY) bench/memory.py --embeddings
	$(PY) bench/delivery.py
	$(PY) bench/audit.py
	$(PY) bench/fleet.py

clean:
	rm -rf $(VENV) .cache .mypy_cache .ruff_cache .pytest_cache

# distil: `make demo` and `make test` set everything up themselves (idempotent).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU wheel is on disk here; on a GPU machine pass e.g. `make setup TORCH="torch==2.13.0 --index-url ..."`.
TORCH ?= torch==2.13.0
EXTRAS ?= dev,models,ct2,slurm
STAMP := $(VENV)/.distil-installed

.PHONY: setup demo test test-slow lint format clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml
	@for tool in espeak-ng flite; do \
	  command -v $$tool >/dev/null 2>&1 && continue; \
	  echo "installing Debian TTS engines (espeak-ng, flite)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq espeak-ng flite >/dev/null; break; \
	done
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	@touch $(STAMP)

demo: setup
	$(VENV)/bin/distil-pipeline $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

test-slow: setup
	$(PY) -m pytest -q -m "slow or not slow" $(ARGS)

lint: setup
	$(VENV)/bin/ruff check distil tests benchmarks
	$(VENV)/bin/ruff format --check distil tests benchmarks

format: setup
	$(VENV)/bin/ruff check --fix distil tests benchmarks
	$(VENV)/bin/ruff format distil tests benchmarks

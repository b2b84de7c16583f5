# The two set-up commands a new user types: `make demo` and `make test`. Each builds .venv from nothing first.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Offline hygiene: no telemetry, no cloud metadata probes, no hub downloads.
export RAY_USAGE_STATS_ENABLED := 0
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export HF_HUB_OFFLINE := 1
export AWS_EC2_METADATA_DISABLED := true
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

.PHONY: demo test test-unit test-integration test-e2e lint bench clean venv

# pip -qq: its errors only (not the warnings about index locations this machine's pip config names).
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip 2>/dev/null || true
	$(BIN)/pip install --quiet --quiet -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m mae_service demo

test: lint
	$(BIN)/python -m pytest tests

test-unit: $(STAMP)
	$(BIN)/python -m pytest -m unit tests

test-integration: $(STAMP)
	$(BIN)/python -m pytest -m integration tests

test-e2e: $(STAMP)
	$(BIN)/python -m pytest -m e2e tests

lint: $(STAMP)
	$(BIN)/ruff check mae_service jobs tests benchmarks
	$(BIN)/ruff format --check mae_service jobs tests benchmarks
	$(BIN)/lint-imports
	$(BIN)/mypy

clean:
	rm -rf $(VENV) demo_out mlflow.db mlruns .pytest_cache

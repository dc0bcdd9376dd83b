# Two commands on a fresh machine: `make demo` (the example DAG end to end) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export AIRFLOW_HOME ?= $(CURDIR)/.airflow_home

.PHONY: venv demo test lint check bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip uv
	$(BIN)/uv pip install --quiet --python $(BIN)/python -e '.[emulator]' --group test --group lint
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/python scripts/demo.py

lint: venv
	$(BIN)/ruff check airflow_provider_kontext tests example_dags scripts ci
	$(BIN)/ruff format --check airflow_provider_kontext tests example_dags scripts ci
	$(BIN)/mypy

test: venv
	$(BIN)/python -m pytest -q

check: lint test

# Benchmarks against the emulator on 127.0.0.1; writes benchmarks/RESULTS.md (~12 minutes on 2 cores).
bench: venv
	$(BIN)/uv pip install --quiet --python $(BIN)/python -e '.[emulator]' --group bench
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) .airflow_home .pytest_cache .mypy_cache .ruff_cache

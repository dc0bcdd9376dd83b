# Two commands on a fresh machine: `make demo` (the example DAG end to end) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export AIRFLOW_HOME ?= $(CURDIR)/.airflow_home

.PHONY: venv demo test lint docs check bench lock deps-check clean

# Every version is held by ci/locks/dev.txt (`make lock` re-resolves it; `make deps-check` says what the
# newest releases would break first).
LOCK := ci/locks/dev.txt
UV_VERSION := 0.13.9

$(BIN)/.installed: pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip uv==$(UV_VERSION)
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python -c $(LOCK) -e '.[emulator]' --group test --group lint
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/python scripts/demo.py

lint: venv
	$(BIN)/ruff check airflow_provider_kontext tests example_dags scripts ci docs/conf.py
	$(BIN)/ruff format --check airflow_provider_kontext tests example_dags scripts ci docs/conf.py
	$(BIN)/mypy

test: venv
	$(BIN)/python -m pytest -q

# The documentation site (docs/: Sphinx with MyST, the docs group) into docs/_build/html, strict:
# every warning is an error, links to pages, heading anchors and repository files are checked (the
# README's too). Offline: no external URL is fetched (no linkcheck).
docs: venv
	$(BIN)/uv pip install --quiet --python $(BIN)/python -c $(LOCK) --group docs
	$(BIN)/sphinx-build -E -W --keep-going -n -q -b html docs docs/_build/html

check: lint test

# Benchmarks against the emulator on 127.0.0.1; writes benchmarks/RESULTS.md (~12 minutes on 2 cores).
bench: venv
	$(BIN)/uv pip install --quiet --python $(BIN)/python -c $(LOCK) -e '.[emulator]' --group bench
	$(BIN)/python -m benchmarks

# Re-resolve every lock in ci/locks/ (today's newest releases within ci/pins/).
lock: venv
	UV=$(BIN)/uv ci/locks.sh lock

# Not in CI: the newest releases for each matrix entry, without locks; says what broke and what moved.
deps-check: venv
	UV=$(BIN)/uv ci/locks.sh check

clean:
	rm -rf $(VENV) .airflow_home .deps-check .pytest_cache .mypy_cache .ruff_cache docs/_build

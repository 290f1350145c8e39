# Two commands set everything up on a fresh machine: `make run` and `make test`.
# Each creates the virtual environment first (Python 3.11+), so nothing is installed by hand.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test test-fast bench simulate lint clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "mabrec needs Python 3.11 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

run: $(STAMP)  ## run the whole system (embedded PostgreSQL and NATS unless DATABASE_URL / NATS_URL are set)
	$(BIN)/mabrec up

test: $(STAMP)  ## the whole suite, against real PostgreSQL, NATS JetStream and Ray
	$(BIN)/pytest -n 2 --dist loadfile --no-loadscope-reorder --basetemp=.pytest-tmp  # two workers, a module each, slowest first (tests/conftest.py); test dirs in the checkout

test-fast: $(STAMP)  ## unit tests only (no services, no browser)
	$(BIN)/pytest -n 2 -m "not integration and not e2e and not browser"

lint: $(STAMP)  ## ruff, mypy (strict on system/core), and the import layers (lint-imports)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: $(STAMP)  ## start a fresh system, run every benchmark, write BENCHMARKS.md
	$(BIN)/mabrec bench report --also-shards 2

simulate: $(STAMP)  ## the policy against the baselines on synthetic users (docs/simulation)
	$(BIN)/mabrec simulate

clean:
	rm -rf $(VENV) .mabrec .pytest_cache .pytest-tmp

# Every target installs what it needs into .venv first; `make run` and `make test` work on a
# fresh clone with nothing but python3 (3.11+).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run cluster test lint bench soak clean

$(STAMP): pyproject.toml tests/browser/package-lock.json
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,lint]'
	if command -v npm >/dev/null; then npm install --prefix tests/browser --no-audit --no-fund --silent; fi
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/broker serve

# N instances (default 3) on ports 5001.. and nginx on 8080, one database: docs/deployment.md.
cluster: $(STAMP)
	deploy/cluster.sh $(N)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Benchmarks, see docs/benchmarks.md; e.g. make bench BENCH_ARGS="--scenario fanout --quick".
$(VENV)/.bench-installed: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	touch $@

bench: $(VENV)/.bench-installed
	$(BIN)/python -m tests.bench $(BENCH_ARGS)

# Two brokers behind nginx, ~300 clients, a writer and a fault a minute; an exact account at
# the end (tests/soak). Minutes long, so not part of `make test`.
SOAK_ARGS ?= --seconds 360 --seed 1
soak: $(STAMP)
	$(BIN)/python -m tests.soak $(SOAK_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check broker tests
	$(BIN)/ruff format --check broker tests
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .data .run .pytest_cache .mypy_cache .ruff_cache

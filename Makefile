# Every target installs what it needs into .venv first; `make run` and `make test` work on a
# fresh clone with nothing but python3 (3.11+). `make run` installs the runtime only; the test
# and lint tools (and the browser tests' npm packages) come with `make test` or `make lint`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN_STAMP := $(VENV)/.installed-run
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: run cluster test lint bench clean

$(RUN_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e .
	touch $@

$(DEV_STAMP): $(RUN_STAMP) tests/browser/package-lock.json
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,lint]'
	if command -v npm >/dev/null; then npm install --prefix tests/browser --no-audit --no-fund --silent; fi
	touch $@

run: $(RUN_STAMP)
	$(BIN)/pgsse serve

# N instances (default 3) on ports 5001.. and nginx on 8080, one database: docs/deployment.md.
cluster: $(RUN_STAMP)
	deploy/cluster.sh $(N)

test: $(DEV_STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Benchmarks, see docs/benchmarks.md; e.g. make bench BENCH_ARGS="--scenario fanout --quick".
$(VENV)/.bench-installed: $(DEV_STAMP)
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	touch $@

bench: $(VENV)/.bench-installed
	$(BIN)/python -m tests.bench $(BENCH_ARGS)

lint: $(DEV_STAMP)
	$(BIN)/ruff check broker tests
	$(BIN)/ruff format --check broker tests
	$(BIN)/mypy

# As root the embedded data may live under /var/lib/pgsse with .data a link to it: remove both.
clean:
	if [ -L .data ]; then rm -rf -- "$$(readlink -f .data)"; fi
	rm -rf $(VENV) .data .run .pytest_cache .mypy_cache .ruff_cache

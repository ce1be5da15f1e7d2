# Every target installs what it needs into .venv first; `make run` and `make test` work on a
# fresh clone with nothing but python3 (3.11+). `make run` installs the runtime only; the test
# and lint tools come with `make test` or `make lint`, and the npm packages with `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN_STAMP := $(VENV)/.installed-run
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: run cluster test test-fast lint bench soak clean npm-packages

$(RUN_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e .
	touch $@

$(DEV_STAMP): $(RUN_STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,lint]'
	touch $@

run: $(RUN_STAMP)
	$(BIN)/pgsse serve

# Redis, N instances (default 3) on the bus on ports 5001.. and nginx on 8080, one database:
# docs/deployment.md.
cluster: $(RUN_STAMP)
	deploy/cluster.sh $(N)

# Two tiers (tests/conftest.py): `make test-fast` runs the modules in process, under a minute;
# `make test` runs that tier first, then tests/system/ (broker processes, PostgreSQL restarts,
# nginx, Redis, Chromium, podman), minutes long. PYTEST_ARGS go to pytest, e.g. "-x -k bus".
test: $(DEV_STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(DEV_STAMP)
	$(BIN)/python -m pytest --ignore=tests/system $(PYTEST_ARGS)

# The npm side of `make test`: the browser fixtures' packages, and pgsse-client as an app gets
# it: `npm pack client/`, then that tarball installed (again whenever client/ changes) into
# the esbuild app and the Next.js app (next is ~400 MB installed; its build takes ~20 s). Without
# npm it is left out, and the tests needing it skip (they fail instead with CI=true).
test: npm-packages
NPM_STAMP := tests/browser/node_modules/.installed
NPM_APP := tests/browser/app
NPM_NEXT := tests/browser/next
NPM_INSTALL := npm install --no-audit --no-fund --silent
npm-packages:
	@if command -v npm >/dev/null; then $(MAKE) -s --no-print-directory $(NPM_STAMP); \
	else echo "npm not found: the browser package tests skip"; fi
$(NPM_STAMP): client/package.json $(wildcard client/src/*) tests/browser/package-lock.json \
		$(NPM_APP)/package-lock.json $(NPM_NEXT)/package-lock.json
	@echo "npm: installing tests/browser's packages, packing client/ into $(NPM_APP)"
	$(NPM_INSTALL) --prefix tests/browser
	$(NPM_INSTALL) --prefix $(NPM_APP)
	rm -rf $(NPM_APP)/node_modules/pgsse-client $(NPM_APP)/pgsse-client*.tgz
	cd $(NPM_APP) && mv "$$(npm pack ../../../client --silent)" pgsse-client.tgz
	cd $(NPM_APP) && $(NPM_INSTALL) --no-save ./pgsse-client.tgz
	$(NPM_INSTALL) --prefix $(NPM_NEXT)
	rm -rf $(NPM_NEXT)/node_modules/pgsse-client
	cd $(NPM_NEXT) && $(NPM_INSTALL) --no-save ../app/pgsse-client.tgz
	touch $@

# Benchmarks, see docs/benchmarks.md; e.g. make bench BENCH_ARGS="--scenario fanout --quick".
$(VENV)/.bench-installed: $(DEV_STAMP)
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	touch $@

bench: $(VENV)/.bench-installed
	$(BIN)/python -m tests.bench $(BENCH_ARGS)

# Two brokers behind nginx, ~300 clients, a writer and a fault a minute; an exact account at
# the end (tests/soak). Minutes long, so not part of `make test`. `BROKER_CAPTURE=wal make
# soak`: the same with WAL capture, the brokers on a Redis bus (its relay reads the slot).
SOAK_ARGS ?= --seconds 360 --seed 1
soak: $(DEV_STAMP)
	$(BIN)/python -m tests.soak $(SOAK_ARGS)

# The container image (docs/container.md): pgsse:VERSION and pgsse:latest, with podman (or
# docker: CONTAINER_ENGINE=docker). IMAGE=name:tag builds that name instead.
.PHONY: image
image:
	deploy/image.sh $(IMAGE)

lint: $(DEV_STAMP)
	$(BIN)/ruff check broker tests
	$(BIN)/ruff format --check broker tests
	$(BIN)/mypy

# As root the embedded data may live under /var/lib/pgsse with .data a link to it: remove both.
clean:
	if [ -L .data ]; then rm -rf -- "$$(readlink -f .data)"; fi
	rm -rf $(VENV) .data .run .pytest_cache .mypy_cache .ruff_cache

# Two commands do everything on a fresh machine:  make run   |   make test
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.ringflow-installed
CONFIG ?= configs/flights.yaml

# Where pip gets torch. Empty: the configured package index (this machine's has the CPU build).
# Elsewhere PyPI's torch is the multi-GB CUDA build: for CPU only, make install
# TORCH_INDEX=https://download.pytorch.org/whl/cpu (README "Install elsewhere" for GPU builds).
TORCH_INDEX ?=

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export MLFLOW_DISABLE_TELEMETRY ?= true

.PHONY: install lock check typecheck run test bench up down deploy clean browser-deps postgres-deps cluster-deps docs docs-serve docs-deps docs-reference

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"

# Re-runs only when the dependency spec, the lock or the install script changes. Every package
# comes from requirements.lock (the tested versions); ringflow itself is installed editable on top.
$(STAMP): pyproject.toml requirements.lock infra/install_horovod.sh | $(PY)
	$(PY) -m pip install --quiet "torch==2.13.0" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps -e .
	infra/install_horovod.sh $(PY)
	$(PY) -c "from ringflow.tasks.tracking import schema_template; schema_template()"  # MLflow's empty store, once
	$(PY) -c "from ringflow.flows.prefect_api import database_template; database_template()"  # Prefect's, once
	touch $(STAMP)

install: $(STAMP)

# Re-resolve requirements.lock after a change to pyproject.toml's dependencies (pip-tools).
lock: | $(PY)
	infra/lock.sh $(PY)

run: install
	$(VENV)/bin/ringflow run --config $(CONFIG)

# The quick check (about 2 minutes on 2 cores): types, lint, format, and the unit tier of the tests (no
# horovodrun, server, browser, PostgreSQL or namespace; markers in pyproject.toml, CONTRIBUTING.md).
UNIT_TIER := not (horovod or slow or browser or cluster or server or postgres)

check: install typecheck
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pytest -q -m "$(UNIT_TIER)"

# Types: mypy over the package `ringflow` (config in pyproject.toml). It cannot see through the
# editable install's finder, so the folders are linked under build/typecheck/ringflow first.
TYPES_ROOT := build/typecheck
typecheck: install
	@mkdir -p $(TYPES_ROOT)/ringflow && for p in flows tasks training monitoring infra configs; do ln -sfn ../../../$$p $(TYPES_ROOT)/ringflow/$$p; done
	$(VENV)/bin/mypy -p ringflow

# The full suite CI runs: the check first, then every test it left out, one module per worker on
# TEST_WORKERS workers (pytest-xdist --dist loadfile: a module's tests and its shared fixtures stay
# on one worker). Most of these tests wait on servers and subprocesses, so two workers fit 2 cores.
# The load test runs afterwards on its own: it stops the runner while a run trains, and under a
# busy machine Prefect's runner can exit before it knows a run it just started (left Running).
TEST_WORKERS ?= 2
ALONE := tests/test_stack_load.py
test: check browser-deps postgres-deps cluster-deps
	$(VENV)/bin/pytest -m "not ($(UNIT_TIER))" -n $(TEST_WORKERS) --dist loadfile --durations=30 --ignore=$(ALONE)
	$(VENV)/bin/pytest -m "not ($(UNIT_TIER))" --durations=5 $(ALONE)

clean:  # the home, and its PostgreSQL data where root's `up` put it (outside the home)
	@d=$$(cat .ringflow/postgres/data-dir 2>/dev/null) && [ -n "$$d" ] && rm -rf "$$(dirname "$$d")"; true
	rm -rf .ringflow

# The docs site (mkdocs.yml, docs/): built strictly (a broken link or a missing page fails) into
# site/, served at http://127.0.0.1:8001 (8000 is Evidently's UI). docs-reference regenerates the
# configuration and CLI references from the code (tests/test_docs.py fails when they are stale).
MKDOCS ?= $(VENV)/bin/mkdocs
DOCS_PORT ?= 8001

docs-deps: install
	@$(PY) -c "import mkdocs, material" 2>/dev/null || $(PY) -m pip install --quiet "mkdocs==1.6.1" "mkdocs-material==9.8.2"

docs: docs-deps
	NO_MKDOCS_2_WARNING=1 $(MKDOCS) build --strict

docs-serve: docs-deps
	NO_MKDOCS_2_WARNING=1 $(MKDOCS) serve --strict --dev-addr 127.0.0.1:$(DOCS_PORT)

docs-reference: install
	$(PY) docs/gen_reference.py

# Benchmarks: every benchmarks/bench_*.py, then benchmarks/RESULTS.md (smoke: make bench BENCH_ARGS=--quick).
bench: install
	$(PY) benchmarks/run_all.py $(BENCH_ARGS)

# The real stack: Prefect server + MLflow server + the deployment runner (ringflow up --help).
up: install
	$(VENV)/bin/ringflow up --config $(CONFIG)

down: install
	$(VENV)/bin/ringflow down

deploy: install
	$(VENV)/bin/ringflow deploy --config $(CONFIG)

# Browser for tests/test_browser_e2e.py: Debian's Chromium (never a downloaded one) + Playwright.
browser-deps: install
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver; }
	@$(PY) -c "import playwright" 2>/dev/null || $(PY) -m pip install --quiet "playwright>=1.40"

# PostgreSQL for `ringflow up --database postgresql` and its tests: Debian's server binaries
# (initdb/postgres under /usr/lib/postgresql/*/bin). Installing starts nothing here; ringflow runs
# its own cluster (data: README, Team stack), never the system service.
postgres-deps:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends postgresql postgresql-contrib; }

# sshd for `ringflow cluster` hosts and tests/test_cluster.py: Debian's openssh-server. Installing
# starts nothing here; ringflow runs one sshd per namespace host with its own config and keys under
# $RINGFLOW_HOME/cluster, never the system service, /etc/ssh or root's ~/.ssh.
cluster-deps:
	@test -x /usr/sbin/sshd || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends openssh-server; }

# Two commands do everything on a fresh machine:  make run   |   make test
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.ringflow-installed
CONFIG ?= configs/flights.yaml

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: install run test bench up down deploy clean browser-deps

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"

# Re-runs only when the dependency spec or the install script changes.
$(STAMP): pyproject.toml infra/install_horovod.sh | $(PY)
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev]"
	infra/install_horovod.sh $(PY)
	touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/ringflow run --config $(CONFIG)

test: install
	$(VENV)/bin/pytest

clean:
	rm -rf .ringflow

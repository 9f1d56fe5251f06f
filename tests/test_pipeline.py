"""The whole training pipeline on the smoke slice: real Horovod (np=2), real MLflow SQLite store,
Prefect's test harness."""

from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from ringflow.flows.training_pipeline import training_pipeline
from ringflow.tasks import artifacts
from ringflow.tasks.register import alias_history
from ringflow.training import tags
from ringflow.training.config import with_overrides
from ringflow.training.data import load_flights
from ringflow.training.pyfunc import predict_rows

pytestmark = [pytest.mark.horovod, pytest.mark.slow]


def _assert_stage_timings(result) -> None:
    """Every stage's seconds are in the result (work vs overhead), and the summary artifact shows them."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    t = result.timings
    assert {p.stage for p in t.parts} >= {"shard", "train", "baseline", "evaluate", "register", "prefect"}
    parts = {(p.stage, p.part): p for p in t.parts}
    assert parts[("shard", "sharding")].kind == "work"
    assert parts[("train", "training epochs (rank 0)")].seconds > 0
    assert parts[("evaluate", "scoring the candidate")].kind == "work"
    # the baseline and the lineage ran beside the ranks: shown, not in the totals
    for stage, part in [("baseline", "tune, fit and score"), ("train", "MLflow: lineage (manifest, config, data)")]:
        assert parts[(stage, part)].concurrent and parts[(stage, part)].seconds > 0, part
    assert parts[("baseline", "tune, fit and score")].kind == "work"
    assert parts[("evaluate", "waiting for the baseline (beside the training)")].kind == "work"
    assert not parts[("evaluate", "waiting for the baseline (beside the training)")].concurrent
    assert sum(p.seconds for p in t.parts if not p.concurrent) == pytest.approx(t.total())
    for stage, part in [
        ("train", "rank start-up + shutdown (horovodrun)"),
        ("evaluate", "MLflow: log the candidate model"),
        ("evaluate", "plots (ROC/PR, calibration), logged"),
        ("register", "MLflow: register the model version"),
    ]:
        assert parts[(stage, part)].kind == "overhead" and parts[(stage, part)].seconds > 0, part
    assert 0 < t.total("work") < t.total()
    with get_client(sync_client=True) as client:
        (art,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["training-pipeline-summary"])),
            sort=ArtifactSort.CREATED_DESC,
            limit=1,
        )
    assert "## Where the time went" in art.data and "| train | training epochs (rank 0) | work |" in art.data


def test_promote_then_reject_worse_candidate(prefect_harness, ringflow_home, smoke_config):
    name = smoke_config.registry.model_name
    # the champion's evaluation uses the tuned LightGBM reference (the other tests: hgb)
    first = training_pipeline(with_overrides(smoke_config, {"gate.baseline": "lightgbm"}))
    assert first.training_status in {"completed", "early_stopped"}
    assert first.promoted and first.model_version == "1" and first.champion_version == "1"
    assert first.metrics["roc_auc"] > 0.6
    _assert_stage_timings(first)
    # the flow checked Horovod's Gloo at its start, so horovodrun's own probe was skipped
    from ringflow.training.config import get_settings

    launch_log = (get_settings().runs_dir / first.training_run_id / "horovodrun.log").read_text()
    assert "-m ringflow.training.hvdrun --gloo-checked -np 2" in launch_log

    # A deliberately worse candidate: one epoch of a tiny model with a tiny learning rate.
    worse = with_overrides(
        smoke_config,
        {
            "training.epochs": 1,
            "training.learning_rate": 1e-5,
            "training.model.hidden_sizes": [2],
            "training.model.embedding_dim": 1,
        },
    )
    second = training_pipeline(worse, reason="test-worse")
    assert second.model_version == "2"
    assert not second.promoted
    assert second.champion_version == "1"

    client = MlflowClient(tracking_uri=f"sqlite:///{ringflow_home / 'mlflow.db'}")
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    assert str(client.get_model_version_by_alias(name, "challenger").version) == "2"
    v2 = client.get_model_version(name, "2")
    keys = (tags.DATA_FINGERPRINT, tags.MANIFEST_PATH, tags.CONFIG_HASH, tags.GIT_COMMIT, tags.WORLD_SIZE)
    for tag in (*keys, tags.TRAINING_RUN_ID):
        assert v2.tags.get(tag), tag
    assert v2.tags[tags.WORLD_SIZE] == "2"
    moves = [(h["alias"], h["to"]) for h in alias_history(client, name)]
    assert moves == [("champion", "1"), ("challenger", "2")]
    run = client.get_run(first.training_run_id)
    # artifacts live with the rest of the state, not in ./mlruns of wherever the command ran
    assert run.info.artifact_uri.startswith((ringflow_home / "artifacts").as_uri())
    assert run.data.tags["gate.decision"] == "promote"
    assert {"test_roc_auc", "test_pr_auc", "test_log_loss", "test_accuracy", "test_f1", "test_brier"} <= set(
        run.data.metrics
    )
    arts = {a.path for a in client.list_artifacts(first.training_run_id, artifacts.EVALUATION_DIR)}
    assert {artifacts.ROC_PR_CURVES, artifacts.CALIBRATION_CURVE, artifacts.BASELINE_GRID} <= arts
    # the tuned reference: its chosen settings are params of the run, next to its metrics
    assert first.baseline == "lightgbm" and run.data.tags[tags.GATE_BASELINE] == "lightgbm"
    assert {"baseline.num_leaves", "baseline.learning_rate", "baseline.iterations"} <= set(run.data.params)
    assert f"iterations={run.data.params['baseline.iterations']}" in run.data.tags[tags.GATE_BASELINE_SETTINGS]
    assert 0.5 < run.data.metrics[tags.BASELINE_VAL_ROC_AUC] < 1.0

    # The champion loads by alias and predicts on raw flight rows (source columns, raw dtypes).
    mlflow.set_tracking_uri(f"sqlite:///{ringflow_home / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    deps = Path(mlflow.pyfunc.get_model_dependencies(f"models:/{name}@champion")).read_text()
    assert "torch==" in deps and "ringflow" not in deps  # installable from an index
    # the exact torch build of this environment, from the index that serves it (not PyPI's CUDA build)
    from importlib.metadata import version

    torch_build = version("torch")
    assert f"torch=={torch_build}" in deps.splitlines()
    if "+" in torch_build:
        assert f"--extra-index-url https://download.pytorch.org/whl/{torch_build.split('+')[1]}" in deps.splitlines()
    raw = load_flights().query("month == 2").head(200)
    p = predict_rows(model, raw)  # the source's int64 hour/minute/distance as they are
    assert p.shape == (200,)
    assert np.all((p >= 0) & (p <= 1)) and p.std() > 0

    # Monitoring with the pipeline's own champion (not a stand-in model): the next month after the
    # test window is scored through the pyfunc, Evidently writes its reports, a decision is logged.
    from ringflow.flows.monitoring import monitoring_flow

    mon = monitoring_flow(smoke_config, batch="2013-03", trigger_rerun=False)
    assert (mon.model_name, mon.model_version) == (name, "1")
    assert mon.rows > 20_000 and 0.0 < mon.metrics["roc_auc"] < 1.0
    assert mon.reference_roc_auc is not None and mon.drifted_share is not None
    # the baseline logged by the champion's evaluation is scored on the same batch
    assert 0.0 < mon.metrics["baseline_roc_auc"] < 1.0 and mon.metrics["baseline_roc_auc"] != mon.metrics["roc_auc"]
    assert mon.metrics["baseline_roc_auc_drop"] == pytest.approx(
        mon.metrics["baseline_test_roc_auc"] - mon.metrics["baseline_roc_auc"]
    )
    assert "batch_baseline_roc_auc" in client.get_run(mon.monitoring_run_id).data.metrics
    for html in (mon.drift_html, mon.quality_html):
        assert html and html.endswith(".html") and Path(html).stat().st_size > 10_000
    assert client.get_run(mon.monitoring_run_id).data.tags["ringflow.decision"] == mon.decision
    assert mon.action.mode in {"none", "plan-only"}  # trigger_rerun=False never starts a rerun


def test_retry_after_a_failed_stage_does_not_retrain(prefect_harness, ringflow_home, smoke_config, monkeypatch):
    """A stage after training fails for real (the model registry is unreachable); retrying the
    same flow run, as the UI's Retry does, reuses the shards and the trained model and goes on."""
    import socket

    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.flow_engine import run_flow
    from prefect.states import AwaitingRetry

    from ringflow.flows.training_pipeline import PipelineStageError

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", f"http://127.0.0.1:{dead}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    state = training_pipeline(smoke_config, return_state=True)
    assert state.is_failed()
    with pytest.raises(PipelineStageError, match="stage 'evaluate' failed"):
        state.result()

    monkeypatch.delenv("MLFLOW_REGISTRY_URI")
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as c:
        c.set_flow_run_state(flow_run_id, AwaitingRetry(), force=True)
        flow_run = c.read_flow_run(flow_run_id)
    result = run_flow(training_pipeline, flow_run=flow_run, parameters={"config": smoke_config})
    assert result.promoted and result.model_version == "1"

    client = MlflowClient(tracking_uri=f"sqlite:///{ringflow_home / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(smoke_config.registry.experiment)
    trainings = client.search_runs([experiment.experiment_id], "tags.`ringflow.kind` = 'training'")
    assert [r.info.run_id for r in trainings] == [result.training_run_id]  # trained once
    with get_client(sync_client=True) as c:
        task_runs = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    names = sorted((tr.name.rsplit("-", 1)[0], tr.state.name) for tr in task_runs)
    assert ("train", "Cached") in names and ("shard", "Cached") in names, names
    assert ("baseline", "Cached") in names, names  # the baseline beside the training is not fitted again
    assert names.count(("train", "Completed")) == 1, names

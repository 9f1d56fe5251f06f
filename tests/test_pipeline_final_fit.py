"""``training.final_fit`` through the whole pipeline on the smoke slice: real Horovod (np=2) twice,
a real MLflow SQLite store, Prefect's test harness."""

import hashlib
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from ringflow.flows.training_pipeline import training_pipeline
from ringflow.tasks import artifacts
from ringflow.training import tags
from ringflow.training.config import with_overrides
from ringflow.training.final_fit import FINAL_EPOCHS_ARG
from ringflow.training.model import MODEL_FILE, read_decision_threshold
from tests.conftest import is_rank_argv

pytestmark = [pytest.mark.horovod, pytest.mark.slow]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_final_fit_is_a_parent_run_with_select_and_final_children(prefect_harness, ringflow_home, smoke_config):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    cfg = with_overrides(smoke_config, {"training.final_fit": True})
    state = training_pipeline(cfg, return_state=True)
    result = state.result()
    assert result.promoted and result.model_version == "1"
    parent_id = result.training_run_id
    assert result.select_run_id and result.final_run_id and result.final_fit_epochs

    client = MlflowClient(tracking_uri=f"sqlite:///{ringflow_home / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(cfg.registry.experiment)
    # one training run (what monitoring and the registry read), its two children nested under it
    (parent,) = client.search_runs([experiment.experiment_id], tags.tag_filter(tags.KIND, tags.KIND_TRAINING))
    assert parent.info.run_id == parent_id and MLFLOW_PARENT_RUN_ID not in parent.data.tags
    children = client.search_runs([experiment.experiment_id], tags.tag_filter(MLFLOW_PARENT_RUN_ID, parent_id))
    by_step = {r.data.tags[tags.FINAL_FIT_STEP]: r for r in children}
    assert set(by_step) == {tags.STEP_SELECT, tags.STEP_FINAL} and len(children) == 2
    select, final = by_step[tags.STEP_SELECT], by_step[tags.STEP_FINAL]
    assert (select.info.run_id, final.info.run_id) == (result.select_run_id, result.final_run_id)
    for child in children:
        assert child.info.status == "FINISHED" and child.data.tags[tags.KIND] == tags.KIND_TRAINING_STEP

    # select: today's run (per-epoch validation, the best epoch); its best epoch is the final's count
    k = result.final_fit_epochs
    val_auc = client.get_metric_history(select.info.run_id, "val_roc_auc")
    best = max(val_auc, key=lambda m: m.value)
    assert k == best.step and select.data.metrics["best_val_roc_auc"] == pytest.approx(best.value)
    # final: k epochs of training loss, no validation, the epoch count as a param (also the parent's)
    assert [m.step for m in client.get_metric_history(final.info.run_id, "train_loss")] == list(range(1, k + 1))
    assert not [m for m in final.data.metrics if m.startswith(("val_", "best_val_"))]
    assert final.data.params[tags.FINAL_FIT_EPOCHS] == str(k) == parent.data.params[tags.FINAL_FIT_EPOCHS]
    # the same learning-rate schedule, stopped at epoch k (more steps per epoch: close, not equal)
    lr_select = [m.value for m in sorted(client.get_metric_history(select.info.run_id, "lr"), key=lambda m: m.step)]
    lr_final = [m.value for m in sorted(client.get_metric_history(final.info.run_id, "lr"), key=lambda m: m.step)]
    assert lr_final == pytest.approx(lr_select[:k], rel=0.05)

    # the candidate is the final run's model, registered from the parent run
    select_out, final_out = Path(select.data.tags[tags.OUTPUT_DIR]), Path(final.data.tags[tags.OUTPUT_DIR])
    mv = client.get_model_version(cfg.registry.model_name, "1")
    assert mv.run_id == parent_id and mv.tags[tags.TRAINING_RUN_ID] == parent_id
    mlflow.set_tracking_uri(f"sqlite:///{ringflow_home / 'mlflow.db'}")
    downloaded = mlflow.artifacts.download_artifacts(
        f"models:/{cfg.registry.model_name}/1", dst_path=str(ringflow_home / "mv")
    )
    (logged,) = Path(downloaded).rglob(MODEL_FILE)
    assert _sha(logged) == _sha(final_out / MODEL_FILE) != _sha(select_out / MODEL_FILE)

    # the threshold: chosen on validation by the select run (best epoch), carried over
    carried = read_decision_threshold(select_out)
    assert carried == pytest.approx(select.data.metrics["best_val_decision_threshold"])
    assert read_decision_threshold(final_out) == carried
    assert parent.data.metrics[tags.DECISION_THRESHOLD] == pytest.approx(carried)
    gate_md = Path(client.download_artifacts(parent_id, artifacts.GATE_REPORT, str(ringflow_home / "gate"))).read_text()
    assert "Final fit" in gate_md and "carries over" in gate_md and result.select_run_id in gate_md
    # the baseline got the same final fit; its tuning stays logged
    assert parent.data.params[tags.BASELINE_FINAL_FIT] == "true"
    assert 0.5 < parent.data.metrics[tags.BASELINE_VAL_ROC_AUC] < 1.0
    assert "baseline gets the same final fit" in gate_md
    # monitoring reads the training run: it has the select run's summary and status
    assert parent.data.tags[tags.TRAINING_STATUS] in {"completed", "early_stopped"}
    assert artifacts.SUMMARY_ARTIFACT in {a.path for a in client.list_artifacts(parent_id, artifacts.TRAINING_DIR)}

    # Prefect: both trainings are task runs of the flow run, each in the timing table
    with get_client(sync_client=True) as c:
        task_runs = c.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    names = sorted((tr.name.rsplit("-", 1)[0], tr.state.name) for tr in task_runs)
    assert ("train", "Completed") in names and ("train-final", "Completed") in names, names
    parts = {(p.stage, p.part): p for p in result.timings.parts}
    assert parts[("train-final", "training epochs (rank 0)")].kind == "work"
    assert parts[("train-final", "rank start-up + shutdown (horovodrun)")].seconds > 0
    assert ("train-final", "Prefect task run (states, results, logs)") in parts


def _kill_final_rank_after_its_checkpoint(home: Path, killed: list[int]) -> None:
    """SIGKILL rank 1 of the final fit (its argv has the final fit's arguments) once that run
    wrote its first checkpoint."""
    import signal
    import time

    import psutil

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not killed:
        for p in psutil.process_iter(["cmdline"]):
            try:
                argv = p.info["cmdline"] or []
                if not is_rank_argv(argv) or FINAL_EPOCHS_ARG not in argv:
                    continue
                out = Path(argv[argv.index("--output-dir") + 1])
                if p.environ().get("HOROVOD_RANK") == "1" and (out / "checkpoints" / "epoch-0001.pt").exists():
                    p.send_signal(signal.SIGKILL)
                    killed.append(p.pid)
                    return
            except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError, IndexError):
                pass
        time.sleep(0.05)


def test_a_retried_final_fit_continues_its_child_run_from_its_checkpoint(
    prefect_harness, ringflow_home, smoke_config, smoke_manifest
):
    import threading

    from ringflow.tasks.train import train_final, train_model

    # small batches: epochs long enough to kill a rank of the final fit between two of them
    cfg = with_overrides(
        smoke_config,
        {"training.final_fit": True, "training.batch_size": 128, "training.early_stopping_patience": 10},
    )
    selected = train_model(cfg, str(smoke_manifest.path))
    assert selected.best_epoch and selected.best_epoch >= 2, "k < 2: nothing left to resume after epoch 1"
    killed: list[int] = []
    killer = threading.Thread(target=_kill_final_rank_after_its_checkpoint, args=(ringflow_home, killed))
    killer.start()
    final = train_final.with_options(retry_delay_seconds=0)(cfg, str(smoke_manifest.path), selected)
    killer.join()
    assert killed, "the final fit's rank 1 was never killed: the test did not exercise a failure"

    client = MlflowClient(tracking_uri=f"sqlite:///{ringflow_home / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(cfg.registry.experiment)
    finals = client.search_runs(
        [experiment.experiment_id],
        tags.tag_filter(MLFLOW_PARENT_RUN_ID, selected.run_id)
        + " and "
        + tags.tag_filter(tags.FINAL_FIT_STEP, tags.STEP_FINAL),
    )
    (run,) = finals  # the retry continued the same child run
    assert run.info.run_id == final.final_run_id and run.info.status == "FINISHED"
    assert "rank 1 failed first" in run.data.tags["ringflow.attempt_1_error"]
    assert final.epochs_completed == final.final_fit_epochs == selected.best_epoch
    assert final.resumed_from and Path(final.resumed_from).parent == Path(final.checkpoint_dir)
    assert int(Path(final.resumed_from).stem.split("-")[1]) >= 1  # did not start over
    assert client.get_run(selected.run_id).info.status == "FINISHED"

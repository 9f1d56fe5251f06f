"""What the anomaly rules look at: numbers on the whole batch, and the last training run's health.

Pure: the scored batch, the reference and the Evidently summary in, a
:class:`MonitoringObservation` out; the training runs (as MLflow returned them) in, a
:class:`TrainingObservation` out. The task module fetches the inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ringflow.monitoring.anomalies import MonitoringObservation, SchemaDiff, TrainingObservation, psi, schema_diff
from ringflow.monitoring.batch import Batch
from ringflow.monitoring.champion import ChampionInfo
from ringflow.monitoring.reference import Reference
from ringflow.monitoring.reports import PREDICTION, ReportSummary
from ringflow.training import tags
from ringflow.training.config import PipelineConfig
from ringflow.training.data import TARGET
from ringflow.training.metrics import classification_metrics
from ringflow.training.summary import TrainingSummary

if TYPE_CHECKING:
    from mlflow.entities import Run


def observe(
    cfg: PipelineConfig,
    champion: ChampionInfo,
    batch: Batch,
    reference: Reference,
    report: ReportSummary | None,
    training: TrainingObservation | None,
    baseline_metrics: Sequence[str] = (),
) -> tuple[MonitoringObservation, dict[str, float]]:
    """Numbers on every row of the batch -> the rules' input; also returns the batch metrics
    (the champion's, and the baseline's ``baseline_metrics`` when it was scored). Only the
    drift verdicts come from Evidently, on its sample (``report``)."""
    features = cfg.data.feature_columns
    contract = [cfg.data.timestamp_column, *features]  # the label is optional in a batch
    expected = {c: t for c, t in reference.schema_.items() if c != TARGET}
    diff = schema_diff(batch.raw_schema, expected, required=contract)
    if batch.contract_error and diff.empty:  # e.g. an unparseable timestamp
        diff = SchemaDiff(dtype_changed={"contract": {"expected": "valid", "actual": batch.contract_error[:200]}})
    obs = MonitoringObservation(
        model_name=champion.model_name,
        model_version=champion.version,
        batch=batch.label,
        reference_roc_auc=champion.test_roc_auc,
        schema_changes=diff,
        training=training,
    )
    metrics: dict[str, float] = {}
    scores = batch.scores
    if scores is None:
        return obs, metrics
    obs.rows = scores.rows
    if scores.target is not None and len(np.unique(scores.target)) == 2:
        metrics = classification_metrics(scores.target, scores.prediction, champion.decision_threshold)
        obs.roc_auc = metrics["roc_auc"]
        if scores.baseline_prediction is not None:
            info = batch.baseline or {}
            threshold = info.get("threshold")
            base = classification_metrics(
                scores.target, scores.baseline_prediction, 0.5 if threshold is None else threshold
            )
            metrics.update({f"baseline_{k}": v for k, v in base.items() if k in baseline_metrics})
            test_auc = info.get("test_roc_auc")
            if test_auc is not None:
                metrics["baseline_test_roc_auc"] = test_auc
                metrics["baseline_roc_auc_drop"] = test_auc - base["roc_auc"]
    if report is not None:
        obs.drifted_share = report.drifted_share
        obs.drifted_columns = report.drifted_columns
    obs.prediction_psi = psi(reference.frame[PREDICTION], scores.prediction)
    obs.missing_share = scores.missing_share()
    obs.reference_missing_share = {c: float(reference.frame[c].isna().mean()) for c in features}
    obs.unseen_share = scores.unseen_share()
    return obs, metrics


def training_observation(
    runs: Sequence[Run],
    load_summary: Callable[[str], TrainingSummary | None],
    load_config: Callable[[str], dict[str, Any] | None],
) -> TrainingObservation | None:
    """The newest finished training run (any outcome) with its summary, the previous run's
    throughput and the count of consecutive failures at its world size.

    ``runs``: MLflow training runs, newest first; ``load_summary`` / ``load_config`` read a run's
    ``summary.json`` / ``pipeline_config.json`` artifact (None when absent or unreadable).
    """
    runs = [r for r in runs if r.info.status in ("FINISHED", "FAILED")]
    if not runs:
        return None
    last = runs[0]
    ws = int(last.data.tags.get(tags.WORLD_SIZE) or 0)
    if last.info.status == "FAILED":
        failures = 0
        for r in runs:
            if r.info.status != "FAILED" or int(r.data.tags.get(tags.WORLD_SIZE) or 0) != ws:
                break
            failures += 1
        return TrainingObservation(
            run_id=last.info.run_id,
            status="failed",
            world_size=ws,
            consecutive_failures=failures,
            config=load_config(last.info.run_id),
        )
    summary = load_summary(last.info.run_id)
    ws = (summary.world_size if summary else 0) or ws or 1
    prev_id = prev_tput = None
    for r in runs[1:]:
        if r.info.status != "FINISHED":
            continue
        s = load_summary(r.info.run_id)
        if s and s.status in ("completed", "early_stopped") and s.world_size == ws and s.per_rank:
            prev_id, prev_tput = r.info.run_id, s.total_samples_per_s
            break
    return TrainingObservation(
        run_id=last.info.run_id,
        status=summary.status if summary else "completed",
        world_size=ws,
        per_rank=summary.per_rank if summary else [],
        previous_run_id=prev_id,
        previous_samples_per_s=prev_tput,
        checkpoint_dir=(summary and (summary.checkpoint_dir or summary.last_good_checkpoint))
        or last.data.tags.get(tags.CHECKPOINT_DIR),
        config=load_config(last.info.run_id),
    )

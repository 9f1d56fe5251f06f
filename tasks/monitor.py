"""Monitoring tasks: the side effects (MLflow, data files, Prefect events and artifacts).

The decisions and the numbers are made by the pure modules in ``monitoring/`` (batch, reference,
scoring, observation, reports, anomalies, policy, events); these tasks fetch their inputs and
record their outputs. Tasks that take data frames or clients use ``NO_CACHE``: hashing a
million-row frame for a cache key costs more than the work.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel
from sklearn.pipeline import Pipeline

from ringflow.monitoring.anomalies import Anomaly, MonitoringObservation, TrainingObservation
from ringflow.monitoring.batch import Batch, batch_chunks, describe_file, describe_month
from ringflow.monitoring.champion import CHAMPION, ChampionInfo, champion_test_end, rerun_base_config
from ringflow.monitoring.errors import MonitoringError
from ringflow.monitoring.events import (
    ANOMALY_EVENT,
    CAUSE_LABEL,
    REPORT_EVENT,
    RERUN_TRIGGER,
    SEVERITY_LABEL,
    TRAINING_DEPLOYMENT,
    AnomalyEventPayload,
    ModelRef,
    RerunRequest,
    model_resource_id,
)
from ringflow.monitoring.observation import observe as _observe
from ringflow.monitoring.observation import training_observation
from ringflow.monitoring.policy import BatchWindow, PolicyDecision, RerunPlan, RerunRecord, next_batch_month
from ringflow.monitoring.reference import Reference, reference_from_manifest, reference_from_source
from ringflow.monitoring.reports import (
    PREDICTION,
    EvidentlyWorkspace,
    ReportSummary,
    RuleThresholds,
    build_reports,
)
from ringflow.monitoring.scoring import BatchScores, score, score_chunks
from ringflow.tasks import artifacts
from ringflow.tasks.evaluate import current_champion, logged_threshold
from ringflow.tasks.links import mlflow_run_url, prefect_flow_run_url
from ringflow.tasks.tracking import ensure_experiment, launcher_tag, mark_stale_runs, pandas_dataset
from ringflow.training import tags
from ringflow.training.baseline import baseline_proba
from ringflow.training.config import PipelineConfig, get_settings
from ringflow.training.data import TARGET
from ringflow.training.manifest import Manifest, key_from_env
from ringflow.training.metric_names import METRIC_NAMES
from ringflow.training.pyfunc import model_columns
from ringflow.training.summary import TrainingSummary

__all__ = [  # the names the flow and the tests import from here (some defined in monitoring/)
    "Batch",
    "ChampionInfo",
    "MonitoringError",
    "Reference",
    "RerunAction",
    "act",
    "event_payload",
    "finish_monitoring_run",
    "last_monitored_month",
    "load_batch",
    "load_reference",
    "log_batch_dataset",
    "log_monitoring_run",
    "observe",
    "publish_artifacts",
    "rerun_base_config",
    "rerun_history",
    "resolve_champion",
    "run_reports",
    "score_batch",
    "start_monitoring_run",
    "training_health",
]

AUTOMATION_NAME = RERUN_TRIGGER


def _tracking() -> MlflowClient:
    mlflow.set_tracking_uri(get_settings().tracking_uri)
    return MlflowClient()


def _resource_id(cfg: PipelineConfig) -> str:
    return model_resource_id(cfg.registry.model_name)


# --------------------------------------------------------------------------- champion


def _load_run_json(run_id: str, path: str) -> dict[str, Any] | None:
    try:
        return mlflow.artifacts.load_dict(f"runs:/{run_id}/{path}")
    except (MlflowException, OSError, ValueError):
        return None


@task(name="resolve-champion", cache_policy=NO_CACHE)
def resolve_champion(cfg: PipelineConfig) -> ChampionInfo:
    client = _tracking()
    name = cfg.registry.model_name
    mv = current_champion(client, name)  # a registry that cannot be reached is an error, not "none"
    if mv is None:
        raise MonitoringError(
            f"no model version of {name!r} has the alias @{CHAMPION} in {get_settings().tracking_uri}: "
            "run the training pipeline first (`ringflow run`)"
        )
    version_tags = dict(mv.tags or {})
    run_id = version_tags.get(tags.TRAINING_RUN_ID)
    auc = version_tags.get(tags.TEST_ROC_AUC)
    return ChampionInfo(
        decision_threshold=logged_threshold(getattr(mv, "model_id", None)) or 0.5,
        model_name=name,
        version=str(mv.version),
        model_uri=f"models:/{name}/{mv.version}",
        training_run_id=run_id,
        manifest_path=version_tags.get(tags.MANIFEST_PATH),
        test_roc_auc=float(auc) if auc not in (None, "") else None,
        tags=version_tags,
        training_config=_load_run_json(run_id, artifacts.CONFIG_ARTIFACT) if run_id else None,
    )


# --------------------------------------------------------------------------- data


@task(name="load-batch", cache_policy=NO_CACHE)
def load_batch(cfg: PipelineConfig, batch: str, champion: ChampionInfo, last_monitored: str | None) -> Batch:
    """``next`` / ``YYYY-MM`` (from the configured source) / a CSV or Parquet path."""
    log = get_run_logger()
    if batch == "next":
        test_end = champion_test_end(cfg, champion)
        batch = next_batch_month(test_end, last_monitored)
        log.info(
            "batch 'next' -> %s (champion test window ends %s, last monitored %s)", batch, test_end, last_monitored
        )
    if re.fullmatch(r"\d{4}-\d{2}", batch):
        found = describe_month(cfg, batch)
    else:
        found = describe_file(cfg, Path(batch), log=log)
    log.info("batch %s: %d rows%s", found.label, found.rows, "" if found.labelled else " (no labels)")
    return found


def _data_key(cfg: PipelineConfig) -> bytes | None:
    try:
        from ringflow.tasks.shard import resolve_data_key  # the sharding stage owns key lookup (Secret block)
    except ImportError:
        return key_from_env()
    return resolve_data_key(cfg)


@task(name="load-reference", cache_policy=NO_CACHE)
def load_reference(cfg: PipelineConfig, champion: ChampionInfo) -> Reference:
    """The champion's training rows (its manifest's train shards), sampled to ``reference_sample_rows``.

    Falls back to the training window of the champion's config read from the source when the
    manifest is not on this machine (another RINGFLOW_HOME), and says so.
    """
    log = get_run_logger()
    rows = cfg.monitoring.reference_sample_rows
    if champion.manifest_path and Path(champion.manifest_path).exists():
        manifest = Manifest.load(champion.manifest_path)
        ref = reference_from_manifest(manifest, _data_key(cfg) if manifest.encrypted else None, rows)
    else:
        base = rerun_base_config(cfg, champion)
        log.warning(
            "champion manifest %s not found: reference = training window %s read from the source",
            champion.manifest_path,
            base.data.windows.train,
        )
        ref = reference_from_source(base, rows)
    log.info("reference: %d rows from %s", len(ref.frame), ref.origin)
    return ref


# --------------------------------------------------------------------------- scoring + reports


def champion_baseline(champion: ChampionInfo) -> tuple[Pipeline, float, float | None] | None:
    """The baseline logged in the champion's training run by its evaluation: (model, decision
    threshold, its test ROC AUC), or None (``gate.baseline: none``, or a champion from before)."""
    if not champion.training_run_id:
        return None
    client = MlflowClient()
    try:
        run = client.get_run(champion.training_run_id)
        logged = mlflow.search_logged_models(
            experiment_ids=[run.info.experiment_id],
            output_format="list",
            filter_string=f"source_run_id = '{champion.training_run_id}'",
        )
    except MlflowException:
        return None
    baselines = sorted((m for m in logged if m.name == "baseline"), key=lambda m: m.creation_timestamp)
    if not baselines:
        return None
    newest = baselines[-1]  # a retried evaluation logs it again
    model = mlflow.sklearn.load_model(f"models:/{newest.model_id}")
    threshold = float(newest.params.get(tags.DECISION_THRESHOLD, 0.5))
    return model, threshold, run.data.metrics.get(tags.BASELINE_TEST_ROC_AUC)


@task(name="score-batch", cache_policy=NO_CACHE)
def score_batch(
    cfg: PipelineConfig, champion: ChampionInfo, batch: Batch, reference: Reference
) -> tuple[Batch, Reference]:
    """Score every row of the batch with the champion (and its baseline) chunk by chunk; keep the
    scores, labels and counts the exact metrics need, and a sample of ``max_current_rows`` rows
    for Evidently. The reference (already a sample) is scored whole."""
    _tracking()
    model = mlflow.pyfunc.load_model(champion.model_uri)
    d, pre = cfg.data, reference.preprocessor
    columns = model_columns(model, [d.timestamp_column, *d.feature_columns], d.feature_columns)
    reference.frame[PREDICTION] = score(model, reference.frame, columns)
    baseline = champion_baseline(champion)
    base_score: Callable[[pd.DataFrame], np.ndarray] | None = None
    if baseline is not None:  # scored next to the champion: which of the two degrades more?
        base_model, threshold, test_auc = baseline
        batch.baseline = {"threshold": threshold, "test_roc_auc": test_auc}

        def base_score_fn(chunk: pd.DataFrame) -> np.ndarray:
            return baseline_proba(base_model, chunk, pre.numeric, pre.categorical)

        base_score = base_score_fn

    batch.scores = score_chunks(
        batch_chunks(batch, cfg),
        batch.rows,
        lambda chunk: score(model, chunk, columns),
        features=d.feature_columns,
        vocabulary={c: pre.vocab[c] for c in pre.categorical},
        target=TARGET if batch.labelled else None,
        baseline=base_score,
        sample_rows=cfg.monitoring.max_current_rows,
    )
    return batch, reference


def _scores(batch: Batch) -> BatchScores:
    """The batch's scores: the reports and the logged dataset need a batch ``score_batch`` scored."""
    if batch.scores is None:
        raise MonitoringError(f"batch {batch.label} has not been scored (score_batch comes first)")
    return batch.scores


@task(name="evidently-reports", cache_policy=NO_CACHE)
def run_reports(cfg: PipelineConfig, batch: Batch, reference: Reference, out_dir: str) -> ReportSummary:
    d, m = cfg.data, cfg.monitoring
    labelled = batch.labelled
    window_start = batch.window.start if batch.window else None
    return build_reports(
        reference.frame,
        _scores(batch).sample,
        d.numeric_features,
        d.categorical_features,
        out_dir,
        target=TARGET if labelled else None,
        drift_share=m.drift_share,
        reference_rows=m.reference_sample_rows,
        current_rows=m.max_current_rows,
        # the numbers the anomaly rules decide on, with their thresholds, in the report itself
        rules=RuleThresholds(
            prediction_psi=m.prediction_psi,
            max_missing_increase=m.max_missing_share,
            max_unseen_share=m.max_unseen_category_share,
            vocabulary=reference.preprocessor.vocab,
        ),
        # every snapshot also goes to the workspace `evidently ui` shows (trend across batches)
        workspace=EvidentlyWorkspace(path=str(get_settings().evidently_workspace), project=cfg.registry.model_name),
        batch_label=batch.label,
        batch_time=dt.datetime.combine(window_start, dt.time()) if window_start else None,
    )


def observe(
    cfg: PipelineConfig,
    champion: ChampionInfo,
    batch: Batch,
    reference: Reference,
    report: ReportSummary | None,
    training: TrainingObservation | None,
) -> tuple[MonitoringObservation, dict[str, float]]:
    """Numbers on the full batch -> the rules' input; also returns the batch metrics
    (``monitoring/observation.py``, with the evaluation's metric names for the baseline)."""
    return _observe(cfg, champion, batch, reference, report, training, baseline_metrics=METRIC_NAMES)


# --------------------------------------------------------------------------- MLflow history


def _experiment_ids(client: MlflowClient, cfg: PipelineConfig) -> list[str]:
    exp = client.get_experiment_by_name(cfg.registry.experiment)
    return [exp.experiment_id] if exp else []


@task(name="training-health", cache_policy=NO_CACHE)
def training_health(cfg: PipelineConfig) -> TrainingObservation | None:
    """The newest finished training run (any outcome) with its summary, the previous run's
    throughput and the count of consecutive failures at its world size."""
    client = _tracking()
    ids = _experiment_ids(client, cfg)
    if not ids:
        return None
    runs = client.search_runs(
        ids, tags.tag_filter(tags.KIND, tags.KIND_TRAINING), order_by=["attributes.start_time DESC"], max_results=50
    )
    return training_observation(runs, _load_summary, lambda run_id: _load_run_json(run_id, artifacts.CONFIG_ARTIFACT))


def _load_summary(run_id: str) -> TrainingSummary | None:
    """The run's ``training/summary.json`` artifact, or None (absent, or written by an older ringflow)."""
    raw = _load_run_json(run_id, artifacts.SUMMARY_ARTIFACT)
    try:
        return TrainingSummary.model_validate(raw) if raw else None
    except ValueError:
        return None


def _monitoring_runs(client: MlflowClient, cfg: PipelineConfig, extra: str = "", n: int = 200) -> list[Run]:
    ids = _experiment_ids(client, cfg)
    if not ids:
        return []
    f = (
        tags.tag_filter(tags.KIND, tags.KIND_MONITORING)
        + " and "
        + tags.tag_filter(tags.MODEL_NAME, cfg.registry.model_name)
        + extra
    )
    return client.search_runs(ids, f, order_by=["attributes.start_time DESC"], max_results=n)


@task(name="rerun-history", cache_policy=NO_CACHE)
def rerun_history(cfg: PipelineConfig) -> list[RerunRecord]:
    """Past reruns: monitoring runs tagged ``ringflow.rerun_triggered=true`` (newest first)."""
    client = _tracking()
    runs = _monitoring_runs(client, cfg, " and " + tags.tag_filter(tags.RERUN_TRIGGERED, "true"))
    return [
        RerunRecord.from_tags(r.data.tags, dt.datetime.fromtimestamp(r.info.start_time / 1000, dt.UTC), r.info.run_id)
        for r in runs
    ]


@task(name="last-monitored-month", cache_policy=NO_CACHE)
def last_monitored_month(cfg: PipelineConfig) -> str | None:
    client = _tracking()
    months: list[str] = [m for r in _monitoring_runs(client, cfg) if (m := r.data.tags.get(tags.BATCH_MONTH))]
    return max(months) if months else None


# --------------------------------------------------------------------------- recording


@task(name="start-monitoring-run", cache_policy=NO_CACHE)
def start_monitoring_run(cfg: PipelineConfig, champion: ChampionInfo, batch: Batch) -> str:
    client = _tracking()
    exp_id = ensure_experiment(client, cfg.registry.experiment)
    mark_stale_runs(client, exp_id, "monitoring")  # left RUNNING by a monitoring process that died
    run_tags = {
        tags.KIND: tags.KIND_MONITORING,
        tags.LAUNCHER: launcher_tag(),
        tags.MODEL_NAME: champion.model_name,
        tags.MODEL_VERSION: champion.version,
        tags.BATCH: batch.label,
        tags.RERUN_TRIGGERED: "false",
        "mlflow.runName": f"monitor-{champion.model_name}-v{champion.version}-{batch.month or 'file'}",
    }
    if champion.training_run_id:
        run_tags[tags.MONITORED_TRAINING_RUN_ID] = champion.training_run_id
    if batch.month:
        run_tags[tags.BATCH_MONTH] = batch.month
    if batch.window:
        run_tags[tags.BATCH_WINDOW] = f"[{batch.window.start}, {batch.window.end})"
    try:
        from prefect import runtime

        if runtime.flow_run.id:
            run_tags[tags.PREFECT_FLOW_RUN_ID] = str(runtime.flow_run.id)
    except Exception:  # noqa: BLE001 - outside a flow run there is nothing to link
        pass
    run = client.create_run(exp_id, tags=run_tags)
    run_id: str = run.info.run_id  # MLflow's RunInfo properties are unannotated
    return run_id


@task(name="log-batch-dataset", cache_policy=NO_CACHE)
def log_batch_dataset(cfg: PipelineConfig, run_id: str, batch: Batch) -> None:
    """The monitored batch as a dataset input of its monitoring run (context ``monitoring``).

    Described by its Evidently sample (schema and digest; the same rows for the same batch) with
    the whole batch's row count in the profile: a batch of millions of rows is never one frame."""

    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    sample = _scores(batch).sample.drop(columns=[PREDICTION])
    # MLflow's notes on its source registry and on integer columns: ignored process-wide
    # (training.environment.QUIET_WARNINGS), not in a catch_warnings block, which is not thread-safe
    dataset = pandas_dataset(
        sample,
        source=str(cfg.data.source) if batch.month else batch.label,
        targets=TARGET if batch.labelled else None,
        name=f"{cfg.name}-batch-{batch.month or batch.label}",
    )
    entity = dataset._to_mlflow_entity()
    profile = {"num_rows": batch.rows, "num_elements": batch.rows * sample.shape[1], "sampled_rows": len(sample)}
    entity = Dataset(
        name=entity.name,
        digest=entity.digest,
        source_type=entity.source_type,
        source=entity.source,
        schema=entity.schema,
        profile=json.dumps(profile),
    )
    _tracking().log_inputs(
        run_id, datasets=[DatasetInput(entity, tags=[InputTag(MLFLOW_DATASET_CONTEXT, "monitoring")])]
    )


@task(name="log-monitoring-run", cache_policy=NO_CACHE)
def log_monitoring_run(
    run_id: str,
    report: ReportSummary | None,
    metrics: dict[str, float],
    obs: MonitoringObservation,
    anomalies: list[Anomaly],
    decision: PolicyDecision,
    out_dir: str,
) -> None:
    client = _tracking()
    values = {f"batch_{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and not math.isnan(v)}
    values.update({"rows": obs.rows, "anomalies": len(anomalies)})
    if report is not None:
        values.update(
            {
                "drifted_share": report.drifted_share,
                "drifted_count": report.drifted_count,
                "evidently_seconds": report.evidently_seconds,
                "evidently_import_seconds": report.evidently_import_seconds,
            }
        )
    if obs.roc_auc is not None and obs.reference_roc_auc is not None:
        values["roc_auc_drop"] = obs.reference_roc_auc - obs.roc_auc
    if obs.prediction_psi is not None:
        values["prediction_psi"] = obs.prediction_psi
    ts = int(dt.datetime.now().timestamp() * 1000)
    from mlflow.entities import Metric

    client.log_batch(run_id, metrics=[Metric(k, float(v), ts, 0) for k, v in values.items()])
    out = Path(out_dir)
    (out / "anomalies.json").write_text(json.dumps([a.model_dump(mode="json") for a in anomalies], indent=1))
    (out / "decision.json").write_text(decision.model_dump_json(indent=1))
    (out / "observation.json").write_text(obs.model_dump_json(indent=1))
    client.log_artifacts(run_id, str(out), artifacts.MONITORING_DIR)
    client.set_tag(run_id, tags.ANOMALY_COUNT, str(len(anomalies)))
    if anomalies:
        client.set_tag(run_id, tags.ANOMALY_TYPES, ",".join(sorted({a.type.value for a in anomalies})))


@task(name="finish-monitoring-run", cache_policy=NO_CACHE)
def finish_monitoring_run(run_id: str, run_tags: dict[str, str], status: str = "FINISHED") -> None:
    client = _tracking()
    for k, v in run_tags.items():
        client.set_tag(run_id, k, v)
    client.set_terminated(run_id, status)


# --------------------------------------------------------------------------- events and reruns


class RerunAction(BaseModel):
    mode: str
    """``automation`` (event only; the automation starts the run), ``run_deployment`` (started
    here), ``plan-only`` (neither exists, or ``trigger_rerun=False``) or ``none`` (no plan)."""
    event_id: str | None = None
    flow_run_id: str | None = None
    detail: str = ""


class MonitoringResult(BaseModel):
    """What the monitoring flow returns (flows/monitoring.py) and :func:`publish_artifacts` shows."""

    model_name: str
    model_version: str
    batch: str
    window: BatchWindow | None = None
    rows: int = 0
    monitoring_run_id: str
    tracking_uri: str
    metrics: dict[str, float] = {}
    """Champion metrics on the whole batch (labelled batches)."""
    reference_roc_auc: float | None = None
    roc_auc_drop: float | None = None
    drifted_share: float | None = None
    drifted_columns: list[str] = []
    prediction_psi: float | None = None
    anomalies: list[Anomaly] = []
    decision: str
    rerun_overrides: dict[str, Any] | None = None
    rerun_config: dict[str, Any] | None = None
    """The plan's full config (JSON), as the event carries it in ``rerun.config``."""
    rerun_reason: str | None = None
    anomaly_id: str | None = None
    action: RerunAction
    drift_html: str | None = None
    quality_html: str | None = None
    report_dir: str


def event_payload(
    plan: RerunPlan | None,
    anomalies: list[Anomaly],
    monitoring_run_id: str,
    champion: ChampionInfo,
    batch_label: str,
    decision: PolicyDecision,
) -> AnomalyEventPayload:
    """The anomaly event's payload (the typed contract in ``monitoring/events.py``)."""
    return AnomalyEventPayload(
        anomaly_id=plan.anomaly_id if plan else (anomalies[0].id if anomalies else None),
        monitoring_run_id=monitoring_run_id,
        model=ModelRef(name=champion.model_name, version=champion.version, training_run_id=champion.training_run_id),
        batch=batch_label,
        anomalies=anomalies,
        rerun=None
        if plan is None
        else RerunRequest(
            config=plan.config.model_dump(mode="json"),
            reason=plan.reason,
            overrides=plan.overrides,
            anomaly_ids=plan.anomaly_ids,
            anomaly_types=plan.anomaly_types,
            notes=plan.notes,
        ),
        suppressed=decision.suppressed,
    )


def _automation_enabled(name: str) -> bool:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        found = client.read_automations_by_name(name)
    return any(a.enabled for a in found)


def _deployment_exists(name: str) -> bool:
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(name)
            return True
        except ObjectNotFound:
            return False


def _links(monitoring_run_id: str) -> dict[str, str]:
    """What a notification links to: the MLflow monitoring run and this Prefect flow run."""
    links = {"mlflow_run": mlflow_run_url(get_settings().tracking_uri, monitoring_run_id)}
    try:
        from prefect import runtime

        if runtime.flow_run.id and (url := prefect_flow_run_url(str(runtime.flow_run.id))):
            links["prefect_flow_run"] = url
    except Exception:  # noqa: BLE001 - outside a flow run (or without a UI URL) there is no page
        pass
    return links


@task(name="act-on-anomalies", cache_policy=NO_CACHE)
def act(cfg: PipelineConfig, payload: AnomalyEventPayload, plan: RerunPlan | None, trigger_rerun: bool) -> RerunAction:
    """Emit the event; start the rerun only when no automation will (exactly one path fires)."""
    from prefect.events import emit_event

    log = get_run_logger()
    resource = {
        "prefect.resource.id": _resource_id(cfg),
        "prefect.resource.name": cfg.registry.model_name,
        "ringflow.model.version": payload.model.version,
    }
    related = [
        {"prefect.resource.id": f"mlflow.run.{payload.monitoring_run_id}", "prefect.resource.role": "monitoring-run"}
    ]
    if payload.severity is not None:
        resource[SEVERITY_LABEL] = payload.severity.value
    payload = payload.model_copy(update={"links": _links(payload.monitoring_run_id)})
    body = payload.model_dump(mode="json")
    if plan is None or not trigger_rerun:
        ev = emit_event(REPORT_EVENT, resource=resource, payload=body, related=related)
        return RerunAction(
            mode="plan-only" if plan else "none",
            event_id=str(ev.id) if ev else None,
            detail="trigger_rerun=False" if plan else "no rerun plan",
        )
    automation = _automation_enabled(AUTOMATION_NAME)
    deployment = not automation and _deployment_exists(TRAINING_DEPLOYMENT)
    if not (automation or deployment):
        ev = emit_event(REPORT_EVENT, resource=resource, payload=body, related=related)
        return RerunAction(
            mode="plan-only",
            event_id=str(ev.id) if ev else None,
            detail=f"neither automation {AUTOMATION_NAME!r} nor deployment {TRAINING_DEPLOYMENT!r} exists",
        )
    resource[CAUSE_LABEL] = ",".join(sorted(plan.anomaly_types))
    ev = emit_event(ANOMALY_EVENT, resource=resource, payload=body, related=related)
    if automation:
        log.info(
            "rerun: event %s emitted; automation %s starts the training run", ev.id if ev else None, AUTOMATION_NAME
        )
        return RerunAction(mode="automation", event_id=str(ev.id) if ev else None, detail=AUTOMATION_NAME)
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments import run_deployment

    fr = run_deployment(
        name=TRAINING_DEPLOYMENT,
        parameters={
            "config": plan.config.model_dump(mode="json"),
            "reason": plan.reason,
            "parent_run_id": payload.monitoring_run_id,
            "anomaly_id": plan.anomaly_id,
        },
        timeout=0,  # fire and forget: the rerun is its own flow run, linked as a child of this one
        tags=["ringflow", "rerun", f"anomaly-{plan.anomaly_id}"],
        # one rerun per anomaly, even if this monitoring run is retried
        idempotency_key=f"ringflow-rerun-{plan.anomaly_id}",
        flow_run_name=f"rerun-{plan.anomaly_types[0]}-{plan.anomaly_id[:8]}",
    )
    assert isinstance(fr, FlowRun)  # a sync call; Prefect types it `FlowRun | Coroutine` (async_dispatch)
    log.info("rerun: started %s flow run %s", TRAINING_DEPLOYMENT, fr.id)
    return RerunAction(
        mode="run_deployment", event_id=str(ev.id) if ev else None, flow_run_id=str(fr.id), detail=TRAINING_DEPLOYMENT
    )


@task(name="monitoring-artifacts", cache_policy=NO_CACHE)
def publish_artifacts(result: MonitoringResult) -> None:
    """A table of the key numbers, a link to the MLflow run / HTML reports, the anomalies."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

    r = result
    rows: list[dict[str, Any]] = [
        {"metric": "rows", "value": r.rows},
        {"metric": "drifted_share", "value": _fmt(r.drifted_share)},
        {"metric": "drifted_columns", "value": ", ".join(r.drifted_columns) or "-"},
        {"metric": "roc_auc", "value": _fmt(r.metrics.get("roc_auc"))},
        {"metric": "champion_test_roc_auc", "value": _fmt(r.reference_roc_auc)},
        {"metric": "roc_auc_drop", "value": _fmt(r.roc_auc_drop)},
        {"metric": "baseline_roc_auc", "value": _fmt(r.metrics.get("baseline_roc_auc"))},
        {"metric": "baseline_test_roc_auc", "value": _fmt(r.metrics.get("baseline_test_roc_auc"))},
        {"metric": "baseline_roc_auc_drop", "value": _fmt(r.metrics.get("baseline_roc_auc_drop"))},
        {"metric": "prediction_psi", "value": _fmt(r.prediction_psi)},
        {"metric": "anomalies", "value": ", ".join(a.type.value for a in r.anomalies) or "none"},
        {"metric": "decision", "value": r.decision},
        {"metric": "action", "value": r.action.mode},
    ]
    create_table_artifact(
        rows, key="monitoring-summary", description=f"monitoring {r.model_name} v{r.model_version} on {r.batch}"
    )
    ui = mlflow_run_url(r.tracking_uri, r.monitoring_run_id)
    create_link_artifact(
        ui,
        link_text=f"MLflow monitoring run {r.monitoring_run_id} (Evidently HTML under monitoring/)",
        key="monitoring-run",
        description="MLflow run with the Evidently reports",
    )
    reports = "\n".join(f"- `{p}`" for p in (r.drift_html, r.quality_html) if p)
    anomalies = "\n".join(f"- **{a.type.value}** ({a.severity.value}, `{a.id}`): {a.message}" for a in r.anomalies)
    create_markdown_artifact(
        key="monitoring-anomalies",
        markdown=(
            f"# Monitoring `{r.model_name}` v{r.model_version} on `{r.batch}`\n\n"
            f"MLflow run: {ui}\n\nEvidently reports (local copies):\n{reports}\n\n"
            f"## Anomalies\n{anomalies or 'none'}\n\n## Decision\n{r.decision}\n\nAction: `{r.action.mode}` "
            f"{r.action.detail}\n"
        ),
    )


def _fmt(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"

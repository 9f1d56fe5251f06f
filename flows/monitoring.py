"""The monitoring flow: score a batch with the champion, Evidently reports, anomalies, rerun.

    champion (models:/NAME@champion) -> batch (month / file / next) -> reference (champion's
    train shards, sampled) -> scores -> Evidently drift + quality -> rules -> policy (cooldown,
    budget, de-duplication) -> MLflow monitoring run + Prefect artifacts -> event -> rerun

Exactly one path starts a rerun: when the automation ``ringflow-rerun-on-anomaly`` exists the
flow only emits ``ringflow.anomaly.detected``; else, when the training deployment exists, it
calls ``run_deployment`` itself; else it reports the plan.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from prefect import flow, get_run_logger

from ringflow.monitoring.anomalies import Anomaly, Severity, default_rules
from ringflow.monitoring.events import MONITORING_FLOW
from ringflow.monitoring.policy import RerunRecord, decide
from ringflow.tasks.monitor import (
    MonitoringResult,
    RerunAction,
    act,
    event_payload,
    finish_monitoring_run,
    last_monitored_month,
    load_batch,
    load_reference,
    log_batch_dataset,
    log_monitoring_run,
    observe,
    publish_artifacts,
    rerun_base_config,
    rerun_history,
    resolve_champion,
    run_reports,
    score_batch,
    start_monitoring_run,
    training_health,
)
from ringflow.training import tags
from ringflow.training.config import PipelineConfig, get_settings


class MonitoringAlert(RuntimeError):
    """A critical anomaly that no rerun can fix (a schema change, ...) was found: the monitoring run
    ends Failed, so the schedule, the UI and the CLI's exit code show that a person must look.
    Everything was recorded first; ``result`` holds it."""

    def __init__(self, result: MonitoringResult, alerts: list[Anomaly]):
        super().__init__(
            f"{len(alerts)} critical anomaly(ies) on {result.batch} need a person: "
            + "; ".join(f"{a.type.value}: {a.message}" for a in alerts)
        )
        self.result = result
        self.alerts = alerts


@flow(name=MONITORING_FLOW, log_prints=True)
def monitoring_flow(
    config: PipelineConfig = PipelineConfig(),  # noqa: B008  (the deployment's form shows the defaults)
    batch: str = "next",
    trigger_rerun: bool = True,
) -> MonitoringResult:
    """Monitor one batch (``YYYY-MM``, a CSV/Parquet path, or ``next``) against the champion."""
    log = get_run_logger()
    settings = get_settings()
    os.environ.setdefault("MLFLOW_TRACKING_URI", settings.tracking_uri)
    cfg = config

    champion = resolve_champion(cfg)
    last = last_monitored_month(cfg) if batch == "next" else None
    data = load_batch(cfg, batch, champion, last)
    run_id = start_monitoring_run(cfg, champion, data)
    log.info("monitoring %s v%s on %s (MLflow run %s)", champion.model_name, champion.version, data.label, run_id)
    try:
        reference = load_reference(cfg, champion)
        report_dir = settings.home / "monitoring" / run_id
        report_dir.mkdir(parents=True, exist_ok=True)
        report = None
        if data.scorable:  # every row scored in chunks; Evidently reads a bounded sample
            data, reference = score_batch(cfg, champion, data, reference)
            log_batch_dataset(cfg, run_id, data)
            report = run_reports(cfg, data, reference, str(report_dir))
        obs, metrics = observe(cfg, champion, data, reference, report, training_health(cfg))
        anomalies = default_rules(cfg.monitoring).check(obs)
        history = rerun_history(cfg)
        decision = decide(
            anomalies,
            rerun_base_config(cfg, champion),
            history=history,
            batch=data.window,
            training=obs.training,
            model_label=f"{champion.model_name} v{champion.version}",
            now=dt.datetime.now(dt.UTC),
        )
        log_monitoring_run(run_id, report, metrics, obs, anomalies, decision, str(report_dir))
        plan = decision.plan
        action = RerunAction(mode="none", detail="no anomaly")
        if anomalies:
            payload = event_payload(plan, anomalies, run_id, champion, data.label, decision)
            action = act(cfg, payload, plan, trigger_rerun)
        run_tags = {tags.DECISION: decision.summary()[:5000], tags.ACTION: action.mode}
        if plan is not None and action.mode in ("automation", "run_deployment"):  # act() fires only with a plan
            record = RerunRecord(
                time=dt.datetime.now(dt.UTC),
                monitoring_run_id=run_id,
                anomaly_ids=plan.anomaly_ids,
                anomaly_types=plan.anomaly_types,
                reason=plan.reason,
            )
            run_tags.update(record.to_tags())
            run_tags[tags.RERUN_ANOMALY_ID] = plan.anomaly_id
            if action.event_id:
                run_tags[tags.EVENT_ID] = action.event_id
            if action.flow_run_id:
                run_tags[tags.RERUN_FLOW_RUN_ID] = action.flow_run_id
        finish_monitoring_run(run_id, run_tags)
    except BaseException:
        finish_monitoring_run(run_id, {tags.DECISION: "monitoring failed"}, status="FAILED")
        raise

    result = MonitoringResult(
        model_name=champion.model_name,
        model_version=champion.version,
        batch=data.label,
        window=data.window,
        rows=obs.rows,
        monitoring_run_id=run_id,
        tracking_uri=settings.tracking_uri,
        metrics=metrics,
        reference_roc_auc=champion.test_roc_auc,
        roc_auc_drop=(champion.test_roc_auc - obs.roc_auc)
        if obs.roc_auc is not None and champion.test_roc_auc
        else None,
        drifted_share=obs.drifted_share,
        drifted_columns=obs.drifted_columns,
        prediction_psi=obs.prediction_psi,
        anomalies=anomalies,
        decision=decision.summary(),
        rerun_overrides=plan.overrides if plan else None,
        rerun_config=plan.config.model_dump(mode="json") if plan else None,
        rerun_reason=plan.reason if plan else None,
        anomaly_id=plan.anomaly_id if plan else None,
        action=action,
        drift_html=report.drift_html if report else None,
        quality_html=report.quality_html if report else None,
        report_dir=str(report_dir),
    )
    publish_artifacts(result)
    critical_alerts = [a for a in anomalies if a.severity == Severity.CRITICAL and a.id in decision.alerts]
    if critical_alerts:
        log.error(
            "critical anomalies need a person (no rerun fixes them): %s",
            ", ".join(a.type.value for a in critical_alerts),
        )
        raise MonitoringAlert(result, critical_alerts)
    return result


def print_result(r: MonitoringResult) -> None:
    print()
    print(f"ringflow: monitored {r.model_name} v{r.model_version} on {r.batch} ({r.rows} rows)")
    if r.metrics:
        auc = r.metrics.get("roc_auc")
        print(
            f"  roc_auc        {auc:.4f} (champion test {r.reference_roc_auc:.4f}, drop {r.roc_auc_drop:+.4f})"
            if auc is not None and r.roc_auc_drop is not None
            else f"  roc_auc        {auc}"
        )
        base, base_test = r.metrics.get("baseline_roc_auc"), r.metrics.get("baseline_test_roc_auc")
        if base is not None:  # the same rows: which of the two degrades more
            print(
                f"  baseline auc   {base:.4f}"
                + (f" (baseline test {base_test:.4f}, drop {base_test - base:+.4f})" if base_test is not None else "")
            )
    if r.drifted_share is not None:
        print(f"  drift          {r.drifted_share:.0%} of features: {', '.join(r.drifted_columns) or '-'}")
    if r.prediction_psi is not None:
        print(f"  prediction PSI {r.prediction_psi:.3f}")
    print(f"  anomalies      {len(r.anomalies)}")
    for a in r.anomalies:
        print(f"    - {a.type.value} [{a.severity.value}] {a.id}: {a.message}")
    print(f"  decision       {r.decision}")
    print(
        f"  action         {r.action.mode} {r.action.detail}"
        + (f" (flow run {r.action.flow_run_id})" if r.action.flow_run_id else "")
    )
    print(f"  MLflow run     {r.monitoring_run_id} in {r.tracking_uri}")
    print(f"  reports        {Path(r.report_dir)}")

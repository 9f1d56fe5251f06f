"""Deployments, schedules and the rerun automation (``ringflow deploy``), and the serve process.

- ``training-pipeline/training-pipeline``: the config form (from the pydantic model) with the
  deployed config as default, a cron schedule ``schedules.training_cron`` (weekly by default).
- ``monitoring/monitoring``: ``batch="next"`` on ``schedules.monitoring_cron`` (daily).
- Automation ``ringflow-rerun-on-anomaly``: one ``ringflow.anomaly.detected`` event for this
  model -> one run of the training deployment with the config, reason and cause the monitoring
  flow put in the event.

Everything is create-or-update by name, so ``deploy`` can run any number of times.
``python -m flows.deployments serve`` (started by ``ringflow up``) deploys, then executes the runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from training.config import PipelineConfig, load_config

TRAINING = "training-pipeline"
MONITORING = "monitoring"
DEPLOYMENT_NAMES = [f"{TRAINING}/{TRAINING}", f"{MONITORING}/{MONITORING}"]
AUTOMATION_NAME = "ringflow-rerun-on-anomaly"
ANOMALY_EVENT = "ringflow.anomaly.detected"
REASON_MANUAL = "manual"
REASON_SCHEDULED = "scheduled"


def model_resource_id(cfg: PipelineConfig) -> str:
    return f"ringflow.model.{cfg.registry.model_name}"


def _json_template(expr: str) -> dict[str, Any]:
    # Renders to the JSON value of the expression (a dict stays a dict, not its repr string).
    # Prefect 3.9 does this itself for a bare "{{ expr }}"; being explicit keeps it so.
    return {"__prefect_kind": "json", "value": {"__prefect_kind": "jinja", "template": "{{ " + expr + " | tojson }}"}}


RERUN_PARAMETERS: dict[str, Any] = {
    "config": _json_template("event.payload.rerun.config"),
    "reason": _json_template("event.payload.rerun.reason"),
    "parent_run_id": _json_template("event.payload.monitoring_run_id"),
    "anomaly_id": _json_template("event.payload.anomaly_id"),
}


def build_deployments(cfg: PipelineConfig) -> list:
    """The two RunnerDeployments (not yet sent to the server)."""
    from prefect.schedules import Cron

    from flows.monitoring import monitoring_flow
    from flows.training_pipeline import training_pipeline

    tz = cfg.schedules.timezone
    config = cfg.model_dump(mode="json")
    tags = ["ringflow", cfg.name]
    training = training_pipeline.to_deployment(
        name=TRAINING,
        description="shard -> Horovod training -> evaluation -> MLflow registry (champion gate)",
        # A run from the UI, the CLI or run_deployment is "manual"; the schedule says "scheduled"
        # (Prefect merges a schedule's parameters over the deployment's for the runs it creates).
        parameters={"config": config, "reason": REASON_MANUAL},
        schedules=[Cron(cfg.schedules.training_cron, timezone=tz, slug="training-cron",
                        parameters={"reason": REASON_SCHEDULED})],
        tags=tags,
        concurrency_limit=1,  # two trainings would share the 2 cores and the champion alias
    )
    monitoring = monitoring_flow.to_deployment(
        name=MONITORING,
        description="score the next batch with the champion; Evidently drift/quality; anomaly -> rerun event",
        parameters={"config": config, "batch": "next", "trigger_rerun": True},
        schedules=[Cron(cfg.schedules.monitoring_cron, timezone=tz, slug="monitoring-cron")],
        tags=tags,
        concurrency_limit=1,
    )
    return [training, monitoring]


def apply_automation(cfg: PipelineConfig, training_deployment_id) -> Any:
    """Create or update ``ringflow-rerun-on-anomaly``; returns its id.

    Reactive, threshold 1, no window: every matching event fires exactly one action, and the
    action's idempotency key (the triggering event) keeps a redelivered event from running twice.
    """
    from prefect import get_client
    from prefect.events.actions import RunDeployment
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    automation = AutomationCore(
        name=AUTOMATION_NAME,
        description=(
            f"{ANOMALY_EVENT} for {model_resource_id(cfg)} -> one {DEPLOYMENT_NAMES[0]} run with the "
            "adapted config from the event (reason, monitoring run and anomaly id are passed on)"
        ),
        enabled=True,
        trigger=EventTrigger(
            expect={ANOMALY_EVENT},
            match={"prefect.resource.id": model_resource_id(cfg)},
            posture=Posture.Reactive,
            threshold=1,
            within=timedelta(0),
        ),
        actions=[
            RunDeployment(source="selected", deployment_id=training_deployment_id, parameters=RERUN_PARAMETERS)
        ],
    )
    with get_client(sync_client=True) as client:
        existing = client.read_automations_by_name(AUTOMATION_NAME)
        if not existing:
            return client.create_automation(automation)
        keep, *extra = existing
        for dup in extra:  # a second automation with the name would start a second run per event
            client.delete_automation(dup.id)
        client.update_automation(keep.id, automation)
        return keep.id


def deploy(cfg: PipelineConfig) -> dict[str, Any]:
    """Create/update both deployments and the automation; return their ids by name."""
    deployments = build_deployments(cfg)
    ids = {d.flow_name + "/" + d.name: d.apply() for d in deployments}
    ids[AUTOMATION_NAME] = apply_automation(cfg, ids[DEPLOYMENT_NAMES[0]])
    return ids


def serve(cfg: PipelineConfig, limit: int | None = 2) -> None:
    """Deploy, then execute scheduled, UI- and automation-triggered runs until SIGTERM.

    ``pause_on_shutdown=False``: ``ringflow down`` must not switch the schedules off.
    """
    from prefect import serve as prefect_serve

    deploy(cfg)
    prefect_serve(*build_deployments(cfg), pause_on_shutdown=False, limit=limit, print_starting_message=True)


def _load(config_json: Path | None, config: Path | None) -> PipelineConfig:
    if config_json is not None:
        return PipelineConfig.model_validate_json(config_json.read_text())
    return load_config(config)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m flows.deployments")
    p.add_argument("command", choices=["serve", "deploy"])
    p.add_argument("--config-json", type=Path, help="resolved config written by `ringflow up`")
    p.add_argument("--config", type=Path, help="config YAML (default: built-in defaults)")
    p.add_argument("--limit", type=int, default=2, help="concurrent runs of the serve process")
    a = p.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # runs' logs, not tqdm bars
    cfg = _load(a.config_json, a.config)
    if a.command == "serve":
        serve(cfg, limit=a.limit)
    else:
        for name, ident in deploy(cfg).items():
            print(f"{name}: {ident}")


if __name__ == "__main__":
    main(sys.argv[1:])

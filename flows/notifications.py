"""Notifications: a person hears of a critical anomaly and of a failed training run.

Two Prefect automations, each with a ``CallWebhook`` action on one Webhook block
(``ringflow-notify``, the URL from ``RINGFLOW_NOTIFY_WEBHOOK_URL`` or ``notifications.webhook_url``):

- ``ringflow-notify-critical-anomaly``: every anomaly event (rerun or report) of this model whose
  ``ringflow.anomaly.severity`` label is ``critical`` -> one POST with the anomalies and their
  evidence, the batch, the rerun's reason, and the links to the MLflow monitoring run and the
  Prefect flow run (carried in the event's payload, ``monitoring/events.py``).
- ``ringflow-notify-training-failed``: every Failed or Crashed run of the training flow -> one
  POST with the state's message and the links to the flow run (``ui_url``) and its MLflow run
  (the label the training task puts on the flow run).

The server renders and sends them (Prefect's automation services): nothing in ringflow has to run.
Without a URL, ``deploy`` removes both automations. Create-or-replace by name, like the deployments.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from ringflow.monitoring.events import (
    ANOMALY_EVENT,
    REPORT_EVENT,
    SEVERITY_LABEL,
    TRAINING_FLOW,
    model_resource_id,
)
from ringflow.tasks.links import MLFLOW_RUN_URL_LABEL
from ringflow.training.config import PipelineConfig

if TYPE_CHECKING:
    from prefect.events.schemas.automations import EventTrigger

WEBHOOK_ENV = "RINGFLOW_NOTIFY_WEBHOOK_URL"
WEBHOOK_BLOCK = "ringflow-notify"
NOTIFY_ANOMALY = "ringflow-notify-critical-anomaly"
NOTIFY_FAILED = "ringflow-notify-training-failed"
FAILED_EVENTS = {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}

# JSON bodies (Slack-compatible ``text`` first, then the fields a program reads). Jinja over the
# event and the objects it names (``flow_run``), rendered by the server when the automation fires.
ANOMALY_MESSAGE = """{
  "text": {{ ("ringflow: critical anomaly on model " ~ event.payload.model.name ~ " v" ~ event.payload.model.version ~ ", batch " ~ event.payload.batch ~ ": " ~ (event.payload.anomalies | map(attribute="message") | join("; "))) | tojson }},
  "kind": "critical-anomaly",
  "event": {{ event.event | tojson }},
  "event_id": {{ event.id | string | tojson }},
  "model": {{ event.payload.model | tojson }},
  "batch": {{ event.payload.batch | tojson }},
  "anomaly_id": {{ event.payload.anomaly_id | tojson }},
  "anomalies": {{ event.payload.anomalies | tojson }},
  "rerun_reason": {{ (event.payload.rerun or {}).get("reason") | tojson }},
  "monitoring_run_id": {{ event.payload.monitoring_run_id | tojson }},
  "mlflow_run": {{ (event.payload.get("links") or {}).get("mlflow_run") | tojson }},
  "prefect_flow_run": {{ (event.payload.get("links") or {}).get("prefect_flow_run") | tojson }}
}"""

FAILED_MESSAGE = """{
  "text": {{ ("ringflow: training run " ~ flow_run.name ~ " " ~ flow_run.state.name ~ ": " ~ (flow_run.state.message or "")) | tojson }},
  "kind": "training-failed",
  "event": {{ event.event | tojson }},
  "event_id": {{ event.id | string | tojson }},
  "flow_run_id": {{ flow_run.id | string | tojson }},
  "state": {{ flow_run.state.name | tojson }},
  "message": {{ flow_run.state.message | tojson }},
  "reason": {{ flow_run.parameters.get("reason") | tojson }},
  "anomaly_id": {{ flow_run.parameters.get("anomaly_id") | tojson }},
  "mlflow_run": {{ (flow_run.labels or {}).get("LABEL") | tojson }},
  "prefect_flow_run": {{ flow_run | ui_url | tojson }}
}""".replace('"LABEL"', f'"{MLFLOW_RUN_URL_LABEL}"')  # a str.format would double every Jinja brace


def webhook_url(cfg: PipelineConfig) -> str | None:
    """The environment's URL, else the config's; None: notifications off."""
    return os.environ.get(WEBHOOK_ENV) or cfg.notifications.webhook_url or None


def anomaly_trigger(cfg: PipelineConfig) -> EventTrigger:
    from prefect.events.schemas.automations import EventTrigger, Posture

    return EventTrigger(
        expect={ANOMALY_EVENT, REPORT_EVENT},
        match={"prefect.resource.id": model_resource_id(cfg.registry.model_name), SEVERITY_LABEL: "critical"},
        posture=Posture.Reactive,
        threshold=1,
        within=timedelta(0),  # every such event: one message
    )


def failed_run_trigger() -> EventTrigger:
    from prefect.events.schemas.automations import EventTrigger, Posture

    return EventTrigger(
        expect=FAILED_EVENTS,
        match={"prefect.resource.id": "prefect.flow-run.*"},
        match_related={"prefect.resource.role": "flow", "prefect.resource.name": TRAINING_FLOW},
        posture=Posture.Reactive,
        threshold=1,
        within=timedelta(0),
    )


def _drop(names: list[str]) -> None:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        for name in names:
            for a in client.read_automations_by_name(name):
                client.delete_automation(a.id)


def apply_notifications(cfg: PipelineConfig, keep_when_off: bool = False) -> dict[str, Any]:
    """Create (or replace) the webhook block and both automations; remove them when no URL is
    configured (``keep_when_off``: leave them as they are, for the serve process's own deploy,
    which does not see the URL a person gave ``ringflow deploy``). Returns the automations' ids
    by name (None when off)."""
    from prefect.automations import Automation
    from prefect.blocks.webhook import Webhook
    from prefect.events.actions import CallWebhook

    url = webhook_url(cfg)
    if not url and keep_when_off:
        return {}
    _drop([NOTIFY_ANOMALY, NOTIFY_FAILED])
    if not url:
        return {NOTIFY_ANOMALY: None, NOTIFY_FAILED: None}
    if not url.startswith(("http://", "https://")):
        from ringflow.flows.deployments import DeployError

        raise DeployError(f"notifications.webhook_url / {WEBHOOK_ENV}: {url!r} is not an http(s) URL")
    block_id = Webhook(url=url, method="POST", headers={"Content-Type": "application/json"}).save(
        WEBHOOK_BLOCK, overwrite=True
    )
    ids: dict[str, Any] = {}
    for name, description, trigger, message in (
        (
            NOTIFY_ANOMALY,
            f"a critical anomaly of {cfg.registry.model_name} -> one message",
            anomaly_trigger(cfg),
            ANOMALY_MESSAGE,
        ),
        (
            NOTIFY_FAILED,
            f"a failed or crashed {TRAINING_FLOW} run -> one message",
            failed_run_trigger(),
            FAILED_MESSAGE,
        ),
    ):
        automation = Automation(
            name=name,
            description=description,
            enabled=True,
            trigger=trigger,
            actions=[CallWebhook(block_document_id=block_id, payload=message)],
        ).create()
        assert isinstance(automation, Automation)  # a sync call; Prefect types it `Automation | Coroutine`
        ids[name] = automation.id
    return ids

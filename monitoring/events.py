"""The anomaly event: one typed contract between the monitoring flow that emits it and the trigger
that turns it into a training run (in the spirit of Prefect's ``events/schemas/automations.py``).

Both sides import this module: the names (event, label, trigger, deployment, resource), the
payload model the emitter fills and the rerun action reads, and the trigger's parameter
templates, which are built from paths into that model and checked against it when the module
loads. Renaming a payload field without the trigger (or the reverse) fails at import, not
silently at the first anomaly. Pure (pydantic and the anomaly model): no Prefect here.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from ringflow.monitoring.anomalies import Anomaly, Severity

ANOMALY_EVENT = "ringflow.anomaly.detected"
"""Emitted only with a rerun plan: the rerun trigger listens for it."""
REPORT_EVENT = "ringflow.anomaly.reported"
"""Anomalies that cause no rerun (suppressed, alert-only, ``trigger_rerun=False``): visible in
the event feed, matched by no trigger."""
CAUSE_LABEL = "ringflow.anomaly.cause"
"""Resource label of an anomaly event: its anomaly types; the trigger allows one run per cause per
cooldown, whatever number of events arrives."""
SEVERITY_LABEL = "ringflow.anomaly.severity"
"""Resource label of both events: the highest severity among its anomalies (``critical`` or
``warning``; absent for a healthy batch). The critical-anomaly notification matches on it."""
RERUN_TRIGGER = "ringflow-rerun-on-anomaly"
"""Name of the trigger (an automation in the UI) declared with the training deployment."""
TRAINING_FLOW = "training-pipeline"
MONITORING_FLOW = "monitoring"
TRAINING_DEPLOYMENT = f"{TRAINING_FLOW}/{TRAINING_FLOW}"
MONITORING_DEPLOYMENT = f"{MONITORING_FLOW}/{MONITORING_FLOW}"
DEPLOYMENT_NAMES = [TRAINING_DEPLOYMENT, MONITORING_DEPLOYMENT]
"""``flow/deployment`` names: each flow's one deployment is named after it (flows/deployments.py
creates them, the stack waits for them, a rerun runs TRAINING_DEPLOYMENT)."""


def model_resource_id(model_name: str) -> str:
    """The event's resource: the registered model the anomaly is about."""
    return f"ringflow.model.{model_name}"


class ModelRef(BaseModel):
    name: str
    version: str
    training_run_id: str | None = None


class RerunRequest(BaseModel):
    """What the rerun runs with: the full adapted config and why."""

    config: dict[str, Any]
    """The rerun's complete PipelineConfig (JSON), passed as the training flow's ``config``."""
    reason: str
    overrides: dict[str, Any] = {}
    """The dotted keys that differ from the champion's config (what a person reviews)."""
    anomaly_ids: list[str] = []
    anomaly_types: list[str] = []
    notes: list[str] = []


class AnomalyEventPayload(BaseModel):
    """The payload of :data:`ANOMALY_EVENT` and :data:`REPORT_EVENT`."""

    anomaly_id: str | None
    """The primary anomaly (the plan's, else the first)."""
    monitoring_run_id: str
    """The MLflow monitoring run that found it (the rerun's ``parent_run_id``)."""
    model: ModelRef
    batch: str
    anomalies: list[Anomaly] = []
    rerun: RerunRequest | None = None
    suppressed: dict[str, str] = {}
    """anomaly id -> why it causes no rerun."""
    links: dict[str, str] = {}
    """``mlflow_run`` (the monitoring run's page) and ``prefect_flow_run`` (the monitoring flow
    run's page) where known: what a notification links to."""

    @property
    def severity(self) -> Severity | None:
        """The highest severity among the anomalies (None for a healthy batch)."""
        found = {a.severity for a in self.anomalies}
        if not found:
            return None
        return Severity.CRITICAL if Severity.CRITICAL in found else Severity.WARNING


# training-pipeline parameter <- path in the payload
RERUN_PARAMETER_PATHS: dict[str, tuple[str, ...]] = {
    "config": ("rerun", "config"),
    "reason": ("rerun", "reason"),
    "parent_run_id": ("monitoring_run_id",),
    "anomaly_id": ("anomaly_id",),
}


def _field_type(model: type[BaseModel], path: tuple[str, ...]) -> None:
    """Raise unless ``path`` names fields of ``model`` all the way down."""
    current: Any = model
    for name in path:
        fields = getattr(current, "model_fields", None)
        if fields is None or name not in fields:
            raise AttributeError(
                f"rerun trigger parameter path {'.'.join(path)}: {name!r} is not a field of "
                f"{getattr(current, '__name__', current)} (payload contract: monitoring/events.py)"
            )
        annotation = fields[name].annotation
        # Optional[Model] -> Model
        args = [a for a in getattr(annotation, "__args__", ()) if a is not type(None)]
        current = args[0] if len(args) == 1 and isinstance(args[0], type) else annotation


for _path in RERUN_PARAMETER_PATHS.values():
    _field_type(AnomalyEventPayload, _path)


def json_template(expr: str) -> dict[str, Any]:
    """A Prefect automation parameter that renders to the JSON value of ``expr`` (a dict stays a
    dict, not its repr string)."""
    return {"__prefect_kind": "json", "value": {"__prefect_kind": "jinja", "template": "{{ " + expr + " | tojson }}"}}


def rerun_parameters() -> dict[str, Any]:
    """The trigger's parameters for the training deployment, read from the event payload."""
    return {param: json_template("event.payload." + ".".join(path)) for param, path in RERUN_PARAMETER_PATHS.items()}


def resolve(payload: dict[str, Any], path: tuple[str, ...]) -> Any:
    """What a trigger template yields for this payload (``None`` where the path ends early)."""
    value: Any = payload
    for name in path:
        value = value.get(name) if isinstance(value, dict) else None
    return value

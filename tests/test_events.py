"""The anomaly event is one typed contract: the emitter's payload, the trigger's templates and the
training flow's parameters must agree, and a rename on one side cannot go unnoticed."""

from __future__ import annotations

import datetime as dt
import inspect

import pytest
from pydantic import ValidationError

from ringflow.monitoring import events
from ringflow.monitoring.anomalies import Anomaly, AnomalyType, Severity
from ringflow.monitoring.policy import BatchWindow, decide
from ringflow.training.config import PipelineConfig


def _payload() -> events.AnomalyEventPayload:
    from ringflow.tasks.monitor import ChampionInfo, event_payload

    cfg = PipelineConfig()
    anomaly = Anomaly(
        type=AnomalyType.DATA_DRIFT, severity=Severity.WARNING, message="drift", evidence={}, key={"batch": "2013-07"}
    )
    decision = decide(
        [anomaly], cfg, batch=BatchWindow(start=dt.date(2013, 7, 1), end=dt.date(2013, 8, 1), labelled=True)
    )
    champion = ChampionInfo(
        model_name="flights-delay", version="3", model_uri="models:/flights-delay/3", training_run_id="r1"
    )
    return event_payload(decision.plan, [anomaly], "mon-run-1", champion, "2013-07", decision)


def test_every_trigger_parameter_resolves_on_the_emitters_payload():
    sent = _payload()
    payload = sent.model_dump(mode="json")  # what the event carries
    assert events.AnomalyEventPayload.model_validate(payload) == sent  # and reads back as the same model
    values = {param: events.resolve(payload, path) for param, path in events.RERUN_PARAMETER_PATHS.items()}
    assert all(v is not None for v in values.values()), values
    assert values["parent_run_id"] == "mon-run-1"
    PipelineConfig.model_validate(values["config"])  # the rerun's config is a valid config


def test_trigger_parameters_are_the_training_flows_parameters():
    from ringflow.flows.deployments import RERUN_PARAMETERS, TRAINING_DEPLOYMENT
    from ringflow.flows.training_pipeline import training_pipeline

    flow_params = set(inspect.signature(training_pipeline.fn).parameters)
    assert set(RERUN_PARAMETERS) <= flow_params
    assert TRAINING_DEPLOYMENT == events.TRAINING_DEPLOYMENT == f"{training_pipeline.name}/{training_pipeline.name}"
    for param, path in events.RERUN_PARAMETER_PATHS.items():
        assert RERUN_PARAMETERS[param]["value"]["template"] == "{{ event.payload." + ".".join(path) + " | tojson }}"


def test_a_payload_off_the_contract_is_rejected():
    payload = _payload().model_dump(mode="json")
    payload["anomalies"][0]["severity"] = "high"  # not a Severity
    with pytest.raises(ValidationError, match="severity"):
        events.AnomalyEventPayload.model_validate(payload)
    with pytest.raises(ValidationError, match="model"):
        events.AnomalyEventPayload.model_validate({k: v for k, v in _payload().model_dump().items() if k != "model"})


def test_a_renamed_payload_field_fails_loudly():
    with pytest.raises(AttributeError, match="'reasons' is not a field of RerunRequest"):
        events._field_type(events.AnomalyEventPayload, ("rerun", "reasons"))
    with pytest.raises(AttributeError, match="'monitoring_run' is not a field of AnomalyEventPayload"):
        events._field_type(events.AnomalyEventPayload, ("monitoring_run",))


def test_tag_keys_are_declared_once():
    """Every MLflow tag key literal lives in training/tags.py: no module writes or reads one as a
    bare string (the seam that made a rename on one side silently break the other)."""
    import re
    from pathlib import Path

    from ringflow.training import tags

    keys = {v for k, v in vars(tags).items() if k.isupper() and isinstance(v, str) and "{" not in v}
    root = Path(__file__).resolve().parents[1]
    offenders = []
    for path in [
        *root.glob("flows/*.py"),
        *root.glob("tasks/*.py"),
        *root.glob("training/*.py"),
        *root.glob("monitoring/*.py"),
    ]:
        if path.name == "tags.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for literal in re.findall(r'"(ringflow\.[a-z_]+|gate\.[a-z_]+)"', line):
                if literal in keys:
                    offenders.append(f"{path.relative_to(root)}:{n}: {literal}")
    assert offenders == []


def test_the_failed_run_message_reads_the_label_the_training_task_writes(prefect_harness):
    """The training task puts its MLflow run on the flow run (a label); the failed-run notification
    (rendered by the server from the flow run) reads that same label."""
    from prefect import flow, get_client, runtime

    from ringflow.flows.notifications import FAILED_MESSAGE
    from ringflow.tasks.links import MLFLOW_RUN_URL_LABEL
    from ringflow.tasks.train import _label_flow_run

    @flow
    def labelled() -> str:
        _label_flow_run("sqlite:///nowhere/mlflow.db", "abc123")
        return str(runtime.flow_run.id)

    flow_run_id = labelled()
    with get_client(sync_client=True) as client:
        labels = client.read_flow_run(flow_run_id).labels
    assert labels[MLFLOW_RUN_URL_LABEL] == "run abc123 in sqlite:///nowhere/mlflow.db"
    assert f'get("{MLFLOW_RUN_URL_LABEL}")' in FAILED_MESSAGE

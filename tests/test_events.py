"""The anomaly event is one typed contract: the emitter's payload, the trigger's templates and the
training flow's parameters must agree, and a rename on one side cannot go unnoticed."""

from __future__ import annotations

import ast
import datetime as dt
import inspect
from pathlib import Path

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


# The MLflow calls that write a key, with the key's position among their positional arguments:
# (in the fluent API ``mlflow.x(...)``, on a client ``client.x(run_id, ...)``).
_KEY_WRITERS = {
    "set_tag": (0, 1),
    "log_param": (0, 1),
    "log_metric": (0, 1),
    "set_experiment_tag": (0, 1),
    "set_registered_model_tag": (1, 1),
    "set_model_version_tag": (2, 2),
}
_MAP_WRITERS = {"set_tags", "log_params", "log_metrics", "log_model_params"}  # a {key: value} argument
_MAP_KEYWORDS = {"tags", "params", "metrics"}  # create_run(tags=...), log_model(params=..., tags=...)


def _is_literal(node: ast.expr) -> bool:
    """A key spelled out here: a string, or an f-string with text of its own (``f"x_{k}"``)."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    return isinstance(node, ast.JoinedStr) and any(isinstance(v, ast.Constant) and v.value for v in node.values)


def _mapping_keys(node: ast.expr) -> list[ast.expr]:
    if isinstance(node, ast.Dict):
        return [k for k in node.keys if k is not None]
    return [node.key] if isinstance(node, ast.DictComp) else []


def _mlflow_mapping(node: ast.expr) -> bool:
    """``run.data.tags`` / ``.params`` / ``.metrics``, a model version's or logged model's ``.tags``
    / ``.params``: what MLflow hands back, read by key."""
    if not isinstance(node, ast.Attribute):
        return False
    on_data = isinstance(node.value, ast.Attribute) and node.value.attr == "data"
    return node.attr in ("tags", "params") or (node.attr == "metrics" and on_data)


def mlflow_key_literals(source: str) -> list[tuple[int, str]]:
    """(line, key) for every MLflow tag, param or metric key that ``source`` writes or reads as a
    literal instead of by its name in training/tags.py."""
    from ringflow.training import tags

    declared = {v for k, v in vars(tags).items() if k.isupper() and isinstance(v, str)}
    found: list[ast.expr] = []
    for node in ast.walk(ast.parse(source)):
        # a declared key spelled out anywhere (tag values such as "training" are not keys)
        if isinstance(node, ast.Constant) and node.value in declared and "." in str(node.value):
            found.append(node)
        if isinstance(node, ast.Subscript) and _mlflow_mapping(node.value):
            found.append(node.slice)
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        name, on = node.func.attr, node.func.value
        if name in _KEY_WRITERS:
            fluent, client = _KEY_WRITERS[name]
            i = fluent if isinstance(on, ast.Name) and on.id == "mlflow" else client
            found += node.args[i : i + 1]
        if name in _MAP_WRITERS and node.args:
            found += _mapping_keys(node.args[0])
        found += [k for kw in node.keywords if kw.arg in _MAP_KEYWORDS for k in _mapping_keys(kw.value)]
        if name == "get" and _mlflow_mapping(on):
            found += node.args[:1]
        if name == "tag_filter":
            found += node.args[:1]
    return sorted({(n.lineno, ast.unparse(n)) for n in found if _is_literal(n)})


def test_mlflow_keys_are_declared_once():
    """Every MLflow tag, param and metric key production code writes or reads comes from
    training/tags.py: none is spelled out as a string where it is used (the seam that made a
    rename on one side silently break the other)."""
    root = Path(__file__).resolve().parents[1]
    offenders = [
        f"{path.relative_to(root)}:{line}: {key}"
        for folder in ("flows", "tasks", "training", "monitoring", "infra")
        for path in sorted((root / folder).glob("*.py"))
        if path.name != "tags.py"
        for line, key in mlflow_key_literals(path.read_text())
    ]
    assert offenders == []


@pytest.mark.parametrize(
    "planted",
    [
        'mlflow.set_tag("ringflow.reason", "manual")',
        'client.set_tag(run_id, "world_size", "2")',
        'mlflow.set_tags({"training_status": "ok"})',
        'mlflow.log_metric("decision_threshold", 0.5)',
        'mlflow.log_metrics({f"champion_test_{k}": v for k, v in m.items()})',
        'client.set_model_version_tag(name, version, "gate_decision", "reject")',
        'client.create_run(exp, tags={"ringflow.kind": "training"})',
        'run.data.tags.get("parent_run_id")',
        'mv.tags["git_commit"]',
        'newest.params.get("decision_threshold")',
        'tags.tag_filter("ringflow.batch_month", month)',
    ],
)
def test_a_key_written_or_read_as_a_literal_is_caught(planted):
    assert [key for _, key in mlflow_key_literals(planted)], planted


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

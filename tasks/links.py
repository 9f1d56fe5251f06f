"""Links into the MLflow UI that a person can open from a log line or a Prefect artifact."""

from __future__ import annotations

from urllib.parse import urlparse


def _server(tracking_uri: str) -> str | None:
    return tracking_uri.rstrip("/") if urlparse(tracking_uri).scheme in {"http", "https"} else None


def mlflow_ui_hint(tracking_uri: str) -> str:
    """The UI's address, or for a local store the command that starts a UI on it."""
    return _server(tracking_uri) or f"`mlflow ui --backend-store-uri {tracking_uri}` then http://127.0.0.1:5000"


MLFLOW_RUN_URL_LABEL = "ringflow.mlflow_run_url"
"""Label the training task puts on its Prefect flow run: the MLflow run's page, which the
failed-run notification (rendered by the Prefect server) links to. Here, not in
``monitoring.events``: the training flow must not import the ``monitoring`` package (a runner that
loads ``flows/training_pipeline.py`` by file path finds ``flows/monitoring.py`` under that name)."""


def mlflow_run_url(tracking_uri: str, run_id: str) -> str:
    """The run's page (the UI routes runs under their experiment); the run id for a local store."""
    base = _server(tracking_uri)
    if base is None:
        return f"run {run_id} in {tracking_uri}"
    from mlflow import MlflowClient

    experiment_id = MlflowClient(tracking_uri).get_run(run_id).info.experiment_id
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def mlflow_model_url(tracking_uri: str, model_name: str) -> str:
    base = _server(tracking_uri)
    return f"{base}/#/models/{model_name}" if base else f"model {model_name} in {tracking_uri}"


def prefect_flow_run_url(flow_run_id: str) -> str | None:
    """The flow run's page in the Prefect UI (None when no UI URL is known, e.g. ephemeral API)."""
    from prefect.utilities.urls import url_for

    return url_for("flow-run", obj_id=flow_run_id, url_type="ui")

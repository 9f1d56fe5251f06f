"""The MLflow experiment every ringflow run goes to."""

from __future__ import annotations

from urllib.parse import urlparse

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from training.config import get_settings

# Tracking servers keep artifacts where their operator said (`mlflow server --artifacts-destination`).
_SERVERS = {"http", "https", "databricks"}


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """The experiment's id, created on first use.

    With a local store (the SQLite file, a database URI) the artifacts go under
    ``$RINGFLOW_HOME/artifacts/<experiment>``: MLflow's default is ``./mlruns`` in whatever
    directory the command happened to run from, away from the rest of the state.
    """
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if urlparse(client.tracking_uri).scheme not in _SERVERS:
        location = (get_settings().artifacts_dir / name).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":  # another process created it meanwhile
            raise
        return client.get_experiment_by_name(name).experiment_id

"""The training host's MLflow system metrics (training/system_metrics.py) against a real store."""

from __future__ import annotations

import logging
import os

import mlflow
import pytest
from mlflow import MlflowClient

from ringflow.training.environment import quiet_library_logs
from ringflow.training.system_metrics import host_system_metrics


@pytest.fixture
def client(ringflow_home) -> MlflowClient:
    # MLflow's process-wide URI (other tests set theirs) wins over the environment's
    uri = os.environ["MLFLOW_TRACKING_URI"]
    mlflow.set_tracking_uri(uri)
    return MlflowClient(uri)


def _run(client: MlflowClient) -> str:
    return client.create_run(client.create_experiment("system-metrics")).info.run_id


def test_the_host_s_samples_land_in_the_run(client, monkeypatch):
    monkeypatch.setenv("HOROVOD_HOSTNAME", "hostA")
    run_id = _run(client)
    with host_system_metrics(run_id):
        pass  # shorter than the sampling interval: the final sample still lands
    metrics = client.get_run(run_id).data.metrics
    assert "system/hostA/cpu_utilization_percentage" in metrics, sorted(metrics)
    assert "system/hostA/system_memory_usage_megabytes" in metrics


def test_a_monitor_that_cannot_start_never_fails_the_block(client, capsys):
    ran = []
    mlflow.set_tracking_uri("nosuchscheme://nowhere")
    try:
        with host_system_metrics(_run(client)):
            ran.append(True)
    finally:
        mlflow.set_tracking_uri(client.tracking_uri)
    assert ran == [True]
    assert "system metrics: not sampled" in capsys.readouterr().out


def test_only_local_rank_0_samples_its_host(client, monkeypatch):
    monkeypatch.setenv("HOROVOD_LOCAL_RANK", "1")
    run_id = _run(client)
    with host_system_metrics(run_id):
        pass
    assert not [k for k in client.get_run(run_id).data.metrics if k.startswith("system/")]


def test_the_monitor_s_start_and_stop_lines_are_dropped_its_others_kept(client):
    quiet_library_logs()  # as every rank does first
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("mlflow.system_metrics.system_metrics_monitor")
    logger.addHandler(handler)
    try:
        with host_system_metrics(_run(client)):
            logger.warning("a warning of the monitor")
    finally:
        logger.removeHandler(handler)
    assert seen == ["a warning of the monitor"]

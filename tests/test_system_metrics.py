"""The training host's MLflow system metrics (training/system_metrics.py) against a real store."""

from __future__ import annotations

from mlflow import MlflowClient

from ringflow.training.system_metrics import host_system_metrics


def test_the_host_s_samples_land_in_the_run(ringflow_home, monkeypatch):
    monkeypatch.setenv("HOROVOD_HOSTNAME", "hostA")
    client = MlflowClient()
    run_id = client.create_run(client.create_experiment("system-metrics")).info.run_id
    with host_system_metrics(run_id):
        pass  # shorter than the sampling interval: the final sample still lands
    metrics = client.get_run(run_id).data.metrics
    assert "system/hostA/cpu_utilization_percentage" in metrics, sorted(metrics)
    assert "system/hostA/system_memory_usage_megabytes" in metrics


def test_a_monitor_that_cannot_start_never_fails_the_block(ringflow_home, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://nowhere")
    ran = []
    with host_system_metrics("0123456789abcdef"):
        ran.append(True)
    assert ran == [True]
    assert "system metrics: not sampled" in capsys.readouterr().out


def test_only_local_rank_0_samples_its_host(ringflow_home, monkeypatch):
    monkeypatch.setenv("HOROVOD_LOCAL_RANK", "1")
    client = MlflowClient()
    run_id = client.create_run(client.create_experiment("system-metrics")).info.run_id
    with host_system_metrics(run_id):
        pass
    assert not [k for k in client.get_run(run_id).data.metrics if k.startswith("system/")]

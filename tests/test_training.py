"""Horovod training: real horovodrun (np=2, Gloo) on the smoke slice, real MLflow SQLite store,
Prefect's test harness for the task. No mocks: ranks are killed, runs time out, losses diverge.
"""

from __future__ import annotations

import base64
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from ringflow.tasks import artifacts
from ringflow.tasks.tracking import lineage_digest
from ringflow.tasks.train import LOG_FILE
from ringflow.training.checkpoint import load_checkpoint
from ringflow.training.config import HorovodConfig, PipelineConfig, with_overrides
from ringflow.training.launch import RankOutput, horovodrun_command, launch_env
from ringflow.training.manifest import KEY_ENV, Manifest
from ringflow.training.metrics import classification_metrics
from ringflow.training.model import load_model, predict_proba
from ringflow.training.result import TrainResult
from ringflow.training.state import Progress
from ringflow.training.summary import EpochRecord, TrainingSummary
from tests.conftest import is_rank_argv

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


def _run_program(
    cfg: PipelineConfig,
    manifest: Manifest,
    out: Path,
    resume: bool = False,
    timeout: int = 120,
    tracking: dict[str, str] | None = None,
    program_args: list[str] | None = None,
) -> dict:
    """The training program under plain horovodrun (no Prefect; no MLflow run unless ``tracking``
    names one, see :func:`_tracked_run`)."""
    env = launch_env(cfg, **{"MLFLOW_RUN_ID": None, **(tracking or {})})
    p = subprocess.run(
        horovodrun_command(cfg, manifest.path, out, resume=resume, program_args=program_args or ()),
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return TrainResult.from_output_dir("none", out).model_dump()


def _tracked_run(directory: Path):
    """A run in a fresh MLflow store, as the train task creates it before launching the ranks:
    the client, the run id and the environment that points the ranks at it."""
    from mlflow import MlflowClient

    directory.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{directory / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("training")).info.run_id
    return client, run_id, {"MLFLOW_TRACKING_URI": uri, "MLFLOW_RUN_ID": run_id}


def _logged_steps(client, run_id: str) -> dict[str, list[int]]:
    """Every training metric of the run with the steps of its values, sorted (the host system
    metrics, sampled on a clock, aside)."""
    keys = [k for k in client.get_run(run_id).data.metrics if not k.startswith("system/")]
    return {k: sorted(m.step for m in client.get_metric_history(run_id, k)) for k in sorted(keys)}


def _procs_of(home: Path) -> list[psutil.Process]:
    """Processes of runs under ``home``: by command line or by environment (the middlemen)."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.pid == os.getpid():
            continue
        try:
            if str(home) in " ".join(p.info["cmdline"] or []) or p.environ().get("RINGFLOW_HOME") == str(home):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def _experiment(home: Path, cfg: PipelineConfig):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    return client, client.get_experiment_by_name(cfg.registry.experiment)


def _only_run(home: Path, cfg: PipelineConfig):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    exp = client.get_experiment_by_name(cfg.registry.experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, f"expected ONE MLflow run, got {len(runs)}"
    return client, runs[0]


# --------------------------------------------------------------------------- through the task


class CommandLineWatch(threading.Thread):
    """Samples every process's /proc/<pid>/cmdline (what `ps` shows any user) while a run goes on,
    and the modes of the secrets files under ``home``."""

    def __init__(self, secrets: list[str], home: Path):
        super().__init__(daemon=True)
        self.secrets, self.home = secrets, home
        self.stop = threading.Event()
        self.samples = 0
        self.leaks: list[str] = []
        self.rank_cmdlines = 0
        self.secret_file_modes: set[int] = set()

    def run(self):
        while not self.stop.is_set():
            for d in Path("/proc").iterdir():
                if not d.name.isdigit():
                    continue
                try:
                    raw = (d / "cmdline").read_bytes()
                except OSError:
                    continue
                cmd = raw.replace(b"\0", b" ").decode(errors="replace")
                self.rank_cmdlines += is_rank_argv(raw.decode(errors="replace").split("\0"))
                self.leaks += [f"pid {d.name}: {cmd[:200]}" for s in self.secrets if s in cmd]
            self.secret_file_modes |= {
                f.stat().st_mode & 0o777 for f in self.home.glob("runs/*/.secrets-*") if f.exists()
            }
            self.samples += 1
            time.sleep(0.05)


@pytest.mark.horovod
def test_two_ranks_learn_and_log_one_mlflow_run(prefect_harness, ringflow_home, smoke_config, tmp_path, monkeypatch):
    from ringflow.tasks.train import train_model
    from ringflow.training.sharding import shard_dataset

    # encrypted shards, and credentials in the environment: none of them may reach a command line
    # (horovodrun copies its environment into every rank's argv), yet the ranks decrypt
    key = os.urandom(32)
    key_b64 = base64.b64encode(key).decode()
    monkeypatch.setenv(KEY_ENV, key_b64)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "mlflow-pw-5f2c9e")
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", "admin:prefect-pw-81d0aa")
    cfg = with_overrides(smoke_config, {"sharding.encrypt": "on"})
    smoke_manifest = shard_dataset(cfg, tmp_path / "data", key=key, progress=lambda *a: None)
    assert smoke_manifest.encrypted

    watch = CommandLineWatch([key_b64, "mlflow-pw-5f2c9e", "prefect-pw-81d0aa"], ringflow_home)
    watch.start()
    try:
        r = train_model(cfg, str(smoke_manifest.path), parent_run_id="cause-123", run_tags={"ringflow.reason": "test"})
    finally:
        watch.stop.set()
        watch.join()
    assert watch.rank_cmdlines > 0, "never saw a rank's command line: the watch did not run during training"
    assert watch.leaks == []
    assert watch.secret_file_modes <= {0o600}
    assert not list(ringflow_home.glob("runs/*/.secrets-*"))  # removed when the run ended
    assert r.hosts == ["localhost"] and {p.host for p in r.per_rank} == {"localhost"}

    assert r.status in {"completed", "early_stopped"} and r.world_size == 2
    # chance is 0.5; the smoke config's one validation week after six winter weeks gives 0.595
    assert r.metrics["val_roc_auc"] > 0.58, r.metrics
    assert [p.rank for p in r.per_rank] == [0, 1] and all(
        p.samples_per_s > 0 and p.step_time_ms > 0 for p in r.per_rank
    )
    out = Path(r.output_dir)
    assert out == ringflow_home.resolve() / "runs" / r.run_id
    assert {"model.pt", "preprocessor.json", "summary.json"} <= {f.name for f in out.iterdir()}
    assert (out / "checkpoints" / f"epoch-{r.epochs_completed:04d}.pt").is_file()

    # the output scores raw rows on its own (what evaluation and the pyfunc model do)
    net, pre = load_model(out)
    val = smoke_manifest.read(smoke_manifest.validation)
    auc = classification_metrics(val["target"], predict_proba(net, pre, val))["roc_auc"]
    assert auc == pytest.approx(r.metrics["val_roc_auc"], abs=1e-6)

    assert base64.b64encode(key).decode() not in (out / "horovodrun.log").read_text()
    client, run = _only_run(ringflow_home, cfg)
    assert run.info.run_id == r.run_id and run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["ringflow.kind"] == "training" and tags["world_size"] == "2" and tags["training_status"] == r.status
    assert tags["data_fingerprint"] == smoke_manifest.fingerprint and tags["parent_run_id"] == "cause-123"
    assert tags["config_hash"] == cfg.config_hash() and tags["ringflow.reason"] == "test"
    assert tags["ringflow.hosts"] == "localhost"
    assert run.data.params["world_size"] == "2" and run.data.params["training.horovod.compression"] == "none"
    steps = [m.step for m in client.get_metric_history(r.run_id, "val_roc_auc")]
    assert steps == list(range(1, r.epochs_completed + 1))
    assert {"rank0_samples_per_s", "rank1_step_time_ms", "train_loss"} <= set(run.data.metrics)
    arts = {
        a.path
        for d in (artifacts.TRAINING_DIR, artifacts.CONFIG_DIR, artifacts.DATA_DIR)
        for a in client.list_artifacts(r.run_id, d)
    }
    assert {
        artifacts.SUMMARY_ARTIFACT,
        f"{artifacts.TRAINING_DIR}/{LOG_FILE}",
        artifacts.CONFIG_ARTIFACT,
        "data/manifest.json",
    } <= arts
    contexts = {next(t.value for t in d.tags if t.key == "mlflow.data.context") for d in run.inputs.dataset_inputs}
    assert contexts == {"training", "validation"}
    # each dataset's digest is its files' checksum: the same data files, the same digest
    digests = {d.dataset.name.rsplit("-", 1)[1]: d.dataset.digest for d in run.inputs.dataset_inputs}
    assert digests == {
        "train": lineage_digest(smoke_manifest.shards),
        "validation": smoke_manifest.validation.sha256[:16],
    }
    assert not _procs_of(ringflow_home)


@pytest.mark.horovod
def test_absurd_learning_rate_returns_diverged(prefect_harness, ringflow_home, smoke_config, smoke_manifest):
    from ringflow.tasks.train import train_model

    cfg = with_overrides(smoke_config, {"training.learning_rate": 1e6})
    r = train_model.with_options(retries=0)(cfg, str(smoke_manifest.path))

    assert r.status == "diverged" and r.model_path is None
    client, run = _only_run(ringflow_home, cfg)
    assert run.info.status == "FINISHED" and run.data.tags["training_status"] == "diverged"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "diverged")] == [1]


def _kill_rank_after_checkpoint(home: Path, rank: int, killed: list, epoch: int = 1) -> None:
    """Wait for the first checkpoint of a run under ``home``, then SIGKILL that rank."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not killed:
        if list(home.glob(f"**/checkpoints/epoch-{epoch:04d}.pt")):
            for p in psutil.process_iter(["cmdline"]):
                try:
                    argv = p.info["cmdline"] or []
                    if (
                        is_rank_argv(argv)  # a rank server's client: killing it kills the forked rank
                        and str(home) in " ".join(argv)
                        and p.environ().get("HOROVOD_RANK") == str(rank)
                    ):
                        p.send_signal(signal.SIGKILL)
                        killed.append(p.pid)
                        return
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
        time.sleep(0.05)


@pytest.mark.horovod
def test_killed_rank_fails_naming_it_and_the_retry_resumes(
    prefect_harness, ringflow_home, smoke_config, smoke_manifest
):
    from ringflow.tasks.train import train_model

    # small batches: epochs long enough to kill a rank in the middle of the run
    cfg = with_overrides(
        smoke_config, {"training.batch_size": 64, "training.epochs": 4, "training.early_stopping_patience": 10}
    )
    killed: list[int] = []
    killer = threading.Thread(target=_kill_rank_after_checkpoint, args=(ringflow_home, 1, killed))
    killer.start()
    r = train_model.with_options(retry_delay_seconds=0)(cfg, str(smoke_manifest.path))
    killer.join()

    assert killed, "rank 1 was never killed: the test did not exercise a failure"
    client, run = _only_run(ringflow_home, cfg)  # the retry continued the same run
    error = run.data.tags["ringflow.attempt_1_error"]
    assert "rank 1 failed first" in error and "SIGKILL" in error, error
    assert r.status == "completed" and r.epochs_completed == 4 and run.info.status == "FINISHED"
    assert r.resumed_from and Path(r.resumed_from).parent == Path(r.checkpoint_dir)
    assert int(Path(r.resumed_from).stem.split("-")[1]) >= 1  # did not start over
    assert not _procs_of(ringflow_home)


@pytest.mark.horovod
def test_timeout_kills_every_process(prefect_harness, ringflow_home, smoke_config, smoke_manifest):
    from ringflow.tasks.train import TrainingTimeout, train_model

    cfg = with_overrides(smoke_config, {"training.batch_size": 8, "training.epochs": 200, "training.timeout_s": 10})
    t0 = time.monotonic()
    with pytest.raises(TrainingTimeout, match="timeout_s=10"):
        train_model.with_options(retries=0)(cfg, str(smoke_manifest.path))
    assert time.monotonic() - t0 < 40
    assert _procs_of(ringflow_home) == []
    _, run = _only_run(ringflow_home, cfg)
    assert run.info.status == "FAILED"


def test_failure_message_names_first_failing_rank():
    out = RankOutput()
    for line in [
        "[0]<stdout>:epoch 1/3: train_loss=0.5",
        "[1]<stderr>:Traceback (most recent call last):",
        "[1]<stderr>:RuntimeError: boom",
        "Process 1 exit with status code 1.",
        "Terminating remaining workers after failure of Process 1.",
        "Process 0 exit with status code 143.",
    ]:
        out.feed(line)
    err = out.failure_message(1)
    assert err.rank == 1 and err.exit_code == 1
    assert "rank 1 failed first (exit code 1)" in str(err) and "RuntimeError: boom" in str(err)


# --------------------------------------------------------------------------- the program itself


@pytest.mark.horovod
def test_resumed_run_ends_with_the_same_weights(tmp_path, smoke_config, smoke_manifest):
    """A run killed after its second epoch and resumed ends with the weights of an uninterrupted
    run (same config, so the same learning-rate schedule over the planned epochs)."""
    from ringflow.training.launch import kill_tree

    three = with_overrides(
        smoke_config,
        {
            "training.epochs": 3,
            "training.early_stopping_patience": 5,
            "training.batch_size": 128,  # epochs long enough to kill in
            "training.ema_decay": 0.9,  # and the moving average of the weights resumes with them
        },
    )
    _run_program(three, smoke_manifest, tmp_path / "straight")
    out = tmp_path / "resumed"
    p = subprocess.Popen(
        horovodrun_command(three, smoke_manifest.path, out),
        env=launch_env(three, MLFLOW_RUN_ID=None),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while not (out / "checkpoints" / "epoch-0002.pt").exists() and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.02)
    kill_tree(p.pid, grace_s=2)
    p.wait()
    assert not (out / "checkpoints" / "epoch-0003.pt").exists(), "killed too late: the run finished epoch 3"
    resumed = _run_program(three, smoke_manifest, out, resume=True)

    assert resumed["resumed_from"].endswith("epoch-0002.pt") and resumed["epochs_completed"] == 3
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "epoch-0003.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "epoch-0003.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["averaged"] is not None and b["averaged"] is not None
    for k in a["averaged"]:
        assert torch.equal(a["averaged"][k], b["averaged"][k]), k
    assert Progress.from_checkpoint(a).history[-1].train_loss == Progress.from_checkpoint(b).history[-1].train_loss


@pytest.mark.horovod
def test_weight_averaging_runs_on_two_ranks_and_exports_the_average(tmp_path, smoke_config, smoke_manifest):
    """``training.ema_decay`` at np=2: the run completes, its reported best epoch and AUC are the
    moving average's, and the model it exports is that epoch's average, not the trained weights;
    a final fit exports its last epoch's average."""
    from ringflow.training.final_fit import FinalFit
    from ringflow.training.model import TabularNet

    cfg = with_overrides(
        smoke_config, {"training.ema_decay": 0.9, "training.epochs": 3, "training.early_stopping_patience": 5}
    )
    out = tmp_path / "out"
    s = _run_program(cfg, smoke_manifest, out)
    summary = TrainingSummary.load(out)
    assert s["status"] == "completed" and summary.best_epoch is not None
    ckpt = load_checkpoint(out / "checkpoints" / f"epoch-{summary.best_epoch:04d}.pt")
    assert ckpt["averaged"] is not None
    averaged = {k.removeprefix("module."): v for k, v in ckpt["averaged"].items() if k.startswith("module.")}
    exported = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    assert exported.keys() == averaged.keys() == ckpt["model"].keys()
    assert all(
        torch.equal(exported[k], averaged[k]) and torch.equal(exported[k], ckpt["best_model"][k]) for k in exported
    )
    assert not all(torch.equal(exported[k], ckpt["model"][k]) for k in exported)

    # the reported validation AUC is the exported average's; the trained weights score another
    net, pre = load_model(out)
    val = smoke_manifest.read(smoke_manifest.validation)
    assert classification_metrics(val["target"], predict_proba(net, pre, val))["roc_auc"] == pytest.approx(
        summary.best_val_roc_auc, abs=1e-6
    )
    trained = TabularNet(**net.arch)
    trained.load_state_dict(ckpt["model"])
    raw_auc = classification_metrics(val["target"], predict_proba(trained, pre, val))["roc_auc"]
    assert abs(raw_auc - summary.best_val_roc_auc) > 1e-5, raw_auc

    final = tmp_path / "final"
    f = _run_program(cfg, smoke_manifest, final, program_args=FinalFit(2, 0.3).args())
    assert f["status"] == "completed" and f["epochs_completed"] == 2
    last = load_checkpoint(final / "checkpoints" / "epoch-0002.pt")
    assert last["averaged"] is not None
    exported = torch.load(final / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(exported[k], last["averaged"][f"module.{k}"]) for k in exported)
    assert not all(torch.equal(exported[k], last["model"][k]) for k in exported)


@pytest.mark.horovod
def test_uneven_shards_do_not_hang(tmp_path, smoke_config):
    from ringflow.training.sharding import shard_dataset

    cfg = with_overrides(smoke_config, {"sharding.num_shards": 3, "training.epochs": 1})
    manifest = shard_dataset(cfg, tmp_path / "data", progress=lambda *a: None)
    rows = [sum(s.rows for s in manifest.shards_for_rank(r, 2)) for r in range(2)]
    assert rows[0] > 1.5 * rows[1]  # rank 0 holds two shards, rank 1 one
    s = _run_program(cfg, manifest, tmp_path / "out", timeout=90)
    assert s["status"] == "completed" and [p["rank"] for p in s["per_rank"]] == [0, 1]


@pytest.mark.horovod
def test_elastic_job_survives_a_lost_worker(tmp_path, smoke_config, smoke_manifest, monkeypatch):
    cfg = with_overrides(
        smoke_config,
        {
            "training.epochs": 4,
            "training.batch_size": 256,
            "training.early_stopping_patience": 10,
            "training.elastic.enabled": True,
            "training.elastic.min_np": 1,
            "training.elastic.max_np": 2,
            "training.ema_decay": 0.9,  # the moving average is part of the elastic state
        },
    )
    cmd = horovodrun_command(cfg, smoke_manifest.path, tmp_path / "out")
    assert "--host-discovery-script" in cmd and cmd[cmd.index("--network-interface") + 1] == "lo"
    # Horovod blacklists the whole host of a failed worker; with one host name nothing would be
    # left. One-host elastic runs its slots under two names of this machine, so the job shrinks
    # to the survivor.
    assert launch_env(cfg, base={})["RINGFLOW_HOSTS"] == "localhost:1,127.0.0.1:1"  # the default, no setting
    client, run_id, tracking = _tracked_run(tmp_path / "mlflow")
    killed: list[int] = []
    killer = threading.Thread(target=_kill_rank_after_checkpoint, args=(tmp_path, 1, killed))
    killer.start()
    s = _run_program(cfg, smoke_manifest, tmp_path / "out", timeout=150, tracking=tracking)
    killer.join()
    assert killed, "rank 1 was never killed"
    summary = TrainingSummary.load(tmp_path / "out")
    sizes = [h.world_size for h in summary.history]
    assert s["status"] == "completed" and s["epochs_completed"] == 4
    assert sizes[0] == 2 and sizes[-1] == 1, sizes  # rolled back to the last commit and went on with one rank
    assert np.isfinite(s["metrics"]["val_roc_auc"])

    # The reset replays the lost epoch, never a logged one: ONE value per epoch and metric, in the
    # one run, logged by the survivor's logger as by the first rank 0's.
    steps = _logged_steps(client, run_id)
    assert all(len(v) == len(set(v)) for v in steps.values()), steps
    assert steps["val_roc_auc"] == steps["world_size"] == [1, 2, 3, 4]
    assert [m.value for m in sorted(client.get_metric_history(run_id, "world_size"), key=lambda m: m.step)] == sizes
    assert steps["rank1_samples_per_s"] == [h.epoch for h in summary.history if h.world_size == 2]

    # the moving average rolled back with the model: it counts the steps of the kept epochs only
    # (the trainer's steps per epoch at each world size), none of the epoch the reset replayed.
    # (Without the average in the elastic state this counted 10 steps more in one run; in another
    # the kill landed before the survivor's first step of epoch 2 and it could not tell.)
    train_rows = smoke_manifest.windows["train"].rows

    def steps_per_epoch(size: int) -> int:
        rows = [sum(e.rows for e in smoke_manifest.shards_for_rank(r, size)) for r in range(size)]
        batch = [max(1, round(256 * r * size / train_rows)) for r in rows]
        return max(math.ceil(r / b) for r, b in zip(rows, batch, strict=True))

    last = load_checkpoint(tmp_path / "out" / "checkpoints" / "epoch-0004.pt")
    assert last["averaged"] is not None
    assert int(last["averaged"]["n_averaged"]) == sum(steps_per_epoch(h.world_size) for h in summary.history)


@pytest.mark.horovod
def test_elastic_divergence_is_logged_as_a_fixed_run_s(tmp_path, smoke_config, smoke_manifest):
    """Fixed and elastic runs go through the same epoch loop: a non-finite loss ends an elastic
    run as it ends a fixed one (test_absurd_learning_rate_returns_diverged), with the
    ``diverged`` metric at that epoch, the status and no model."""
    cfg = with_overrides(
        smoke_config,
        {
            "training.learning_rate": 1e6,
            "training.elastic.enabled": True,
            "training.elastic.min_np": 1,
            "training.elastic.max_np": 2,
        },
    )
    client, run_id, tracking = _tracked_run(tmp_path / "mlflow")
    s = _run_program(cfg, smoke_manifest, tmp_path / "out", timeout=150, tracking=tracking)

    summary = TrainingSummary.load(tmp_path / "out")
    assert s["status"] == "diverged" and s["model_path"] is None and summary.diverged_at is not None
    epoch = summary.diverged_at.epoch
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "diverged")] == [(epoch, 1.0)]
    assert client.get_run(run_id).data.tags["training_status"] == "diverged"


@pytest.mark.horovod
def test_fixed_and_elastic_runs_log_the_same_metrics_once_per_epoch(tmp_path, smoke_config, smoke_manifest):
    """The same epoch loop under both drivers: the same metric keys, one value per epoch each
    (best_* once, at the best epoch), the same params, and the same validation results."""
    fixed = with_overrides(smoke_config, {"training.epochs": 2, "training.early_stopping_patience": 5})
    elastic = with_overrides(
        fixed, {"training.elastic.enabled": True, "training.elastic.min_np": 1, "training.elastic.max_np": 2}
    )
    logged, params, results = {}, {}, {}
    for name, cfg in (("fixed", fixed), ("elastic", elastic)):
        client, run_id, tracking = _tracked_run(tmp_path / name)
        results[name] = _run_program(cfg, smoke_manifest, tmp_path / name / "out", timeout=150, tracking=tracking)
        logged[name] = _logged_steps(client, run_id)
        params[name] = client.get_run(run_id).data.params

    steps = logged["fixed"]
    best = results["fixed"]["best_epoch"]
    assert {"val_roc_auc", "train_loss", "lr", "world_size", "rank0_samples_per_s", "rank1_peak_rss_mb"} <= set(steps)
    assert all(v == ([best] if k.startswith("best_") else [1, 2]) for k, v in steps.items()), steps
    assert logged["elastic"] == steps
    assert set(params["elastic"]) == set(params["fixed"])
    assert results["elastic"]["metrics"] == pytest.approx(
        results["fixed"]["metrics"] | {"samples_per_s": results["elastic"]["metrics"]["samples_per_s"]}
    )


def _epoch_record(epoch: int, auc: float) -> EpochRecord:
    """An epoch's record for the progress tests: only the epoch and its validation AUC matter."""
    return EpochRecord(
        epoch=epoch,
        train_loss=0.5,
        lr=0.01,
        epoch_time_s=1.0,
        samples_per_s=10.0,
        world_size=1,
        per_rank=[],
        val_roc_auc=auc,
        val_log_loss=0.6,
    )


def test_progress_is_replaced_never_changed_so_an_elastic_commit_holds(tmp_path):
    """Horovod's ObjectState commits a reference to ``state.progress``: an epoch must leave the
    committed progress as it was. Early stopping keeps the best weights; a checkpoint round-trips."""
    from torch import nn

    from ringflow.training.checkpoint import CheckpointPayload, save_checkpoint
    from ringflow.training.model import Arch

    net = nn.Linear(2, 1)
    committed = Progress()
    first = committed.after_epoch(_epoch_record(1, 0.7), net, patience=2)
    assert committed == Progress() and committed.history == ()
    best = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        net.weight.add_(1.0)
    second = first.after_epoch(_epoch_record(2, 0.6), net, patience=2)
    third = second.after_epoch(_epoch_record(3, float("nan")), net, patience=2)
    assert (first.bad_epochs, second.bad_epochs, third.bad_epochs) == (0, 1, 2)
    assert not second.stopped and third.stopped and third.best_epoch == 1 and third.epoch == 3
    assert all(torch.equal(third.best_model[k], best[k]) for k in best)  # not the weights of epoch 3
    assert [h.epoch for h in third.history] == [1, 2, 3] and len(first.history) == 1

    arch = Arch(num_numeric=2, cardinalities=[], embedding_dim=1, hidden_sizes=[1], dropout=0.0)
    payload = CheckpointPayload(
        **third.as_checkpoint(),
        model=net.state_dict(),
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1).state_dict(),
        arch=arch,
        world_size=1,
        seed=0,
    )
    loaded = load_checkpoint(save_checkpoint(tmp_path, payload))
    again = Progress.from_checkpoint(loaded)
    assert (again.epoch, again.best_epoch, again.bad_epochs, again.stopped) == (3, 1, 2, True)
    assert again.history[:2] == third.history[:2] and all(torch.equal(again.best_model[k], best[k]) for k in best)


def test_the_moving_average_is_what_is_kept_checkpointed_and_resumed(tmp_path, smoke_config):
    """``training.ema_decay``: the average follows the warmed-up EMA of the weights after every
    step and differs from them; the epoch's progress keeps the average as the best model, the
    checkpoint holds both (the trained weights to go on from, the average to resume averaging)
    and a restore brings the average back exactly."""
    from torch import nn

    from ringflow.training.averaging import WeightAverage
    from ringflow.training.checkpoint import save_checkpoint
    from ringflow.training.model import TabularNet
    from ringflow.training.state import restore
    from ringflow.training.train import checkpoint_payload

    def build() -> tuple[TabularNet, torch.optim.Optimizer, WeightAverage]:
        torch.manual_seed(0)
        net = TabularNet(3, [5, 7], 4, [8], additive_categorical=[1])
        return net, torch.optim.AdamW(net.parameters(), lr=0.05), WeightAverage(net, 0.9)

    net, opt, average = build()
    g = torch.Generator().manual_seed(1)
    x_num = torch.randn(64, 3, generator=g)
    x_cat = torch.stack([torch.randint(0, 5, (64,), generator=g), torch.randint(0, 7, (64,), generator=g)], 1)
    y = (torch.rand(64, generator=g) > 0.5).float()
    expected: dict[str, torch.Tensor] = {}
    for step in range(30):
        opt.zero_grad()
        nn.functional.binary_cross_entropy_with_logits(net(x_num, x_cat), y).backward()
        opt.step()
        average.update(net)
        raw = {k: v.detach().clone() for k, v in net.state_dict().items()}
        d = min(0.9, (1 + step) / (10 + step))  # after `step` updates; the first one copies
        expected = raw if step == 0 else {k: d * expected[k] + (1 - d) * raw[k] for k in raw}
    averaged = average.net.state_dict()
    assert average.updates == 30
    assert all(torch.allclose(averaged[k], expected[k], atol=1e-6) for k in raw)
    assert not all(torch.allclose(averaged[k], raw[k], atol=1e-3) for k in raw)

    progress = Progress().after_epoch(_epoch_record(1, 0.7), average.net, patience=3)
    path = save_checkpoint(tmp_path, checkpoint_payload(progress, net, opt, smoke_config, 2, average))
    ckpt = load_checkpoint(path)
    assert all(torch.equal(ckpt["best_model"][k], averaged[k]) for k in raw)
    assert all(torch.equal(ckpt["model"][k], raw[k]) for k in raw)

    net2, opt2, average2 = build()
    restore(ckpt, net2, opt2, path, average2)
    assert average2.updates == 30
    assert all(torch.equal(average2.net.state_dict()[k], averaged[k]) for k in raw)
    net2.load_state_dict(raw)
    assert restore(ckpt | {"averaged": None}, net2, opt2, path, (fresh := build()[2])).epoch == 1
    assert fresh.updates == 0  # a checkpoint without an average: the next update copies the weights


def test_a_checkpoint_without_the_payload_s_fields_is_refused(tmp_path):
    from ringflow.training.checkpoint import CheckpointError

    path = tmp_path / "epoch-0001.pt"
    torch.save({"epoch": 1, "model": {}}, path)
    with pytest.raises(CheckpointError, match="not a ringflow checkpoint: it lacks .*arch"):
        load_checkpoint(path)


def test_a_summary_written_before_the_typed_history_still_loads(tmp_path):
    """summary.json as the code before the typed epoch record wrote it: non-finite values as
    null, ``diverged_at`` and ``horovod`` as plain objects."""
    rank = {"rank": 0, "host": "localhost", "samples_per_s": 900.0, "step_time_ms": 3.5, "peak_rss_mb": 410.0}
    old = {
        "status": "diverged",
        "epochs": 1,
        "epochs_planned": 3,
        "best_epoch": 1,
        "best_val_roc_auc": 0.61,
        "metrics": {"val_roc_auc": 0.61, "val_log_loss": None, "train_loss": None, "samples_per_s": 900.0},
        "per_rank": [rank],
        "hosts": ["localhost"],
        "world_size": 1,
        "model_written": True,
        "checkpoint_dir": None,
        "last_good_checkpoint": None,
        "diverged_at": {"epoch": 2, "step": 7},
        "resumed_from": None,
        "horovod": {**HorovodConfig().model_dump(mode="json"), "compression": "fp16"},
        "elastic": False,
        "seed": 0,
        "wall_time_s": 3.0,
        "history": [
            {
                "epoch": 1,
                "train_loss": None,
                "lr": 0.01,
                "epoch_time_s": 1.0,
                "samples_per_s": 900.0,
                "world_size": 1,
                "per_rank": [rank],
                "diverged": False,
                "val_roc_auc": 0.61,
                "val_log_loss": None,
            }
        ],
    }
    (tmp_path / "summary.json").write_text(json.dumps(old))
    s = TrainingSummary.load(tmp_path)
    assert s.diverged_at is not None and (s.diverged_at.epoch, s.diverged_at.step) == (2, 7)
    assert s.horovod.compression == "fp16" and s.history[0].per_rank[0].host == "localhost"
    assert np.isnan(s.history[0].train_loss) and s.history[0].val_pr_auc is None
    # written again (null for NaN) and read back: the same record
    s.write(tmp_path)
    again = TrainingSummary.load(tmp_path)
    assert again.history[0].model_dump_json() == s.history[0].model_dump_json()


def test_one_host_elastic_ranks_share_one_machine_s_cores():
    """Thread count per rank = cores // ranks on the machine. A one-host elastic job runs its
    ranks under two names of this machine, one slot each, so Horovod's local size says 1."""
    from ringflow.training.train import ranks_sharing_host

    cfg = with_overrides(
        PipelineConfig(), {"training.world_size": 2, "training.elastic.enabled": True, "training.elastic.min_np": 1}
    )
    assert ranks_sharing_host(cfg, local_size=1) == 2
    assert ranks_sharing_host(with_overrides(cfg, {"training.elastic.max_np": 4}), local_size=2) == 4
    # named hosts, or a fixed-size job: Horovod's local size is right
    assert ranks_sharing_host(with_overrides(cfg, {"training.horovod.hosts": "h1:1,h2:1"}), local_size=1) == 1
    assert ranks_sharing_host(with_overrides(cfg, {"training.elastic.enabled": False}), local_size=2) == 2


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux affinity API")
def test_ranks_are_pinned_only_when_they_fit_the_host():
    """``training.pin_ranks``: rank r of n gets its own cores, all of its threads included;
    ranks that would share cores are left to the OS."""
    cores = sorted(os.sched_getaffinity(0))
    probe = (
        "import os, sys, json; from ringflow.training.train import pin_to_cores; "
        "pin_to_cores(*map(int, sys.argv[1:4])); "
        "print(json.dumps([sorted(os.sched_getaffinity(0)), "
        "[sorted(os.sched_getaffinity(int(t))) for t in os.listdir('/proc/self/task')]]))"
    )

    def affinity(local_rank, local_size, threads):
        out = subprocess.run(
            [sys.executable, "-c", probe, str(local_rank), str(local_size), str(threads)],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        return json.loads(out.stdout)

    if len(cores) >= 2:
        process, threads = affinity(1, 2, 1)
        assert process == [cores[1]] and all(t == [cores[1]] for t in threads)
    process, _ = affinity(0, len(cores) + 1, 1)  # more ranks than cores: not pinned
    assert process == cores


# --------------------------------------------------------------------------- causes, and what is retried


def _broken_copy(manifest: Manifest, dest: Path) -> Manifest:
    import shutil

    shutil.copytree(manifest.dir, dest)
    return Manifest.load(dest)


def test_a_deleted_shard_is_named_before_anything_starts(
    prefect_harness, ringflow_home, smoke_config, smoke_manifest, tmp_path
):
    from ringflow.tasks.train import train_model
    from ringflow.training.manifest import ShardIntegrityError

    m = _broken_copy(smoke_manifest, tmp_path / "copy")
    (m.dir / m.shards[1].file).unlink()
    with pytest.raises(ShardIntegrityError, match=r"data file missing: .*shard-00001\.parquet"):
        train_model(smoke_config, str(m.path))  # default retries: not retried, same cause
    client, exp = _experiment(ringflow_home, smoke_config)
    assert exp is None or not client.search_runs([exp.experiment_id])  # no run, no launch
    assert not _procs_of(ringflow_home)


@pytest.mark.horovod
def test_a_corrupt_shard_stops_its_rank_with_that_cause_and_is_not_retried(
    prefect_harness, ringflow_home, smoke_config, smoke_manifest, tmp_path
):
    from ringflow.tasks.train import train_model

    m = _broken_copy(smoke_manifest, tmp_path / "copy")
    shard = m.dir / m.shards[1].file
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # same size: only the rank's sha256 check can see it
    shard.write_bytes(bytes(blob))
    from ringflow.training.manifest import ShardIntegrityError

    with pytest.raises(ShardIntegrityError, match=r"checksum mismatch for .*shard-00001"):
        train_model(smoke_config, str(m.path))
    _, run = _only_run(ringflow_home, smoke_config)
    assert "ringflow.attempt_2_error" not in run.data.tags  # not retried: it would fail the same way
    assert run.info.status == "FAILED" and not _procs_of(ringflow_home)

    # The ranks check too (a retry skips the task's own reading): the rank that reads the bad
    # shard says why, and that is the error, not its peer's "Horovod has been shut down".
    env = launch_env(smoke_config, MLFLOW_RUN_ID=None)
    p = subprocess.run(
        horovodrun_command(smoke_config, m.path, tmp_path / "out"), env=env, capture_output=True, text=True, timeout=120
    )
    out = RankOutput()
    for line in (p.stdout + p.stderr).splitlines():
        out.feed(line)
    err = out.failure_message(p.returncode)
    assert p.returncode != 0 and not err.retryable and err.rank == 1
    assert "rank 1 stopped: ShardIntegrityError: checksum mismatch" in str(err) and "shard-00001" in str(err)


def test_more_ranks_than_shards_is_refused_before_launch(prefect_harness, ringflow_home, smoke_config, smoke_manifest):
    from ringflow.tasks.train import train_model

    cfg = with_overrides(smoke_config, {"training.world_size": 8})
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=r"training.world_size=8 exceeds the 2 shards"):
        train_model(cfg, str(smoke_manifest.path))
    assert time.monotonic() - t0 < 30  # refused up front, not after launching 8 ranks twice
    assert not _procs_of(ringflow_home)


def test_one_host_elastic_refuses_a_min_np_a_lost_rank_would_break():
    from ringflow.training.launch import check_launchable

    cfg = with_overrides(
        PipelineConfig(), {"training.elastic.enabled": True, "training.world_size": 2, "training.elastic.min_np": 2}
    )
    with pytest.raises(ValueError, match="training.elastic.min_np=2.*leaving 1"):
        check_launchable(cfg, num_shards=2)
    check_launchable(with_overrides(cfg, {"training.elastic.min_np": 1}), num_shards=2)


@pytest.mark.parametrize(
    "lines, code, retryable",
    [
        (["[1]<stderr>:RuntimeError: a bug", "Process 1 exit with status code 1."], 1, False),
        (
            [
                "[1]<stderr>:horovod.common.exceptions.HorovodInternalError: ring broke",
                "Process 1 exit with status code 1.",
            ],
            1,
            True,
        ),
        (["Process 1 exit with status code 137."], 137, True),  # SIGKILL / OOM killer
        (["Process 1 exit with status code 255."], 255, True),  # ssh: the host went away
        (
            [
                "[0]<stderr>:horovod ... Horovod has been shut down",
                "Process 0 exit with status code 1.",
                "[1]<stderr>:ringflow-error: MissingKeyError: shard-00001.parquet is encrypted",
                "Process 1 exit with status code 78.",
            ],
            78,
            False,
        ),  # the real cause, not the peer
    ],
)
def test_failures_are_classified_retryable_or_not(lines, code, retryable):
    out = RankOutput()
    for line in lines:
        out.feed(line)
    err = out.failure_message(1)
    assert err.retryable is retryable and err.exit_code == code
    if code == 78:
        assert err.rank == 1 and "MissingKeyError" in str(err)


def test_a_run_left_running_by_a_dead_launcher_is_marked_killed(ringflow_home):
    from mlflow import MlflowClient

    from ringflow.tasks.tracking import ensure_experiment, mark_stale_runs
    from ringflow.training.launch import start_ticks as _start_ticks
    from ringflow.training.tags import LAUNCHER as LAUNCHER_TAG

    client = MlflowClient(f"sqlite:///{ringflow_home / 'mlflow.db'}")
    exp = ensure_experiment(client, "ringflow")
    dead = subprocess.Popen(["sleep", "60"])
    dead_tag = f"{socket.gethostname()}:{dead.pid}:{_start_ticks(dead.pid)}"
    dead.kill()
    dead.wait()
    me = f"{socket.gethostname()}:{os.getpid()}:{_start_ticks(os.getpid())}"
    orphan = client.create_run(exp, tags={"ringflow.kind": "training", LAUNCHER_TAG: dead_tag}).info.run_id
    alive = client.create_run(exp, tags={"ringflow.kind": "training", LAUNCHER_TAG: me}).info.run_id
    elsewhere = client.create_run(exp, tags={"ringflow.kind": "training", LAUNCHER_TAG: "other-host:1:1"}).info.run_id

    assert mark_stale_runs(client, exp, "training") == [orphan]
    assert (
        client.get_run(orphan).info.status == "KILLED"
        and "is gone" in client.get_run(orphan).data.tags["ringflow.stale"]
    )
    assert {client.get_run(r).info.status for r in (alive, elsewhere)} == {"RUNNING"}


def test_concurrent_first_use_of_a_new_store(tmp_path):
    """Two processes open a fresh SQLite store at once (two `ringflow run` on a new home)."""
    uri = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"
    code = f"from ringflow.tasks.tracking import ensure_store; ensure_store({uri!r}); print('ok')"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=Path(__file__).resolve().parents[1],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs


def _schema(db: Path) -> tuple[dict[str, set[str]], list[tuple[str]], list[tuple[str, str]]]:
    """(each table's and index's definition as a set of lines, the schema revision, the experiments).
    Sets: MLflow's own migrations list a table's constraints in no fixed order."""
    import sqlite3

    with sqlite3.connect(db) as c:
        rows = c.execute("SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL")
        tables = {name: {line.strip().rstrip(",") for line in sql.splitlines()} for name, sql in rows}
        version = c.execute("SELECT version_num FROM alembic_version").fetchall()
        experiments = c.execute("SELECT name, artifact_location FROM experiments").fetchall()
    return tables, version, experiments


def test_a_new_store_from_the_schema_template_is_the_store_mlflow_makes(tmp_path, monkeypatch):
    """ensure_store copies a cached, migrated empty store instead of replaying MLflow's migrations:
    the copy must be the same schema at the same revision, its default experiment its own."""
    from mlflow import MlflowClient

    from ringflow.tasks.tracking import ensure_store, schema_template

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    template = schema_template()
    assert template.parent == tmp_path / "cache" / "ringflow"
    assert _schema(template)[2] == []  # schema only: no experiment pointing at the cache
    ensure_store(f"sqlite:///{tmp_path / 'copied' / 'mlflow.db'}")
    MlflowClient(f"sqlite:///{tmp_path / 'mlflow-made' / 'mlflow.db'}").search_experiments()  # MLflow's own
    copied, made = _schema(tmp_path / "copied" / "mlflow.db"), _schema(tmp_path / "mlflow-made" / "mlflow.db")
    assert copied[0] == made[0] and copied[1] == made[1]
    assert [name for name, _ in copied[2]] == ["Default"]
    assert str(tmp_path / "cache") not in copied[2][0][1]


# --------------------------------------------------------------------------- training.horovod.hostfile


def test_hostfile_takes_slurm_node_lists_and_mpi_hostfiles(tmp_path, smoke_config):
    from ringflow.training.config import ConfigError, load_config
    from ringflow.training.launch import check_launchable, rank_hosts, read_hostfile, write_hostfile

    slurm = tmp_path / "hosts"
    slurm.write_text("node-a\nnode-b\n\n# spare\nnode-c\n")  # `scontrol show hostnames > hosts`
    assert read_hostfile(slurm, 4) == [("node-a", 2), ("node-b", 2), ("node-c", 2)]
    mpi = tmp_path / "mpi-hosts"
    mpi.write_text("w-0.job.ns.svc slots=2\nw-1.job.ns.svc slots=1\n")  # an MPI Operator's /etc/mpi/hostfile
    assert read_hostfile(mpi, 3) == [("w-0.job.ns.svc", 2), ("w-1.job.ns.svc", 1)]

    cfg = with_overrides(smoke_config, {"training.horovod.hostfile": str(mpi), "training.world_size": 3})
    cmd = horovodrun_command(cfg, "/m.json", tmp_path / "out")
    assert cmd[cmd.index("--hostfile") + 1] == str(mpi) and "-H" not in cmd
    assert rank_hosts(cmd) == {0: "w-0.job.ns.svc", 1: "w-0.job.ns.svc", 2: "w-1.job.ns.svc"}
    assert launch_env(cfg, base={})["RINGFLOW_HOSTS"] == "w-0.job.ns.svc:2,w-1.job.ns.svc:1"
    # horovodrun reads only `host slots=N`: the task gives it that form of a bare node list
    written = write_hostfile(read_hostfile(slurm, 2), tmp_path / "out")
    assert written.read_text() == "node-a slots=1\nnode-b slots=1\nnode-c slots=1\n"

    with pytest.raises(ValueError, match=r"world_size=4 exceeds the 3 slots of training.horovod.hostfile=.*mpi-hosts"):
        check_launchable(with_overrides(cfg, {"training.world_size": 4, "sharding.num_shards": 4}), 4)
    bad = tmp_path / "bad"
    bad.write_text("node-a slots=2\nnode-b slots=two\n")
    with pytest.raises(ValueError, match=r"hostfile=.*bad line 2: 'node-b slots=two'"):
        read_hostfile(bad, 2)
    with pytest.raises(ValueError, match="cannot read it"):
        read_hostfile(tmp_path / "missing", 2)
    with pytest.raises(ConfigError, match="hosts and training.horovod.hostfile both set"):
        load_config(None, ["training.horovod.hosts=a:1", f"training.horovod.hostfile={mpi}"])


def test_the_launcher_skips_horovodruns_gloo_probe_only_when_told(smoke_config, tmp_path):
    from ringflow.training.launch import check_horovod, gloo_checked

    plain = horovodrun_command(smoke_config, "/m.json", tmp_path)
    assert Path(plain[0]).name == "horovodrun" and plain[1] == "-np"
    fast = horovodrun_command(smoke_config, "/m.json", tmp_path, gloo_checked=True)
    assert fast[:4] == [sys.executable, "-m", "ringflow.training.hvdrun", "--gloo-checked"]
    assert fast[4:] == plain[1:]  # the same horovodrun arguments
    check_horovod()
    assert gloo_checked() and not gloo_checked("/elsewhere/bin/python")
    knobs = with_overrides(smoke_config, {"training.horovod.cache_capacity": 0})
    assert "--cache-capacity 0" in " ".join(horovodrun_command(knobs, "/m.json", tmp_path))
    assert "--cache-capacity" not in " ".join(plain)


@pytest.mark.horovod
def test_the_probe_less_launcher_starts_real_ranks():
    ranks = (
        "import horovod.torch as hvd, torch; hvd.init(); "
        "print('rank', hvd.rank(), 'of', hvd.size(), 'sum', int(hvd.allreduce(torch.ones(1), op=hvd.Sum)))"
    )
    cmd = [sys.executable, "-m", "ringflow.training.hvdrun", "--gloo-checked", "-np", "2", "-H", "localhost:2"]
    p = subprocess.run([*cmd, "--gloo", sys.executable, "-c", ranks], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "rank 0 of 2 sum 2" in p.stdout and "rank 1 of 2 sum 2" in p.stdout


@pytest.mark.horovod
def test_train_task_runs_horovodrun_on_a_bare_hostfile(
    prefect_harness, ringflow_home, smoke_config, smoke_manifest, tmp_path
):
    from ringflow.tasks.train import train_model

    hosts = tmp_path / "hosts"
    hosts.write_text("localhost\n")  # one node, as `scontrol show hostnames` lists it: both ranks on it
    cfg = with_overrides(smoke_config, {"training.horovod.hostfile": str(hosts), "training.epochs": 1})
    result = train_model(cfg, str(smoke_manifest.path))
    out = Path(result.output_dir)
    assert (out / "hostfile").read_text() == "localhost slots=2\n"
    assert f"--hostfile {out / 'hostfile'}" in (out / "horovodrun.log").read_text()
    assert result.world_size == 2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_scikit_learns(seed):
    """The ranks' numpy metrics are scikit-learn's, ties and a one-class threshold included."""
    from sklearn import metrics as skm

    from ringflow.training.metrics import classification_metrics, max_f1_threshold, precision_recall_curve

    rng = np.random.default_rng(seed)
    y = (rng.random(5000) < 0.2).astype(int)
    p = np.clip(0.3 * y + rng.random(5000) * 0.7, 0, 1)
    p[::7] = np.round(p[::7], 1)  # ties
    p = p.astype(np.float32).astype(np.float64)
    threshold = max_f1_threshold(y, p)
    m = classification_metrics(y, p, threshold)
    pc = np.clip(p, 1e-7, 1 - 1e-7)
    pred = (pc >= threshold).astype(int)
    want = {
        "roc_auc": skm.roc_auc_score(y, pc),
        "pr_auc": skm.average_precision_score(y, pc),
        "log_loss": skm.log_loss(y, pc, labels=[0, 1]),
        "accuracy": skm.accuracy_score(y, pred),
        "f1": skm.f1_score(y, pred, zero_division=0),
        "brier": skm.brier_score_loss(y, pc),
    }
    for k, v in want.items():
        assert m[k] == pytest.approx(v, rel=1e-12, abs=1e-12), k
    assert [m[k] for k in ("tn", "fp", "fn", "tp")] == skm.confusion_matrix(y, pred, labels=[0, 1]).ravel().tolist()
    for got, ref in zip(precision_recall_curve(y, p), skm.precision_recall_curve(y, p), strict=True):
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-15)
    ps, rs, ts = skm.precision_recall_curve(y, p)
    f1 = 2 * ps[:-1] * rs[:-1] / np.maximum(ps[:-1] + rs[:-1], 1e-12)
    assert threshold == ts[int(np.argmax(f1))]
    no_positive_predicted = classification_metrics(y, p, 2.0)
    assert no_positive_predicted["f1"] == 0.0 == skm.f1_score(y, np.zeros_like(y), zero_division=0)


def test_ranks_do_not_import_scikit_learn():
    """A rank's start-up (the training program's imports) pays for torch, not for scikit-learn/SciPy."""
    code = "import sys, ringflow.training.train; print(sorted({m.split('.')[0] for m in sys.modules} & {'sklearn', 'scipy', 'mlflow', 'prefect'}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

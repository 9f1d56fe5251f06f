"""The ``train`` task: one MLflow run, one horovodrun, a typed result.

The task owns the side effects around the Horovod program (``training/train.py``): it creates
the MLflow run and its lineage (tags, manifest, config, dataset inputs), starts horovodrun in
its own session, streams every rank's output into the Prefect log, enforces
``training.timeout_s`` itself (Prefect's timeout cannot interrupt a blocking call,
PrefectHQ/prefect#15760) and kills every process of the run on timeout, error or cancellation.

A retry of the same task run reuses its MLflow run and resumes from the last checkpoint.
A diverged run is *returned* (status ``diverged``), not raised: the monitoring policy reads it
and schedules a rerun with a lower learning rate from the last good checkpoint.
"""

from __future__ import annotations

import atexit
import base64
import queue
import re
import shutil
import subprocess
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from prefect import get_run_logger, runtime, task
from prefect.cache_policies import NO_CACHE

from ringflow.tasks import artifacts, timings
from ringflow.tasks.shard import resolve_data_key
from ringflow.tasks.tracking import ensure_experiment, launcher_tag, mark_stale_runs, pandas_dataset
from ringflow.tasks.training_artifacts import (
    EpochProgress,
    LineLogger,
    log_horovod_files,
    publish_rank_table,
    timeline_env,
)
from ringflow.training import tags
from ringflow.training.checkpoint import CHECKPOINT_DIR, latest_checkpoint, resolve_checkpoint
from ringflow.training.config import PipelineConfig, get_settings
from ringflow.training.launch import (
    RankOutput,
    TrainingError,
    TrainingTimeout,
    check_launchable,
    gloo_checked,
    horovodrun_command,
    kill_tree,
    launch_env,
    rank_hosts,
    read_hostfile,
    write_hostfile,
)
from ringflow.training.manifest import KEY_ENV, Manifest, ShardIntegrityError
from ringflow.training.result import TrainResult
from ringflow.training.secrets import secrets_file
from ringflow.training.summary import SUMMARY_FILE

if TYPE_CHECKING:
    from mlflow.entities import Run
    from prefect import Task
    from prefect.client.schemas.objects import State, TaskRun

__all__ = ["TrainResult", "TrainingError", "TrainingTimeout", "train_model"]

LOG_FILE = "horovodrun.log"
LINEAGE = "MLflow: lineage (manifest, config, data)"

_running: dict[int, subprocess.Popen[str]] = {}


@atexit.register
def _kill_leftovers() -> None:
    # last resort: an interpreter exiting mid-run must not leave ranks behind
    for p in list(_running.values()):
        if p.poll() is None:
            kill_tree(p.pid, grace_s=2)


def _die_with_parent(cmd: list[str]) -> list[str]:
    """Prefix ``setpriv --pdeathsig TERM`` where available (Linux): horovodrun then gets SIGTERM
    if the launching process dies, and Horovod's middlemen stop the ranks, so even a SIGKILLed
    flow process leaves no orphans. (``preexec_fn`` would do the same but is unsafe in a
    threaded process such as a Prefect worker.)"""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--", *cmd] if setpriv else cmd


def _find_run(client: MlflowClient, experiment_id: str, task_run_id: str | None) -> Run | None:
    if not task_run_id:
        return None
    runs = client.search_runs([experiment_id], tags.tag_filter(tags.TASK_RUN_ID, task_run_id), max_results=1)
    return runs[0] if runs else None


def _log_lineage(
    client: MlflowClient,
    run_id: str,
    cfg: PipelineConfig,
    manifest: Manifest,
    key: bytes | None,
    record: timings.StageTimings,
) -> None:
    """Manifest + config as artifacts; training and validation data as ``mlflow.data`` inputs.

    Written with the client and an explicit run id, its time into ``record``: it runs in a
    thread beside horovodrun, and MLflow's active run and Prefect's run context are per thread."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    t0 = time.perf_counter()
    client.log_artifact(run_id, str(manifest.path), artifact_path=artifacts.DATA_DIR)
    client.log_dict(run_id, cfg.model_dump(mode="json"), artifacts.CONFIG_ARTIFACT)
    train = pd.concat([manifest.read(s, key) for s in manifest.shards], ignore_index=True)
    name = f"{cfg.name}-{manifest.fingerprint[:12]}"
    val = manifest.read(manifest.validation, key)
    with warnings.catch_warnings():
        # MLflow's notes on its own source registry and int columns in an inferred schema: not
        # actionable for a logged dataset, and they would repeat in every training log.
        warnings.simplefilter("ignore", UserWarning)
        inputs = [
            DatasetInput(
                pandas_dataset(
                    frame, source=str(manifest.dir), targets=manifest.target_column, name=f"{name}-{suffix}"
                )._to_mlflow_entity(),
                tags=[InputTag(key=MLFLOW_DATASET_CONTEXT, value=context)],
            )
            for frame, suffix, context in ((train, "train", "training"), (val, "validation", "validation"))
        ]
    client.log_inputs(run_id, datasets=inputs)
    record.add("train", LINEAGE, time.perf_counter() - t0, concurrent=True)


def _data_error(lineage: Future[None] | None) -> ShardIntegrityError | None:
    """The lineage's :class:`ShardIntegrityError` (a missing or corrupt shard), if it hit one:
    the task's own read of every shard, which names the file, where a rank's failure may only
    name its peer's shutdown."""
    if lineage is None:
        return None
    error = lineage.exception()
    return error if isinstance(error, ShardIntegrityError) else None


def _display(cmd: list[str]) -> str:
    """The command for logs, with the (long) config JSON elided."""
    shown = ["'<config json>'" if i > 0 and cmd[i - 1] == "--config-json" else a for i, a in enumerate(cmd)]
    return " ".join(shown)


def run_horovod(
    cmd: list[str], env: dict[str, str], timeout_s: float, log_file: Path, logger: LineLogger
) -> RankOutput:
    """Run horovodrun, stream its output line by line, enforce the timeout.

    Raises :class:`TrainingTimeout` or :class:`TrainingError` (naming the first failing rank);
    on any exception, including cancellation, every process of the run is killed first.
    """
    output = RankOutput(hosts=rank_hosts(cmd))  # a failure names the rank's host too
    log_file.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        _die_with_parent(cmd),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        bufsize=1,
        start_new_session=True,
    )
    _running[proc.pid] = proc
    lines: queue.Queue[str | None] = queue.Queue()  # None: horovodrun's output ended
    stdout = proc.stdout
    assert stdout is not None  # stdout=PIPE

    def pump() -> None:  # a reader thread, so the timeout is checked even while no rank prints
        for line in stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True, name=f"horovodrun-{proc.pid}").start()
    deadline = time.monotonic() + timeout_s
    try:
        with open(log_file, "a") as sink:
            sink.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {_display(cmd)}\n")
            while True:
                try:
                    line = lines.get(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
                except queue.Empty:
                    line = ""  # nothing within the second (a line read from the pipe is never empty)
                if line is None:
                    break
                if line:
                    sink.write(line)
                    output.feed(line)
                    logger.info(line.rstrip())
                if time.monotonic() >= deadline:
                    killed = kill_tree(proc.pid)
                    raise TrainingTimeout(
                        f"training exceeded training.timeout_s={timeout_s:g}s; killed horovodrun and all ranks "
                        f"({len(killed)} needed SIGKILL). Last lines of rank 0:\n  " + "\n  ".join(output.tail(0))
                    )
        rc = proc.wait()
    except BaseException:
        kill_tree(proc.pid)
        raise
    finally:
        # also after a clean exit: no rank or middleman may outlive its launcher
        if proc.poll() is None or _has_children(proc.pid):
            kill_tree(proc.pid)
        _running.pop(proc.pid, None)
    if rc != 0:
        raise output.failure_message(rc)
    return output


def _has_children(pid: int) -> bool:
    import psutil

    try:
        return bool(psutil.Process(pid).children())
    except psutil.NoSuchProcess:
        return False


def _run_mpijob(
    cfg: PipelineConfig,
    manifest: Manifest,
    out: Path,
    run_id: str,
    attempt: int,
    resume: bool,
    tracking_uri: str,
    home: Path,
    progress: LineLogger,
    log: LineLogger,
) -> None:
    """``training.launcher: mpijob``: the same run as an MPIJob (training/mpijob.py). Its pods
    mount RINGFLOW_HOME from the shared claim, so the summary and checkpoints land in ``out`` as
    with horovodrun; the data key and credentials come from the Secret ``training.mpijob.secret``."""
    from ringflow.training.mpijob import mpijob_name, render_mpijob, run_mpijob

    doc = render_mpijob(
        cfg,
        manifest.path.resolve(),
        out,
        home,
        mpijob_name(run_id, attempt),
        resume=resume,
        env={"MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_RUN_ID": run_id, **timeline_env(cfg, out)},
        labels={"ringflow/mlflow-run-id": run_id},
    )
    log.info(
        "attempt %d: MPIJob %s/%s, %d ranks: %s%s",
        attempt,
        doc["metadata"]["namespace"],
        doc["metadata"]["name"],
        cfg.training.world_size,
        _display(doc["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]["command"]),
        " (resuming from the last checkpoint)" if resume else "",
    )
    run_mpijob(doc, cfg.training.timeout_s, out / LOG_FILE, progress, poll_s=cfg.training.mpijob.poll_s)


def retryable(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry what a second attempt can fix (a killed rank, a lost host, I/O, the tracking server);
    not a bad config, bad or missing data, a missing key, a program bug or the run's own timeout,
    which would fail the same way again and only double the time to fail."""
    from mlflow.exceptions import MlflowException

    exc = state.result(raise_on_failure=False)
    if isinstance(exc, TrainingError):
        return exc.retryable
    if isinstance(exc, (FileNotFoundError, PermissionError)):
        return False
    return isinstance(exc, (OSError, MlflowException))


def run_name(cfg: PipelineConfig, reason: str | None) -> str:
    """``train-<config>-<reason>-<UTC time>``: reruns and schedules told apart in the MLflow list."""
    why = re.sub(r"[^a-z0-9]+", "-", (reason or "manual").split(":")[0].lower()).strip("-")[:24] or "manual"
    return f"train-{cfg.name}-{why}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


def _label_flow_run(tracking_uri: str, run_id: str) -> None:
    """Put the MLflow run's page on the flow run (label ``ringflow.mlflow_run_url``): the
    failed-run notification, rendered by the server, links to it from there."""
    from prefect import get_client

    from ringflow.tasks.links import MLFLOW_RUN_URL_LABEL, mlflow_run_url

    if not runtime.flow_run.id:
        return
    try:
        with get_client(sync_client=True) as client:
            client.update_flow_run_labels(
                runtime.flow_run.id, {MLFLOW_RUN_URL_LABEL: mlflow_run_url(tracking_uri, run_id)}
            )
    except Exception as e:  # noqa: BLE001 - a link, not a reason to fail the training
        get_run_logger().warning("could not label the flow run with its MLflow run: %s", e)


def _record_launch(out: Path, launch_s: float, launcher: str) -> None:
    """Split the launcher's wall time: the epochs (work), the rest of the training program (Horovod
    and data set-up, rank 0's MLflow logging, checkpoints, outputs) and what the program's own
    clock did not see (interpreter and import start-up of every rank, the launcher, shutdown)."""
    from ringflow.training.summary import TrainingSummary

    s = TrainingSummary.load(out)
    epochs = sum(_epoch_seconds(h) for h in s.history)
    program = min(s.wall_time_s, launch_s)
    timings.record("train", "training epochs (rank 0)", epochs, "work")
    timings.record("train", "set-up, data, validation, checkpoints (ranks)", program - epochs)
    timings.record("train", f"rank start-up + shutdown ({launcher})", launch_s - program)


def _epoch_seconds(record: object) -> float:
    """An epoch record's ``epoch_time_s``, whether a dict or a model (training/ is typing them)."""
    v = record.get("epoch_time_s") if isinstance(record, dict) else getattr(record, "epoch_time_s", None)
    return float(v) if isinstance(v, (int, float)) else 0.0


@task(name="train", retries=1, retry_delay_seconds=2, retry_condition_fn=retryable, cache_policy=NO_CACHE)
def train_model(
    cfg: PipelineConfig,
    manifest_path: str,
    parent_run_id: str | None = None,
    run_tags: dict[str, str] | None = None,
) -> TrainResult:
    """Train with ``horovodrun -np <world_size>`` on the manifest's shards; returns the typed result.

    Raises :class:`TrainingError` (which rank failed, its exit code and last lines) or
    :class:`TrainingTimeout`. Returns status ``diverged`` instead of raising on divergence.
    """
    log = get_run_logger()
    t_setup = time.perf_counter()
    settings = get_settings()
    manifest = Manifest.load(manifest_path)
    tc = cfg.training
    # On every attempt, before anything starts: a retry must name the same cause as the first try.
    check_launchable(cfg, len(manifest.shards))
    manifest.verify(checksums=False)  # every listed file present at its size (ranks check the sha256)
    if tc.resume_from:
        # fail before creating anything when the resume point does not exist
        log.info("resuming from %s", resolve_checkpoint(tc.resume_from, settings.runs_dir))
    key = resolve_data_key(cfg)  # env or Prefect Secret block

    tracking_uri = settings.tracking_uri
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    experiment_id = ensure_experiment(client, cfg.registry.experiment)
    task_run_id = str(runtime.task_run.id) if runtime.task_run.id else None
    attempt = runtime.task_run.run_count or 1
    existing = _find_run(client, experiment_id, task_run_id)
    for stale in mark_stale_runs(client, experiment_id, "training"):
        if existing is None or stale != existing.info.run_id:
            log.warning("MLflow run %s was left RUNNING by a launcher that is gone: marked KILLED", stale)

    if existing is not None:
        run = mlflow.start_run(run_id=existing.info.run_id)
        mlflow.set_tag(tags.LAUNCHER, launcher_tag())
        log.info("attempt %d: continuing MLflow run %s", attempt, run.info.run_id)
    else:
        new_tags = {
            tags.KIND: tags.KIND_TRAINING,
            tags.DATA_FINGERPRINT: manifest.fingerprint,
            tags.MANIFEST_PATH: str(manifest.path),
            tags.CONFIG_HASH: cfg.config_hash(),
            tags.WORLD_SIZE: str(tc.world_size),
            tags.CONFIG_NAME: cfg.name,
            tags.ELASTIC: str(tc.elastic.enabled).lower(),
            tags.LAUNCHER: launcher_tag(),
            **(run_tags or {}),
        }
        if task_run_id:
            new_tags[tags.TASK_RUN_ID] = task_run_id
        if runtime.flow_run.id:
            new_tags[tags.FLOW_RUN_ID] = str(runtime.flow_run.id)
        if parent_run_id:
            new_tags[tags.PARENT_RUN_ID] = parent_run_id
        run = mlflow.start_run(
            experiment_id=experiment_id, tags=new_tags, run_name=run_name(cfg, (run_tags or {}).get(tags.REASON))
        )
    run_id = run.info.run_id
    _label_flow_run(tracking_uri, run_id)
    timings.record("train", "checks + MLflow run setup", time.perf_counter() - t_setup)
    out = settings.runs_dir / run_id
    status = "FAILED"
    # the lineage is written beside horovodrun (the ranks need none of it), joined before the run ends
    lineage = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-lineage")
    lineage_done = (
        lineage.submit(_log_lineage, client, run_id, cfg, manifest, key, timings.current())
        if existing is None
        else None
    )
    try:
        resume = latest_checkpoint(out / CHECKPOINT_DIR) is not None
        mlflow.set_tags({tags.OUTPUT_DIR: str(out), tags.CHECKPOINT_DIR: str(out / CHECKPOINT_DIR)})
        t0 = time.monotonic()
        launched: float | None = None
        # the Prefect UI shows epoch k of N live, from rank 0's epoch lines
        progress = EpochProgress(log, f"epochs done of {tc.epochs} (MLflow run {run_id})")
        try:
            if tc.launcher == "mpijob":
                _run_mpijob(cfg, manifest, out, run_id, attempt, resume, tracking_uri, settings.home, progress, log)
            else:
                # a hostfile (Slurm's bare node names too) is given to horovodrun in its own format
                hostfile = (
                    write_hostfile(read_hostfile(tc.horovod.hostfile, tc.world_size), out)
                    if tc.horovod.hostfile is not None and not tc.elastic.enabled
                    else None
                )
                cmd = horovodrun_command(
                    cfg, manifest.path.resolve(), out, resume=resume, hostfile=hostfile, gloo_checked=gloo_checked()
                )
                extra: dict[str, str | None] = {
                    "MLFLOW_TRACKING_URI": tracking_uri,
                    "MLFLOW_RUN_ID": run_id,
                    "RINGFLOW_HOME": str(settings.home),
                    **timeline_env(cfg, out),
                    **({KEY_ENV: base64.b64encode(key).decode()} if key else {}),
                }
                env = launch_env(cfg, None, **extra)
                log.info(
                    "attempt %d: %s%s", attempt, _display(cmd), " (resuming from the last checkpoint)" if resume else ""
                )
                # horovodrun copies its environment into every rank's argv: the data key and any
                # credential go to the ranks in a 0600 file instead (training/secrets.py)
                with secrets_file(env, out) as env:
                    t_hvd = time.monotonic()
                    run_horovod(cmd, env, tc.timeout_s, out / LOG_FILE, progress)
                    launched = time.monotonic() - t_hvd
        except TrainingError as e:
            mlflow.set_tag(tags.ATTEMPT_ERROR.format(attempt=attempt), str(e)[:5000])
            bad_data = _data_error(lineage_done)
            if bad_data is not None:  # the lineage read every shard: a bad one is the cause to name
                raise bad_data from e
            raise
        finally:
            t_after = time.monotonic()
            if (out / LOG_FILE).is_file():
                mlflow.log_artifact(str(out / LOG_FILE), artifact_path=artifacts.TRAINING_DIR)
            log_horovod_files(out)  # timeline (training.horovod.timeline) and autotune log, when written
        if lineage_done is not None:
            with timings.timed("train", "MLflow: lineage, waited for after horovodrun"):
                lineage_done.result()
        if not (out / SUMMARY_FILE).is_file():
            raise TrainingError(f"horovodrun exited 0 but rank 0 wrote no {out / SUMMARY_FILE}")
        result = TrainResult.from_output_dir(run_id, out)
        _record_launch(out, t_after - t0 if launched is None else launched, tc.launcher)
        mlflow.log_artifact(str(out / SUMMARY_FILE), artifact_path=artifacts.TRAINING_DIR)
        progress.update(100.0)  # early stopping ends before epoch N
        publish_rank_table(result, log)
        mlflow.set_tags({tags.TRAINING_STATUS: result.status, tags.WORLD_SIZE: str(result.world_size)})
        mlflow.log_metric(tags.TRAINING_WALL_TIME, t_after - t0)
        if result.checkpoint_dir is None:
            mlflow.set_tag(tags.CHECKPOINT_DIR, "")
        timings.record("train", "MLflow: training log, summary, tags", time.monotonic() - t_after)
        if result.status == "diverged":
            log.warning(
                "training diverged (%s); returning status 'diverged' for the monitoring policy",
                result.checkpoint_dir or "no checkpoint yet",
            )
        else:
            log.info(
                "training %s: best epoch %s, val AUC %.4f",
                result.status,
                result.best_epoch,
                result.metrics.get("val_roc_auc", float("nan")),
            )
        status = "FINISHED"
        return result
    except BaseException as e:
        if not isinstance(e, Exception):
            status = "KILLED"  # cancellation / interpreter shutdown
        raise
    finally:
        lineage.shutdown(wait=True)  # never end the run under a write still in flight
        mlflow.end_run(status)

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
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from prefect import get_run_logger, runtime, task
from prefect.cache_policies import NO_CACHE

from ringflow.tasks import artifacts, timings
from ringflow.tasks.shard import resolve_data_key
from ringflow.tasks.tracking import ensure_experiment, launcher_tag, lineage_digest, mark_stale_runs, pandas_dataset
from ringflow.tasks.training_artifacts import (
    EpochProgress,
    LineLogger,
    log_horovod_files,
    publish_rank_table,
    timeline_env,
)
from ringflow.training import rank_server, tags
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
    rank_server_held,
    read_hostfile,
    write_hostfile,
)
from ringflow.training.manifest import KEY_ENV, Manifest, ShardIntegrityError
from ringflow.training.result import TrainResult
from ringflow.training.secrets import secrets_file
from ringflow.training.summary import SUMMARY_FILE

if TYPE_CHECKING:
    from concurrent.futures import Future

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


@contextmanager
def held_rank_server(cfg: PipelineConfig, log: LineLogger) -> Iterator[Path | None]:
    """The rank server's socket for one launch, held while it runs; None to start every rank afresh."""
    with rank_server_held(cfg) as held:
        server = rank_server.held() if held else None
        if server is not None and not server.listening():
            log.warning("the rank server did not start; ranks start their own interpreters:\n%s", server.log_tail())
            server = None
        yield server.socket_path if server is not None else None


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
    # (MLflow's notes on its source registry and on integer columns: QUIET_WARNINGS, process-wide)
    inputs = [
        DatasetInput(
            pandas_dataset(
                frame,
                source=str(manifest.dir),
                targets=manifest.target_column,
                name=f"{name}-{suffix}",
                digest=digest,
            )._to_mlflow_entity(),
            tags=[InputTag(key=MLFLOW_DATASET_CONTEXT, value=context)],
        )
        for frame, suffix, context, digest in (
            (train, "train", "training", lineage_digest(manifest.shards)),
            (val, "validation", "validation", lineage_digest([manifest.validation])),
        )
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
    program_args: list[str] | None = None,
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
        program_args=program_args or (),
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


def _record_launch(out: Path, launch_s: float, launcher: str, stage: str = "train") -> None:
    """Split the launcher's wall time: the epochs (work), the rest of the training program (Horovod
    and data set-up, rank 0's MLflow logging, checkpoints, outputs) and what the program's own
    clock did not see (interpreter and import start-up of every rank, the launcher, shutdown)."""
    from ringflow.training.summary import TrainingSummary

    s = TrainingSummary.load(out)
    epochs = sum(h.epoch_time_s for h in s.history)
    program = min(s.wall_time_s, launch_s)
    timings.record(stage, "training epochs (rank 0)", epochs, "work")
    timings.record(stage, "set-up, data, validation, checkpoints (ranks)", program - epochs)
    timings.record(stage, f"rank start-up + shutdown ({launcher})", launch_s - program)


def _find_step(client: MlflowClient, experiment_id: str, parent_run_id: str, step: str) -> Run | None:
    """The child run ``step`` (``select`` / ``final``) of a training run, when an earlier attempt made it."""
    runs = client.search_runs(
        [experiment_id],
        tags.tag_filter(MLFLOW_PARENT_RUN_ID, parent_run_id) + " and " + tags.tag_filter(tags.FINAL_FIT_STEP, step),
        max_results=1,
    )
    return runs[0] if runs else None


def _start_step(client: MlflowClient, experiment_id: str, parent: Run, step: str, cfg: PipelineConfig) -> Run:
    """Open the child run ``step`` of the active training run ``parent`` (a nested run: MLflow's
    ``mlflow.parentRunId``), continuing the one an earlier attempt made."""
    existing = _find_step(client, experiment_id, parent.info.run_id, step)
    if existing is not None:
        run = mlflow.start_run(run_id=existing.info.run_id, nested=True)
        mlflow.set_tag(tags.LAUNCHER, launcher_tag())
        return run
    return mlflow.start_run(
        experiment_id=experiment_id,
        nested=True,
        run_name=f"{parent.info.run_name or run_name(cfg, None)}-{step}",
        tags={
            tags.KIND: tags.KIND_TRAINING_STEP,
            tags.FINAL_FIT_STEP: step,
            tags.CONFIG_NAME: cfg.name,
            tags.LAUNCHER: launcher_tag(),
        },
    )


def _launch(
    cfg: PipelineConfig,
    manifest: Manifest,
    key: bytes | None,
    run_id: str,
    attempt: int,
    log: LineLogger,
    stage: str,
    program_args: list[str] | None = None,
    lineage_done: Future[None] | None = None,
    epochs: int | None = None,
) -> TrainResult:
    """One horovodrun (or MPIJob) logging into the active MLflow run ``run_id``: its output dir
    ``runs_dir/<run_id>`` (resumed from its own newest checkpoint on a retry), the launcher's log
    and the summary as artifacts, the status tags; timings under ``stage``. ``program_args``: more
    arguments of the training program (a final fit's, of ``epochs`` epochs)."""
    settings = get_settings()
    tc = cfg.training
    out = settings.runs_dir / run_id
    resume = latest_checkpoint(out / CHECKPOINT_DIR) is not None
    mlflow.set_tags({tags.OUTPUT_DIR: str(out), tags.CHECKPOINT_DIR: str(out / CHECKPOINT_DIR)})
    t0 = time.monotonic()
    launched: float | None = None
    # the Prefect UI shows epoch k of N live, from rank 0's epoch lines
    progress = EpochProgress(log, f"epochs done of {epochs or tc.epochs} (MLflow run {run_id})")
    try:
        if tc.launcher == "mpijob":
            _run_mpijob(
                cfg,
                manifest,
                out,
                run_id,
                attempt,
                resume,
                settings.tracking_uri,
                settings.home,
                progress,
                log,
                program_args or [],
            )
        else:
            # a hostfile (Slurm's bare node names too) is given to horovodrun in its own format
            hostfile = (
                write_hostfile(read_hostfile(tc.horovod.hostfile, tc.world_size), out)
                if tc.horovod.hostfile is not None and not tc.elastic.enabled
                else None
            )
            with held_rank_server(cfg, log) as server_socket:
                cmd = horovodrun_command(
                    cfg,
                    manifest.path.resolve(),
                    out,
                    resume=resume,
                    hostfile=hostfile,
                    gloo_checked=gloo_checked(),
                    program_args=program_args or (),
                    rank_server=server_socket,
                )
                extra: dict[str, str | None] = {
                    "MLFLOW_TRACKING_URI": settings.tracking_uri,
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
        with timings.timed(stage, "MLflow: lineage, waited for after horovodrun"):
            lineage_done.result()
    if not (out / SUMMARY_FILE).is_file():
        raise TrainingError(f"horovodrun exited 0 but rank 0 wrote no {out / SUMMARY_FILE}")
    result = TrainResult.from_output_dir(run_id, out)
    _record_launch(out, t_after - t0 if launched is None else launched, tc.launcher, stage)
    mlflow.log_artifact(str(out / SUMMARY_FILE), artifact_path=artifacts.TRAINING_DIR)
    progress.update(100.0)  # early stopping ends before epoch N
    publish_rank_table(result, log)
    mlflow.set_tags({tags.TRAINING_STATUS: result.status, tags.WORLD_SIZE: str(result.world_size)})
    mlflow.log_metric(tags.TRAINING_WALL_TIME, t_after - t0)
    if result.checkpoint_dir is None:
        mlflow.set_tag(tags.CHECKPOINT_DIR, "")
    timings.record(stage, "MLflow: training log, summary, tags", time.monotonic() - t_after)
    return result


def _copy_to_parent(client: MlflowClient, parent_id: str, result: TrainResult) -> None:
    """What monitoring and a rerun read from the training run, from its ``select`` child: the
    status, the output and checkpoint directories (a rerun after divergence resumes from there)
    and ``training/summary.json`` (training health)."""
    out = Path(result.output_dir)
    client.set_tag(parent_id, tags.TRAINING_STATUS, result.status)
    client.set_tag(parent_id, tags.WORLD_SIZE, str(result.world_size))
    client.set_tag(parent_id, tags.OUTPUT_DIR, str(out))
    client.set_tag(parent_id, tags.CHECKPOINT_DIR, result.checkpoint_dir or "")
    client.log_artifact(parent_id, str(out / SUMMARY_FILE), artifact_path=artifacts.TRAINING_DIR)


def _end_runs(statuses: list[str]) -> None:
    """End the active run and its parents (innermost first) with the given statuses."""
    for status in statuses:
        if mlflow.active_run() is not None:
            mlflow.end_run(status)


@task(name="train", retries=1, retry_delay_seconds=2, retry_condition_fn=retryable, cache_policy=NO_CACHE)
def train_model(
    cfg: PipelineConfig,
    manifest_path: str,
    parent_run_id: str | None = None,
    run_tags: dict[str, str] | None = None,
) -> TrainResult:
    """Train with ``horovodrun -np <world_size>`` on the manifest's shards; returns the typed result.

    With ``training.final_fit`` the MLflow run is the parent of a nested ``select`` run, which the
    ranks log to; the result's ``run_id`` is the parent, ``select_run_id`` the child.

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
    for kind in (tags.KIND_TRAINING, tags.KIND_TRAINING_STEP):
        for stale in mark_stale_runs(client, experiment_id, kind):
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
    statuses = ["FAILED"]
    # the lineage is written beside horovodrun (the ranks need none of it), joined before the run
    # ends; on the training run (the parent with training.final_fit)
    lineage = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-lineage")
    lineage_done = (
        lineage.submit(_log_lineage, client, run_id, cfg, manifest, key, timings.current())
        if existing is None
        else None
    )
    try:
        select_id = None
        if tc.final_fit:
            statuses = ["FAILED", "FAILED"]
            select_id = _start_step(client, experiment_id, run, tags.STEP_SELECT, cfg).info.run_id
            log.info("final fit: the epoch count is chosen in child run %s (select)", select_id)
        result = _launch(cfg, manifest, key, select_id or run_id, attempt, log, "train", lineage_done=lineage_done)
        if select_id is not None:
            _copy_to_parent(client, run_id, result)
            result = result.model_copy(update={"run_id": run_id, "select_run_id": select_id})
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
        statuses = ["FINISHED"] * len(statuses)
        return result
    except BaseException as e:
        if not isinstance(e, Exception):
            statuses = ["KILLED"] * len(statuses)  # cancellation / interpreter shutdown
        raise
    finally:
        lineage.shutdown(wait=True)  # never end the run under a write still in flight
        _end_runs(statuses)


@task(name="train-final", retries=1, retry_delay_seconds=2, retry_condition_fn=retryable, cache_policy=NO_CACHE)
def train_final(cfg: PipelineConfig, manifest_path: str, selected: TrainResult) -> TrainResult:
    """``training.final_fit``: the second horovodrun, on train + validation for the epoch count
    the first run chose (``training/final_fit.py``), as the child run ``final`` of the training
    run. Returns the candidate: ``run_id`` is the training (parent) run, ``model_path`` the final
    model, which carries the first run's decision threshold.

    A retry continues the same child run and resumes from its own newest checkpoint.
    """
    from ringflow.training.final_fit import FinalFit, final_fit_epochs
    from ringflow.training.model import read_decision_threshold

    log = get_run_logger()
    t_setup = time.perf_counter()
    settings = get_settings()
    manifest = Manifest.load(manifest_path)
    check_launchable(cfg, len(manifest.shards))
    manifest.verify(checksums=False)
    k = final_fit_epochs(selected.status, selected.best_epoch, selected.epochs_completed)
    threshold = read_decision_threshold(Path(selected.model_path).parent) if selected.model_path else None
    final = FinalFit(k, threshold)
    # the final fit starts fresh (training.resume_from was the first run's starting point)
    final_cfg = cfg.model_copy(update={"training": cfg.training.model_copy(update={"resume_from": None})})
    key = resolve_data_key(cfg)
    mlflow.set_tracking_uri(settings.tracking_uri)
    client = MlflowClient(settings.tracking_uri)
    experiment_id = ensure_experiment(client, cfg.registry.experiment)
    attempt = runtime.task_run.run_count or 1
    parent = mlflow.start_run(run_id=selected.run_id)
    statuses = ["FAILED", "FAILED"]
    try:
        mlflow.log_param(tags.FINAL_FIT_EPOCHS, k)
        child = _start_step(client, experiment_id, parent, tags.STEP_FINAL, cfg)
        final_id = child.info.run_id
        mlflow.log_params({tags.FINAL_FIT_EPOCHS: k, tags.DECISION_THRESHOLD: "" if threshold is None else threshold})
        log.info(
            "final fit: %d epochs (the best epoch of run %s) on train + validation rows in child run %s (final); "
            "decision threshold %s carried over from the first run",
            k,
            selected.select_run_id,
            final_id,
            "-" if threshold is None else f"{threshold:.4f}",
        )
        timings.record("train-final", "checks + MLflow run setup", time.perf_counter() - t_setup)
        result = _launch(final_cfg, manifest, key, final_id, attempt, log, "train-final", final.args(), epochs=k)
        if result.status == "diverged":
            client.set_tag(selected.run_id, tags.TRAINING_STATUS, "diverged")
            log.warning("the final fit diverged (%s)", result.checkpoint_dir or "no checkpoint yet")
        # the candidate: the final model, judged by the first run's validation evidence
        metrics = {**{k_: v for k_, v in selected.metrics.items() if k_.startswith("val_")}, **result.metrics}
        statuses = ["FINISHED", "FINISHED"]
        return result.model_copy(
            update={
                "run_id": selected.run_id,
                "select_run_id": selected.select_run_id,
                "final_run_id": final_id,
                "final_fit_epochs": k,
                "best_epoch": selected.best_epoch,
                "metrics": metrics,
            }
        )
    except BaseException as e:
        if not isinstance(e, Exception):
            statuses = ["KILLED", "KILLED"]
        raise
    finally:
        _end_runs(statuses)

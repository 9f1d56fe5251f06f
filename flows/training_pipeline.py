"""The training pipeline flow: shard -> train (Horovod) [-> train-final] -> evaluate -> register.

Flows only compose tasks and carry parameters. The config is a pydantic model, so the Prefect UI
renders it as a form. Task results are persisted and cached per flow run, so retrying a run whose
registration failed re-uses its shards, training and evaluation instead of training again.
With ``training.final_fit`` a second Horovod task, ``train-final``, trains on train + validation
for the epoch count the first chose (``training/final_fit.py``); its model is the candidate.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import ParamSpec, TypeVar, overload

from prefect import Task, flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import DEFAULT
from prefect.futures import PrefectFuture
from pydantic import BaseModel

from ringflow.monitoring.events import TRAINING_FLOW
from ringflow.tasks import timings
from ringflow.tasks.baseline import fit_baseline
from ringflow.tasks.evaluate import evaluate_candidate
from ringflow.tasks.links import mlflow_model_url, mlflow_run_url, mlflow_ui_hint
from ringflow.tasks.register import register_candidate
from ringflow.tasks.shard import shard_data
from ringflow.tasks.timings import StageTimings
from ringflow.tasks.train import train_final, train_model
from ringflow.training import tags
from ringflow.training.config import PipelineConfig, get_settings
from ringflow.training.launch import check_horovod, rank_server_held
from ringflow.training.metric_names import METRIC_NAMES


class PipelineStageError(RuntimeError):
    """A stage of the pipeline failed; the message names it."""

    def __init__(self, stage: str, cause: BaseException) -> None:
        super().__init__(f"stage '{stage}' failed: {type(cause).__name__}: {cause}")
        self.stage = stage


class PipelineResult(BaseModel):
    config_name: str
    reason: str
    manifest_path: str
    training_run_id: str
    training_status: str
    select_run_id: str | None = None
    """``training.final_fit``: the child run of the training run that chose the epoch count."""
    final_run_id: str | None = None
    """``training.final_fit``: the child run that trained the candidate on train + validation."""
    final_fit_epochs: int | None = None
    model_name: str | None = None
    model_version: str | None = None
    promoted: bool = False
    champion_version: str | None = None
    metrics: dict[str, float] = {}
    """The candidate's test metrics."""
    champion_metrics: dict[str, float] | None = None
    """The champion's (before this run) on the same test rows; None when there was none."""
    evaluated_champion_version: str | None = None
    baseline: str = "none"
    baseline_metrics: dict[str, float] | None = None
    """The baseline's (``gate.baseline``) on the same test rows; None when it is off."""
    test_window: str = ""
    test_rows: int = 0
    warnings: list[str] = []
    decision: str = ""
    tracking_uri: str
    timings: StageTimings = StageTimings()
    """Where the run's seconds went, stage by stage, work vs overhead (``tasks/timings.py``)."""


P = ParamSpec("P")
R = TypeVar("R")


def _stage(name: str, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
    log = get_run_logger()
    log.info("stage %s: started", name)
    record = timings.current()
    inner0, t0 = record.stage_seconds(name), time.perf_counter()
    try:
        out = fn(*args, **kwargs)
    except Exception as e:
        log.error("stage %s: FAILED: %s", name, e)
        raise PipelineStageError(name, e) from e
    finally:
        # what the task's own parts did not account for: Prefect around the task run
        record.add(name, timings.TASK_REST, time.perf_counter() - t0 - (record.stage_seconds(name) - inner0))
    log.info("stage %s: done", name)
    return out


def _persisted(stage_task: Task[P, R]) -> Task[P, R]:
    """``stage_task`` with its result persisted and cached per flow run: a retried flow run reuses
    what a stage already produced instead of doing it again."""
    return stage_task.with_options(cache_policy=DEFAULT, persist_result=True)


def _stage_result(name: str, future: PrefectFuture[R]) -> R:
    """The result of a task submitted beside the others (its failure named like a stage's)."""
    log = get_run_logger()
    try:
        out = future.result()
    except Exception as e:
        log.error("stage %s: FAILED: %s", name, e)
        raise PipelineStageError(name, e) from e
    log.info("stage %s: done (beside the training)", name)
    return out


@flow(name=TRAINING_FLOW, log_prints=True)
def training_pipeline(
    config: PipelineConfig = PipelineConfig(),  # noqa: B008  (the deployment's form shows the defaults)
    reason: str = "manual",
    parent_run_id: str | None = None,
    anomaly_id: str | None = None,
) -> PipelineResult:
    """Shard the data, train with Horovod ring-allreduce, evaluate against the champion, register.

    ``reason``, ``parent_run_id`` and ``anomaly_id`` link an adaptive rerun to its cause.
    """
    record = timings.start_flow_body()
    settings = get_settings()
    os.environ.setdefault("MLFLOW_TRACKING_URI", settings.tracking_uri)
    run_tags = {tags.REASON: reason}
    if anomaly_id:
        run_tags[tags.ANOMALY_ID] = anomaly_id

    if config.training.launcher == "horovodrun":
        check_horovod()  # before any work: the train stage cannot run without it (an MPIJob's image has its own)
    # the ranks' imports (torch, Horovod, MLflow) are done once, while the data is sharded
    with rank_server_held(config):
        manifest_path = _stage("shard", _persisted(shard_data), config)
        # the baseline needs only the shards: its trees are fitted while the ranks start and train
        baseline = _persisted(fit_baseline).submit(config, manifest_path) if config.gate.baseline != "none" else None
        trained = _stage(
            "train",
            _persisted(train_model),
            config,
            manifest_path,
            parent_run_id=parent_run_id,
            run_tags=run_tags,
        )
        if config.training.final_fit and trained.status != "diverged":
            # cached and persisted like train: a retried flow run does not train either again
            trained = _stage(
                "train-final",
                _persisted(train_final),
                config,
                manifest_path,
                trained,
            )
    result = PipelineResult(
        config_name=config.name,
        reason=reason,
        manifest_path=manifest_path,
        training_run_id=trained.run_id,
        training_status=trained.status,
        select_run_id=trained.select_run_id,
        final_run_id=trained.final_run_id,
        final_fit_epochs=trained.final_fit_epochs,
        tracking_uri=settings.tracking_uri,
    )
    if trained.status == "diverged":
        # Nothing to evaluate: the monitoring policy reads the diverged status from MLflow and
        # schedules a rerun with a lower learning rate from the last good checkpoint.
        get_run_logger().warning("training diverged: not evaluating or registering run %s", trained.run_id)
        result.decision = "training diverged"
        return _finish(config, result, record)

    scored_baseline = None
    if baseline is not None:
        with timings.timed("evaluate", "waiting for the baseline (beside the training)", "work"):
            scored_baseline = _stage_result("baseline", baseline)
    evaluation = _stage(
        "evaluate",
        _persisted(evaluate_candidate),
        config,
        trained,
        manifest_path,
        baseline=scored_baseline,
    )
    registered = _stage(
        "register", register_candidate, config, trained, evaluation, manifest_path, parent_run_id=parent_run_id
    )
    result.model_name = registered.model_name
    result.model_version = registered.version
    result.promoted = registered.promoted
    result.champion_version = registered.champion_version
    result.metrics = _reported(evaluation.candidate_metrics)
    result.champion_metrics = _reported(evaluation.champion_metrics)
    result.evaluated_champion_version = evaluation.champion_version
    result.baseline = evaluation.baseline
    result.baseline_metrics = _reported(evaluation.baseline_metrics)
    result.test_window, result.test_rows = evaluation.test_window, evaluation.test_rows
    result.warnings = list(evaluation.decision.warnings)
    result.decision = (
        evaluation.decision.summary
        if registered.promoted == evaluation.decision.promote
        else ("not promoted: the champion moved during evaluation")
    )
    return _finish(config, result, record)


def _finish(config: PipelineConfig, result: PipelineResult, record: StageTimings) -> PipelineResult:
    result.timings = record
    with timings.timed("prefect", "summary artifact"):
        _summary_artifact(config, result)
    timings.pop_current()
    record.flow_body_ended = time.time()
    return result


@overload
def _reported(metrics: dict[str, float]) -> dict[str, float]: ...
@overload
def _reported(metrics: None) -> None: ...
@overload
def _reported(metrics: dict[str, float] | None) -> dict[str, float] | None: ...
def _reported(metrics: dict[str, float] | None) -> dict[str, float] | None:
    return None if metrics is None else {k: v for k, v in metrics.items() if k in METRIC_NAMES}


def _version(v: str | None) -> str:
    return f"v{v}" if v else "none"


def _metric_columns(r: PipelineResult) -> list[tuple[str, dict[str, float]]]:
    """(label, metrics) of candidate, champion and baseline, those that were scored."""
    cols = [("candidate", r.metrics)]
    if r.champion_metrics:
        cols.append((f"champion {_version(r.evaluated_champion_version)}", r.champion_metrics))
    if r.baseline_metrics:
        cols.append((f"baseline {r.baseline}", r.baseline_metrics))
    return cols


def _summary_artifact(config: PipelineConfig, r: PipelineResult) -> None:
    cols = _metric_columns(r)
    metrics = "\n".join(
        f"| {k} | " + " | ".join(f"{m[k]:.4f}" if k in m else "-" for _, m in cols) + " |" for k in r.metrics
    )
    header = "| metric | " + " | ".join(label for label, _ in cols) + " |\n|---|" + "---|" * len(cols)
    warnings = "".join(f"\n**Warning:** {w}\n" for w in r.warnings)
    version = f"`{r.model_name}` v{r.model_version}" if r.model_version else "none"
    create_markdown_artifact(
        key="training-pipeline-summary",
        description="training pipeline result",
        markdown=(
            f"# Training pipeline `{config.name}` ({r.reason})\n\n"
            f"- training run: `{r.training_run_id}` ({r.training_status}) - {mlflow_run_url(r.tracking_uri, r.training_run_id)}\n"
            + (
                f"- final fit: {r.final_fit_epochs} epochs on train + validation, child run `{r.final_run_id}`; "
                f"epoch count and decision threshold from child run `{r.select_run_id}`\n"
                if r.final_run_id
                else ""
            )
            + f"- model version: {version}; promoted: **{r.promoted}**; champion now: {_version(r.champion_version)}\n"
            f"- model registry: {mlflow_model_url(r.tracking_uri, r.model_name) if r.model_name else 'none'}\n"
            f"- manifest: `{r.manifest_path}`\n\n"
            f"## Test metrics {r.test_window} ({r.test_rows} rows)\n{warnings}\n{header}\n{metrics}\n\n"
            f"## Decision\n\n{r.decision}\n\n"
            "## Where the time went\n\n"
            "Seconds per stage, work (sharding, training epochs, scoring, the baseline fit) vs "
            "overhead (Prefect, MLflow logging, model loading, rank start-up, plots); this artifact "
            "is written before the flow run finishes, so the flow-run finish is not in it.\n\n" + r.timings.markdown()
        ),
    )


def print_summary(r: PipelineResult) -> None:
    print()
    print(f"ringflow: training pipeline '{r.config_name}' finished ({r.reason})")
    print(f"  training run   {r.training_run_id}  status={r.training_status}")
    if r.final_run_id:
        print(
            f"  final fit      {r.final_fit_epochs} epochs on train + validation: run {r.final_run_id} "
            f"(epoch count chosen by run {r.select_run_id})"
        )
    if r.model_version:
        verdict = "PROMOTED to @champion" if r.promoted else "registered as @challenger (not promoted)"
        print(f"  model version  {r.model_name} v{r.model_version}  {verdict}")
        print(f"  champion       {r.model_name} {_version(r.champion_version)}")
        print(f"  test window    {r.test_window}  {r.test_rows} rows")
        cols = _metric_columns(r)
        width = max(len(label) for label, _ in cols)
        for i, (label, m) in enumerate(cols):
            print(
                ("  test metrics   " if i == 0 else " " * 17)
                + f"{label:<{width}}  "
                + "  ".join(f"{k}={m[k]:.4f}" for k in r.metrics if k in m)
            )
        for w in r.warnings:
            print(f"  WARNING        {w}")
        print(f"  decision       {r.decision}")
    lines = r.timings.text_lines()
    if lines:
        print("  time per stage " + lines[0])
        for line in lines[1:]:
            print(" " * 17 + line)
    print(f"  MLflow store   {r.tracking_uri}")
    print(f"  look at it     {mlflow_ui_hint(r.tracking_uri)}")

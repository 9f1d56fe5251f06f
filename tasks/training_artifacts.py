"""What the train task shows beyond its log: live progress in the Prefect UI, a per-rank
throughput table, and Horovod's timeline and autotune files in the MLflow run.

The progress follows the rank-0 epoch lines the task already streams (``[0]<stdout>:epoch k/N:``),
so the training program needs no Prefect. Publishing is best effort: an artifact that cannot be
written is a warning, never a failed training.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Protocol
from uuid import UUID

import mlflow

from ringflow.tasks.artifacts import HOROVOD_DIR
from ringflow.training.config import PipelineConfig
from ringflow.training.result import TrainResult

PROGRESS_KEY = "training-progress"
RANK_TABLE_KEY = "rank-throughput"
TIMELINE_FILE = "horovod-timeline.json"
AUTOTUNE_FILE = "autotune.csv"  # where training/launch.py points --autotune-log-file
EPOCH_LINE = re.compile(r"^\[0\]<stdout>:epoch (\d+)/(\d+)\b")
"""Rank 0's end-of-epoch line (fixed and elastic mode), as horovodrun prefixes it."""


class LineLogger(Protocol):
    """What the train task logs through: a ``logging.Logger``, Prefect's run logger, or
    :class:`EpochProgress` around one."""

    def info(self, msg: str, /, *args: object) -> None: ...

    def warning(self, msg: str, /, *args: object) -> None: ...


class EpochProgress:
    """A logger for ``run_horovod``: forwards every line, and moves a Prefect progress artifact
    to k/N at rank 0's "epoch k/N" lines."""

    def __init__(self, logger: LineLogger, description: str) -> None:
        self._log = logger
        self.artifact_id: UUID | None = None
        try:
            from prefect.artifacts import create_progress_artifact

            artifact_id = create_progress_artifact(0.0, key=PROGRESS_KEY, description=description)
            # a sync call; Prefect types it `UUID | Coroutine` (async_dispatch)
            self.artifact_id = artifact_id if isinstance(artifact_id, UUID) else None
        except Exception as e:  # noqa: BLE001 - no API / no run context: train without it
            logger.warning("no training progress artifact: %s", e)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._log, name)

    def info(self, msg: str, /, *args: object) -> None:
        self._log.info(msg, *args)
        m = EPOCH_LINE.match(msg)
        if m:
            self.update(100.0 * int(m[1]) / max(int(m[2]), 1))

    def warning(self, msg: str, /, *args: object) -> None:
        self._log.warning(msg, *args)

    def update(self, percent: float) -> None:
        if self.artifact_id is None:
            return
        try:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self.artifact_id, min(100.0, percent))
        except Exception as e:  # noqa: BLE001
            self._log.warning("training progress artifact not updated: %s", e)


def timeline_env(cfg: PipelineConfig, output_dir: Path) -> dict[str, str | None]:
    """``HOROVOD_TIMELINE`` for the ranks when ``training.horovod.timeline`` is on (else unset)."""
    on = cfg.training.horovod.timeline
    return {"HOROVOD_TIMELINE": str(output_dir / TIMELINE_FILE) if on else None}


def log_horovod_files(output_dir: Path) -> list[str]:
    """Log the timeline and the autotune log, when this run wrote them, into the active run."""
    logged: list[str] = []
    for name in (TIMELINE_FILE, AUTOTUNE_FILE):
        path = output_dir / name
        if path.is_file() and path.stat().st_size > 0:
            mlflow.log_artifact(str(path), artifact_path=HOROVOD_DIR)
            logged.append(f"{HOROVOD_DIR}/{name}")
    return logged


def rank_table(result: TrainResult) -> list[dict[str, object]]:
    """One row per rank of a TrainResult: host, speed, step time, memory."""
    return [
        {
            "rank": r.rank,
            "host": r.host or "",
            "samples/s": round(r.samples_per_s, 1),
            "step time (ms)": round(r.step_time_ms, 2),
            "peak RSS (MiB)": None if r.peak_rss_mb is None else round(r.peak_rss_mb, 1),
        }
        for r in sorted(result.per_rank, key=lambda r: r.rank)
    ]


def publish_rank_table(result: TrainResult, logger: LineLogger) -> None:
    try:
        from prefect.artifacts import create_table_artifact

        create_table_artifact(
            rank_table(result),
            key=RANK_TABLE_KEY,
            description=f"per-rank throughput of MLflow run {result.run_id} "
            f"({result.world_size} ranks, mean over epochs)",
        )
    except Exception as e:  # noqa: BLE001
        logger.warning("no per-rank throughput artifact: %s", e)

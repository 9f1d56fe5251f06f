"""``summary.json``, the record a training run leaves: one typed model, written by rank 0 and read
by the train task, monitoring and the benchmarks; with it the typed parts it is made of (the
epoch record, the divergence point). Light (pydantic and the config models), so monitoring can
read it without importing torch."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from ringflow.training.config import HorovodConfig

SUMMARY_FILE = "summary.json"

Status = Literal["completed", "early_stopped", "diverged"]


class RankThroughput(BaseModel):
    """One rank's record: in every epoch of ``history`` and, averaged over them, in ``per_rank``."""

    rank: int
    host: str | None = None
    """The host the rank ran on (horovodrun's name for it)."""
    samples_per_s: float
    """This rank's own compute speed (forward + backward), excluding the wait in the allreduce."""
    step_time_ms: float
    peak_rss_mb: float | None = None
    """The rank process's peak resident memory (MiB): its tensors plus a constant."""


def _none_is_nan(v: object) -> object:
    return math.nan if v is None else v


Measured = Annotated[float, BeforeValidator(_none_is_nan)]
"""A float that may be non-finite: NaN in memory, ``null`` in JSON (pydantic writes NaN and inf
as ``null``), NaN again when read back."""


class EpochRecord(BaseModel):
    """One finished (or diverged) epoch, identical on every rank: what ``Trainer.train_epoch``
    returns, what the checkpoint's and the elastic commit's progress keep and what
    ``summary.json``'s ``history`` lists."""

    model_config = ConfigDict(extra="forbid")

    epoch: int
    """1-based."""
    train_loss: Measured
    """Mean loss over the applied updates (NaN when none was applied)."""
    lr: float
    """The learning rate of the epoch's last update."""
    epoch_time_s: float
    samples_per_s: float
    """Global samples per second of wall time."""
    world_size: int
    per_rank: list[RankThroughput]
    diverged: bool = False
    diverged_step: int | None = None
    """The first step of the update not applied (diverged epochs only)."""
    val_roc_auc: Measured = math.nan
    """Validation metrics (none for a diverged epoch; only AUC and log loss, NaN, when the
    predictions were not finite)."""
    val_log_loss: Measured = math.nan
    val_pr_auc: float | None = None
    val_accuracy: float | None = None
    val_f1: float | None = None
    val_brier: float | None = None
    val_decision_threshold: float | None = None
    """The max-F1 threshold of this epoch's weights (saved with the best epoch's model)."""

    def val_metrics(self) -> dict[str, float]:
        """The ``val_*`` metrics that were measured (NaN where not finite)."""
        return {k: v for k, v in self.model_dump().items() if k.startswith("val_") and v is not None}


class DivergedAt(BaseModel):
    """Where a training stopped on a non-finite loss."""

    model_config = ConfigDict(extra="forbid")

    epoch: int
    """The epoch (1-based)."""
    step: int
    """The first step of the update not applied."""


class TrainingSummary(BaseModel):
    """``summary.json``: written once by rank 0 at the end of a training run, read by the train
    task (:class:`TrainResult`), monitoring (training health, from the MLflow artifact) and the
    benchmarks. The one declaration of that file."""

    model_config = ConfigDict(extra="forbid")

    status: Status
    epochs: int
    """Epochs finished."""
    epochs_planned: int
    best_epoch: int | None = None
    best_val_roc_auc: float | None = None
    metrics: dict[str, float | None] = {}
    """Validation metrics of the best epoch (``val_*``), the last ``train_loss``, mean ``samples_per_s``."""
    per_rank: list[RankThroughput] = []
    hosts: list[str] = []
    """Distinct hosts the ranks ran on."""
    world_size: int
    model_written: bool
    checkpoint_dir: str | None = None
    last_good_checkpoint: str | None = None
    diverged_at: DivergedAt | None = None
    """Where the first non-finite loss stopped training."""
    resumed_from: str | None = None
    horovod: HorovodConfig = Field(default_factory=HorovodConfig)
    """The run's ``training.horovod`` settings."""
    elastic: bool = False
    seed: int
    wall_time_s: float
    history: list[EpochRecord] = []
    """Every epoch's record (loss, lr, time, throughput, ``per_rank``, ``val_*``)."""

    def write(self, output_dir: str | Path) -> Path:
        from ringflow.training.manifest import atomic_write_bytes

        path = Path(output_dir) / SUMMARY_FILE
        atomic_write_bytes(path, self.model_dump_json(indent=1).encode())
        return path

    @classmethod
    def load(cls, output_dir: str | Path) -> TrainingSummary:
        return cls.model_validate_json((Path(output_dir) / SUMMARY_FILE).read_text())

    @property
    def total_samples_per_s(self) -> float:
        return float(sum(r.samples_per_s for r in self.per_rank))

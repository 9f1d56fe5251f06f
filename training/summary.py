"""``summary.json``, the record a training run leaves: one typed model, written by rank 0 and read
by the train task, monitoring and the benchmarks. Light (pydantic only), so monitoring can read it
without importing torch."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

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
    diverged_at: dict | None = None
    """``{"epoch", "step"}`` of the first non-finite loss."""
    resumed_from: str | None = None
    horovod: dict = {}
    elastic: bool = False
    seed: int
    wall_time_s: float
    history: list[dict] = []
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

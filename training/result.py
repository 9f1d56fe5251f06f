"""What a training run hands to the rest of the pipeline (read from its summary.json)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from ringflow.training.checkpoint import CHECKPOINT_DIR
from ringflow.training.model import MODEL_FILE, PREPROCESSOR_FILE
from ringflow.training.summary import SUMMARY_FILE, RankThroughput, Status, TrainingSummary  # noqa: F401


class TrainResult(BaseModel):
    """The outcome of one training run.

    ``status`` is ``completed``, ``early_stopped`` (validation AUC stopped improving; the best
    epoch's model is the output) or ``diverged`` (a non-finite loss stopped training; the task
    returns instead of raising so the monitoring policy can schedule a rerun with a lower
    learning rate from ``checkpoint_dir``; ``model_path`` is the best earlier epoch or None).
    """

    run_id: str
    """The one MLflow run of this training (created by the task, logged to by rank 0)."""
    status: Status
    output_dir: str
    model_path: str | None
    """``<output_dir>/model.pt``; load with ``training.model.load_model(output_dir)``."""
    preprocessor_path: str | None
    checkpoint_dir: str | None
    """Holds ``epoch-NNNN.pt``; None when no epoch finished."""
    epochs_completed: int
    best_epoch: int | None
    metrics: dict[str, float]
    """Validation metrics of the best epoch (``val_roc_auc``, ``val_log_loss``, ...), the last
    ``train_loss`` and the mean global ``samples_per_s``."""
    per_rank: list[RankThroughput]
    world_size: int
    hosts: list[str] = []
    """Distinct hosts the ranks ran on."""
    resumed_from: str | None = None
    """Checkpoint the final attempt started from (retry, --resume or training.resume_from)."""
    select_run_id: str | None = None
    """``training.final_fit``: the child run of the first training (train window, early stopping
    on validation), which chose the epoch count; ``run_id`` is then the parent run."""
    final_run_id: str | None = None
    """``training.final_fit``: the child run of the final fit (train + validation), whose model
    this result's ``model_path`` is; None before the final fit ran."""
    final_fit_epochs: int | None = None
    """The final fit's epoch count (the first run's best epoch)."""

    @classmethod
    def from_output_dir(cls, run_id: str, output_dir: str | Path) -> TrainResult:
        out = Path(output_dir)
        s = TrainingSummary.load(out)
        model = out / MODEL_FILE
        have_model = s.model_written and model.is_file()
        return cls(
            run_id=run_id,
            status=s.status,
            output_dir=str(out),
            model_path=str(model) if have_model else None,
            preprocessor_path=str(out / PREPROCESSOR_FILE) if have_model else None,
            checkpoint_dir=s.checkpoint_dir or (str(out / CHECKPOINT_DIR) if s.last_good_checkpoint else None),
            epochs_completed=s.epochs,
            best_epoch=s.best_epoch,
            metrics={k: float(v) for k, v in s.metrics.items() if v is not None},
            per_rank=s.per_rank,
            world_size=s.world_size,
            hosts=s.hosts,
            resumed_from=s.resumed_from,
        )

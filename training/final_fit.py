"""The final fit (``training.final_fit``): what the second Horovod run takes from the first.

The first run trains on the train window with early stopping on the validation window; its best
epoch k is the epoch count of the second run, which trains on train + validation for exactly k
epochs (no validation set, no early stopping) with the same seed and settings. The learning-rate
schedule is the first run's (warm-up, then the cosine over ``training.epochs`` planned epochs)
stopped at epoch k: ``training.train.learning_rate`` is a function of the epoch fraction, so with
more rows per epoch the final run still sees at the end of epoch k the learning rate the first
run had at the end of its best epoch, and follows the trajectory that was validated. (Squeezing
the whole cosine into k epochs would decay to the floor at epoch k, a schedule nobody validated.)

The final model has seen the validation rows, so it cannot choose its decision threshold there:
it keeps the first run's, chosen on validation with the best epoch's weights.

Plain Python (no torch, no Prefect): the train task and the training program both use it.
"""

from __future__ import annotations

from dataclasses import dataclass

FINAL_EPOCHS_ARG = "--final-fit-epochs"
THRESHOLD_ARG = "--decision-threshold"


class FinalFitError(ValueError):
    """The first run left nothing a final fit can take its epoch count from."""


@dataclass(frozen=True)
class FinalFit:
    """The second run's settings, taken from the first run."""

    epochs: int
    """k: the first run's best epoch (1-based), trained without early stopping."""
    decision_threshold: float | None
    """The first run's threshold (validation, best epoch), saved with the final model."""

    def args(self) -> list[str]:
        """The training program's arguments for this final fit."""
        out = [FINAL_EPOCHS_ARG, str(self.epochs)]
        if self.decision_threshold is not None:
            out += [THRESHOLD_ARG, repr(float(self.decision_threshold))]
        return out


def final_fit_epochs(status: str, best_epoch: int | None, epochs_completed: int) -> int:
    """The epoch count of the final fit: the first run's best epoch (by validation ROC AUC).

    A first run without a best epoch (every validation AUC non-finite) but with finished epochs
    gives its epoch count; a diverged run gives none (the pipeline stops before the final fit)."""
    if status == "diverged":
        raise FinalFitError("the first run diverged: no epoch count for a final fit")
    k = best_epoch or epochs_completed
    if k < 1:
        raise FinalFitError(f"the first run finished no epoch (status {status}): no epoch count for a final fit")
    return int(k)


def validation_rows_for_rank(rows: int, rank: int, size: int) -> slice:
    """The validation rows rank ``rank`` of ``size`` adds to its shard rows in the final fit: a
    strided slice (rank, rank + size, ...), the split the first run scores validation with. Every
    row goes to exactly one rank and the ranks' counts differ by at most one; the trainer then
    agrees on equal steps per epoch as it does for uneven shards (batch size in proportion to
    each rank's rows)."""
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} is not in [0, {size})")
    return slice(rank, rows, size)

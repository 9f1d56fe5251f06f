"""The final fit's pure parts (``training/final_fit.py``): the epoch count, the ranks' share of the
validation rows, the learning-rate schedule stopped at epoch k and the program's arguments. The
final fit through the real pipeline is in tests/test_pipeline_final_fit.py."""

import math

import pytest

from ringflow.training.config import TrainingConfig
from ringflow.training.final_fit import (
    FinalFit,
    FinalFitError,
    final_fit_epochs,
    validation_rows_for_rank,
)
from ringflow.training.launch import horovodrun_command
from ringflow.training.train import learning_rate, parse_args


@pytest.mark.parametrize(
    ("status", "best", "done", "k"),
    [("early_stopped", 3, 6, 3), ("completed", 8, 8, 8), ("completed", None, 2, 2), ("early_stopped", 1, 4, 1)],
)
def test_the_epoch_count_is_the_first_runs_best_epoch(status, best, done, k):
    assert final_fit_epochs(status, best, done) == k


@pytest.mark.parametrize(("status", "best", "done"), [("diverged", 2, 3), ("completed", None, 0)])
def test_no_epoch_count_from_a_diverged_or_empty_run(status, best, done):
    with pytest.raises(FinalFitError, match="final fit"):
        final_fit_epochs(status, best, done)


@pytest.mark.parametrize(("rows", "size"), [(0, 2), (1, 2), (7, 2), (10, 3), (11, 4), (5, 8)])
def test_every_validation_row_goes_to_exactly_one_rank(rows, size):
    taken = [list(range(rows))[validation_rows_for_rank(rows, r, size)] for r in range(size)]
    assert sorted(i for part in taken for i in part) == list(range(rows))
    counts = [len(part) for part in taken]
    assert counts == [max(0, math.ceil((rows - r) / size)) for r in range(size)]
    assert max(counts) - min(counts) <= 1


def test_a_rank_outside_the_world_is_refused():
    with pytest.raises(ValueError, match="rank 2"):
        validation_rows_for_rank(10, 2, 2)


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_the_final_fit_follows_the_first_runs_schedule_to_epoch_k(schedule, k):
    """More rows per epoch (train + validation), the same learning rate at the end of each of the
    first k epochs: the schedule is a function of the epoch fraction of ``training.epochs``."""
    tc = TrainingConfig(epochs=8, warmup_epochs=1.0, lr_schedule=schedule, learning_rate=0.002)
    first_steps, final_steps = 34, 40  # the smoke slice: 34 steps/epoch, 40 with the validation rows
    for epoch in range(1, k + 1):
        first = learning_rate(tc, 2, epoch * first_steps - 1, first_steps)
        final = learning_rate(tc, 2, epoch * final_steps - 1, final_steps)
        assert math.isclose(first, final, rel_tol=0.05), (epoch, first, final)
    # and it is not squeezed into k epochs: at epoch k < epochs the cosine has not reached its floor
    if schedule == "cosine" and k < tc.epochs:
        floor = 0.002 * 2 * tc.min_lr_fraction
        assert learning_rate(tc, 2, k * final_steps - 1, final_steps) > 2 * floor


def test_the_program_reads_the_final_fits_arguments(smoke_config, tmp_path):
    final = FinalFit(epochs=3, decision_threshold=0.2212396142977945)
    cmd = horovodrun_command(smoke_config, tmp_path / "manifest.json", tmp_path / "out", program_args=final.args())
    args = parse_args(cmd[cmd.index("ringflow.training.train") + 1 :])
    assert (args.final_fit_epochs, args.decision_threshold) == (3, 0.2212396142977945)
    plain = parse_args(["--manifest", "m", "--config-json", "{}", "--output-dir", "o"])
    assert plain.final_fit_epochs is None and plain.decision_threshold is None
    assert FinalFit(2, None).args() == ["--final-fit-epochs", "2"]

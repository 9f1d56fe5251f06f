"""The ``baseline`` task: tune, fit and score the reference model beside the training.

The baseline (``training/baseline.py``) needs only the manifest's train shards, its validation
file and its test file, none of the network's outputs, so the flow submits this task before the
train task and the two run side by side: the trees are fitted while the ranks start and train,
and the evaluation only logs and compares what this task returns. Logging stays in the
evaluation, which owns the training run's MLflow writes after training (the baseline is a model
of that run, never registered).
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from prefect import get_run_logger, task
from sklearn.pipeline import Pipeline

from ringflow.tasks.timings import Laps
from ringflow.training.baseline import (
    BASELINE_MAX_ROWS,
    TunedBaseline,
    baseline_proba,
    refit_baseline,
    tune_baseline,
)
from ringflow.training.config import PipelineConfig
from ringflow.training.manifest import Manifest
from ringflow.training.metrics import max_f1_threshold

STAGE = "baseline"


@dataclass
class ScoredBaseline:
    """A tuned baseline and what the evaluation needs of it: its threshold (chosen on the
    validation window) and its probabilities on the test rows."""

    tuned: TunedBaseline
    threshold: float
    test_proba: np.ndarray
    test_rows: int
    final_model: Pipeline | None = None
    """``training.final_fit``: the chosen settings and rounds refitted on train + validation, the
    model scored on the test rows (``tuned.model`` otherwise); the threshold stays the tuned
    model's, chosen on validation, as the network's does."""

    @property
    def model(self) -> Pipeline:
        """The model whose test probabilities these are."""
        return self.final_model if self.final_model is not None else self.tuned.model


def _sample(frame: pd.DataFrame, share: float, seed: int) -> pd.DataFrame:
    return frame if share >= 1.0 else frame.sample(n=max(1, round(len(frame) * share)), random_state=seed)


def score_baseline(
    cfg: PipelineConfig,
    manifest: Manifest,
    key: bytes | None,
    log: logging.Logger | logging.LoggerAdapter[Any],
    test: pd.DataFrame | None = None,
) -> ScoredBaseline:
    """Tune the baseline on the manifest's train shards (the candidate's train window) with early
    stopping on the validation file, choose its threshold on the validation file, score the test
    rows (read from the manifest unless given). With ``training.final_fit`` the chosen settings are
    refitted on train + validation first (the network's final fit, the same for both), and that
    model scores the test rows with the tuned model's threshold."""
    num, cat = manifest.numeric_features, manifest.categorical_features
    total = sum(s.rows for s in manifest.shards)
    share = min(1.0, BASELINE_MAX_ROWS / max(total, 1))  # big windows: a uniform sample, one shard at a time
    train = pd.concat([_sample(manifest.read(s, key), share, seed=s.index) for s in manifest.shards], ignore_index=True)
    val = manifest.read(manifest.validation, key)
    tuned = tune_baseline(cfg.gate.baseline, train, val, manifest.target_column, num, cat, seed=cfg.training.seed)
    log.info(
        "baseline %s tuned on %d train rows in %.1fs (%d settings, early stopping on %d validation rows): %s, "
        "validation AUC %.4f",
        cfg.gate.baseline,
        len(train),
        tuned.seconds,
        len(tuned.grid),
        len(val),
        tuned.params,
        tuned.val_roc_auc,
    )
    threshold = max_f1_threshold(val[manifest.target_column].to_numpy(), tuned.val_proba)
    final = None
    if cfg.training.final_fit:
        rows = pd.concat([train, val], ignore_index=True)
        final = refit_baseline(
            cfg.gate.baseline, tuned.params, rows, manifest.target_column, num, cat, seed=cfg.training.seed
        )
        log.info(
            "baseline %s: final fit of the chosen settings on %d train + validation rows", cfg.gate.baseline, len(rows)
        )
    if test is None:
        test = manifest.read(manifest.test, key)
    model = final if final is not None else tuned.model
    return ScoredBaseline(tuned, threshold, baseline_proba(model, test, num, cat), len(test), final_model=final)


def _warm_model_logging() -> None:
    """Do beside the training what logging the baseline and the candidate model and drawing the
    curves would otherwise do first, after it: import MLflow's sklearn and pyfunc flavors, skops
    and matplotlib, and let MLflow map the installed packages to their modules (its requirement
    check scans every installed distribution once per process: about 1 s here)."""
    for module in ("matplotlib.pyplot", "mlflow.pyfunc", "mlflow.sklearn", "skops.io"):
        importlib.import_module(module)
    from mlflow.utils.requirements_utils import warn_dependency_requirement_mismatches

    warn_dependency_requirement_mismatches([f"numpy=={np.__version__}"])  # satisfied: no warning


@task(name="baseline", retries=1, retry_delay_seconds=2)
def fit_baseline(cfg: PipelineConfig, manifest_path: str) -> ScoredBaseline:
    """Tune ``gate.baseline`` on the train window, choose its threshold on the validation window,
    score the test window; submitted beside the train task."""
    from ringflow.tasks.shard import resolve_data_key

    lap = Laps(STAGE, concurrent=True)
    manifest = Manifest.load(manifest_path)
    scored = score_baseline(cfg, manifest, resolve_data_key(cfg), get_run_logger())
    lap("tune, fit and score", "work")
    _warm_model_logging()
    lap("imports for model logging")
    return scored

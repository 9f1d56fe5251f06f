"""The baseline of one pipeline run: tune it on a manifest's windows and score its test rows.

    python -m ringflow.training.baseline_job --config-json @CONFIG.json --manifest MANIFEST --output OUT

:func:`score_baseline` does it in the caller's process. As a program it is what the baseline task
runs in a process of its own, forked by the rank server (``training/rank_server.py``) from the
imports the server has already done: the trees are then fitted in a process that does not share
an interpreter lock with the command, while the command imports what logging the models needs
(``tasks/baseline.py``). The program reads the data key from ``RINGFLOW_DATA_KEY`` (never from
its arguments) and writes the :class:`ScoredBaseline`, pickled, to ``--output``, atomically. Exit
status 0 when written; otherwise the error is on standard error.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.pipeline import Pipeline

from ringflow.training.baseline import (
    BASELINE_MAX_ROWS,
    TunedBaseline,
    baseline_proba,
    refit_baseline,
    tune_baseline,
)
from ringflow.training.config import PipelineConfig, read_config
from ringflow.training.manifest import Manifest, key_from_env
from ringflow.training.metrics import max_f1_threshold


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


def write_scored(scored: ScoredBaseline, path: Path) -> None:
    """Pickle ``scored`` to ``path`` atomically (a reader never sees half a file)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump(scored, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_scored(path: Path) -> ScoredBaseline:
    """What :func:`write_scored` wrote (a file of this user's, in a directory only it can read)."""
    with open(path, "rb") as f:
        scored = pickle.load(f)  # noqa: S301 - written by this user's own job, see above
    if not isinstance(scored, ScoredBaseline):
        raise TypeError(f"{path}: not a scored baseline ({type(scored).__name__})")
    return scored


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ringflow.training.baseline_job", description=__doc__.split("\n")[0])
    p.add_argument("--config-json", required=True, help="the pipeline config as JSON, or @path to a JSON file")
    p.add_argument("--manifest", required=True, help="the sharding manifest (manifest.json)")
    p.add_argument("--output", required=True, help="where to write the scored baseline (a pickle)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    cfg = read_config(args.config_json)
    manifest = Manifest.load(args.manifest)
    scored = score_baseline(cfg, manifest, key_from_env(), logging.getLogger("ringflow.baseline"))
    write_scored(scored, Path(args.output))
    return 0


if __name__ == "__main__":
    # Run from the importable module, not this __main__ copy: the pickled result names its class
    # by module, and a reader has no ``__main__.ScoredBaseline``.
    from ringflow.training import baseline_job

    sys.exit(baseline_job.main())

"""Scoring a batch with the champion (and its baseline) chunk by chunk, keeping per row only what
the exact metrics need.

Memory per row: the champion's and the baseline's probabilities (float64, exactly as the models
return them) and the label (int8): 17 bytes, about 170 MB for ten million rows. Everything else
is counted as the chunks go by (missing values, categories the model never saw) or kept in a
bounded, seeded sample (:class:`~monitoring.sampling.RowSample`) that Evidently reads. The metrics
that decide anything (AUC, PSI, missing and unseen shares, row counts) are therefore exact on
every row; only the Evidently reports see the sample.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ringflow.monitoring.errors import MonitoringError
from ringflow.monitoring.reports import PREDICTION
from ringflow.monitoring.sampling import RowSample
from ringflow.training.pyfunc import predict_rows

if TYPE_CHECKING:
    from mlflow.pyfunc import PyFuncModel

SCORE_CHUNK = 200_000
"""Rows given to the model at once."""
BASELINE_PREDICTION = "baseline_prediction"
"""The baseline's probabilities (scored next to the champion; not given to Evidently)."""


def score(model: PyFuncModel, frame: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """Champion probabilities of ``frame[columns]``, in chunks of :data:`SCORE_CHUNK` rows."""
    out = [predict_rows(model, frame.iloc[i : i + SCORE_CHUNK][columns]) for i in range(0, len(frame), SCORE_CHUNK)]
    p = np.concatenate(out) if out else np.empty(0)
    if len(p) != len(frame):
        raise MonitoringError(f"the champion returned {len(p)} predictions for {len(frame)} rows")
    return p


@dataclass
class BatchScores:
    """Every row's scores and label, counts per column, and the sample Evidently reads."""

    rows: int
    prediction: np.ndarray
    """The champion's probability of every row (float64)."""
    target: np.ndarray | None = None
    """Every row's label (int8); None for an unlabelled batch."""
    baseline_prediction: np.ndarray | None = None
    missing: dict[str, int] = field(default_factory=dict)
    """Feature column -> rows where it is missing."""
    present: dict[str, int] = field(default_factory=dict)
    """Categorical column -> rows where it has a value."""
    unseen: dict[str, int] = field(default_factory=dict)
    """Categorical column -> values outside the champion's training vocabulary."""
    sample: pd.DataFrame = field(default_factory=pd.DataFrame)
    """At most ``sample_rows`` rows (all of them when the batch is smaller) with :data:`PREDICTION`."""

    def missing_share(self) -> dict[str, float]:
        return {c: n / self.rows for c, n in self.missing.items()}

    def unseen_share(self) -> dict[str, float]:
        """Share of non-missing values per categorical column that the vocabulary has not seen."""
        return {c: (self.unseen[c] / n if n else 0.0) for c, n in self.present.items()}


def score_chunks(
    chunks: Iterable[pd.DataFrame],
    rows: int,
    champion: Callable[[pd.DataFrame], np.ndarray],
    *,
    features: Sequence[str],
    vocabulary: Mapping[str, Sequence[str]],
    target: str | None = None,
    baseline: Callable[[pd.DataFrame], np.ndarray] | None = None,
    sample_rows: int | None = None,
    seed: int = 0,
) -> BatchScores:
    """One pass over the batch's validated chunks (``rows`` in all, as counted before).

    ``champion`` / ``baseline`` map a chunk to its probabilities; ``target``: the label column
    of a labelled batch; ``vocabulary``: categorical column -> the categories the model was
    trained on; ``sample_rows``: the size of the sample kept for Evidently (None: every row).
    """
    prediction = np.empty(rows, dtype=np.float64)
    labels = np.empty(rows, dtype=np.int8) if target else None
    base = np.empty(rows, dtype=np.float64) if baseline is not None else None
    missing = dict.fromkeys(features, 0)
    present = dict.fromkeys(vocabulary, 0)
    unseen = dict.fromkeys(vocabulary, 0)
    known = {c: set(v) for c, v in vocabulary.items()}
    sample = RowSample(sample_rows, seed)
    at = 0
    for chunk in chunks:
        n = len(chunk)
        if at + n > rows:
            raise MonitoringError(
                f"the batch has more rows than the {rows} counted before scoring: did its files "
                "change while it was monitored?"
            )
        p = champion(chunk)
        if len(p) != n:
            raise MonitoringError(f"the champion returned {len(p)} predictions for {n} rows")
        prediction[at : at + n] = p
        if labels is not None:
            labels[at : at + n] = chunk[target].to_numpy()
        if base is not None and baseline is not None:
            base[at : at + n] = baseline(chunk)
        for c in features:
            missing[c] += int(chunk[c].isna().sum())
        for c in known:
            values = chunk[c].dropna().astype(str)
            present[c] += len(values)
            unseen[c] += int((~values.isin(known[c])).sum())
        sample.add(chunk.assign(**{PREDICTION: p}))
        at += n
    if at != rows:
        raise MonitoringError(
            f"the batch has {at} rows, not the {rows} counted before scoring: did its files "
            "change while it was monitored?"
        )
    return BatchScores(
        rows=rows,
        prediction=prediction,
        target=labels,
        baseline_prediction=base,
        missing=missing,
        present=present,
        unseen=unseen,
        sample=sample.frame(),
    )

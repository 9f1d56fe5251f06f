"""Scoring a batch with the champion, in chunks (pyfunc builds float tensors for its whole input)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from monitoring.errors import MonitoringError
from training.pyfunc import predict_rows

SCORE_CHUNK = 200_000
"""Rows given to the model at once."""
BASELINE_PREDICTION = "baseline_prediction"
"""Batch column with the baseline's probabilities (not given to Evidently)."""


def score(model, frame: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """Champion probabilities of ``frame[columns]``, in chunks of :data:`SCORE_CHUNK` rows."""
    out = [predict_rows(model, frame.iloc[i:i + SCORE_CHUNK][columns])
           for i in range(0, len(frame), SCORE_CHUNK)]
    p = np.concatenate(out) if out else np.empty(0)
    if len(p) != len(frame):
        raise MonitoringError(f"the champion returned {len(p)} predictions for {len(frame)} rows")
    return p


def model_columns(model, available, feature_columns: list[str]) -> list[str]:
    """The columns the champion declares that the rows have: the feature columns, and the
    timestamp when it derives calendar features from it."""
    declared = model.metadata.get_input_schema().input_names()
    return [c for c in declared if c in available] or feature_columns

"""The reference model every evaluation scores next to the network.

A distributed training pipeline that registers a network which a three-second, single-process
gradient-boosted trees model beats has let its user down; the gate says so only if the baseline
is scored on the same rows. The baseline is scikit-learn's ``HistGradientBoostingClassifier``
(native categorical support, 300 iterations, everything else default), fitted on the manifest's
train shards (the network's train window), with the data contract's feature columns, and scored
on the same test rows. Plain scikit-learn objects only: the fitted pipeline pickles and loads
with ``mlflow.sklearn`` anywhere scikit-learn is installed.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OrdinalEncoder

BASELINE_ITERATIONS = 300
BASELINE_MAX_ROWS = 1_000_000
"""Train rows the baseline is fitted on at most: a larger window gives it a uniform sample (the
trees bin every feature into 255 values; more rows cost time and memory, not accuracy). The
default window (105k rows) is fitted whole."""
BASELINE_NAMES = {"hgb": "HistGradientBoostingClassifier (scikit-learn, 300 iterations)"}


def baseline_frame(df: pd.DataFrame, numeric: list[str], categorical: list[str]) -> pd.DataFrame:
    """The feature columns as scikit-learn reads them: categoricals as plain objects with NaN for
    missing (pandas' ``pd.NA`` is ambiguous to the encoder), numerics as float64."""
    missing = [c for c in [*numeric, *categorical] if c not in df.columns]
    if missing:
        raise ValueError(f"baseline: the rows lack feature column(s) {missing}")
    out = pd.DataFrame(index=df.index)
    for c in categorical:
        col = df[c].astype("string")
        out[c] = col.astype(object).where(col.notna(), np.nan)
    for c in numeric:
        out[c] = pd.to_numeric(df[c], errors="coerce").astype("float64")
    return out


def make_baseline(kind: str, numeric: list[str], categorical: list[str], seed: int = 0) -> Pipeline:
    """An unfitted baseline pipeline: ordinal codes for the categoricals (unseen and missing ->
    NaN, which the trees treat as missing) -> gradient-boosted trees with native categorical splits."""
    if kind != "hgb":
        raise ValueError(f"unknown baseline {kind!r}: choose one of {sorted(BASELINE_NAMES)} or 'none'")
    encode = ColumnTransformer(
        [
            (
                "categorical",
                OrdinalEncoder(handle_unknown="use_encoded_value", unknown_value=np.nan, encoded_missing_value=np.nan),
                list(categorical),
            ),
            ("numeric", "passthrough", list(numeric)),
        ],
        verbose_feature_names_out=False,
    )
    trees = HistGradientBoostingClassifier(
        max_iter=BASELINE_ITERATIONS,
        # the encoder puts the categoricals first
        categorical_features=[True] * len(categorical) + [False] * len(numeric),
        random_state=seed,  # the early-stopping split: the same baseline on every rerun
    )
    return Pipeline([("encode", encode), ("trees", trees)])


def fit_baseline(
    kind: str, train: pd.DataFrame, target: str, numeric: list[str], categorical: list[str], seed: int = 0
) -> Pipeline:
    if train.empty:
        raise ValueError("baseline: the train window has no rows")
    model = make_baseline(kind, numeric, categorical, seed)
    model.fit(baseline_frame(train, numeric, categorical), train[target].to_numpy().astype(int))
    return model


def baseline_proba(model: Pipeline, df: pd.DataFrame, numeric: list[str], categorical: list[str]) -> np.ndarray:
    """Delay probabilities (float64, shape [n])."""
    return np.asarray(model.predict_proba(baseline_frame(df, numeric, categorical))[:, 1], dtype=np.float64)

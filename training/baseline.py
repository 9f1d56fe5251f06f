"""The reference model every evaluation scores next to the network: a tuned tree model.

A distributed training pipeline that registers a network which a few seconds of single-process
gradient-boosted trees beat has let its user down; the gate says so only if the baseline is scored
on the same rows, and only if the baseline is a fair opponent, which a model at its library's
defaults is not. So the baseline is *tuned* on the validation window, the same window the network's
early stopping reads: a small seeded grid, each point trained on the train window with early
stopping on the validation window (at most :data:`MAX_ITERATIONS` boosting rounds, stopped after
:data:`EARLY_STOPPING_ROUNDS` without a better validation log loss), and the point with the best
validation ROC AUC is the baseline. Its settings (grid point and boosting rounds) are returned with
it so the evaluation logs them beside its metrics. Two kinds (``gate.baseline``):

- ``hgb``: scikit-learn's ``HistGradientBoostingClassifier`` (native categorical splits); grid
  :data:`HGB_GRID`.
- ``lightgbm``: LightGBM's ``LGBMClassifier`` (native categorical splits; the optional dependency
  ``ringflow[lightgbm]``, in the lock); grid :data:`LIGHTGBM_GRID`.

:func:`refit_baseline` is the final fit: the chosen settings and round count, trained again on
train + validation (no early stopping). Plain scikit-learn pipelines only (ordinal codes -> trees):
the fitted model pickles and loads with ``mlflow.sklearn`` wherever its library is installed.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OrdinalEncoder
from threadpoolctl import threadpool_limits

from ringflow.training.environment import usable_cores

BASELINE_MAX_ROWS = 1_000_000
"""Train rows the baseline is fitted on at most: a larger window gives it a uniform sample (the
trees bin every feature into 255 values; more rows cost time and memory, not accuracy). The
default window (105k rows) is fitted whole."""
MAX_ITERATIONS = 1000
"""Boosting rounds at most; early stopping on the validation window ends far sooner."""
EARLY_STOPPING_ROUNDS = 30
"""Rounds without a better validation log loss before a grid point stops."""
HGB_GRID: list[dict[str, Any]] = [
    {"learning_rate": lr, "max_leaf_nodes": leaves, "min_samples_leaf": leaf_rows, "l2_regularization": 1.0}
    for lr in (0.05, 0.1)
    for leaves, leaf_rows in ((7, 20), (15, 100))
]
"""The ``hgb`` grid (4 points): learning rate x (leaves, minimum rows per leaf). Kept small for
the time it adds to every evaluation; on the default windows 31 or 63 leaves scored lower on May
(0.734-0.739 against 0.746-0.750) and took longer."""
LIGHTGBM_GRID: list[dict[str, Any]] = [
    {"learning_rate": lr, "num_leaves": leaves, "min_child_samples": leaf_rows, "colsample_bytree": ff}
    for lr in (0.05, 0.1)
    for leaves, leaf_rows in ((15, 20), (31, 100))
    for ff in (0.5, 0.9)
]
"""The ``lightgbm`` grid (8 points): learning rate x (leaves, minimum rows per child) x feature
fraction."""
BASELINE_NAMES = {
    "hgb": f"HistGradientBoostingClassifier (scikit-learn), tuned on the validation window ({len(HGB_GRID)} points)",
    "lightgbm": f"LGBMClassifier (LightGBM), tuned on the validation window ({len(LIGHTGBM_GRID)} points)",
}
THREADS = 1
"""Threads per fit (the grid's points are fitted in parallel, one thread per core). On 2 cores
shared with the Horovod ranks and other jobs, scikit-learn's and LightGBM's OpenMP threads at 2
took 5-10x as long as one (measured: the ``hgb`` grid 353 s
against 31 s at load 8); a quiet machine loses little with one."""
ITERATIONS_PARAM = "iterations"
"""The boosting rounds early stopping chose (a key of :attr:`TunedBaseline.params`)."""


@dataclass
class TunedBaseline:
    """A baseline chosen on the validation window, with what chose it."""

    kind: str
    model: Pipeline
    params: dict[str, Any]
    """The chosen grid point and :data:`ITERATIONS_PARAM` (the best round on validation)."""
    val_roc_auc: float
    """The chosen point's ROC AUC on the validation window."""
    seconds: float
    """Wall time of the whole grid."""
    val_proba: np.ndarray
    """The chosen model's probabilities on the validation rows (what ``val_roc_auc`` scored; the
    evaluation chooses the baseline's threshold on them)."""
    grid: list[dict[str, Any]] = field(default_factory=list)
    """Every point tried: its settings, rounds and validation ROC AUC."""


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


def _check_kind(kind: str) -> None:
    if kind not in BASELINE_NAMES:
        raise ValueError(f"unknown baseline {kind!r}: choose one of {sorted(BASELINE_NAMES)} or 'none'")
    if kind == "lightgbm":
        try:
            import lightgbm  # noqa: F401
        except ImportError as e:
            raise ValueError(
                "gate.baseline=lightgbm needs LightGBM: pip install 'ringflow[lightgbm]' (make install installs it)"
            ) from e


def _encoder(numeric: list[str], categorical: list[str]) -> ColumnTransformer:
    """Ordinal codes for the categoricals (unseen and missing -> NaN, which the trees treat as
    missing), numerics passed through; the categoricals come first."""
    return ColumnTransformer(
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


def _trees(kind: str, point: dict[str, Any], n_categorical: int, n_numeric: int, seed: int, rounds: int | None) -> Any:
    """An unfitted classifier for one grid point: with early stopping (``rounds`` None) or a fixed
    number of rounds (the final fit, or a plain fit)."""
    if kind == "hgb":
        return HistGradientBoostingClassifier(
            max_iter=rounds or MAX_ITERATIONS,
            early_stopping=rounds is None,
            n_iter_no_change=EARLY_STOPPING_ROUNDS,
            scoring="loss",
            categorical_features=[True] * n_categorical + [False] * n_numeric,
            random_state=seed,
            **point,
        )
    from lightgbm import LGBMClassifier

    return LGBMClassifier(
        n_estimators=rounds or MAX_ITERATIONS,
        random_state=seed,
        deterministic=True,
        force_row_wise=True,  # with deterministic: the same trees on every rerun
        n_jobs=THREADS,
        verbose=-1,
        **point,
    )


def _fit_point(
    kind: str,
    point: dict[str, Any],
    x: np.ndarray,
    y: np.ndarray,
    x_val: np.ndarray | None,
    y_val: np.ndarray | None,
    n_categorical: int,
    seed: int,
    rounds: int | None = None,
) -> tuple[Any, int]:
    """Fit one grid point: (classifier, best round). Early stopping on (x_val, y_val) when given."""
    n_numeric = x.shape[1] - n_categorical
    clf = _trees(kind, point, n_categorical, n_numeric, seed, None if x_val is not None else rounds)
    if kind == "hgb":
        if x_val is None:
            clf.fit(x, y)
            return clf, int(clf.n_iter_)
        clf.fit(x, y, X_val=x_val, y_val=y_val)
        # validation_score_[i]: minus the validation loss after i rounds (0: before the first)
        return clf, max(1, int(np.argmax(clf.validation_score_)))
    import lightgbm

    cat = list(range(n_categorical))
    if x_val is None:
        clf.fit(x, y, categorical_feature=cat)
        return clf, int(clf.n_estimators)
    clf.fit(
        x,
        y,
        eval_X=x_val,
        eval_y=y_val,
        eval_metric="binary_logloss",
        categorical_feature=cat,
        callbacks=[lightgbm.early_stopping(EARLY_STOPPING_ROUNDS, verbose=False)],
    )
    return clf, max(1, int(clf.best_iteration_))


def _proba(clf: Any, x: np.ndarray) -> np.ndarray:
    return np.asarray(clf.predict_proba(x)[:, 1], dtype=np.float64)


def tune_baseline(
    kind: str,
    train: pd.DataFrame,
    validation: pd.DataFrame,
    target: str,
    numeric: list[str],
    categorical: list[str],
    seed: int = 0,
) -> TunedBaseline:
    """Fit every grid point of ``kind`` on ``train`` with early stopping on ``validation``; keep
    the one with the best validation ROC AUC (ties: the earlier point)."""
    _check_kind(kind)
    if train.empty or validation.empty:
        raise ValueError("baseline: the train and validation windows need rows")
    t0 = time.perf_counter()
    encode = _encoder(numeric, categorical)
    x = encode.fit_transform(baseline_frame(train, numeric, categorical))
    x_val = encode.transform(baseline_frame(validation, numeric, categorical))
    y, y_val = train[target].to_numpy().astype(int), validation[target].to_numpy().astype(int)
    grid = HGB_GRID if kind == "hgb" else LIGHTGBM_GRID

    def fit(point: dict[str, Any]) -> tuple[float, Any, dict[str, Any], np.ndarray]:
        with threadpool_limits(limits=THREADS, user_api="openmp"):  # OpenMP's limit is per thread
            clf, rounds = _fit_point(kind, point, x, y, x_val, y_val, len(categorical), seed)
            p_val = _proba(clf, x_val)
        auc = float(roc_auc_score(y_val, p_val)) if len(set(y_val)) > 1 else float("nan")
        return auc, clf, {**point, ITERATIONS_PARAM: rounds}, p_val

    # The points are independent and each fit runs without the GIL: one thread per core, so the
    # grid uses a core the Horovod ranks leave free (it runs beside them) and both after they end.
    with ThreadPoolExecutor(max_workers=min(len(grid), usable_cores()), thread_name_prefix="baseline") as pool:
        fitted = list(pool.map(fit, grid))
    tried: list[dict[str, Any]] = []
    best: tuple[float, Any, dict[str, Any], np.ndarray] | None = None
    for auc, clf, params, p_val in fitted:  # in grid order: ties go to the earlier point
        tried.append({**params, "val_roc_auc": auc})
        if best is None or auc > best[0]:
            best = (auc, clf, params, p_val)
    assert best is not None
    auc, clf, params, p_val = best
    return TunedBaseline(
        kind=kind,
        model=Pipeline([("encode", encode), ("trees", clf)]),
        params=params,
        val_roc_auc=auc,
        seconds=time.perf_counter() - t0,
        val_proba=p_val,
        grid=tried,
    )


def refit_baseline(
    kind: str,
    params: dict[str, Any],
    rows: pd.DataFrame,
    target: str,
    numeric: list[str],
    categorical: list[str],
    seed: int = 0,
) -> Pipeline:
    """The final fit: the settings :func:`tune_baseline` chose (``params``, with its round count)
    trained on ``rows`` (train + validation) without early stopping."""
    _check_kind(kind)
    if rows.empty:
        raise ValueError("baseline: no rows to fit")
    point = {k: v for k, v in params.items() if k != ITERATIONS_PARAM}
    encode = _encoder(numeric, categorical)
    x = encode.fit_transform(baseline_frame(rows, numeric, categorical))
    y = rows[target].to_numpy().astype(int)
    with threadpool_limits(limits=THREADS, user_api="openmp"):
        clf, _ = _fit_point(kind, point, x, y, None, None, len(categorical), seed, rounds=int(params[ITERATIONS_PARAM]))
    return Pipeline([("encode", encode), ("trees", clf)])


def baseline_proba(model: Pipeline, df: pd.DataFrame, numeric: list[str], categorical: list[str]) -> np.ndarray:
    """Delay probabilities (float64, shape [n])."""
    return np.asarray(model.predict_proba(baseline_frame(df, numeric, categorical))[:, 1], dtype=np.float64)

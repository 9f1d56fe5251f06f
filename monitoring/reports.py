"""Evidently 0.7 reports: data drift and classification quality, batch vs reference.

Pure logic (no Prefect, no MLflow): frames in, files + a typed summary out. Uses the new
Evidently API (``evidently.Report`` / ``Dataset`` / ``DataDefinition``), not ``evidently.legacy``.

Evidently's per-column drift tests get slow on large frames (evidently#1526), so both sides are
sampled first: the reference to ``reference_sample_rows``, the batch to ``max_current_rows``.
Metrics that decide anything (AUC, PSI, missing shares) are computed elsewhere on every row;
the Evidently numbers are for the HTML a person reads and for the drift decision per column.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel

PREDICTION = "prediction"
"""Column holding the champion's predicted delay probability in both frames."""

_DRIFTED_COUNT = "evidently:metric_v2:DriftedColumnsCount"
_VALUE_DRIFT = "evidently:metric_v2:ValueDrift"
_CLASSIFICATION_METRICS = {
    "evidently:metric_v2:RocAuc": "roc_auc",
    "evidently:metric_v2:Accuracy": "accuracy",
    "evidently:metric_v2:Precision": "precision",
    "evidently:metric_v2:Recall": "recall",
    "evidently:metric_v2:F1Score": "f1",
    "evidently:metric_v2:LogLoss": "log_loss",
}


class ReportError(ValueError):
    """The frames cannot be compared (missing column, empty frame); the message names it."""


class ColumnDrift(BaseModel):
    column: str
    method: str
    """Evidently's stat test, chosen per column type and size (e.g. Wasserstein, Jensen-Shannon)."""
    threshold: float
    score: float
    """A p-value for the tests (drift if below), a distance for the distances (drift if at/above)."""
    drifted: bool


class ReportSummary(BaseModel):
    reference_rows: int
    """Rows Evidently compared (after sampling)."""
    current_rows: int
    drift_share_threshold: float
    drifted_count: int
    drifted_share: float
    """Share of feature columns whose distribution drifted."""
    dataset_drift: bool
    """``drifted_share >= drift_share_threshold`` (Evidently's preset test)."""
    drifted_columns: list[str]
    columns: list[ColumnDrift]
    prediction_drift: ColumnDrift | None = None
    """Drift of the champion's predicted probability (shown in the report; the PSI rule decides)."""
    classification: dict[str, float] | None = None
    """Evidently's quality metrics on the sampled batch (None without labels)."""
    drift_html: str
    drift_json: str
    quality_html: str | None = None
    quality_json: str | None = None
    evidently_seconds: float
    """Wall time spent inside Evidently (report runs + saving), for the benchmark."""
    evidently_import_seconds: float = 0.0
    """Time to import Evidently in this call (first use in a process only)."""


def sample_rows(df: pd.DataFrame, n: int | None, seed: int = 0) -> pd.DataFrame:
    """At most ``n`` rows, sampled without replacement with a fixed seed (stable reports)."""
    if n is None or len(df) <= n:
        return df
    return df.sample(n=n, random_state=seed)


def _check_columns(df: pd.DataFrame, columns: list[str], which: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ReportError(f"{which} frame lacks column(s) {missing}")
    if df.empty:
        raise ReportError(f"{which} frame is empty")


def _evidently_frame(df: pd.DataFrame, numeric: list[str], categorical: list[str], extra: list[str]) -> pd.DataFrame:
    # Evidently wants plain dtypes: pandas' nullable "string" becomes object with None for missing.
    out = df[[*numeric, *categorical, *extra]].copy()
    for c in numeric:
        out[c] = pd.to_numeric(out[c], errors="coerce").astype("float64")
    for c in categorical:
        out[c] = out[c].astype(object).where(out[c].notna(), None)
    return out


def _metric_value(metrics: list[dict], type_: str):
    return next((m["value"] for m in metrics if m["config"]["type"] == type_), None)


def _drifted_by_score(cfg: dict, score: float) -> bool:
    # Only used when a test verdict is missing: p-value tests drift below, distances at/above.
    threshold = float(cfg.get("threshold") or 0.05)
    return score < threshold if "p_value" in str(cfg.get("method")) else score >= threshold


def build_reports(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    numeric: list[str],
    categorical: list[str],
    out_dir: str | Path,
    *,
    target: str | None = None,
    drift_share: float = 0.5,
    reference_rows: int | None = 20_000,
    current_rows: int | None = 200_000,
    seed: int = 0,
) -> ReportSummary:
    """Run the drift report (and the quality report when ``target`` is given) and save both.

    Both frames must carry the feature columns and :data:`PREDICTION`; ``current`` also
    ``target`` when labels are known. Writes ``drift.html/json`` (and ``quality.html/json``)
    under ``out_dir``.
    """
    t_import = time.perf_counter()
    from evidently import BinaryClassification, DataDefinition, Dataset, Report
    from evidently.metrics import ValueDrift
    from evidently.presets import ClassificationPreset, DataDriftPreset

    import_seconds = time.perf_counter() - t_import  # ~3.5 s on first use in a process, then 0

    features = [*numeric, *categorical]
    _check_columns(reference, [*features, PREDICTION], "reference")
    _check_columns(current, [*features, PREDICTION, *([target] if target else [])], "current")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    ref = _evidently_frame(sample_rows(reference, reference_rows, seed), numeric, categorical, [PREDICTION])
    cur_sample = sample_rows(current, current_rows, seed)
    cur = _evidently_frame(cur_sample, numeric, categorical, [PREDICTION])

    t0 = time.perf_counter()
    drift_def = DataDefinition(numerical_columns=[*numeric, PREDICTION], categorical_columns=categorical)
    drift_report = Report(
        [DataDriftPreset(columns=features, drift_share=drift_share), ValueDrift(column=PREDICTION)],
        include_tests=True,  # per-column tests carry Evidently's own drifted / not-drifted verdict
    )
    drift_snap = drift_report.run(
        current_data=Dataset.from_pandas(cur, data_definition=drift_def),
        reference_data=Dataset.from_pandas(ref, data_definition=drift_def),
    )
    drift_html, drift_json = out / "drift.html", out / "drift.json"
    drift_snap.save_html(str(drift_html))
    drift_snap.save_json(str(drift_json))

    quality_html = quality_json = None
    classification = None
    if target is not None:
        labelled = cur.assign(**{target: cur_sample[target].astype(int).to_numpy()})
        if labelled[target].nunique() < 2:
            # Evidently's ROC AUC is undefined on one class; the quality report would raise.
            classification = {}
        else:
            quality_def = DataDefinition(
                numerical_columns=[*numeric, PREDICTION], categorical_columns=categorical,
                classification=[BinaryClassification(target=target, prediction_probas=PREDICTION)],
            )
            quality_snap = Report([ClassificationPreset()]).run(
                current_data=Dataset.from_pandas(labelled, data_definition=quality_def), reference_data=None
            )
            quality_html, quality_json = out / "quality.html", out / "quality.json"
            quality_snap.save_html(str(quality_html))
            quality_snap.save_json(str(quality_json))
            qm = quality_snap.dict()["metrics"]
            classification = {
                name: float(v) for t, name in _CLASSIFICATION_METRICS.items()
                if isinstance(v := _metric_value(qm, t), (int, float))
            }
    evidently_seconds = time.perf_counter() - t0

    d = drift_snap.dict()
    verdicts = {  # column -> Evidently's verdict, from the per-column ValueDrift tests
        t["metric_config"]["params"]["column"]: t["status"] == "FAIL"
        for t in d["tests"] if t["metric_config"].get("params", {}).get("type") == _VALUE_DRIFT
    }
    columns: list[ColumnDrift] = []
    prediction_drift = None
    for m in d["metrics"]:
        cfg = m["config"]
        if cfg["type"] != _VALUE_DRIFT:
            continue
        col = cfg["column"]
        item = ColumnDrift(
            column=col, method=str(cfg.get("method")), threshold=float(cfg.get("threshold") or np.nan),
            score=float(m["value"]), drifted=verdicts.get(col, _drifted_by_score(cfg, float(m["value"]))),
        )
        if col == PREDICTION:
            prediction_drift = item
        elif col in features:
            columns.append(item)
    counted = _metric_value(d["metrics"], _DRIFTED_COUNT) or {}
    drifted = [c.column for c in columns if c.drifted]
    share = float(counted.get("share", len(drifted) / max(len(features), 1)))
    return ReportSummary(
        reference_rows=len(ref), current_rows=len(cur), drift_share_threshold=drift_share,
        drifted_count=int(counted.get("count", len(drifted))), drifted_share=share,
        dataset_drift=share >= drift_share, drifted_columns=drifted, columns=columns,
        prediction_drift=prediction_drift, classification=classification,
        drift_html=str(drift_html), drift_json=str(drift_json),
        quality_html=str(quality_html) if quality_html else None,
        quality_json=str(quality_json) if quality_json else None,
        evidently_seconds=evidently_seconds, evidently_import_seconds=import_seconds,
    )

"""Evidently 0.7 reports: data drift and classification quality, batch vs reference.

Pure logic (no Prefect, no MLflow): frames in, files + a typed summary out. Uses the new
Evidently API (``evidently.Report`` / ``Dataset`` / ``DataDefinition``), not ``evidently.legacy``.

Evidently's per-column drift tests get slow on large frames (evidently#1526), so both sides are
sampled first: the reference to ``reference_sample_rows``, the batch to ``max_current_rows``.
Metrics that decide anything (AUC, PSI, missing shares) are computed elsewhere on every row;
the Evidently numbers are for the HTML a person reads and for the drift decision per column.

The drift report also shows what the anomaly rules decide on, as Evidently tests with the rules'
thresholds (:class:`RuleThresholds`): the PSI of the predictions (``ValueDrift(method="psi")``),
each column's missing share (``MissingValueCount``) and each categorical column's share of
categories the model never saw (``OutListValueCount`` against its training vocabulary). The
rules compute their own numbers on every row; the report's are on the sampled rows.
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from pydantic import BaseModel

from ringflow.training.config import EVIDENTLY_WORKSPACE_DIR

if TYPE_CHECKING:
    from evidently.ui.workspace import Project, Workspace

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


class RuleThresholds(BaseModel):
    """The anomaly rules' limits (``MonitoringConfig``), rendered as tests in the drift report."""

    prediction_psi: float = 0.2
    """PredictionShiftRule: PSI of the predicted probabilities above this is a shift."""
    max_missing_increase: float = 0.2
    """MissingValuesRule: a column's missing share may exceed the reference's by at most this."""
    max_unseen_share: float = 0.05
    """UnseenCategoriesRule: share of non-missing values outside the training vocabulary."""
    vocabulary: dict[str, list[str]] = {}
    """Categorical column -> the categories the model was trained on (the preprocessor's)."""


class RuleCheck(BaseModel):
    """One rule value as Evidently computed it in the report, with its limit."""

    rule: str
    """``prediction_psi``, ``missing_share`` or ``unseen_share``."""
    column: str
    value: float
    threshold: float
    passed: bool


class EvidentlyWorkspace(BaseModel):
    """Where monitoring snapshots collect for ``evidently ui`` (a local workspace directory)."""

    path: str
    project: str
    """Project name: one per pipeline config (e.g. ``ringflow flights``)."""


WORKSPACE_DIR = EVIDENTLY_WORKSPACE_DIR
"""The Evidently workspace under ``$RINGFLOW_HOME`` (monitoring writes it, ``evidently ui`` reads it)
unless ``RINGFLOW_EVIDENTLY_WORKSPACE`` names another (``Settings.evidently_workspace``)."""

DASHBOARD_PANELS = ["Drift share per batch", "Prediction PSI per batch", "ROC AUC per batch"]


def _dashboard(project: Project) -> None:
    """The project's trend panels: drift share, prediction PSI and AUC per batch over time."""
    from evidently.sdk.models import PanelMetric
    from evidently.sdk.panels import line_plot_panel

    have = {p.title for p in project.dashboard.model().panels}
    panels = [
        line_plot_panel(
            DASHBOARD_PANELS[0],
            [
                PanelMetric(
                    legend="drifted share of features",
                    metric="DriftedColumnsCount",
                    metric_labels={"value_type": "share"},
                )
            ],
            description="DataDriftPreset: share of feature columns whose distribution drifted",
            size="half",
        ),
        line_plot_panel(
            DASHBOARD_PANELS[1],
            [PanelMetric(legend="PSI", metric="ValueDrift", metric_labels={"column": PREDICTION})],
            description="PSI of the champion's predicted probabilities, batch vs reference",
            size="half",
        ),
        line_plot_panel(
            DASHBOARD_PANELS[2],
            [PanelMetric(legend="ROC AUC", metric="RocAuc")],
            description="the champion's ROC AUC on each labelled batch",
            size="full",
        ),
    ]
    for panel in panels:
        if panel.title not in have:
            project.dashboard.add_panel(panel)


def workspace_project(workspace: EvidentlyWorkspace) -> tuple[Workspace, Project]:
    """(workspace, project), creating either and the dashboard panels when missing."""
    from evidently.ui.workspace import Workspace

    ws = Workspace.create(workspace.path)
    found = ws.search_project(workspace.project)
    project = (
        found[0]
        if found
        else ws.create_project(
            workspace.project, description="ringflow monitoring: one drift and one quality snapshot per batch"
        )
    )
    _dashboard(project)
    return ws, project


_MISSING = "evidently:metric_v2:MissingValueCount"
_OUT_OF_LIST = "evidently:metric_v2:OutListValueCount"


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
    """PSI of the champion's predicted probability (Evidently's, on the sampled rows; the
    PredictionShiftRule decides on all rows)."""
    rule_checks: list[RuleCheck] = []
    """The rule values rendered in the drift report (PSI, missing and unseen shares)."""
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
        missing = out[c].isna()
        out[c] = out[c].astype(object)
        out.loc[missing, c] = None
    return out


def _metric_value(metrics: list[dict[str, Any]], type_: str) -> object:
    """The value of the first metric of ``type_`` in a snapshot's JSON (a number or a dict)."""
    value: object = next((m["value"] for m in metrics if m["config"]["type"] == type_), None)
    return value


def _drifted_by_score(cfg: dict[str, Any], score: float) -> bool:
    # Only used when a test verdict is missing: p-value tests drift below, distances at/above.
    threshold = float(cfg.get("threshold") or 0.05)
    return score < threshold if "p_value" in str(cfg.get("method")) else score >= threshold


def _rule_checks(
    metrics: list[dict[str, Any]], rules: RuleThresholds, ref_missing: dict[str, float]
) -> list[RuleCheck]:
    checks = []
    for m in metrics:
        cfg, value = m["config"], m["value"]
        if cfg["type"] == _VALUE_DRIFT and cfg["column"] == PREDICTION:
            rule, share, limit = "prediction_psi", float(value), rules.prediction_psi
        elif cfg["type"] == _MISSING:
            rule, share = "missing_share", float(value["share"])
            limit = round(min(1.0, ref_missing.get(cfg["column"], 0.0) + rules.max_missing_increase), 6)
        elif cfg["type"] == _OUT_OF_LIST:
            rule, share, limit = "unseen_share", float(value["share"]), rules.max_unseen_share
        else:
            continue
        checks.append(RuleCheck(rule=rule, column=cfg["column"], value=share, threshold=limit, passed=share <= limit))
    return checks


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
    rules: RuleThresholds | None = None,
    workspace: EvidentlyWorkspace | None = None,
    batch_label: str = "",
    batch_time: datetime | None = None,
) -> ReportSummary:
    """Run the drift report (and the quality report when ``target`` is given) and save both.

    Both frames must carry the feature columns and :data:`PREDICTION`; ``current`` also
    ``target`` when labels are known. Writes ``drift.html/json`` (and ``quality.html/json``)
    under ``out_dir``. ``rules``: the anomaly rules' thresholds, shown as tests in the drift report
    (defaults when None). ``workspace``: also add both snapshots to this Evidently workspace,
    stamped ``batch_time`` (the batch's start, so the dashboard's time axis is the data's) and
    tagged ``batch_label``.
    """
    t_import = time.perf_counter()
    from evidently import BinaryClassification, DataDefinition, Dataset, Report
    from evidently.metrics import MissingValueCount, OutListValueCount, ValueDrift
    from evidently.presets import ClassificationPreset, DataDriftPreset
    from evidently.tests import lte

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
    rules = rules or RuleThresholds()
    ref_missing = {c: float(ref[c].isna().mean()) for c in features}
    evidence = [
        ValueDrift(column=PREDICTION, method="psi", threshold=rules.prediction_psi),
        *[
            MissingValueCount(
                column=c, share_tests=[lte(round(min(1.0, ref_missing[c] + rules.max_missing_increase), 6))]
            )
            for c in features
        ],
        *[
            OutListValueCount(column=c, values=list(rules.vocabulary[c]), share_tests=[lte(rules.max_unseen_share)])
            for c in categorical
            if c in rules.vocabulary
        ],
    ]
    drift_report = Report(
        [DataDriftPreset(columns=features, drift_share=drift_share), *evidence],
        include_tests=True,  # per-column tests carry Evidently's own drifted / not-drifted verdict
    )
    stamp = {
        "timestamp": batch_time,
        "tags": [batch_label] if batch_label else None,
        "metadata": {"batch": batch_label} if batch_label else None,
    }
    drift_snap = drift_report.run(
        current_data=Dataset.from_pandas(cur, data_definition=drift_def),
        reference_data=Dataset.from_pandas(ref, data_definition=drift_def),
        name=f"drift {batch_label}".strip(),
        **stamp,
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
                numerical_columns=[*numeric, PREDICTION],
                categorical_columns=categorical,
                classification=[BinaryClassification(target=target, prediction_probas=PREDICTION)],
            )
            quality_snap = Report([ClassificationPreset()]).run(
                current_data=Dataset.from_pandas(labelled, data_definition=quality_def),
                reference_data=None,
                name=f"quality {batch_label}".strip(),
                **stamp,
            )
            quality_html, quality_json = out / "quality.html", out / "quality.json"
            quality_snap.save_html(str(quality_html))
            quality_snap.save_json(str(quality_json))
            qm = quality_snap.dict()["metrics"]
            classification = {
                name: float(v)
                for t, name in _CLASSIFICATION_METRICS.items()
                if isinstance(v := _metric_value(qm, t), (int, float))
            }
    if workspace is not None:
        ws, project = workspace_project(workspace)
        for snap in (drift_snap, quality_snap if quality_html else None):
            if snap is not None:
                ws.add_run(project.id, snap, include_data=False)
    evidently_seconds = time.perf_counter() - t0

    d = drift_snap.dict()
    verdicts = {  # column -> Evidently's verdict, from the per-column ValueDrift tests
        t["metric_config"]["params"]["column"]: t["status"] == "FAIL"
        for t in d["tests"]
        if t["metric_config"].get("params", {}).get("type") == _VALUE_DRIFT
    }
    columns: list[ColumnDrift] = []
    prediction_drift = None
    for m in d["metrics"]:
        cfg = m["config"]
        if cfg["type"] != _VALUE_DRIFT:
            continue
        col = cfg["column"]
        item = ColumnDrift(
            column=col,
            method=str(cfg.get("method")),
            threshold=float(cfg.get("threshold") or np.nan),
            score=float(m["value"]),
            drifted=verdicts.get(col, _drifted_by_score(cfg, float(m["value"]))),
        )
        if col == PREDICTION:
            prediction_drift = item
        elif col in features:
            columns.append(item)
    found = _metric_value(d["metrics"], _DRIFTED_COUNT)
    counted = found if isinstance(found, dict) else {}
    drifted = [c.column for c in columns if c.drifted]
    share = float(counted.get("share", len(drifted) / max(len(features), 1)))
    return ReportSummary(
        reference_rows=len(ref),
        current_rows=len(cur),
        drift_share_threshold=drift_share,
        drifted_count=int(counted.get("count", len(drifted))),
        drifted_share=share,
        dataset_drift=share >= drift_share,
        drifted_columns=drifted,
        columns=columns,
        prediction_drift=prediction_drift,
        rule_checks=_rule_checks(d["metrics"], rules, ref_missing),
        classification=classification,
        drift_html=str(drift_html),
        drift_json=str(drift_json),
        quality_html=str(quality_html) if quality_html else None,
        quality_json=str(quality_json) if quality_json else None,
        evidently_seconds=evidently_seconds,
        evidently_import_seconds=import_seconds,
    )

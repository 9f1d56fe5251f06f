"""Evaluation stage: score the candidate, the current champion and a baseline on the same test rows, gate.

The gate is TFX's "blessing": the candidate is promoted only if it passes the absolute floors,
beats the champion on the primary metric by the configured margin and is not beaten by the
baseline (a gradient-boosted trees model fitted on the same train window, ``training/baseline.py``)
by more than its margin. The verdict and a reason per check go to MLflow tags and to a Prefect
markdown artifact; the baseline's metrics and model are logged next to the candidate's, and the
baseline is never registered.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.data.pandas_dataset import PandasDataset
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel
from sklearn.pipeline import Pipeline

from ringflow.tasks import artifacts
from ringflow.tasks.baseline import ScoredBaseline, score_baseline
from ringflow.tasks.timings import Laps
from ringflow.training import tags
from ringflow.training.baseline import TunedBaseline
from ringflow.training.config import GateConfig, PipelineConfig, get_settings
from ringflow.training.manifest import Manifest
from ringflow.training.metric_names import METRIC_NAMES
from ringflow.training.metrics import (
    GREATER_IS_BETTER,
    classification_metrics,
    roc_and_calibration_figures,
)
from ringflow.training.pyfunc import log_delay_model, model_columns, predict_rows
from ringflow.training.result import TrainResult
from ringflow.training.summary import SUMMARY_FILE

CHAMPION = "champion"


class MetricVerdict(BaseModel):
    metric: str
    check: Literal["floor", "champion", "baseline"] = "floor"
    """What the candidate was held against."""
    candidate: float
    champion: float | None = None
    floor: float | None = None
    baseline: float | None = None
    passed: bool
    reason: str

    @property
    def tag(self) -> str:
        """MLflow tag key: one per check, so a floor and a comparison on the same metric both show."""
        return tags.GATE_REASON_PREFIX + (self.metric if self.check == "floor" else f"{self.check}.{self.metric}")


class GateDecision(BaseModel):
    promote: bool
    primary_metric: str
    verdicts: list[MetricVerdict]
    warnings: list[str] = []
    """Things a person should know about the verdict (e.g. a small test window); not refusals."""

    @property
    def summary(self) -> str:
        failed = [v.reason for v in self.verdicts if not v.passed]
        return (
            "promote: " + "; ".join(v.reason for v in self.verdicts)
            if self.promote
            else ("reject: " + "; ".join(failed))
        )


class EvaluationResult(BaseModel):
    training_run_id: str
    model_uri: str
    """The logged pyfunc model that was scored (and will be registered)."""
    candidate_metrics: dict[str, float]
    candidate_threshold: float = 0.5
    """Decision threshold of the candidate (chosen on validation data) for accuracy/F1."""
    champion_version: str | None = None
    champion_metrics: dict[str, float] | None = None
    champion_threshold: float | None = None
    baseline: str = "none"
    """``gate.baseline``: which reference model was scored (``none``: none)."""
    baseline_metrics: dict[str, float] | None = None
    baseline_threshold: float | None = None
    baseline_model_uri: str | None = None
    """The logged (never registered) baseline model."""
    test_window: str = ""
    test_rows: int = 0
    decision: GateDecision
    final_fit_epochs: int | None = None
    """``training.final_fit``: the candidate was retrained on train + validation for this many epochs."""
    select_run_id: str | None = None
    """``training.final_fit``: the child run whose validation chose the epoch count and the threshold."""


def decide(
    candidate: dict[str, float],
    champion: dict[str, float] | None,
    gate: GateConfig,
    baseline: dict[str, float] | None = None,
    test_rows: int | None = None,
) -> GateDecision:
    """Pure gate: floors, then the primary metric against the champion (if there is one) and
    against the baseline (if one was scored and ``gate.must_beat_baseline``).

    "Beats the champion" is strict: a candidate equal to the champion is not promoted, so
    re-running the same config does not churn the alias. The baseline may be ahead by at most
    ``gate.baseline_margin``.
    """
    verdicts = []
    for metric, floor in gate.floors.items():
        value = candidate.get(metric, math.nan)
        higher = GREATER_IS_BETTER.get(metric, True)
        ok = (value >= floor) if higher else (value <= floor)
        op = ">=" if higher else "<="
        verdicts.append(
            MetricVerdict(
                metric=metric,
                candidate=value,
                floor=floor,
                passed=bool(ok),
                reason=f"{metric} {value:.4f} {op} floor {floor}"
                if ok
                else f"{metric} {value:.4f} fails floor {op} {floor}",
            )
        )
    m = gate.primary_metric
    value = candidate.get(m, math.nan)
    higher = GREATER_IS_BETTER[m]
    if champion is None:
        verdicts.append(
            MetricVerdict(
                metric=m, check="champion", candidate=value, passed=True, reason=f"no champion yet: {m} {value:.4f}"
            )
        )
    else:
        best = champion.get(m, math.nan)
        delta = (value - best) if higher else (best - value)
        ok = delta > gate.min_improvement if gate.min_improvement == 0 else delta >= gate.min_improvement
        verdicts.append(
            MetricVerdict(
                metric=m,
                check="champion",
                candidate=value,
                champion=best,
                passed=bool(ok),
                reason=(
                    f"{m} {value:.4f} vs champion {best:.4f} ({delta:+.4f}, needs "
                    f"{'>' if gate.min_improvement == 0 else '>='} {gate.min_improvement})"
                ),
            )
        )
    if baseline is not None:
        ref = baseline.get(m, math.nan)
        ahead = (ref - value) if higher else (value - ref)  # how far the baseline is ahead
        ok = not gate.must_beat_baseline or ahead <= gate.baseline_margin
        if ahead <= gate.baseline_margin:
            reason = f"{m} {value:.4f} vs baseline {gate.baseline} {ref:.4f} ({-ahead:+.4f})"
        else:
            reason = (
                f"{m} {value:.4f} vs baseline {gate.baseline} {ref:.4f}: the baseline is ahead by "
                f"{ahead:.4f} (margin {gate.baseline_margin})"
            )
            if not gate.must_beat_baseline:
                reason += ", not enforced (gate.must_beat_baseline=false)"
        verdicts.append(
            MetricVerdict(metric=m, check="baseline", candidate=value, baseline=ref, passed=bool(ok), reason=reason)
        )
    warnings = []
    if test_rows is not None and test_rows < gate.min_test_rows:
        warnings.append(
            f"the test window has only {test_rows} rows (gate.min_test_rows={gate.min_test_rows}): "
            "its metrics are noisy; widen data.windows.test"
        )
    return GateDecision(promote=all(v.passed for v in verdicts), primary_metric=m, verdicts=verdicts, warnings=warnings)


# What the registry answers for "no such model" and "no such alias" (store and REST alike).
_NOT_FOUND = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}


def version_by_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The model version behind ``alias``, or None when the model or the alias does not exist.

    Any other registry error (server unreachable, auth) propagates: read as "no champion yet", it
    would wave a candidate past the gate on the floors alone.
    """
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if e.error_code in _NOT_FOUND:
            return None
        raise


def current_champion(client: MlflowClient, name: str) -> ModelVersion | None:
    """The model version behind ``@champion``, or None before the first promotion."""
    return version_by_alias(client, name, CHAMPION)


def _fmt(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def _decision_markdown(cfg: PipelineConfig, ev: EvaluationResult) -> str:
    d = ev.decision
    champion_col = f"champion v{ev.champion_version}" if ev.champion_version else "champion (none yet)"
    baseline_col = f"baseline {ev.baseline}"
    rows = [f"| metric | candidate | {champion_col} | {baseline_col} |", "|---|---|---|---|"]
    for k in METRIC_NAMES:
        rows.append(
            f"| {k} | {_fmt(ev.candidate_metrics.get(k))} | "
            f"{_fmt((ev.champion_metrics or {}).get(k))} | {_fmt((ev.baseline_metrics or {}).get(k))} |"
        )
    rows.append(
        f"| decision threshold | {_fmt(ev.candidate_threshold)} | {_fmt(ev.champion_threshold)} | "
        f"{_fmt(ev.baseline_threshold)} |"
    )
    reasons = "\n".join(f"- {'PASS' if v.passed else 'FAIL'}: {v.reason}" for v in d.verdicts)
    warnings = "".join(f"\n**Warning:** {w}\n" for w in d.warnings)
    champion = f"version {ev.champion_version}" if ev.champion_version else "none yet"
    return (
        f"## Gate: {'PROMOTE' if d.promote else 'REJECT'} candidate of `{cfg.registry.model_name}`\n\n"
        f"Training run `{ev.training_run_id}`; current champion: {champion}; baseline: {ev.baseline}; "
        f"primary metric `{d.primary_metric}`, margin {cfg.gate.min_improvement}, baseline margin "
        f"{cfg.gate.baseline_margin} ({'enforced' if cfg.gate.must_beat_baseline else 'not enforced'}).\n\n"
        f"Test window {ev.test_window}, {ev.test_rows} rows. Accuracy and F1 at each model's decision "
        "threshold (chosen on the validation window).\n"
        + _final_fit_note(ev)
        + warnings
        + "\n"
        + "\n".join(rows)
        + "\n\n### Reasons\n"
        + reasons
        + "\n"
    )


def _final_fit_note(ev: EvaluationResult) -> str:
    if ev.final_fit_epochs is None:
        return ""
    return (
        f"\nFinal fit (`training.final_fit`): the candidate was retrained on the train and validation "
        f"windows for {ev.final_fit_epochs} epochs, the best epoch of the selection run `{ev.select_run_id}` "
        "(whose validation metrics are the evidence for that count). It has seen the validation rows, so it "
        "cannot choose its decision threshold there: it carries over the selection run's, chosen on the "
        "validation window with the best epoch's weights."
        + (
            " The baseline gets the same final fit: its chosen settings and rounds refitted on train + "
            "validation, its threshold carried over from its tuned model."
            if ev.baseline != "none"
            else ""
        )
        + "\n"
    )


def logged_threshold(model_id: str | None) -> float | None:
    """The decision threshold logged with a model (None for models logged before there was one)."""
    if not model_id:
        return None
    try:
        raw = mlflow.get_logged_model(model_id).params.get(tags.DECISION_THRESHOLD)
    except MlflowException:
        return None
    return float(raw) if raw not in (None, "") else None


def log_baseline_settings(tuned: TunedBaseline) -> None:
    """The baseline's chosen settings as params of the active run (``baseline.<name>``), its
    validation AUC and tuning time as metrics, and every grid point tried as an artifact."""
    mlflow.log_params({tags.BASELINE_PARAM_PREFIX + k: v for k, v in tuned.params.items()})
    mlflow.log_metrics({tags.BASELINE_VAL_ROC_AUC: tuned.val_roc_auc, tags.BASELINE_TUNING_TIME: tuned.seconds})
    mlflow.set_tag(tags.GATE_BASELINE_SETTINGS, ", ".join(f"{k}={v}" for k, v in tuned.params.items()))
    mlflow.log_dict({"kind": tuned.kind, "chosen": tuned.params, "grid": tuned.grid}, artifacts.BASELINE_GRID)


SKOPS_TRUSTED_TYPES = [
    "functools.partial",
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    "sklearn.utils.validation.check_array",
]


def log_baseline_model(
    model: Pipeline,
    manifest: Manifest,
    example: pd.DataFrame,
    threshold: float,
    kind: str = "hgb",
    settings: dict[str, Any] | None = None,
) -> str:
    """Log the fitted baseline into the active run (a LoggedModel; never registered), its chosen
    settings among the model's params."""
    from importlib.metadata import version

    from ringflow.training.baseline import baseline_frame

    frame = baseline_frame(example, manifest.numeric_features, manifest.categorical_features)
    libraries = ("scikit-learn", "numpy", "pandas", *(("lightgbm",) if kind == "lightgbm" else ()))
    # skops refuses types it cannot vet: the scikit-learn pipeline is logged with skops and the
    # types the fitted pipeline holds (the trees' node arrays, the encoder's checks); LightGBM's
    # booster is not a type skops knows, so that one is pickled (fitted in this process)
    serialization = (
        {"serialization_format": mlflow.sklearn.SERIALIZATION_FORMAT_CLOUDPICKLE}
        if kind == "lightgbm"
        else {"skops_trusted_types": SKOPS_TRUSTED_TYPES}
    )
    info = mlflow.sklearn.log_model(
        model,
        name="baseline",
        input_example=frame,
        # stated: inferred, the output would be model.predict's class labels (long), not what the
        # pyfunc returns (predict_proba: a probability per class)
        signature=infer_signature(frame, model.predict_proba(frame)),
        pyfunc_predict_fn="predict_proba",
        # stated, not inferred: inference imports the model in a subprocess (seconds per evaluation)
        pip_requirements=[f"{d}=={version(d).split('+')[0]}" for d in libraries],
        params={tags.DECISION_THRESHOLD: f"{threshold:.6f}", **{k: str(v) for k, v in (settings or {}).items()}},
        tags={tags.ROLE: "baseline"},
        **serialization,
    )
    return str(info.model_uri)


def test_dataset(cfg: PipelineConfig, manifest: Manifest, test: pd.DataFrame) -> PandasDataset:
    """The test window as an MLflow dataset: the file it was read from, its checksum as digest,
    named like the training run's train/validation inputs."""
    from ringflow.tasks.tracking import lineage_digest, pandas_dataset

    return pandas_dataset(
        test,
        source=str(manifest.dir / manifest.test.file),
        targets=manifest.target_column,
        name=f"{cfg.name}-{manifest.fingerprint[:12]}-test",
        digest=lineage_digest([manifest.test]),
    )


@task(name="evaluate", retries=1, retry_delay_seconds=5)
def evaluate_candidate(
    cfg: PipelineConfig, train_result: TrainResult, manifest_path: str, baseline: ScoredBaseline | None = None
) -> EvaluationResult:
    """Log the candidate as a pyfunc model; score it, the champion and the baseline on the test
    window; gate.

    ``baseline``: ``gate.baseline`` already tuned and scored by the ``baseline`` task (the flow
    runs it beside the training); without it, and with ``gate.baseline`` not ``none``, it is
    tuned here."""
    from ringflow.tasks.shard import resolve_data_key
    from ringflow.training.model import read_decision_threshold

    log = get_run_logger()
    lap = Laps("evaluate")
    mlflow.set_tracking_uri(get_settings().tracking_uri)
    client = MlflowClient()
    manifest = Manifest.load(manifest_path)
    key = resolve_data_key(cfg)
    test = manifest.read(manifest.test, key)
    y = test[manifest.target_column].to_numpy()
    # the raw columns the network reads: the features, and the timestamp when it derives calendar
    # features from it (known at prediction time)
    model_inputs = manifest.read_preprocessor().source_columns
    run_id = train_result.run_id
    if train_result.model_path is None:  # a diverged run before its first good epoch: the flow stops before this
        raise ValueError(f"training run {run_id} wrote no model: nothing to evaluate")
    window = manifest.windows["test"]
    test_window = f"[{window.start[:10]}, {window.end[:10]})"
    log.info("evaluate: %d test rows %s, candidate from run %s", len(test), test_window, run_id)
    if len(test) < cfg.gate.min_test_rows:
        log.warning(
            "evaluate: the test window %s has only %d rows (gate.min_test_rows=%d): its metrics are noisy",
            test_window,
            len(test),
            cfg.gate.min_test_rows,
        )
    lap("read the test window", "work")

    with mlflow.start_run(run_id=run_id):
        # Only the files the model needs travel with it (not the checkpoints).
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = Path(tmp) / "model"
            model_dir.mkdir()
            for f in Path(train_result.model_path).parent.iterdir():
                if f.is_file() and f.suffix in {".pt", ".json"} and f.name != SUMMARY_FILE:
                    shutil.copy2(f, model_dir / f.name)
            threshold = read_decision_threshold(model_dir)
            info = log_delay_model(model_dir, model_inputs, test.head(5))
        mlflow.log_model_params({tags.DECISION_THRESHOLD: f"{threshold:.6f}"}, model_id=info.model_id)
        lap("MLflow: log the candidate model")
        candidate_model = mlflow.pyfunc.load_model(info.model_uri)
        lap("model loading (candidate)")
        candidate_p = predict_rows(candidate_model, test)
        cand = classification_metrics(y, candidate_p, threshold)
        lap("scoring the candidate", "work")

        champ_mv = current_champion(client, cfg.registry.model_name)
        champ = champ_p = champ_threshold = None
        if champ_mv is not None:
            log.info("evaluate: scoring champion version %s on the same rows", champ_mv.version)
            # by version, not by alias again: the version scored is the one recorded as champion
            champion_model = mlflow.pyfunc.load_model(f"models:/{cfg.registry.model_name}/{champ_mv.version}")
            champ_threshold = logged_threshold(getattr(champ_mv, "model_id", None)) or 0.5
            lap("model loading (champion)")
            champ_p = predict_rows(champion_model, test[model_columns(champion_model, test.columns)])
            champ = classification_metrics(y, champ_p, champ_threshold)
            lap("scoring the champion", "work")
        else:
            lap("registry: look up the champion")

        base = base_p = base_threshold = base_uri = None
        if cfg.gate.baseline != "none":
            if baseline is None:
                baseline = score_baseline(cfg, manifest, key, log, test)
                lap("baseline: tune, fit and score", "work")
            elif baseline.test_rows != len(test):
                raise ValueError(
                    f"the baseline was scored on {baseline.test_rows} test rows, the candidate on {len(test)}: "
                    "not the same test window"
                )
            tuned, base_p, base_threshold = baseline.tuned, baseline.test_proba, baseline.threshold
            base = classification_metrics(y, base_p, base_threshold)
            log_baseline_settings(tuned)
            if baseline.final_model is not None:
                mlflow.log_param(tags.BASELINE_FINAL_FIT, "true")
            base_uri = log_baseline_model(
                baseline.model, manifest, test.head(5), base_threshold, kind=cfg.gate.baseline, settings=tuned.params
            )
            lap("MLflow: log the baseline model")

        decision = decide(cand, champ, cfg.gate, base, test_rows=len(test))
        # lineage: the test window is an input of this run, and the model's page shows what it
        # scored on which data
        test_data = test_dataset(cfg, manifest, test)
        mlflow.log_input(test_data, context="testing")
        mlflow.log_metrics(
            {f"{tags.TEST_PREFIX}{k}": v for k, v in cand.items() if not math.isnan(v)},
            model_id=info.model_id,
            dataset=test_data,
        )
        mlflow.log_metric(tags.DECISION_THRESHOLD, threshold)
        if champ:
            mlflow.log_metrics({f"{tags.CHAMPION_TEST_PREFIX}{k}": v for k, v in champ.items() if not math.isnan(v)})
        if base:
            mlflow.log_metrics({f"{tags.BASELINE_TEST_PREFIX}{k}": v for k, v in base.items() if not math.isnan(v)})
        curves = {"candidate": np.asarray(candidate_p)}
        if champ_mv is not None and champ_p is not None:
            curves[f"champion v{champ_mv.version}"] = np.asarray(champ_p)
        if base_p is not None:
            curves[f"baseline {cfg.gate.baseline}"] = base_p
        lap("MLflow: test input, metrics")
        roc, cal = roc_and_calibration_figures(y, curves)
        mlflow.log_figure(roc, artifacts.ROC_PR_CURVES)
        mlflow.log_figure(cal, artifacts.CALIBRATION_CURVE)
        lap("plots (ROC/PR, calibration), logged")
        mlflow.set_tags(
            {
                tags.GATE_DECISION_RUN: "promote" if decision.promote else "reject",
                tags.GATE_PRIMARY_METRIC: decision.primary_metric,
                tags.GATE_CHAMPION_VERSION: str(champ_mv.version) if champ_mv else "none",
                tags.GATE_BASELINE: cfg.gate.baseline,
                **{v.tag: ("PASS " if v.passed else "FAIL ") + v.reason for v in decision.verdicts},
                **({tags.GATE_WARNING: " | ".join(decision.warnings)[:5000]} if decision.warnings else {}),
            }
        )
        ev = EvaluationResult(
            training_run_id=run_id,
            model_uri=info.model_uri,
            candidate_metrics=cand,
            candidate_threshold=threshold,
            champion_version=str(champ_mv.version) if champ_mv else None,
            champion_metrics=champ,
            champion_threshold=champ_threshold,
            baseline=cfg.gate.baseline,
            baseline_metrics=base,
            baseline_threshold=base_threshold,
            baseline_model_uri=base_uri,
            test_window=test_window,
            test_rows=len(test),
            decision=decision,
            final_fit_epochs=train_result.final_fit_epochs,
            select_run_id=train_result.select_run_id,
        )
        mlflow.log_text(_decision_markdown(cfg, ev), artifacts.GATE_REPORT)
    create_markdown_artifact(
        _decision_markdown(cfg, ev), key="gate-decision", description="candidate vs champion vs baseline"
    )
    lap("MLflow tags, gate.md, gate artifact")
    log.info("evaluate: %s", decision.summary)
    return ev

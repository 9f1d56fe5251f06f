"""Evaluation stage: score the candidate and the current champion on the same test window, gate.

The gate is TFX's "blessing": the candidate is promoted only if it passes the absolute floors and
beats the champion on the primary metric by the configured margin. The verdict and a reason per
metric go to MLflow tags and to a Prefect markdown artifact.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel

from training.config import GateConfig, PipelineConfig, get_settings
from training.manifest import Manifest
from training.metrics import GREATER_IS_BETTER, classification_metrics, roc_and_calibration_figures
from training.pyfunc import log_delay_model, predict_rows

CHAMPION = "champion"


class MetricVerdict(BaseModel):
    metric: str
    candidate: float
    champion: float | None = None
    floor: float | None = None
    passed: bool
    reason: str


class GateDecision(BaseModel):
    promote: bool
    primary_metric: str
    verdicts: list[MetricVerdict]

    @property
    def summary(self) -> str:
        failed = [v.reason for v in self.verdicts if not v.passed]
        return "promote: " + "; ".join(v.reason for v in self.verdicts) if self.promote else (
            "reject: " + "; ".join(failed)
        )


class EvaluationResult(BaseModel):
    training_run_id: str
    model_uri: str
    """The logged pyfunc model that was scored (and will be registered)."""
    candidate_metrics: dict[str, float]
    champion_version: str | None = None
    champion_metrics: dict[str, float] | None = None
    decision: GateDecision


def decide(candidate: dict[str, float], champion: dict[str, float] | None, gate: GateConfig) -> GateDecision:
    """Pure gate: floors first, then the primary metric against the champion (if there is one).

    "Beats" is strict: a candidate equal to the champion is not promoted, so re-running the same
    config does not churn the alias.
    """
    verdicts = []
    for metric, floor in gate.floors.items():
        value = candidate.get(metric, math.nan)
        higher = GREATER_IS_BETTER.get(metric, True)
        ok = (value >= floor) if higher else (value <= floor)
        op = ">=" if higher else "<="
        verdicts.append(MetricVerdict(
            metric=metric, candidate=value, floor=floor, passed=bool(ok),
            reason=f"{metric} {value:.4f} {op} floor {floor}" if ok else f"{metric} {value:.4f} fails floor {op} {floor}",
        ))
    m = gate.primary_metric
    value = candidate.get(m, math.nan)
    if champion is None:
        verdicts.append(MetricVerdict(metric=m, candidate=value, passed=True, reason=f"no champion yet: {m} {value:.4f}"))
    else:
        best = champion.get(m, math.nan)
        higher = GREATER_IS_BETTER[m]
        delta = (value - best) if higher else (best - value)
        ok = delta > gate.min_improvement if gate.min_improvement == 0 else delta >= gate.min_improvement
        verdicts.append(MetricVerdict(
            metric=m, candidate=value, champion=best, passed=bool(ok),
            reason=(f"{m} {value:.4f} vs champion {best:.4f} ({delta:+.4f}, needs "
                    f"{'>' if gate.min_improvement == 0 else '>='} {gate.min_improvement})"),
        ))
    return GateDecision(promote=all(v.passed for v in verdicts), primary_metric=m, verdicts=verdicts)


# What the registry answers for "no such model" and "no such alias" (store and REST alike).
_NOT_FOUND = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}


def version_by_alias(client: MlflowClient, name: str, alias: str):
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


def current_champion(client: MlflowClient, name: str):
    """The model version behind ``@champion``, or None before the first promotion."""
    return version_by_alias(client, name, CHAMPION)


def _decision_markdown(cfg: PipelineConfig, ev: EvaluationResult) -> str:
    d = ev.decision
    rows = ["| metric | candidate | champion |", "|---|---|---|"]
    for k in ["roc_auc", "pr_auc", "log_loss", "accuracy", "f1", "brier"]:
        champ = ev.champion_metrics.get(k) if ev.champion_metrics else None
        rows.append(f"| {k} | {ev.candidate_metrics[k]:.4f} | {'-' if champ is None else f'{champ:.4f}'} |")
    reasons = "\n".join(f"- {'PASS' if v.passed else 'FAIL'}: {v.reason}" for v in d.verdicts)
    champion = f"version {ev.champion_version}" if ev.champion_version else "none yet"
    return (
        f"## Gate: {'PROMOTE' if d.promote else 'REJECT'} candidate of `{cfg.registry.model_name}`\n\n"
        f"Training run `{ev.training_run_id}`; current champion: {champion}; "
        f"primary metric `{d.primary_metric}`, margin {cfg.gate.min_improvement}.\n\n"
        + "\n".join(rows) + "\n\n### Reasons\n" + reasons + "\n"
    )


def test_dataset(cfg: PipelineConfig, manifest: Manifest, test):
    """The test window as an MLflow dataset: the file it was read from, its checksum as digest,
    named like the training run's train/validation inputs."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # MLflow's note on its source registry
        return mlflow.data.from_pandas(
            test, source=str(manifest.dir / manifest.test.file), targets=manifest.target_column,
            name=f"{cfg.name}-{manifest.fingerprint[:12]}-test", digest=manifest.test.sha256[:16],
        )


@task(name="evaluate", retries=1, retry_delay_seconds=5)
def evaluate_candidate(cfg: PipelineConfig, train_result, manifest_path: str) -> EvaluationResult:
    """Log the candidate as a pyfunc model, score it and the champion on the test window, gate."""
    from tasks.shard import resolve_data_key

    log = get_run_logger()
    mlflow.set_tracking_uri(get_settings().tracking_uri)
    client = MlflowClient()
    manifest = Manifest.load(manifest_path)
    test = manifest.read(manifest.test, resolve_data_key(cfg))
    y = test[manifest.target_column].to_numpy()
    features = manifest.numeric_features + manifest.categorical_features
    run_id = train_result.run_id
    log.info("evaluate: %d test rows %s, candidate from run %s", len(test), manifest.windows["test"], run_id)

    with mlflow.start_run(run_id=run_id):
        # Only the files the model needs travel with it (not the checkpoints).
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = Path(tmp) / "model"
            model_dir.mkdir()
            for f in Path(train_result.model_path).parent.iterdir():
                if f.is_file() and f.suffix in {".pt", ".json"} and f.name != "summary.json":
                    shutil.copy2(f, model_dir / f.name)
            info = log_delay_model(model_dir, features, test.head(5))
        candidate_p = predict_rows(mlflow.pyfunc.load_model(info.model_uri), test)
        cand = classification_metrics(y, candidate_p)

        champ_mv = current_champion(client, cfg.registry.model_name)
        champ = champ_p = None
        if champ_mv is not None:
            log.info("evaluate: scoring champion version %s on the same rows", champ_mv.version)
            # by version, not by alias again: the version scored is the one recorded as champion
            champion_model = mlflow.pyfunc.load_model(f"models:/{cfg.registry.model_name}/{champ_mv.version}")
            # the champion may have been trained on other features: it is given the columns it declares
            champ_p = predict_rows(champion_model, test)
            champ = classification_metrics(y, champ_p)

        decision = decide(cand, champ, cfg.gate)
        # lineage: the test window is an input of this run, and the model's page shows what it
        # scored on which data
        test_data = test_dataset(cfg, manifest, test)
        mlflow.log_input(test_data, context="testing")
        mlflow.log_metrics({f"test_{k}": v for k, v in cand.items() if not math.isnan(v)},
                           model_id=info.model_id, dataset=test_data)
        if champ:
            mlflow.log_metrics({f"champion_test_{k}": v for k, v in champ.items() if not math.isnan(v)})
        curves = {"candidate": np.asarray(candidate_p)}
        if champ_p is not None:
            curves[f"champion v{champ_mv.version}"] = np.asarray(champ_p)
        roc, cal = roc_and_calibration_figures(y, curves)
        mlflow.log_figure(roc, "evaluation/roc_curve.png")
        mlflow.log_figure(cal, "evaluation/calibration_curve.png")
        mlflow.set_tags({
            "gate.decision": "promote" if decision.promote else "reject",
            "gate.primary_metric": decision.primary_metric,
            "gate.champion_version": str(champ_mv.version) if champ_mv else "none",
            **{f"gate.reason.{v.metric}": ("PASS " if v.passed else "FAIL ") + v.reason for v in decision.verdicts},
        })
        ev = EvaluationResult(
            training_run_id=run_id, model_uri=info.model_uri, candidate_metrics=cand,
            champion_version=str(champ_mv.version) if champ_mv else None, champion_metrics=champ, decision=decision,
        )
        mlflow.log_text(_decision_markdown(cfg, ev), "evaluation/gate.md")
    create_markdown_artifact(_decision_markdown(cfg, ev), key="gate-decision", description="champion vs challenger")
    log.info("evaluate: %s", decision.summary)
    return ev

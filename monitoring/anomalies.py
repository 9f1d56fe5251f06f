"""Typed anomaly rules: observations in, :class:`Anomaly` objects out.

Each rule is a small frozen dataclass with its thresholds (taken from ``MonitoringConfig`` by
:func:`default_rules`) and one ``check(observation) -> list[Anomaly]`` method, so every rule can
be built and tested alone. Rules combine with ``+`` into a :class:`RuleSet`.

An anomaly's ``id`` is a hash of its type and its *key* evidence (model version, batch, column
names, training run, rank), never of the time or of float values: monitoring the same batch
twice yields the same id, which is what de-duplicates reruns.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import statistics
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

import numpy as np
from numpy.typing import ArrayLike
from pydantic import BaseModel, Field, computed_field

from ringflow.training.config import MonitoringConfig
from ringflow.training.summary import RankThroughput


class AnomalyType(str, Enum):
    PERFORMANCE_DROP = "performance_drop"
    DATA_DRIFT = "data_drift"
    PREDICTION_SHIFT = "prediction_shift"
    MISSING_VALUES = "missing_values"
    UNSEEN_CATEGORIES = "unseen_categories"
    SCHEMA_CHANGE = "schema_change"
    TRAINING_DIVERGED = "training_diverged"
    STRAGGLER = "straggler"
    THROUGHPUT_DROP = "throughput_drop"
    TRAINING_FAILED = "training_failed"


class Severity(str, Enum):
    WARNING = "warning"
    CRITICAL = "critical"


def anomaly_id(type_: AnomalyType | str, key: dict[str, Any]) -> str:
    """Stable id: sha256 of the type and the key evidence (sorted JSON), 16 hex digits."""
    t = type_.value if isinstance(type_, AnomalyType) else str(type_)
    blob = json.dumps({"type": t, "key": key}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Anomaly(BaseModel):
    type: AnomalyType
    severity: Severity
    message: str
    evidence: dict[str, Any]
    """Everything a person needs to judge it (numbers, thresholds, columns)."""
    key: dict[str, Any]
    """The part of the evidence that identifies it (hashed into ``id``)."""
    detected_at: dt.datetime = Field(default_factory=lambda: dt.datetime.now(dt.UTC))

    @computed_field  # type: ignore[prop-decorator]
    @property
    def id(self) -> str:
        return anomaly_id(self.type, self.key)


# --------------------------------------------------------------------------- observations


class SchemaDiff(BaseModel):
    missing: list[str] = []
    extra: list[str] = []
    dtype_changed: dict[str, dict[str, str]] = {}
    """column -> {"expected": kind, "actual": kind}."""

    @property
    def empty(self) -> bool:
        return not (self.missing or self.extra or self.dtype_changed)


RankStats = RankThroughput
"""A rank's speed, as the training summary records it (one declaration: training/summary.py)."""


class TrainingObservation(BaseModel):
    """The last training run of this model, as the flow read it from MLflow."""

    run_id: str
    status: str
    """``completed`` / ``early_stopped`` / ``diverged`` (summary.json) or ``failed`` (MLflow FAILED)."""
    world_size: int
    per_rank: list[RankStats] = []
    previous_run_id: str | None = None
    previous_samples_per_s: float | None = None
    """Total throughput of the previous completed run at the same world size."""
    consecutive_failures: int = 0
    """Failed runs in a row at ``world_size``, newest first, including this one."""
    checkpoint_dir: str | None = None
    """Last good checkpoint (resume point after divergence); None = unknown."""
    config: dict[str, Any] | None = None
    """The run's ``config/pipeline_config.json`` (base of a rerun that fixes this run)."""

    @property
    def samples_per_s(self) -> float:
        return float(sum(r.samples_per_s for r in self.per_rank))


class MonitoringObservation(BaseModel):
    """Everything the rules look at for one batch (numbers computed on the full batch)."""

    model_name: str
    model_version: str
    batch: str
    """Stable batch identity: the month (``2013-07``) or the file path + content hash."""
    rows: int = 0
    roc_auc: float | None = None
    """Champion AUC on the batch; None when the batch has no labels (or one class)."""
    reference_roc_auc: float | None = None
    """The champion's own test-window AUC (model version tag ``test_roc_auc``)."""
    drifted_share: float | None = None
    drifted_columns: list[str] = []
    prediction_psi: float | None = None
    missing_share: dict[str, float] = {}
    reference_missing_share: dict[str, float] = {}
    unseen_share: dict[str, float] = {}
    schema_changes: SchemaDiff = SchemaDiff()
    training: TrainingObservation | None = None


# --------------------------------------------------------------------------- pure helpers


def psi(reference: ArrayLike, current: ArrayLike, bins: int = 10, eps: float = 1e-4) -> float:
    """Population stability index of ``current`` against ``reference`` (quantile bins of the
    reference; empty bins smoothed with ``eps``). 0.1 = small shift, 0.2+ = a real shift."""
    ref = np.asarray(reference, dtype=np.float64).ravel()
    cur = np.asarray(current, dtype=np.float64).ravel()
    ref, cur = ref[~np.isnan(ref)], cur[~np.isnan(cur)]
    if len(ref) == 0 or len(cur) == 0:
        raise ValueError(f"PSI needs values on both sides (reference {len(ref)}, current {len(cur)})")
    edges = np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1)))
    if len(edges) < 2:  # constant reference: one bin holding it, one for everything else
        edges = np.array([edges[0], np.nextafter(edges[0], np.inf)])
    edges[0], edges[-1] = -np.inf, np.inf
    r = np.histogram(ref, edges)[0] / len(ref)
    c = np.histogram(cur, edges)[0] / len(cur)
    r, c = np.clip(r, eps, None), np.clip(c, eps, None)
    return float(np.sum((c - r) * np.log(c / r)))


def dtype_kind(dtype: object) -> str:
    """Coarse dtype class for schema checks: int vs float is not a schema change."""
    s = str(dtype).lower()
    if "datetime" in s:
        return "datetime"
    if s.startswith(("int", "uint", "float")) or s in {"int8", "int16", "int32", "int64", "float64"}:
        return "numeric"
    if "bool" in s:
        return "bool"
    return "string"


def schema_diff(actual: dict[str, Any], expected: dict[str, Any], required: list[str] | None = None) -> SchemaDiff:
    """Compare column -> dtype maps. ``required``: the columns whose absence matters (default:
    all of ``expected``); ``extra`` lists columns ``expected`` does not know."""
    required = list(expected) if required is None else required

    def compatible(exp: str, act: str) -> bool:
        # CSV carries timestamps as text; unparseable ones fail the data contract separately
        return exp == act or (exp == "datetime" and act == "string")

    changed = {
        c: {"expected": dtype_kind(expected[c]), "actual": dtype_kind(actual[c])}
        for c in expected
        if c in actual and not compatible(dtype_kind(expected[c]), dtype_kind(actual[c]))
    }
    return SchemaDiff(
        missing=[c for c in required if c not in actual],
        extra=sorted(c for c in actual if c not in expected),
        dtype_changed=changed,
    )


# --------------------------------------------------------------------------- rules


class Rule(Protocol):
    def check(self, obs: MonitoringObservation) -> list[Anomaly]: ...


def _batch_key(obs: MonitoringObservation, **more: object) -> dict[str, Any]:
    return {"model": obs.model_name, "version": obs.model_version, "batch": obs.batch, **more}


@dataclass(frozen=True)
class PerformanceDropRule:
    """AUC on the batch below the champion's own test AUC by ``abs_drop`` (or ``rel_drop``)."""

    abs_drop: float = 0.03
    rel_drop: float | None = None

    def check(self, obs: MonitoringObservation) -> list[Anomaly]:
        if obs.roc_auc is None or obs.reference_roc_auc is None or math.isnan(obs.roc_auc):
            return []
        drop = obs.reference_roc_auc - obs.roc_auc
        rel = drop / obs.reference_roc_auc if obs.reference_roc_auc > 0 else 0.0
        by_abs = drop > self.abs_drop
        by_rel = self.rel_drop is not None and rel > self.rel_drop
        if not (by_abs or by_rel):
            return []
        return [
            Anomaly(
                type=AnomalyType.PERFORMANCE_DROP,
                severity=Severity.CRITICAL if drop > 2 * self.abs_drop else Severity.WARNING,
                message=f"ROC AUC {obs.roc_auc:.4f} on {obs.batch} is {drop:.4f} below the champion's "
                f"test AUC {obs.reference_roc_auc:.4f}",
                evidence={
                    "roc_auc": obs.roc_auc,
                    "reference_roc_auc": obs.reference_roc_auc,
                    "drop_abs": drop,
                    "drop_rel": rel,
                    "threshold_abs": self.abs_drop,
                    "threshold_rel": self.rel_drop,
                    "rows": obs.rows,
                },
                key=_batch_key(obs),
            )
        ]


@dataclass(frozen=True)
class DriftShareRule:
    """At least ``drift_share`` of the feature columns drifted (Evidently's per-column tests)."""

    drift_share: float = 0.5

    def check(self, obs: MonitoringObservation) -> list[Anomaly]:
        if obs.drifted_share is None or obs.drifted_share < self.drift_share:
            return []
        return [
            Anomaly(
                type=AnomalyType.DATA_DRIFT,
                severity=Severity.CRITICAL
                if obs.drifted_share >= min(1.0, 1.5 * self.drift_share)
                else Severity.WARNING,
                message=f"{obs.drifted_share:.0%} of features drifted on {obs.batch} "
                f"(threshold {self.drift_share:.0%}): {', '.join(obs.drifted_columns)}",
                evidence={
                    "drifted_share": obs.drifted_share,
                    "drifted_columns": obs.drifted_columns,
                    "threshold": self.drift_share,
                },
                key=_batch_key(obs, columns=sorted(obs.drifted_columns)),
            )
        ]


@dataclass(frozen=True)
class PredictionShiftRule:
    """PSI of the predicted probabilities (batch vs reference) above ``max_psi``."""

    max_psi: float = 0.2

    def check(self, obs: MonitoringObservation) -> list[Anomaly]:
        if obs.prediction_psi is None or obs.prediction_psi <= self.max_psi:
            return []
        return [
            Anomaly(
                type=AnomalyType.PREDICTION_SHIFT,
                severity=Severity.CRITICAL if obs.prediction_psi > 2 * self.max_psi else Severity.WARNING,
                message=f"prediction PSI {obs.prediction_psi:.3f} on {obs.batch} exceeds {self.max_psi}",
                evidence={"psi": obs.prediction_psi, "threshold": self.max_psi},
                key=_batch_key(obs),
            )
        ]


@dataclass(frozen=True)
class MissingValuesRule:
    """A column's missing share rose by more than ``max_increase`` over the reference.

    Relative, not absolute: flights' ``wind_gust`` is ~75% missing in every month, and that is
    the data, not an incident. Without a reference share the absolute share is compared.
    """

    max_increase: float = 0.2

    def check(self, obs: MonitoringObservation) -> list[Anomaly]:
        bad = {
            c: {"batch": s, "reference": obs.reference_missing_share.get(c, 0.0)}
            for c, s in obs.missing_share.items()
            if s - obs.reference_missing_share.get(c, 0.0) > self.max_increase
        }
        if not bad:
            return []
        return [
            Anomaly(
                type=AnomalyType.MISSING_VALUES,
                severity=Severity.WARNING,
                message=f"missing values rose by more than {self.max_increase:.0%} in {sorted(bad)} on {obs.batch}",
                evidence={"columns": bad, "threshold": self.max_increase},
                key=_batch_key(obs, columns=sorted(bad)),
            )
        ]


@dataclass(frozen=True)
class UnseenCategoriesRule:
    """Share of categorical values outside the champion's training vocabulary above ``max_share``."""

    max_share: float = 0.05

    def check(self, obs: MonitoringObservation) -> list[Anomaly]:
        bad = {c: s for c, s in obs.unseen_share.items() if s > self.max_share}
        if not bad:
            return []
        return [
            Anomaly(
                type=AnomalyType.UNSEEN_CATEGORIES,
                severity=Severity.WARNING,
                message=f"unseen categories above {self.max_share:.0%} on {obs.batch}: "
                + ", ".join(f"{c}={s:.1%}" for c, s in sorted(bad.items())),
                evidence={"unseen_share": bad, "threshold": self.max_share},
                key=_batch_key(obs, columns=sorted(bad)),
            )
        ]


@dataclass(frozen=True)
class SchemaChangeRule:
    """Missing or dtype-changed columns versus the champion's training data.

    Extra columns alone are quiet by default: the model contract ignores them, and a source with
    more columns than the shards keep would otherwise alert on every batch. They are listed in
    the evidence (a rename shows as missing + extra); ``flag_extra=True`` makes them fire alone.
    """

    flag_extra: bool = False

    def check(self, obs: MonitoringObservation) -> list[Anomaly]:
        s = obs.schema_changes
        if not (s.missing or s.dtype_changed or (self.flag_extra and s.extra)):
            return []
        return [
            Anomaly(
                type=AnomalyType.SCHEMA_CHANGE,
                severity=Severity.CRITICAL if (s.missing or s.dtype_changed) else Severity.WARNING,
                message=f"schema of {obs.batch} changed: missing {s.missing}, extra {s.extra}, "
                f"dtype changed {sorted(s.dtype_changed)}",
                evidence={"missing": s.missing, "extra": s.extra, "dtype_changed": s.dtype_changed},
                key=_batch_key(obs, missing=s.missing, extra=s.extra, changed=sorted(s.dtype_changed)),
            )
        ]


@dataclass(frozen=True)
class DivergedRule:
    """The last training run diverged (NaN/exploding loss; summary status ``diverged``)."""

    def check(self, obs: MonitoringObservation) -> list[Anomaly]:
        t = obs.training
        if t is None or t.status != "diverged":
            return []
        return [
            Anomaly(
                type=AnomalyType.TRAINING_DIVERGED,
                severity=Severity.CRITICAL,
                message=f"training run {t.run_id} diverged",
                evidence={"run_id": t.run_id, "world_size": t.world_size, "checkpoint_dir": t.checkpoint_dir},
                key={"run_id": t.run_id},
            )
        ]


@dataclass(frozen=True)
class StragglerRule:
    """A rank whose step time exceeds ``factor`` x the median of the *other* ranks.

    Leave-one-out: with the default 2 ranks the plain median is the mean of both, and a rank
    would need 3x the other's step time to exceed 1.5x it.
    """

    factor: float = 1.5

    def check(self, obs: MonitoringObservation) -> list[Anomaly]:
        t = obs.training
        if t is None or len(t.per_rank) < 2:
            return []

        ranks = t.per_rank

        def others_median(r: RankStats) -> float:
            return statistics.median(o.step_time_ms for o in ranks if o is not r)

        slow = [r for r in t.per_rank if others_median(r) > 0 and r.step_time_ms > self.factor * others_median(r)]
        median = statistics.median(r.step_time_ms for r in t.per_rank)
        if not slow:
            return []
        return [
            Anomaly(
                type=AnomalyType.STRAGGLER,
                severity=Severity.WARNING,
                message=f"training run {t.run_id}: rank(s) {[r.rank for r in slow]} step time above "
                f"{self.factor}x the median {median:.1f} ms",
                evidence={
                    "run_id": t.run_id,
                    "median_step_time_ms": median,
                    "factor": self.factor,
                    "slow_ranks": [r.model_dump() for r in slow],
                    "per_rank": [r.model_dump() for r in t.per_rank],
                },
                key={"run_id": t.run_id, "ranks": sorted(r.rank for r in slow)},
            )
        ]


@dataclass(frozen=True)
class ThroughputDropRule:
    """Total samples/s below ``min_ratio`` x the previous run's at the same world size."""

    min_ratio: float = 0.5

    def check(self, obs: MonitoringObservation) -> list[Anomaly]:
        t = obs.training
        if t is None or not t.per_rank or not t.previous_samples_per_s:
            return []
        ratio = t.samples_per_s / t.previous_samples_per_s
        if ratio >= self.min_ratio:
            return []
        return [
            Anomaly(
                type=AnomalyType.THROUGHPUT_DROP,
                severity=Severity.WARNING,
                message=f"training run {t.run_id}: {t.samples_per_s:.0f} samples/s is {ratio:.0%} of the "
                f"previous run's {t.previous_samples_per_s:.0f}",
                evidence={
                    "run_id": t.run_id,
                    "samples_per_s": t.samples_per_s,
                    "previous_run_id": t.previous_run_id,
                    "previous_samples_per_s": t.previous_samples_per_s,
                    "ratio": ratio,
                    "threshold": self.min_ratio,
                },
                key={"run_id": t.run_id, "previous_run_id": t.previous_run_id},
            )
        ]


@dataclass(frozen=True)
class RepeatedFailureRule:
    """``min_failures`` training runs in a row failed at the same world size."""

    min_failures: int = 2

    def check(self, obs: MonitoringObservation) -> list[Anomaly]:
        t = obs.training
        if t is None or t.status != "failed" or t.consecutive_failures < self.min_failures:
            return []
        return [
            Anomaly(
                type=AnomalyType.TRAINING_FAILED,
                severity=Severity.CRITICAL,
                message=f"{t.consecutive_failures} training runs in a row failed at world_size={t.world_size}",
                evidence={
                    "run_id": t.run_id,
                    "world_size": t.world_size,
                    "consecutive_failures": t.consecutive_failures,
                },
                key={"run_id": t.run_id, "world_size": t.world_size},
            )
        ]


@dataclass(frozen=True)
class RuleSet:
    """Rules applied together; ``rule_a + rule_b`` and ``ruleset + rule`` build one."""

    rules: tuple[Rule, ...] = field(default_factory=tuple)

    def __add__(self, other: Rule) -> RuleSet:
        more = other.rules if isinstance(other, RuleSet) else (other,)
        return RuleSet(self.rules + more)

    def check(self, obs: MonitoringObservation) -> list[Anomaly]:
        """All anomalies, de-duplicated by id, in rule order."""
        seen: dict[str, Anomaly] = {}
        for rule in self.rules:
            for a in rule.check(obs):
                seen.setdefault(a.id, a)
        return list(seen.values())


def default_rules(m: MonitoringConfig) -> RuleSet:
    """Every rule, thresholds from the config."""
    return RuleSet(
        (
            SchemaChangeRule(),
            PerformanceDropRule(abs_drop=m.performance_drop_abs, rel_drop=m.performance_drop_rel),
            DriftShareRule(drift_share=m.drift_share),
            PredictionShiftRule(max_psi=m.prediction_psi),
            MissingValuesRule(max_increase=m.max_missing_share),
            UnseenCategoriesRule(max_share=m.max_unseen_category_share),
            DivergedRule(),
            StragglerRule(factor=m.straggler_factor),
            ThroughputDropRule(min_ratio=m.throughput_drop),
            RepeatedFailureRule(),
        )
    )

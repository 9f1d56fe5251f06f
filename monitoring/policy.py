"""Rerun policy: anomalies + history -> one :class:`RerunPlan` (or none), with reasons.

Pure functions over typed inputs; the flow reads the history from MLflow (monitoring runs tagged
``ringflow.rerun_triggered=true``, see :meth:`RerunRecord.to_tags`) and passes it in.

Remedies per anomaly type:

- performance drop, data drift, prediction shift, unseen categories -> retrain on the most
  recent labelled data: the windows keep their lengths and slide forward so the test window ends
  where the newest labelled data ends (the batch's end when it has labels, else its start);
- training diverged -> learning rate x ``rerun_lr_factor`` and resume from the last good
  checkpoint (the run id when the directory is unknown);
- straggler -> ``sharding.weights`` proportional to each rank's measured samples/s;
- repeated failure at N workers -> ``training.world_size = N - 1``;
- missing values, schema change, throughput drop -> alert only: the data or the machine needs a
  person, and a retrain would learn from broken rows.

Guard rails, in order: an anomaly id that a past rerun already handled is dropped
(de-duplication), an anomaly type with a rerun inside ``cooldown_hours`` is dropped (cooldown),
and no plan is made once ``max_reruns_per_period`` reruns happened in ``period_hours``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from ringflow.monitoring.anomalies import Anomaly, AnomalyType, Severity, TrainingObservation
from ringflow.training import tags
from ringflow.training.config import ConfigError, PipelineConfig, Window, Windows, with_overrides

if TYPE_CHECKING:
    import pandas as pd

RETRAIN_RECENT = {
    AnomalyType.PERFORMANCE_DROP,
    AnomalyType.DATA_DRIFT,
    AnomalyType.PREDICTION_SHIFT,
    AnomalyType.UNSEEN_CATEGORIES,
}
TRAINING_FIXES = {AnomalyType.TRAINING_DIVERGED, AnomalyType.STRAGGLER, AnomalyType.TRAINING_FAILED}
ALERT_ONLY = {AnomalyType.MISSING_VALUES, AnomalyType.SCHEMA_CHANGE, AnomalyType.THROUGHPUT_DROP}

TAG_TRIGGERED = tags.RERUN_TRIGGERED
TAG_ANOMALY_IDS = tags.ANOMALY_IDS
TAG_ANOMALY_TYPES = tags.ANOMALY_TYPES
TAG_REASON = tags.RERUN_REASON


class BatchWindow(BaseModel):
    """Dates the monitored batch covers, [start, end), and whether it carried labels."""

    start: dt.date
    end: dt.date
    labelled: bool


class RerunRecord(BaseModel):
    """One past rerun, as stored on the monitoring run that triggered it."""

    time: dt.datetime
    monitoring_run_id: str | None = None
    anomaly_ids: list[str] = []
    anomaly_types: list[str] = []
    reason: str = ""

    def to_tags(self) -> dict[str, str]:
        return {
            TAG_TRIGGERED: "true",
            TAG_ANOMALY_IDS: ",".join(self.anomaly_ids),
            TAG_ANOMALY_TYPES: ",".join(self.anomaly_types),
            TAG_REASON: self.reason[:5000],
        }

    @classmethod
    def from_tags(cls, run_tags: dict[str, str], time: dt.datetime, run_id: str | None = None) -> RerunRecord:
        def split(v: str | None) -> list[str]:
            return [x for x in (v or "").split(",") if x]

        return cls(
            time=time,
            monitoring_run_id=run_id,
            anomaly_ids=split(run_tags.get(TAG_ANOMALY_IDS)),
            anomaly_types=split(run_tags.get(TAG_ANOMALY_TYPES)),
            reason=run_tags.get(TAG_REASON, ""),
        )


class RerunPlan(BaseModel):
    overrides: dict[str, Any]
    """Dotted config keys changed from the base config (what a person reviews)."""
    config: PipelineConfig
    """The full, validated config of the rerun (base + overrides)."""
    reason: str
    anomaly_id: str
    """The primary anomaly (most severe); all of them are in ``anomaly_ids``."""
    anomaly_ids: list[str]
    anomaly_types: list[str]
    notes: list[str] = []


class PolicyDecision(BaseModel):
    plan: RerunPlan | None = None
    suppressed: dict[str, str] = {}
    """anomaly id -> why it does not cause a rerun (duplicate, cooldown, budget, no remedy)."""
    alerts: list[str] = []
    """Ids of alert-only anomalies (reported, never rerun)."""

    def summary(self) -> str:
        if self.plan is not None:
            return f"rerun: {self.plan.reason}; overrides {self.plan.overrides}"
        if self.suppressed:
            return "no rerun: " + "; ".join(sorted(set(self.suppressed.values())))
        return "no rerun: no actionable anomaly"


# --------------------------------------------------------------------------- remedies


def recent_windows(w: Windows, newest_end: dt.date) -> Windows:
    """The same three window lengths, contiguous, slid so the test window ends at ``newest_end``."""
    test_len = w.test.end - w.test.start
    val_len = w.validation.end - w.validation.start
    train_len = w.train.end - w.train.start
    test = Window(start=newest_end - test_len, end=newest_end)
    validation = Window(start=test.start - val_len, end=test.start)
    return Windows(
        train=Window(start=validation.start - train_len, end=validation.start), validation=validation, test=test
    )


def window_overrides(cfg: PipelineConfig, batch: BatchWindow) -> tuple[dict[str, Any], str | None]:
    """Overrides that retrain on data up to the batch, or (``{}``, why not)."""
    newest_end = batch.end if batch.labelled else batch.start
    current = cfg.data.windows
    if newest_end <= current.test.end:
        return {}, (
            f"batch [{batch.start}, {batch.end}) brings no labelled data after the champion's "
            f"test window {current.test}: retraining on it would not move the windows"
        )
    w = recent_windows(current, newest_end)
    return {
        "data.windows.train": w.train.model_dump(mode="json"),
        "data.windows.validation": w.validation.model_dump(mode="json"),
        "data.windows.test": w.test.model_dump(mode="json"),
        # a checkpoint's embeddings are sized by the old window's vocabulary: start fresh
        **({"training.resume_from": None} if cfg.training.resume_from else {}),
    }, None


def diverged_overrides(cfg: PipelineConfig, t: TrainingObservation, lr_factor: float) -> dict[str, Any]:
    return {
        "training.learning_rate": cfg.training.learning_rate * lr_factor,
        # config doc: resume_from takes a checkpoint dir or an MLflow run id
        "training.resume_from": t.checkpoint_dir or t.run_id,
    }


def straggler_overrides(t: TrainingObservation) -> dict[str, Any]:
    """One shard per rank, sized by the rank's measured samples/s (mean weight 1)."""
    ranks = sorted(t.per_rank, key=lambda r: r.rank)
    total = sum(r.samples_per_s for r in ranks)
    weights = [round(len(ranks) * r.samples_per_s / total, 4) for r in ranks]
    return {"sharding.num_shards": len(ranks), "sharding.weights": weights}


def failure_overrides(cfg: PipelineConfig, t: TrainingObservation) -> dict[str, Any] | None:
    n = t.world_size
    if n <= 1:
        return None
    out: dict[str, Any] = {"training.world_size": n - 1}
    if cfg.sharding.num_shards is None and cfg.sharding.weights is not None:
        out["sharding.weights"] = None  # one weight per shard = per rank: the old list no longer fits
    if cfg.training.elastic.min_np > n - 1:
        out["training.elastic.min_np"] = n - 1
    return out


# --------------------------------------------------------------------------- the policy


def _severity_rank(a: Anomaly) -> int:
    return 0 if a.severity == Severity.CRITICAL else 1


def decide(
    anomalies: list[Anomaly],
    base_config: PipelineConfig,
    *,
    history: Sequence[RerunRecord] = (),
    now: dt.datetime | None = None,
    batch: BatchWindow | None = None,
    training: TrainingObservation | None = None,
    model_label: str = "",
) -> PolicyDecision:
    """Map anomalies to at most one rerun plan, applying de-duplication, cooldown and budget.

    ``base_config`` is the champion's training config; fixes of a training run (divergence,
    straggler, failures) start from that run's own config when ``training.config`` is known.
    """
    now = now or dt.datetime.now(dt.UTC)
    m = base_config.monitoring
    decision = PolicyDecision()
    handled = {i: r for r in history for i in r.anomaly_ids}
    cooldown_from = now - dt.timedelta(hours=m.cooldown_hours)
    period_from = now - dt.timedelta(hours=m.period_hours)
    recent_types = {t: r for r in history if r.time >= cooldown_from for t in r.anomaly_types}
    in_period = [r for r in history if r.time >= period_from]

    actionable: list[Anomaly] = []
    for a in sorted(anomalies, key=_severity_rank):
        if a.type in ALERT_ONLY:
            decision.alerts.append(a.id)
            decision.suppressed[a.id] = f"{a.type.value} is alert-only (needs a person, not a retrain)"
        elif a.id in handled:
            r = handled[a.id]
            decision.suppressed[a.id] = (
                f"duplicate: {a.type.value} {a.id} already triggered a rerun at "
                f"{r.time.isoformat(timespec='seconds')} (monitoring run {r.monitoring_run_id})"
            )
        elif a.type.value in recent_types:
            r = recent_types[a.type.value]
            decision.suppressed[a.id] = (
                f"cooldown: a rerun for {a.type.value} was triggered at "
                f"{r.time.isoformat(timespec='seconds')} (< {m.cooldown_hours:g} h ago)"
            )
        else:
            actionable.append(a)
    if actionable and len(in_period) >= m.max_reruns_per_period:
        for a in actionable:
            decision.suppressed[a.id] = (
                f"budget: {len(in_period)} reruns in the last {m.period_hours:g} h (max {m.max_reruns_per_period})"
            )
        return decision
    if not actionable:
        return decision

    types = {a.type for a in actionable}
    run_config = training.config if training is not None and types & TRAINING_FIXES else None
    base = PipelineConfig.model_validate(run_config) if run_config else base_config
    overrides: dict[str, Any] = {}
    notes: list[str] = []
    used: list[Anomaly] = []

    for a in actionable:
        if a.type in RETRAIN_RECENT:
            if "data.windows.test" in overrides:
                used.append(a)
                continue
            if batch is None:
                decision.suppressed[a.id] = "no batch window known: cannot choose recent training data"
                continue
            o, why = window_overrides(base, batch)
            if why:
                decision.suppressed[a.id] = why
                continue
            overrides.update(o)
            used.append(a)
        elif a.type == AnomalyType.TRAINING_DIVERGED and training is not None:
            overrides.update(diverged_overrides(base, training, m.rerun_lr_factor))
            used.append(a)
        elif a.type == AnomalyType.STRAGGLER and training is not None and training.per_rank:
            overrides.update(straggler_overrides(training))
            used.append(a)
        elif a.type == AnomalyType.TRAINING_FAILED and training is not None:
            smaller = failure_overrides(base, training)
            if smaller is None:
                decision.suppressed[a.id] = "training failed at world_size 1: nothing smaller to try"
                continue
            overrides.update(smaller)
            used.append(a)
        else:
            decision.suppressed[a.id] = f"{a.type.value}: no remedy without training-run details"

    if "data.windows.test" in overrides and overrides.get("training.resume_from"):
        # A checkpoint holds embeddings sized by the old window's vocabulary; start fresh.
        overrides["training.resume_from"] = None
        notes.append("not resuming from the diverged run's checkpoint: the training window moves")
    if (
        "training.world_size" in overrides
        and "sharding.weights" in overrides
        and len(overrides["sharding.weights"] or []) != overrides["training.world_size"]
    ):
        overrides["sharding.weights"] = None
        overrides.pop("sharding.num_shards", None)
        notes.append("straggler weights dropped: the world size shrinks after repeated failures")
    if not used:
        return decision
    try:
        config = with_overrides(base, overrides)
    except ConfigError as e:  # a remedy must never produce a config the pipeline rejects
        for a in used:
            decision.suppressed[a.id] = f"the adapted config is invalid: {e}"
        return decision

    names = ", ".join(dict.fromkeys(a.type.value for a in used))
    where = f" on {batch.start}..{batch.end}" if batch and types & RETRAIN_RECENT else ""
    decision.plan = RerunPlan(
        overrides=overrides,
        config=config,
        reason=f"anomaly: {names}{where}" + (f" ({model_label})" if model_label else ""),
        anomaly_id=used[0].id,
        anomaly_ids=[a.id for a in used],
        anomaly_types=list(dict.fromkeys(a.type.value for a in used)),
        notes=notes,
    )
    return decision


# --------------------------------------------------------------------------- scheduling


def next_batch_month(test_window_end: dt.date, last_monitored: str | None = None) -> str:
    """The month ``batch="next"`` monitors: the one after the last monitored month, but never
    before the first whole month after the champion's test window (``test_window_end`` is the
    window's exclusive end). A month that overlaps the champion's own windows would score it on
    rows it was trained, stopped or tested on (the smoke champion's test window ends on
    2013-02-26: `next` is March, not February)."""
    first_unseen = pd_period(test_window_end)
    if test_window_end.day != 1:  # the window ends inside this month: it is not unseen
        first_unseen += 1
    if last_monitored:
        after_last = pd_period(last_monitored) + 1
        return str(max(first_unseen, after_last))
    return str(first_unseen)


def pd_period(value: dt.date | str) -> pd.Period:
    import pandas as pd

    return pd.Period(value, freq="M")

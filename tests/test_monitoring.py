"""Monitoring logic: real Evidently reports, each anomaly rule alone, the rerun policy.

No Prefect and no MLflow here (``monitoring/`` is pure); the flow is tested in
``test_monitoring_flow.py``.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pytest

from ringflow.monitoring.anomalies import (
    AnomalyType,
    DivergedRule,
    DriftShareRule,
    MissingValuesRule,
    MonitoringObservation,
    PerformanceDropRule,
    PredictionShiftRule,
    RankStats,
    RepeatedFailureRule,
    RuleSet,
    SchemaChangeRule,
    StragglerRule,
    ThroughputDropRule,
    TrainingObservation,
    UnseenCategoriesRule,
    anomaly_id,
    default_rules,
    psi,
    schema_diff,
)
from ringflow.monitoring.policy import BatchWindow, RerunRecord, decide, recent_windows
from ringflow.monitoring.reports import PREDICTION, build_reports
from ringflow.training.config import PipelineConfig, Windows, with_overrides
from ringflow.training.data import TARGET, in_window, load_labelled

ROOT = Path(__file__).resolve().parents[1]
UTC = dt.UTC
NOW = dt.datetime(2026, 1, 10, 12, tzinfo=UTC)


# --------------------------------------------------------------------------- Evidently reports


@pytest.fixture(scope="module")
def flights():
    cfg = PipelineConfig()
    df, _ = load_labelled(cfg.data)
    # a fixed, model-free "prediction" so the test does not depend on training
    df[PREDICTION] = 1 / (1 + np.exp(-(df["hour"].fillna(12) - 15) / 3))
    return cfg, df


def _window(df, cfg, start, end):
    return df[in_window(df, cfg.data, start, end)]


def test_drift_found_on_a_shifted_batch(flights, tmp_path):
    cfg, df = flights
    d = cfg.data
    reference = _window(df, cfg, "2013-01-01", "2013-05-01")
    july = _window(df, cfg, "2013-07-01", "2013-08-01")
    s = build_reports(
        reference,
        july,
        d.numeric_features,
        d.categorical_features,
        tmp_path,
        target=TARGET,
        drift_share=0.5,
        reference_rows=5000,
        current_rows=5000,
    )
    assert s.dataset_drift and s.drifted_share >= 0.5
    assert {"temp", "dewp"} <= set(s.drifted_columns)  # winter -> summer weather
    assert s.reference_rows == 5000 and s.current_rows == 5000
    assert len(s.columns) == len(d.feature_columns)
    assert 0.5 < s.classification["roc_auc"] < 1.0
    for path in (s.drift_html, s.drift_json, s.quality_html, s.quality_json):
        assert (tmp_path / path.split("/")[-1]).stat().st_size > 1000
    assert "metrics" in json.loads((tmp_path / "drift.json").read_text())


def test_no_drift_on_a_sample_of_the_reference_window(flights, tmp_path):
    cfg, df = flights
    d = cfg.data
    window = _window(df, cfg, "2013-01-01", "2013-05-01").sample(frac=1.0, random_state=1)
    half = len(window) // 2
    s = build_reports(
        window.iloc[:half],
        window.iloc[half:],
        d.numeric_features,
        d.categorical_features,
        tmp_path,
        drift_share=0.5,
        reference_rows=5000,
        current_rows=5000,
        seed=3,
    )
    assert not s.dataset_drift
    assert s.drifted_share < 0.2, s.drifted_columns
    assert s.classification is None and s.quality_html is None  # no target given


def test_report_names_a_missing_column(flights, tmp_path):
    cfg, df = flights
    d = cfg.data
    sample = df.head(500)
    with pytest.raises(ValueError, match=r"current frame lacks column\(s\) \['temp'\]"):
        build_reports(sample, sample.drop(columns=["temp"]), d.numeric_features, d.categorical_features, tmp_path)


# --------------------------------------------------------------------------- helpers


def test_psi_zero_on_same_distribution_and_large_on_shift():
    rng = np.random.default_rng(0)
    ref = rng.beta(2, 5, 20_000)
    assert psi(ref, rng.beta(2, 5, 20_000)) < 0.01
    assert psi(ref, rng.beta(5, 2, 20_000)) > 1.0
    assert psi(np.zeros(100), np.zeros(100)) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="both sides"):
        psi([], [0.1])


def test_schema_diff_kinds():
    expected = {"a": "float64", "b": "string", "t": "datetime64[ns, UTC]"}
    assert schema_diff({"a": "int64", "b": "object", "t": "datetime64[ns, UTC]"}, expected).empty
    d = schema_diff({"a": "object", "t": "object", "new": "int64"}, expected)  # CSV timestamps are text
    assert (
        d.missing == ["b"]
        and d.extra == ["new"]
        and d.dtype_changed == {"a": {"expected": "numeric", "actual": "string"}}
    )
    assert schema_diff({"a": "float64", "b": "string", "t": "float64"}, expected).dtype_changed == {
        "t": {"expected": "datetime", "actual": "numeric"}
    }


def test_schema_rule_quiet_on_extra_columns_alone():
    only_extra = _obs(schema_changes=schema_diff({"a": "float64", "x": "int64"}, {"a": "float64"}))
    assert SchemaChangeRule().check(only_extra) == []
    [a] = SchemaChangeRule(flag_extra=True).check(only_extra)
    assert a.evidence["extra"] == ["x"]


def test_anomaly_id_is_stable_and_ignores_time():
    obs = _obs(roc_auc=0.60, reference_roc_auc=0.70)
    a1 = PerformanceDropRule().check(obs)[0]
    a2 = PerformanceDropRule().check(obs.model_copy(update={"roc_auc": 0.61}))[0]
    assert a1.id == a2.id == anomaly_id(AnomalyType.PERFORMANCE_DROP, a1.key)
    other_batch = PerformanceDropRule().check(obs.model_copy(update={"batch": "2013-08"}))[0]
    assert other_batch.id != a1.id


# --------------------------------------------------------------------------- rules, each alone


def _obs(**kw) -> MonitoringObservation:
    base = dict(model_name="flights-delay", model_version="3", batch="2013-07", rows=1000)
    return MonitoringObservation(**{**base, **kw})


def _training(**kw) -> TrainingObservation:
    base = dict(
        run_id="run-b",
        status="completed",
        world_size=2,
        per_rank=[
            RankStats(rank=0, samples_per_s=1000, step_time_ms=10),
            RankStats(rank=1, samples_per_s=1000, step_time_ms=10),
        ],
    )
    return TrainingObservation(**{**base, **kw})


CLEAN = _obs(
    roc_auc=0.70,
    reference_roc_auc=0.71,
    drifted_share=0.1,
    drifted_columns=["temp"],
    prediction_psi=0.05,
    missing_share={"wind_gust": 0.80},
    reference_missing_share={"wind_gust": 0.75},
    unseen_share={"dest": 0.01},
    training=_training(previous_samples_per_s=1900, previous_run_id="run-a"),
)

CASES = [
    (PerformanceDropRule(abs_drop=0.03), {"roc_auc": 0.65}, AnomalyType.PERFORMANCE_DROP),
    (PerformanceDropRule(abs_drop=0.5, rel_drop=0.02), {"roc_auc": 0.68}, AnomalyType.PERFORMANCE_DROP),
    (
        DriftShareRule(drift_share=0.5),
        {"drifted_share": 0.6, "drifted_columns": ["temp", "dewp"]},
        AnomalyType.DATA_DRIFT,
    ),
    (PredictionShiftRule(max_psi=0.2), {"prediction_psi": 0.35}, AnomalyType.PREDICTION_SHIFT),
    (
        MissingValuesRule(max_increase=0.2),
        {"missing_share": {"wind_gust": 0.8, "temp": 0.5}},
        AnomalyType.MISSING_VALUES,
    ),
    (UnseenCategoriesRule(max_share=0.05), {"unseen_share": {"dest": 0.2}}, AnomalyType.UNSEEN_CATEGORIES),
    (
        SchemaChangeRule(),
        {"schema_changes": schema_diff({"a": "object"}, {"a": "float64", "b": "string"})},
        AnomalyType.SCHEMA_CHANGE,
    ),
    (
        DivergedRule(),
        {"training": _training(status="diverged", checkpoint_dir="/ck/epoch-2")},
        AnomalyType.TRAINING_DIVERGED,
    ),
    (
        StragglerRule(factor=1.5),
        {
            "training": _training(
                per_rank=[
                    RankStats(rank=0, samples_per_s=1000, step_time_ms=10),
                    RankStats(rank=1, samples_per_s=1000, step_time_ms=10),
                    RankStats(rank=2, samples_per_s=400, step_time_ms=25),
                ]
            )
        },
        AnomalyType.STRAGGLER,
    ),
    (
        ThroughputDropRule(min_ratio=0.5),
        {"training": _training(previous_samples_per_s=5000, previous_run_id="run-a")},
        AnomalyType.THROUGHPUT_DROP,
    ),
    (
        RepeatedFailureRule(min_failures=2),
        {"training": _training(status="failed", per_rank=[], consecutive_failures=2)},
        AnomalyType.TRAINING_FAILED,
    ),
]


@pytest.mark.parametrize("rule,update,expected", CASES, ids=[c[2].value + str(i) for i, c in enumerate(CASES)])
def test_rule_fires_on_its_case_and_is_quiet_on_clean_data(rule, update, expected):
    assert rule.check(CLEAN) == []
    found = rule.check(CLEAN.model_copy(update=update))
    assert [a.type for a in found] == [expected]
    assert found[0].evidence and found[0].message


def test_rules_stay_quiet_without_inputs():
    empty = _obs()
    assert default_rules(PipelineConfig().monitoring).check(empty) == []


def test_missing_rule_is_relative_to_the_reference():
    # wind_gust is ~75% missing every month: no anomaly; a fresh 25% gap in temp is one
    rule = MissingValuesRule(max_increase=0.2)
    assert rule.check(_obs(missing_share={"wind_gust": 0.85}, reference_missing_share={"wind_gust": 0.75})) == []
    [a] = rule.check(_obs(missing_share={"temp": 0.25}, reference_missing_share={"temp": 0.0}))
    assert list(a.evidence["columns"]) == ["temp"]


def test_ruleset_combines_and_dedupes():
    rules = RuleSet() + DriftShareRule(0.5) + DriftShareRule(0.4)
    found = rules.check(_obs(drifted_share=0.6, drifted_columns=["temp"]))
    assert len(rules.rules) == 2 and len(found) == 1  # same type + key -> same id


def test_default_rules_take_config_thresholds():
    cfg = with_overrides(PipelineConfig(), {"monitoring.drift_share": 0.9, "monitoring.performance_drop_abs": 0.2})
    rules = default_rules(cfg.monitoring)
    assert rules.check(_obs(drifted_share=0.6, roc_auc=0.6, reference_roc_auc=0.7)) == []


# --------------------------------------------------------------------------- policy


BASE = PipelineConfig()  # train Jan-Apr, validation May, test June 1-15
JULY = BatchWindow(start=dt.date(2013, 7, 1), end=dt.date(2013, 8, 1), labelled=True)


def _drift(batch="2013-07"):
    return DriftShareRule(0.5).check(_obs(batch=batch, drifted_share=0.7, drifted_columns=["temp"]))[0]


def test_recent_windows_keep_lengths_and_do_not_leak():
    w = recent_windows(BASE.data.windows, dt.date(2013, 8, 1))
    assert w.test.end == dt.date(2013, 8, 1)
    assert (w.test.end - w.test.start) == (BASE.data.windows.test.end - BASE.data.windows.test.start)
    assert w.train.end == w.validation.start and w.validation.end == w.test.start
    Windows.model_validate(w.model_dump())  # the leak validator accepts it


def test_policy_drift_retrains_on_recent_labelled_window():
    d = decide([_drift()], BASE, batch=JULY, now=NOW, model_label="flights-delay v3")
    p = d.plan
    assert p is not None and p.anomaly_types == ["data_drift"]
    w = p.config.data.windows
    assert w.test == w.test.model_validate({"start": "2013-07-17", "end": "2013-08-01"})
    assert w.validation.end == w.test.start and w.train.end == w.validation.start == dt.date(2013, 6, 16)
    assert w.train.end > BASE.data.windows.train.end
    assert set(p.overrides) == {"data.windows.train", "data.windows.validation", "data.windows.test"}
    assert p.config.training == BASE.training  # nothing else changes
    assert "data_drift" in p.reason and "flights-delay v3" in p.reason


def test_policy_unlabelled_batch_trains_up_to_its_start():
    d = decide([_drift()], BASE, batch=JULY.model_copy(update={"labelled": False}), now=NOW)
    assert d.plan.config.data.windows.test.end == dt.date(2013, 7, 1)


def test_policy_refuses_a_batch_older_than_the_champions_data():
    old = BatchWindow(start=dt.date(2013, 3, 1), end=dt.date(2013, 4, 1), labelled=True)
    d = decide([_drift("2013-03")], BASE, batch=old, now=NOW)
    assert d.plan is None and "would not move the windows" in d.summary()


def test_policy_diverged_lowers_lr_and_resumes_from_checkpoint():
    run_cfg = with_overrides(BASE, {"training.learning_rate": 0.01}).model_dump(mode="json")
    t = _training(status="diverged", checkpoint_dir="/ck/epoch-2", config=run_cfg)
    [a] = DivergedRule().check(_obs(training=t))
    p = decide([a], BASE, training=t, now=NOW).plan
    assert p.config.training.learning_rate == pytest.approx(0.01 * BASE.monitoring.rerun_lr_factor)
    assert p.config.training.resume_from == "/ck/epoch-2"
    # drift at the same time moves the windows: the old checkpoint no longer fits
    both = decide([a, _drift()], BASE, training=t, batch=JULY, now=NOW).plan
    assert both.config.training.resume_from is None and both.config.training.learning_rate == pytest.approx(0.005)
    assert any("not resuming" in n for n in both.notes)
    # without a known directory, the run id (config: "checkpoint dir or MLflow run id")
    t2 = t.model_copy(update={"checkpoint_dir": None})
    assert decide([a], BASE, training=t2, now=NOW).plan.config.training.resume_from == "run-b"


def test_policy_straggler_sets_shard_weights_from_throughput():
    t = _training(
        per_rank=[
            RankStats(rank=0, samples_per_s=3000, step_time_ms=10),
            RankStats(rank=1, samples_per_s=1000, step_time_ms=30),
        ]
    )
    [a] = StragglerRule(1.5).check(_obs(training=t))
    p = decide([a], BASE, training=t, now=NOW).plan
    assert p.config.sharding.weights == [1.5, 0.5]
    assert p.config.num_shards == 2


def test_policy_repeated_failure_shrinks_world_size():
    cfg = with_overrides(BASE, {"training.world_size": 3, "sharding.weights": [1, 1, 1]})
    t = _training(
        status="failed", world_size=3, per_rank=[], consecutive_failures=2, config=cfg.model_dump(mode="json")
    )
    [a] = RepeatedFailureRule().check(_obs(training=t))
    p = decide([a], BASE, training=t, now=NOW).plan
    assert p.config.training.world_size == 2 and p.config.sharding.weights is None


def test_policy_alert_only_types_never_rerun():
    [a] = SchemaChangeRule().check(_obs(schema_changes=schema_diff({}, {"temp": "float64"})))
    d = decide([a], BASE, batch=JULY, now=NOW)
    assert d.plan is None and d.alerts == [a.id] and "alert-only" in d.suppressed[a.id]


def test_cooldown_suppresses_a_second_rerun():
    first = decide([_drift("2013-07")], BASE, batch=JULY, now=NOW)
    record = RerunRecord(
        time=NOW,
        monitoring_run_id="m1",
        anomaly_ids=first.plan.anomaly_ids,
        anomaly_types=first.plan.anomaly_types,
        reason=first.plan.reason,
    )
    aug = BatchWindow(start=dt.date(2013, 8, 1), end=dt.date(2013, 9, 1), labelled=True)
    later = NOW + dt.timedelta(hours=2)
    second = decide([_drift("2013-08")], BASE, batch=aug, now=later, history=[record])
    assert second.plan is None and "cooldown" in second.summary()
    # after the cooldown the same cause may rerun again
    after = NOW + dt.timedelta(hours=BASE.monitoring.cooldown_hours + 1)
    assert decide([_drift("2013-08")], BASE, batch=aug, now=after, history=[record]).plan is not None


def test_duplicate_anomaly_is_not_rerun_even_after_cooldown():
    a = _drift("2013-07")
    record = RerunRecord(time=NOW, monitoring_run_id="m1", anomaly_ids=[a.id], anomaly_types=["data_drift"])
    d = decide([_drift("2013-07")], BASE, batch=JULY, now=NOW + dt.timedelta(days=30), history=[record])
    assert d.plan is None and d.suppressed[a.id].startswith("duplicate")


def test_rerun_budget_per_period():
    cfg = with_overrides(BASE, {"monitoring.max_reruns_per_period": 2, "monitoring.cooldown_hours": 0})
    history = [
        RerunRecord(time=NOW - dt.timedelta(hours=h), anomaly_ids=[f"x{h}"], anomaly_types=["straggler"])
        for h in (1, 2)
    ]
    d = decide([_drift()], cfg, batch=JULY, now=NOW, history=history)
    assert d.plan is None and "budget" in d.summary()
    d = decide([_drift()], cfg, batch=JULY, now=NOW + dt.timedelta(days=8), history=history)
    assert d.plan is not None


def test_rerun_record_tags_round_trip():
    r = RerunRecord(time=NOW, monitoring_run_id="m1", anomaly_ids=["a", "b"], anomaly_types=["data_drift"], reason="x")
    back = RerunRecord.from_tags(r.to_tags(), NOW, "m1")
    assert back == r


def test_combined_anomalies_make_one_plan():
    perf = PerformanceDropRule().check(_obs(roc_auc=0.6, reference_roc_auc=0.7))[0]
    d = decide([_drift(), perf], BASE, batch=JULY, now=NOW)
    assert d.plan.anomaly_id == perf.id  # critical first
    assert set(d.plan.anomaly_types) == {"data_drift", "performance_drop"}


def test_next_batch_month():
    from ringflow.monitoring.policy import next_batch_month

    # the first whole month after the test window: June overlaps a window ending June 16
    assert next_batch_month(dt.date(2013, 6, 16)) == "2013-07"
    assert next_batch_month(dt.date(2013, 2, 26)) == "2013-03"  # the smoke champion's
    assert next_batch_month(dt.date(2013, 7, 1)) == "2013-07"  # [.., 07-01) ends with June
    assert next_batch_month(dt.date(2013, 6, 16), last_monitored="2013-07") == "2013-08"
    assert next_batch_month(dt.date(2013, 6, 16), last_monitored="2013-03") == "2013-07"


# --------------------------------------------------------------------------- big batches, bounded memory


def _champion_score(frame):
    """A fixed score of raw rows (stands in for the champion: scoring is the caller's)."""
    x = (frame["hour"].to_numpy(float) - 15) / 3 + frame["temp"].fillna(55).to_numpy(float) / 40
    return 1 / (1 + np.exp(-x))


def _baseline_score(frame):
    return 1 / (1 + np.exp(-(frame["distance"].to_numpy(float) - 1000) / 500))


@pytest.fixture(scope="module")
def synth_lake(tmp_path_factory):
    """``ringflow synth --factor 1``: the flights resampled into one Parquet file per month."""
    from ringflow.training.synth import synthesize

    out = tmp_path_factory.mktemp("synth") / "x1"
    synthesize(1, out, progress=lambda *a: None)
    return out


def test_row_sample_is_bounded_seeded_and_keeps_small_inputs_whole():
    import pandas as pd

    from ringflow.monitoring.sampling import RowSample

    rows = pd.DataFrame({"i": np.arange(10_000)})
    chunks = [rows.iloc[a:b] for a, b in [(0, 1), (1, 3000), (3000, 3001), (3001, 10_000)]]

    def sample(n, seed):
        s = RowSample(n, seed)
        for c in chunks:
            s.add(c)
        return s.frame()["i"].to_numpy()

    a, b, c = sample(500, 1), sample(500, 1), sample(500, 2)
    assert len(a) == 500 and len(set(a)) == 500 and (np.diff(a) > 0).all()  # distinct rows, arrival order
    np.testing.assert_array_equal(a, b)  # seeded: the same rows every time
    assert not np.array_equal(a, c)
    assert 4000 < a.mean() < 6000 and (a < 5000).mean() == pytest.approx(0.5, abs=0.1)  # uniform, not the head
    np.testing.assert_array_equal(sample(20_000, 0), rows["i"].to_numpy())  # fewer rows than n: all, in order
    np.testing.assert_array_equal(sample(None, 0), rows["i"].to_numpy())
    with pytest.raises(ValueError, match="sample size"):
        RowSample(0)


def test_a_month_of_a_multi_file_source_streams_to_the_exact_metrics_of_the_in_memory_path(synth_lake, smoke_config):
    """A month of ``ringflow synth`` data, read in small chunks from the directory, scored chunk by
    chunk and sampled for Evidently, gives every exact number the whole-frame path gives."""
    from ringflow.monitoring.batch import batch_chunks, describe_month
    from ringflow.monitoring.scoring import score_chunks
    from ringflow.training.data import read_source, validate_contract, with_target
    from ringflow.training.metrics import classification_metrics
    from ringflow.training.preprocess import Preprocessor

    cfg = with_overrides(smoke_config, {"data.source": str(synth_lake)})
    d = cfg.data
    batch = describe_month(cfg, "2013-07", chunk_rows=4096)
    # the in-memory path: the whole source as one frame, the month cut out of it
    whole = validate_contract(read_source(d), d)
    rows, _ = with_target(whole[in_window(whole, d, "2013-07-01", "2013-08-01")], d)
    january = whole[in_window(whole, d, "2013-01-01", "2013-01-08")].head(3000)
    pre = Preprocessor.fit(january, d.numeric_features, d.categorical_features)  # a small vocabulary: unseen values
    del whole

    assert batch.rows == len(rows) > 20_000 and batch.labelled and batch.source == str(synth_lake)
    assert batch.window == BatchWindow(start=dt.date(2013, 7, 1), end=dt.date(2013, 8, 1), labelled=True)
    assert batch.raw_schema["temp"] == "float64" and "year" in batch.raw_schema  # every column of the files

    def scan():
        return score_chunks(
            batch_chunks(batch, cfg, chunk_rows=4096),
            batch.rows,
            _champion_score,
            features=d.feature_columns,
            vocabulary=pre.vocab,
            target=TARGET,
            baseline=_baseline_score,
            sample_rows=3000,
            seed=0,
        )

    s = scan()
    np.testing.assert_array_equal(s.prediction, _champion_score(rows))  # the same rows, in the same order
    np.testing.assert_array_equal(s.target, rows[TARGET].to_numpy())
    assert classification_metrics(s.target, s.prediction) == classification_metrics(rows[TARGET], _champion_score(rows))
    assert classification_metrics(s.target, s.baseline_prediction) == classification_metrics(
        rows[TARGET], _baseline_score(rows)
    )
    assert s.missing_share() == {c: float(rows[c].isna().mean()) for c in d.feature_columns}
    assert s.unseen_share() == pre.unseen_share(rows) and max(s.unseen_share().values()) > 0
    reference = _champion_score(january)
    assert psi(reference, s.prediction) == psi(reference, _champion_score(rows))

    # Evidently's sample: bounded, rows of the batch with their prediction, the same every time
    assert len(s.sample) == 3000 and {PREDICTION, TARGET, *d.feature_columns} <= set(s.sample.columns)
    np.testing.assert_array_equal(s.sample[PREDICTION].to_numpy(), _champion_score(s.sample))
    again = scan().sample
    import pandas as pd

    pd.testing.assert_frame_equal(s.sample, again)


def test_a_month_without_rows_and_a_changed_batch_are_clear_errors(synth_lake, smoke_config):
    from ringflow.monitoring.batch import batch_chunks, describe_month
    from ringflow.monitoring.errors import MonitoringError
    from ringflow.monitoring.scoring import score_chunks

    cfg = with_overrides(smoke_config, {"data.source": str(synth_lake)})
    with pytest.raises(MonitoringError, match=r"no rows for batch 2015-01 .*\[2015-01-01, 2015-02-01\)"):
        describe_month(cfg, "2015-01")
    batch = describe_month(cfg, "2013-02")
    with pytest.raises(MonitoringError, match="more rows than the 10 counted"):
        score_chunks(batch_chunks(batch, cfg), 10, _champion_score, features=cfg.data.feature_columns, vocabulary={})


MONITOR_BIG_FILE = """
import json, sys
from pathlib import Path
import numpy as np
from ringflow.training.memory import peak_rss_mb
from ringflow.monitoring.batch import batch_chunks, describe_file
from ringflow.monitoring.reports import PREDICTION, build_reports
from ringflow.monitoring.scoring import score_chunks
from ringflow.training.config import PipelineConfig
from ringflow.training.data import TARGET
from ringflow.training.metrics import classification_metrics

def champion(frame):
    x = (frame["hour"].to_numpy(float) - 15) / 3 + frame["temp"].fillna(55).to_numpy(float) / 40
    return 1 / (1 + np.exp(-x))

cfg = PipelineConfig()
d = cfg.data
before = peak_rss_mb()  # the imports: what any monitoring process holds
batch = describe_file(cfg, Path(sys.argv[1]))
s = score_chunks(batch_chunks(batch, cfg), batch.rows, champion, features=d.feature_columns,
                 vocabulary={}, target=TARGET, baseline=champion, sample_rows=20_000)
reference = s.sample.head(5000)
build_reports(reference, s.sample, d.numeric_features, d.categorical_features, sys.argv[2], target=TARGET)
auc = classification_metrics(s.target, s.prediction)["roc_auc"]
print(json.dumps({"rows": batch.rows, "sample": len(s.sample), "roc_auc": auc, "before_mb": before,
                  "peak_mb": peak_rss_mb()}))
"""


@pytest.mark.slow
def test_monitoring_a_million_row_batch_stays_under_a_memory_ceiling(synth_lake, tmp_path):
    """A 1M-row batch file (the synthesized months, three times over, in row groups), monitored
    in a process of its own: described, scored chunk by chunk, Evidently on its 20k-row sample.
    Its peak RSS (VmHWM) stays under a generous ceiling; holding the batch as one frame took
    about 1.7 GB for 812k rows (benchmarks/bench_scale.py measures the curve)."""
    import subprocess
    import sys

    import pyarrow.parquet as pq

    big = tmp_path / "batch.parquet"
    files = sorted(synth_lake.glob("*.parquet"))
    with pq.ParquetWriter(big, pq.read_schema(files[0])) as writer:
        for _ in range(3):
            for f in files:
                pf = pq.ParquetFile(f)
                for g in range(pf.num_row_groups):
                    writer.write_table(pf.read_row_group(g))
    out = subprocess.run(
        [sys.executable, "-c", MONITOR_BIG_FILE, str(big), str(tmp_path / "reports")],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["rows"] > 1_000_000 * 0.95 and r["sample"] == 20_000 and 0.5 < r["roc_auc"] < 1
    assert r["peak_mb"] < 1200, r
    assert r["peak_mb"] - r["before_mb"] < 600, r  # scores are 17 bytes a row: ~17 MB, plus chunks and the sample

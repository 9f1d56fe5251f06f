"""The champion/challenger gate (pure) and alias moves with their history (real MLflow store)."""

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from ringflow.tasks.evaluate import decide
from ringflow.tasks.register import alias_history, move_alias
from ringflow.training.config import GateConfig

GOOD = {"roc_auc": 0.72, "pr_auc": 0.4, "log_loss": 0.45, "accuracy": 0.8, "f1": 0.2, "brier": 0.14}


def test_first_model_promoted_when_it_passes_the_floors():
    d = decide(GOOD, None, GateConfig(floors={"roc_auc": 0.6}))
    assert d.promote
    assert any("no champion yet" in v.reason for v in d.verdicts)


def test_floor_failure_rejects_and_says_why():
    d = decide({**GOOD, "roc_auc": 0.55}, None, GateConfig(floors={"roc_auc": 0.6, "log_loss": 0.5}))
    assert not d.promote
    failed = [v for v in d.verdicts if not v.passed]
    assert [v.metric for v in failed] == ["roc_auc"]
    assert "fails floor >= 0.6" in failed[0].reason


def test_lower_is_better_floor():
    d = decide({**GOOD, "log_loss": 0.7}, None, GateConfig(floors={"log_loss": 0.5}))
    assert not d.promote and "fails floor <= 0.5" in d.summary


@pytest.mark.parametrize(
    "candidate, margin, promote",
    [
        (0.73, 0.0, True),
        (0.72, 0.0, False),  # equal is not "beats"
        (0.73, 0.02, False),
        (0.75, 0.02, True),
    ],
)
def test_candidate_must_beat_champion_by_margin(candidate, margin, promote):
    d = decide({**GOOD, "roc_auc": candidate}, GOOD, GateConfig(min_improvement=margin, floors={}))
    assert d.promote is promote
    assert "vs champion 0.7200" in d.verdicts[-1].reason


@pytest.mark.parametrize(
    "baseline_auc, margin, promote",
    [
        (0.70, 0.0, True),
        (0.72, 0.0, True),  # equal: the baseline is not ahead
        (0.73, 0.0, False),
        (0.73, 0.02, True),
        (0.75, 0.02, False),
    ],
)
def test_baseline_ahead_by_more_than_the_margin_refuses(baseline_auc, margin, promote):
    d = decide(
        GOOD,
        None,
        GateConfig(floors={}, baseline_margin=margin, must_beat_baseline=True),
        {**GOOD, "roc_auc": baseline_auc},
    )
    assert d.promote is promote
    verdict = next(v for v in d.verdicts if v.check == "baseline")
    assert verdict.passed is promote
    # the reason names both scores
    assert "roc_auc 0.7200" in verdict.reason and f"baseline hgb {baseline_auc:.4f}" in verdict.reason
    if not promote:
        assert "the baseline is ahead by" in d.summary


def test_baseline_not_enforced_is_reported_but_passes():
    d = decide(GOOD, None, GateConfig(floors={}, must_beat_baseline=False), {**GOOD, "roc_auc": 0.8})
    assert d.promote
    assert "not enforced" in next(v for v in d.verdicts if v.check == "baseline").reason


def test_lower_is_better_primary_metric_against_the_baseline():
    gate = GateConfig(floors={}, primary_metric="log_loss", must_beat_baseline=True)
    assert decide(GOOD, None, gate, {**GOOD, "log_loss": 0.46}).promote
    assert not decide(GOOD, None, gate, {**GOOD, "log_loss": 0.44}).promote


def test_each_check_has_its_own_tag():
    d = decide(GOOD, GOOD, GateConfig(floors={"roc_auc": 0.6}), GOOD)
    tags = [v.tag for v in d.verdicts]
    assert tags == ["gate.reason.roc_auc", "gate.reason.champion.roc_auc", "gate.reason.baseline.roc_auc"]


def test_small_test_window_warns_but_does_not_refuse():
    gate = GateConfig(floors={}, min_test_rows=1000)
    d = decide(GOOD, None, gate, test_rows=84)
    assert d.promote and len(d.warnings) == 1
    assert "only 84 rows" in d.warnings[0] and "gate.min_test_rows=1000" in d.warnings[0]
    assert decide(GOOD, None, gate, test_rows=1000).warnings == []


def test_alias_moves_are_recorded(ringflow_home):
    mlflow.set_tracking_uri(f"sqlite:///{ringflow_home / 'mlflow.db'}")
    client = MlflowClient()

    class Const(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return np.full(len(model_input), 0.5)

    name = "alias-test"
    versions = []
    for _ in range(2):
        info = mlflow.pyfunc.log_model(name="m", python_model=Const())
        versions.append(mlflow.register_model(info.model_uri, name).version)
    v1, v2 = map(str, versions)
    assert move_alias(client, name, "champion", v1, "first") is not None
    assert move_alias(client, name, "champion", v1, "again") is None  # no-op moves are not history
    move_alias(client, name, "previous-champion", v1, "replaced")
    move_alias(client, name, "champion", v2, "better")
    hist = alias_history(client, name)
    assert [(h["alias"], h["from"], h["to"]) for h in hist] == [
        ("champion", None, v1),
        ("previous-champion", None, v1),
        ("champion", v1, v2),
    ]
    assert str(client.get_model_version_by_alias(name, "champion").version) == v2


def test_every_metric_name_is_computed_ranked_and_a_gate_choice():
    """The metric names have one home (training/metric_names.py): what is computed, which way is
    better, what the gate may compare and what evaluation reports all agree with it."""
    import typing

    from ringflow.training.metric_names import METRIC_NAMES
    from ringflow.training.metrics import GREATER_IS_BETTER, classification_metrics

    y = np.array([0, 1, 0, 1, 1, 0])
    computed = classification_metrics(y, np.array([0.1, 0.8, 0.3, 0.6, 0.9, 0.4]))
    assert set(METRIC_NAMES) <= set(computed)
    assert set(GREATER_IS_BETTER) == set(METRIC_NAMES) == set(GOOD)
    primary = GateConfig.model_fields["primary_metric"].annotation
    assert typing.get_args(primary) == METRIC_NAMES


def test_the_registry_lock_creates_its_limit_once_and_is_taken_again(prefect_harness):
    """The first holder creates the global concurrency limit; later ones find it (read, not a
    failed create, which the server would log as a UNIQUE error) and still hold it exclusively."""
    from prefect import get_client

    from ringflow.tasks.register import REGISTRY_LOCK_PREFIX, registry_lock

    name = f"lock-test-{np.random.default_rng().integers(1 << 30)}"
    with registry_lock(name), get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(REGISTRY_LOCK_PREFIX + name)
        assert limit.limit == 1 and limit.active_slots == 1
    with registry_lock(name):  # the limit exists now
        pass
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(REGISTRY_LOCK_PREFIX + name).active_slots == 0

"""The champion/challenger gate (pure) and alias moves with their history (real MLflow store)."""

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from tasks.evaluate import decide
from tasks.register import alias_history, move_alias
from training.config import GateConfig

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


@pytest.mark.parametrize("candidate, margin, promote", [
    (0.73, 0.0, True), (0.72, 0.0, False),  # equal is not "beats"
    (0.73, 0.02, False), (0.75, 0.02, True),
])
def test_candidate_must_beat_champion_by_margin(candidate, margin, promote):
    d = decide({**GOOD, "roc_auc": candidate}, GOOD, GateConfig(min_improvement=margin, floors={}))
    assert d.promote is promote
    assert "vs champion 0.7200" in d.verdicts[-1].reason


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
        ("champion", None, v1), ("previous-champion", None, v1), ("champion", v1, v2)]
    assert str(client.get_model_version_by_alias(name, "champion").version) == v2

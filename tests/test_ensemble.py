"""The ensemble inside the network (``training.model.ensemble_size``, TabM-style): k = 1 is the
single network exactly; k members score one logit per row, the logit of their mean probability;
the ranks train it under real horovodrun (np=2) and the pyfunc model scores it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from ringflow.training.config import ModelConfig, PipelineConfig, with_overrides
from ringflow.training.manifest import Manifest
from ringflow.training.model import TabularNet, load_model, mean_probability_logit, predict_proba, save_model
from ringflow.training.preprocess import Preprocessor

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

# the parameters of today's default network on a small input set (additive levels for three
# categoricals, a linear term for one numeric, the MLP over the two others), as saved before the
# ensemble existed
SINGLE_NAMES = [
    ("levels.0.weight", (4, 1)),
    ("levels.1.weight", (6, 1)),
    ("levels.2.weight", (5, 1)),
    ("linear.weight", (1, 1)),
    ("linear.bias", (1,)),
    ("mlp.0.weight", (16, 2)),
    ("mlp.0.bias", (16,)),
    ("mlp.3.weight", (8, 16)),
    ("mlp.3.bias", (8,)),
    ("mlp.6.weight", (1, 8)),
    ("mlp.6.bias", (1,)),
]


def _net(k: int = 1, levels: bool = False, dropout: float = 0.1) -> TabularNet:
    torch.manual_seed(0)
    return TabularNet(
        3, [4, 6, 5], 8, [16, 8], dropout, additive_numeric=[0], additive_categorical=[0, 1, 2],
        ensemble_size=k, ensemble_levels=levels,
    )  # fmt: skip


def _inputs(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x_num = torch.randn(n, 3, generator=g)
    x_cat = torch.stack([torch.randint(0, c, (n,), generator=g) for c in (4, 6, 5)], dim=1)
    return x_num, x_cat


class _SingleNet(nn.Module):
    """The network's forward as it was before the ensemble (commit 8a5227e), on the same modules."""

    def __init__(self, net: TabularNet):
        super().__init__()
        self.net = net

    def forward(self, x_num: torch.Tensor, x_cat: torch.Tensor) -> torch.Tensor:
        n = self.net
        logits: torch.Tensor = n.mlp(x_num[:, n.deep_numeric]).squeeze(1)
        for j, level in zip(n.additive_categorical, n.levels, strict=True):
            logits = logits + level(x_cat[:, j]).squeeze(1)
        assert n.linear is not None
        return logits + n.linear(x_num[:, n.additive_numeric]).squeeze(1)


def test_one_member_is_the_single_network_with_its_parameter_names():
    net = _net(1)
    for level in net.levels:  # as after training: levels away from their zero start
        nn.init.normal_(level.weight)
    assert [(k, tuple(v.shape)) for k, v in net.state_dict().items()] == SINGLE_NAMES
    assert "ensemble_size" not in net.arch  # the arch, and so old checkpoints' arch, unchanged
    x_num, x_cat = _inputs()
    net.eval()
    assert torch.equal(net(x_num, x_cat), _SingleNet(net)(x_num, x_cat))
    assert net.member_logits(x_num, x_cat).shape == (64, 1)
    y = (x_num[:, 1] > 0).float()
    old = nn.BCEWithLogitsLoss()(_SingleNet(net)(x_num, x_cat), y)
    assert torch.equal(net.training_loss(x_num, x_cat, y), old)
    # the same seed builds the same weights as before: a model file saved then loads as k = 1
    assert ModelConfig().ensemble_size == 1


@pytest.mark.parametrize("levels", [False, True])
def test_members_score_one_logit_the_logit_of_their_mean_probability(levels):
    net = _net(4, levels=levels)
    for level in net.levels:
        nn.init.normal_(level.weight)
    x_num, x_cat = _inputs()
    net.eval()
    members = net.member_logits(x_num, x_cat)
    assert members.shape == (64, 4)
    # the members differ (own weights), and with shared levels differ only through their MLPs
    assert (members.std(dim=1) > 1e-3).all()
    logits = net(x_num, x_cat)
    assert logits.shape == (64,)
    mean_p = torch.sigmoid(members.double()).mean(dim=1)
    assert torch.allclose(logits.double(), torch.log(mean_p / (1 - mean_p)), atol=1e-5)
    # the training loss is the mean of the members' own losses, not the ensemble's loss
    y = (x_num[:, 1] > 0).float()
    own = [nn.functional.binary_cross_entropy_with_logits(members[:, m], y) for m in range(4)]
    assert torch.allclose(net.training_loss(x_num, x_cat, y), torch.stack(own).mean())
    shapes = dict((k, tuple(v.shape)) for k, v in net.state_dict().items())
    assert shapes["mlp.0.weight"] == (4, 2, 16) and shapes["mlp.6.bias"] == (4, 1)
    assert shapes["levels.0.weight"] == ((4, 4) if levels else (4, 1))
    assert shapes["linear.bias"] == ((4,) if levels else (1,))


def test_mean_probability_logit_holds_for_confident_members():
    z = torch.tensor([[40.0, 30.0], [-40.0, -30.0], [0.0, 0.0], [3.0, -3.0]])
    out = mean_probability_logit(z)
    assert torch.isfinite(out).all()
    assert out[0] > 29 and out[1] < -29 and out[2] == 0 and abs(float(out[3])) < 1e-6


def test_a_round_trip_keeps_the_members(tmp_path):
    rows = pd.DataFrame(
        {
            "temp": [60.0, 70.0, 80.0, 65.0],
            "origin": pd.array(["EWR", "JFK", "EWR", "LGA"], dtype="string"),
            "dest": pd.array(["ORD", "ORD", "LAX", "ORD"], dtype="string"),
        }
    )
    pre = Preprocessor.fit(rows, ["temp"], ["origin", "dest"])
    cfg = ModelConfig(hidden_sizes=[8], ensemble_size=3, ensemble_levels=True, additive_features=["origin"])
    torch.manual_seed(0)
    net = TabularNet.for_preprocessor(pre, cfg)
    assert net.arch["ensemble_size"] == 3 and net.arch["ensemble_levels"] is True
    save_model(tmp_path, net, pre, cfg)
    again, _ = load_model(tmp_path)
    assert again.arch == net.arch and again.ensemble_size == 3
    assert np.array_equal(predict_proba(again, pre, rows), predict_proba(net, pre, rows))


@pytest.mark.horovod
def test_two_ranks_train_an_ensemble_the_pyfunc_model_scores(
    tmp_path: Path, smoke_config: PipelineConfig, smoke_manifest: Manifest
):
    """horovodrun np=2 trains ensemble_size 2; the saved model scores validation rows as the
    ranks did, and through the pyfunc model (models from code) as through load_model."""
    import mlflow

    from ringflow.training.pyfunc import log_delay_model, predict_rows
    from tests.test_training import _run_program

    cfg = with_overrides(smoke_config, {"training.model.ensemble_size": 2, "training.epochs": 2})
    out = tmp_path / "out"
    s = _run_program(cfg, smoke_manifest, out)
    assert s["status"] in {"completed", "early_stopped"} and s["world_size"] == 2
    net, pre = load_model(out)
    assert net.arch["ensemble_size"] == 2 and net.mlp[0].weight.shape[0] == 2
    val = smoke_manifest.read(smoke_manifest.validation)
    from ringflow.training.metrics import classification_metrics

    p = predict_proba(net, pre, val)
    assert classification_metrics(val["target"], p)["roc_auc"] == pytest.approx(s["metrics"]["val_roc_auc"], abs=1e-6)
    assert s["metrics"]["val_roc_auc"] > 0.58  # as the single net's smoke run (chance is 0.5)

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    # an experiment of this store: another test in this worker may have left its own active
    mlflow.set_experiment("ensemble")
    with mlflow.start_run():
        info = log_delay_model(out, pre.source_columns, val.head(5))
    scored = predict_rows(mlflow.pyfunc.load_model(info.model_uri), val)
    assert np.allclose(scored, p, atol=1e-6)

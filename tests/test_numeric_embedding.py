"""Embeddings of the numeric inputs (``training.model.numeric_embedding``, PLR: Gorishniy et al.
2022): ``none`` is today's network exactly; ``plr`` / ``plr_lite`` embed the deep numeric inputs
but the missing-value indicators; a model with them saves and loads; the ranks train one under
real horovodrun (np=2)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from ringflow.training.config import ModelConfig, PipelineConfig, with_overrides
from ringflow.training.manifest import Manifest
from ringflow.training.model import MODEL_FILE, TabularNet, load_model, predict_proba, save_model
from ringflow.training.preprocess import Preprocessor

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


def _net(kind: str = "none", lite_dim: int = 4, frequencies: int = 5) -> TabularNet:
    """Three numeric inputs (the first additive, the other two deep and, with an embedding,
    embedded), three additive categoricals: today's default network's shape, small."""
    torch.manual_seed(0)
    return TabularNet(
        3, [4, 6, 5], 8, [16, 8], 0.1, additive_numeric=[0], additive_categorical=[0, 1, 2],
        numeric_embedding=kind, embedded_numeric=[1, 2], embedding_frequencies=frequencies,
        embedding_sigma=0.5, numeric_embedding_dim=lite_dim,
    )  # fmt: skip


def _inputs(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x_num = torch.randn(n, 3, generator=g)
    x_cat = torch.stack([torch.randint(0, c, (n,), generator=g) for c in (4, 6, 5)], dim=1)
    return x_num, x_cat


def _rows() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "temp": [60.0, 70.0, None, 65.0, 50.0, 75.0],
            "hour": [5.0, 9.0, 13.0, 17.0, 21.0, 7.0],
            "origin": pd.array(["EWR", "JFK", "EWR", "LGA", "JFK", "EWR"], dtype="string"),
        }
    )


def test_none_is_todays_network_exactly():
    plain = _net("none")
    torch.manual_seed(0)
    before = TabularNet(3, [4, 6, 5], 8, [16, 8], 0.1, additive_numeric=[0], additive_categorical=[0, 1, 2])
    # the same arch (so old files and checkpoints match), parameters and draws from the seed
    assert plain.arch == before.arch and set(plain.arch) == {
        "num_numeric", "cardinalities", "embedding_dim", "hidden_sizes", "dropout",
        "additive_numeric", "additive_categorical",
    }  # fmt: skip
    assert plain.numeric_embedding is None
    assert [(k, v.shape) for k, v in plain.state_dict().items()] == [
        (k, v.shape) for k, v in before.state_dict().items()
    ]
    assert all(
        torch.equal(a, b) for a, b in zip(plain.state_dict().values(), before.state_dict().values(), strict=True)
    )
    x_num, x_cat = _inputs()
    plain.eval()
    # the MLP sees the deep numeric inputs as they are
    levels = sum(level(x_cat[:, j]) for j, level in zip(plain.additive_categorical, plain.levels, strict=True))
    assert plain.linear is not None
    by_hand = plain.mlp(x_num[:, [1, 2]]) + levels + plain.linear(x_num[:, [0]])
    assert torch.equal(plain(x_num, x_cat), by_hand.squeeze(1))
    assert ModelConfig().numeric_embedding == "none"
    pre = Preprocessor.fit(_rows(), ["temp", "hour"], ["origin"])
    assert "numeric_embedding" not in TabularNet.for_preprocessor(pre, ModelConfig(additive_features=[])).arch


@pytest.mark.parametrize("kind", ["plr", "plr_lite"])
def test_plr_embeds_each_deep_numeric_input(kind):
    net = _net(kind, lite_dim=4, frequencies=5)
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert shapes["numeric_embedding.frequencies"] == (2, 5)
    # its own Linear per input (2k -> dim), or one shared (lite)
    assert shapes["numeric_embedding.linear.weight"] == ((2, 10, 4) if kind == "plr" else (4, 10))
    assert shapes["mlp.0.weight"] == (16, 2 * 4)  # two embedded inputs of 4 values, no raw input
    assert net.arch["numeric_embedding"] == kind and net.arch["embedded_numeric"] == [1, 2]
    x_num, x_cat = _inputs()
    net.eval()
    assert net(x_num, x_cat).shape == (64,) and net.member_logits(x_num, x_cat).shape == (64, 1)
    # input 2's embedding is ReLU(Linear([cos(2 pi c x), sin(2 pi c x)])) over its own frequencies
    emb = net.numeric_embedding
    assert emb is not None
    c = emb.frequencies[1]
    z = 2 * math.pi * x_num[:, 2:3] * c
    periodic = torch.cat([torch.cos(z), torch.sin(z)], dim=1)
    if kind == "plr":
        w, b = emb.linear.weight[1], emb.linear.bias[1]
        expected = torch.relu(periodic @ w + b)
    else:
        expected = torch.relu(nn.functional.linear(periodic, emb.linear.weight, emb.linear.bias))
    assert torch.allclose(emb(x_num[:, [1, 2]])[:, 1], expected, atol=1e-6)
    # the frequencies are trained
    y = (x_num[:, 1] > 0).float()
    net.train()
    net.training_loss(x_num, x_cat, y).backward()
    assert emb.frequencies.grad is not None and emb.frequencies.grad.abs().sum() > 0


def test_frequencies_start_from_sigma():
    torch.manual_seed(0)
    net = TabularNet(40, [3], 8, [8], numeric_embedding="plr", embedded_numeric=list(range(40)),
                     embedding_frequencies=50, embedding_sigma=0.1)  # fmt: skip
    assert net.numeric_embedding is not None
    f = net.numeric_embedding.frequencies.detach()
    assert f.abs().max() <= 0.3 + 1e-6 and 0.08 < float(f.std()) < 0.11


def test_missing_indicators_and_additive_inputs_are_not_embedded(tmp_path):
    rows = _rows()
    pre = Preprocessor.fit(rows, ["temp", "hour"], ["origin"], indicators=True)
    assert pre.numeric_inputs == ["temp", "hour", "temp_missing"]
    cfg = ModelConfig(
        hidden_sizes=[8], additive_features=["hour"], numeric_embedding="plr",
        numeric_embedding_frequencies=3, numeric_embedding_dim=2,
    )  # fmt: skip
    torch.manual_seed(0)
    net = TabularNet.for_preprocessor(pre, cfg)
    assert net.embedded_numeric == [0] and net.plain_numeric == [2] and net.additive_numeric == [1]
    assert net.mlp[0].weight.shape == (8, 1 + 2 + 8)  # the indicator, temp's embedding, origin's
    # a model with the embedding saves and loads back, and scores the same
    save_model(tmp_path, net, pre, cfg)
    again, _ = load_model(tmp_path)
    assert again.arch == net.arch and again.arch["embedding_sigma"] == pytest.approx(0.01)
    assert np.array_equal(predict_proba(again, pre, rows), predict_proba(net, pre, rows))


def test_a_file_saved_before_the_embedding_loads_as_none(tmp_path):
    pre = Preprocessor.fit(_rows(), ["temp", "hour"], ["origin"])
    torch.manual_seed(0)
    net = TabularNet.for_preprocessor(pre, ModelConfig(hidden_sizes=[8], additive_features=[]))
    save_model(tmp_path, net, pre)
    payload = torch.load(tmp_path / MODEL_FILE, weights_only=True)
    assert "numeric_embedding" not in payload["arch"]  # as every file saved before the option
    again, _ = load_model(tmp_path)
    assert again.numeric_embedding is None
    assert np.array_equal(predict_proba(again, pre, _rows()), predict_proba(net, pre, _rows()))


def test_embedded_inputs_must_be_deep():
    with pytest.raises(ValueError, match="deep numeric"):
        TabularNet(3, [4], 8, [8], additive_numeric=[0], numeric_embedding="plr", embedded_numeric=[0, 1])
    with pytest.raises(ValueError, match="plr_lite"):
        TabularNet(3, [4], 8, [8], numeric_embedding="periodic", embedded_numeric=[1])


@pytest.mark.horovod
def test_two_ranks_train_with_plr_embeddings(tmp_path: Path, smoke_config: PipelineConfig, smoke_manifest: Manifest):
    """horovodrun np=2 trains a network with PLR embeddings; the saved model scores validation
    rows as the ranks did."""
    from ringflow.training.metrics import classification_metrics
    from tests.test_training import _run_program

    cfg = with_overrides(
        smoke_config,
        {"training.model.numeric_embedding": "plr", "training.model.numeric_embedding_frequencies": 8,
         "training.model.numeric_embedding_dim": 8, "training.model.numeric_embedding_sigma": 0.1,
         "training.epochs": 2},
    )  # fmt: skip
    out = tmp_path / "out"
    s = _run_program(cfg, smoke_manifest, out)
    assert s["status"] in {"completed", "early_stopped"} and s["world_size"] == 2
    net, pre = load_model(out)
    assert net.arch["numeric_embedding"] == "plr" and net.numeric_embedding is not None
    val = smoke_manifest.read(smoke_manifest.validation)
    p = predict_proba(net, pre, val)
    assert classification_metrics(val["target"], p)["roc_auc"] == pytest.approx(s["metrics"]["val_roc_auc"], abs=1e-6)
    # above chance; the embedded network starts slower than the plain one on six winter weeks
    # (one process, 2 epochs: 0.544 with sigma 0.1, 0.509 with 0.01, the plain network 0.587)
    assert s["metrics"]["val_roc_auc"] > 0.52

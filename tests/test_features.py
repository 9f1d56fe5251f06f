"""The network's derived inputs (route, missing-value flags, clipping, calendar) and the decision
threshold chosen on validation data: pure functions on small frames."""

import numpy as np
import pandas as pd
import pytest

from ringflow.training.config import DataConfig, FeatureConfig, load_config
from ringflow.training.metrics import classification_metrics, max_f1_threshold
from ringflow.training.model import TabularNet, load_model, read_decision_threshold, save_model
from ringflow.training.preprocess import Preprocessor, calendar_frame


def _rows() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "time_hour": pd.to_datetime(["2013-07-03 22:00", "2013-07-04 12:00", "2013-07-06 04:00", None], utc=True),
            "temp": [60.0, 70.0, 80.0, np.nan],
            "wind_gust": [np.nan, 20.0, np.nan, 30.0],
            "origin": pd.array(["EWR", "JFK", "EWR", None], dtype="string"),
            "dest": pd.array(["ORD", "ORD", "LAX", "ORD"], dtype="string"),
        }
    )


def test_route_cross_indicators_and_clipping():
    train = _rows()
    pre = Preprocessor.fit(
        train,
        ["temp", "wind_gust"],
        ["origin", "dest"],
        crosses=[["origin", "dest"]],
        indicators=True,
        clip_quantile=0.1,
    )
    assert pre.categorical_inputs == ["origin", "dest", "origin+dest"]
    assert pre.vocab["origin+dest"] == ["EWR|LAX", "EWR|ORD", "JFK|ORD"]  # a missing part: no route
    assert pre.numeric_inputs == ["temp", "wind_gust", "temp_missing", "wind_gust_missing"]
    lo, hi = pre.clip["temp"]
    assert 60 < lo < hi < 80
    new = pd.DataFrame(
        {
            "temp": [200.0, -50.0],
            "wind_gust": [np.nan, 25.0],
            "origin": pd.array(["JFK", "LGA"], dtype="string"),
            "dest": pd.array(["LAX", "ORD"], dtype="string"),
        }
    )
    x_num, x_cat = pre.transform(new)
    # far outside the train range -> the clipped edges, not a linear extrapolation
    assert x_num[0, 0] == pytest.approx((hi - pre.means["temp"]) / pre.stds["temp"], rel=1e-5)
    assert x_num[1, 0] == pytest.approx((lo - pre.means["temp"]) / pre.stds["temp"], rel=1e-5)
    assert x_num[0, 3] > x_num[1, 3]  # wind gust missing in the first row only
    assert x_cat[:, 2].tolist() == [0, 0]  # JFK|LAX and LGA|ORD: unseen routes -> OOV
    with pytest.raises(ValueError, match=r"lack the model's input column\(s\) \['dest'\]"):
        pre.transform(new.drop(columns=["dest"]))


def test_calendar_features_in_local_time():
    cal = calendar_frame(_rows()["time_hour"], "America/New_York")
    # 2013-07-03 22:00 UTC is 18:00 in New York, a Wednesday, the day before July 4th
    assert cal.loc[0, "time_of_day_sin"] == pytest.approx(np.sin(2 * np.pi * 18 / 24))
    assert cal.loc[0, "day_of_week"] == "2"
    assert cal.loc[0, "days_to_holiday"] == pytest.approx(1 / 7)
    assert cal.loc[1, "days_to_holiday"] == 0 and cal.loc[1, "days_since_holiday"] == 0
    assert cal.loc[2, "days_since_holiday"] == pytest.approx(2 / 7)  # 04:00 UTC = 00:00 on July 6th locally
    assert cal.loc[3].isna().all()
    iso = calendar_frame(pd.Series(["2013-07-03T22:00:00+00:00"]), "America/New_York")  # served as text
    assert iso.loc[0, "day_of_week"] == "2"


def test_preprocessor_files_from_before_the_derived_inputs_still_load(tmp_path):
    old = {
        "numeric": ["temp"],
        "categorical": ["origin"],
        "means": {"temp": 1.0},
        "stds": {"temp": 2.0},
        "vocab": {"origin": ["EWR"]},
    }
    pre = Preprocessor.from_dict(old)
    assert pre.numeric_inputs == ["temp"] and pre.categorical_inputs == ["origin"]
    x_num, x_cat = pre.transform(pd.DataFrame({"temp": [3.0], "origin": ["EWR"]}))
    assert x_num.tolist() == [[1.0]] and x_cat.tolist() == [[1]]


def test_default_crosses_follow_the_categorical_columns():
    assert DataConfig().features.crosses == [["origin", "dest"], ["carrier", "dest"]]
    own = DataConfig(categorical_features=["carrier"])
    assert own.features.crosses == []  # not an error about a setting the user never made
    with pytest.raises(ValueError, match="features.crosses entry"):
        DataConfig(categorical_features=["carrier"], features=FeatureConfig(crosses=[["carrier", "x"]]))


def test_max_f1_threshold_beats_one_half_on_a_minority_class():
    rng = np.random.default_rng(0)
    y = (rng.random(5000) < 0.2).astype(int)
    p = np.clip(0.2 + 0.15 * (y - 0.2) + rng.normal(0, 0.05, 5000), 0.01, 0.45)  # ranks well, never >= 0.5
    t = max_f1_threshold(y, p)
    assert 0.05 < t < 0.5
    assert classification_metrics(y, p, 0.5)["f1"] == 0 < 0.5 < classification_metrics(y, p, t)["f1"]
    assert max_f1_threshold(np.zeros(10), np.linspace(0, 1, 10)) == 0.5  # one class: nothing to choose


def test_threshold_is_saved_with_the_model(tmp_path):
    cfg = load_config(None)
    pre = Preprocessor.fit(_rows(), ["temp"], ["origin"])
    net = TabularNet.for_preprocessor(pre, cfg.training.model)
    save_model(tmp_path / "a", net, pre, cfg.training.model, decision_threshold=0.27)
    assert read_decision_threshold(tmp_path / "a") == pytest.approx(0.27)
    save_model(tmp_path / "b", net, pre)
    assert read_decision_threshold(tmp_path / "b") == 0.5  # saved without one
    assert load_model(tmp_path / "a")[0].arch == net.arch


def test_learning_rate_warms_up_then_follows_the_schedule():
    from ringflow.training.config import TrainingConfig
    from ringflow.training.train import learning_rate

    tc = TrainingConfig(learning_rate=0.001, warmup_epochs=1, epochs=4, lr_schedule="cosine", min_lr_fraction=0.1)
    steps = 10
    lrs = [learning_rate(tc, 2, s, steps) for s in range(4 * steps)]
    assert lrs[0] == pytest.approx(0.001) and lrs[steps] == pytest.approx(0.002)  # warm-up to size x base
    after = lrs[steps:]
    assert all(a > b for a, b in zip(after, after[1:], strict=False))  # then strictly decaying
    assert learning_rate(tc, 2, 4 * steps, steps) == pytest.approx(0.0002)  # the floor at the end
    constant = tc.model_copy(update={"lr_schedule": "constant"})
    assert {learning_rate(constant, 2, s, steps) for s in range(steps, 4 * steps)} == {0.002}


def test_quantile_scaling_is_bounded_and_keeps_the_order():
    rng = np.random.default_rng(1)
    train = pd.DataFrame({"precip": np.where(rng.random(2000) < 0.9, 0.0, rng.exponential(0.2, 2000))})
    pre = Preprocessor.fit(train, ["precip"], [], quantile_scaling=True)
    x, _ = pre.transform(pd.DataFrame({"precip": [0.0, 0.05, 0.5, 50.0, np.nan]}))
    col = x[:, 0]
    assert col[0] < col[1] < col[2] <= col[3]  # monotone
    assert col[3] == pytest.approx(col[2], abs=0.2)  # 100x the train maximum: flat, not 100x further
    assert col[4] == pytest.approx(0.0, abs=1e-6)  # missing -> the (scaled) mean


def test_additive_inputs_bypass_the_mlp(tmp_path):
    """Listed feature columns enter the logit additively: two rows that differ only in an
    additive category differ by the same amount whatever the weather (no learnt interaction),
    while a deep input may interact."""
    from ringflow.training.config import ModelConfig

    train = _rows().assign(carrier=pd.array(["AA", "UA", "AA", "UA"], dtype="string"))
    pre = Preprocessor.fit(
        train, ["temp", "wind_gust"], ["origin", "dest", "carrier"], crosses=[["origin", "dest"]], indicators=True
    )
    cfg = ModelConfig(hidden_sizes=[16], dropout=0.0, additive_features=["carrier", "origin", "dest"])
    import torch

    torch.manual_seed(0)
    net = TabularNet.for_preprocessor(pre, cfg)
    # origin, dest, carrier and the route origin+dest are additive; temp and the gust flag are deep
    assert net.arch["additive_categorical"] == [0, 1, 2, 3] and net.arch["additive_numeric"] == []
    for level in net.levels:  # as after training: levels away from their zero start
        torch.nn.init.normal_(level.weight)
    # each row twice, once per carrier, at four temperatures and routes
    pairs = (
        train.loc[np.repeat(train.index, 2)]
        .reset_index(drop=True)
        .assign(
            temp=[40.0, 40.0, 90.0, 90.0, 60.0, 60.0, 75.0, 75.0], carrier=pd.array(["AA", "UA"] * 4, dtype="string")
        )
    )
    x_num, x_cat = pre.transform(pairs)
    logits = net(torch.from_numpy(x_num), torch.from_numpy(x_cat)).detach().numpy()
    gaps = logits[1::2] - logits[0::2]  # UA minus AA
    assert np.allclose(gaps, gaps[0], atol=1e-6) and abs(gaps[0]) > 1e-3
    save_model(tmp_path, net, pre, cfg)
    again, _ = load_model(tmp_path)
    assert again.arch == net.arch
    assert np.allclose(again(torch.from_numpy(x_num), torch.from_numpy(x_cat)).detach().numpy(), logits)
    # the levels are the group with their own weight decay
    groups = net.param_groups(1e-5, 3.0)
    assert [g["weight_decay"] for g in groups] == [1e-5, 3.0]
    assert sum(p.numel() for p in groups[1]["params"]) == sum(c for c in pre.cardinalities[:4])


def test_default_additive_features_follow_the_data_columns():
    from ringflow.training.config import PipelineConfig

    assert PipelineConfig().training.model.additive_features == ["carrier", "origin", "dest", "distance", "minute"]
    own = PipelineConfig(data={"numeric_features": ["temp"], "categorical_features": ["carrier"]})
    assert own.training.model.additive_features == ["carrier"]  # not an error about an unset default
    with pytest.raises(ValueError, match=r"additive_features \['route'\]"):
        PipelineConfig(training={"model": {"additive_features": ["route"]}})


def test_models_saved_before_additive_inputs_still_load(tmp_path):
    """A model.pt whose arch has no additive keys (every input deep) loads as before."""
    import torch

    pre = Preprocessor.fit(_rows(), ["temp"], ["origin"])
    old = TabularNet(len(pre.numeric_inputs), pre.cardinalities, 4, [8])
    assert set(old.arch) == {"num_numeric", "cardinalities", "embedding_dim", "hidden_sizes", "dropout"}
    assert not list(old.levels) and old.linear is None
    save_model(tmp_path, old, pre)
    net, _ = load_model(tmp_path)
    x_num, x_cat = pre.transform(_rows())
    assert torch.equal(
        net(torch.from_numpy(x_num), torch.from_numpy(x_cat)),
        old.eval()(torch.from_numpy(x_num), torch.from_numpy(x_cat)),
    )

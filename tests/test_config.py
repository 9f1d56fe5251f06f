"""Config: defaults, YAML + overrides, and errors that name the field and the bad value."""

import datetime as dt

import pytest

from ringflow.training.config import ConfigError, PipelineConfig, get_settings, load_config, with_overrides
from tests.conftest import ROOT


def test_default_yaml_matches_the_model_defaults():
    assert load_config(ROOT / "configs" / "flights.yaml").model_dump() == {
        **PipelineConfig().model_dump(),
        "name": "flights",
    }


def test_smoke_config_is_small_and_valid(smoke_config):
    w = smoke_config.data.windows
    assert (w.train.end - w.train.start).days <= 6 * 7  # fast enough for the tests
    assert smoke_config.num_shards == smoke_config.training.world_size == 2


def test_overrides_are_parsed_as_yaml():
    cfg = load_config(
        ROOT / "configs" / "smoke.yaml",
        ["training.epochs=5", "training.model.hidden_sizes=[8, 4]", "data.windows.test.end=2013-02-24"],
    )
    assert cfg.training.epochs == 5
    assert cfg.training.model.hidden_sizes == [8, 4]
    assert cfg.data.windows.test.end == dt.date(2013, 2, 24)


@pytest.mark.parametrize(
    "override, field",
    [
        ("training.epochs=zero", "training.epochs"),
        ("training.epochs=0", "training.epochs"),
        ("training.learning_rate=-1", "training.learning_rate"),
        ("training.epoch=2", "training.epoch"),
        ("sharding.weights=[1, 2, 3]", "sharding.weights"),
        ("data.windows.validation.start=2013-01-15", "data.windows"),
        ("registry.model_name=bad name!", "registry.model_name"),
    ],
)
def test_invalid_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs" / "smoke.yaml", [override])
    assert field in str(e.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(None, ["training.epochs"])


def test_with_overrides_revalidates():
    cfg = PipelineConfig()
    assert with_overrides(cfg, {"training.world_size": 1}).training.world_size == 1
    with pytest.raises(ConfigError, match="training.world_size"):
        with_overrides(cfg, {"training.world_size": 0})


def test_settings_default_home_and_env_wins(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("RINGFLOW_HOME", str(tmp_path / "h"))
    s = get_settings()
    assert s.tracking_uri == f"sqlite:///{tmp_path / 'h' / 'mlflow.db'}"
    assert s.data_dir == tmp_path / "h" / "data" and s.runs_dir == tmp_path / "h" / "runs"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert get_settings().tracking_uri == "http://127.0.0.1:5999"


@pytest.mark.parametrize(
    "override, hint",
    [
        ("model.hidden_sizes=[2]", "did you mean training.model.hidden_sizes?"),
        ("training.epoch=3", "did you mean training.epochs?"),
        ("data.sourc=own.csv", "did you mean data.source?"),
    ],
)
def test_an_unknown_key_suggests_the_one_meant(override, hint):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs" / "smoke.yaml", [override])
    assert hint in str(e.value)


def test_every_field_is_documented_in_the_schema_the_ui_renders():
    """The Prefect UI's run form shows each field's JSON-schema description: the field docstrings."""
    schema = PipelineConfig.model_json_schema()
    models = {"PipelineConfig": schema, **schema["$defs"]}
    undocumented = [
        f"{m}.{f}"
        for m, d in models.items()
        for f, prop in d.get("properties", {}).items()
        if not prop.get("description")
    ]
    assert undocumented == []
    assert schema["$defs"]["TrainingConfig"]["properties"]["epochs"]["description"].startswith("Most epochs")

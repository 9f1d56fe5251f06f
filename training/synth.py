"""A K-times-larger flights-like dataset, for measuring throughput and memory as data grows.

Rows are resampled (with replacement, from a seed) from the real 2013 flights joined with weather,
month by month, so every row keeps its own timestamp inside its month: the windows, the label
rate and the month-to-month drift still mean what they mean on the real data. The weather
features get a little Gaussian jitter (``jitter`` x the column's standard deviation, clipped to
the physical range) so that copies of a row are not bit-identical. This is a *scale workload*: it
holds no information that the real 336,776 flights do not, and a model trained on it is no better.

Output: one Parquet file per month (``flights-2013-MM.parquet``), written in row groups, the way
a data lake holds it; ``data.source`` takes the directory.
"""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ringflow.training.data import WEATHER_COLUMNS, load_flights

BOUNDS = {
    "humid": (0.0, 100.0),
    "precip": (0.0, None),
    "wind_speed": (0.0, None),
    "wind_gust": (0.0, None),
    "visib": (0.0, 10.0),
    "wind_dir": (0.0, 360.0),
}


def _jittered(rows: pd.DataFrame, stds: dict[str, float], rng: np.random.Generator, jitter: float) -> pd.DataFrame:
    out = rows.copy()
    for c in WEATHER_COLUMNS:
        col = out[c].to_numpy(dtype="float64")
        noisy = col + rng.normal(0.0, jitter * stds[c], len(col))  # NaN stays NaN: missing stays missing
        lo, hi = BOUNDS.get(c, (None, None))
        out[c] = np.clip(noisy, lo, hi) if (lo is not None or hi is not None) else noisy
    return out


def synthesize(
    factor: int, out: Path, seed: int = 0, jitter: float = 0.05, progress: Callable[[str], None] = print
) -> list[Path]:
    """Write ``factor`` x the flights (per month) under ``out``; returns the files, oldest month first.

    Deterministic: the same (factor, seed, jitter) writes the same rows. The directory is built
    beside ``out`` and renamed into place, so ``out`` is never half written.
    """
    if factor < 1:
        raise ValueError(f"--factor must be >= 1, got {factor}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty: choose another --out or remove it")
    flights = load_flights()
    flights["time_hour"] = pd.to_datetime(flights["time_hour"], utc=True)
    stds = {c: float(flights[c].std()) for c in WEATHER_COLUMNS}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{secrets.token_hex(4)}")
    tmp.mkdir()
    files = []
    try:
        for month, rows in flights.groupby("month", sort=True):
            rows = rows.reset_index(drop=True)
            month_no = int(str(month))
            path = tmp / f"flights-2013-{month_no:02d}.parquet"
            schema = pa.Schema.from_pandas(rows, preserve_index=False)
            with pq.ParquetWriter(path, schema) as writer:
                for k in range(factor):  # one row group per copy: memory is one month, not K
                    rng = np.random.default_rng([seed, month_no, k])
                    pick = rows.iloc[np.sort(rng.integers(0, len(rows), len(rows)))]
                    writer.write_table(
                        pa.Table.from_pandas(_jittered(pick, stds, rng, jitter), schema=schema, preserve_index=False)
                    )
            files.append(out / path.name)
            progress(f"month 2013-{month:02d}: {factor * len(rows):,} rows")
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return files

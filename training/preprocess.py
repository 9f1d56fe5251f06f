"""The feature transform, fitted on the training window only and saved next to the shards.

The exact same object (serialised as JSON) is used by the training ranks, by evaluation, inside
the registered MLflow model and by monitoring, so a feature means the same thing everywhere.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ringflow.training.config import DataConfig

OOV = 0
"""Index of the out-of-vocabulary bucket: unseen and missing categories map here."""

CALENDAR_NUMERIC = ["time_of_day_sin", "time_of_day_cos", "days_to_holiday", "days_since_holiday"]
"""Numeric inputs derived from the timestamp: the local time of day on a circle (23:00 is next
to 00:00) and the distance to the nearest US federal holidays (travel peaks), in weeks, capped."""
CALENDAR_CATEGORICAL = ["day_of_week"]
HOLIDAY_HORIZON_DAYS = 14
"""Holidays further away than this count as "none near" (the features saturate at 2 weeks)."""


def _holiday_distances(local_days: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Days until the next and since the previous US federal holiday, each capped at the horizon."""
    from pandas.tseries.holiday import USFederalHolidayCalendar

    days = local_days.to_numpy(dtype="datetime64[D]")
    valid = ~np.isnat(days)
    if not valid.any():
        return np.full(len(days), np.nan), np.full(len(days), np.nan)
    pad = np.timedelta64(HOLIDAY_HORIZON_DAYS + 1, "D")
    lo, hi = days[valid].min() - pad, days[valid].max() + pad
    start, end = pd.Timestamp(lo).to_pydatetime(), pd.Timestamp(hi).to_pydatetime()
    holidays = USFederalHolidayCalendar().holidays(start, end).to_numpy(dtype="datetime64[D]")
    until = np.full(len(days), float(HOLIDAY_HORIZON_DAYS))
    since = np.full(len(days), float(HOLIDAY_HORIZON_DAYS))
    if len(holidays):
        d = days[valid].astype("int64")
        h = holidays.astype("int64")
        nxt = np.searchsorted(h, d, side="left")  # first holiday on or after the day
        has_next = nxt < len(h)
        u = np.where(has_next, h[np.minimum(nxt, len(h) - 1)] - d, HOLIDAY_HORIZON_DAYS)
        prv = np.searchsorted(h, d, side="right") - 1  # last holiday on or before the day
        s = np.where(prv >= 0, d - h[np.maximum(prv, 0)], HOLIDAY_HORIZON_DAYS)
        until[valid] = np.minimum(u, HOLIDAY_HORIZON_DAYS)
        since[valid] = np.minimum(s, HOLIDAY_HORIZON_DAYS)
    until[~valid] = np.nan
    since[~valid] = np.nan
    return until, since


def calendar_frame(timestamps: pd.Series, timezone: str) -> pd.DataFrame:
    """The calendar features of each timestamp, in ``timezone`` (scheduled local time).

    Known when the flight is scheduled, so they do not leak the outcome. Naive timestamps are
    taken as UTC (as the data contract parses them); ISO text works too (the served model's input).
    """
    ts = pd.to_datetime(timestamps, utc=True, errors="coerce").dt.tz_convert(timezone)
    hours = (ts.dt.hour + ts.dt.minute / 60.0).to_numpy(dtype="float64", na_value=np.nan)
    until, since = _holiday_distances(ts.dt.tz_localize(None).dt.normalize())
    dow = ts.dt.dayofweek
    return pd.DataFrame(
        {
            "time_of_day_sin": np.sin(2 * np.pi * hours / 24.0),
            "time_of_day_cos": np.cos(2 * np.pi * hours / 24.0),
            "days_to_holiday": until / 7.0,
            "days_since_holiday": since / 7.0,
            "day_of_week": dow.astype("Int64").astype("string"),
        },
        index=timestamps.index,
    )


QUANTILES = 65


def quantile_position(values: np.ndarray, quantiles: list[float]) -> np.ndarray:
    """Where each value sits among the training quantiles, 0..1 (ties: the middle of the tied
    run, so a column that is mostly 0 maps 0 to one value); NaN stays NaN."""
    q = np.asarray(quantiles, dtype="float64")
    levels = np.linspace(0, 1, len(q))
    lo = np.interp(values, q, levels, left=0.0, right=1.0)
    hi = 1.0 - np.interp(-values, -q[::-1], levels, left=0.0, right=1.0)
    position: np.ndarray = (lo + hi) / 2
    return position


def bin_name(column: str) -> str:
    return f"{column}_bin"


def bin_values(values: pd.Series, edges: list[float]) -> pd.Series:
    """The quantile bin of each value as a category ("0".."k"); missing stays missing."""
    col = pd.to_numeric(values, errors="coerce").astype("float64").to_numpy()
    index = np.searchsorted(np.asarray(edges, dtype="float64"), col, side="right").astype(str)
    binned = pd.Series(index, index=values.index, dtype="string")
    binned[np.isnan(col)] = pd.NA
    return binned


def indicator_name(column: str) -> str:
    return f"{column}_missing"


def cross_name(columns: list[str]) -> str:
    return "+".join(columns)


def cross_values(df: pd.DataFrame, columns: list[str]) -> pd.Series:
    """One category per combination (``EWR|ORD``); missing when any part is missing."""
    parts = [df[c].astype("string") for c in columns]
    out = parts[0]
    for p in parts[1:]:
        out = out + "|" + p
    return out


@dataclass
class Preprocessor:
    numeric: list[str]
    categorical: list[str]
    means: dict[str, float] = field(default_factory=dict)
    stds: dict[str, float] = field(default_factory=dict)
    vocab: dict[str, list[str]] = field(default_factory=dict)
    """Per categorical input (source columns, crosses, day of week): known values; value i maps
    to index i + 1 (0 is OOV)."""
    timestamp: str | None = None
    """When set, calendar features are derived from this column (:func:`calendar_frame`)."""
    timezone: str = "UTC"
    """Time zone the calendar features are computed in (the schedule's local time)."""
    crosses: list[list[str]] = field(default_factory=list)
    """Categorical columns combined into one embedded category each (origin+dest = the route)."""
    clip: dict[str, list[float]] = field(default_factory=dict)
    """Per numeric source column: the training window's [low, high] quantiles. Values
    outside are clipped, so the network extrapolates flat like a tree instead of linearly far
    beyond anything it saw (June's temperatures are above every January-April reading)."""
    quantiles: dict[str, list[float]] = field(default_factory=dict)
    """Per numeric source column, when quantile scaling is on: the training window's quantiles
    (0%, 1/64, ... 100%). A value maps to its position among them (0..1) before standardising:
    bounded, robust to heavy tails (precipitation), flat beyond the training range."""
    bin_edges: dict[str, list[float]] = field(default_factory=dict)
    """Per numeric source column: quantile bin edges of the training window. The bin is an
    embedded category next to the standardised value, so the network can learn a step function
    per feature as trees do (flat beyond the training range; missing = its own bucket)."""
    missing_indicators: list[str] = field(default_factory=list)
    """Numeric columns with missing values in the training window: each gets a 0/1 "was missing"
    input next to its mean-filled value (wind gusts are mostly unrecorded; the gap itself says
    something about the weather)."""

    @classmethod
    def fit(
        cls,
        df: pd.DataFrame,
        numeric: list[str],
        categorical: list[str],
        timestamp: str | None = None,
        timezone: str = "UTC",
        crosses: list[list[str]] | None = None,
        indicators: bool = False,
        clip_quantile: float = 0.0,
        bins: int = 0,
        quantile_scaling: bool = False,
    ) -> Preprocessor:
        """Fit on ``df`` (the train window). Without the keyword arguments: the source columns
        only, standardised and embedded; each argument adds one kind of derived input."""
        if df.empty:
            raise ValueError("cannot fit preprocessing on an empty training window")
        p = cls(
            numeric=list(numeric),
            categorical=list(categorical),
            timestamp=timestamp,
            timezone=timezone,
            crosses=[list(c) for c in crosses or []],
        )
        p.missing_indicators = [c for c in p.numeric if df[c].isna().any()] if indicators else []
        if bins > 1:
            for c in p.numeric:
                col = pd.to_numeric(df[c], errors="coerce").astype("float64").dropna()
                if len(col):
                    edges = np.unique(np.quantile(col, np.linspace(0, 1, bins + 1)[1:-1]))
                    p.bin_edges[c] = [float(e) for e in edges]
        frame = p._with_derived(df)
        for c in p.numeric_inputs:
            col = frame[c].astype("float64")
            if clip_quantile > 0 and c in p.numeric and col.notna().any():  # derived inputs are bounded
                p.clip[c] = [float(col.quantile(clip_quantile)), float(col.quantile(1 - clip_quantile))]
                col = col.clip(*p.clip[c])
            if quantile_scaling and c in p.numeric and col.notna().any():
                p.quantiles[c] = [float(q) for q in np.quantile(col.dropna(), np.linspace(0, 1, QUANTILES))]
                col = pd.Series(quantile_position(col.to_numpy(), p.quantiles[c]), index=col.index)
            mean = float(col.mean()) if col.notna().any() else 0.0
            std = float(col.std(ddof=0)) if col.notna().sum() > 1 else 0.0
            p.means[c] = mean
            p.stds[c] = std if std > 1e-12 else 1.0  # constant column -> only centred
        for c in p.categorical_inputs:
            p.vocab[c] = sorted(frame[c].dropna().astype(str).unique().tolist())
        return p

    @classmethod
    def for_data(cls, df: pd.DataFrame, data: DataConfig) -> Preprocessor:
        """Fitted on ``df`` with the feature settings of a ``DataConfig``."""
        f = data.features
        return cls.fit(
            df,
            data.numeric_features,
            data.categorical_features,
            timestamp=data.timestamp_column if f.calendar else None,
            timezone=f.calendar_timezone,
            crosses=f.crosses,
            indicators=f.missing_indicators,
            clip_quantile=f.clip_quantile,
            bins=f.numeric_bins,
            quantile_scaling=f.numeric_scaling == "quantile",
        )

    @property
    def numeric_inputs(self) -> list[str]:
        """The network's numeric inputs: source columns, missing-value indicators, then derived
        calendar features."""
        return [
            *self.numeric,
            *(indicator_name(c) for c in self.missing_indicators),
            *(CALENDAR_NUMERIC if self.timestamp else []),
        ]

    @property
    def categorical_inputs(self) -> list[str]:
        """The network's embedded inputs: source columns, crosses, then the day of week."""
        return [
            *self.categorical,
            *(cross_name(c) for c in self.crosses),
            *(CALENDAR_CATEGORICAL if self.timestamp else []),
            *(bin_name(c) for c in self.bin_edges),
        ]

    @property
    def numeric_input_sources(self) -> list[list[str]]:
        """Per numeric input (in :attr:`numeric_inputs` order): the source columns it derives from."""
        return [
            *([c] for c in self.numeric),
            *([c] for c in self.missing_indicators),
            *([t] for t in self._timestamp for _ in CALENDAR_NUMERIC),
        ]

    @property
    def _timestamp(self) -> list[str]:
        """The timestamp column, when the calendar features are on."""
        return [self.timestamp] if self.timestamp else []

    @property
    def categorical_input_sources(self) -> list[list[str]]:
        """Per categorical input (in :attr:`categorical_inputs` order): the source columns it derives from."""
        return [
            *([c] for c in self.categorical),
            *(list(c) for c in self.crosses),
            *([t] for t in self._timestamp for _ in CALENDAR_CATEGORICAL),
            *([c] for c in self.bin_edges),
        ]

    @property
    def source_columns(self) -> list[str]:
        """The raw columns :meth:`transform` reads."""
        return [*self.numeric, *self.categorical, *([self.timestamp] if self.timestamp else [])]

    @property
    def cardinalities(self) -> list[int]:
        """Embedding table sizes (vocabulary + the OOV bucket)."""
        return [len(self.vocab[c]) + 1 for c in self.categorical_inputs]

    def _with_derived(self, df: pd.DataFrame) -> pd.DataFrame:
        missing = [c for c in self.source_columns if c not in df.columns]
        if missing:
            raise ValueError(f"the rows lack the model's input column(s) {missing}")
        if not self.crosses and not self.timestamp and not self.missing_indicators and not self.bin_edges:
            return df
        derived = {cross_name(c): cross_values(df, c) for c in self.crosses}
        derived.update(
            {
                indicator_name(c): pd.to_numeric(df[c], errors="coerce").isna().astype("float64")
                for c in self.missing_indicators
            }
        )
        derived.update({bin_name(c): bin_values(df[c], edges) for c, edges in self.bin_edges.items()})
        frame = df.assign(**derived) if derived else df
        if self.timestamp:
            frame = pd.concat([frame, calendar_frame(df[self.timestamp], self.timezone)], axis=1)
        return frame

    def transform(self, df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """-> (float32 [n, numeric inputs], int64 [n, categorical inputs]). Missing numerics
        become the mean."""
        frame = self._with_derived(df)
        n = len(frame)
        numeric = self.numeric_inputs
        x_num = np.zeros((n, len(numeric)), dtype=np.float32)
        for j, c in enumerate(numeric):
            col = pd.to_numeric(frame[c], errors="coerce").astype("float64").to_numpy()
            if c in self.clip:
                low, high = self.clip[c]
                col = np.clip(col, low, high)  # NaN stays NaN
            if c in self.quantiles:
                col = quantile_position(col, self.quantiles[c])
            col = np.where(np.isnan(col), self.means[c], col)
            x_num[:, j] = (col - self.means[c]) / self.stds[c]
        categorical = self.categorical_inputs
        x_cat = np.zeros((n, len(categorical)), dtype=np.int64)
        for j, c in enumerate(categorical):
            index = {v: i + 1 for i, v in enumerate(self.vocab[c])}
            values = frame[c].astype("string").fillna("\0missing")
            x_cat[:, j] = values.map(index).fillna(OOV).astype(np.int64).to_numpy()
        return x_num, x_cat

    def unseen_share(self, df: pd.DataFrame) -> dict[str, float]:
        """Share of non-missing values per categorical column that the vocabulary has not seen."""
        out = {}
        for c in self.categorical:
            vals = df[c].dropna().astype(str)
            out[c] = float((~vals.isin(set(self.vocab[c]))).mean()) if len(vals) else 0.0
        return out

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessor:
        return cls(**d)  # files written before the derived features lack them: defaults = none

    def save(self, path: str | Path) -> Path:
        """Write atomically (tmp file + rename)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1, sort_keys=True))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Preprocessor:
        return cls.from_dict(json.loads(Path(path).read_text()))


# --------------------------------------------------------------------------- fitting in a streaming pass

FIT_SAMPLE_ROWS = 250_000
"""Most training rows :class:`StreamingFit` keeps to fit the statistics on (a uniform sample)."""


class StreamingFit:
    """:meth:`Preprocessor.for_data` over batches of the training window in bounded memory.

    Up to :data:`FIT_SAMPLE_ROWS` rows the result *is* ``for_data`` on all of them (same rows, same
    order). Beyond that, the statistics (means, standard deviations, clipping quantiles) come from
    a seeded uniform sample of that many rows (the estimates move by a fraction of a percent of a
    standard deviation), while what must be exact is counted over every row: the vocabularies
    (an unseen-but-present category would be out of vocabulary) and which columns have missing
    values, with the share of each.
    """

    def __init__(self, data: DataConfig, capacity: int = FIT_SAMPLE_ROWS, seed: int = 0) -> None:
        self.data = data
        self.capacity = capacity
        self.rng = np.random.default_rng(seed)
        self.sample: pd.DataFrame | None = None
        self.keys = np.empty(0)
        self.rows = 0
        self.missing = dict.fromkeys(data.numeric_features, 0)
        self.proto = Preprocessor(
            numeric=list(data.numeric_features),
            categorical=list(data.categorical_features),
            timestamp=data.timestamp_column if data.features.calendar else None,
            timezone=data.features.calendar_timezone,
            crosses=[list(c) for c in data.features.crosses],
        )
        self.vocab: dict[str, set[str]] = {c: set() for c in self.proto.categorical_inputs}

    @classmethod
    def for_data(cls, data: DataConfig) -> StreamingFit:
        return cls(data)

    def update(self, df: pd.DataFrame) -> None:
        if df.empty:
            return
        self.rows += len(df)
        for c in self.missing:
            self.missing[c] += int(df[c].isna().sum())
        derived = self.proto._with_derived(df)
        for c, values in self.vocab.items():
            values.update(derived[c].dropna().astype(str).unique().tolist())
        # bottom-k sample by random key, kept in arrival order
        keys = np.concatenate([self.keys, self.rng.random(len(df))])
        sample = df if self.sample is None else pd.concat([self.sample, df], ignore_index=True)
        if len(sample) > self.capacity:
            keep = np.sort(np.argpartition(keys, self.capacity)[: self.capacity])
            sample, keys = sample.iloc[keep].reset_index(drop=True), keys[keep]
        self.sample, self.keys = sample, keys

    def result(self) -> Preprocessor:
        if not self.rows or self.sample is None:
            raise ValueError("cannot fit preprocessing on an empty training window")
        p = Preprocessor.for_data(self.sample, self.data)
        if self.rows > len(self.sample):  # sampled: the counted parts are exact
            p.vocab = {c: sorted(self.vocab[c]) for c in p.categorical_inputs}
            if p.missing_indicators or any(self.missing.values()):
                missing = [c for c in p.numeric if self.missing[c]]
                for c in p.missing_indicators:
                    p.means.pop(indicator_name(c), None)
                    p.stds.pop(indicator_name(c), None)
                for c in missing:
                    share = self.missing[c] / self.rows
                    p.means[indicator_name(c)] = share
                    std = math.sqrt(share * (1 - share))
                    p.stds[indicator_name(c)] = std if std > 1e-12 else 1.0
                p.missing_indicators = missing
        return p

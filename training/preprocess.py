"""The feature transform, fitted on the training window only and saved next to the shards.

The exact same object (serialised as JSON) is used by the training ranks, by evaluation, inside
the registered MLflow model and by monitoring, so a feature means the same thing everywhere.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

OOV = 0
"""Index of the out-of-vocabulary bucket: unseen and missing categories map here."""


@dataclass
class Preprocessor:
    numeric: list[str]
    categorical: list[str]
    means: dict[str, float] = field(default_factory=dict)
    stds: dict[str, float] = field(default_factory=dict)
    vocab: dict[str, list[str]] = field(default_factory=dict)
    """Per categorical column: known values; value i maps to index i + 1 (0 is OOV)."""

    @classmethod
    def fit(cls, df: pd.DataFrame, numeric: list[str], categorical: list[str]) -> Preprocessor:
        if df.empty:
            raise ValueError("cannot fit preprocessing on an empty training window")
        p = cls(numeric=list(numeric), categorical=list(categorical))
        for c in numeric:
            col = df[c].astype("float64")
            mean = float(col.mean()) if col.notna().any() else 0.0
            std = float(col.std(ddof=0)) if col.notna().sum() > 1 else 0.0
            p.means[c] = mean
            p.stds[c] = std if std > 1e-12 else 1.0  # constant column -> only centred
        for c in categorical:
            p.vocab[c] = sorted(df[c].dropna().astype(str).unique().tolist())
        return p

    @property
    def cardinalities(self) -> list[int]:
        """Embedding table sizes (vocabulary + the OOV bucket)."""
        return [len(self.vocab[c]) + 1 for c in self.categorical]

    def transform(self, df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """-> (float32 [n, numeric], int64 [n, categorical]). Missing numerics become the mean."""
        n = len(df)
        x_num = np.zeros((n, len(self.numeric)), dtype=np.float32)
        for j, c in enumerate(self.numeric):
            col = pd.to_numeric(df[c], errors="coerce").astype("float64").to_numpy()
            col = np.where(np.isnan(col), self.means[c], col)
            x_num[:, j] = (col - self.means[c]) / self.stds[c]
        x_cat = np.zeros((n, len(self.categorical)), dtype=np.int64)
        for j, c in enumerate(self.categorical):
            index = {v: i + 1 for i, v in enumerate(self.vocab[c])}
            values = df[c].astype("string").fillna("\0missing")
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
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessor:
        return cls(**d)

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

"""A bounded, seeded, uniform sample of rows that arrive in chunks (for Evidently on a big batch).

Each row gets a random key from a seeded generator; the sample is the ``n`` rows with the
smallest keys (a bottom-k sample: uniform without replacement, like a reservoir, and the same rows
for the same chunks and seed). Memory is ``n`` rows plus one chunk, whatever the number of rows.
When no more than ``n`` rows arrive, the sample is all of them, in their order.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


class RowSample:
    """Feed chunks with :meth:`add`; :meth:`frame` returns the sample in arrival order."""

    def __init__(self, n: int | None, seed: int = 0):
        if n is not None and n < 1:
            raise ValueError(f"sample size must be at least 1 or None (all rows), got {n}")
        self.n = n
        self._rng = np.random.default_rng(seed)
        self._parts: list[pd.DataFrame] = []
        self._keys: list[np.ndarray] = []
        self._kept = 0
        self._seen = 0
        self._threshold = np.inf
        """Largest key in a full sample: a row with a larger key can never enter it."""
        self._text: dict[str, pd.StringDtype] = {}
        """Columns of Python strings, kept in Arrow buffers while sampling -> their dtype."""

    @property
    def seen(self) -> int:
        return self._seen

    def add(self, chunk: pd.DataFrame) -> None:
        keys = self._rng.random(len(chunk))  # drawn for every row: the sample depends only on the rows and the seed
        order = np.arange(self._seen, self._seen + len(chunk))
        self._seen += len(chunk)
        if self.n is not None and self._threshold < np.inf:
            take = keys < self._threshold
            chunk, keys, order = chunk[take], keys[take], order[take]
        if not len(chunk):
            return
        # The kept rows' text lives in Arrow buffers while sampling: as Python objects, re-copied at
        # every trim, they left 140 MiB of free but fragmented heap after a 30x month (measured;
        # benchmarks/README.md).
        text = {str(c): t for c, t in chunk.dtypes.items() if isinstance(t, pd.StringDtype) and t.storage == "python"}
        self._text.update(text)
        self._parts.append(chunk.assign(_order=order).astype({c: "string[pyarrow]" for c in text}))
        self._keys.append(keys)
        self._kept += len(chunk)
        if self.n is not None and self._kept > self.n:
            self._trim(self.n)

    def _trim(self, n: int) -> None:
        rows = pd.concat(self._parts, ignore_index=True)
        keys = np.concatenate(self._keys)
        keep = np.sort(np.argpartition(keys, n - 1)[:n])
        self._parts, self._keys, self._kept = [rows.iloc[keep]], [keys[keep]], n
        self._threshold = float(keys[keep].max())

    def frame(self) -> pd.DataFrame:
        """The sampled rows, in the order they arrived, with a fresh index."""
        if not self._parts:
            return pd.DataFrame()
        rows = pd.concat(self._parts, ignore_index=True).astype(self._text)
        return rows.sort_values("_order", kind="stable").drop(columns="_order").reset_index(drop=True)

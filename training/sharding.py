"""The sharding stage: labelled rows -> time windows -> Parquet shards + a checksummed manifest.

Plain functions (no Prefect): ``tasks/shard.py`` wraps :func:`shard_dataset` as a task, and the
training tests call it directly.

Layout of one dataset version, ``<data_dir>/<fingerprint>/``::

    manifest.json          written last, atomically (see training.manifest.Manifest)
    preprocessor.json      fitted on the training window only; plaintext
    shard-00000.parquet    a random sample of the train window (sharding.seed), one file per shard,
    ...                    rows in source order (training draws its own order every epoch)
    validation.parquet     the validation window, in source order
    test.parquet           the test window, in source order

Every Parquet file holds the raw labelled rows (timestamp, label, features, target) in row groups,
so training, evaluation and monitoring apply the one saved transform themselves. With a key, each
file is AES-GCM encrypted as a whole, as it is written (the file name is the associated data).

The source is streamed (``training.data.iter_source``, a file or a directory of Parquet files)
in two passes, so sharding's memory does not grow with the data.

The directory is built as ``<data_dir>/.<fingerprint>.tmp-<random>`` and renamed into place only
when complete, so a failure at any point leaves nothing that looks like a dataset.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import math
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import TypeAdapter

from ringflow.training.config import PipelineConfig
from ringflow.training.data import (
    BATCH_ROWS,
    TARGET,
    DataContractError,
    contract_columns,
    in_window,
    iter_source,
    load_flights,
    source_files,
    source_label,
    validate_contract,
    with_target,
)
from ringflow.training.manifest import (
    KEY_ENV,
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    MissingKeyError,
    SealedWriter,
    ShardEntry,
    ShardIntegrityError,
    WindowEntry,
    atomic_write_bytes,
    sha256_file,
)
from ringflow.training.preprocess import StreamingFit

_INDEX = TypeAdapter(dict[str, str])
"""The source index file's content: bytes digest -> rows digest."""

FORMAT_VERSION = 1
"""Bump when the on-disk layout changes: it is part of the fingerprint, so old versions are not reused."""
WINDOW_NAMES = ("train", "validation", "test")
PROGRESS_ROWS = 1_000_000
"""Sharding reports its progress every this many train rows written."""
PREPROCESSOR_FILE = "preprocessor.json"

Progress = Callable[[str], None]


class ShardingError(ValueError):
    """The data cannot be sharded as configured (empty window, too few rows); names the window."""


# --------------------------------------------------------------------------- fingerprint


def files_digest(files: list[Path]) -> str:
    """sha256 over the files' bytes (names left out): the cheap key of the source-digest index."""
    digests = [sha256_file(f) for f in files]
    return digests[0] if len(digests) == 1 else hashlib.sha256("\n".join(digests).encode()).hexdigest()


class SourceIndex:
    """``<data_dir>/.source-index.json``: bytes digest of the source files -> digest of their rows.

    The dataset version is keyed by the *rows* (a directory of monthly files and one file with the
    same rows are the same dataset), which costs a decoding pass; this index lets an unchanged
    source be found up to date by hashing its bytes only.
    """

    def __init__(self, data_dir: Path):
        self.path = Path(data_dir) / ".source-index.json"

    def _load(self) -> dict[str, str]:
        try:
            return _INDEX.validate_json(self.path.read_text())  # our own file
        except (OSError, ValueError):
            return {}

    def get(self, key: str) -> str | None:
        return self._load().get(key)

    def put(self, key: str, rows_digest: str) -> None:
        index = self._load()
        index[key] = rows_digest
        atomic_write_bytes(self.path, json.dumps(index, indent=1, sort_keys=True).encode())


def index_key(cfg: PipelineConfig, files_sha: str) -> str:
    """What the rows digest depends on: the bytes and which columns are read as what."""
    d = cfg.data
    parts = {
        "files": files_sha,
        "columns": stored_columns(cfg),
        "timestamp": d.timestamp_column,
        "numeric": d.numeric_features,
        "categorical": d.categorical_features,
        "format": FORMAT_VERSION,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _key_id(key: bytes) -> str:
    # A one-way tag of the key (HMAC keyed by the key itself), so that re-sharding with a rotated
    # key makes a new version instead of returning files the new key cannot decrypt. Only this
    # tag, mixed into the fingerprint hash, ever leaves memory - never the key.
    return hmac.new(key, b"ringflow/data-key-id", hashlib.sha256).hexdigest()


def fingerprint(cfg: PipelineConfig, source_digest: str, key: bytes | None) -> str:
    """sha256 over the source's rows (their digest), the data + sharding config, the shard count
    and the encryption.

    Left out on purpose: the source *path* and how its rows are split into files (the rows
    identify the source: the same rows by another path, or as a directory of monthly files, are
    the same dataset), and how the key was found
    (``encrypt`` mode, ``key_secret_block``): only whether the files are encrypted, and with which
    key, changes the bytes on disk.
    """
    data = cfg.data.model_dump(mode="json")
    data["source"] = "flights" if cfg.data.source == "flights" else "rows"
    sharding = cfg.sharding.model_dump(mode="json", exclude={"encrypt", "key_secret_block"})
    payload = {
        "format": FORMAT_VERSION,
        "source_sha256": source_digest,
        "data": data,
        "sharding": sharding,
        "num_shards": cfg.num_shards,
        "encrypted": key is not None,
        "key_id": _key_id(key) if key is not None else None,
    }
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


# --------------------------------------------------------------------------- splitting


def shard_sizes(n_rows: int, num_shards: int, weights: list[float] | None = None) -> list[int]:
    """Rows per shard: balanced (sizes differ by at most 1) or proportional to ``weights``.

    Largest-remainder rounding keeps the total exact; every shard gets at least one row, taken
    from the largest shard, so a tiny weight never yields an empty shard (a rank with nothing to read).
    """
    if num_shards < 1:
        raise ShardingError(f"number of shards must be >= 1, got {num_shards}")
    if weights is not None and len(weights) != num_shards:
        raise ShardingError(f"sharding.weights has {len(weights)} entries but there are {num_shards} shards")
    if n_rows < num_shards:
        raise ShardingError(f"{n_rows} training rows cannot fill {num_shards} shards")
    w = weights or [1.0] * num_shards
    total = float(sum(w))
    quotas = [n_rows * x / total for x in w]
    sizes = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(num_shards), key=lambda i: (-(quotas[i] - sizes[i]), i))
    for i in by_remainder[: n_rows - sum(sizes)]:
        sizes[i] += 1
    for i in range(num_shards):
        while sizes[i] == 0:
            donor = max(range(num_shards), key=lambda k: sizes[k])
            sizes[donor] -= 1
            sizes[i] += 1
    return sizes


def stored_columns(cfg: PipelineConfig) -> list[str]:
    d = cfg.data
    return [d.timestamp_column, d.label_column, *d.numeric_features, *d.categorical_features, TARGET]


# --------------------------------------------------------------------------- writing


def shard_file_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- existing versions


def load_verified(directory: Path) -> Manifest | None:
    """The manifest in ``directory`` if it is the one sharding wrote for that fingerprint (its
    digest matches its content, its fingerprint the directory's name) and every file it lists
    verifies; else None (absent, changed or broken)."""
    if not (directory / MANIFEST_NAME).is_file():
        return None
    try:
        manifest = Manifest.load(directory)
        if manifest.digest is None or manifest.fingerprint != directory.name:
            return None
        manifest.verify()
    except (ShardIntegrityError, ValueError, OSError):
        return None
    return manifest


def _publish(tmp: Path, final: Path, progress: Progress) -> Manifest:
    """Rename the finished temp dir to its final name; a valid copy already there wins."""
    try:
        os.rename(tmp, final)
    except OSError:
        # `final` exists: a concurrent run finished first, or a broken version is in the way.
        existing = load_verified(final)
        if existing is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            progress(f"another run published {final.name} first; using it")
            return existing
        stale = final.with_name(f".{final.name}.stale-{secrets.token_hex(4)}")
        os.rename(final, stale)
        os.rename(tmp, final)
        shutil.rmtree(stale, ignore_errors=True)
    _fsync_dir(final.parent)
    return Manifest.load(final)


# --------------------------------------------------------------------------- the stage


def resolve_encryption(cfg: PipelineConfig, key: bytes | None) -> bytes | None:
    """The key to encrypt with, or None: ``off`` ignores a key, ``on`` requires one, ``auto`` uses one if given."""
    mode = cfg.sharding.encrypt
    if key is not None and len(key) not in (16, 24, 32):
        raise ValueError(f"the data key must be 16, 24 or 32 bytes, got {len(key)} bytes")
    if mode == "off":
        return None
    if mode == "on" and key is None:
        where = (
            f"the Prefect Secret block {cfg.sharding.key_secret_block!r}"
            if cfg.sharding.key_secret_block
            else "sharding.key_secret_block (a Prefect Secret block)"
        )
        raise MissingKeyError(
            f"sharding.encrypt is 'on' but no data key is available: set {KEY_ENV} (base64 of 16/24/32 bytes) "
            f"or {where}"
        )
    return key


class SourceScan:
    """Pass 1 over the source, batch by batch: what sharding must know before writing anything."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self.rows = {name: 0 for name in WINDOW_NAMES}
        self.positives = {name: 0 for name in WINDOW_NAMES}
        self.labelled = 0
        self.dropped = 0
        self.first_ts = self.last_ts = None
        self.schema: dict[str, str] | None = None
        self.fit = StreamingFit.for_data(cfg.data)
        self._digest = hashlib.sha256()
        self._digest.update(json.dumps(stored_columns(cfg)).encode())

    @property
    def digest(self) -> str:
        """sha256 over every row's hash, in order: independent of how rows are split into files."""
        return self._digest.hexdigest()

    def add(self, frame: pd.DataFrame, labelled: pd.DataFrame, dropped: int, masks: dict[str, pd.Series]) -> None:
        raw_columns = stored_columns(self.cfg)[:-1]  # all but the derived target
        self._digest.update(pd.util.hash_pandas_object(frame[raw_columns], index=False).to_numpy().tobytes())
        self.dropped += dropped
        self.labelled += len(labelled)
        if len(labelled):
            ts = labelled[self.cfg.data.timestamp_column]
            lo, hi = ts.min(), ts.max()
            self.first_ts = lo if self.first_ts is None else min(self.first_ts, lo)
            self.last_ts = hi if self.last_ts is None else max(self.last_ts, hi)
        for name, mask in masks.items():
            part = labelled.loc[mask]
            self.rows[name] += len(part)
            self.positives[name] += int(part[TARGET].sum())
            if name == "train" and len(part):
                if self.schema is None:
                    self.schema = {str(c): str(t) for c, t in part[stored_columns(self.cfg)].dtypes.items()}
                self.fit.update(part)

    def check(self, origin: str) -> None:
        """Every window has rows, the train window fills the shards; errors name the window."""
        for name in WINDOW_NAMES:
            if not self.rows[name]:
                w = getattr(self.cfg.data.windows, name)
                span = (
                    f"its labelled rows span {self.first_ts:%Y-%m-%d %H:%M} .. {self.last_ts:%Y-%m-%d %H:%M} UTC"
                    if self.labelled
                    else "it has no labelled rows at all"
                )
                raise ShardingError(
                    f"the {name} window {w} (data.windows.{name}) has no labelled rows in {origin}; {span}"
                )
        n_train, n_shards = self.rows["train"], self.cfg.num_shards
        if n_train < n_shards:
            raise ShardingError(
                f"the train window {self.cfg.data.windows.train} has {n_train} labelled rows but {n_shards} shards "
                "were requested (sharding.num_shards, default training.world_size): widen the window or use fewer shards"
            )


def labelled_batches(
    cfg: PipelineConfig, batch_rows: int, flights_table: pd.DataFrame | None = None
) -> Iterator[tuple[pd.DataFrame, pd.DataFrame, int, dict[str, pd.Series]]]:
    """(validated frame, labelled rows, rows dropped for no label, window masks) per source batch."""
    d = cfg.data
    for origin, raw in iter_source(d, batch_rows, flights_table):
        frame = validate_contract(raw, d, origin=origin)
        labelled, dropped = with_target(frame, d)
        masks = {
            name: in_window(labelled, d, getattr(d.windows, name).start, getattr(d.windows, name).end)
            for name in WINDOW_NAMES
        }
        yield frame, labelled, dropped, masks


def shard_assignment(n_train: int, sizes: list[int], seed: int) -> np.ndarray:
    """Shard index of each train row (in source order): one seeded shuffle of the window, then
    consecutive slices of ``sizes``, so shards are disjoint, cover the window and are random samples
    of it, and only this small array (2 bytes a row) is held, never the rows."""
    index = np.arange(n_train, dtype=np.int32 if n_train < 2**31 else np.int64)  # half the bytes of int64
    order = np.random.default_rng(seed).permutation(index)
    shard_of = np.empty(n_train, dtype=np.int16 if len(sizes) < 2**15 else np.int32)
    offset = 0
    for i, size in enumerate(sizes):
        shard_of[order[offset : offset + size]] = i
        offset += size
    return shard_of


class _TableWriter:
    """One Parquet file written in row groups through a :class:`SealedWriter`."""

    def __init__(self, path: Path, schema: pa.Schema, key: bytes | None):
        self.sink = SealedWriter(path, key, path.name)
        self.writer = pq.ParquetWriter(self.sink, schema)
        self.schema = schema
        self.rows = 0

    def write(self, frame: pd.DataFrame) -> None:
        if len(frame):
            self.writer.write_table(pa.Table.from_pandas(frame, schema=self.schema, preserve_index=False))
            self.rows += len(frame)

    def close(self) -> FileEntry:
        self.writer.close()
        self.sink.close()
        return self.sink.entry(self.rows)


def shard_dataset(
    cfg: PipelineConfig,
    data_dir: Path,
    key: bytes | None = None,
    progress: Progress = print,
    batch_rows: int = BATCH_ROWS,
) -> Manifest:
    """Shard the configured source into ``data_dir/<fingerprint>/`` and return its manifest.

    Two streaming passes over the source, ``batch_rows`` at a time, so memory does not grow with
    the data: pass 1 checks the contract, counts the windows, fits the preprocessing (running
    statistics and vocabularies) and digests the rows; pass 2 routes each train row to its shard
    and writes every file in row groups (encrypted as it is written when a key is given).

    Idempotent: when that version exists and verifies, it is returned without any work (an
    unchanged source is recognised by its bytes, see :class:`SourceIndex`). Every input check
    (source, contract, windows, shard count, key) runs before anything is written.
    """
    data_dir = Path(data_dir)
    enc_key = resolve_encryption(cfg, key)
    origin = source_label(cfg.data)
    files = source_files(cfg.data)
    index = SourceIndex(data_dir)
    key_of_files = index_key(cfg, files_digest(files))
    known = index.get(key_of_files)
    if known is not None:
        existing = load_verified(data_dir / fingerprint(cfg, known, enc_key))
        if existing is not None:
            progress(f"up to date: {existing.path} (fingerprint {existing.fingerprint[:12]})")
            return existing

    progress(f"loading {origin}")
    # The built-in source is one small table in memory either way: both passes use one parse of
    # its CSVs (0.5 of the stage's 2.1 s went to parsing and joining them a second time).
    table = load_flights(contract_columns(cfg.data)) if cfg.data.source == "flights" else None
    scan = SourceScan(cfg)
    for frame, labelled, dropped, masks in labelled_batches(cfg, batch_rows, table):
        scan.add(frame, labelled, dropped, masks)
    if scan.labelled == 0 and scan.dropped == 0:
        raise DataContractError(f"{origin}: no rows; the data contract needs labelled rows")
    progress(f"loaded {scan.labelled:,} labelled rows ({scan.dropped:,} without a label dropped)")
    scan.check(origin)
    fp = fingerprint(cfg, scan.digest, enc_key)
    final = data_dir / fp
    data_dir.mkdir(parents=True, exist_ok=True)
    index.put(key_of_files, scan.digest)
    existing = load_verified(final)
    if existing is not None:
        progress(f"up to date: {existing.path} (fingerprint {fp[:12]})")
        return existing
    if final.exists():
        progress(f"{final} exists but does not verify (missing or changed files): rebuilding it")

    n_shards = cfg.num_shards
    sizes = shard_sizes(scan.rows["train"], n_shards, cfg.sharding.weights)
    progress("windows: " + ", ".join(f"{n} {getattr(cfg.data.windows, n)} {scan.rows[n]:,} rows" for n in WINDOW_NAMES))
    preprocessor = scan.fit.result()
    progress(f"fitted preprocessing on the train window ({scan.rows['train']:,} rows)")
    shard_of = shard_assignment(scan.rows["train"], sizes, cfg.sharding.seed)
    columns = stored_columns(cfg)

    # Nothing has been written yet; from here on every file goes into a temp dir.
    tmp = data_dir / f".{fp}.tmp-{secrets.token_hex(6)}"
    tmp.mkdir()
    writers: dict[str, _TableWriter] = {}
    try:
        pre_path = preprocessor.save(tmp / PREPROCESSOR_FILE)
        pre_entry = FileEntry(
            file=PREPROCESSOR_FILE, rows=0, bytes=pre_path.stat().st_size, sha256=sha256_file(pre_path)
        )
        schema = None
        names = [shard_file_name(i) for i in range(n_shards)] + ["validation.parquet", "test.parquet"]
        for i, size in enumerate(sizes):
            progress(f"writing shard {i + 1}/{n_shards} ({size:,} rows)")
        seen = 0
        for _, labelled, _, masks in labelled_batches(cfg, batch_rows, table):
            if schema is None and len(labelled):
                schema = pa.Schema.from_pandas(labelled[columns].head(0), preserve_index=False)
                writers = {name: _TableWriter(tmp / name, schema, enc_key) for name in names}
            train = labelled.loc[masks["train"], columns]
            route = shard_of[seen : seen + len(train)]
            seen += len(train)
            for i in np.unique(route):
                writers[shard_file_name(int(i))].write(train.iloc[np.flatnonzero(route == i)])
            writers["validation.parquet"].write(labelled.loc[masks["validation"], columns])
            writers["test.parquet"].write(labelled.loc[masks["test"], columns])
            if seen // PROGRESS_ROWS != (seen - len(train)) // PROGRESS_ROWS:
                progress(f"written {seen:,} of {scan.rows['train']:,} train rows")
        if seen != scan.rows["train"]:
            raise ShardingError(
                f"the source changed while it was sharded ({origin}: {scan.rows['train']:,} "
                f"train rows in the first pass, {seen:,} in the second): run it again"
            )
        progress("writing validation and test windows")
        entries = {name: w.close() for name, w in writers.items()}
        weights = cfg.sharding.weights or [1.0] * n_shards
        shards = [
            ShardEntry(**entries[shard_file_name(i)].model_dump(), index=i, weight=weights[i]) for i in range(n_shards)
        ]

        manifest = Manifest(
            fingerprint=fp,
            source=origin,
            source_sha256=scan.digest,
            created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            seed=cfg.sharding.seed,
            encrypted=enc_key is not None,
            schema_=scan.schema,
            timestamp_column=cfg.data.timestamp_column,
            label_column=cfg.data.label_column,
            target_column=TARGET,
            numeric_features=list(cfg.data.numeric_features),
            categorical_features=list(cfg.data.categorical_features),
            windows={
                name: WindowEntry(
                    start=str(getattr(cfg.data.windows, name).start),
                    end=str(getattr(cfg.data.windows, name).end),
                    rows=scan.rows[name],
                    positives=scan.positives[name],
                )
                for name in WINDOW_NAMES
            },
            rows_total=scan.labelled,
            rows_dropped_unlabelled=scan.dropped,
            shards=shards,
            validation=entries["validation.parquet"],
            test=entries["test.parquet"],
            preprocessor=pre_entry,
            config={
                "data": cfg.data.model_dump(mode="json"),
                "sharding": cfg.sharding.model_dump(mode="json"),
                "num_shards": n_shards,
            },
        )
        manifest.write(tmp)  # last: a directory with a manifest is a complete one
        _fsync_dir(tmp)
        published = _publish(tmp, final, progress)
    except BaseException:
        for w in writers.values():
            try:
                w.close()
            except Exception:  # noqa: BLE001 - already failing; the temp dir goes anyway
                pass
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    progress(f"manifest: {published.path}")
    return published

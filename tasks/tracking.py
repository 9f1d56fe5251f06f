"""The MLflow experiment every ringflow run goes to, and the datasets its runs log."""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pandas as pd
from mlflow import MlflowClient
from mlflow.data.pandas_dataset import PandasDataset, from_pandas
from mlflow.exceptions import MlflowException

from ringflow.training import tags
from ringflow.training.config import get_settings
from ringflow.training.environment import cache_dir
from ringflow.training.launch import start_ticks
from ringflow.training.manifest import FileEntry, sha256_bytes

# Tracking servers keep artifacts where their operator said (`mlflow server --artifacts-destination`).
_SERVERS = {"http", "https", "databricks"}


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """The experiment's id, created on first use.

    With a local store (the SQLite file, a database URI) the artifacts go under
    ``$RINGFLOW_HOME/artifacts/<experiment>``: MLflow's default is ``./mlruns`` in whatever
    directory the command happened to run from, away from the rest of the state.
    """
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if urlparse(client.tracking_uri).scheme not in _SERVERS:
        location = (get_settings().artifacts_dir / name).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":  # another process created it meanwhile
            raise
        exp = client.get_experiment_by_name(name)
        if exp is None:  # created, then deleted again before this read
            raise
        return exp.experiment_id


# --------------------------------------------------------------------------- the store and stale runs


def ensure_store(tracking_uri: str) -> None:
    """Create a local SQLite store once, under a file lock.

    MLflow migrates a fresh database when the first client opens it; two ``ringflow run`` started
    together on a new home would both migrate and one would fail on the half-made schema.
    """
    from urllib.parse import unquote

    if not tracking_uri.startswith("sqlite:///"):
        return
    db = Path(unquote(tracking_uri[len("sqlite:///") :]))
    if not db.is_absolute():
        db = Path("/") / db
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(f".{db.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not db.exists():
            shutil.copyfile(schema_template(), db)
        MlflowClient(tracking_uri).search_experiments(max_results=1)  # checks the schema, adds the default experiment


def schema_template(cache: Path | None = None) -> Path:
    """An empty SQLite store with MLflow's schema, built once per MLflow version and copied for a new
    store: a fresh store otherwise replays every one of MLflow's schema migrations (about 1 CPU
    second here, on every new home, before a run can start). Only the schema: the default
    experiment is created by the client that opens the copy, with that store's artifact root.
    ``cache``: default ``$XDG_CACHE_HOME/ringflow`` (``~/.cache/ringflow``)."""
    import mlflow
    from mlflow.store.db.utils import _initialize_tables, create_sqlalchemy_engine

    cache = cache or cache_dir()
    template = cache / f"mlflow-{mlflow.__version__}-schema.db"
    if template.exists():
        return template
    cache.mkdir(parents=True, exist_ok=True)
    partial = template.with_name(f".{template.name}.{os.getpid()}.partial")
    engine = create_sqlalchemy_engine(f"sqlite:///{partial}")  # type: ignore[no-untyped-call]
    try:
        _initialize_tables(engine)  # type: ignore[no-untyped-call]  # what MLflow does to an empty database (no public name)
    finally:
        engine.dispose()
    os.replace(partial, template)  # whole or absent: another process may build it at the same time
    return template


def launcher_tag() -> str:
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{start_ticks(pid)}"


def _launcher_alive(tag: str) -> bool:
    host, _, rest = tag.partition(":")
    pid, _, ticks = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True  # another host's run: not ours to judge
    return Path(f"/proc/{pid}").exists() and str(start_ticks(int(pid))) == ticks


def mark_stale_runs(client: MlflowClient, experiment_id: str, kind: str) -> list[str]:
    """Runs of ``kind`` left RUNNING by a launcher on this host that no longer exists -> KILLED."""
    stale = []
    for run in client.search_runs(
        [experiment_id], "attributes.status = 'RUNNING' and " + tags.tag_filter(tags.KIND, kind), max_results=200
    ):
        tag = run.data.tags.get(tags.LAUNCHER)
        if tag and not _launcher_alive(tag):
            client.set_tag(run.info.run_id, tags.STALE, f"launcher {tag} is gone; marked KILLED by {launcher_tag()}")
            client.set_terminated(run.info.run_id, "KILLED")
            stale.append(run.info.run_id)
    return stale


SCHEMA_SAMPLE_ROWS = 1000
"""Rows (plus one gap per column that has gaps) the schema of a logged dataset is inferred on."""


def pandas_dataset(frame: pd.DataFrame, **kwargs: Any) -> PandasDataset:
    """``mlflow.data.from_pandas(frame, **kwargs)``, its schema inferred on a sample that keeps
    every column's type and gaps: MLflow infers it value by value in Python, about 4 s for the
    default train and validation windows (133k rows) on 2 cores, for the same schema. The
    profile (rows, elements) and the digest still describe the whole frame."""
    dataset = from_pandas(frame, **kwargs)
    gaps = frame.isna()
    rows = set(range(min(len(frame), SCHEMA_SAMPLE_ROWS)))
    rows |= {int(gaps[c].to_numpy().argmax()) for c in frame.columns if gaps[c].any()}
    # PandasDataset.schema is a functools.cached_property: the sample's answer is cached as its own
    dataset.__dict__["schema"] = from_pandas(frame.iloc[sorted(rows)]).schema
    return dataset


def lineage_digest(files: Sequence[FileEntry]) -> str:
    """The digest of a dataset read from ``files`` (a manifest's shards, its validation or test
    file): their sha256, shortened, in place of MLflow's own digest, which maps ``type`` over
    every cell of the frame in Python (1.5 s for the default train and validation windows)."""
    return (files[0].sha256 if len(files) == 1 else sha256_bytes("".join(f.sha256 for f in files).encode()))[:16]

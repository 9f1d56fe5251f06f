"""Prefect task for the sharding stage: resolve the data key, shard, summarise as an artifact.

The work itself is :func:`training.sharding.shard_dataset`; this module owns the side effects
that need Prefect (the Secret block, the run logger, the artifact).
"""

from __future__ import annotations

from typing import Any

from prefect import Task, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.client.schemas.objects import State, TaskRun

from ringflow.tasks.timings import timed
from ringflow.training.config import PipelineConfig, get_settings
from ringflow.training.manifest import KEY_ENV, Manifest, MissingKeyError, key_from_env, parse_key
from ringflow.training.sharding import shard_dataset

ARTIFACT_KEY = "shard-manifest"


class DataKeyError(ValueError):
    """The configured data key cannot be loaded; names the block, never the value."""


def resolve_data_key(cfg: PipelineConfig) -> bytes | None:
    """The AES key for data at rest: ``RINGFLOW_DATA_KEY``, else the Prefect Secret block named by
    ``sharding.key_secret_block``, else None.

    The training launch task passes the result to horovodrun through ``RINGFLOW_DATA_KEY``, so the
    ranks never talk to Prefect.
    """
    key = key_from_env()
    if key is not None:
        return key
    block_name = cfg.sharding.key_secret_block
    if not block_name:
        return None
    from prefect.blocks.system import Secret

    try:
        block = Secret.load(block_name)
    except ValueError as e:  # Prefect: "Unable to find block document named ..."
        raise DataKeyError(
            f"sharding.key_secret_block: Prefect Secret block {block_name!r} not found "
            f"(create it, or set {KEY_ENV}): {e}"
        ) from None
    assert isinstance(block, Secret)  # Prefect types a sync load as `Secret | Coroutine` (async_dispatch)
    # The raw value, not Secret.get(): that JSON-decodes strings, which could turn a key into a number.
    raw = block.value.get_secret_value()
    if not isinstance(raw, str):
        raise DataKeyError(f"Prefect Secret block {block_name!r} must hold a base64 string, not a {type(raw).__name__}")
    try:
        return parse_key(raw, origin=f"Prefect Secret block {block_name!r}")
    except ValueError as e:
        raise DataKeyError(str(e)) from None


def _key_source(cfg: PipelineConfig, key: bytes | None) -> str:
    if key is None:
        return "none"
    return KEY_ENV if key_from_env() is not None else f"Secret block {cfg.sharding.key_secret_block!r}"


def _retryable(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry I/O hiccups only: a bad config, bad data or a missing key fails the same way twice."""
    exc = state.result(raise_on_failure=False)
    return not isinstance(exc, (ValueError, MissingKeyError))


def manifest_markdown(manifest: Manifest) -> str:
    """Short human summary of a manifest (no key material: the manifest holds none)."""
    rows = "\n".join(
        f"| {name} | {w.start} .. {w.end} | {w.rows:,} | {w.positives / w.rows:.1%} |"
        for name, w in manifest.windows.items()
    )
    sizes = ", ".join(f"{s.rows:,}" for s in manifest.shards)
    return (
        f"## Sharding manifest `{manifest.fingerprint[:12]}`\n\n"
        f"Source **{manifest.source}** (sha256 `{manifest.source_sha256[:12]}`): "
        f"{manifest.rows_total:,} labelled rows, {manifest.rows_dropped_unlabelled:,} without a label dropped.\n\n"
        "| window | dates [start, end) | rows | positive share |\n|---|---|---|---|\n"
        f"{rows}\n\n"
        f"**{len(manifest.shards)} shards** (rows: {sizes}), shuffle seed {manifest.seed}, "
        f"encrypted: {'yes (AES-GCM)' if manifest.encrypted else 'no'}.\n\n"
        f"Fingerprint `{manifest.fingerprint}`\n\nManifest: `{manifest.path}`\n"
    )


@task(name="shard", retries=1, retry_delay_seconds=2, retry_condition_fn=_retryable)
def shard_data(cfg: PipelineConfig) -> str:
    """Shard ``cfg.data`` into ``$RINGFLOW_HOME/data/<fingerprint>/``; returns the manifest path."""
    log = get_run_logger()
    key = resolve_data_key(cfg)
    log.info("shard: data key: %s, encrypt=%s", _key_source(cfg, key), cfg.sharding.encrypt)
    with timed("shard", "sharding", "work"):
        manifest = shard_dataset(cfg, get_settings().data_dir, key=key, progress=lambda msg: log.info("shard: %s", msg))
    create_markdown_artifact(
        manifest_markdown(manifest),
        key=ARTIFACT_KEY,
        description=f"{cfg.name}: {len(manifest.shards)} shards, fingerprint {manifest.fingerprint[:12]}",
    )
    return str(manifest.path)

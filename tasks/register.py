"""Registration stage: every evaluated candidate becomes a model version; the gate moves aliases.

``champion`` moves to a promoted candidate and ``previous-champion`` to the version it replaces;
a rejected candidate gets ``challenger`` and stays registered. MLflow keeps no history of alias
moves (mlflow#2169), so each move is recorded as a registered-model tag
``alias_history.<UTC time>.<alias>`` whose value is JSON {time, alias, from, to, reason}.

Pipelines of one model can register at the same time (two ``ringflow run``, a deployment run next
to a CLI run). The alias decision reads the champion and moves it; two of those interleaved would
both promote against the same old champion and the later would silently overwrite the earlier.
So it runs under one Prefect global concurrency limit per model (``ringflow-registry-<model>``,
one slot, created on first use): decided against the champion of that moment, one at a time.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from contextlib import contextmanager

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from prefect import get_run_logger, task
from pydantic import BaseModel

from ringflow.tasks.evaluate import CHAMPION, EvaluationResult, current_champion, version_by_alias
from ringflow.tasks.timings import Laps
from ringflow.tasks.training_artifacts import LineLogger
from ringflow.training import tags
from ringflow.training.config import PipelineConfig, get_settings
from ringflow.training.manifest import Manifest
from ringflow.training.result import TrainResult
from ringflow.training.version import source_commit

PREVIOUS_CHAMPION = "previous-champion"
CHALLENGER = "challenger"
REGISTRY_LOCK_PREFIX = "ringflow-registry-"
REGISTRY_LOCK_TIMEOUT_S = 300
"""How long a registration waits for another one's alias decision (each takes seconds)."""


class RegistrationResult(BaseModel):
    model_name: str
    version: str
    promoted: bool
    champion_version: str | None
    """The version behind @champion after this stage."""
    alias_moves: list[dict[str, str | None]]


def move_alias(
    client: MlflowClient, name: str, alias: str, version: str | None, reason: str
) -> dict[str, str | None] | None:
    """Point ``alias`` at ``version`` and record the move; a no-op move records nothing."""
    current = version_by_alias(client, name, alias)
    before = str(current.version) if current is not None else None
    if before == version:
        return None
    if version is None:
        client.delete_registered_model_alias(name, alias)
    else:
        client.set_registered_model_alias(name, alias, version)
    now = dt.datetime.now(dt.UTC)
    move: dict[str, str | None] = {
        "time": now.isoformat(timespec="seconds"),
        "alias": alias,
        "from": before,
        "to": version,
        "reason": reason,
    }
    client.set_registered_model_tag(
        name, tags.alias_history_key(now.strftime("%Y%m%dT%H%M%S.%f"), alias), json.dumps(move)
    )
    return move


def alias_history(client: MlflowClient, name: str) -> list[dict[str, str | None]]:
    """All recorded alias moves of a registered model, oldest first."""
    model_tags = client.get_registered_model(name).tags
    return [json.loads(model_tags[k]) for k in sorted(k for k in model_tags if k.startswith(tags.ALIAS_HISTORY_PREFIX))]


def _existing_version(client: MlflowClient, name: str, run_id: str) -> ModelVersion | None:
    """The version already registered for this training run (a retried stage must not register twice)."""
    for mv in client.search_model_versions(f"name='{name}'"):
        if mv.tags.get(tags.TRAINING_RUN_ID) == run_id:
            return mv
    return None


@contextmanager
def registry_lock(model_name: str) -> Iterator[None]:
    """Hold the model's registry slot (a Prefect global concurrency limit of 1) for the block.

    Through the Prefect API the run already talks to, so it holds across processes and hosts.
    The slot is leased: a holder that dies frees it when its lease runs out.
    """
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    limit = f"{REGISTRY_LOCK_PREFIX}{model_name}"
    with get_client(sync_client=True) as client:
        try:
            # read first: a create of an existing limit fails inside the server, which logs the
            # database's UNIQUE error with its traceback in the run's output
            client.read_global_concurrency_limit_by_name(limit)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=limit, limit=1))
            except ObjectAlreadyExists:  # another run created it meanwhile
                pass
    with concurrency(limit, occupy=1, timeout_seconds=REGISTRY_LOCK_TIMEOUT_S, strict=True):
        yield


def _v(version: str | None) -> str:
    return f"v{version}" if version else "none"


def settle_aliases(
    client: MlflowClient,
    name: str,
    version: str,
    promote: bool,
    evaluated_champion: str | None,
    reason: str,
    log: LineLogger,
) -> tuple[bool, str, list[dict[str, str | None]]]:
    """Move the aliases for a registered candidate; returns (promoted, reason, moves).

    A promotion decided against ``evaluated_champion`` stands only if that is still the
    champion: otherwise another pipeline promoted since and this comparison is stale. Call it
    under :func:`registry_lock`, so that the champion cannot move between the check and the move.
    """
    moves: list[dict[str, str | None] | None] = []
    champion_now = current_champion(client, name)
    champion_now_version = str(champion_now.version) if champion_now else None
    if promote and champion_now_version not in (evaluated_champion, version):
        # Another pipeline promoted a model after we evaluated: our comparison is stale.
        promote = False
        reason = (
            f"champion moved from {_v(evaluated_champion)} to {_v(champion_now_version)} during "
            "evaluation; re-run the pipeline to compare against the new champion"
        )
        client.set_model_version_tag(name, version, tags.GATE_DECISION, "reject")
        log.warning("register: %s", reason)
    if promote:
        if champion_now_version and champion_now_version != version:
            moves.append(move_alias(client, name, PREVIOUS_CHAMPION, champion_now_version, f"replaced by v{version}"))
        moves.append(move_alias(client, name, CHAMPION, version, reason))
    else:
        moves.append(move_alias(client, name, CHALLENGER, version, reason))
    return promote, reason, [m for m in moves if m]


@task(name="register", retries=2, retry_delay_seconds=5)
def register_candidate(
    cfg: PipelineConfig,
    train_result: TrainResult,
    evaluation: EvaluationResult,
    manifest_path: str,
    parent_run_id: str | None = None,
) -> RegistrationResult:
    log = get_run_logger()
    lap = Laps("register")
    mlflow.set_tracking_uri(get_settings().tracking_uri)
    client = MlflowClient()
    name = cfg.registry.model_name
    manifest = Manifest.load(manifest_path)
    run_id = evaluation.training_run_id
    version_tags = {
        tags.TRAINING_RUN_ID: run_id,
        tags.DATA_FINGERPRINT: manifest.fingerprint,
        tags.MANIFEST_PATH: str(manifest.path),
        tags.CONFIG_HASH: cfg.config_hash(),
        tags.GIT_COMMIT: source_commit() or "unknown",
        tags.WORLD_SIZE: str(train_result.world_size),
        tags.TEST_ROC_AUC: f"{evaluation.candidate_metrics['roc_auc']:.6f}",
        tags.GATE_DECISION: "promote" if evaluation.decision.promote else "reject",
        tags.GATE_REASONS: evaluation.decision.summary[:4000],
    }
    if parent_run_id:
        version_tags[tags.PARENT_RUN_ID] = parent_run_id

    mv = _existing_version(client, name, run_id)
    if mv is None:
        mv = mlflow.register_model(evaluation.model_uri, name, tags=version_tags)
        log.info("register: %s version %s from run %s", name, mv.version, run_id)
    else:
        log.info("register: run %s is already version %s (retry), not registering again", run_id, mv.version)
    version = str(mv.version)
    client.update_model_version(name, version, description=evaluation.decision.summary[:4000])
    lap("MLflow: register the model version")

    with registry_lock(name):
        promote, _, moves = settle_aliases(
            client,
            name,
            version,
            evaluation.decision.promote,
            evaluation.champion_version,
            evaluation.decision.summary,
            log,
        )
    champion = current_champion(client, name)
    lap("registry lock (Prefect) + MLflow aliases")
    for m in moves:
        log.info(
            "register: alias %s: %s -> %s",
            m["alias"],
            f"v{m['from']}" if m["from"] else "none",
            f"v{m['to']}" if m["to"] else "none",
        )
    return RegistrationResult(
        model_name=name,
        version=version,
        promoted=promote,
        champion_version=str(champion.version) if champion else None,
        alias_moves=moves,
    )

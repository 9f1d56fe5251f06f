"""Deployments, schedules and the rerun automation (``ringflow deploy``), and the serve process.

- ``training-pipeline/training-pipeline``: the config form (from the pydantic model) with the
  deployed config as default, a cron schedule ``schedules.training_cron`` (weekly by default).
- ``monitoring/monitoring``: ``batch="next"`` on ``schedules.monitoring_cron`` (daily).
- Automation ``ringflow-rerun-on-anomaly``: one ``ringflow.anomaly.detected`` event for this
  model -> one run of the training deployment with the config, reason and cause the monitoring
  flow put in the event. Declared with the training deployment (a ``DeploymentEventTrigger``):
  Prefect creates it as an automation owned by the deployment and replaces it on every apply.

- The notification automations (``flows/notifications.py``) when a webhook URL is configured.

Everything is create-or-update by name, so ``deploy`` can run any number of times.
``python -m ringflow.flows.deployments serve`` (started by ``ringflow up``) deploys, then executes the runs;
``deploy(cfg, work_pool=...)`` (``ringflow deploy --work-pool``) puts the same deployments on a work
pool of any type, whose workers run them.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from datetime import timedelta
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ringflow.monitoring.events import (
    ANOMALY_EVENT,
    CAUSE_LABEL,
    DEPLOYMENT_NAMES,
    MONITORING_FLOW,
    RERUN_TRIGGER,
    TRAINING_DEPLOYMENT,
    TRAINING_FLOW,
    rerun_parameters,
)
from ringflow.monitoring.events import model_resource_id as event_resource_id
from ringflow.training.config import PipelineConfig, load_config
from ringflow.training.environment import process_defaults
from ringflow.training.version import SOURCE_ROOT

if TYPE_CHECKING:
    from uuid import UUID

    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments.runner import RunnerDeployment
    from prefect.events import DeploymentEventTrigger

    from ringflow.flows.training_pipeline import PipelineResult
    from ringflow.infra.hosts import ClusterState

TRAINING = TRAINING_FLOW
MONITORING = MONITORING_FLOW
AUTOMATION_NAME = RERUN_TRIGGER
REASON_MANUAL = "manual"
REASON_SCHEDULED = "scheduled"
RERUN_PARAMETERS: dict[str, Any] = rerun_parameters()
"""The training run's parameters, read from the event (paths checked against the payload model)."""


def model_resource_id(cfg: PipelineConfig) -> str:
    return event_resource_id(cfg.registry.model_name)


def rerun_trigger(cfg: PipelineConfig) -> DeploymentEventTrigger:
    """``ringflow-rerun-on-anomaly``: each anomaly event for this model -> one training run.

    Reactive, threshold 1, one bucket per cause (the event's ``ringflow.anomaly.cause`` label)
    and window ``monitoring.cooldown_hours``: the first event of a cause fires at once, further
    events of that cause within the cooldown start nothing (a storm of 50 events is one run),
    another cause gets its own run. The monitoring policy applies the same cooldown and the rerun
    budget before it emits; this is the guard on the receiving side. The action's idempotency
    key (the triggering event) keeps a redelivered event from running twice.
    """
    from prefect.events import DeploymentEventTrigger
    from prefect.events.schemas.automations import Posture

    return DeploymentEventTrigger(
        name=AUTOMATION_NAME,
        description=(
            f"{ANOMALY_EVENT} for {model_resource_id(cfg)} -> one {DEPLOYMENT_NAMES[0]} run with the "
            "adapted config from the event (reason, monitoring run and anomaly id are passed on)"
        ),
        enabled=True,
        expect={ANOMALY_EVENT},
        match={"prefect.resource.id": model_resource_id(cfg)},
        for_each={CAUSE_LABEL},
        posture=Posture.Reactive,
        threshold=1,
        within=timedelta(hours=cfg.monitoring.cooldown_hours),
        parameters=RERUN_PARAMETERS,
    )


def build_deployments(cfg: PipelineConfig) -> list[RunnerDeployment]:
    """The two RunnerDeployments (not yet sent to the server)."""
    from prefect.deployments.runner import RunnerDeployment
    from prefect.schedules import Cron

    from ringflow.flows.monitoring import monitoring_flow
    from ringflow.flows.training_pipeline import training_pipeline

    tz = cfg.schedules.timezone
    config = cfg.model_dump(mode="json")
    tags = ["ringflow", cfg.name]
    training = training_pipeline.to_deployment(
        name=TRAINING,
        description="shard -> Horovod training -> evaluation -> MLflow registry (champion gate)",
        # A run from the UI, the CLI or run_deployment is "manual"; the schedule says "scheduled"
        # (Prefect merges a schedule's parameters over the deployment's for the runs it creates).
        parameters={"config": config, "reason": REASON_MANUAL},
        schedules=[
            Cron(
                cfg.schedules.training_cron, timezone=tz, slug="training-cron", parameters={"reason": REASON_SCHEDULED}
            )
        ],
        tags=tags,
        concurrency_limit=1,  # two trainings would share the 2 cores and the champion alias
        triggers=[rerun_trigger(cfg)],
    )
    monitoring = monitoring_flow.to_deployment(
        name=MONITORING,
        description="score the next batch with the champion; Evidently drift/quality; anomaly -> rerun event",
        parameters={"config": config, "batch": "next", "trigger_rerun": True},
        schedules=[Cron(cfg.schedules.monitoring_cron, timezone=tz, slug="monitoring-cron")],
        tags=tags,
        concurrency_limit=1,
    )
    # sync calls; Prefect types them `RunnerDeployment | Coroutine` (async_dispatch)
    assert isinstance(training, RunnerDeployment) and isinstance(monitoring, RunnerDeployment)
    return [training, monitoring]


def _drop_automations_by_name() -> None:
    """Remove every automation with our name before the deployment (re)creates its own: a
    hand-made one of older ringflow versions would start a second run per event. (Prefect
    keeps ownership as a related resource that reads do not return, so delete by name first.)"""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        for a in client.read_automations_by_name(AUTOMATION_NAME):
            client.delete_automation(a.id)


def _automation_id() -> Any:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        found = client.read_automations_by_name(AUTOMATION_NAME)
    return found[0].id if found else None


REPO_ROOT = SOURCE_ROOT  # the checkout, or the installed package


class DeployError(ValueError):
    """A bad ``deploy`` argument (work pool, job variable), named in the message."""


def parse_job_variables(items: list[str] | None) -> dict[str, Any]:
    """``key=value`` pairs (``prefect deploy --job-variable`` style) -> job variables.

    A value that parses as JSON is taken as JSON (``env={"A": "1"}``, ``stream_output=false``),
    else as a string; a dotted key sets one text entry of a dict variable
    (``env.MLFLOW_TRACKING_URI=http://mlflow:5000``: environment values are text).
    """
    import json

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise DeployError(f"--job-variable {item!r}: expected key=value")
        head, *rest = key.strip().split(".")
        try:
            value: Any = raw if rest else json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if not rest:
            out[head] = value
            continue
        target = out.setdefault(head, {})
        if not isinstance(target, dict):
            raise DeployError(f"--job-variable {item!r}: {head!r} was already set to a non-object value")
        for part in rest[:-1]:
            target = target.setdefault(part, {})
        target[rest[-1]] = value
    return out


def by_module_path(deployments: list[RunnerDeployment]) -> list[RunnerDeployment]:
    """The flows' entrypoints by *module path* (``ringflow.flows.training_pipeline.training_pipeline``),
    as a worker imports them: a file entrypoint would load as a top-level module and its persisted
    results would not unpickle under ``ringflow.flows.*``."""
    from ringflow.flows.monitoring import monitoring_flow
    from ringflow.flows.training_pipeline import training_pipeline

    modules = {f.name: f"{f.fn.__module__}.{f.fn.__name__}" for f in (training_pipeline, monitoring_flow)}
    for dep in deployments:
        dep.entrypoint = modules[_flow_name(dep)]
    return deployments


def _flow_name(dep: RunnerDeployment) -> str:
    if dep.flow_name is None:  # Flow.to_deployment always sets it
        raise DeployError(f"deployment {dep.name!r} names no flow")
    return dep.flow_name


def for_work_pool(
    deployments: list[RunnerDeployment], job_variables: dict[str, Any] | None = None, source: Path = REPO_ROOT
) -> list[RunnerDeployment]:
    """The deployments as a worker of any pool type runs them: the flows by module path, a pull
    step that starts each run in ``source`` (the repository: this checkout for a process pool,
    ``/app`` in the image), and the job variables."""
    from prefect.runner.storage import LocalStorage

    for dep in by_module_path(deployments):
        dep.storage = LocalStorage(str(source))
        dep.job_variables = {**dep.job_variables, **(job_variables or {})}
    return deployments


def _check_work_pool(name: str) -> str:
    """The pool's type; a clear error when it does not exist (a worker's ``--type`` or
    ``prefect work-pool create`` makes it)."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_work_pool(name).type
        except ObjectNotFound:
            raise DeployError(
                f"work pool {name!r} does not exist: create it (`prefect work-pool create {name} --type process`) "
                f"or start its worker (`prefect worker start --pool {name} --type process`) first"
            ) from None


def deploy(
    cfg: PipelineConfig,
    work_pool: str | None = None,
    job_variables: dict[str, Any] | None = None,
    source: Path = REPO_ROOT,
    keep_notifications: bool = False,
) -> dict[str, Any]:
    """Create/update both deployments (each with its schedule, concurrency limit and, for
    training, the rerun trigger) and the notification automations; return their ids by name.

    ``work_pool``: the deployments go to that pool (any type: its worker runs them with
    ``job_variables``); without it they are for the ``serve`` process. ``keep_notifications``:
    without a configured webhook URL, leave the notification automations as they are.
    """
    if job_variables and not work_pool:
        raise DeployError("--job-variable needs --work-pool (job variables belong to a work pool's job template)")
    deployments = build_deployments(cfg)
    if work_pool:
        _check_work_pool(work_pool)
        for_work_pool(deployments, job_variables, source)
    _drop_automations_by_name()
    # apply() (re)creates each deployment's triggers as automations it owns
    ids = {f"{_flow_name(d)}/{d.name}": d.apply(work_pool_name=work_pool) for d in deployments}
    ids[AUTOMATION_NAME] = _automation_id()
    from ringflow.flows.notifications import apply_notifications

    ids.update(apply_notifications(cfg, keep_when_off=keep_notifications))
    return ids


KUBERNETES_TEMPLATE = Path(str(resources.files("ringflow.infra") / "k8s" / "work-pool.json"))
"""The Kubernetes work pool's base job template (prefect-kubernetes' default plus ringflow's
claim, /dev/shm and Secret; infra/kubernetes.md)."""


def create_kubernetes_pool(name: str, template: Path = KUBERNETES_TEMPLATE) -> Any:
    """Create (or update) the ``kubernetes``-type work pool ``name`` from ``template``; the server
    then checks every deployment's job variables against the template's ``variables`` schema."""
    import json

    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectAlreadyExists

    base = json.loads(Path(template).read_text())
    with get_client(sync_client=True) as client:
        try:
            return client.create_work_pool(WorkPoolCreate(name=name, type="kubernetes", base_job_template=base))
        except ObjectAlreadyExists:
            client.update_work_pool(name, WorkPoolUpdate(base_job_template=base))
            return client.read_work_pool(name)


def deploy_to_kubernetes(
    cfg: PipelineConfig, pool: str, image: str, job_variables: dict[str, Any] | None = None
) -> dict[str, str]:
    """The deployments of :func:`deploy` (parameters, schedules, rerun trigger) on the Kubernetes
    work pool ``pool``, each flow run a Job of ``image`` (the code is in the image: no storage,
    entrypoints by module path as in the image's /app). Returns {flow/deployment: id}."""
    _drop_automations_by_name()
    ids: dict[str, str] = {}
    for dep in by_module_path(build_deployments(cfg)):
        dep.job_variables = {"image": image, **(job_variables or {})}
        ids[f"{dep.flow_name}/{dep.name}"] = str(dep.apply(work_pool_name=pool))
    return ids


def serve(cfg: PipelineConfig, limit: int | None = 2) -> None:
    """Deploy, then execute scheduled, UI- and automation-triggered runs until SIGTERM.

    ``pause_on_shutdown=False``: ``ringflow down`` must not switch the schedules off.
    """
    from prefect import serve as prefect_serve

    deploy(cfg, keep_notifications=True)  # the URL a person gave `ringflow deploy` is not in this env
    prefect_serve(*build_deployments(cfg), pause_on_shutdown=False, limit=limit, print_starting_message=True)


def runner_health() -> str | None:
    """None when the runner can talk to the API and every deployment is READY (polled by a
    runner lately); else what is wrong. A health check for a ``serve`` process run outside
    ``ringflow up`` (the compose file runs a worker, checked by Prefect's own ``/health``): green
    only when the runner really reaches the API (a 401 from a wrong auth string turns it red)."""
    import httpx

    from ringflow.infra.stack_settings import PREFECT_AUTH_ENV, prefect_auth_tuple

    api = os.environ.get("PREFECT_API_URL")
    if not api:
        return "PREFECT_API_URL is not set"
    auth = prefect_auth_tuple({})  # this process's PREFECT_API_AUTH_STRING
    for name in DEPLOYMENT_NAMES:
        try:
            r = httpx.get(f"{api}/deployments/name/{name}", timeout=5, auth=auth)
        except httpx.HTTPError as e:
            return f"the Prefect API at {api} does not answer: {e}"
        if r.status_code == 401:
            return f"the Prefect API at {api} refused the runner (401): check {PREFECT_AUTH_ENV}"
        if r.status_code != 200:
            return f"deployment {name}: HTTP {r.status_code}"
        if r.json().get("status") != "READY":
            return f"deployment {name} is {r.json().get('status')}: no runner has polled it lately"
    return None


# --------------------------------------------------------------------------- the namespace cluster


def deploy_to_pool(state: ClusterState, config: Path | None) -> dict[str, str]:
    """The deployments ``ringflow deploy`` makes (parameters, schedules, the rerun trigger), sent
    to the cluster worker's process pool instead of the serve process, with the cluster's
    training settings in the default config."""
    from ringflow.infra.cluster import WORK_POOL, cluster_overrides, use_stack

    use_stack(state)
    cfg = load_config(config, cluster_overrides(state))
    ids: dict[str, str] = {}
    for dep in for_work_pool(build_deployments(cfg)):  # runs start in this checkout (source's default)
        dep.tags = [*dep.tags, "cluster"]
        ids[f"{dep.flow_name}/{dep.name}"] = str(dep.apply(work_pool_name=WORK_POOL))  # also its trigger
    return ids


def run_on_cluster(
    home: Path, config: Path | None, overrides: list[str], echo: Callable[[str], object] = print
) -> PipelineResult:
    """Submit the training pipeline to the stack on h0; the worker on h1 runs it; wait; return its
    :class:`~flows.training_pipeline.PipelineResult`."""
    from ringflow.infra.cluster import cluster_overrides, urls, use_stack
    from ringflow.infra.hosts import ClusterError, is_running, load_state

    state = load_state(home)
    if state is None:
        raise ClusterError("no cluster: run `ringflow cluster up` first")
    worker = state.processes.get("h1/worker")
    if worker is None or not is_running(worker):
        raise ClusterError("the cluster has no running worker on h1: run `ringflow cluster up` (with the stack)")
    cfg = load_config(config, cluster_overrides(state) + list(overrides))
    use_stack(state)
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments import run_deployment

    fr = run_deployment(
        name=TRAINING_DEPLOYMENT, parameters={"config": cfg.model_dump(mode="json"), "reason": REASON_MANUAL}, timeout=0
    )
    assert isinstance(fr, FlowRun)  # a sync call; Prefect types it `FlowRun | Coroutine` (async_dispatch)
    echo(f"submitted flow run {fr.name}: {urls(state)['prefect']}/runs/flow-run/{fr.id}")
    from ringflow.flows.training_pipeline import PipelineResult

    fr = follow_flow_run(fr.id, timeout_s=cfg.training.timeout_s + 1800, echo=echo)
    if fr.state is None or not fr.state.is_completed():
        raise ClusterError(
            f"flow run {fr.name} ended {fr.state.name if fr.state else 'without a state'}: "
            f"{fr.state.message if fr.state else ''} ({urls(state)['prefect']}/runs/flow-run/{fr.id})"
        )
    result = fr.state.result()
    if not isinstance(result, PipelineResult):
        raise ClusterError(f"flow run {fr.name} returned {type(result).__name__}, not a PipelineResult")
    return result


def follow_flow_run(
    flow_run_id: UUID, timeout_s: float, echo: Callable[[str], object] = print, poll_s: float = 2.0
) -> FlowRun:
    """Echo the flow run's log lines (the worker on h1 sends them to the API) until it ends."""
    import time

    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    from ringflow.infra.hosts import ClusterError

    seen = 0
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            fr = client.read_flow_run(flow_run_id)
            final = fr.state is not None and fr.state.is_final()
            logs = client.read_logs(
                LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                sort=LogSort.TIMESTAMP_ASC,
                offset=seen,
                limit=200,
            )
            for entry in logs:
                echo(f"  {entry.message}")
            seen += len(logs)
            if final and len(logs) < 200:
                return fr
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"flow run {fr.name} still {fr.state.name if fr.state else 'pending'} after {timeout_s:.0f}s"
                )
            if len(logs) < 200:
                time.sleep(poll_s)


def _load(config_json: Path | None, config: Path | None) -> PipelineConfig:
    if config_json is not None:
        return PipelineConfig.model_validate_json(config_json.read_text())
    return load_config(config)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ringflow.flows.deployments")
    p.add_argument("command", choices=["serve", "deploy", "health"])
    p.add_argument("--config-json", type=Path, help="resolved config written by `ringflow up`")
    p.add_argument("--config", type=Path, help="config YAML (default: built-in defaults)")
    p.add_argument("--limit", type=int, default=2, help="concurrent runs of the serve process")
    a = p.parse_args(argv)
    if a.command == "health":
        problem = runner_health()
        print(problem or "ok")
        sys.exit(1 if problem else 0)
    process_defaults()  # the runner and its flow runs: same library defaults as the CLI
    cfg = _load(a.config_json, a.config)
    if a.command == "serve":
        serve(cfg, limit=a.limit)
    else:
        for name, ident in deploy(cfg).items():
            print(f"{name}: {ident}")


if __name__ == "__main__":
    main(sys.argv[1:])

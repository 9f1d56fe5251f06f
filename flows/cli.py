"""The ``ringflow`` command line.

Each command loads the config (``--config``, default ``configs/flights.yaml``, plus ``--set``
overrides), fails before any work on an invalid value, then runs one flow or task. Imports of
the heavy stacks (Prefect, MLflow, torch) happen inside the commands so ``--help`` is instant.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

import typer

from ringflow.training.config import ConfigError, PipelineConfig, default_config_path, load_config

app = typer.Typer(
    name="ringflow",
    help="Workflow-driven MLOps: shard -> Horovod training -> evaluation -> MLflow registry, plus monitoring.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        from ringflow.training.version import source_commit, version

        typer.echo(f"ringflow {version()} (commit {source_commit() or 'unknown'})")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            help="Print ringflow's version and source commit, and exit.",
        ),
    ] = False,
) -> None:
    """Workflow-driven MLOps: shard -> Horovod training -> evaluation -> MLflow registry, plus monitoring."""


ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="Pipeline config YAML, or the name of a packaged one (flights, smoke, "
        "flights-x10). Default: configs/flights.yaml if present, else the packaged flights.",
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config value: key.path=value (repeatable), e.g. training.epochs=3."),
]


def _config(config: Path | None, overrides: list[str] | None) -> PipelineConfig:
    path = config if config is not None else default_config_path()
    try:
        return load_config(path, overrides or [])
    except ConfigError as e:
        typer.secho(str(e), fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None


def _prepare_environment(local_store: bool = True, start_api: bool = False) -> Callable[[], float]:
    """Embedded defaults: state under RINGFLOW_HOME; env values win when set.

    ``local_store``: the command logs to MLflow itself, so a local SQLite store is created here
    when no server is named (not for up/down/status/deploy: the stack chooses its own store).
    ``start_api``: the command runs a flow or a task: Prefect's temporary API (when no server is
    named) starts now, in the background, while the store is prepared and the tasks are imported;
    the returned ``wait()`` waits for it (and returns the seconds it waited).
    """
    from ringflow.training.environment import process_defaults

    process_defaults()  # telemetry off, quiet stage logs, patient ephemeral API (user's values win)
    from ringflow.training.config import get_settings

    s = get_settings()
    s.home.mkdir(parents=True, exist_ok=True)
    from ringflow.infra.stack import apply_stack_env

    apply_stack_env(s.home)  # stack up (`ringflow up`): report to its servers unless env says otherwise
    os.environ.setdefault("MLFLOW_TRACKING_URI", s.tracking_uri)
    wait_api: Callable[[], float] = lambda: 0.0  # noqa: E731
    if start_api:
        from ringflow.flows.prefect_api import start_early

        wait_api = start_early()
        # scipy.special before the heavy imports (MLflow, torch, Prefect's client): logging the
        # baseline imports skops, which looks up each of scipy's ~230 ufuncs in every module
        # imported before scipy's own (skops.io._utils.whichmodule). Imported here that is ~600
        # modules instead of ~3400: skops' import 1.5 -> 0.35 CPU s. The tasks import scipy anyway.
        importlib.import_module("scipy.special")
    if local_store:
        from ringflow.tasks.tracking import ensure_store

        ensure_store(os.environ["MLFLOW_TRACKING_URI"])  # once, under a lock: concurrent runs on a new home
    return wait_api


def _fail(stage_error: Exception) -> None:
    typer.secho(f"FAILED: {stage_error}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def _require_horovod(cfg: PipelineConfig) -> None:
    """Before any stage: a train stage run by horovodrun here needs a working Horovod (an
    MPIJob's image has its own). A failed check stops the temporary Prefect API with the command."""
    from ringflow.training.launch import HorovodUnavailable, check_horovod

    if cfg.training.launcher != "horovodrun":
        return
    try:
        check_horovod()
    except HorovodUnavailable as e:
        _fail(e)


@app.command()
def run(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Run the training pipeline once: shard -> train (horovodrun) -> evaluate -> register."""
    cfg = _config(config, set_)
    wait_api = _prepare_environment(start_api=True)  # the API server starts first, then the checks
    _require_horovod(cfg)  # imports torch: after the server's start, before any stage
    from ringflow.training.launch import rank_server_held

    # the ranks' server imports on the core the API server has just finished its own on, while
    # this process imports the stages
    with rank_server_held(cfg):
        from ringflow.flows.prefect_api import no_heartbeats_on_a_temporary_server
        from ringflow.flows.training_pipeline import print_summary, training_pipeline
        from ringflow.tasks import timings

        waited = wait_api()
        timings.begin_call()  # the summary's table counts the Prefect API start from here
        try:
            with no_heartbeats_on_a_temporary_server():
                result = training_pipeline(cfg)
        except Exception as e:  # the flow already logged the traceback; name the failure plainly
            _fail(e)
    result.timings.end_call()
    result.timings.add("prefect", "Prefect API start (what the imports did not hide)", waited)
    print_summary(result)


@app.command()
def shard(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Run only the sharding stage and print the manifest path."""
    cfg = _config(config, set_)
    wait_api = _prepare_environment(start_api=True)  # a task run on its own reports to the API too
    from ringflow.tasks.shard import shard_data

    wait_api()
    try:
        manifest_path = shard_data(cfg)  # a Prefect task run on its own, outside a flow
    except Exception as e:
        _fail(e)
    typer.echo(manifest_path)


@app.command()
def train(
    manifest: Annotated[Path, typer.Option(help="manifest.json written by `ringflow shard`.")],
    np_: Annotated[int | None, typer.Option("--np", help="Horovod ranks (default: training.world_size).")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Run only the Horovod training stage on an existing manifest."""
    overrides = list(set_ or [])
    if np_ is not None:
        overrides.append(f"training.world_size={np_}")
    cfg = _config(config, overrides)
    wait_api = _prepare_environment(start_api=True)
    _require_horovod(cfg)
    from ringflow.training.launch import rank_server_held

    with rank_server_held(cfg):
        from ringflow.tasks.train import train_model

        wait_api()
        try:
            result = train_model(cfg, str(manifest))  # a Prefect task run on its own, outside a flow
        except Exception as e:
            _fail(e)
    typer.echo(result.model_dump_json(indent=2))


@app.command()
def up(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    serve: Annotated[bool, typer.Option(help="Also start the process that runs deployments.")] = True,
    database: Annotated[
        Literal["sqlite", "postgresql"] | None,
        typer.Option(
            help="The servers' database: sqlite (files under $RINGFLOW_HOME) or postgresql (ringflow starts "
            "its own PostgreSQL server, two databases with their own owners; `ringflow status` shows its "
            "data directory). "
            "Default: RINGFLOW_DATABASE, else what the last up of this home used, else sqlite.",
        ),
    ] = None,
    rotate_mlflow_admin_password: Annotated[
        bool,
        typer.Option(
            help="Make MLFLOW_AUTH_ADMIN_PASSWORD the MLflow admin's password (it is otherwise used only on the first up).",
        ),
    ] = False,
) -> None:
    """Start the local team stack (idempotent): Prefect server and UI, MLflow tracking server and UI,
    the Evidently UI (monitoring snapshots and their trend dashboard), optionally ringflow's own
    PostgreSQL, and the supervised runner that executes deployment runs; then deploy the training
    and monitoring flows with their schedules and the rerun-on-anomaly automation."""
    cfg = _config(config, set_)
    _prepare_environment(local_store=False)
    from ringflow.infra.stack import up as stack_up
    from ringflow.infra.stack_settings import StackError, StackSettings

    try:
        result = stack_up(
            cfg,
            serve=serve,
            database=database,
            rotate_mlflow_admin_password=rotate_mlflow_admin_password,
            echo=typer.echo,
        )
    except StackError as e:
        _fail(e)
    st = StackSettings()
    if all(v.startswith("already") for v in result.values()):
        typer.echo("nothing to start: the stack is already up")
    typer.echo(f"Prefect UI  {st.prefect_url}")
    typer.echo(f"MLflow UI   {st.mlflow_url}")
    typer.echo(f"Evidently   {st.evidently_url}  (monitoring snapshots and the trend dashboard)")
    typer.echo("Stop with `ringflow down`.")


@app.command()
def down() -> None:
    """Stop exactly the processes `ringflow up` started."""
    from ringflow.infra.stack import down as stack_down

    for name, state in stack_down(echo=lambda _: None).items():
        typer.echo(f"{name:8s} {state}")


@app.command()
def status() -> None:
    """Show the stack's processes, health, deployments, schedules and the rerun automation."""
    _prepare_environment(local_store=False)
    from ringflow.infra.stack import deployment_summary
    from ringflow.infra.stack import status as stack_status
    from ringflow.infra.stack_settings import StackError

    rows = stack_status()
    for name, row in rows.items():
        state = f"running pid {row['pid']}" if row["running"] else "stopped"
        health = "" if "healthy" not in row else ("  healthy" if row["healthy"] else "  NOT answering")
        sup = row.get("supervisor") or {}
        if row["running"] and sup:
            state += (
                f" (supervised: service pid {sup.get('child_pid')}, {sup.get('restarts', 0)} restarts"
                + (f", {sup['state']}" if sup.get("state") not in (None, "running") else "")
                + ")"
            )
        typer.echo(f"{name:8s} {state}{health}  {row.get('url', '')}".rstrip())
        if row.get("data"):
            typer.echo(f"         data {row['data']}")
        if sup.get("state") == "gave-up":
            typer.echo(f"         {sup.get('message')}; log {row['log']}")
        if row.get("leftovers"):
            typer.echo(
                f"         its first process died; leftover process(es) still running: pid "
                f"{', '.join(map(str, row['leftovers']))} (`ringflow up` replaces them, `ringflow down` stops them)"
            )
    if rows["prefect"].get("healthy"):
        try:
            lines = deployment_summary()
        except StackError as e:
            _fail(e)
        for line in lines:
            typer.echo(line)


@app.command()
def deploy(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    work_pool: Annotated[
        str | None,
        typer.Option(
            "--work-pool",
            "-p",
            help="Deploy to this Prefect work pool (any type; its worker runs the flows) instead of for `ringflow up`'s serve process.",
        ),
    ] = None,
    job_variable: Annotated[
        list[str] | None,
        typer.Option(
            "--job-variable",
            "-jv",
            help="A job variable of the pool's job template, key=value (JSON or text; repeatable), e.g. "
            "env.MLFLOW_TRACKING_URI=http://mlflow:5000 or image=ringflow:latest. Needs --work-pool.",
        ),
    ] = None,
    source: Annotated[
        Path | None,
        typer.Option(
            help="With --work-pool: the directory the worker runs the flows from (the repository; /app in the "
            "image). Default: this checkout.",
        ),
    ] = None,
) -> None:
    """Create/update the deployments (cron schedules, concurrency limit, rerun-on-anomaly trigger)
    and the notification automations."""
    cfg = _config(config, set_)
    _prepare_environment(local_store=False)
    if not os.environ.get("PREFECT_API_URL"):
        typer.secho("no Prefect server: run `ringflow up` or set PREFECT_API_URL", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    from ringflow.flows.deployments import REPO_ROOT, DeployError, parse_job_variables
    from ringflow.flows.deployments import deploy as apply_deployments

    try:
        if source is not None and work_pool is None:
            raise DeployError("--source needs --work-pool (it is where the pool's worker runs the flows from)")
        ids = apply_deployments(
            cfg, work_pool=work_pool, job_variables=parse_job_variables(job_variable), source=source or REPO_ROOT
        )
    except DeployError as e:
        typer.secho(str(e), fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    except Exception as e:
        _fail(e)
    if work_pool is None:
        from ringflow.infra.stack import remember_config

        remember_config(cfg)  # the running stack's serve process re-deploys this config on restart
    for name, ident in ids.items():
        typer.echo(f"{name:40s} {ident}")


@app.command()
def monitor(
    batch: Annotated[
        str, typer.Option(help="A month (YYYY-MM) of the configured source, a CSV/Parquet path, or 'next'.")
    ] = "next",
    config: ConfigOpt = None,
    set_: SetOpt = None,
    no_rerun: Annotated[bool, typer.Option("--no-rerun", help="Report the rerun plan; trigger nothing.")] = False,
) -> None:
    """Score a batch with the champion; Evidently drift/quality; anomalies -> rerun decision."""
    cfg = _config(config, set_)
    wait_api = _prepare_environment(start_api=True)
    from ringflow.flows.monitoring import MonitoringAlert, monitoring_flow, print_result
    from ringflow.flows.prefect_api import no_heartbeats_on_a_temporary_server

    wait_api()  # as `run`: the flow call must find the API up, not half started
    try:
        with no_heartbeats_on_a_temporary_server():
            result = monitoring_flow(cfg, batch=batch, trigger_rerun=not no_rerun)
    except MonitoringAlert as alert:  # recorded in full; the exit code tells the scheduler
        print_result(alert.result)
        typer.secho(f"ALERT: {alert}", fg=typer.colors.RED, err=True)
        raise typer.Exit(3) from None
    except Exception as e:
        _fail(e)
    print_result(result)


@app.command()
def synth(
    factor: Annotated[
        int, typer.Option("--factor", "-k", min=1, help="How many times the 2013 flights (1x = 336,776 rows).")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to create: one Parquet file per month.")],
    seed: Annotated[int, typer.Option(help="Seed of the resampling and the jitter (same seed, same rows).")] = 0,
) -> None:
    """Make a K-times-larger flights-like dataset: one Parquet file per month, rows resampled per
    month from the real 2013 flights with the weather jittered. It is a scale workload for
    throughput and memory, not new information; train on it with --set data.source=OUT."""
    from ringflow.training.synth import synthesize

    try:
        files = synthesize(factor, out, seed=seed, progress=typer.echo)
    except (ValueError, FileExistsError) as e:
        typer.secho(str(e), fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    typer.echo(f"{len(files)} files in {out}: use it with --set data.source={out}")


@app.command("install-horovod")
def install_horovod() -> None:
    """Build Horovod 0.28.1 (PyTorch + Gloo) into this environment, or reuse the cached wheel:
    the script make install runs, shipped with the package for installs without a checkout."""
    import subprocess
    from importlib import resources

    script = resources.files("ringflow.infra") / "install_horovod.sh"
    raise typer.Exit(subprocess.run(["bash", str(script), sys.executable]).returncode)


# --------------------------------------------------------------------------- ringflow cluster

cluster_app = typer.Typer(
    help="A multi-host cluster on this machine (network-namespace hosts with sshd): stack on h0, "
    "Prefect worker on h1, horovodrun across h1..hN.",
    no_args_is_help=True,
)


def _cluster_home() -> Path:
    from ringflow.training.config import get_settings

    home = get_settings().home
    home.mkdir(parents=True, exist_ok=True)
    return home


def _default_config(config: Path | None) -> Path:
    from ringflow.training.config import default_config_path, resolve_config_path

    return resolve_config_path(config) if config is not None else default_config_path()


@cluster_app.command("up")
def up_cmd(
    hosts: Annotated[int, typer.Option(help="Hosts: h0 runs the stack, h1 the worker, h1.. training ranks.")] = 3,
    config: ConfigOpt = None,
    stack: Annotated[bool, typer.Option(help="Also start the stack on h0 and the worker on h1.")] = True,
) -> None:
    """Build the cluster (idempotent) and print its hosts, addresses, roles and URLs."""
    from ringflow.flows.deployments import deploy_to_pool
    from ringflow.infra.cluster import print_status, up
    from ringflow.infra.hosts import ClusterError, preflight

    cfg_path = _default_config(config)
    try:
        preflight()  # before anything is written: not root, no `ip netns`, no sshd
        home = _cluster_home()
        state = up(home, hosts, cfg_path, stack=stack, deploy=lambda st: deploy_to_pool(st, cfg_path), echo=typer.echo)
    except (ClusterError, OSError) as e:
        _fail(e)
    print_status(state, echo=typer.echo)
    typer.echo("Remove with `ringflow cluster down`.")


@cluster_app.command("status")
def status_cmd() -> None:
    """Show the hosts, their services and the URLs."""
    from ringflow.infra.cluster import print_status
    from ringflow.infra.hosts import load_state

    state = load_state(_cluster_home())
    if state is None:
        typer.echo("no cluster (`ringflow cluster up` builds one)")
        raise typer.Exit(1)
    print_status(state, echo=typer.echo)


@cluster_app.command("down")
def down_cmd() -> None:
    """Remove every namespace, link, /etc/netns entry and process the cluster made, and nothing else."""
    from ringflow.infra.hosts import ClusterError
    from ringflow.infra.hosts import down as remove_cluster

    try:
        removed = remove_cluster(_cluster_home(), echo=typer.echo)
    except ClusterError as e:
        _fail(e)
    if not removed:
        typer.echo("nothing to remove: no cluster")


@cluster_app.command("run")
def run_cmd(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Submit the training pipeline to the cluster's stack; the worker on h1 runs it across the hosts."""
    from ringflow.flows.deployments import run_on_cluster
    from ringflow.infra.hosts import ClusterError

    home = _cluster_home()
    try:
        result = run_on_cluster(home, _default_config(config), set_ or [], echo=typer.echo)
    except (ClusterError, ConfigError) as e:
        _fail(e)
    from ringflow.flows.training_pipeline import print_summary

    print_summary(result)


app.add_typer(cluster_app, name="cluster")  # ringflow cluster up|status|down|run


def main() -> None:  # pragma: no cover - the console script (pyproject [project.scripts])
    from ringflow.training.process_exit import exit_fast

    try:
        app()
    except SystemExit as e:
        exit_fast(e.code)  # the summary is printed: skip the seconds of interpreter teardown
    exit_fast(0)

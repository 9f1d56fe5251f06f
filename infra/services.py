"""One factory per service of the stack: the command, environment, readiness check and
supervision of PostgreSQL, Prefect, MLflow, the Evidently UI and the deployment runner."""

from __future__ import annotations

import os
import secrets
import signal
import sys
from pathlib import Path

import httpx

from ringflow.infra import postgres
from ringflow.infra.processes import BIN, Service, http_ok, stack_dir
from ringflow.infra.stack_settings import (
    PREFECT_SERVER_AUTH_ENV,
    StackSettings,
    client_env,
    prefect_auth_tuple,
    url_host,
)
from ringflow.training.config import PipelineConfig
from ringflow.training.environment import process_defaults


def mlflow_secret_key(home: Path) -> str:
    """A stable Flask secret for MLflow's CSRF protection, kept 0600 beside the pid files."""
    path = stack_dir(home) / "mlflow-flask-secret"
    if not path.is_file():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32))
    return path.read_text().strip()


def deployments_ready(api_url: str, auth: tuple[str, str] | None, names: list[str]) -> bool:
    """The serve process is healthy once it has created and polled every deployment."""
    try:
        for name in names:
            r = httpx.get(f"{api_url}/deployments/name/{name}", timeout=3, auth=auth)
            if r.status_code != 200 or r.json().get("status") != "READY":
                return False
        return True
    except httpx.HTTPError:
        return False


def local_experiment(config_json: Path | None, home: Path, tracking_uri: str | None = None) -> None:
    """Create the pipeline's experiment in the tracking store before the server does.

    A server-created experiment keeps its artifacts as ``mlflow-artifacts:`` URIs, which only a
    running server resolves: after ``ringflow down``, ``ringflow run`` on the same store could not
    log to it. Created here, it points at ``$RINGFLOW_HOME/artifacts/<experiment>``, the same
    directory the server serves, so runs work with the stack up or down.
    """
    from mlflow import MlflowClient

    from ringflow.tasks.tracking import ensure_experiment

    cfg = PipelineConfig.model_validate_json(config_json.read_text()) if config_json else PipelineConfig()
    ensure_experiment(MlflowClient(tracking_uri or f"sqlite:///{home / 'mlflow.db'}"), cfg.registry.experiment)


def service_env(home: Path, workspace: Path) -> dict[str, str]:
    """What every service starts from: the caller's environment less the API it may point at,
    ringflow's library defaults (no telemetry, quiet logs: as the CLI) and the state it shares."""
    base = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_API_KEY")}
    base["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    process_defaults(base)
    base["RINGFLOW_HOME"] = str(home)
    base["RINGFLOW_EVIDENTLY_WORKSPACE"] = str(workspace)
    base["PYTHONUNBUFFERED"] = "1"
    return base


def postgres_service(st: StackSettings, home: Path, base: dict[str, str], config_json: Path | None) -> Service:
    """ringflow's own PostgreSQL (``--database postgresql``), as user postgres when run as root; once
    it answers, its two databases and the pipeline's experiment are made."""
    pgs = postgres.PostgresSettings()
    pg_host = url_host(st.host)

    def _prepare_databases() -> None:
        postgres.ensure_databases(home, pg_host, pgs.port)
        if not st.mlflow_artifacts_destination:
            local_experiment(config_json, home, postgres.mlflow_url(home, pg_host, pgs.port))

    return Service(
        name="postgres",
        cmd=postgres.server_command(home, st.host, pgs.port, pgs),
        env={"PATH": base.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"},
        ready=lambda: postgres.is_ready(home, pg_host, pgs.port),
        port=pgs.port,
        cwd=postgres.data_dir(home),
        user=postgres.SYSTEM_USER if os.geteuid() == 0 else None,
        stop_signal=signal.SIGINT,  # fast shutdown: clients cut, a clean checkpoint
        after_ready=_prepare_databases,
        stale_pid_file=postgres.postmaster_pid_file(home),
    )


def prefect_service(st: StackSettings, home: Path, base: dict[str, str], database_url: str | None) -> Service:
    """``prefect server start``: UI, API and services, on SQLite under the home unless ``database_url``."""
    prefect_home = home / "prefect"
    penv = {**base, "PREFECT_HOME": str(prefect_home)}
    penv["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = (
        database_url or f"sqlite+aiosqlite:///{prefect_home / 'prefect.db'}"
    )
    penv.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)  # one name, no ambiguity
    if st.prefect_auth_string is not None:
        penv[PREFECT_SERVER_AUTH_ENV] = st.prefect_auth_string.get_secret_value()
    else:  # an exported empty value would be taken as the password '' (every client gets 401)
        penv.pop(PREFECT_SERVER_AUTH_ENV, None)
    # The UI's API address comes from settings, not from --port: without these it calls :4200.
    penv["PREFECT_SERVER_API_HOST"] = st.host
    penv["PREFECT_SERVER_API_PORT"] = str(st.prefect_port)
    penv.setdefault("PREFECT_UI_API_URL", st.prefect_api_url)  # set it when behind a proxy
    penv.setdefault("PREFECT_UI_URL", st.prefect_url)  # the links in notifications (`ui_url`)
    return Service(
        name="prefect",
        cmd=[str(BIN / "prefect"), "server", "start", "--host", st.host, "--port", str(st.prefect_port)],
        env=penv,
        ready=lambda: http_ok(st.health_url("prefect")),
        url=st.prefect_url,
        port=st.prefect_port,
    )


def mlflow_service(st: StackSettings, home: Path, base: dict[str, str], backend: str) -> Service:
    """``mlflow server`` on ``backend``, serving artifacts (basic auth when an admin password is set)."""
    artifacts = st.mlflow_artifacts_destination or str(home / "artifacts")
    menv = dict(base)
    menv["MLFLOW_BACKEND_STORE_URI"] = backend  # may hold a password: environment, not argv
    # MLflow's huey job runners (GenAI jobs, trace archival) are 7 extra processes that this
    # pipeline never uses; on a 2-core box they cost start-up time and memory.
    menv.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    mcmd = [
        str(BIN / "mlflow"),
        "server",
        "--artifacts-destination",
        artifacts,
        "--host",
        st.host,
        "--port",
        str(st.mlflow_port),
        "--workers",
        "1",
    ]
    if st.mlflow_auth:
        mcmd += ["--app-name", "basic-auth"]
        ini = stack_dir(home) / "mlflow-auth.ini"
        # Users and permissions live beside the tracking store, not in the CWD (MLflow's default).
        ini.write_text(
            "[mlflow]\n"
            "default_permission = READ\n"
            f"database_uri = sqlite:///{home / 'mlflow-auth.db'}\n"
            f"admin_username = {st.mlflow_admin_username}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        )
        menv["MLFLOW_AUTH_CONFIG_PATH"] = str(ini)
        menv["MLFLOW_FLASK_SERVER_SECRET_KEY"] = os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY") or mlflow_secret_key(
            home
        )
    return Service(
        name="mlflow",
        cmd=mcmd,
        env=menv,
        ready=lambda: http_ok(st.health_url("mlflow")),
        url=st.mlflow_url,
        port=st.mlflow_port,
    )


def runner_service(st: StackSettings, base: dict[str, str], config_json: Path | None) -> Service:
    """``python -m ringflow.flows.deployments serve``: deploys, then runs what the UI, the schedules
    and the rerun automation start; ready once every deployment is polled."""
    cenv = {**base, **client_env(st)}
    for k in (PREFECT_SERVER_AUTH_ENV, "MLFLOW_AUTH_ADMIN_PASSWORD"):
        cenv.pop(k, None)  # the runner and its flow runs are clients: no server secrets
    scmd = [sys.executable, "-m", "ringflow.flows.deployments", "serve"]
    if config_json is not None:
        scmd += ["--config-json", str(config_json)]
    from ringflow.monitoring.events import DEPLOYMENT_NAMES

    auth = prefect_auth_tuple(cenv)
    return Service(
        name="serve",
        cmd=scmd,
        env=cenv,
        ready=lambda: deployments_ready(st.prefect_api_url, auth, DEPLOYMENT_NAMES),
        needs=["prefect", "mlflow"],
        supervised=True,  # schedules and reruns stop silently without it
    )


def evidently_service(st: StackSettings, base: dict[str, str], workspace: Path) -> Service:
    """``evidently ui`` over the workspace every monitoring run adds its snapshots to."""
    return Service(
        name="evidently",
        cmd=[
            str(BIN / "evidently"),
            "ui",
            "--workspace",
            str(workspace),
            "--host",
            st.host,
            "--port",
            str(st.evidently_port),
        ],
        env=dict(base),
        ready=lambda: http_ok(st.health_url("evidently")),
        url=st.evidently_url,
        port=st.evidently_port,
    )


def stack_services(
    st: StackSettings, home: Path, config_json: Path | None, database: str = "sqlite", workspace: Path | None = None
) -> list[Service]:
    """The stack's services in start order. ``workspace``: the Evidently workspace
    (``Settings.evidently_workspace``; None = ``home/evidently``), the one the UI reads and the
    runner's monitoring runs write."""
    from ringflow.monitoring.reports import WORKSPACE_DIR

    workspace = workspace or home / WORKSPACE_DIR
    base = service_env(home, workspace)
    services: list[Service] = []
    prefect_db = st.prefect_database_url
    backend = st.mlflow_backend_store_uri or f"sqlite:///{home / 'mlflow.db'}"
    if database == "postgresql":
        pg_host, port = url_host(st.host), postgres.PostgresSettings().port
        prefect_db, backend = postgres.prefect_url(home, pg_host, port), postgres.mlflow_url(home, pg_host, port)
        services.append(postgres_service(st, home, base, config_json))
    return [
        *services,
        prefect_service(st, home, base, prefect_db),
        mlflow_service(st, home, base, backend),
        evidently_service(st, base, workspace),
        runner_service(st, base, config_json),
    ]

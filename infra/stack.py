"""``ringflow up`` / ``down`` / ``status``: the real servers on one box.

Long-lived processes, each under its own ``infra.supervisor`` (restart with back-off, gives up
on a restart loop) and in its own session (process group) so that ``down`` can stop it with
everything it spawned (uvicorn workers, flow-run subprocesses):

- ``postgres`` (with ``--database postgresql``): ringflow's own PostgreSQL (infra/postgres.py),
- ``prefect``: ``prefect server start`` (UI + API + services; SQLite under
  ``$RINGFLOW_HOME/prefect/``, PostgreSQL when ``PREFECT_API_DATABASE_CONNECTION_URL`` is set),
- ``mlflow``: ``mlflow server`` (SQLite ``$RINGFLOW_HOME/mlflow.db`` + proxied artifacts under
  ``$RINGFLOW_HOME/artifacts``, or the backend/artifact URIs from the environment),
- ``serve``: ``python -m ringflow.flows.deployments serve``: creates the deployments, schedules and the
  rerun automation, then executes the runs that the UI, the schedules and the automation create,
- ``evidently``: ``evidently ui`` over the monitoring workspace.

Every supervisor has a pid file (pid + start time + command line, so a reused pid is never
signalled), a state file (the service's pid, restarts, gave-up message) and the service's log
under ``$RINGFLOW_HOME/stack/``. ``$RINGFLOW_HOME/stack/env`` names the
server URLs (never credentials) for CLI commands started while the stack is up.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Required, TypedDict

import httpx
import psutil

from ringflow.infra import postgres
from ringflow.infra.processes import (
    http_ok,
    leftover_processes,
    log_file,
    pid_record,
    port_free,
    running_leader,
    stack_dir,
    start_service,
    state_file,
    stop_service,
    supervision,
    wait_ready,
)
from ringflow.infra.services import local_experiment, stack_services
from ringflow.infra.stack_settings import (
    PREFECT_AUTH_ENV,
    PREFECT_SERVER_AUTH_ENV,
    StackError,
    StackSettings,
    client_env,
    parse_auth_string,
    prefect_auth_string,
)
from ringflow.training.config import PipelineConfig, get_settings

SERVICE_NAMES = ["postgres", "prefect", "mlflow", "evidently", "serve"]


def write_env_file(st: StackSettings, home: Path) -> Path:
    """URLs only: credentials stay in the operator's environment, never on disk."""
    path = stack_dir(home) / "env"
    path.write_text(f"PREFECT_API_URL={st.prefect_api_url}\nMLFLOW_TRACKING_URI={st.mlflow_url}\n")
    return path


EMPTY_MEANS_UNSET = (
    PREFECT_SERVER_AUTH_ENV,
    PREFECT_AUTH_ENV,
    "PREFECT_API_KEY",
    "PREFECT_API_URL",
    "MLFLOW_AUTH_ADMIN_PASSWORD",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_URI",
)


def apply_stack_env(home: Path) -> bool:
    """CLI hook: while the stack is up, point unset PREFECT_API_URL / MLFLOW_TRACKING_URI at it."""
    for key in EMPTY_MEANS_UNSET:
        # exported but empty = not set; Prefect would take '' as a password (its ephemeral
        # server then refuses every client) or as an address
        if key in os.environ and not os.environ[key].strip():
            del os.environ[key]
    path = stack_dir(home) / "env"
    if not path.is_file() or running_leader("prefect", home) is None:
        return False
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip():
            os.environ.setdefault(key.strip(), value.strip())
    return True


def remember_config(config: PipelineConfig, home: Path | None = None) -> Path:
    """The config the serve process deploys when it (re)starts: the last one `up`/`deploy` used."""
    path = stack_dir(home) / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config.model_dump_json(indent=2))
    return path


def up(
    config: PipelineConfig | None = None,
    *,
    serve: bool = True,
    database: str | None = None,
    rotate_mlflow_admin_password: bool = False,
    echo: Callable[[str], None] = print,
) -> dict[str, str]:
    """Start what is not running yet, wait until each answers, return ``{name: status}``.

    Idempotent: services whose pid file names a live process are left alone. Settings are
    checked before anything starts, and a failure stops what this call had started.
    ``database``: ``sqlite`` or ``postgresql`` (default: RINGFLOW_DATABASE, else what the last
    ``up`` of this home used, else SQLite).
    """
    st = StackSettings()
    home = get_settings().home
    database = resolve_database(database or st.database, st, home)
    stack_dir(home).mkdir(parents=True, exist_ok=True)
    (home / "prefect").mkdir(exist_ok=True)
    if not st.mlflow_artifacts_destination:
        (home / "artifacts").mkdir(exist_ok=True)
    config_json = remember_config(config, home) if config is not None else None
    if config_json is None and (stack_dir(home) / "config.json").is_file():
        config_json = stack_dir(home) / "config.json"

    if database == "sqlite" and not st.mlflow_backend_store_uri and not st.mlflow_artifacts_destination:
        local_experiment(config_json, home)
    if database == "postgresql":
        try:
            if postgres.ensure_cluster(home):
                echo(f"postgres initialised   {postgres.data_dir(home)}")
            if postgres.clear_stale_pid_file(home):
                echo("postgres: removed the pid file of a postmaster that is gone (it was killed)")
        except postgres.PostgresError as e:
            raise StackError(str(e)) from None
    (stack_dir(home) / "database").write_text(database + "\n")

    rotated = st.mlflow_auth and check_mlflow_admin_password(st, home, rotate=rotate_mlflow_admin_password, echo=echo)
    if rotated and pid_record("serve", home) is not None:
        # the runner and its flow runs carry the old password: restart them with the new one
        stop_service("serve", home, st.stop_grace_s)

    result: dict[str, str] = {}
    started: list[tuple[str, psutil.Process]] = []
    try:
        for svc in stack_services(st, home, config_json, database, get_settings().evidently_workspace):
            if svc.name == "serve" and not serve:
                continue
            proc = running_leader(svc.name, home)
            if proc is not None:
                result[svc.name] = f"already running (pid {proc.pid})"
                echo(f"{svc.name:8s} already running   pid {proc.pid}")
                if svc.after_ready is not None:
                    svc.after_ready()  # idempotent: a changed config's experiment, lost roles
                continue
            leftovers = leftover_processes(svc.name, home)
            if leftovers:
                stop_service(svc.name, home, st.stop_grace_s)
                echo(
                    f"{svc.name:8s} its first process had died; stopped {len(leftovers)} leftover "
                    f"process(es) still running: pid {', '.join(str(p.pid) for p in leftovers)}"
                )
            if svc.port is not None and not port_free(st.host, svc.port):
                raise StackError(
                    f"port {svc.port} on {st.host} is in use by a process ringflow did not start; "
                    f"stop it or choose another port (RINGFLOW_{svc.name.upper()}_PORT)"
                )
            proc = start_service(svc, home)
            started.append((svc.name, proc))
            wait_ready(svc, proc, home, st.startup_timeout_s)
            if svc.after_ready is not None:
                svc.after_ready()
            result[svc.name] = f"started (pid {proc.pid})"
            echo(f"{svc.name:8s} started           pid {proc.pid:<7d} log {log_file(svc.name, home)}")
    except BaseException as e:
        # Never half a stack: what this `up` started goes again (what was running stays).
        for name, _ in reversed(started):
            stop_service(name, home, st.stop_grace_s)
        if started and isinstance(e, StackError):
            raise StackError(f"{e}\n(stopped what this `up` had started: {', '.join(n for n, _ in started)})") from None
        raise
    write_env_file(st, home)
    return result


def resolve_database(requested: str | None, st: StackSettings, home: Path) -> str:
    """sqlite or postgresql; checked before anything starts."""
    recorded_file = stack_dir(home) / "database"
    recorded = recorded_file.read_text().strip() if recorded_file.is_file() else None
    database = requested or recorded or "sqlite"
    if database not in ("sqlite", "postgresql"):
        raise StackError(f"database = {database!r}: choose sqlite or postgresql (--database / RINGFLOW_DATABASE)")
    if database == "postgresql" and (st.prefect_database_url or st.mlflow_backend_store_uri):
        raise StackError(
            "--database postgresql starts ringflow's own PostgreSQL, but PREFECT_SERVER_DATABASE_CONNECTION_URL "
            "or RINGFLOW_MLFLOW_BACKEND_STORE_URI names another store: unset them, or drop --database"
        )
    if recorded and requested and recorded != requested and pid_record("prefect", home) is not None:
        raise StackError(
            f"the stack of {home} is running on {recorded}; `ringflow down` first to switch to {requested}"
        )
    return database


def down(echo: Callable[[str], None] = print) -> dict[str, str]:
    """Stop every process of every service ``up`` started (reverse order), then remove the env file."""
    st = StackSettings()
    home = get_settings().home
    result: dict[str, str] = {}
    for name in reversed(SERVICE_NAMES):
        if pid_record(name, home) is None:
            result[name] = "not running"
            state_file(name, home).unlink(missing_ok=True)  # e.g. a supervisor that gave up
            continue
        t0 = time.monotonic()
        pid, leftovers = stop_service(name, home, st.stop_grace_s)
        state_file(name, home).unlink(missing_ok=True)
        if pid is not None:
            result[name] = f"stopped (pid {pid})"
        elif leftovers:
            result[name] = f"stopped {len(leftovers)} leftover process(es) (pid {', '.join(map(str, leftovers))})"
        else:
            result[name] = "not running"
            continue
        echo(f"{name:8s} {result[name]} in {time.monotonic() - t0:.1f}s")
    (stack_dir(home) / "env").unlink(missing_ok=True)
    return result


class ServiceStatus(TypedDict, total=False):
    """One service's row of :func:`status`."""

    running: Required[bool]
    pid: Required[int | None]
    log: Required[str]
    leftovers: list[int]
    """Pids of the service's processes still running after its first process died."""
    supervisor: dict[str, Any]
    """What its supervisor last wrote (infra/supervisor.py ``read_state``)."""
    data: str
    url: str
    healthy: bool


def status() -> dict[str, ServiceStatus]:
    st = StackSettings()
    home = get_settings().home
    urls = {"prefect": st.prefect_url, "mlflow": st.mlflow_url, "evidently": st.evidently_url}
    health = {
        "prefect": lambda: http_ok(st.health_url("prefect")),
        "mlflow": lambda: http_ok(st.health_url("mlflow")),
        "evidently": lambda: http_ok(st.health_url("evidently")),
    }
    db_file = stack_dir(home) / "database"
    on_postgres = db_file.is_file() and db_file.read_text().strip() == "postgresql"
    out: dict[str, ServiceStatus] = {}
    for name in SERVICE_NAMES:
        if name == "postgres" and not on_postgres and pid_record(name, home) is None:
            continue  # the SQLite stack has no database server
        proc = running_leader(name, home)
        row: ServiceStatus = {
            "running": proc is not None,
            "pid": proc.pid if proc else None,
            "log": str(log_file(name, home)),
        }
        if proc is None:
            row["leftovers"] = [p.pid for p in leftover_processes(name, home)]
        sup = supervision(name, home)
        if sup:
            row["supervisor"] = sup
        if name == "postgres":
            row["data"] = str(postgres.data_dir(home))  # outside the home when run as root
        if name in urls:
            row["url"] = urls[name]
            row["healthy"] = bool(proc) and health[name]()
        out[name] = row
    return out


def check_mlflow_admin_password(
    st: StackSettings, home: Path, *, rotate: bool = False, echo: Callable[[str], None] = print
) -> bool:
    """Refuse (or, asked to, rotate) an MLFLOW_AUTH_ADMIN_PASSWORD that differs from the stored one.

    Returns True when it changed the stored password.

    MLflow reads the variable only to create the admin user on the very first start; a changed
    value later is ignored by the server, but clients started by ``up`` would send it and every
    flow run would fail with 401.
    """
    db = home / "mlflow-auth.db"
    if st.mlflow_admin_password is None or not db.is_file():
        return False  # auth off, or first start: MLflow creates the admin with this password
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore()
    init_db: Callable[[str], None] = store.init_db  # MLflow leaves it unannotated
    init_db(f"sqlite:///{db}")
    user, password = st.mlflow_admin_username, st.mlflow_admin_password.get_secret_value()
    try:
        if not store.has_user(user) or store.authenticate_user(user, password):
            return False
        if not rotate:
            raise StackError(
                f"MLFLOW_AUTH_ADMIN_PASSWORD is not the password of MLflow admin '{user}' stored in {db} "
                "(MLflow uses the variable only when it creates the admin, on the first `up`). "
                "Export the current password, or make the new value the admin's password with "
                "`ringflow up --rotate-mlflow-admin-password`."
            )
        store.update_user(user, password=password)
        echo(f"mlflow   admin '{user}': password changed to MLFLOW_AUTH_ADMIN_PASSWORD")
        return True
    finally:
        store.engine.dispose()


def check_prefect_login(api_url: str, auth_string: str | None) -> None:
    """Raise a StackError naming the variable to set when the Prefect API refuses this client."""
    try:
        r = httpx.post(
            f"{api_url}/deployments/filter", json={"limit": 1}, timeout=10, auth=parse_auth_string(auth_string)
        )
    except httpx.HTTPError as e:
        raise StackError(f"the Prefect API at {api_url} does not answer: {e}") from None
    if r.status_code != 401:
        return
    if not auth_string:
        raise StackError(
            f"the Prefect API at {api_url} requires a login: set PREFECT_API_AUTH_STRING=user:password "
            "(the PREFECT_SERVER_API_AUTH_STRING the stack was started with)"
        )
    raise StackError(
        f"the Prefect API at {api_url} refused PREFECT_API_AUTH_STRING (401): it must equal the "
        "PREFECT_SERVER_API_AUTH_STRING the stack was started with"
    )


def deployment_summary() -> list[str]:
    """Deployments (status, schedules, last poll) and the automation, read from the server."""
    from prefect import get_client
    from prefect.events.schemas.automations import EventTrigger
    from prefect.settings import (
        PREFECT_API_AUTH_STRING,
        PREFECT_API_URL,
        temporary_settings,
    )

    from ringflow.monitoring.events import DEPLOYMENT_NAMES
    from ringflow.monitoring.events import RERUN_TRIGGER as AUTOMATION_NAME

    api_url = PREFECT_API_URL.value()
    auth = prefect_auth_string(client_env())
    check_prefect_login(api_url, auth)
    lines: list[str] = []
    with temporary_settings({PREFECT_API_AUTH_STRING: auth}), get_client(sync_client=True) as client:
        for name in DEPLOYMENT_NAMES:
            try:
                d = client.read_deployment_by_name(name)
            except Exception:
                lines.append(f"deployment {name}: not deployed (run `ringflow deploy`)")
                continue
            scheds = (
                ", ".join(
                    f"{getattr(s.schedule, 'cron', s.schedule)} {getattr(s.schedule, 'timezone', '')}"
                    f"{'' if s.active else ' (paused)'}"
                    for s in d.schedules
                )
                or "no schedule"
            )
            status = getattr(d.status, "value", d.status)
            lines.append(f"deployment {name}: {status}; schedule {scheds}")
        autos = client.read_automations_by_name(AUTOMATION_NAME)
        if autos:
            a = autos[0]
            # ringflow's automation is an EventTrigger (flows/deployments.py); name another kind
            on = ", ".join(sorted(a.trigger.expect)) if isinstance(a.trigger, EventTrigger) else a.trigger.type
            lines.append(f"automation {AUTOMATION_NAME}: {'enabled' if a.enabled else 'DISABLED'}; on {on}")
        else:
            lines.append(f"automation {AUTOMATION_NAME}: missing (run `ringflow deploy`)")
    return lines

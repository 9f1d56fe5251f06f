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

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import httpx
import psutil
from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ringflow.infra import postgres
from ringflow.training.config import PipelineConfig, get_settings
from ringflow.training.launch import kill_tree  # also reaches flow runs' horovodrun ranks in their own sessions
from ringflow.training.launch import start_ticks as _start_ticks
from ringflow.training.environment import process_defaults

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's console scripts (prefect, mlflow)


class StackError(RuntimeError):
    """The stack could not be started, checked or stopped; the message says what to do."""


class StackSettings(BaseSettings):
    """Where the servers listen, which stores they use and whether auth is on (env only)."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    host: str = Field("127.0.0.1", alias="RINGFLOW_HOST")
    """Bind address of both servers; loopback by default (auth off = nobody else may reach them)."""
    prefect_port: int = Field(4200, alias="RINGFLOW_PREFECT_PORT")
    mlflow_port: int = Field(5000, alias="RINGFLOW_MLFLOW_PORT")
    evidently_port: int = Field(8000, alias="RINGFLOW_EVIDENTLY_PORT")
    """``evidently ui`` over the monitoring workspace (``RINGFLOW_EVIDENTLY_WORKSPACE``, default
    ``$RINGFLOW_HOME/evidently``)."""
    prefect_database_url: str | None = Field(
        None,
        validation_alias=AliasChoices(
            "PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_API_DATABASE_CONNECTION_URL"
        ),
    )
    """``postgresql+asyncpg://user:pw@host:5432/prefect``; unset = SQLite under RINGFLOW_HOME."""
    mlflow_backend_store_uri: str | None = Field(None, alias="RINGFLOW_MLFLOW_BACKEND_STORE_URI")
    """``postgresql://user:pw@host:5432/mlflow``; unset = ``sqlite:///$RINGFLOW_HOME/mlflow.db``."""
    mlflow_artifacts_destination: str | None = Field(None, alias="RINGFLOW_MLFLOW_ARTIFACTS_DESTINATION")
    """``s3://bucket/prefix`` (with ``MLFLOW_S3_ENDPOINT_URL`` + ``AWS_*`` for MinIO); unset =
    ``$RINGFLOW_HOME/artifacts``."""
    prefect_auth_string: SecretStr | None = Field(None, alias="PREFECT_SERVER_API_AUTH_STRING")
    """``user:password``: the Prefect API then refuses requests without HTTP basic auth."""
    mlflow_admin_username: str = Field("admin", alias="MLFLOW_AUTH_ADMIN_USERNAME")
    mlflow_admin_password: SecretStr | None = Field(None, alias="MLFLOW_AUTH_ADMIN_PASSWORD")
    """Set = MLflow runs with ``--app-name basic-auth``; this is the admin's first password."""
    database: Literal["sqlite", "postgresql"] | None = Field(None, alias="RINGFLOW_DATABASE")
    """``postgresql``: ringflow starts its own PostgreSQL (infra/postgres.py) for both servers;
    unset = what the last ``up`` of this RINGFLOW_HOME used, else SQLite."""
    startup_timeout_s: float = Field(180, alias="RINGFLOW_STACK_STARTUP_TIMEOUT")
    stop_grace_s: float = Field(15, alias="RINGFLOW_STACK_STOP_GRACE")

    @field_validator(
        "prefect_database_url", "mlflow_backend_store_uri", "mlflow_artifacts_destination",
        "prefect_auth_string", "mlflow_admin_password", "database", mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # `export PREFECT_SERVER_API_AUTH_STRING=` means "no auth", not "the password is ''":
        # Prefect's server would take '' as the password and refuse every client.
        return None if isinstance(value, str) and not value.strip() else value

    @property
    def prefect_url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.prefect_port}"

    @property
    def prefect_api_url(self) -> str:
        return f"{self.prefect_url}/api"

    @property
    def mlflow_url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.mlflow_port}"

    @property
    def evidently_url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.evidently_port}"

    @property
    def prefect_auth(self) -> bool:
        return self.prefect_auth_string is not None

    @property
    def mlflow_auth(self) -> bool:
        return self.mlflow_admin_password is not None


def _url_host(host: str) -> str:
    # 0.0.0.0 is a bind address, not one to connect to.
    return "127.0.0.1" if host in ("0.0.0.0", "") else host


# --------------------------------------------------------------------------- processes


@dataclass
class Service:
    name: str
    cmd: list[str]
    env: dict[str, str]
    ready: Callable[[], bool]
    """True once the process answers (health endpoint, deployments polled)."""
    url: str | None = None
    port: int | None = None
    cwd: Path = ROOT
    needs: list[str] = field(default_factory=list)
    user: str | None = None
    """Run as this user (PostgreSQL refuses root)."""
    stop_signal: int | None = None
    """Sent to the first process before the tree is stopped (PostgreSQL: SIGINT = fast shutdown)."""
    after_ready: Callable[[], None] | None = None
    """Runs once the service answers, before the next one starts (PostgreSQL: roles, databases)."""
    supervised: bool = True
    """Run under ``infra.supervisor``: restarted when it dies (back-off, loop limit), log rotated.
    The pid file then names the supervisor; the service's own pid is in its state file."""
    stale_pid_file: Path | None = None
    """A pid file the service leaves when killed; the supervisor removes it before each restart
    when the process it names is gone (PostgreSQL's ``postmaster.pid``)."""


def stack_dir(home: Path | None = None) -> Path:
    return (home or get_settings().home) / "stack"


def _pid_file(name: str, home: Path | None = None) -> Path:
    return stack_dir(home) / f"{name}.pid"


def _log_file(name: str, home: Path | None = None) -> Path:
    return stack_dir(home) / f"{name}.log"


def _state_file(name: str, home: Path | None = None) -> Path:
    """A supervised service's restart count, current pid and last exit (infra/supervisor.py)."""
    return stack_dir(home) / f"{name}.state.json"


def supervision(name: str, home: Path | None = None) -> dict:
    """What the supervisor last wrote: state, restarts, child_pid, last_exit, message ({} if none)."""
    from ringflow.infra.supervisor import read_state

    return read_state(_state_file(name, home))


SERVICE_TAG_ENV = "RINGFLOW_STACK_SERVICE"
"""Set in every service's environment to ``<name>:<random token>``; inherited by everything the
service spawns (uvicorn workers, flow runs, Horovod ranks), so the whole process tree of a
service is found and stopped even after its first process died (``kill -9`` of the pid in the
pid file orphans MLflow's uvicorn, which keeps serving the port)."""


def _record(name: str, home: Path | None = None) -> dict | None:
    pf = _pid_file(name, home)
    try:
        return json.loads(pf.read_text())
    except (OSError, ValueError):
        return None


def _leader(rec: dict) -> psutil.Process | None:
    """The live process a pid record names, or None.

    The pid alone is not trusted: the start time and command line must match what ``up``
    recorded, so a pid reused by an unrelated process is never reported or signalled.
    """
    try:
        proc = psutil.Process(rec["pid"])
        ticks = _start_ticks(proc.pid)
        if ticks is not None and rec.get("start_ticks") is not None:
            same_start = ticks == rec["start_ticks"]
        else:  # psutil derives create_time from /proc/stat btime, which can move by a second
            same_start = abs(proc.create_time() - rec["create_time"]) < 5.0
        launched = rec.get("cmd")
        cmdline = proc.cmdline()
        # a script's shebang puts its interpreter in front of the argv we launched
        same = same_start and (cmdline[-len(launched):] == launched if launched else cmdline == rec["cmdline"])
        if same and proc.status() != psutil.STATUS_ZOMBIE:
            return proc
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError, KeyError, TypeError):
        pass
    return None


def _family(rec: dict) -> list[psutil.Process]:
    """Every live process of the service: those carrying its tag, plus the leader's descendants."""
    procs: dict[int, psutil.Process] = {}
    leader = _leader(rec)
    if leader is not None:
        procs[leader.pid] = leader
        try:
            procs.update((c.pid, c) for c in leader.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    tag = rec.get("tag")
    if tag:
        for p in psutil.process_iter(["environ", "status"]):
            env = p.info.get("environ") or {}
            if env.get(SERVICE_TAG_ENV) == tag and p.info.get("status") != psutil.STATUS_ZOMBIE:
                procs.setdefault(p.pid, p)
    return list(procs.values())


def _running(name: str, home: Path | None = None) -> psutil.Process | None:
    """The live first process of a service, or None. A pid file whose process and tree are all
    gone is removed; one with leftovers stays, so ``up``/``down`` can find and stop them."""
    rec = _record(name, home)
    if rec is None:
        _pid_file(name, home).unlink(missing_ok=True)
        return None
    leader = _leader(rec)
    if leader is None and not _family(rec):
        _pid_file(name, home).unlink(missing_ok=True)
    return leader


def _leftovers(name: str, home: Path | None = None) -> list[psutil.Process]:
    """Processes of a service whose first process died (they may still hold its port)."""
    rec = _record(name, home)
    if rec is None or _leader(rec) is not None:
        return []
    return _family(rec)


def _wait_gone(proc: psutil.Process, timeout: float) -> None:
    """Until the process exited (a zombie counts: nobody may reap it in a container)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.1)


def _stop_service(name: str, home: Path, grace_s: float) -> tuple[int | None, list[int]]:
    """Stop the service's whole tree; returns (its pid if it was alive, pids of leftovers stopped)."""
    rec = _record(name, home)
    if rec is None:
        return None, []
    leader = _leader(rec)
    if leader is not None and rec.get("stop_signal"):
        try:  # its own clean shutdown first (PostgreSQL checkpoints), the tree kill after
            leader.send_signal(rec["stop_signal"])
            _wait_gone(leader, grace_s)
        except psutil.NoSuchProcess:
            pass
    if leader is not None:
        kill_tree(leader.pid, grace_s=grace_s)
    rest = [p for p in _family(rec) if leader is None or p.pid != leader.pid]
    for p in rest:
        kill_tree(p.pid, grace_s=grace_s)
    _pid_file(name, home).unlink(missing_ok=True)
    return (leader.pid if leader else None), [p.pid for p in rest if leader is None]



def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _http_ok(url: str, auth: tuple[str, str] | None = None) -> bool:
    try:
        return httpx.get(url, timeout=3, auth=auth).status_code == 200
    except httpx.HTTPError:
        return False


def _secret_key(home: Path) -> str:
    """A stable Flask secret for MLflow's CSRF protection, kept 0600 beside the pid files."""
    path = stack_dir(home) / "mlflow-flask-secret"
    if not path.is_file():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32))
    return path.read_text().strip()


def client_env(st: StackSettings | None = None) -> dict[str, str]:
    """What a client process (serve, flow runs, the CLI) needs to reach the stack.

    Credentials come from the caller's environment; when only the server-side values are set,
    the clients that ``up`` starts reuse them (the one operator owns both sides).
    """
    st = st or StackSettings()
    env = {"PREFECT_API_URL": st.prefect_api_url, "MLFLOW_TRACKING_URI": st.mlflow_url}
    if st.prefect_auth and not os.environ.get("PREFECT_API_AUTH_STRING"):
        env["PREFECT_API_AUTH_STRING"] = st.prefect_auth_string.get_secret_value()
    if st.mlflow_auth and not os.environ.get("MLFLOW_TRACKING_PASSWORD"):
        env["MLFLOW_TRACKING_USERNAME"] = st.mlflow_admin_username
        env["MLFLOW_TRACKING_PASSWORD"] = st.mlflow_admin_password.get_secret_value()
    return env


def _prefect_auth_tuple(env: dict[str, str]) -> tuple[str, str] | None:
    s = env.get("PREFECT_API_AUTH_STRING") or os.environ.get("PREFECT_API_AUTH_STRING")
    if not s:
        return None
    user, _, pw = s.partition(":")
    return user, pw


def _deployments_ready(api_url: str, auth: tuple[str, str] | None, names: list[str]) -> bool:
    """The serve process is healthy once it has created and polled every deployment."""
    try:
        for name in names:
            r = httpx.get(f"{api_url}/deployments/name/{name}", timeout=3, auth=auth)
            if r.status_code != 200 or r.json().get("status") != "READY":
                return False
        return True
    except httpx.HTTPError:
        return False


def _services(st: StackSettings, home: Path, config_json: Path | None, database: str = "sqlite",
              workspace: Path | None = None) -> list[Service]:
    """``workspace``: the Evidently workspace (``Settings.evidently_workspace``; None =
    ``home/evidently``), the one the UI reads and the serve process's monitoring runs write."""
    from ringflow.monitoring.reports import WORKSPACE_DIR

    workspace = workspace or home / WORKSPACE_DIR
    base = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_API_KEY")}
    base["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    process_defaults(base)  # servers, the runner and its flow runs: no telemetry, quiet logs (as the CLI)
    base["RINGFLOW_HOME"] = str(home)
    base["RINGFLOW_EVIDENTLY_WORKSPACE"] = str(workspace)
    base["PYTHONUNBUFFERED"] = "1"

    services: list[Service] = []
    prefect_db = st.prefect_database_url
    backend = st.mlflow_backend_store_uri or f"sqlite:///{home / 'mlflow.db'}"
    if database == "postgresql":
        pgs = postgres.PostgresSettings()
        pg_host = _url_host(st.host)
        prefect_db = postgres.prefect_url(home, pg_host, pgs.port)
        backend = postgres.mlflow_url(home, pg_host, pgs.port)

        def _prepare_databases() -> None:
            postgres.ensure_databases(home, pg_host, pgs.port)
            if not st.mlflow_artifacts_destination:
                _local_experiment(config_json, home, backend)

        services.append(Service(
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
        ))

    prefect_home = home / "prefect"
    penv = {**base, "PREFECT_HOME": str(prefect_home)}
    penv["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = (
        prefect_db or f"sqlite+aiosqlite:///{prefect_home / 'prefect.db'}"
    )
    penv.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)  # one name, no ambiguity
    if st.prefect_auth:
        penv["PREFECT_SERVER_API_AUTH_STRING"] = st.prefect_auth_string.get_secret_value()
    else:  # an exported empty value would be taken as the password '' (every client gets 401)
        penv.pop("PREFECT_SERVER_API_AUTH_STRING", None)
    # The UI's API address comes from settings, not from --port: without these it calls :4200.
    penv["PREFECT_SERVER_API_HOST"] = st.host
    penv["PREFECT_SERVER_API_PORT"] = str(st.prefect_port)
    penv.setdefault("PREFECT_UI_API_URL", st.prefect_api_url)  # set it when behind a proxy
    prefect = Service(
        name="prefect",
        cmd=[str(BIN / "prefect"), "server", "start", "--host", st.host, "--port", str(st.prefect_port)],
        env=penv,
        ready=lambda: _http_ok(f"{st.prefect_api_url}/health"),
        url=st.prefect_url,
        port=st.prefect_port,
    )

    artifacts = st.mlflow_artifacts_destination or str(home / "artifacts")
    menv = dict(base)
    menv["MLFLOW_BACKEND_STORE_URI"] = backend  # may hold a password: environment, not argv
    # MLflow's huey job runners (GenAI jobs, trace archival) are 7 extra processes that this
    # pipeline never uses; on a 2-core box they cost start-up time and memory.
    menv.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    mcmd = [
        str(BIN / "mlflow"), "server",
        "--artifacts-destination", artifacts,
        "--host", st.host, "--port", str(st.mlflow_port), "--workers", "1",
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
        menv["MLFLOW_FLASK_SERVER_SECRET_KEY"] = os.environ.get(
            "MLFLOW_FLASK_SERVER_SECRET_KEY"
        ) or _secret_key(home)
    mlflow = Service(
        name="mlflow",
        cmd=mcmd,
        env=menv,
        ready=lambda: _http_ok(f"{st.mlflow_url}/health"),
        url=st.mlflow_url,
        port=st.mlflow_port,
    )

    cenv = {**base, **client_env(st)}
    for k in ("PREFECT_SERVER_API_AUTH_STRING", "MLFLOW_AUTH_ADMIN_PASSWORD"):
        cenv.pop(k, None)  # the runner and its flow runs are clients: no server secrets
    scmd = [sys.executable, "-m", "ringflow.flows.deployments", "serve"]
    if config_json is not None:
        scmd += ["--config-json", str(config_json)]
    from ringflow.monitoring.events import DEPLOYMENT_NAMES

    auth = _prefect_auth_tuple(cenv)
    serve = Service(
        name="serve",
        cmd=scmd,
        env=cenv,
        ready=lambda: _deployments_ready(st.prefect_api_url, auth, DEPLOYMENT_NAMES),
        needs=["prefect", "mlflow"],
        supervised=True,  # schedules and reruns stop silently without it
    )
    # Evidently's UI over the workspace that every monitoring run adds its snapshots to
    evidently = Service(
        name="evidently",
        cmd=[str(BIN / "evidently"), "ui", "--workspace", str(workspace),
             "--host", st.host, "--port", str(st.evidently_port)],
        env=dict(base),
        ready=lambda: _http_ok(f"{st.evidently_url}/api/version"),
        url=st.evidently_url,
        port=st.evidently_port,
    )
    return [*services, prefect, mlflow, evidently, serve]


SUPERVISOR_ENV_PREFIXES = ("RINGFLOW_SUPERVISE_", "RINGFLOW_STACK_LOG_", "RINGFLOW_STACK_STOP_GRACE")
"""The supervisor's settings (infra/supervisor.py), passed even to a service with a minimal env."""


def _start(svc: Service, home: Path) -> psutil.Process:
    log = _log_file(svc.name, home)
    cmd, env, cwd, user = svc.cmd, svc.env, svc.cwd, svc.user
    if svc.supervised:
        # the supervisor writes (and rotates) the service's log; its own rare output goes beside it
        _state_file(svc.name, home).unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "ringflow.infra.supervisor", "--name", svc.name,
               "--state", str(_state_file(svc.name, home)), "--log", str(log)]
        # the supervisor runs as us in the repository (it imports infra.supervisor and writes
        # the state file and log); the user and directory are the service's
        if svc.cwd != ROOT:
            cmd += ["--cwd", str(svc.cwd)]
        if svc.user:
            cmd += ["--user", svc.user]
        if svc.stop_signal:
            cmd += ["--stop-signal", str(int(svc.stop_signal))]
        if svc.stale_pid_file:
            cmd += ["--stale-pid-file", str(svc.stale_pid_file)]
        cmd += ["--", *svc.cmd]
        env = {**{k: v for k, v in os.environ.items() if k.startswith(SUPERVISOR_ENV_PREFIXES)}, **svc.env}
        cwd, user = ROOT, None
        log = stack_dir(home) / f"{svc.name}.supervisor.log"
    with open(log, "ab") as out:
        out.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {svc.name}\n".encode())
        out.flush()
        tag = f"{svc.name}:{secrets.token_hex(8)}"
        p = subprocess.Popen(
            cmd, env={**env, SERVICE_TAG_ENV: tag}, cwd=cwd,
            user=user, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,  # own group: down stops its children too
        )
    proc = psutil.Process(p.pid)
    # The argv we launched, not /proc's cmdline: read right after the fork, that can still be
    # ours (`ringflow up`) if the child has not exec'd yet, and the service then looks foreign.
    rec = {"pid": p.pid, "create_time": proc.create_time(), "start_ticks": _start_ticks(p.pid),
           "cmd": [str(a) for a in cmd], "tag": tag, "stop_signal": svc.stop_signal}
    _pid_file(svc.name, home).write_text(json.dumps(rec))
    return proc


def _wait_ready(svc: Service, proc: psutil.Process, home: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if svc.ready():
            return
        sup = supervision(svc.name, home) if svc.supervised else {}
        if sup.get("restarts", 0) > 0 or sup.get("state") in ("backoff", "gave-up"):
            raise StackError(
                f"{svc.name} exited during start-up (its supervisor is restarting it); last lines of "
                f"{_log_file(svc.name, home)}:\n" + _tail(_log_file(svc.name, home))
            )
        if not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE:
            raise StackError(
                f"{svc.name} exited during start-up; last lines of {_log_file(svc.name, home)}:\n"
                + _tail(_log_file(svc.name, home))
            )
        time.sleep(0.5)
    raise StackError(
        f"{svc.name} did not become ready within {timeout:.0f}s (raise RINGFLOW_STACK_STARTUP_TIMEOUT "
        f"on a slow machine); last lines of {_log_file(svc.name, home)}:\n" + _tail(_log_file(svc.name, home))
    )


def _tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


# --------------------------------------------------------------------------- commands


SERVICE_NAMES = ["postgres", "prefect", "mlflow", "evidently", "serve"]


def write_env_file(st: StackSettings, home: Path) -> Path:
    """URLs only: credentials stay in the operator's environment, never on disk."""
    path = stack_dir(home) / "env"
    path.write_text(f"PREFECT_API_URL={st.prefect_api_url}\nMLFLOW_TRACKING_URI={st.mlflow_url}\n")
    return path


EMPTY_MEANS_UNSET = (
    "PREFECT_SERVER_API_AUTH_STRING", "PREFECT_API_AUTH_STRING", "PREFECT_API_KEY", "PREFECT_API_URL",
    "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_URI",
)


def apply_stack_env(home: Path) -> bool:
    """CLI hook: while the stack is up, point unset PREFECT_API_URL / MLFLOW_TRACKING_URI at it."""
    for key in EMPTY_MEANS_UNSET:
        # exported but empty = not set; Prefect would take '' as a password (its ephemeral
        # server then refuses every client) or as an address
        if key in os.environ and not os.environ[key].strip():
            del os.environ[key]
    path = stack_dir(home) / "env"
    if not path.is_file() or _running("prefect", home) is None:
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


def _local_experiment(config_json: Path | None, home: Path, tracking_uri: str | None = None) -> None:
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
        _local_experiment(config_json, home)
    if database == "postgresql":
        try:
            if postgres.ensure_cluster(home):
                echo(f"postgres initialised   {postgres.data_dir(home)}")
            if postgres.clear_stale_pid_file(home):
                echo("postgres: removed the pid file of a postmaster that is gone (it was killed)")
        except postgres.PostgresError as e:
            raise StackError(str(e)) from None
    (stack_dir(home) / "database").write_text(database + "\n")

    if st.mlflow_auth and check_mlflow_admin_password(st, home, rotate=rotate_mlflow_admin_password, echo=echo):
        # the runner and its flow runs carry the old password: restart them with the new one
        if _record("serve", home) is not None:
            _stop_service("serve", home, st.stop_grace_s)

    result: dict[str, str] = {}
    started: list[tuple[str, psutil.Process]] = []
    try:
        for svc in _services(st, home, config_json, database, get_settings().evidently_workspace):
            if svc.name == "serve" and not serve:
                continue
            proc = _running(svc.name, home)
            if proc is not None:
                result[svc.name] = f"already running (pid {proc.pid})"
                echo(f"{svc.name:8s} already running   pid {proc.pid}")
                if svc.after_ready is not None:
                    svc.after_ready()  # idempotent: a changed config's experiment, lost roles
                continue
            leftovers = _leftovers(svc.name, home)
            if leftovers:
                _stop_service(svc.name, home, st.stop_grace_s)
                echo(f"{svc.name:8s} its first process had died; stopped {len(leftovers)} leftover "
                     f"process(es) still running: pid {', '.join(str(p.pid) for p in leftovers)}")
            if svc.port is not None and not _port_free(st.host, svc.port):
                raise StackError(
                    f"port {svc.port} on {st.host} is in use by a process ringflow did not start; "
                    f"stop it or choose another port (RINGFLOW_{svc.name.upper()}_PORT)"
                )
            proc = _start(svc, home)
            started.append((svc.name, proc))
            _wait_ready(svc, proc, home, st.startup_timeout_s)
            if svc.after_ready is not None:
                svc.after_ready()
            result[svc.name] = f"started (pid {proc.pid})"
            echo(f"{svc.name:8s} started           pid {proc.pid:<7d} log {_log_file(svc.name, home)}")
    except BaseException as e:
        # Never half a stack: what this `up` started goes again (what was running stays).
        for name, _ in reversed(started):
            _stop_service(name, home, st.stop_grace_s)
        if started and isinstance(e, StackError):
            raise StackError(
                f"{e}\n(stopped what this `up` had started: {', '.join(n for n, _ in started)})"
            ) from None
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
    if recorded and requested and recorded != requested and _record("prefect", home) is not None:
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
        if _record(name, home) is None:
            result[name] = "not running"
            _state_file(name, home).unlink(missing_ok=True)  # e.g. a supervisor that gave up
            continue
        t0 = time.monotonic()
        pid, leftovers = _stop_service(name, home, st.stop_grace_s)
        _state_file(name, home).unlink(missing_ok=True)
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


def status() -> dict[str, dict[str, object]]:
    st = StackSettings()
    home = get_settings().home
    urls = {"prefect": st.prefect_url, "mlflow": st.mlflow_url, "evidently": st.evidently_url}
    health = {
        "prefect": lambda: _http_ok(f"{st.prefect_api_url}/health"),
        "mlflow": lambda: _http_ok(f"{st.mlflow_url}/health"),
        "evidently": lambda: _http_ok(f"{st.evidently_url}/api/version"),
    }
    db_file = stack_dir(home) / "database"
    on_postgres = db_file.is_file() and db_file.read_text().strip() == "postgresql"
    out: dict[str, dict[str, object]] = {}
    for name in SERVICE_NAMES:
        if name == "postgres" and not on_postgres and _record(name, home) is None:
            continue  # the SQLite stack has no database server
        proc = _running(name, home)
        row: dict[str, object] = {"running": proc is not None, "pid": proc.pid if proc else None,
                                  "log": str(_log_file(name, home))}
        if proc is None:
            row["leftovers"] = [p.pid for p in _leftovers(name, home)]
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
    if not db.is_file():
        return False  # first start: MLflow creates the admin with this password
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore()
    store.init_db(f"sqlite:///{db}")
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
    user, _, pw = (auth_string or "").partition(":")
    try:
        r = httpx.post(f"{api_url}/deployments/filter", json={"limit": 1}, timeout=10,
                       auth=(user, pw) if auth_string else None)
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

    from ringflow.monitoring.events import DEPLOYMENT_NAMES
    from ringflow.monitoring.events import RERUN_TRIGGER as AUTOMATION_NAME

    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    api_url = PREFECT_API_URL.value()
    auth = client_env().get("PREFECT_API_AUTH_STRING") or os.environ.get("PREFECT_API_AUTH_STRING")
    check_prefect_login(api_url, auth)
    lines: list[str] = []
    with temporary_settings({PREFECT_API_AUTH_STRING: auth}), get_client(sync_client=True) as client:
        for name in DEPLOYMENT_NAMES:
            try:
                d = client.read_deployment_by_name(name)
            except Exception:
                lines.append(f"deployment {name}: not deployed (run `ringflow deploy`)")
                continue
            scheds = ", ".join(
                f"{getattr(s.schedule, 'cron', s.schedule)} {getattr(s.schedule, 'timezone', '')}"
                f"{'' if s.active else ' (paused)'}"
                for s in d.schedules
            ) or "no schedule"
            status = getattr(d.status, "value", d.status)
            lines.append(f"deployment {name}: {status}; schedule {scheds}")
        autos = client.read_automations_by_name(AUTOMATION_NAME)
        if autos:
            a = autos[0]
            lines.append(f"automation {AUTOMATION_NAME}: {'enabled' if a.enabled else 'DISABLED'}; "
                         f"on {', '.join(sorted(a.trigger.expect))}")
        else:
            lines.append(f"automation {AUTOMATION_NAME}: missing (run `ringflow deploy`)")
    return lines

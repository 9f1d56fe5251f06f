"""``ringflow up`` / ``down`` / ``status``: the real servers on one box.

Three long-lived processes, each in its own session (process group) so that ``down`` can stop
it with everything it spawned (uvicorn workers, flow-run subprocesses):

- ``prefect``: ``prefect server start`` (UI + API + services; SQLite under
  ``$RINGFLOW_HOME/prefect/``, PostgreSQL when ``PREFECT_API_DATABASE_CONNECTION_URL`` is set),
- ``mlflow``: ``mlflow server`` (SQLite ``$RINGFLOW_HOME/mlflow.db`` + proxied artifacts under
  ``$RINGFLOW_HOME/artifacts``, or the backend/artifact URIs from the environment),
- ``serve``: ``python -m flows.deployments serve``: creates the deployments, schedules and the
  rerun automation, then executes the runs that the UI, the schedules and the automation create.

Every process has a pid file (pid + start time + command line, so a reused pid is never
signalled) and a log under ``$RINGFLOW_HOME/stack/``. ``$RINGFLOW_HOME/stack/env`` names the
server URLs (never credentials) for CLI commands started while the stack is up.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import httpx
import psutil
from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from training.config import PipelineConfig, get_settings
from training.launch import kill_tree  # also reaches flow runs' horovodrun ranks in their own sessions
from training.telemetry import telemetry_off

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
    startup_timeout_s: float = Field(180, alias="RINGFLOW_STACK_STARTUP_TIMEOUT")
    stop_grace_s: float = Field(15, alias="RINGFLOW_STACK_STOP_GRACE")

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


def stack_dir(home: Path | None = None) -> Path:
    return (home or get_settings().home) / "stack"


def _pid_file(name: str, home: Path | None = None) -> Path:
    return stack_dir(home) / f"{name}.pid"


def _log_file(name: str, home: Path | None = None) -> Path:
    return stack_dir(home) / f"{name}.log"


def _running(name: str, home: Path | None = None) -> psutil.Process | None:
    """The live process a pid file names, or None (a stale file is removed).

    The pid alone is not trusted: the start time and command line must match what ``up``
    recorded, so a pid reused by an unrelated process is never reported or signalled.
    """
    pf = _pid_file(name, home)
    if not pf.is_file():
        return None
    try:
        rec = json.loads(pf.read_text())
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
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError, KeyError):
        pass
    pf.unlink(missing_ok=True)
    return None


def _start_ticks(pid: int) -> int | None:
    """Process start time in clock ticks since boot (Linux): exact, unlike a wall-clock time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])  # field 22 overall
    except (OSError, ValueError, IndexError):
        return None


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


def _services(st: StackSettings, home: Path, config_json: Path | None) -> list[Service]:
    base = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_API_KEY")}
    base["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    telemetry_off(base)  # servers, the runner and its flow runs send no usage telemetry
    base["RINGFLOW_HOME"] = str(home)
    base["PYTHONUNBUFFERED"] = "1"

    prefect_home = home / "prefect"
    penv = {**base, "PREFECT_HOME": str(prefect_home)}
    penv["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = (
        st.prefect_database_url or f"sqlite+aiosqlite:///{prefect_home / 'prefect.db'}"
    )
    penv.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)  # one name, no ambiguity
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

    backend = st.mlflow_backend_store_uri or f"sqlite:///{home / 'mlflow.db'}"
    artifacts = st.mlflow_artifacts_destination or str(home / "artifacts")
    menv = dict(base)
    # MLflow's huey job runners (GenAI jobs, trace archival) are 7 extra processes that this
    # pipeline never uses; on a 2-core box they cost start-up time and memory.
    menv.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    mcmd = [
        str(BIN / "mlflow"), "server",
        "--backend-store-uri", backend,
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
    scmd = [sys.executable, "-m", "flows.deployments", "serve"]
    if config_json is not None:
        scmd += ["--config-json", str(config_json)]
    from flows.deployments import DEPLOYMENT_NAMES

    auth = _prefect_auth_tuple(cenv)
    serve = Service(
        name="serve",
        cmd=scmd,
        env=cenv,
        ready=lambda: _deployments_ready(st.prefect_api_url, auth, DEPLOYMENT_NAMES),
        needs=["prefect", "mlflow"],
    )
    return [prefect, mlflow, serve]


def _start(svc: Service, home: Path) -> psutil.Process:
    log = _log_file(svc.name, home)
    with open(log, "ab") as out:
        out.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {svc.name}\n".encode())
        out.flush()
        p = subprocess.Popen(
            svc.cmd, env=svc.env, cwd=svc.cwd, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,  # own group: down stops its children too
        )
    proc = psutil.Process(p.pid)
    # The argv we launched, not /proc's cmdline: read right after the fork, that can still be
    # ours (`ringflow up`) if the child has not exec'd yet, and the service then looks foreign.
    rec = {"pid": p.pid, "create_time": proc.create_time(), "start_ticks": _start_ticks(p.pid),
           "cmd": [str(a) for a in svc.cmd]}
    _pid_file(svc.name, home).write_text(json.dumps(rec))
    return proc


def _wait_ready(svc: Service, proc: psutil.Process, home: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if svc.ready():
            return
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


SERVICE_NAMES = ["prefect", "mlflow", "serve"]


def write_env_file(st: StackSettings, home: Path) -> Path:
    """URLs only: credentials stay in the operator's environment, never on disk."""
    path = stack_dir(home) / "env"
    path.write_text(f"PREFECT_API_URL={st.prefect_api_url}\nMLFLOW_TRACKING_URI={st.mlflow_url}\n")
    return path


def apply_stack_env(home: Path) -> bool:
    """CLI hook: while the stack is up, point unset PREFECT_API_URL / MLFLOW_TRACKING_URI at it."""
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


def _local_experiment(config_json: Path | None, home: Path) -> None:
    """Create the pipeline's experiment in the shared SQLite store before the server does.

    A server-created experiment keeps its artifacts as ``mlflow-artifacts:`` URIs, which only a
    running server resolves: after ``ringflow down``, ``ringflow run`` on the same store could not
    log to it. Created here, it points at ``$RINGFLOW_HOME/artifacts/<experiment>``, the same
    directory the server serves, so runs work with the stack up or down.
    """
    from mlflow import MlflowClient

    from tasks.tracking import ensure_experiment

    cfg = PipelineConfig.model_validate_json(config_json.read_text()) if config_json else PipelineConfig()
    ensure_experiment(MlflowClient(f"sqlite:///{home / 'mlflow.db'}"), cfg.registry.experiment)


def up(
    config: PipelineConfig | None = None,
    *,
    serve: bool = True,
    echo: Callable[[str], None] = print,
) -> dict[str, str]:
    """Start what is not running yet, wait until each answers, return ``{name: status}``.

    Idempotent: services whose pid file names a live process are left alone.
    """
    st = StackSettings()
    home = get_settings().home
    stack_dir(home).mkdir(parents=True, exist_ok=True)
    (home / "prefect").mkdir(exist_ok=True)
    if not st.mlflow_artifacts_destination:
        (home / "artifacts").mkdir(exist_ok=True)
    config_json = remember_config(config, home) if config is not None else None
    if config_json is None and (stack_dir(home) / "config.json").is_file():
        config_json = stack_dir(home) / "config.json"

    if not st.mlflow_backend_store_uri and not st.mlflow_artifacts_destination:
        _local_experiment(config_json, home)

    result: dict[str, str] = {}
    for svc in _services(st, home, config_json):
        if svc.name == "serve" and not serve:
            continue
        proc = _running(svc.name, home)
        if proc is not None:
            result[svc.name] = f"already running (pid {proc.pid})"
            echo(f"{svc.name:8s} already running   pid {proc.pid}")
            continue
        if svc.port is not None and not _port_free(st.host, svc.port):
            raise StackError(
                f"port {svc.port} on {st.host} is in use by a process ringflow did not start; "
                f"stop it or choose another port (RINGFLOW_{svc.name.upper()}_PORT)"
            )
        proc = _start(svc, home)
        try:
            _wait_ready(svc, proc, home, st.startup_timeout_s)
        except BaseException:
            kill_tree(proc.pid, grace_s=st.stop_grace_s)
            _pid_file(svc.name, home).unlink(missing_ok=True)
            raise
        result[svc.name] = f"started (pid {proc.pid})"
        echo(f"{svc.name:8s} started           pid {proc.pid:<7d} log {_log_file(svc.name, home)}")
    write_env_file(st, home)
    return result


def down(echo: Callable[[str], None] = print) -> dict[str, str]:
    """Stop exactly the processes ``up`` started (reverse order), then remove the env file."""
    st = StackSettings()
    home = get_settings().home
    result: dict[str, str] = {}
    for name in reversed(SERVICE_NAMES):
        proc = _running(name, home)
        if proc is None:
            result[name] = "not running"
            continue
        t0 = time.monotonic()
        kill_tree(proc.pid, grace_s=st.stop_grace_s)
        _pid_file(name, home).unlink(missing_ok=True)
        result[name] = f"stopped (pid {proc.pid})"
        echo(f"{name:8s} stopped   pid {proc.pid:<7d} in {time.monotonic() - t0:.1f}s")
    (stack_dir(home) / "env").unlink(missing_ok=True)
    return result


def status() -> dict[str, dict[str, object]]:
    st = StackSettings()
    home = get_settings().home
    urls = {"prefect": st.prefect_url, "mlflow": st.mlflow_url}
    health = {
        "prefect": lambda: _http_ok(f"{st.prefect_api_url}/health"),
        "mlflow": lambda: _http_ok(f"{st.mlflow_url}/health"),
    }
    out: dict[str, dict[str, object]] = {}
    for name in SERVICE_NAMES:
        proc = _running(name, home)
        row: dict[str, object] = {"running": proc is not None, "pid": proc.pid if proc else None,
                                  "log": str(_log_file(name, home))}
        if name in urls:
            row["url"] = urls[name]
            row["healthy"] = bool(proc) and health[name]()
        out[name] = row
    return out


def deployment_summary() -> list[str]:
    """Deployments (status, schedules, last poll) and the automation, read from the server."""
    from prefect import get_client

    from flows.deployments import AUTOMATION_NAME, DEPLOYMENT_NAMES

    lines: list[str] = []
    with get_client(sync_client=True) as client:
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

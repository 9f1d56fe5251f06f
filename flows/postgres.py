"""ringflow's own PostgreSQL for the team stack (``ringflow up --database postgresql``).

One server started from Debian's ``postgresql`` package binaries (never the system service):
its data directory is ``$RINGFLOW_HOME/postgres/data``, it listens on the stack host and its own
port (TCP only, no Unix socket), and it holds **two databases with their own owners**, ``prefect``
and ``mlflow`` (both servers run Alembic with an ``alembic_version`` table, so they must never
share one). Passwords are generated once and kept 0600 in ``$RINGFLOW_HOME/postgres/credentials.json``;
they reach the servers through their environment, never a command line.

Drivers: Prefect uses ``postgresql+asyncpg`` (asyncpg comes with Prefect), MLflow
``postgresql+psycopg2`` (``psycopg2-binary``; a bare ``postgresql://`` means psycopg 3 to
SQLAlchemy 2.1, which is not installed).

PostgreSQL refuses to run as root: as root, ``initdb`` and ``postgres`` run as the ``postgres``
user, which must be able to reach the data directory (every parent directory needs ``o+x``).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

SYSTEM_USER = "postgres"
DATABASES = ("prefect", "mlflow")


class PostgresError(RuntimeError):
    """PostgreSQL could not be set up or reached; the message says what to do."""


class PostgresSettings(BaseSettings):
    """Where ringflow's PostgreSQL listens and which binaries it uses (env only)."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    port: int = Field(5433, alias="RINGFLOW_POSTGRES_PORT")
    """Its own port: 5432 is left to a system PostgreSQL."""
    bin_dir: Path | None = Field(None, alias="RINGFLOW_POSTGRES_BIN")
    """Directory with ``initdb`` and ``postgres``; unset = newest ``/usr/lib/postgresql/*/bin``."""


@dataclass(frozen=True)
class Credentials:
    superuser: str
    prefect: str
    mlflow: str


def postgres_dir(home: Path) -> Path:
    return home / "postgres"


def data_dir(home: Path) -> Path:
    return postgres_dir(home) / "data"


def bin_dir(settings: PostgresSettings | None = None) -> Path:
    settings = settings or PostgresSettings()
    if settings.bin_dir is not None:
        candidates = [settings.bin_dir]
    else:
        candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                            key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, reverse=True)
    for d in candidates:
        if (d / "initdb").is_file() and (d / "postgres").is_file():
            return d
    raise PostgresError(
        "PostgreSQL is not installed (no initdb/postgres under "
        f"{settings.bin_dir or '/usr/lib/postgresql/*/bin'}): run `make postgres-deps` "
        "(Debian's postgresql package) or set RINGFLOW_POSTGRES_BIN"
    )


def _run_as() -> str | None:
    """The user PostgreSQL runs as: ``postgres`` when we are root (it refuses root), else us."""
    return SYSTEM_USER if os.geteuid() == 0 else None


def _chown(path: Path) -> None:
    if _run_as():
        shutil.chown(path, SYSTEM_USER, SYSTEM_USER)


def credentials(home: Path) -> Credentials:
    """The generated passwords (created once, 0600, owned by whoever runs ``ringflow up``)."""
    path = postgres_dir(home) / "credentials.json"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {k: secrets.token_hex(16) for k in ("superuser", *DATABASES)}
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    return Credentials(**json.loads(path.read_text()))


def _check_reachable(directory: Path) -> None:
    """The postgres user must be able to enter every parent of the data directory."""
    if not _run_as():
        return
    for parent in [*reversed(directory.parents)]:
        if parent.is_dir() and not (parent.stat().st_mode & 0o001):
            raise PostgresError(
                f"PostgreSQL runs as user '{SYSTEM_USER}', which cannot enter {parent} (mode "
                f"{oct(parent.stat().st_mode & 0o777)}): `chmod o+x {parent}` or choose a "
                "RINGFLOW_HOME that other users can reach"
            )


def ensure_cluster(home: Path, settings: PostgresSettings | None = None) -> bool:
    """Create the data directory with ``initdb`` unless it exists. Returns True when created."""
    data = data_dir(home)
    if (data / "PG_VERSION").is_file():
        return False
    bins = bin_dir(settings)
    creds = credentials(home)
    data.mkdir(parents=True, exist_ok=True)
    _check_reachable(data)
    data.chmod(0o700)
    _chown(data)
    # initdb reads the superuser password from a file the postgres user can read; removed at once.
    pwfile = postgres_dir(home) / ".initdb-pw"
    fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(creds.superuser + "\n")
    _chown(pwfile)
    try:
        p = subprocess.run(
            [str(bins / "initdb"), "-D", str(data), "-U", SYSTEM_USER, f"--pwfile={pwfile}",
             "--auth-host=scram-sha-256", "--auth-local=peer", "-E", "UTF8", "--no-locale"],
            user=_run_as(), cwd=data, capture_output=True, text=True, timeout=300,
        )
    finally:
        pwfile.unlink(missing_ok=True)
    if p.returncode != 0:
        shutil.rmtree(data, ignore_errors=True)  # a half-made cluster would not start next time
        raise PostgresError(f"initdb failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return True


def clear_stale_pid_file(home: Path) -> bool:
    """Remove ``postmaster.pid`` when the postmaster it names is gone or a zombie; True if removed.

    A killed postmaster leaves its pid file, and PostgreSQL refuses to start while that pid
    answers a signal. In a container nobody may reap the orphaned postmaster, so its zombie keeps
    answering and the next start fails with "lock file postmaster.pid already exists".
    """
    import psutil

    pid_file = data_dir(home) / "postmaster.pid"
    try:
        pid = int(pid_file.read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return False
    try:
        if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
            return False  # a live postmaster: leave it alone
    except psutil.NoSuchProcess:
        pass
    pid_file.unlink(missing_ok=True)
    return True


def server_command(home: Path, host: str, port: int, settings: PostgresSettings | None = None) -> list[str]:
    """The foreground ``postgres`` command: TCP on ``host:port`` only, no Unix socket."""
    return [
        str(bin_dir(settings) / "postgres"), "-D", str(data_dir(home)), "-p", str(port),
        "-c", f"listen_addresses={host}", "-c", "unix_socket_directories=",
        # the stack's clients: two servers with small pools, the runner's flow runs
        "-c", "max_connections=200",
    ]


def _connect(host: str, port: int, user: str, password: str, dbname: str = "postgres"):
    import psycopg2

    return psycopg2.connect(host=host, port=port, user=user, password=password, dbname=dbname,
                            connect_timeout=3)


def is_ready(home: Path, host: str, port: int) -> bool:
    try:
        _connect(host, port, SYSTEM_USER, credentials(home).superuser).close()
        return True
    except Exception:  # psycopg2.OperationalError while starting up
        return False


def ensure_databases(home: Path, host: str, port: int) -> None:
    """Both owners and both databases exist (idempotent); ``pg_trgm`` in Prefect's."""
    creds = credentials(home)
    conn = _connect(host, port, SYSTEM_USER, creds.superuser)
    conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
    try:
        with conn.cursor() as cur:
            for name in DATABASES:
                password = getattr(creds, name)
                cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,))
                verb = "ALTER" if cur.fetchone() else "CREATE"
                cur.execute(f'{verb} ROLE "{name}" LOGIN PASSWORD %s', (password,))
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if not cur.fetchone():
                    cur.execute(f'CREATE DATABASE "{name}" OWNER "{name}"')
    finally:
        conn.close()
    conn = _connect(host, port, SYSTEM_USER, creds.superuser, dbname="prefect")
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")  # Prefect's search indexes
    finally:
        conn.close()


def prefect_url(home: Path, host: str, port: int) -> str:
    return f"postgresql+asyncpg://prefect:{credentials(home).prefect}@{host}:{port}/prefect"


def mlflow_url(home: Path, host: str, port: int) -> str:
    return f"postgresql+psycopg2://mlflow:{credentials(home).mlflow}@{host}:{port}/mlflow"

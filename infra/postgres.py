"""ringflow's own PostgreSQL for the team stack (``ringflow up --database postgresql``).

One server started from Debian's ``postgresql`` package binaries (never the system service),
those of the major version that made its data directory (``PG_VERSION``), the newest for a new one.
It listens on the stack host and its own
port (TCP only, no Unix socket), and it holds **two databases with their own owners**, ``prefect``
and ``mlflow`` (both servers run Alembic with an ``alembic_version`` table, so they must never
share one). Passwords are generated once and kept 0600 in ``$RINGFLOW_HOME/postgres/credentials.json``;
they reach the servers through their environment, never a command line.

Drivers: Prefect uses ``postgresql+asyncpg`` (asyncpg comes with Prefect), MLflow
``postgresql+psycopg2`` (``psycopg2-binary``; a bare ``postgresql://`` means psycopg 3 to
SQLAlchemy 2.1, which is not installed).

Where the data lives: run by a user, the server runs as that user and its data directory is
``$RINGFLOW_HOME/postgres/data``. PostgreSQL refuses to run as root: as root, ``initdb`` and
``postgres`` run as the ``postgres`` user, which must reach the data directory, and a home is often
under a 0700 directory (``/root``). So as root the data directory is
``<state dir>/<home id>/data`` (default ``/var/lib/ringflow``; the ``<home id>`` directory owned by
``postgres``, 0700, with a ``home`` file naming the home it serves), recorded in
``$RINGFLOW_HOME/postgres/data-dir``: every later ``up`` and ``status`` read it there. A data
directory made in the home by an earlier version stays where it is. Nothing secret leaves the home:
the passwords stay there, 0600, readable by the caller only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    import psycopg2.extensions

SYSTEM_USER = "postgres"
DATABASES = ("prefect", "mlflow")


class PostgresError(RuntimeError):
    """PostgreSQL could not be set up or reached; the message says what to do."""


class PostgresSettings(BaseSettings):
    """Where ringflow's PostgreSQL listens and which binaries it uses (env only)."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    port: int = Field(5433, alias="RINGFLOW_POSTGRES_PORT")
    """Its own port: 5432 is left to a system PostgreSQL."""
    root: Path = Field(Path("/usr/lib/postgresql"), alias="RINGFLOW_POSTGRES_ROOT")
    """Where the installed versions live, one ``<major>/bin`` each (Debian's layout)."""
    bin_dir: Path | None = Field(None, alias="RINGFLOW_POSTGRES_BIN")
    """Directory with ``initdb`` and ``postgres``; unset = ``<root>/<major>/bin`` of the data
    directory's ``PG_VERSION``, the newest major version for a new cluster."""
    state_dir: Path = Field(Path("/var/lib/ringflow"), alias="RINGFLOW_POSTGRES_STATE_DIR")
    """As root: where the data directories live (``<state_dir>/<home id>/data``), outside any
    home, so that user ``postgres`` reaches them. Not used when ringflow runs as a user."""


@dataclass(frozen=True)
class Credentials:
    superuser: str
    prefect: str
    mlflow: str


def postgres_dir(home: Path) -> Path:
    return home / "postgres"


def _data_record(home: Path) -> Path:
    """Where the data directory of a home lives, when not in the home (one line, a path)."""
    return postgres_dir(home) / "data-dir"


def home_id(home: Path) -> str:
    """A stable name for a home: its resolved path, hashed."""
    return hashlib.sha256(str(home.resolve()).encode()).hexdigest()[:16]


def data_dir(home: Path, settings: PostgresSettings | None = None) -> Path:
    """The home's data directory: the recorded one, else one made in the home by an earlier
    version, else where a new one goes (as root under the state dir, else in the home)."""
    record = _data_record(home)
    if record.is_file():
        return Path(record.read_text().strip())
    in_home = postgres_dir(home) / "data"
    if (in_home / "PG_VERSION").is_file() or not _run_as():
        return in_home
    return (settings or PostgresSettings()).state_dir / home_id(home) / "data"


_MAJOR = re.compile(r"\d+(\.\d+)?")


def _major_key(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in version.split("."))


def installed_versions(settings: PostgresSettings | None = None) -> dict[str, Path]:
    """``{major: bin directory}`` of the versions under the root, oldest first."""
    settings = settings or PostgresSettings()
    found = {
        d.parent.name: d
        for d in settings.root.glob("*/bin")
        if _MAJOR.fullmatch(d.parent.name) and (d / "initdb").is_file() and (d / "postgres").is_file()
    }
    return dict(sorted(found.items(), key=lambda kv: _major_key(kv[0])))


def data_version(data: Path) -> str | None:
    """The major version that made a data directory (its ``PG_VERSION``), None if it has none."""
    try:
        return (data / "PG_VERSION").read_text().strip()
    except FileNotFoundError:
        return None


def _binaries_version(bins: Path) -> str:
    """The major version of ``bins/postgres`` (``15``; ``9.6`` before 10), as in PG_VERSION."""
    out = subprocess.run([str(bins / "postgres"), "--version"], capture_output=True, text=True, timeout=30).stdout
    m = re.search(r"\(PostgreSQL\) (\d+)(?:\.(\d+))?", out)
    if not m:
        raise PostgresError(f"{bins / 'postgres'} --version answered {out.strip()!r}, not a PostgreSQL version")
    return m.group(1) if int(m.group(1)) >= 10 else f"{m.group(1)}.{m.group(2)}"


def bin_dir(settings: PostgresSettings | None = None, data: Path | None = None) -> Path:
    """The binaries for ``data``: those of its ``PG_VERSION`` (a server of another major version
    cannot open it); for a new cluster (or no ``data``) the newest installed."""
    settings = settings or PostgresSettings()
    wanted = data_version(data) if data is not None else None
    if settings.bin_dir is not None:
        bins = settings.bin_dir
        if not ((bins / "initdb").is_file() and (bins / "postgres").is_file()):
            raise PostgresError(f"RINGFLOW_POSTGRES_BIN={bins}: no initdb/postgres there")
        if wanted is not None and (have := _binaries_version(bins)) != wanted:
            raise PostgresError(
                f"RINGFLOW_POSTGRES_BIN={bins} is PostgreSQL {have}, but the data directory {data} was "
                f"made by PostgreSQL {wanted} (its PG_VERSION): point it at PostgreSQL {wanted}'s binaries, "
                "or unset it to use those under RINGFLOW_POSTGRES_ROOT"
            )
        return bins
    versions = installed_versions(settings)
    if not versions:
        raise PostgresError(
            f"PostgreSQL is not installed (no initdb/postgres under {settings.root}/*/bin): run "
            "`make postgres-deps` (Debian's postgresql package) or set RINGFLOW_POSTGRES_BIN"
        )
    if wanted is None:
        return versions[next(reversed(versions))]
    if wanted in versions:
        return versions[wanted]
    assert data is not None  # `wanted` is read from data's PG_VERSION
    raise PostgresError(_version_missing(data, wanted, versions, settings.root))


def _version_missing(data: Path, wanted: str, versions: dict[str, Path], root: Path) -> str:
    newest = next(reversed(versions))
    return (
        f"the PostgreSQL data directory {data} was made by PostgreSQL {wanted} (its PG_VERSION), but "
        f"PostgreSQL {wanted} is not installed: {root} has {', '.join(versions)}, and a server of another "
        f"major version cannot open it. Install PostgreSQL {wanted}'s server binaries again (Debian: "
        f"postgresql-{wanted}; they go to {root}/{wanted}/bin) and `ringflow up` uses them. To move the "
        f"data to PostgreSQL {newest}, with those binaries installed and the stack down: either "
        f"`pg_upgrade --old-bindir {root}/{wanted}/bin --new-bindir {versions[newest]} --old-datadir {data} "
        f"--new-datadir NEW` as the data's owner, NEW made by {newest}'s initdb, then NEW in place of {data}; "
        f"or `pg_dumpall` from a server of PostgreSQL {wanted} on it, move {data} aside, "
        f"`ringflow up --database postgresql` (a new cluster, {newest}) and restore the dump with psql"
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
        if parent.is_dir() and not (parent.stat().st_mode & 0o001) and parent.owner() != SYSTEM_USER:
            raise PostgresError(
                f"PostgreSQL runs as user '{SYSTEM_USER}', which cannot enter {parent} (mode "
                f"{oct(parent.stat().st_mode & 0o777)}) on the way to its data directory {directory}: "
                "choose a RINGFLOW_POSTGRES_STATE_DIR that other users can reach"
            )


def _write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def ensure_cluster(home: Path, settings: PostgresSettings | None = None) -> bool:
    """Create the data directory with ``initdb`` unless it exists. Returns True when created.

    An existing one is checked against the installed binaries (its major version must be there).
    """
    data = data_dir(home, settings)
    if (data / "PG_VERSION").is_file():
        if data != postgres_dir(home) / "data" and not _data_record(home).is_file():
            # its home was removed and made again: the passwords that open it went with the old one
            raise PostgresError(
                f"{data} holds the PostgreSQL data of an earlier home at {home} (its record "
                f"{_data_record(home)} and the passwords are gone): remove {data.parent} to start "
                "afresh, or restore the old home's postgres/ directory"
            )
        bin_dir(settings, data)
        return False
    bins = bin_dir(settings)
    creds = credentials(home)
    # As root: <state dir> (root's) / <home id> (postgres', 0700) / data (postgres', 0700); the
    # initdb password file goes in <home id>, where only postgres (and root) can read it.
    private = data.parent if _run_as() else postgres_dir(home)
    if _run_as():
        if not private.parent.is_dir():
            private.parent.mkdir(parents=True)
            private.parent.chmod(0o755)  # root's; postgres only passes through
        _check_reachable(private)
        private.mkdir(mode=0o700, exist_ok=True)
        private.chmod(0o700)
        _chown(private)
        _write_atomic(private / "home", f"{home.resolve()}\n")  # whose data this is, for clean-up
    data.mkdir(parents=True, exist_ok=True)
    data.chmod(0o700)
    _chown(data)
    # initdb reads the superuser password from a file the postgres user can read; removed at once.
    pwfile = private / ".initdb-pw"
    fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(creds.superuser + "\n")
    _chown(pwfile)
    try:
        p = subprocess.run(
            [
                str(bins / "initdb"),
                "-D",
                str(data),
                "-U",
                SYSTEM_USER,
                f"--pwfile={pwfile}",
                "--auth-host=scram-sha-256",
                "--auth-local=peer",
                "-E",
                "UTF8",
                "--no-locale",
            ],
            user=_run_as(),
            cwd=data,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        pwfile.unlink(missing_ok=True)
    if p.returncode != 0:
        shutil.rmtree(data, ignore_errors=True)  # a half-made cluster would not start next time
        raise PostgresError(f"initdb failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    if data != postgres_dir(home) / "data":
        _write_atomic(_data_record(home), f"{data}\n")
    return True


def clear_stale_pid_file(home: Path) -> bool:
    """Remove ``postmaster.pid`` when the postmaster it names is gone or a zombie; True if removed.

    A killed postmaster leaves its pid file, and PostgreSQL refuses to start while that pid
    answers a signal. In a container nobody may reap the orphaned postmaster, so its zombie keeps
    answering and the next start fails with "lock file postmaster.pid already exists". ``up``
    calls this before the first start; the supervisor does the same before each restart
    (``--stale-pid-file``, :func:`postmaster_pid_file`).
    """
    from ringflow.infra.supervisor import remove_stale_pid_file

    return remove_stale_pid_file(postmaster_pid_file(home))


def postmaster_pid_file(home: Path) -> Path:
    """The postmaster's lock file, left behind when it is killed."""
    return data_dir(home) / "postmaster.pid"


def server_command(home: Path, host: str, port: int, settings: PostgresSettings | None = None) -> list[str]:
    """The foreground ``postgres`` command: TCP on ``host:port`` only, no Unix socket."""
    return [
        str(bin_dir(settings, data_dir(home, settings)) / "postgres"),
        "-D",
        str(data_dir(home, settings)),
        "-p",
        str(port),
        "-c",
        f"listen_addresses={host}",
        "-c",
        "unix_socket_directories=",
        # the stack's clients: two servers with small pools, the runner's flow runs
        "-c",
        "max_connections=200",
    ]


def _connect(
    host: str, port: int, user: str, password: str, dbname: str = "postgres"
) -> psycopg2.extensions.connection:
    import psycopg2

    return psycopg2.connect(host=host, port=port, user=user, password=password, dbname=dbname, connect_timeout=3)


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

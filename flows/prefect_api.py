"""Start Prefect's temporary API server first, while the rest of the command starts up.

Without ``PREFECT_API_URL`` the first flow call starts a temporary API server (a uvicorn
subprocess that imports Prefect's server and checks its database) and waits for it: seconds
during which nothing else happens. A command that will run a flow calls :func:`start_early`
as soon as its environment is set: it starts the same server process Prefect would (Prefect's
``SubprocessASGIServer`` command line and environment) before this process has imported
Prefect's server, MLflow, torch and the tasks, and points ``PREFECT_API_URL`` at it, so the
flow call finds a server up. Prefect's own class would have this process import the whole
server first (2.4 CPU seconds, and the server's start waited for them).

A new Prefect home (a new machine's first command, a fresh ``PREFECT_HOME``) gets its database
copied from :func:`database_template`, built once per Prefect version by ``make install``: the
server otherwise replays every one of Prefect's migrations before it answers (4-5 CPU seconds
here, on the first command's critical path).
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from importlib.metadata import version
from pathlib import Path

from ringflow.training.environment import cache_dir

SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
"""What Prefect's ``SubprocessASGIServer`` sets for its temporary server: no UI, the ephemeral
server's settings (no background services), this server's final configuration."""
PORT_IN_USE = 3
"""uvicorn's exit status when it cannot bind its port (Prefect's own start tries another)."""
ATTEMPTS = 3


def start_early() -> Callable[[], float]:
    """Start the temporary API in the background (no-op when ``PREFECT_API_URL`` names a server,
    in the environment or in the active Prefect profile).

    Returns ``wait()``: blocks until the server answers (call it before the flow: the flow would
    not wait for a server that is still starting) and returns the seconds it waited. A server that
    does not come up is stopped and the setting withdrawn: the flow call then starts Prefect's own,
    and reports why not if that fails too.
    """
    if os.environ.get("PREFECT_API_URL"):
        return lambda: 0.0
    seed_new_database()
    server = TemporaryServer()
    server.spawn()  # first: the server imports in its own process while this one goes on
    threading.Thread(target=server.warm_up, daemon=True, name="prefect-api-warm-up").start()
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():  # the active profile names a server: that one it is
        server.stop()
        return lambda: 0.0
    server.point_prefect_at_it()
    global _started
    _started = server
    atexit.register(server.stop)
    # Registered after the stop, so it runs before it (atexit runs last-in first-out).
    atexit.register(send_pending_logs_and_events)

    def wait() -> float:
        t0 = time.perf_counter()
        try:
            server.wait_until_up()
        except RuntimeError:
            global _started
            _started = None
            server.stop()
            server.withdraw()
        return time.perf_counter() - t0

    return wait


def template_path(cache: Path | None = None) -> Path:
    """Where :func:`database_template` keeps this Prefect version's empty database."""
    return (cache or cache_dir()) / f"prefect-{version('prefect')}-database.db"


DATABASE_ENV_PREFIXES = ("PREFECT_SERVER_DATABASE_", "PREFECT_API_DATABASE_")
"""The settings that point Prefect's server at a database (both spellings Prefect reads)."""


_BUILD_DATABASE = """
import asyncio

import prefect.plugins
from prefect.server.database import provide_database_interface
from prefect.server.models.block_registration import run_block_auto_registration


async def build() -> None:
    # what the server's start does to a new database: every migration, then the block types
    db = provide_database_interface()
    await db.create_db()
    prefect.plugins.load_prefect_collections()
    session = await db.session()
    async with session:
        await run_block_auto_registration(session=session)
    await (await db.engine()).dispose()


asyncio.run(build())
"""


def database_template(cache: Path | None = None) -> Path:
    """An empty Prefect database, built once per Prefect version (``make install`` builds it) and
    copied into every new Prefect home by :func:`seed_new_database`: every migration applied and
    Prefect's block types registered, by Prefect's own functions, in a process of its own (Prefect
    reads the database's address once, at import). Nothing in it belongs to a home: no flow, run,
    log or setting. ``cache``: default ``$XDG_CACHE_HOME/ringflow``."""
    template = template_path(cache)
    if template.exists():
        return template
    template.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=template.parent, prefix=".prefect-database-") as tmp:
        built = Path(tmp) / "prefect.db"
        env = {k: v for k, v in os.environ.items() if not k.startswith(DATABASE_ENV_PREFIXES)}
        env |= {
            "PREFECT_HOME": tmp,
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{built}",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }
        p = subprocess.run([sys.executable, "-c", _BUILD_DATABASE], env=env, capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"building Prefect's empty database failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
        with closing(sqlite3.connect(built)) as db:  # everything in the one file: no -wal beside it
            (busy, _, _) = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            raise RuntimeError(f"Prefect's empty database in {tmp} is still in use")
        os.replace(built, template)  # whole or absent: another process may build it at the same time
    return template


def seed_new_database(cache: Path | None = None) -> bool:
    """Copy :func:`database_template` into the Prefect home the temporary server is about to
    start on, when that home has no database yet and the server would use Prefect's default
    (SQLite, ``$PREFECT_HOME/prefect.db``). Whether it copied.

    Costs nothing where the home has its database (every command after a home's first): Prefect's
    settings are read only for a new home, where they decide whether the copy is the database the
    server would make. A database another process created meanwhile is left as it is.
    """
    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
    if (home / "prefect.db").exists():
        return False
    template = template_path(cache)  # Prefect's version read from its metadata: only for a new home
    if not template.exists():
        return False
    from prefect.settings import Settings

    settings = Settings()  # as the server will read them: the environment, .env, the active profile
    db = Path(settings.home) / "prefect.db"
    url = settings.server.database.connection_url
    if db.exists() or url is None or url.get_secret_value() != f"sqlite+aiosqlite:///{db}":
        return False  # a database named elsewhere (a profile, .env, PostgreSQL): the server's own
    db.parent.mkdir(parents=True, exist_ok=True)
    partial = db.with_name(f".{db.name}.{os.getpid()}.partial")
    try:
        shutil.copyfile(template, partial)
        os.link(partial, db)  # only where there is none
    except OSError:  # one made meanwhile (FileExistsError), or no room: the server makes its own
        return False
    finally:
        partial.unlink(missing_ok=True)
    return True


HEARTBEAT_ENV = ("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "PREFECT_RUNNER_HEARTBEAT_FREQUENCY")


@contextmanager
def no_heartbeats_on_a_temporary_server() -> Iterator[None]:
    """Around a flow call: no flow-run heartbeats when the run reports to a temporary API server
    (this command's, or the one Prefect starts itself when no server is named).

    A heartbeat lets a server mark a run whose process died as crashed; a temporary server dies
    with the process, so nothing ever reads them. And Prefect 3.9's heartbeat thread sleeps in
    whole seconds: stopping it at the run's end held the command for up to 1 s (0.87 and 0.99 s
    measured). A heartbeat frequency set in the environment is kept, as are heartbeats to a
    named server (``ringflow up``, a work pool's workers).
    """
    from prefect.settings import get_current_settings, temporary_settings

    url = get_current_settings().api.url
    temporary = url is None or (_started is not None and url == _started.api_url)
    if not temporary or any(name in os.environ for name in HEARTBEAT_ENV):
        yield
        return
    with temporary_settings(updates={"flows.heartbeat_frequency": None}):
        yield


WARM_UP_REQUESTS = (
    ("GET", "/admin/version", None),  # a client's first request
    ("POST", "/flows/filter", '{"limit": 1}'),  # the first database query
    ("POST", "/flow_runs/filter", '{"limit": 1}'),
)
"""Read-only requests :meth:`TemporaryServer.warm_up` sends: nothing is written."""


class TemporaryServer:
    """One temporary Prefect API server process on a free loopback port."""

    def __init__(self) -> None:
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.warmed_up = False
        self._ui_url = os.environ.get("PREFECT_UI_URL")

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def spawn(self) -> None:
        self.port = _free_port()
        env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_UI_URL")}
        self.process = subprocess.Popen(_server_command(self.port), env=env | SERVER_ENV)

    def point_prefect_at_it(self) -> None:
        """Every Prefect client of this process (and of its children) talks to this server. It has
        no UI, so no "View at" link is printed for a page that does not exist."""
        os.environ["PREFECT_API_URL"] = self.api_url
        os.environ["PREFECT_UI_URL"] = ""
        _refresh_prefect_settings()

    def withdraw(self) -> None:
        os.environ.pop("PREFECT_API_URL", None)
        if self._ui_url is None:
            os.environ.pop("PREFECT_UI_URL", None)
        else:
            os.environ["PREFECT_UI_URL"] = self._ui_url
        _refresh_prefect_settings()

    def answers(self) -> bool:
        """Whether the server answers its health route now."""
        try:
            with urllib.request.urlopen(f"{self.api_url}/health", timeout=5) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def wait_until_up(self) -> None:
        """Poll the health route as Prefect's own start does; a port taken meanwhile gets another."""
        from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

        deadline = time.monotonic() + PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
        attempts = 1
        while time.monotonic() < deadline:
            assert self.process is not None
            status = self.process.poll()
            if status == PORT_IN_USE and attempts < ATTEMPTS:
                attempts += 1
                self.spawn()
                self.point_prefect_at_it()
                continue
            if status is not None:
                raise RuntimeError(f"the temporary Prefect API server exited with status {status}")
            if self.answers():
                return
            time.sleep(0.1)
        raise RuntimeError("the temporary Prefect API server did not answer in time")

    def warm_up(self, timeout_s: float = 120.0) -> None:
        """Once the server answers, send it the read-only requests whose first answer is slow.

        A new server's first request took 0.28 s and its first database query 0.23 s (an API
        that had answered its health check 2 s before; later ones take 2-7 ms): the flow call's
        first requests paid that while this process waited. Sent from a thread while this
        process still imports, the server does that work on the core it would leave idle.
        Errors are ignored: the flow call's own requests say what is wrong.
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.process is not None and self.process.poll() is None:
            if self.answers():
                break
            time.sleep(0.1)
        else:
            return
        for method, path, body in WARM_UP_REQUESTS:
            data = None if body is None else body.encode()
            request = urllib.request.Request(
                f"{self.api_url}{path}", method=method, data=data, headers={"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    response.read()
            except (urllib.error.URLError, OSError):
                return
        self.warmed_up = True

    def stop(self) -> None:
        """As Prefect stops its temporary server: terminate, and kill after 5 s."""
        process, self.process = self.process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


_started: TemporaryServer | None = None
"""The temporary server :func:`start_early` started and this process reports to, if any."""


def _server_command(port: int) -> list[str]:
    """Prefect's ``SubprocessASGIServer`` command line, found without importing Prefect."""
    spec = importlib.util.find_spec("prefect")
    assert spec is not None and spec.submodule_search_locations
    app_dir = Path(next(iter(spec.submodule_search_locations))).parent
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "--app-dir",
        str(app_dir),
        "--factory",
        "prefect.server.api.server:create_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "error",
        "--lifespan",
        "on",
    ]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _refresh_prefect_settings() -> None:
    """Prefect reads its settings once, at import; this re-reads them from the environment."""
    from prefect.context import refresh_global_settings_context

    refresh_global_settings_context()


def send_pending_logs_and_events(timeout_s: float = 30.0) -> None:
    """Deliver the logs and events Prefect still holds to the API while it is up.

    Prefect ships both in batches from background workers, and drains them only at logging's
    shutdown: after the temporary server has stopped. The last lines of a run (the gate's
    decision, the registration, the final state) then never reached its database, and the
    drain waited its full 5 s for a server that was gone before the command could exit.
    """
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=timeout_s)
    EventsWorker.drain_all(timeout=timeout_s)

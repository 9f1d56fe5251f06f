"""Start Prefect's ephemeral API while the rest of the command starts up.

Without ``PREFECT_API_URL`` the first flow call starts a temporary API server (a uvicorn
subprocess that imports Prefect's server and checks its database) and waits for it: seconds
during which nothing else happens. A command that will run a flow calls :func:`start_early`
as soon as its environment is set: the server starts in its subprocess while this process
imports MLflow, torch and the tasks and prepares the MLflow store; the flow call then finds it
up (Prefect keeps one server per process, so the flow uses this one).
"""

from __future__ import annotations

import atexit
import threading
import time
from collections.abc import Callable


def start_early() -> Callable[[], float]:
    """Start the ephemeral API in the background (no-op when ``PREFECT_API_URL`` names a server).

    Returns ``wait()``: blocks until the server answers (call it before the flow: a flow that
    found a starting server would not wait for it) and returns the seconds it waited. A start
    that failed leaves it to the flow call, which starts the server itself and reports why not.
    """
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return lambda: 0.0
    # Imported here, in the calling thread: importing Prefect's server models in two threads at
    # once can leave SQLAlchemy's mappers half-configured. The flow call imports it anyway.
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()

    def start() -> None:
        try:
            server.start()
        except Exception:  # noqa: BLE001 - the flow call starts it again and raises
            return
        # Registered after Prefect's own stop (server.start registers it), so it runs first.
        atexit.register(send_pending_logs_and_events)

    thread = threading.Thread(target=start, daemon=True, name="prefect-api-start")
    thread.start()

    @atexit.register
    def _stop() -> None:
        # a command that fails before its flow (an import, the store) must not leave the server
        # behind: Prefect registers its own stop only once the subprocess has started
        thread.join(timeout=60)
        server.stop()

    def wait() -> float:
        t0 = time.perf_counter()
        thread.join()
        return time.perf_counter() - t0

    return wait


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

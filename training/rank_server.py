"""Ranks forked from one process that has already imported what a rank imports.

    python -m ringflow.training.rank_server SOCKET                  # the server, started by the train task
    python -m ringflow.training.rank_server SOCKET --rank ARGS...   # a rank, as horovodrun starts it

A rank of the default config spends about 2.7 CPU seconds importing torch, pandas, pydantic and
Horovod, and rank 0 another 1.3 importing MLflow, before its first line of training; two ranks on
one host pay that twice, at the same moment as the baseline's fit, on the same cores
(``benchmarks/README.md``). The server imports all of it once, while the flow shards the data, and
waits on a Unix socket. horovodrun still launches every rank with its own environment
(``HOROVOD_RANK``, the Gloo rendezvous, the secrets file); the rank's process is only a client:
it hands the server its arguments, environment, working directory and standard streams, and the
server forks a child that becomes the rank (``python -m ringflow.training.train`` in all but its
start-up). The client forwards the signals it gets to that child and exits with its exit status,
so horovodrun, its output prefixes and ``launch.kill_tree`` see a rank as before.

Only for ranks on this host: a rank of another host (even a namespace host sharing this
filesystem) must run in its own place, so the train task uses the server only when every slot is
``localhost``. When the server cannot be reached, or dies before it forks the rank, the client
runs the training program itself (``exec``): a rank never fails for want of the shortcut.

Lifetimes: the server dies with the process that started it (``PR_SET_PDEATHSIG``) and its
children die with the server (the same); the server kills a child whose client went away (a
SIGKILLed rank leaves no orphan training beside the next attempt).
"""

from __future__ import annotations

import atexit
import ctypes
import gc
import importlib
import json
import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from contextlib import suppress
from pathlib import Path
from typing import Any, NoReturn

PROGRAM = "ringflow.training.train"
"""The module every rank runs."""

PRELOAD = (
    PROGRAM,
    "horovod.torch",
    "torch._dynamo",  # torch.optim imports it on the optimizer's first use: 0.9 s
    "mlflow",  # rank 0 logs params and metrics to the run while it trains
    "mlflow.entities",
    "mlflow.tracking",
    "mlflow.system_metrics.system_metrics_monitor",
    "pyarrow.pandas_compat",  # reading the shards
    "torch.utils.serialization",  # checkpoints
    "ringflow.training.process_exit",
)
"""What a rank imports before and during training (``training/train.py``), besides the tracking
store's client (:func:`tracking_store_module`)."""

_DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")


def tracking_store_module(tracking_uri: str | None) -> str | None:
    """The module of MLflow's store client for ``tracking_uri``, which rank 0 imports when it
    opens the run: for a database, MLflow's SQLAlchemy store (SQLAlchemy, Alembic, their models:
    about 390 modules, 1-2 s)."""
    scheme = (tracking_uri or "").split(":", 1)[0].split("+", 1)[0]
    if scheme in _DB_SCHEMES:
        return "mlflow.store.tracking.sqlalchemy_workspace_store"  # with the plain store
    if scheme in ("http", "https", "databricks"):
        return "mlflow.store.tracking.rest_store"
    return None


RANK_ARG = "--rank"
_MAX_MESSAGE = 1 << 20  # the request: argv (the config JSON) and the environment
_PR_SET_PDEATHSIG = 1


def rank_command(python: str, socket_path: str | Path) -> list[str]:
    """The program part of horovodrun's command for a rank started by the server at ``socket_path``
    (the training program's own arguments follow it)."""
    return [python, "-m", "ringflow.training.rank_server", str(socket_path), RANK_ARG]


def _die_with_parent(sig: int) -> None:
    """``prctl(PR_SET_PDEATHSIG, sig)`` (Linux; elsewhere nothing)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    except (OSError, AttributeError):
        pass


# --------------------------------------------------------------------------- the starter's side


class RankServer:
    """A server process, started in a private (0700) temporary directory that holds its socket
    and its log; ``stop`` ends it and every rank it forked."""

    def __init__(self, python: str | None = None, env: dict[str, str] | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="ringflow-ranks-"))  # short: a socket path has 108 bytes
        self.socket_path = self.dir / "socket"
        self.log_path = self.dir / "server.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [python or sys.executable, "-m", "ringflow.training.rank_server", str(self.socket_path)],
                env={**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,  # not in the terminal's group: Ctrl-C goes to the command, which stops it
            )

    def listening(self, timeout_s: float = 10.0) -> bool:
        """Wait until the socket exists (the server's first act); False if the server died."""
        deadline = time.monotonic() + timeout_s
        while not self.socket_path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return self.proc.poll() is None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 20) -> str:
        with suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""

    def forked(self) -> list[tuple[str, int]]:
        """(rank, pid) of every rank forked so far, from the server's log."""
        with suppress(OSError):
            found = re.findall(r"^forked rank (\S+): pid (\d+)$", self.log_path.read_text(errors="replace"), re.M)
            return [(rank, int(pid)) for rank, pid in found]
        return []

    def stop(self) -> None:
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


_held: RankServer | None = None
_holders = 0
_held_lock = threading.Lock()


def hold() -> bool:
    """Hold this process's rank server, starting it if none runs; True if held (then
    :func:`release`). Whoever is about to launch local ranks holds it early, so its imports are
    done when horovodrun starts them: the command from before it imports the pipeline, the flow
    from before sharding, every launch while it runs. So flows running side by side in one process
    share one server, which stops after the last of them lets go."""
    global _held, _holders
    with _held_lock:
        if _held is None or not _held.alive():
            _stop_held_locked()  # a dead one's directory
            try:
                _held = RankServer()
            except OSError:  # the ranks start their own interpreters, as without the server
                return False
        _holders += 1
        return True


def release() -> None:
    """Let go of what :func:`hold` held; the last holder's release stops the server."""
    global _holders
    with _held_lock:
        _holders = max(0, _holders - 1)
        if _holders == 0:
            _stop_held_locked()


def held() -> RankServer | None:
    """The server this process holds, if any."""
    return _held


def _stop_held_locked() -> None:
    global _held
    if _held is not None:
        _held.stop()
        _held = None


@atexit.register
def _stop_held() -> None:
    with _held_lock:
        _stop_held_locked()


# --------------------------------------------------------------------------- the server


def serve(socket_path: str) -> NoReturn:
    """Listen at ``socket_path``, import :data:`PRELOAD`, fork a rank for every request."""
    parent = os.getppid()
    _die_with_parent(signal.SIGTERM)
    if os.getppid() != parent:  # the starter died before prctl took effect
        os._exit(1)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(socket_path)  # in the starter's private (0700) directory
    listener.listen(64)  # ranks may connect while the imports below run: they queue
    store = tracking_store_module(os.environ.get("MLFLOW_TRACKING_URI"))
    for module in (*PRELOAD, *([store] if store else [])):
        try:
            importlib.import_module(module)
        except ImportError as e:  # a rank that needs it fails on it itself, and says so
            print(f"not preloaded: {module}: {e}", file=sys.stderr, flush=True)
    gc.collect()
    gc.freeze()  # the imported objects stay shared with the children, not copied by the collector
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes the selector through wake_w
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    clients: dict[int, socket.socket] = {}  # child pid -> its client's connection
    while True:
        for key, _ in sel.select():
            if key.fileobj is listener:
                conn, _ = listener.accept()
                pid = _fork_rank(conn, [listener.fileno(), wake_r, wake_w, *(c.fileno() for c in clients.values())])
                if pid is None:
                    conn.close()
                else:
                    clients[pid] = conn
                    sel.register(conn, selectors.EVENT_READ, pid)
            elif key.fileobj == wake_r:
                os.read(wake_r, 4096)
            else:  # a client hung up (killed) or sent something it should not: its rank goes too
                sel.unregister(key.fileobj)
                with suppress(ProcessLookupError):
                    os.kill(key.data, signal.SIGKILL)
        for pid, conn in list(clients.items()):  # reap, and report exits to their clients
            with suppress(ChildProcessError):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    with suppress(OSError):
                        conn.send(json.dumps({"wait_status": status}).encode())
                    with suppress(KeyError):
                        sel.unregister(conn)
                    conn.close()
                    del clients[pid]


def _fork_rank(conn: socket.socket, close_in_child: list[int]) -> int | None:
    """Fork the rank a client asked for; its pid (sent to the client too), None on a bad request."""
    try:
        data, fds, _, _ = socket.recv_fds(conn, _MAX_MESSAGE, 3)
        request = json.loads(data)
    except (OSError, ValueError):
        return None
    if len(fds) != 3:
        for fd in fds:
            os.close(fd)
        return None
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _become_rank(request, fds, [conn.fileno(), *close_in_child])
    for fd in fds:
        os.close(fd)
    rank = request["env"].get("HOROVOD_RANK", "?")
    print(f"forked rank {rank}: pid {pid}", file=sys.stderr, flush=True)  # the server's log
    try:
        conn.send(json.dumps({"pid": pid}).encode())
    except OSError:
        os.kill(pid, signal.SIGKILL)  # the client is gone already; reaped with the others
    return pid


def _become_rank(request: dict[str, Any], fds: list[int], close: list[int]) -> NoReturn:
    """In the forked child: take the client's streams, environment, directory and arguments, and
    run the training program as ``python -m`` would."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        server = os.getppid()
        # A session of its own, as Horovod's middleman gives every rank it starts: the kernel's
        # autogroup then schedules each rank as it schedules the others. Two pinned ranks in the
        # server's one session stalled 8-15 s in 4 of 10 make runs (an fsync that never finished
        # while the other rank spun in Horovod's wait); with a session each, in none of 6.
        os.setsid()
        _die_with_parent(signal.SIGKILL)  # the server's death (a killed train task) ends the rank
        if os.getppid() != server:
            os._exit(1)
        for fd in close:
            os.close(fd)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        import runpy

        # as under ``python -m``: the program runs as __main__, and not also under its own name
        module = sys.modules.pop(PROGRAM)
        sys.argv = [module.__file__ or PROGRAM, *request["argv"]]
        runpy.run_module(PROGRAM, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        from ringflow.training.process_exit import exit_code

        code = exit_code(e.code)
    except BaseException:  # noqa: BLE001 - a rank's crash, reported as python would
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with suppress(OSError, ValueError):
                stream.flush()
    os._exit(code)


# --------------------------------------------------------------------------- the rank's client


def run_rank(socket_path: str, argv: list[str]) -> NoReturn:
    """Have the server fork this rank, relay signals to it, exit as it exits; or, without a
    server, run the training program in this process."""
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        conn.connect(socket_path)
        request = {"argv": argv, "env": dict(os.environ), "cwd": os.getcwd()}
        socket.send_fds(conn, [json.dumps(request).encode()], [0, 1, 2])
        reply = conn.recv(4096)  # waits while the server still imports
    except OSError:
        reply = b""
    if not reply:
        _exec_program(argv)
    child = int(json.loads(reply)["pid"])

    def relay(sig: int, _frame: object) -> None:
        with suppress(ProcessLookupError):
            os.kill(child, sig)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, relay)
    try:
        reply = conn.recv(4096)
    except OSError:
        reply = b""
    if not reply:
        print(f"ringflow rank server at {socket_path} died while rank pid {child} ran", file=sys.stderr)
        os._exit(1)
    status = int(json.loads(reply)["wait_status"])
    if os.WIFSIGNALED(status):  # die the way the rank died, so horovodrun reports the signal
        died_of = os.WTERMSIG(status)
        signal.signal(died_of, signal.SIG_DFL)
        os.kill(os.getpid(), died_of)
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 1)


def _exec_program(argv: list[str]) -> NoReturn:
    os.execv(sys.executable, [sys.executable, "-m", PROGRAM, *argv])


def main(argv: list[str] | None = None) -> NoReturn:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) >= 2 and args[1] == RANK_ARG:
        run_rank(args[0], args[2:])
    if len(args) != 1:
        print(f"usage: python -m ringflow.training.rank_server SOCKET [{RANK_ARG} PROGRAM_ARGS...]", file=sys.stderr)
        sys.exit(2)
    serve(args[0])


if __name__ == "__main__":
    main()

"""The stack's process records: start a service (under its supervisor, in its own session),
wait until it answers, find its whole process tree again, stop it.

Every supervisor has a pid file (pid + start time + command line, so a reused pid is never
signalled), a state file (the service's pid, restarts, gave-up message) and the service's log
under ``$RINGFLOW_HOME/stack/``.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from ringflow.infra.stack_settings import StackError
from ringflow.training.config import get_settings
from ringflow.training.launch import (
    kill_tree,  # also reaches flow runs' horovodrun ranks in their own sessions
)
from ringflow.training.launch import start_ticks as _start_ticks

ROOT = Path(__file__).resolve().parents[1]
"""Where the supervisors run: the checkout (or the installed package)."""
BIN = Path(sys.executable).parent  # the venv's console scripts (prefect, mlflow, evidently)


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


def pid_file(name: str, home: Path | None = None) -> Path:
    return stack_dir(home) / f"{name}.pid"


def log_file(name: str, home: Path | None = None) -> Path:
    return stack_dir(home) / f"{name}.log"


def state_file(name: str, home: Path | None = None) -> Path:
    """A supervised service's restart count, current pid and last exit (infra/supervisor.py)."""
    return stack_dir(home) / f"{name}.state.json"


def supervision(name: str, home: Path | None = None) -> dict[str, Any]:
    """What the supervisor last wrote: state, restarts, child_pid, last_exit, message ({} if none)."""
    from ringflow.infra.supervisor import read_state

    return read_state(state_file(name, home))


SERVICE_TAG_ENV = "RINGFLOW_STACK_SERVICE"
"""Set in every service's environment to ``<name>:<random token>``; inherited by everything the
service spawns (uvicorn workers, flow runs, Horovod ranks), so the whole process tree of a
service is found and stopped even after its first process died (``kill -9`` of the pid in the
pid file orphans MLflow's uvicorn, which keeps serving the port)."""


def pid_record(name: str, home: Path | None = None) -> dict[str, Any] | None:
    pf = pid_file(name, home)
    try:
        rec: dict[str, Any] = json.loads(pf.read_text())
        return rec
    except (OSError, ValueError):
        return None


def leader_process(rec: dict[str, Any]) -> psutil.Process | None:
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
        same = same_start and (cmdline[-len(launched) :] == launched if launched else cmdline == rec["cmdline"])
        if same and proc.status() != psutil.STATUS_ZOMBIE:
            return proc
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError, KeyError, TypeError):
        pass
    return None


def service_family(rec: dict[str, Any]) -> list[psutil.Process]:
    """Every live process of the service: those carrying its tag, plus the leader's descendants."""
    procs: dict[int, psutil.Process] = {}
    leader = leader_process(rec)
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


def running_leader(name: str, home: Path | None = None) -> psutil.Process | None:
    """The live first process of a service, or None. A pid file whose process and tree are all
    gone is removed; one with leftovers stays, so ``up``/``down`` can find and stop them."""
    rec = pid_record(name, home)
    if rec is None:
        pid_file(name, home).unlink(missing_ok=True)
        return None
    leader = leader_process(rec)
    if leader is None and not service_family(rec):
        pid_file(name, home).unlink(missing_ok=True)
    return leader


def leftover_processes(name: str, home: Path | None = None) -> list[psutil.Process]:
    """Processes of a service whose first process died (they may still hold its port)."""
    rec = pid_record(name, home)
    if rec is None or leader_process(rec) is not None:
        return []
    return service_family(rec)


def wait_gone(proc: psutil.Process, timeout: float) -> None:
    """Until the process exited (a zombie counts: nobody may reap it in a container)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.1)


def stop_service(name: str, home: Path, grace_s: float) -> tuple[int | None, list[int]]:
    """Stop the service's whole tree; returns (its pid if it was alive, pids of leftovers stopped)."""
    rec = pid_record(name, home)
    if rec is None:
        return None, []
    leader = leader_process(rec)
    if leader is not None and rec.get("stop_signal"):
        try:  # its own clean shutdown first (PostgreSQL checkpoints), the tree kill after
            leader.send_signal(rec["stop_signal"])
            wait_gone(leader, grace_s)
        except psutil.NoSuchProcess:
            pass
    if leader is not None:
        kill_tree(leader.pid, grace_s=grace_s)
    rest = [p for p in service_family(rec) if leader is None or p.pid != leader.pid]
    for p in rest:
        kill_tree(p.pid, grace_s=grace_s)
    pid_file(name, home).unlink(missing_ok=True)
    return (leader.pid if leader else None), [p.pid for p in rest if leader is None]


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def http_ok(url: str, auth: tuple[str, str] | None = None) -> bool:
    try:
        return httpx.get(url, timeout=3, auth=auth).status_code == 200
    except httpx.HTTPError:
        return False


SUPERVISOR_ENV_PREFIXES = ("RINGFLOW_SUPERVISE_", "RINGFLOW_STACK_LOG_", "RINGFLOW_STACK_STOP_GRACE")
"""The supervisor's settings (infra/supervisor.py), passed even to a service with a minimal env."""


def start_service(svc: Service, home: Path) -> psutil.Process:
    log = log_file(svc.name, home)
    cmd, env, cwd, user = svc.cmd, svc.env, svc.cwd, svc.user
    if svc.supervised:
        # the supervisor writes (and rotates) the service's log; its own rare output goes beside it
        state_file(svc.name, home).unlink(missing_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "ringflow.infra.supervisor",
            "--name",
            svc.name,
            "--state",
            str(state_file(svc.name, home)),
            "--log",
            str(log),
        ]
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
            cmd,
            env={**env, SERVICE_TAG_ENV: tag},
            cwd=cwd,
            user=user,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own group: down stops its children too
        )
    proc = psutil.Process(p.pid)
    # The argv we launched, not /proc's cmdline: read right after the fork, that can still be
    # ours (`ringflow up`) if the child has not exec'd yet, and the service then looks foreign.
    rec = {
        "pid": p.pid,
        "create_time": proc.create_time(),
        "start_ticks": _start_ticks(p.pid),
        "cmd": [str(a) for a in cmd],
        "tag": tag,
        "stop_signal": svc.stop_signal,
    }
    pid_file(svc.name, home).write_text(json.dumps(rec))
    return proc


def wait_ready(svc: Service, proc: psutil.Process, home: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if svc.ready():
            return
        sup = supervision(svc.name, home) if svc.supervised else {}
        if sup.get("restarts", 0) > 0 or sup.get("state") in ("backoff", "gave-up"):
            raise StackError(
                f"{svc.name} exited during start-up (its supervisor is restarting it); last lines of "
                f"{log_file(svc.name, home)}:\n" + tail_log(log_file(svc.name, home))
            )
        if not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE:
            raise StackError(
                f"{svc.name} exited during start-up; last lines of {log_file(svc.name, home)}:\n"
                + tail_log(log_file(svc.name, home))
            )
        time.sleep(0.5)
    raise StackError(
        f"{svc.name} did not become ready within {timeout:.0f}s (raise RINGFLOW_STACK_STARTUP_TIMEOUT "
        f"on a slow machine); last lines of {log_file(svc.name, home)}:\n" + tail_log(log_file(svc.name, home))
    )


def tail_log(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"

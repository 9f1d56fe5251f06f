"""Keep one stack service running: restart it when it dies, with back-off and a loop limit.

``python -m ringflow.infra.supervisor --name serve --state FILE --log FILE -- CMD ...`` runs CMD in its
own session, writes its output to a size-rotated log and restarts it when it exits, waiting
``backoff_s`` doubled per quick failure (capped at ``backoff_max_s``). A run that lasted
``healthy_after_s`` resets the back-off. After ``max_quick_failures`` failures in a row that each
came within ``healthy_after_s`` of the start, it gives up: a service that dies at once every
time needs a person, not more restarts. The state file (restart count, child pid, last exit,
why it gave up) is what ``ringflow status`` shows. SIGTERM stops the child's whole tree, then
the supervisor (after ``--stop-signal``, when given, had ``stop_grace_s`` to shut it down
cleanly: PostgreSQL's fast shutdown is SIGINT).

Generic over services: ``infra/stack.py`` runs every service of the stack under it (PostgreSQL,
Prefect, MLflow, Evidently UI, the deployment runner). ``--user``/``--cwd`` apply to the child
only (PostgreSQL runs as ``postgres``; the supervisor stays the caller, so it can write its state
file and log), and ``--stale-pid-file`` is removed before each start when the process it names is
gone (a killed postmaster leaves ``postmaster.pid``).
"""

from __future__ import annotations

import argparse
import json
import logging
import logging.handlers
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from ringflow.training.launch import kill_tree


class SupervisorSettings(BaseSettings):
    """Restart policy and log rotation of supervised services (env only)."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    backoff_s: float = Field(1.0, gt=0, alias="RINGFLOW_SUPERVISE_BACKOFF")
    """Wait before the first restart; doubled after each quick failure."""
    backoff_max_s: float = Field(60.0, gt=0, alias="RINGFLOW_SUPERVISE_BACKOFF_MAX")
    healthy_after_s: float = Field(60.0, gt=0, alias="RINGFLOW_SUPERVISE_HEALTHY_AFTER")
    """A run at least this long counts as healthy: back-off and the failure count start over."""
    max_quick_failures: int = Field(5, ge=1, alias="RINGFLOW_SUPERVISE_MAX_QUICK_FAILURES")
    """Give up after this many quick failures in a row."""
    log_max_bytes: int = Field(10 * 1024 * 1024, ge=1024, alias="RINGFLOW_STACK_LOG_MAX_BYTES")
    log_backups: int = Field(3, ge=1, alias="RINGFLOW_STACK_LOG_BACKUPS")
    stop_grace_s: float = Field(15, alias="RINGFLOW_STACK_STOP_GRACE")


def read_state(path: Path) -> dict[str, Any]:
    try:
        state: dict[str, Any] = json.loads(path.read_text())
        return state
    except (OSError, ValueError):
        return {}


def remove_stale_pid_file(path: Path) -> bool:
    """Remove a pid file (pid on its first line) whose process is gone or a zombie; True if removed.

    A killed postmaster leaves its pid file, and PostgreSQL refuses to start while that pid
    answers a signal. In a container nobody may reap an orphaned process, so its zombie keeps
    answering and the next start fails with "lock file postmaster.pid already exists".
    """
    import psutil

    try:
        pid = int(path.read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return False
    try:
        if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
            return False  # a live process: leave it alone
    except psutil.NoSuchProcess:
        pass
    path.unlink(missing_ok=True)
    return True


def _write_state(path: Path, **state: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**state, "updated": time.time()}))
    os.replace(tmp, path)  # status never reads half a file


class Supervisor:
    def __init__(
        self,
        name: str,
        cmd: list[str],
        state_file: Path,
        log_file: Path,
        settings: SupervisorSettings | None = None,
        *,
        cwd: Path | None = None,
        user: str | None = None,
        stop_signal: int | None = None,
        stale_pid_file: Path | None = None,
    ):
        self.name, self.cmd, self.state_file = name, cmd, state_file
        self.settings = settings or SupervisorSettings()
        self.cwd, self.user, self.stop_signal, self.stale_pid_file = cwd, user, stop_signal, stale_pid_file
        handler = logging.handlers.RotatingFileHandler(
            log_file, maxBytes=self.settings.log_max_bytes, backupCount=self.settings.log_backups
        )
        handler.setFormatter(logging.Formatter("%(message)s"))
        self.log = logging.getLogger(f"ringflow.supervisor.{name}")
        self.log.propagate = False
        self.log.setLevel(logging.INFO)
        self.log.addHandler(handler)
        self.stopping = threading.Event()
        self.child: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    def _note(self, msg: str) -> None:
        self.log.info("==== %s supervisor: %s", time.strftime("%Y-%m-%d %H:%M:%S"), msg)

    def _pump(self, child: subprocess.Popen[bytes]) -> None:
        assert child.stdout is not None  # started with stdout=PIPE
        for line in iter(child.stdout.readline, b""):
            self.log.info(line.decode(errors="replace").rstrip("\n"))

    def _state(self, state: str, **extra: object) -> None:
        _write_state(
            self.state_file,
            name=self.name,
            state=state,
            supervisor_pid=os.getpid(),
            child_pid=self.child.pid if self.child else None,
            restarts=self.restarts,
            **extra,
        )

    def stop(self, *_: object) -> None:
        self.stopping.set()
        child = self.child
        if child is None or child.poll() is not None:
            return
        if self.stop_signal is not None:
            import psutil

            try:  # its own clean shutdown first (PostgreSQL checkpoints), the tree kill after
                proc = psutil.Process(child.pid)
                proc.send_signal(self.stop_signal)
                # psutil, not child.wait(): run() is blocked in child.wait() under this handler
                psutil.wait_procs([proc], timeout=self.settings.stop_grace_s)
            except psutil.NoSuchProcess:
                pass
        kill_tree(child.pid, grace_s=self.settings.stop_grace_s)

    def run(self) -> int:
        s = self.settings
        backoff, quick_failures, last_exit = s.backoff_s, 0, None
        while not self.stopping.is_set():
            if self.stale_pid_file is not None and remove_stale_pid_file(self.stale_pid_file):
                self._note(f"removed {self.stale_pid_file}: the process it names is gone")
            started = time.monotonic()
            self.child = subprocess.Popen(
                self.cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                user=self.user,
                start_new_session=True,  # its own group: its workers and flow runs go with it
            )
            self._note(f"started {self.name} pid {self.child.pid} (restarts so far: {self.restarts})")
            self._state("running", last_exit=last_exit)
            pump = threading.Thread(target=self._pump, args=(self.child,), daemon=True)
            pump.start()
            rc = self.child.wait()
            pump.join(timeout=5)
            kill_tree(self.child.pid, grace_s=1)  # what the dead service left in its group
            if self.stopping.is_set():
                break
            last_exit = rc
            uptime = time.monotonic() - started
            if uptime >= s.healthy_after_s:
                backoff, quick_failures = s.backoff_s, 0
            else:
                quick_failures += 1
            if quick_failures >= s.max_quick_failures:
                msg = (
                    f"gave up: {self.name} exited {quick_failures} times in a row within "
                    f"{s.healthy_after_s:.0f}s of starting (last exit code {rc}); fix the cause "
                    "in its log, then `ringflow up`"
                )
                self._note(msg)
                self._state("gave-up", last_exit=rc, message=msg)
                return 1
            self._note(
                f"{self.name} pid {self.child.pid} exited with {rc} after {uptime:.1f}s; restarting in {backoff:.1f}s"
            )
            self._state("backoff", last_exit=rc, next_start_in_s=backoff)
            if self.stopping.wait(backoff):
                break
            backoff = min(backoff * 2, s.backoff_max_s)
            self.restarts += 1
        self._state("stopped", last_exit=last_exit)
        return 0


def _signal_number(value: str) -> int:
    """``2``, ``INT`` or ``SIGINT``."""
    if value.isdigit():
        return signal.Signals(int(value)).value
    name = value.upper()
    try:
        return signal.Signals[name if name.startswith("SIG") else f"SIG{name}"].value
    except KeyError:
        raise argparse.ArgumentTypeError(f"--stop-signal {value!r}: not a signal name or number") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ringflow.infra.supervisor")
    p.add_argument("--name", required=True)
    p.add_argument("--state", type=Path, required=True, help="JSON state file (restarts, child pid)")
    p.add_argument("--log", type=Path, required=True, help="the service's log, rotated by size")
    p.add_argument("--cwd", type=Path, help="the service's working directory (default: ours)")
    p.add_argument("--user", help="run the service as this user (the supervisor stays who it is)")
    p.add_argument(
        "--stop-signal",
        type=_signal_number,
        help="sent to the service first when stopping (name or number; then SIGTERM, SIGKILL)",
    )
    p.add_argument(
        "--stale-pid-file", type=Path, help="removed before each start when the process it names is gone or a zombie"
    )
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- then the service's command")
    a = p.parse_args(argv)
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    if not cmd:
        p.error("no command to supervise (put it after --)")
    sup = Supervisor(
        a.name, cmd, a.state, a.log, cwd=a.cwd, user=a.user, stop_signal=a.stop_signal, stale_pid_file=a.stale_pid_file
    )
    signal.signal(signal.SIGTERM, sup.stop)
    signal.signal(signal.SIGINT, sup.stop)
    return sup.run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

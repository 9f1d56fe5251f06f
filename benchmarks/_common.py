"""Helpers shared by the benchmarks: machine facts, load, medians, result files.

Machines are shared and noisy, so every benchmark measures the things it compares in one run,
interleaved, repeats them and reports medians; the load average before and after goes into the
result so a reader can judge the numbers.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
VENV_BIN = Path(sys.executable).parent


def horovodrun() -> str:
    return str(VENV_BIN / "horovodrun")


def load_avg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


LOADED = 1.5
"""A run during which the 1-minute load average exceeded this at any point is "under load": its
numbers are never reported as meeting a target."""


class LoadSampler:
    """The 1-minute load average every half second while the block runs (one sample at its start)."""

    def __init__(self) -> None:
        self.samples = [round(os.getloadavg()[0], 2)]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            self.samples.append(round(os.getloadavg()[0], 2))

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def under_load(self) -> bool:
        return max(self.samples) > LOADED


def timed_run(cmd: list[str], **kwargs: Any) -> tuple[subprocess.CompletedProcess[str], float]:
    """``subprocess.run(cmd, capture_output=True, text=True, **kwargs)`` and its wall seconds."""
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    return p, time.perf_counter() - t0


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def machine_facts() -> dict[str, Any]:
    """CPU model, cores, RAM, versions, date: the context every number needs."""
    facts: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_gib": ram_gib(),
        "python": platform.python_version(),
        "host": socket.gethostname(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "load_avg_1_5_15": load_avg(),
    }
    try:
        import torch

        facts["torch"] = torch.__version__
    except ImportError:
        pass
    try:
        import horovod

        facts["horovod"] = horovod.__version__
    except ImportError:
        pass
    return facts


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def write_result(name: str, data: dict[str, Any], out: Path | None = None) -> Path:
    """``benchmarks/results/<name>.json`` (or ``out``), written whole (tmp + rename)."""
    path = Path(out) if out else RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_env(**extra: str) -> dict[str, str]:
    """Environment for a benchmark child: repo importable, unbuffered, no Prefect telemetry."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(ROOT), env.get("PYTHONPATH", "")] if p)
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.update(extra)
    return env

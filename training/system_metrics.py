"""MLflow system metrics (CPU, memory, disk, network) of every training host, in the training run.

One monitor per host (the rank with local rank 0), named by the host Horovod launched it on, so a
multi-host run shows ``system/<host>/cpu_utilization_percentage`` per host next to the training
curves. Samples every ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` seconds (default 5 here; MLflow's
own default, 10, misses most of a short run); ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false`` turns
it off.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

DEFAULT_SAMPLING_INTERVAL_S = 5.0


class _Flushable(Protocol):
    def flush(self) -> None: ...


class _Monitor(Protocol):
    """What this module uses of MLflow's ``SystemMetricsMonitor``."""

    @property
    def mlflow_logger(self) -> _Flushable: ...

    def start(self) -> None: ...

    def finish(self) -> None: ...

    def collect_metrics(self) -> None: ...

    def aggregate_metrics(self) -> dict[str, float]: ...

    def publish_metrics(self, metrics: dict[str, float]) -> None: ...


def host_node_id() -> str:
    """The host as Horovod names it (``-H`` entry), else this machine's hostname."""
    return os.environ.get("HOROVOD_HOSTNAME") or socket.gethostname()


def monitors_this_host() -> bool:
    """True on the one rank per host that samples it (local rank 0; a rank run alone counts)."""
    return os.environ.get("HOROVOD_LOCAL_RANK", "0") == "0"


@contextmanager
def host_system_metrics(run_id: str | None = None) -> Iterator[None]:
    """Sample this host into the launcher's run (``MLFLOW_RUN_ID``) while the block runs. A
    monitor that cannot start is reported and the block runs without it.

    Started before the block, not in a thread beside it: a thread importing MLflow (about 2 CPU s)
    holds the GIL that the rank's main thread takes back after every torch call and collective,
    and the ranks' set-up took 7.0-7.8 s instead of 2.5-2.8 s in make run."""
    run_id = run_id or os.environ.get("MLFLOW_RUN_ID")
    enabled = os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true").strip().lower() not in ("false", "0")
    if not run_id or not enabled or not monitors_this_host():
        yield None
        return
    monitor = _start_monitor(run_id)
    try:
        yield None
    finally:
        if monitor is not None:
            _finish(monitor)


def _start_monitor(run_id: str) -> _Monitor | None:
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        # MLflow's monitor has no annotations: typed here by what this module uses of it
        monitor: _Monitor = SystemMetricsMonitor(  # type: ignore[no-untyped-call]  # mlflow: unannotated class
            run_id,
            sampling_interval=DEFAULT_SAMPLING_INTERVAL_S,
            node_id=host_node_id(),
            resume_logging=True,  # a resumed run continues its system-metric steps
        )
        monitor.start()
    except Exception as e:  # noqa: BLE001 - system metrics must never fail a training run
        print(f"system metrics: not sampled: {type(e).__name__}: {e}", flush=True)
        return None
    return monitor


def _finish(monitor: _Monitor) -> None:
    monitor.finish()
    # One last sample at the end: a run shorter than the sampling interval would otherwise log
    # none (MLflow's loop publishes only after a full interval).
    try:
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()
    except Exception as e:  # noqa: BLE001 - system metrics must never fail a training run
        print(f"system metrics: final sample not logged: {type(e).__name__}: {e}", flush=True)

"""Process-wide defaults for the libraries ringflow drives, set in one place.

Every ringflow process calls :func:`process_defaults` first: the CLI, the deployment runner
(``python -m ringflow.flows.deployments``), the services ``ringflow up`` starts and the tests. Each value is
a default (``setdefault``): a variable the user exported wins. ringflow's own settings are typed
pydantic-settings models per subsystem (``training.config.Settings``, ``infra.stack_settings.StackSettings``,
``infra.postgres``, ``infra.supervisor``, ``infra.hosts``), each variable declared once there.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import MutableMapping
from pathlib import Path

from ringflow.training.telemetry import TELEMETRY_OFF

LIBRARY_DEFAULTS: dict[str, str] = {
    **TELEMETRY_OFF,
    # `ringflow shard/train` run a task outside a flow: its logs go to the terminal only.
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    # tqdm bars from MLflow's artifact uploads garble the stage log.
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    # Prefect gives its ephemeral API 20 s to start; a busy 2-core machine can need more.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
}


QUIET_WARNINGS: list[tuple[str, type[Warning]]] = [
    # MLflow's hint when a schema it inferred has integer columns: addressed to whoever logs a
    # model with an inferred signature (ringflow states its models' signatures); for a logged
    # dataset the integer columns are what the data holds.
    ("Hint: Inferred schema contains integer column", UserWarning),
    # MLflow's note that a local path could be more than one kind of dataset source
    ("The specified dataset source can be interpreted in multiple ways", UserWarning),
]
"""Library warnings that say nothing to a ringflow user, ignored process-wide: a
``warnings.catch_warnings`` block is not thread-safe (two threads' blocks restore each other's
filters), and the lineage and the baseline are logged from threads beside the training."""


QUIET_LOG_LINES: dict[str, tuple[str, ...]] = {
    # a step of every log_model with an input example, printed in the middle of the stage log
    "mlflow.pyfunc": ("Validating input example against model signature",),
    # the system-metrics monitor's start and stop on every training host (its samples are in the
    # run), and on a host without a GPU its note that it skips GPU metrics
    "mlflow.system_metrics.system_metrics_monitor": (
        "Started monitoring system metrics",
        "Stopping system metrics monitoring",
        "Successfully terminated system metrics monitoring",
        "Skip logging GPU metrics",
    ),
}
"""MLflow INFO lines that say nothing to a ringflow user, by logger: dropped from the CLI's and the
ranks' output (a filter on that logger; every other line of it stays)."""


def cache_dir() -> Path:
    """ringflow's cache: ``$XDG_CACHE_HOME/ringflow`` (default ``~/.cache/ringflow``). Only what
    can be built again: deleting it costs time, never data."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ringflow"


def usable_cores() -> int:
    """The cores this process may run on (its affinity, where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def process_defaults(env: MutableMapping[str, str] | None = None) -> MutableMapping[str, str]:
    """Set :data:`LIBRARY_DEFAULTS` in ``env`` (default: this process's environment, which also
    ignores :data:`QUIET_WARNINGS` and :data:`QUIET_LOG_LINES`) where unset."""
    target = os.environ if env is None else env
    for key, value in LIBRARY_DEFAULTS.items():
        target.setdefault(key, value)
    if env is None:
        quiet_library_warnings()
        quiet_library_logs()
    return target


class _DropLines(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_library_logs() -> None:
    """Drop :data:`QUIET_LOG_LINES` in this process (once per logger; before or after the library
    is imported: the filters sit on the named loggers)."""
    for name, prefixes in QUIET_LOG_LINES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLines) for f in logger.filters):
            logger.addFilter(_DropLines(prefixes))


def quiet_library_warnings() -> None:
    """Ignore :data:`QUIET_WARNINGS` in this process."""
    for message, category in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)

"""Usage telemetry of the libraries ringflow runs: off unless the user turns it on.

One place for the switches, read by the CLI, by the processes ``ringflow up`` starts and by the
tests. Each is a default (``setdefault``): a user who wants to send telemetry sets the variable.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

TELEMETRY_OFF: dict[str, str] = {
    # MLflow 3 client and UI usage events (mlflow/telemetry).
    "MLFLOW_DISABLE_TELEMETRY": "true",
    # Prefect server usage heartbeat (also the source of SQLite "database is locked" noise).
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # Evidently's UI service and iterative-telemetry honour the DO_NOT_TRACK convention
    # (any value); MLflow honours it too when it is "true".
    "DO_NOT_TRACK": "true",
}


def telemetry_off(env: MutableMapping[str, str] | None = None) -> MutableMapping[str, str]:
    """Set every switch in ``env`` (default: this process's environment) unless already set."""
    target = os.environ if env is None else env
    for key, value in TELEMETRY_OFF.items():
        target.setdefault(key, value)
    return target

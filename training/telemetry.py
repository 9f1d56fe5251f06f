"""Usage telemetry of the libraries ringflow runs: off unless the user turns it on.

One place for the switches; :func:`training.environment.process_defaults` sets them (as defaults:
a user who wants to send telemetry sets the variable) in the CLI, the processes ``ringflow up``
starts and the tests.
"""

from __future__ import annotations

TELEMETRY_OFF: dict[str, str] = {
    # MLflow 3 client and UI usage events (mlflow/telemetry).
    "MLFLOW_DISABLE_TELEMETRY": "true",
    # Prefect server usage heartbeat (also the source of SQLite "database is locked" noise).
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # Evidently's UI service and iterative-telemetry honour the DO_NOT_TRACK convention
    # (any value); MLflow honours it too when it is "true".
    "DO_NOT_TRACK": "true",
}

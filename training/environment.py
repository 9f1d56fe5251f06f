"""Process-wide defaults for the libraries ringflow drives, set in one place.

Every ringflow process calls :func:`process_defaults` first: the CLI, the deployment runner
(``python -m ringflow.flows.deployments``), the services ``ringflow up`` starts and the tests. Each value is
a default (``setdefault``): a variable the user exported wins. ringflow's own settings are typed
pydantic-settings models per subsystem (``training.config.Settings``, ``infra.stack_settings.StackSettings``,
``infra.postgres``, ``infra.supervisor``, ``infra.hosts``), each variable declared once there.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

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


def process_defaults(env: MutableMapping[str, str] | None = None) -> MutableMapping[str, str]:
    """Set :data:`LIBRARY_DEFAULTS` in ``env`` (default: this process's environment) where unset."""
    target = os.environ if env is None else env
    for key, value in LIBRARY_DEFAULTS.items():
        target.setdefault(key, value)
    return target

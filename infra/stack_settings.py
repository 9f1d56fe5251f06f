"""The stack's settings: where its servers listen, which stores and auth they use (environment
only), and how client processes find a running stack (``$RINGFLOW_HOME/stack/env``, URLs only)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Final, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PREFECT_AUTH_ENV: Final = "PREFECT_API_AUTH_STRING"
"""The clients' ``user:password`` for a Prefect API with auth on (Prefect's own setting)."""
PREFECT_SERVER_AUTH_ENV: Final = "PREFECT_SERVER_API_AUTH_STRING"
"""The server's ``user:password``: set, ``prefect server start`` refuses requests without it."""

STACK_ROUTING_ENV: Final = (
    "PREFECT_API_URL",
    "PREFECT_API_KEY",
    PREFECT_AUTH_ENV,
    PREFECT_SERVER_AUTH_ENV,
    "PREFECT_API_DATABASE_CONNECTION_URL",
    "PREFECT_SERVER_DATABASE_CONNECTION_URL",
    "PREFECT_HOME",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_AUTH_ADMIN_PASSWORD",
    "RINGFLOW_MLFLOW_BACKEND_STORE_URI",
    "RINGFLOW_MLFLOW_ARTIFACTS_DESTINATION",
)
"""Variables that point the stack or its clients at other servers, stores or credentials: a
stack of its own (the tests', a benchmark's) drops them from the environment it inherits."""

ServerName = Literal["prefect", "mlflow", "evidently"]
HEALTH_PATHS: Final[Mapping[ServerName, str]] = {
    "prefect": "/api/health",  # Prefect's server: ``true``
    "mlflow": "/health",  # MLflow's server: ``OK``
    "evidently": "/api/version",  # ``evidently ui`` has no health route; its version answers once up
}
"""Each server's health path, under its base URL (:meth:`StackSettings.health_url`); the compose
file and the Kubernetes manifests probe the same paths (tests/test_team_stack.py, test_kubernetes.py)."""
WORKER_HEALTH_PATH: Final = "/health"
"""A Prefect worker's own health route (``prefect worker start --with-healthcheck``)."""


class StackError(RuntimeError):
    """The stack could not be started, checked or stopped; the message says what to do."""


class StackSettings(BaseSettings):
    """Where the servers listen, which stores they use and whether auth is on (env only)."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    host: str = Field("127.0.0.1", alias="RINGFLOW_HOST")
    """Bind address of both servers; loopback by default (auth off = nobody else may reach them)."""
    prefect_port: int = Field(4200, alias="RINGFLOW_PREFECT_PORT")
    mlflow_port: int = Field(5000, alias="RINGFLOW_MLFLOW_PORT")
    evidently_port: int = Field(8000, alias="RINGFLOW_EVIDENTLY_PORT")
    """``evidently ui`` over the monitoring workspace (``RINGFLOW_EVIDENTLY_WORKSPACE``, default
    ``$RINGFLOW_HOME/evidently``)."""
    prefect_database_url: str | None = Field(
        None,
        validation_alias=AliasChoices("PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_API_DATABASE_CONNECTION_URL"),
    )
    """``postgresql+asyncpg://user:pw@host:5432/prefect``; unset = SQLite under RINGFLOW_HOME."""
    mlflow_backend_store_uri: str | None = Field(None, alias="RINGFLOW_MLFLOW_BACKEND_STORE_URI")
    """``postgresql://user:pw@host:5432/mlflow``; unset = ``sqlite:///$RINGFLOW_HOME/mlflow.db``."""
    mlflow_artifacts_destination: str | None = Field(None, alias="RINGFLOW_MLFLOW_ARTIFACTS_DESTINATION")
    """``s3://bucket/prefix`` (with ``MLFLOW_S3_ENDPOINT_URL`` + ``AWS_*`` for MinIO); unset =
    ``$RINGFLOW_HOME/artifacts``."""
    prefect_auth_string: SecretStr | None = Field(None, alias="PREFECT_SERVER_API_AUTH_STRING")
    """``user:password``: the Prefect API then refuses requests without HTTP basic auth."""
    mlflow_admin_username: str = Field("admin", alias="MLFLOW_AUTH_ADMIN_USERNAME")
    mlflow_admin_password: SecretStr | None = Field(None, alias="MLFLOW_AUTH_ADMIN_PASSWORD")
    """Set = MLflow runs with ``--app-name basic-auth``; this is the admin's first password."""
    database: Literal["sqlite", "postgresql"] | None = Field(None, alias="RINGFLOW_DATABASE")
    """``postgresql``: ringflow starts its own PostgreSQL (infra/postgres.py) for both servers;
    unset = what the last ``up`` of this RINGFLOW_HOME used, else SQLite."""
    startup_timeout_s: float = Field(180, alias="RINGFLOW_STACK_STARTUP_TIMEOUT")
    stop_grace_s: float = Field(15, alias="RINGFLOW_STACK_STOP_GRACE")

    @field_validator(
        "prefect_database_url",
        "mlflow_backend_store_uri",
        "mlflow_artifacts_destination",
        "prefect_auth_string",
        "mlflow_admin_password",
        "database",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # `export PREFECT_SERVER_API_AUTH_STRING=` means "no auth", not "the password is ''":
        # Prefect's server would take '' as the password and refuse every client.
        return None if isinstance(value, str) and not value.strip() else value

    @property
    def prefect_url(self) -> str:
        return f"http://{url_host(self.host)}:{self.prefect_port}"

    @property
    def prefect_api_url(self) -> str:
        return f"{self.prefect_url}/api"

    @property
    def mlflow_url(self) -> str:
        return f"http://{url_host(self.host)}:{self.mlflow_port}"

    @property
    def evidently_url(self) -> str:
        return f"http://{url_host(self.host)}:{self.evidently_port}"

    def health_url(self, server: ServerName) -> str:
        """The URL that answers 200 once ``server`` is up (:data:`HEALTH_PATHS`)."""
        base = {"prefect": self.prefect_url, "mlflow": self.mlflow_url, "evidently": self.evidently_url}[server]
        return base + HEALTH_PATHS[server]

    @property
    def prefect_auth(self) -> bool:
        return self.prefect_auth_string is not None

    @property
    def mlflow_auth(self) -> bool:
        return self.mlflow_admin_password is not None


def url_host(host: str) -> str:
    # 0.0.0.0 is a bind address, not one to connect to.
    return "127.0.0.1" if host in ("0.0.0.0", "") else host


def client_env(st: StackSettings | None = None) -> dict[str, str]:
    """What a client process (serve, flow runs, the CLI) needs to reach the stack.

    Credentials come from the caller's environment; when only the server-side values are set,
    the clients that ``up`` starts reuse them (the one operator owns both sides).
    """
    st = st or StackSettings()
    env = {"PREFECT_API_URL": st.prefect_api_url, "MLFLOW_TRACKING_URI": st.mlflow_url}
    if st.prefect_auth_string is not None and not os.environ.get(PREFECT_AUTH_ENV):
        env[PREFECT_AUTH_ENV] = st.prefect_auth_string.get_secret_value()
    if st.mlflow_admin_password is not None and not os.environ.get("MLFLOW_TRACKING_PASSWORD"):
        env["MLFLOW_TRACKING_USERNAME"] = st.mlflow_admin_username
        env["MLFLOW_TRACKING_PASSWORD"] = st.mlflow_admin_password.get_secret_value()
    return env


def parse_auth_string(value: str | None) -> tuple[str, str] | None:
    """Prefect's ``user:password`` auth string as an HTTP basic-auth pair; None when unset or
    empty (the password may itself hold colons: only the first one separates)."""
    if not value:
        return None
    user, _, password = value.partition(":")
    return user, password


def prefect_auth_string(env: Mapping[str, str]) -> str | None:
    """The client's auth string: ``env``'s (e.g. :func:`client_env`), else this process's."""
    return env.get(PREFECT_AUTH_ENV) or os.environ.get(PREFECT_AUTH_ENV) or None


def prefect_auth_tuple(env: Mapping[str, str]) -> tuple[str, str] | None:
    """HTTP basic auth for the Prefect API (:func:`prefect_auth_string`, parsed), or None."""
    return parse_auth_string(prefect_auth_string(env))

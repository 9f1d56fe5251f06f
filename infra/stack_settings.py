"""The stack's settings: where its servers listen, which stores and auth they use (environment
only), and how client processes find a running stack (``$RINGFLOW_HOME/stack/env``, URLs only)."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


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
    if st.prefect_auth and not os.environ.get("PREFECT_API_AUTH_STRING"):
        env["PREFECT_API_AUTH_STRING"] = st.prefect_auth_string.get_secret_value()
    if st.mlflow_auth and not os.environ.get("MLFLOW_TRACKING_PASSWORD"):
        env["MLFLOW_TRACKING_USERNAME"] = st.mlflow_admin_username
        env["MLFLOW_TRACKING_PASSWORD"] = st.mlflow_admin_password.get_secret_value()
    return env


def prefect_auth_tuple(env: dict[str, str]) -> tuple[str, str] | None:
    s = env.get("PREFECT_API_AUTH_STRING") or os.environ.get("PREFECT_API_AUTH_STRING")
    if not s:
        return None
    user, _, pw = s.partition(":")
    return user, pw

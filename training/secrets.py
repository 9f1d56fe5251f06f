"""Secrets reach the training ranks through a 0600 file, never through the environment horovodrun sees.

Horovod's Gloo launcher puts the whole environment on every rank's command line (locally
``/bin/sh -c env ... VAR=VALUE ...``, remotely the ssh argv), where any user can read it in ``ps``.
So the launcher takes the secret variables out of the environment it gives horovodrun, writes
them to a file only its owner can read, in the run's output directory (on a cluster that is the
shared filesystem every host mounts), and passes the file's *path* instead. Each rank calls
:func:`load_secrets` first thing and puts the values back into its own environment, which
``/proc/<pid>/environ`` shows to the owner and root only. The file lives as long as the run
(elastic ranks may start later) and is removed when it ends.
"""

from __future__ import annotations

import json
import os
import secrets as _random
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from pathlib import Path

from pydantic import TypeAdapter

SECRETS_FILE_ENV = "RINGFLOW_SECRETS_FILE"
"""Path of the secrets file, the only thing about secrets that crosses the command line."""

SECRET_ENV_VARS = (
    "RINGFLOW_DATA_KEY",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_AUTH_ADMIN_PASSWORD",
    "MLFLOW_FLASK_SERVER_SECRET_KEY",
    "PREFECT_API_AUTH_STRING",
    "PREFECT_SERVER_API_AUTH_STRING",
    "PREFECT_API_KEY",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_STORAGE_ACCESS_KEY",
    "GOOGLE_APPLICATION_CREDENTIALS_JSON",
    "PGPASSWORD",
)
"""Variables that are never given to horovodrun (and so never appear in any rank's argv)."""


class SecretsFileError(RuntimeError):
    """The secrets file named by RINGFLOW_SECRETS_FILE is missing, unreadable or not private."""


_SECRETS = TypeAdapter(dict[str, str])
"""The secrets file's content (written by :func:`write_secrets`)."""


def is_secret(name: str) -> bool:
    """A known secret, or a variable whose name says it holds one (``*_PASSWORD``, ``*_TOKEN``, ...)."""
    upper = name.upper()
    return upper in SECRET_ENV_VARS or upper.endswith(
        ("_PASSWORD", "_SECRET", "_SECRET_KEY", "_TOKEN", "_AUTH_STRING", "_API_KEY")
    )


def split_secrets(env: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(the environment without secrets, the secrets)."""
    clean: dict[str, str] = {}
    found: dict[str, str] = {}
    for k, v in env.items():
        (found if is_secret(k) and v else clean)[k] = v
    return clean, found


def write_secrets(directory: Path, values: Mapping[str, str]) -> Path:
    """A new 0600 file holding ``values`` (JSON) in ``directory``; created with O_EXCL, never reused."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f".secrets-{_random.token_hex(8)}.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(dict(values), f)
        f.flush()
        os.fsync(f.fileno())  # remote hosts read it over the shared filesystem
    return path


@contextmanager
def secrets_file(env: Mapping[str, str], directory: Path) -> Iterator[dict[str, str]]:
    """The environment to launch horovodrun with: secrets moved into a private file in ``directory``
    (named by ``RINGFLOW_SECRETS_FILE``), which is removed when the block ends, however it ends."""
    clean, found = split_secrets(env)
    if not found:
        clean.pop(SECRETS_FILE_ENV, None)
        yield clean
        return
    path = write_secrets(Path(directory), found)
    try:
        yield {**clean, SECRETS_FILE_ENV: str(path)}
    finally:
        path.unlink(missing_ok=True)


def load_secrets(environ: MutableMapping[str, str] | None = None) -> list[str]:
    """Put the secrets from ``RINGFLOW_SECRETS_FILE`` into ``environ`` (default: this process's);
    returns their names. A no-op when the variable is unset."""
    env: MutableMapping[str, str] = os.environ if environ is None else environ
    name = env.get(SECRETS_FILE_ENV)
    if not name:
        return []
    path = Path(name)
    try:
        st = path.stat()
        if st.st_mode & 0o077:
            raise SecretsFileError(
                f"{SECRETS_FILE_ENV}={path} is readable by others (mode {st.st_mode & 0o777:o}); refusing to use it"
            )
        values = _SECRETS.validate_json(path.read_text())  # our own file: {name: value}
    except FileNotFoundError:
        raise SecretsFileError(
            f"{SECRETS_FILE_ENV}={path} does not exist on this host: the run's output "
            "directory must be on a filesystem every host shares"
        ) from None
    except (OSError, ValueError) as e:
        raise SecretsFileError(f"cannot read {SECRETS_FILE_ENV}={path}: {type(e).__name__}") from None
    for k, v in values.items():
        env[k] = v
    return sorted(values)

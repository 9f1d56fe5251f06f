"""A new Prefect home's database is a copy of a cached empty one (flows/prefect_api.py): the
server would otherwise replay every Prefect migration before the first command could start."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ringflow.flows.prefect_api import DATABASE_ENV_PREFIXES, database_template, seed_new_database, template_path


@pytest.fixture
def prefect_env(tmp_path, monkeypatch):
    """A new Prefect home, nothing in the environment naming a database or a server."""
    for name in list(os.environ):
        if name.startswith((*DATABASE_ENV_PREFIXES, "PREFECT_API_URL", "PREFECT_PROFILE")):
            monkeypatch.delenv(name)
    home = tmp_path / "prefect-home"
    monkeypatch.setenv("PREFECT_HOME", str(home))
    return home


def _fake_template(cache: Path) -> Path:
    template = template_path(cache)
    template.parent.mkdir(parents=True)
    template.write_bytes(b"an empty database")
    return template


def test_a_new_home_gets_a_copy_of_the_template(tmp_path, prefect_env):
    template = _fake_template(tmp_path / "cache")
    assert seed_new_database(tmp_path / "cache")
    assert (prefect_env / "prefect.db").read_bytes() == template.read_bytes()
    assert sorted(p.name for p in prefect_env.iterdir()) == ["prefect.db"]  # no partial copy left


def test_a_home_with_a_database_keeps_it(tmp_path, prefect_env):
    _fake_template(tmp_path / "cache")
    prefect_env.mkdir()
    (prefect_env / "prefect.db").write_bytes(b"runs of a month")
    assert not seed_new_database(tmp_path / "cache")
    assert (prefect_env / "prefect.db").read_bytes() == b"runs of a month"


def test_without_a_template_the_server_makes_its_own(tmp_path, prefect_env):
    assert not seed_new_database(tmp_path / "cache")
    assert not prefect_env.exists()


@pytest.mark.parametrize("name", ["PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_API_DATABASE_CONNECTION_URL"])
def test_a_database_named_elsewhere_is_not_seeded(tmp_path, prefect_env, monkeypatch, name):
    _fake_template(tmp_path / "cache")
    monkeypatch.setenv(name, f"sqlite+aiosqlite:///{tmp_path / 'elsewhere.db'}")
    assert not seed_new_database(tmp_path / "cache")
    assert not (prefect_env / "prefect.db").exists() and not (tmp_path / "elsewhere.db").exists()


def _contents(db: Path) -> tuple[dict[str, set[str]], list[tuple], dict[str, int], list[str]]:
    """Schema, migration revision, rows per table and block types of a Prefect database. A table's
    definition is the set of its lines: the migrations that rebuild a table write its constraints
    in an order that differs from one run of them to the next."""
    with sqlite3.connect(db) as c:
        definitions = c.execute("SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL")
        schema = {name: {line.strip().rstrip(",") for line in sql.splitlines()} for name, sql in definitions}
        revision = c.execute("SELECT version_num FROM alembic_version").fetchall()
        tables = [t for (t,) in c.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        counts = {t: c.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in tables}
        blocks = sorted(slug for (slug,) in c.execute("SELECT slug FROM block_type"))
    return schema, revision, {t: n for t, n in counts.items() if n}, blocks


STARTED_SERVER = textwrap.dedent(
    """
    import urllib.request

    from ringflow.flows.prefect_api import start_early

    wait = start_early()
    wait()
    from prefect.settings import PREFECT_API_URL

    urllib.request.urlopen(PREFECT_API_URL.value() + "/health", timeout=30).read()
    """
)


@pytest.mark.server
def test_the_template_is_the_database_prefects_own_start_makes(tmp_path, prefect_env, monkeypatch):
    """The template is built by Prefect's own functions; a server started on a seeded home
    answers and leaves its database as a server started on an empty home makes it."""
    template = database_template(tmp_path / "cache")
    assert template == template_path(tmp_path / "cache")
    assert [p.name for p in template.parent.iterdir()] == [template.name]  # no build folder, no -wal

    def start_server(home: Path) -> Path:
        env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
        env["XDG_CACHE_HOME"] = str(tmp_path / "no-cache")  # start_early copies nothing itself
        p = subprocess.run([sys.executable, "-c", STARTED_SERVER], env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        return home / "prefect.db"

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "seeded"))
    assert seed_new_database(tmp_path / "cache")
    seeded = start_server(tmp_path / "seeded")
    made = _contents(start_server(tmp_path / "prefects-own"))
    assert made[3], "Prefect registered no block types"
    assert _contents(template) == made
    assert _contents(seeded) == made

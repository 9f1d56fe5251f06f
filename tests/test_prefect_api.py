"""A command that starts Prefect's temporary API (flows/prefect_api.start_early) delivers every
log line of its flow run before the server stops: the Prefect UI shows a run to its last line."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.server

COMMAND = textwrap.dedent(
    """
    from prefect import flow, get_run_logger
    from ringflow.flows.prefect_api import start_early
    from ringflow.training.process_exit import exit_fast

    wait = start_early()

    @flow(name="last-words")
    def last_words() -> None:
        log = get_run_logger()
        for i in range(20):
            log.info("line %d", i)
        log.info("the last line")

    wait()
    last_words()
    exit_fast(0)  # as the ringflow command exits
    """
)


def test_the_flow_runs_last_log_lines_reach_the_temporary_api(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env |= {"PREFECT_HOME": str(tmp_path), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    p = subprocess.run([sys.executable, "-c", COMMAND], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    with sqlite3.connect(tmp_path / "prefect.db") as db:
        (run_id,) = db.execute("SELECT id FROM flow_run WHERE name IS NOT NULL").fetchone()
        messages = [m for (m,) in db.execute("SELECT message FROM log WHERE flow_run_id = ?", (run_id,))]
    assert "the last line" in messages
    assert any(m.startswith("Finished in state Completed") for m in messages), messages[-5:]

"""A command that starts Prefect's temporary API (flows/prefect_api.start_early) delivers every
log line of its flow run before the server stops: the Prefect UI shows a run to its last line."""

from __future__ import annotations

import os
import socket
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


def _children_program(body: str) -> str:
    return textwrap.dedent(
        """
        import os
        from ringflow.flows.prefect_api import start_early

        def children() -> list[int]:
            me, kids = os.getpid(), []
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    stat = open(f"/proc/{pid}/stat").read()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == me:
                    kids.append(int(pid))
            return kids
        """
    ) + textwrap.dedent(body)


def test_the_temporary_api_has_no_ui_link_and_stops_with_the_command(tmp_path: Path) -> None:
    program = _children_program(
        """
        wait = start_early()
        wait()
        from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL
        from prefect.utilities.urls import url_for
        print(PREFECT_API_URL.value(), repr(PREFECT_UI_URL.value()), url_for("flow-run", obj_id="x", url_type="ui"))
        print(len(children()))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env |= {"PREFECT_HOME": str(tmp_path), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    p = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    api_line, children_line = p.stdout.splitlines()[-2:]
    url, ui, link = api_line.split(" ")
    assert url.startswith("http://127.0.0.1:") and url.endswith("/api")
    assert (ui, link) == ("''", "None")  # the temporary server serves no UI: no link to one
    assert children_line == "1"  # the server, stopped at exit (a leftover would keep its port)
    port = int(url.split(":")[2].split("/")[0])
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "the temporary API still answers after the command"


def test_a_server_named_by_the_prefect_profile_is_used_and_none_is_left_running(tmp_path: Path) -> None:
    (tmp_path / "profiles.toml").write_text(
        'active = "team"\n[profiles.team]\nPREFECT_API_URL = "http://127.0.0.1:9/api"\n'
    )
    program = _children_program(
        """
        wait = start_early()
        print(wait())
        from prefect.settings import PREFECT_API_URL
        print(PREFECT_API_URL.value(), os.environ.get("PREFECT_API_URL"), len(children()))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PREFECT_HOME": str(tmp_path)}
    p = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.splitlines()[-1] == "http://127.0.0.1:9/api None 0"


def test_the_temporary_api_is_warmed_up_and_its_flow_runs_send_no_heartbeats(tmp_path: Path) -> None:
    """The warm-up's requests are answered by the real server (a wrong route would end it early),
    and a flow run on the temporary server has no heartbeat thread (whose stop held the command
    up to 1 s); a named server keeps Prefect's heartbeats, as does a frequency set in the env."""
    program = textwrap.dedent(
        """
        import os, time
        from prefect import flow
        from prefect.settings import get_current_settings, temporary_settings
        import ringflow.flows.prefect_api as api
        from ringflow.training.process_exit import exit_fast

        wait = api.start_early()
        wait()
        deadline = time.monotonic() + 60
        while not api._started.warmed_up and time.monotonic() < deadline:
            time.sleep(0.1)

        @flow(name="heartbeats")
        def heartbeats() -> int | None:
            return get_current_settings().flows.heartbeat_frequency

        with api.no_heartbeats_on_a_temporary_server():
            temporary = heartbeats()
        with temporary_settings(updates={"api.url": "http://127.0.0.1:9/api"}):
            with api.no_heartbeats_on_a_temporary_server():
                named = get_current_settings().flows.heartbeat_frequency
        os.environ["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] = "60"
        with api.no_heartbeats_on_a_temporary_server():
            from_env = get_current_settings().flows.heartbeat_frequency
        print(api._started.warmed_up, temporary, heartbeats(), named, from_env)
        exit_fast(0)
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "PREFECT_FLOWS", "PREFECT_RUNNER"))}
    env |= {"PREFECT_HOME": str(tmp_path), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    p = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    # warmed up; no heartbeats inside on the temporary server, Prefect's 180 s outside, named, env kept
    assert p.stdout.splitlines()[-1] == "True None 180 180 180"

"""Ranks forked by a rank server (``training/rank_server.py``, ``training.fork_ranks``): the same
training as a fresh interpreter's, the same exit codes and streams, and no rank outlives its
client or its server."""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import torch

from ringflow.training.config import PipelineConfig, with_overrides
from ringflow.training.launch import (
    FATAL_EXIT,
    FATAL_PREFIX,
    horovodrun_command,
    launch_env,
    rank_server_held,
    uses_rank_server,
)
from ringflow.training.model import load_model
from ringflow.training.rank_server import RankServer, rank_command, tracking_store_module
from tests.conftest import SMOKE


def test_only_local_fixed_size_runs_fork_their_ranks():
    cfg = PipelineConfig()
    assert uses_rank_server(cfg)
    assert uses_rank_server(with_overrides(cfg, {"training.horovod.hosts": "localhost:1,127.0.0.1:1"}))
    assert not uses_rank_server(with_overrides(cfg, {"training.fork_ranks": False}))
    assert not uses_rank_server(with_overrides(cfg, {"training.horovod.hosts": "localhost:1,198.18.0.2:1"}))
    assert not uses_rank_server(with_overrides(cfg, {"training.elastic.enabled": True}))
    assert not uses_rank_server(with_overrides(cfg, {"training.launcher": "mpijob"}))


def test_the_store_client_preloaded_follows_the_tracking_uri():
    assert tracking_store_module("sqlite:////tmp/m.db") == "mlflow.store.tracking.sqlalchemy_workspace_store"
    assert tracking_store_module("postgresql+psycopg://u@h/db") == "mlflow.store.tracking.sqlalchemy_workspace_store"
    assert tracking_store_module("http://127.0.0.1:5000") == "mlflow.store.tracking.rest_store"
    assert tracking_store_module(None) is None


def test_a_rank_without_its_server_runs_the_program_itself(tmp_path):
    p = subprocess.run(
        rank_command(sys.executable, tmp_path / "no-server") + ["--help"], capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr
    assert "usage: python -m ringflow.training.train" in p.stdout


@pytest.fixture(scope="module")
def server():
    s = RankServer()
    assert s.listening(), s.log_tail()
    yield s
    s.stop()
    assert not s.dir.exists()


def _fork_of(server: RankServer, already: int, timeout_s: float = 120) -> int:
    """The pid of the next rank the server forks."""
    deadline = time.monotonic() + timeout_s
    while len(server.forked()) <= already:
        assert time.monotonic() < deadline, "the server forked no rank: " + server.log_tail()
        time.sleep(0.05)
    return server.forked()[already][1]


def _gone(pid: int, timeout_s: float = 10) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.horovod  # the server imports torch, Horovod and MLflow: seconds, as a rank would
def test_a_forked_rank_exits_and_writes_as_a_fresh_one(server, tmp_path):
    args = ["--manifest", str(tmp_path / "missing"), "--config-json", "{}", "--output-dir", str(tmp_path / "out")]
    fresh = subprocess.run(
        [sys.executable, "-m", "ringflow.training.train", *args], capture_output=True, text=True, timeout=120
    )
    before = len(server.forked())
    forked = subprocess.run(
        rank_command(sys.executable, server.socket_path) + args, capture_output=True, text=True, timeout=120
    )
    assert len(server.forked()) == before + 1, "the client ran the program itself, not a fork"
    assert fresh.returncode == forked.returncode == FATAL_EXIT
    assert FATAL_PREFIX in forked.stderr and "missing" in forked.stderr
    assert [ln for ln in forked.stderr.splitlines() if FATAL_PREFIX in ln] == [
        ln for ln in fresh.stderr.splitlines() if FATAL_PREFIX in ln
    ]


def _blocked_rank(server: RankServer) -> tuple[subprocess.Popen[bytes], int]:
    """A client whose forked rank blocks reading its config from the client's stdin."""
    before = len(server.forked())
    client = subprocess.Popen(
        rank_command(sys.executable, server.socket_path)
        + ["--manifest", "m", "--config-json", "@/dev/stdin", "--output-dir", "o"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return client, _fork_of(server, before)


@pytest.mark.horovod
def test_a_signal_to_a_rank_reaches_its_fork(server):
    client, fork = _blocked_rank(server)
    time.sleep(0.5)  # the fork is running, blocked on the pipe
    assert psutil.pid_exists(fork)
    client.send_signal(signal.SIGTERM)
    assert client.wait(timeout=30) == -signal.SIGTERM  # it died as its rank did
    assert _gone(fork)


@pytest.mark.horovod
def test_a_killed_client_takes_its_fork_with_it(server):
    client, fork = _blocked_rank(server)
    client.kill()  # nothing to relay: the server sees the hang-up
    client.wait(timeout=30)
    assert _gone(fork), "the forked rank outlived its SIGKILLed client"


@pytest.mark.horovod
def test_ranks_die_with_their_server():
    s = RankServer()
    try:
        assert s.listening(), s.log_tail()
        client, fork = _blocked_rank(s)
    finally:
        s.stop()
    assert _gone(fork), "the forked rank outlived its server"
    assert client.wait(timeout=30) != 0


@pytest.mark.horovod
def test_forked_ranks_train_the_same_weights_as_fresh_ones(server, tmp_path, smoke_config, smoke_manifest):
    cfg = with_overrides(smoke_config, {"training.epochs": 2, "training.early_stopping_patience": 5})
    env = launch_env(cfg, MLFLOW_RUN_ID=None)
    weights = {}
    for how, socket_path in (("fresh", None), ("forked", server.socket_path)):
        before = len(server.forked())
        out = tmp_path / how
        p = subprocess.run(
            horovodrun_command(cfg, smoke_manifest.path, out, rank_server=socket_path),
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        assert len(server.forked()) - before == (2 if socket_path else 0)
        weights[how] = load_model(out)[0].state_dict()
    fresh, forked = weights["fresh"], weights["forked"]
    assert fresh.keys() == forked.keys()
    for k in fresh:
        assert torch.equal(fresh[k], forked[k]), k


@pytest.mark.horovod
def test_flows_in_one_process_share_one_server_until_the_last_lets_go():
    from ringflow.training import rank_server

    cfg = PipelineConfig()
    with rank_server_held(cfg) as flow_holds:
        with rank_server_held(cfg) as launch_holds:
            assert flow_holds and launch_holds
            server = rank_server.held()
            assert server is not None and server.listening(), server.log_tail() if server else ""
        assert server.alive(), "the first release stopped a server another holder still uses"
    assert not server.alive() and rank_server.held() is None
    with rank_server_held(with_overrides(cfg, {"training.fork_ranks": False})) as held:
        assert not held


@pytest.mark.horovod
def test_the_run_command_lets_go_of_the_server_it_held_when_the_flow_fails(prefect_harness, ringflow_home):
    """`ringflow run` holds the server from before the pipeline's imports (its imports run beside
    them); a flow that fails, here on a test window with no rows, must not leave it running."""
    from typer.testing import CliRunner

    from ringflow.flows.cli import app
    from ringflow.training import rank_server

    before = set(Path(tempfile.gettempdir()).glob("ringflow-ranks-*"))
    out = CliRunner().invoke(
        app,
        [
            "run",
            "--config",
            str(SMOKE),
            "--set",
            "data.windows.test.start=2015-01-01",
            "--set",
            "data.windows.test.end=2015-02-01",
        ],
    )
    assert out.exit_code == 1 and "data.windows.test" in out.output, out.output
    assert rank_server.held() is None
    assert set(Path(tempfile.gettempdir()).glob("ringflow-ranks-*")) == before

"""The team stack: ``ringflow up --database postgresql`` on a real PostgreSQL that ringflow starts,
and the supervisor that keeps the deployment runner (or any supervised service) alive.

Debian's ``postgresql`` binaries (installed by ``make postgres-deps``); the stack's home is under
a 0700 directory (root's home in a container), the cluster on a free port under the test's own
RINGFLOW_POSTGRES_STATE_DIR (as root; in the home otherwise), stopped and removed with the stack,
even when a test fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from datetime import UTC
from pathlib import Path

import psutil
import pytest

from ringflow.infra import postgres
from ringflow.infra.stack_settings import HEALTH_PATHS, WORKER_HEALTH_PATH
from ringflow.monitoring.events import TRAINING_DEPLOYMENT
from tests.test_stack import ROOT, SMOKE, Stack, _free_port, _stop

pytestmark = [pytest.mark.server]

try:
    postgres.bin_dir()
    HAVE_POSTGRES = True
except postgres.PostgresError:
    HAVE_POSTGRES = False
needs_postgres = pytest.mark.skipif(
    not HAVE_POSTGRES, reason="Debian's postgresql is not installed (make postgres-deps)"
)


@pytest.fixture(scope="module")
def pg_stack():
    private = Path(tempfile.mkdtemp(prefix="ringflow-pg-"))  # 0700, as /root: user postgres cannot enter
    shared = Path(tempfile.mkdtemp(prefix="ringflow-pg-state-"))
    shared.chmod(0o755)  # stands for /var/lib: the state dir (and a PostgreSQL root) below it
    # a 3 s restart back-off: a killed PostgreSQL stays down long enough for a client to see it
    s = Stack(
        private / "home",
        {
            "RINGFLOW_POSTGRES_PORT": str(_free_port()),
            "RINGFLOW_POSTGRES_STATE_DIR": str(shared / "state"),
            "RINGFLOW_SUPERVISE_BACKOFF": "3",
        },
    )
    s.pg_port = int(s.env["RINGFLOW_POSTGRES_PORT"])
    s.pg_shared = shared
    try:
        yield s
    finally:
        _stop(s)
        shutil.rmtree(private, ignore_errors=True)
        shutil.rmtree(shared, ignore_errors=True)


def _connect(s: Stack, user: str, dbname: str):
    import psycopg2

    creds = postgres.credentials(s.home)
    password = creds.superuser if user == "postgres" else getattr(creds, user)
    return psycopg2.connect(host="127.0.0.1", port=s.pg_port, user=user, password=password, dbname=dbname)


def _tables(s: Stack, user: str) -> set[str]:
    with _connect(s, user, user) as conn, conn.cursor() as cur:
        cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        return {r[0] for r in cur.fetchall()}


@pytest.mark.slow
@needs_postgres
def test_up_on_postgresql_runs_both_servers_on_their_own_databases(pg_stack):
    s = pg_stack
    assert s.home.parent.stat().st_mode & 0o777 == 0o700  # a home that user postgres cannot enter
    out = s.cli("up", "--config", str(SMOKE), "--database", "postgresql", timeout=600).stdout
    assert "postgres initialised" in out and "postgres started" in out, out
    assert set(s.pids()) == {"postgres", "prefect", "mlflow", "evidently", "serve"}

    # Our own server, as user postgres, on our port and loopback only; not the system service.
    # The pid file names its supervisor (as us), the state file the postmaster.
    rec = json.loads((s.home / "stack" / "postgres.pid").read_text())
    sup = json.loads((s.home / "stack" / "postgres.state.json").read_text())
    server = psutil.Process(sup["child_pid"])
    assert server.ppid() == rec["pid"] and sup["state"] == "running"
    data = postgres.data_dir(s.home)
    assert server.cwd() == str(data) and str(data) in server.cmdline()
    if os.geteuid() == 0:
        # As root: the data outside the home, where user postgres reaches it, and only postgres
        assert server.username() == "postgres"
        assert data == s.pg_shared / "state" / postgres.home_id(s.home) / "data", data
        assert (s.home / "postgres" / "data-dir").read_text().strip() == str(data)
        assert (data.parent / "home").read_text().strip() == str(s.home.resolve())  # whose, for clean-up
        for d in (data.parent, data):
            assert d.owner() == "postgres" and d.stat().st_mode & 0o777 == 0o700, d
        assert not (s.home / "postgres" / "data").exists()
    else:
        assert data == s.home / "postgres" / "data"
    listening = {
        (c.laddr.ip, c.laddr.port)
        for c in psutil.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.pid == server.pid
    }
    assert listening == {("127.0.0.1", s.pg_port)}

    # Two databases, each owned by its own user; Prefect's and MLflow's schemas in their own.
    with _connect(s, "postgres", "postgres") as conn, conn.cursor() as cur:
        cur.execute("SELECT datname, pg_get_userbyid(datdba) FROM pg_database WHERE datname IN ('prefect','mlflow')")
        assert dict(cur.fetchall()) == {"prefect": "prefect", "mlflow": "mlflow"}
    prefect_tables, mlflow_tables = _tables(s, "prefect"), _tables(s, "mlflow")
    assert {"flow_run", "deployment", "automation"} <= prefect_tables
    assert {"experiments", "runs", "registered_models", "model_versions"} <= mlflow_tables
    assert not ({"experiments", "runs"} & prefect_tables) and not ({"flow_run"} & mlflow_tables)
    assert not (s.home / "prefect" / "prefect.db").exists()  # (the CLI creates an empty mlflow.db on any command)

    # The generated passwords are on no command line.
    creds = postgres.credentials(s.home)
    for p in psutil.process_iter(["cmdline"]):
        line = " ".join(p.info.get("cmdline") or [])
        assert creds.prefect not in line and creds.mlflow not in line and creds.superuser not in line, p.pid
    assert (s.home / "postgres" / "credentials.json").stat().st_mode & 0o077 == 0
    assert not [f for f in data.parent.rglob("*") if f.name.startswith(".initdb-pw")]  # removed after initdb

    status = s.cli("status").stdout
    assert "postgres running" in status and f"data {data}" in status, status
    assert "prefect  running" in status and "mlflow   running" in status and "NOT answering" not in status, status
    assert "deployment training-pipeline/training-pipeline: READY" in status, status


@pytest.mark.slow
@needs_postgres
def test_a_run_lands_in_postgresql_and_everything_survives_down_and_up(pg_stack):
    # (A real training run on these servers: test_the_compose_services_commands_run_a_training...)
    from datetime import datetime

    from mlflow import MlflowClient
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.states import Scheduled

    s = pg_stack
    client = MlflowClient(s.mlflow)
    exp = client.get_experiment_by_name("ringflow")
    run = client.create_run(exp.experiment_id, tags={"ringflow.kind": "training"})
    client.log_metric(run.info.run_id, "val_roc_auc", 0.7)
    client.set_terminated(run.info.run_id)
    client.create_registered_model("pg-check")
    client.create_model_version("pg-check", f"runs:/{run.info.run_id}/model", run.info.run_id)
    client.set_registered_model_alias("pg-check", "champion", "1")
    with s.client() as c:
        dep = c.read_deployment_by_name(TRAINING_DEPLOYMENT)
        far = datetime(2099, 1, 1, tzinfo=UTC)  # persisted, never picked up
        flow_run = c.create_flow_run_from_deployment(dep.id, state=Scheduled(scheduled_time=far))
    with _connect(s, "mlflow", "mlflow") as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM model_versions WHERE name = 'pg-check'")
        assert cur.fetchone()[0] == 1

    pg_pids = [s.pids()["postgres"], json.loads((s.home / "stack" / "postgres.state.json").read_text())["child_pid"]]
    out = s.cli("down").stdout
    assert "postgres stopped" in out, out
    for pid in pg_pids:  # the supervisor and the postmaster
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    log = (s.home / "stack" / "postgres.log").read_text()
    assert "database system is shut down" in log  # a clean (fast) shutdown, not a crash

    out = s.cli("up", "--config", str(SMOKE), timeout=600).stdout  # the home remembers postgresql
    assert "postgres started" in out and "initialised" not in out, out
    client = MlflowClient(s.mlflow)
    assert client.get_model_version_by_alias("pg-check", "champion").run_id == run.info.run_id
    assert client.get_run(run.info.run_id).data.metrics == {"val_roc_auc": 0.7}
    assert client.get_experiment_by_name("ringflow").artifact_location == (s.home / "artifacts" / "ringflow").as_uri()
    with s.client() as c:
        dep2 = c.read_deployment_by_name(TRAINING_DEPLOYMENT)
        assert dep2.id == dep.id and dep2.schedules
        assert len(c.read_automations_by_name("ringflow-rerun-on-anomaly")) == 1
        runs = c.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))
        assert flow_run.id in {r.id for r in runs}
    assert "postgres running" in s.cli("status").stdout


def _root_after_an_upgrade(under: Path, newer: str = "99") -> Path:
    """A PostgreSQL root (RINGFLOW_POSTGRES_ROOT) as a distribution upgrade leaves it: the installed
    version beside a newer major version. Only one major version can be installed here, so the
    newer one is a stand-in that behaves as a real server of another major version does on this
    data: it refuses it (the words are PostgreSQL's)."""
    root = under / "postgresql"
    root.mkdir()
    for version, bins in postgres.installed_versions().items():
        (root / version).symlink_to(bins.parent)
    (root / newer / "bin").mkdir(parents=True)
    for name in ("postgres", "initdb"):
        exe = root / newer / "bin" / name
        exe.write_text(
            "#!/bin/sh\n"
            f'[ "$1" = --version ] && {{ echo "{name} (PostgreSQL) {newer}.0"; exit 0; }}\n'
            'echo "FATAL:  database files are incompatible with server" >&2\n'
            'echo "DETAIL:  The data directory was initialized by another version, "'
            f'"which is not compatible with this version {newer}.0." >&2\n'
            "exit 1\n"
        )
        exe.chmod(0o755)
    return root


@pytest.mark.slow
@needs_postgres
def test_up_after_a_newer_major_version_is_installed_runs_the_version_of_the_data(pg_stack):
    s = pg_stack
    made_by = postgres.data_version(postgres.data_dir(s.home))
    root = _root_after_an_upgrade(s.pg_shared)
    s.cli("down")
    out = s.cli("up", "--config", str(SMOKE), env={"RINGFLOW_POSTGRES_ROOT": str(root)}, timeout=600).stdout
    assert "postgres started" in out and "initialised" not in out, out
    # the pid file names the supervisor; the state file the postmaster it started
    sup = json.loads((s.home / "stack" / "postgres.state.json").read_text())
    server = psutil.Process(sup["child_pid"])
    assert server.cmdline()[0] == str(root / made_by / "bin" / "postgres"), server.cmdline()
    assert "postgres running" in s.cli("status").stdout


@needs_postgres
def test_up_on_data_of_a_major_version_not_installed_says_what_to_do(tmp_path):
    # The data directory of a cluster made by PostgreSQL 14, whose packages an upgrade to 15 removed
    # (its PG_VERSION is all that `up` reads before it would start a server).
    home = tmp_path / "home"
    data = home / "postgres" / "data"
    data.mkdir(parents=True)
    (data / "PG_VERSION").write_text("14\n")
    s = Stack(home, {"RINGFLOW_POSTGRES_PORT": str(_free_port())})
    try:
        p = s.cli("up", "--config", str(SMOKE), "--database", "postgresql", check=False)
    finally:
        _stop(s)
    assert p.returncode == 1
    msg = " ".join(p.stderr.split())
    assert f"data directory {data} was made by PostgreSQL 14" in msg, msg
    installed = ", ".join(postgres.installed_versions())
    assert f"/usr/lib/postgresql has {installed}" in msg and "postgresql-14" in msg, msg
    assert "pg_upgrade --old-bindir /usr/lib/postgresql/14/bin" in msg and "pg_dumpall" in msg, msg
    assert s.pids() == {}  # nothing started


@pytest.mark.slow
@needs_postgres
def test_postgresql_killed_while_a_run_logs_is_restarted_by_its_supervisor(pg_stack, monkeypatch):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from ringflow.infra.supervisor import read_state

    s = pg_stack
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the error now, not after minutes of retries
    client = MlflowClient(s.mlflow)
    exp = client.get_experiment_by_name("ringflow")
    run = client.create_run(exp.experiment_id)
    versions_before = len(client.search_model_versions("name='pg-check'"))
    state_file = s.home / "stack" / "postgres.state.json"
    before = read_state(state_file)
    os.kill(before["child_pid"], signal.SIGKILL)  # the postmaster (not its supervisor), while the run logs
    error = None
    for step in range(100):
        try:
            client.log_metric(run.info.run_id, "loss", 1.0 / (step + 1), step=step)
        except MlflowException as e:
            error = str(e)
            break
        time.sleep(0.1)
    assert error is not None, "logging went on without its database"
    # MLflow answers 503 (temporarily unavailable), which its client retries: with retries on, a
    # run rides out a short outage; here, with none, the request fails and says why
    assert "503" in error, error

    # Its supervisor starts it again (crash recovery), without `ringflow up`.
    now = _until(
        lambda: (
            (st := read_state(state_file)).get("state") == "running"
            and st.get("child_pid") != before["child_pid"]
            and st
        ),
        120,
    )
    assert now["restarts"] == before["restarts"] + 1 and now["last_exit"] == -signal.SIGKILL, now
    assert psutil.Process(now["child_pid"]).username() == "postgres"

    def registry_loads():
        try:
            return client.search_model_versions("name='pg-check'")
        except MlflowException:  # a pooled connection from before the restart, dropped once
            return None

    versions = _until(registry_loads, 120)
    assert len(versions) == versions_before  # no half-written version
    assert client.get_model_version_by_alias("pg-check", "champion").version == "1"
    run2 = client.create_run(exp.experiment_id)  # the next run works
    client.log_metric(run2.info.run_id, "loss", 0.5)
    client.set_terminated(run2.info.run_id)
    assert client.get_run(run2.info.run_id).data.metrics == {"loss": 0.5}
    log = (s.home / "stack" / "postgres.log").read_text()
    assert "database system was interrupted" in log or "not properly shut down" in log
    # the lock file of the killed postmaster, removed before the restart
    assert f"removed {postgres.data_dir(s.home) / 'postmaster.pid'}: the process it names is gone" in log, log[-3000:]
    out = s.cli("status").stdout
    assert (
        f"postgres running pid {s.pids()['postgres']} (supervised: service pid {now['child_pid']}, "
        f"{now['restarts']} restarts)"
    ) in out, out


# --------------------------------------------------------------------------- supervisor


def _supervise(tmp_path: Path, code: str, *options: str, **env: str) -> subprocess.Popen:
    import os
    import sys

    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ringflow.infra.supervisor",
            "--name",
            "svc",
            "--state",
            str(tmp_path / "svc.state.json"),
            "--log",
            str(tmp_path / "svc.log"),
            *options,
            "--",
            sys.executable,
            "-u",
            "-c",
            code,
        ],
        cwd=ROOT,
        env={**os.environ, "RINGFLOW_SUPERVISE_BACKOFF": "0.2", **env},
        start_new_session=True,
    )


def _state(tmp_path: Path) -> dict:
    from ringflow.infra.supervisor import read_state

    return read_state(tmp_path / "svc.state.json")


def _until(cond, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if v := cond():
            return v
        time.sleep(0.1)
    raise AssertionError("condition not met within the timeout")


def test_supervisor_restarts_a_killed_service_and_stops_its_tree(tmp_path):
    sup = _supervise(tmp_path, "import time\nprint('up', flush=True)\ntime.sleep(600)")
    try:
        first = _until(lambda: _state(tmp_path).get("child_pid"))
        os.kill(first, signal.SIGKILL)
        second = _until(
            lambda: (
                (p := _state(tmp_path).get("child_pid")) != first and _state(tmp_path).get("state") == "running" and p
            )
        )
        st = _state(tmp_path)
        assert st["restarts"] == 1 and st["last_exit"] == -signal.SIGKILL
        assert psutil.Process(second).is_running()
        log = (tmp_path / "svc.log").read_text()
        assert log.count("up") >= 2 and f"pid {first} exited with -9" in log, log
        sup.terminate()
        assert sup.wait(30) == 0
        assert not psutil.pid_exists(second) or psutil.Process(second).status() == psutil.STATUS_ZOMBIE
        assert _state(tmp_path)["state"] == "stopped"
    finally:
        sup.kill()


def test_supervisor_gives_up_on_a_restart_loop_with_a_clear_message(tmp_path):
    sup = _supervise(tmp_path, "raise SystemExit(3)", RINGFLOW_SUPERVISE_MAX_QUICK_FAILURES="3")
    try:
        assert sup.wait(60) == 1
    finally:
        sup.kill()
    st = _state(tmp_path)
    assert st["state"] == "gave-up" and st["restarts"] == 2 and st["last_exit"] == 3
    assert "exited 3 times in a row" in st["message"] and "last exit code 3" in st["message"]


def test_supervisor_stops_with_the_services_own_signal_in_its_directory_after_a_stale_pid_file(tmp_path):
    # What PostgreSQL needs: its lock file removed when the pid in it is gone, its data directory
    # as working directory, SIGINT (fast shutdown) rather than SIGTERM when stopped.
    workdir = tmp_path / "data"
    workdir.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = workdir / "service.pid"
    stale.write_text(f"{dead.pid}\n/some/data/dir\n")
    code = (
        "import os, signal, sys, time\n"
        "def bye(signum, _): print('clean shutdown on', signal.Signals(signum).name, flush=True); sys.exit(0)\n"
        "signal.signal(signal.SIGINT, bye)\n"
        "signal.signal(signal.SIGTERM, lambda *_: None)  # SIGTERM alone would not stop it\n"
        "print('cwd', os.getcwd(), flush=True)\n"
        "time.sleep(600)"
    )
    sup = _supervise(
        tmp_path,
        code,
        "--cwd",
        str(workdir),
        "--stop-signal",
        "SIGINT",
        "--stale-pid-file",
        str(stale),
        RINGFLOW_STACK_STOP_GRACE="30",
    )
    try:
        child = _until(lambda: _state(tmp_path).get("child_pid"))
        _until(lambda: f"cwd {workdir}" in (tmp_path / "svc.log").read_text())
        assert not stale.exists()
        sup.terminate()
        assert sup.wait(60) == 0
    finally:
        sup.kill()
    log = (tmp_path / "svc.log").read_text()
    assert f"removed {stale}: the process it names is gone" in log, log
    assert "clean shutdown on SIGINT" in log, log
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE
    live = workdir / "live.pid"
    live.write_text(f"{os.getpid()}\n")  # a live process: its pid file stays
    from ringflow.infra.supervisor import remove_stale_pid_file

    assert not remove_stale_pid_file(live) and live.exists()


def test_supervisor_rotates_the_service_log(tmp_path):
    code = "import time\nfor i in range(400): print('line %04d ' % i + 'x' * 60)\ntime.sleep(600)"
    sup = _supervise(tmp_path, code, RINGFLOW_STACK_LOG_MAX_BYTES="4096", RINGFLOW_STACK_LOG_BACKUPS="2")
    try:

        def last_line_written():
            try:
                return "line 0399" in (tmp_path / "svc.log").read_text(errors="replace")
            except FileNotFoundError:  # not created yet, or between two rotations
                return False

        _until(last_line_written)
    finally:
        sup.terminate()
        sup.wait(30)
    logs = sorted(p.name for p in tmp_path.glob("svc.log*"))
    assert logs == ["svc.log", "svc.log.1", "svc.log.2"], logs
    assert all((tmp_path / n).stat().st_size <= 4096 + 200 for n in logs)


# --------------------------------------------------------------------------- docker compose

COMPOSE = ROOT / "infra" / "docker-compose.yml"
COMPOSE_AUTH = ROOT / "infra" / "docker-compose.auth.yml"
BASE_ENV = {"POSTGRES_PASSWORD": "pg-pw", "PREFECT_DB_PASSWORD": "prefect-pw", "MLFLOW_DB_PASSWORD": "mlflow-pw"}
AUTH_ENV = {
    "PREFECT_AUTH_STRING": "ops:prefect-secret",
    "MLFLOW_ADMIN_PASSWORD": "mlflow-admin-pw-123",
    "MLFLOW_FLASK_SERVER_SECRET_KEY": "flask-secret",
}


class ComposeError(ValueError):
    pass


def _interpolate(value, env: dict[str, str]):
    """Compose's variable substitution: ${V}, ${V:-default}, ${V-default}, ${V:?error}, $$."""
    import re

    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group("name"), m.group("op"), m.group("arg") or ""
        have = env.get(name)
        if op == ":-":
            return have if have else arg
        if op == "-":
            return have if have is not None else arg
        if op == ":?":
            if not have:
                raise ComposeError(f"{name}: {arg}")
            return have
        return have or ""

    return re.sub(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:-|-|:\?)(?P<arg>[^}]*))?\}", sub, value)


def _merge(base: dict, over: dict) -> dict:
    """Compose's merge of an override file: maps merge, `command` and other scalars/lists replace,
    `volumes`/`ports` of a service append."""
    out = dict(base)
    for key, value in over.items():
        if key in out and isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = _merge(out[key], value)
        elif key in ("volumes", "ports") and isinstance(out.get(key), list):
            out[key] = [*out[key], *value]
        else:
            out[key] = value
    return out


def render_compose(env: dict[str, str], *files: Path) -> dict:
    import yaml

    merged: dict = {}
    for f in files:
        merged = _merge(merged, yaml.safe_load(f.read_text()))
    return _interpolate(merged, env)


def test_compose_without_auth_sets_no_auth_variable_and_needs_no_object_store():
    cfg = render_compose(BASE_ENV, COMPOSE)
    services = cfg["services"]
    assert set(services) == {"postgres", "prefect-server", "mlflow", "worker", "deploy", "evidently"}
    assert not any("minio" in str(svc.get("image", "")) for svc in services.values())
    for name, svc in services.items():
        env = svc.get("environment", {})
        assert not any("AUTH" in k or k.startswith("MLFLOW_TRACKING_PASSWORD") for k in env), (name, env)
    prefect_env = services["prefect-server"]["environment"]
    assert (
        prefect_env["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
        == "postgresql+asyncpg://prefect:prefect-pw@postgres:5432/prefect"
    )
    mlflow = services["mlflow"]
    assert (
        mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"]
        == "postgresql+psycopg2://mlflow:mlflow-pw@postgres:5432/mlflow"
    )
    assert "mlflow-pw" not in " ".join(mlflow["command"])  # never on a command line
    dest = mlflow["command"][mlflow["command"].index("--artifacts-destination") + 1]
    assert f"mlflow-artifacts:{dest}" in mlflow["volumes"] and "--app-name" not in mlflow["command"]
    # Prefect the way teams run it: a worker on a work pool, with Prefect's own health endpoint
    worker, deploy = services["worker"], services["deploy"]
    assert worker["command"] == [
        "prefect",
        "worker",
        "start",
        "--pool",
        "ringflow",
        "--type",
        "process",
        "--with-healthcheck",
    ]
    assert f"localhost:8080{WORKER_HEALTH_PATH}" in " ".join(worker["healthcheck"]["test"])
    # the servers' healthchecks ask the paths `ringflow up` and `status` ask (one home)
    assert f"localhost:4200{HEALTH_PATHS['prefect']}'" in " ".join(services["prefect-server"]["healthcheck"]["test"])
    assert f"localhost:5000{HEALTH_PATHS['mlflow']}'" in " ".join(services["mlflow"]["healthcheck"]["test"])
    assert deploy["command"] == ["ringflow", "deploy", "--config", "configs/flights.yaml", "--work-pool", "ringflow"]
    assert deploy["depends_on"] == {"worker": {"condition": "service_healthy"}} and deploy["restart"] == "no"
    assert deploy["environment"]["RINGFLOW_NOTIFY_WEBHOOK_URL"] == ""  # off unless .env names one
    for svc in (worker, deploy):
        assert svc["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        assert svc["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        # results a retry reuses: on the volume every worker mounts, not a worker's home
        results = svc["environment"]["PREFECT_RESULTS_LOCAL_STORAGE_PATH"]
        assert any(results.startswith(v.split(":")[1] + "/") for v in svc["volumes"]), (results, svc["volumes"])
    evidently = services["evidently"]
    assert evidently["command"][:2] == ["evidently", "ui"]
    workspace = evidently["command"][evidently["command"].index("--workspace") + 1]
    assert workspace == f"{worker['environment']['RINGFLOW_HOME']}/evidently"  # where monitoring writes
    assert services["prefect-server"]["environment"]["PREFECT_UI_URL"] == "http://localhost:4200"
    with pytest.raises(ComposeError, match="POSTGRES_PASSWORD"):
        render_compose({}, COMPOSE)


def test_compose_auth_override_gives_servers_and_clients_the_same_credentials():
    cfg = render_compose({**BASE_ENV, **AUTH_ENV}, COMPOSE, COMPOSE_AUTH)
    s = cfg["services"]
    assert s["prefect-server"]["environment"]["PREFECT_SERVER_API_AUTH_STRING"] == "ops:prefect-secret"
    for client in ("worker", "deploy"):
        assert s[client]["environment"]["PREFECT_API_AUTH_STRING"] == "ops:prefect-secret"
        assert s[client]["environment"]["MLFLOW_TRACKING_PASSWORD"] == "mlflow-admin-pw-123"
        assert s[client]["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"  # base kept
    assert s["mlflow"]["command"][:4] == ["mlflow", "server", "--app-name", "basic-auth"]
    assert s["mlflow"]["environment"]["MLFLOW_AUTH_ADMIN_PASSWORD"] == "mlflow-admin-pw-123"
    assert s["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://")  # kept
    assert any(v.startswith("mlflow-auth:") for v in s["mlflow"]["volumes"])
    assert "mlflow-auth" in cfg["volumes"] and "mlflow-artifacts" in cfg["volumes"]
    ini = (ROOT / "infra" / "mlflow-basic-auth.ini").read_text()
    assert "database_uri = sqlite:////data/mlflow-auth/" in ini
    with pytest.raises(ComposeError, match="PREFECT_AUTH_STRING"):
        render_compose(BASE_ENV, COMPOSE, COMPOSE_AUTH)  # auth on without a password: refused


def _compose_on_this_machine(cfg: dict, ports: dict[str, int], data: Path) -> dict[str, tuple[list[str], dict]]:
    """The compose services' commands and environments with the container names, paths and
    executables of this machine: what each container would run, run here."""
    import sys

    hosts = {
        "postgres:5432": f"127.0.0.1:{ports['postgres']}",
        "prefect-server:4200": f"127.0.0.1:{ports['prefect']}",
        "mlflow:5000": f"127.0.0.1:{ports['mlflow']}",
    }

    def local(v: str) -> str:
        for a, b in hosts.items():
            v = v.replace(a, b)
        return v.replace("/data/", f"{data}/")

    bins = {b: str(Path(sys.executable).with_name(b)) for b in ("prefect", "mlflow", "ringflow", "evidently")}
    bins["python"] = sys.executable
    port_of = {"prefect-server": "prefect", "mlflow": "mlflow", "evidently": "evidently"}
    out = {}
    for name in ("prefect-server", "mlflow", "worker", "deploy", "evidently"):
        svc = cfg["services"][name]
        cmd = [local(a) for a in svc["command"]]
        cmd[0] = bins[cmd[0]]
        cmd = ["127.0.0.1" if a == "0.0.0.0" else a for a in cmd]
        if "--port" in cmd:
            cmd[cmd.index("--port") + 1] = str(ports[port_of[name]])
        env = {k: local(str(v)) for k, v in (svc.get("environment") or {}).items()}
        out[name] = (cmd, env)
    return out


@pytest.mark.slow
@pytest.mark.horovod
@pytest.mark.postgres
@needs_postgres
def test_the_compose_services_commands_run_a_training_on_postgresql():
    import os

    import httpx

    from ringflow.training.launch import kill_tree

    base = Path(tempfile.mkdtemp(prefix="ringflow-compose-"))
    base.chmod(0o755)  # as root, user postgres reaches its data under base/pg-state
    home, data = base / "pg-home", base / "data"
    (data / "mlflow-artifacts").mkdir(parents=True)
    ports = {
        "postgres": _free_port(),
        "prefect": _free_port(),
        "mlflow": _free_port(),
        "evidently": _free_port(),
        "worker_health": _free_port(),
    }
    procs: list[subprocess.Popen] = []
    scrub = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    try:
        # PostgreSQL with the compose init script (the official image runs it as the superuser)
        postgres.ensure_cluster(home, postgres.PostgresSettings(state_dir=base / "pg-state"))
        procs.append(
            subprocess.Popen(
                postgres.server_command(home, "127.0.0.1", ports["postgres"]),
                user=postgres._run_as(),
                cwd=postgres.data_dir(home),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
        _until(lambda: postgres.is_ready(home, "127.0.0.1", ports["postgres"]), 60)
        init = subprocess.run(
            ["sh", str(ROOT / "infra" / "postgres-init.sh")],
            capture_output=True,
            text=True,
            timeout=60,
            env={
                **scrub,
                "POSTGRES_USER": "postgres",
                "PGHOST": "127.0.0.1",
                "PGPORT": str(ports["postgres"]),
                "PGPASSWORD": postgres.credentials(home).superuser,
                **BASE_ENV,
            },
        )
        assert init.returncode == 0, init.stderr

        env = {**BASE_ENV, "RINGFLOW_CONFIG": "configs/smoke.yaml"}
        services = _compose_on_this_machine(render_compose(env, COMPOSE), ports, data)
        common = {**scrub, "PREFECT_HOME": str(base / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        for name, ready in (
            ("prefect-server", f"http://127.0.0.1:{ports['prefect']}{HEALTH_PATHS['prefect']}"),
            ("mlflow", f"http://127.0.0.1:{ports['mlflow']}{HEALTH_PATHS['mlflow']}"),
        ):
            cmd, senv = services[name]
            with open(base / f"{name}.log", "wb") as log:
                procs.append(
                    subprocess.Popen(
                        cmd,
                        env={**common, **senv},
                        cwd=ROOT,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
            _until(lambda ready=ready: _ok(httpx, ready), 180)
        # the worker (it makes the process pool), healthy by Prefect's own endpoint; then the one-shot deploy
        cmd, senv = services["worker"]
        worker_env = {**common, **senv, "PREFECT_WORKER_WEBSERVER_PORT": str(ports["worker_health"])}
        health = f"http://127.0.0.1:{ports['worker_health']}{WORKER_HEALTH_PATH}"
        assert not _ok(httpx, health)
        with open(base / "worker.log", "wb") as log:
            procs.append(
                subprocess.Popen(
                    cmd, env=worker_env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            )
        _until(lambda: _ok(httpx, health), 240)
        cmd, denv = services["deploy"]
        deployed = subprocess.run(cmd, env={**common, **denv}, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        cmd, eenv = services["evidently"]
        with open(base / "evidently.log", "wb") as log:
            procs.append(
                subprocess.Popen(
                    cmd, env={**common, **eenv}, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            )
        _until(lambda: _ok(httpx, f"http://127.0.0.1:{ports['evidently']}/api/version"), 120)

        # a training run through the API, executed by the compose worker, stored in PostgreSQL
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        from ringflow.training.config import load_config

        cfg = load_config(SMOKE, ["training.epochs=1", "training.world_size=1"])
        with temporary_settings({PREFECT_API_URL: senv["PREFECT_API_URL"]}), get_client(sync_client=True) as c:
            dep = c.read_deployment_by_name(TRAINING_DEPLOYMENT)
            assert dep.work_pool_name == "ringflow" and dep.global_concurrency_limit.limit == 1 and dep.schedules
            assert c.read_automations_by_name("ringflow-rerun-on-anomaly")
            fr = c.create_flow_run_from_deployment(dep.id, parameters={"config": cfg.model_dump(mode="json")})
            done = _until(lambda: (r := c.read_flow_run(fr.id)).state.is_final() and r, 900)
            assert done.state.is_completed(), done.state
        from mlflow import MlflowClient

        versions = MlflowClient(f"http://127.0.0.1:{ports['mlflow']}").search_model_versions("name='flights-delay'")
        assert len(versions) == 1
        assert any((data / "mlflow-artifacts").rglob("MLmodel"))  # artifacts served from the volume

        # the persisted results are on the shared volume, not in the worker's home
        assert any((data / "ringflow" / "prefect-results").iterdir())
    finally:
        for p in reversed(procs):
            kill_tree(p.pid, grace_s=10)
        shutil.rmtree(base, ignore_errors=True)


def _ok(httpx, url: str) -> bool:
    try:
        return httpx.get(url, timeout=3).status_code == 200
    except httpx.HTTPError:
        return False

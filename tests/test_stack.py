"""The real stack: ``ringflow up/deploy/status/down`` with real Prefect and MLflow servers.

Each module-scoped stack lives under its own tmp RINGFLOW_HOME on free ports and is stopped
even when a test fails (``down``, then a SIGKILL of anything a pid file still names).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from datetime import UTC
from pathlib import Path

import httpx
import psutil
import pytest

from ringflow.infra.stack_settings import (
    PREFECT_AUTH_ENV,
    PREFECT_SERVER_AUTH_ENV,
    STACK_ROUTING_ENV,
    ServerName,
    StackSettings,
    parse_auth_string,
)
from ringflow.monitoring.anomalies import Anomaly, AnomalyType, Severity
from ringflow.monitoring.events import (
    MONITORING_DEPLOYMENT,
    TRAINING_DEPLOYMENT,
    AnomalyEventPayload,
    ModelRef,
    RerunRequest,
)
from ringflow.tasks import artifacts

pytestmark = [pytest.mark.server, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
RINGFLOW = Path(sys.executable).with_name("ringflow")
SMOKE = ROOT / "configs" / "smoke.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    """A tmp-home stack driven through the real CLI."""

    def __init__(self, home: Path, extra_env: dict[str, str] | None = None):
        self.home = home
        self.prefect_port, self.mlflow_port, self.evidently_port = _free_port(), _free_port(), _free_port()
        env = {k: v for k, v in os.environ.items() if k not in STACK_ROUTING_ENV}
        env.update(
            RINGFLOW_HOME=str(home),
            RINGFLOW_PREFECT_PORT=str(self.prefect_port),
            RINGFLOW_MLFLOW_PORT=str(self.mlflow_port),
            RINGFLOW_EVIDENTLY_PORT=str(self.evidently_port),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
        )
        env.update(extra_env or {})
        self.env = env

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.prefect_port}/api"

    @property
    def mlflow(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    def health(self, server: ServerName) -> str:
        """The server's health URL: the path ``up`` and ``status`` ask (infra/stack_settings.py)."""
        ports = {"prefect_port": self.prefect_port, "mlflow_port": self.mlflow_port}
        return StackSettings(host="127.0.0.1", evidently_port=self.evidently_port, **ports).health_url(server)

    def cli(self, *args: str, env: dict[str, str] | None = None, check: bool = True, timeout: float = 300):
        p = subprocess.run(
            [str(RINGFLOW), *args],
            cwd=ROOT,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and p.returncode != 0:
            raise AssertionError(f"ringflow {' '.join(args)} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
        return p

    def pids(self) -> dict[str, int]:
        out = {}
        for f in (self.home / "stack").glob("*.pid"):
            out[f.stem] = json.loads(f.read_text())["pid"]
        return out

    def family(self) -> list[psutil.Process]:
        """Every live process of the stack, children included."""
        procs = []
        for pid in self.pids().values():
            try:
                p = psutil.Process(pid)
                procs += [p, *p.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        return procs

    def kill_leftovers(self) -> None:
        for p in self.family():
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass

    def client(self):
        """A Prefect client for this stack's API (not whatever the test session points at)."""
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

        auth = self.env.get(PREFECT_AUTH_ENV) or self.env.get(PREFECT_SERVER_AUTH_ENV)

        class _Ctx:
            def __enter__(s):
                s.ts = temporary_settings({PREFECT_API_URL: self.api, PREFECT_API_AUTH_STRING: auth})
                s.ts.__enter__()
                s.c = get_client(sync_client=True)
                return s.c.__enter__()

            def __exit__(s, *exc):
                s.c.__exit__(*exc)
                s.ts.__exit__(*exc)

        return _Ctx()


def _start(stack: Stack, *args: str) -> None:
    try:
        stack.cli("up", "--config", str(SMOKE), *args)
    except BaseException:
        _stop(stack)
        raise


def _stop(stack: Stack) -> None:
    try:
        stack.cli("down", check=False, timeout=120)
    finally:
        stack.kill_leftovers()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    # Exported but empty = auth off (Prefect's server would take '' as the password: every
    # client, the runner first, got 401 and `up` failed with both servers left running).
    s = Stack(
        tmp_path_factory.mktemp("stack") / "home",
        {"PREFECT_SERVER_API_AUTH_STRING": "", "MLFLOW_AUTH_ADMIN_PASSWORD": ""},
    )
    _start(s)
    yield s
    _stop(s)


# --------------------------------------------------------------------------- up / status


def test_up_started_all_three_and_wrote_urls(stack):
    assert set(stack.pids()) == {"prefect", "mlflow", "evidently", "serve"}
    assert httpx.get(stack.health("prefect")).json() is True
    assert httpx.get(stack.health("mlflow")).text == "OK"
    # Evidently's UI over the monitoring workspace, on its own port, in status
    assert httpx.get(stack.health("evidently")).json()["application"] == "Evidently UI"
    status = stack.cli("status").stdout
    sup = json.loads((stack.home / "stack" / "evidently.state.json").read_text())
    assert (
        f"evidently running pid {stack.pids()['evidently']} (supervised: service pid {sup['child_pid']}, "
        f"0 restarts)  healthy  http://127.0.0.1:{stack.evidently_port}"
    ) in status, status
    env_file = (stack.home / "stack" / "env").read_text()
    assert f"PREFECT_API_URL={stack.api}" in env_file
    assert f"MLFLOW_TRACKING_URI={stack.mlflow}" in env_file
    # Prefect state in RINGFLOW_HOME, not ~/.prefect
    assert (stack.home / "prefect" / "prefect.db").is_file()


def test_second_up_starts_nothing(stack):
    before = stack.pids()
    out = stack.cli("up", "--config", str(SMOKE)).stdout
    assert "nothing to start" in out, out
    assert stack.pids() == before


def test_status_reads_the_stack_through_the_env_file(stack):
    # No PREFECT_API_URL in the environment: the CLI must find the stack via $RINGFLOW_HOME/stack/env.
    out = stack.cli("status").stdout
    assert "prefect  running" in out and "healthy" in out, out
    assert "deployment training-pipeline/training-pipeline: READY" in out, out
    assert "deployment monitoring/monitoring: READY" in out, out
    assert "automation ringflow-rerun-on-anomaly: enabled" in out, out


# --------------------------------------------------------------------------- deploy


def test_deploy_creates_deployments_schedules_and_one_automation(stack):
    # A hand-made automation of the same name (what older versions created) would start a
    # second run per event: deploy replaces it with the one declared with the deployment.
    from prefect.events.actions import DoNothing
    from prefect.events.schemas.automations import AutomationCore, EventTrigger

    with stack.client() as c:
        c.create_automation(
            AutomationCore(
                name="ringflow-rerun-on-anomaly",
                trigger=EventTrigger(expect={"ringflow.anomaly.detected"}),
                actions=[DoNothing()],
            )
        )
    # Twice, with changed schedules: an update, not a second schedule or automation.
    stack.cli("deploy", "--config", str(SMOKE))
    stack.cli(
        "deploy",
        "--config",
        str(SMOKE),
        "--set",
        "schedules.training_cron=15 4 * * 2",
        "--set",
        "schedules.monitoring_cron=30 5 * * *",
        "--set",
        "schedules.timezone=Europe/Berlin",
    )
    with stack.client() as c:
        train = c.read_deployment_by_name(TRAINING_DEPLOYMENT)
        mon = c.read_deployment_by_name(MONITORING_DEPLOYMENT)
        assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in train.schedules] == [
            ("15 4 * * 2", "Europe/Berlin", True)
        ]
        assert [(s.schedule.cron, s.active) for s in mon.schedules] == [("30 5 * * *", True)]
        # The UI form comes from the pydantic model.
        schema = train.parameter_openapi_schema
        assert schema["properties"]["config"]["$ref"] == "#/definitions/PipelineConfig"
        assert "PipelineConfig" in schema["definitions"] and "TrainingConfig" in schema["definitions"]
        assert train.parameters["config"]["name"] == "smoke"
        assert mon.parameters["batch"] == "next"

        autos = c.read_automations_by_name("ringflow-rerun-on-anomaly")
        assert len(autos) == 1
        a = autos[0]
        assert a.enabled and a.trigger.expect == {"ringflow.anomaly.detected"}
        assert a.trigger.match.root == {"prefect.resource.id": "ringflow.model.flights-delay"}
        assert a.trigger.threshold == 1
        # one run per cause per cooldown, whatever number of events arrives
        assert a.trigger.for_each == {"ringflow.anomaly.cause"} and a.trigger.within.total_seconds() == 24 * 3600
        [action] = a.actions
        assert action.type == "run-deployment" and action.deployment_id == train.id
        # declared with the deployment (DeploymentEventTrigger): owned by it, not kept by hand
        owned = c.read_resource_related_automations(f"prefect.deployment.{train.id}")
        assert a.id in {o.id for o in owned}
    # Restore the smoke schedules for the tests after this one.
    stack.cli("deploy", "--config", str(SMOKE))


def _drift(batch: str = "2013-07", message: str = "drift", severity: str = "warning") -> Anomaly:
    return Anomaly(
        type=AnomalyType.DATA_DRIFT, severity=Severity(severity), message=message, evidence={}, key={"batch": batch}
    )


def _anomaly_payload(
    anomaly_id: str | None,
    monitoring_run_id: str,
    *,
    batch: str = "2013-07",
    anomalies: list[Anomaly] | None = None,
    rerun: RerunRequest | None = None,
    links: dict[str, str] | None = None,
) -> dict:
    """An anomaly event's payload, built by the typed contract (monitoring/events.py) as the
    monitoring flow builds it: a payload the contract rejects cannot be sent."""
    return AnomalyEventPayload(
        anomaly_id=anomaly_id,
        monitoring_run_id=monitoring_run_id,
        model=ModelRef(name="flights-delay", version="3"),
        batch=batch,
        anomalies=anomalies or [],
        rerun=rerun,
        links=links or {},
    ).model_dump(mode="json")


SERVING = "Your deployments are being served"  # what prefect's serve() prints once its deployments are applied


def _emit_anomaly(stack, anomaly_id: str, payload: dict) -> None:
    """An anomaly event for the flights model, sent with Prefect's own CLI (as any emitter would)."""
    p = subprocess.run(
        [
            str(Path(sys.executable).with_name("prefect")),
            "event",
            "emit",
            "ringflow.anomaly.detected",
            "--resource-id",
            "ringflow.model.flights-delay",
            "-r",
            f"ringflow.anomaly.cause={anomaly_id}",
            "--payload",
            json.dumps(payload),
        ],
        env={**stack.env, "PREFECT_API_URL": stack.api},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr


def test_anomaly_event_starts_exactly_one_training_run(stack):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelled

    from ringflow.training.config import load_config

    cfg = load_config(SMOKE).model_dump(mode="json")
    cfg["training"]["epochs"] = 1
    # A source that does not exist: if the runner picks the run up, it fails at once (no training).
    cfg["data"]["source"] = str(stack.home / "no-such-batch.csv")
    anomaly_id = f"anomaly-{uuid.uuid4()}"
    payload = _anomaly_payload(
        anomaly_id,
        "monitoring-run-42",
        anomalies=[_drift(message="drift: 7/15 features")],
        rerun=RerunRequest(config=cfg, reason="drift: 7/15 features", overrides={"training.epochs": 1}),
    )
    _emit_anomaly(stack, anomaly_id, payload)

    def reruns(c):
        dep = c.read_deployment_by_name(TRAINING_DEPLOYMENT)
        runs = c.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))
        # The scheduler also pre-creates cron runs; those carry no anomaly id.
        return [r for r in runs if r.parameters.get("anomaly_id") == anomaly_id]

    with stack.client() as c:
        deadline = time.monotonic() + 60
        while not (found := reruns(c)) and time.monotonic() < deadline:
            time.sleep(1)
        assert found, "the automation created no training run within 60 s"
        time.sleep(5)  # a duplicate action would land within this window
        found = reruns(c)
        assert len(found) == 1, [r.name for r in found]
        run = found[0]
        # Template params rendered to real values: the config is a JSON object, not its repr.
        assert isinstance(run.parameters["config"], dict)
        assert run.parameters["config"]["training"]["epochs"] == 1
        assert run.parameters["reason"] == "drift: 7/15 features"
        assert run.parameters["parent_run_id"] == "monitoring-run-42"
        state = c.read_flow_run(run.id).state
        if state is None or state.type not in (StateType.COMPLETED, StateType.FAILED, StateType.CRASHED):
            c.set_flow_run_state(run.id, Cancelled(), force=True)  # keep the 2 cores for the other tests


def test_runs_say_whether_a_schedule_or_a_person_started_them(stack):
    from datetime import datetime, timedelta

    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.states import Scheduled

    with stack.client() as c:
        dep = c.read_deployment_by_name(TRAINING_DEPLOYMENT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the scheduler service creates the cron runs
            runs = c.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))
            auto = [r for r in runs if r.auto_scheduled]
            if auto:
                break
            time.sleep(2)
        assert auto, "the scheduler created no run for the weekly cron"
        assert {r.parameters["reason"] for r in auto} == {"scheduled"}
        # What the UI's Run button and `prefect deployment run` do; far in the future, so the
        # runner leaves it alone.
        manual = c.create_flow_run_from_deployment(
            dep.id, state=Scheduled(scheduled_time=datetime.now(UTC) + timedelta(days=300))
        )
        try:
            assert manual.parameters["reason"] == "manual"
            assert manual.parameters["config"]["name"] == "smoke"
        finally:
            c.delete_flow_run(manual.id)


def _wait_dead(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:  # nobody reaps it in a container
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.1)
    raise AssertionError(f"pid {pid} still alive after SIGKILL")


def _tagged(tag: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["environ"]):
        if (p.info.get("environ") or {}).get("RINGFLOW_STACK_SERVICE") == tag:
            out.append(p)
    return out


def test_kill_9_of_a_service_pid_is_caught_by_status_and_up(stack):
    rec = json.loads((stack.home / "stack" / "mlflow.pid").read_text())
    old_tree = _tagged(rec["tag"])
    assert len(old_tree) >= 3, "supervisor, mlflow server and its uvicorn in a child process"
    os.kill(rec["pid"], 9)  # the supervisor: nothing restarts its orphaned service
    _wait_dead(rec["pid"])
    # The orphaned server and uvicorn still serve the port: that is what status must not hide.
    assert httpx.get(stack.health("mlflow")).text == "OK"
    out = stack.cli("status").stdout
    assert "mlflow   stopped" in out and "leftover process(es) still running" in out, out

    out = stack.cli("up", "--config", str(SMOKE)).stdout
    assert "mlflow   its first process had died; stopped" in out, out
    assert "mlflow   started" in out and "prefect  already running" in out, out
    gone, alive = psutil.wait_procs(old_tree, timeout=10)
    assert not alive, [p.pid for p in alive]
    assert httpx.get(stack.health("mlflow")).text == "OK"
    new = json.loads((stack.home / "stack" / "mlflow.pid").read_text())
    assert new["pid"] != rec["pid"] and _tagged(new["tag"])
    assert "mlflow   running" in stack.cli("status").stdout


def test_the_runner_killed_by_pid_comes_back_and_runs_a_triggered_run(stack):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.objects import StateType

    from ringflow.training.config import load_config

    state_file = stack.home / "stack" / "serve.state.json"
    serve_log = stack.home / "stack" / "serve.log"
    before = json.loads(state_file.read_text())
    served_before = serve_log.read_text().count(SERVING)
    os.kill(before["child_pid"], 9)  # the serve process itself, not its supervisor
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        now = json.loads(state_file.read_text())
        if now["child_pid"] != before["child_pid"] and now["state"] == "running":
            break
        time.sleep(0.5)
    assert now["restarts"] == before["restarts"] + 1, now
    out = stack.cli("status").stdout
    assert f"(supervised: service pid {now['child_pid']}, {now['restarts']} restarts)" in out, out
    # The restarted runner re-applies its deployments, and Prefect's apply() deletes and re-creates
    # the rerun trigger's automation: an event sent before that is done finds none (closing note).
    # So the event goes once the runner says it is serving again.
    while time.monotonic() < deadline and serve_log.read_text().count(SERVING) == served_before:
        time.sleep(0.5)
    assert serve_log.read_text().count(SERVING) == served_before + 1, "the restarted runner never started serving"

    # An automation-triggered run: the restarted runner picks it up and executes it (the data
    # source does not exist, so it fails at once: what counts is that it ran).
    cfg = load_config(SMOKE).model_dump(mode="json")
    cfg["data"]["source"] = str(stack.home / "no-such-batch.csv")
    anomaly_id = f"anomaly-{uuid.uuid4()}"
    payload = _anomaly_payload(anomaly_id, "m-1", rerun=RerunRequest(config=cfg, reason="after a runner restart"))
    _emit_anomaly(stack, anomaly_id, payload)
    with stack.client() as c:
        dep = c.read_deployment_by_name(TRAINING_DEPLOYMENT)
        deadline = time.monotonic() + 180
        run = None
        while time.monotonic() < deadline:
            runs = c.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))
            run = next((r for r in runs if r.parameters.get("anomaly_id") == anomaly_id), None)
            if run is not None and run.state_type in (StateType.FAILED, StateType.COMPLETED, StateType.CRASHED):
                break
            time.sleep(1)
        assert run is not None, "the automation created no run"
        assert run.state_type == StateType.FAILED, run.state  # executed by the restarted runner


def test_a_storm_of_anomaly_events_for_one_cause_starts_one_rerun(stack):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelled

    from ringflow.training.config import load_config

    cfg = load_config(SMOKE).model_dump(mode="json")
    cfg["data"]["source"] = str(stack.home / "no-such-batch.csv")  # a run that is started fails at once
    cause = f"data_drift-{uuid.uuid4().hex[:8]}"
    code = (
        "import json, sys, time\n"
        "from prefect.events import emit_event\n"
        "payload = json.loads(sys.argv[1]); t0 = time.monotonic()\n"
        "for i in range(50):\n"
        "    emit_event('ringflow.anomaly.detected', resource={'prefect.resource.id': 'ringflow.model.flights-delay',\n"
        "               'ringflow.anomaly.cause': sys.argv[2]}, payload={**payload, 'anomaly_id': f'storm-{i}'})\n"
        "print(time.monotonic() - t0)\n"
    )
    payload = _anomaly_payload(None, "m-storm", rerun=RerunRequest(config=cfg, reason="storm"))
    p = subprocess.run(
        [sys.executable, "-c", code, json.dumps(payload), cause],
        capture_output=True,
        text=True,
        timeout=120,
        env={**stack.env, "PREFECT_API_URL": stack.api},
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert float(p.stdout.strip().splitlines()[-1]) < 10  # the storm: 50 events within 10 s

    def storm_runs(c):
        dep = c.read_deployment_by_name(TRAINING_DEPLOYMENT)
        runs = c.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))
        return [r for r in runs if str(r.parameters.get("anomaly_id", "")).startswith("storm-")]

    with stack.client() as c:
        deadline = time.monotonic() + 60
        while not (found := storm_runs(c)) and time.monotonic() < deadline:
            time.sleep(1)
        time.sleep(10)  # every event has been evaluated by now; more runs would show up here
        found = storm_runs(c)
        assert len(found) == 1, sorted(r.parameters["anomaly_id"] for r in found)
        for r in found:
            if c.read_flow_run(r.id).state_type not in (StateType.COMPLETED, StateType.FAILED, StateType.CRASHED):
                c.set_flow_run_state(r.id, Cancelled(), force=True)


def test_each_server_killed_by_pid_is_restarted_by_its_supervisor(stack):
    # kill -9 of the server itself (not its supervisor): back without `ringflow up`, on its port
    def ok(url: str) -> bool:
        try:
            return httpx.get(url, timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    health = {name: stack.health(name) for name in ("mlflow", "prefect", "evidently")}
    for name, url in health.items():
        state_file = stack.home / "stack" / f"{name}.state.json"
        supervisor = stack.pids()[name]
        before = json.loads(state_file.read_text())
        assert before["state"] == "running" and before["supervisor_pid"] == supervisor, before
        child = psutil.Process(before["child_pid"])
        old_tree = [child, *child.children(recursive=True)]  # MLflow: its uvicorn holds the port
        os.kill(child.pid, 9)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            now = json.loads(state_file.read_text())
            if now["child_pid"] != before["child_pid"] and now["state"] == "running":
                break
            time.sleep(0.5)
        assert now["child_pid"] != before["child_pid"] and now["state"] == "running", (name, now)
        assert now["restarts"] == before["restarts"] + 1 and now["last_exit"] == -9, (name, now)
        for p in old_tree:  # the supervisor stopped what the killed server left
            _wait_dead(p.pid)
        deadline = time.monotonic() + 180
        while not ok(url) and time.monotonic() < deadline:
            time.sleep(1)
        assert ok(url), f"{name} does not answer {url} after its restart"
        assert stack.pids()[name] == supervisor  # the same supervisor; `up` was not needed
        out = stack.cli("status").stdout
        assert (
            f"{name:8s} running pid {supervisor} (supervised: service pid {now['child_pid']}, "
            f"{now['restarts']} restarts)  healthy"
        ) in out, out


# --------------------------------------------------------------------------- notifications


class _Receiver:
    """A webhook receiver on 127.0.0.1 (http.server in a thread): every POST body, parsed."""

    def __init__(self):
        import http.server
        import threading

        received = self.received = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                received.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def of_kind(self, kind: str) -> list[dict]:
        return [m for m in self.received if m.get("kind") == kind]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _emit(stack: Stack, event: str, labels: dict[str, str], payload: dict) -> None:
    code = (
        "import json, sys\nfrom prefect.events import emit_event\n"
        "emit_event(sys.argv[1], resource=json.loads(sys.argv[2]), payload=json.loads(sys.argv[3]))\n"
    )
    resource = {"prefect.resource.id": "ringflow.model.flights-delay", **labels}
    p = subprocess.run(
        [sys.executable, "-c", code, event, json.dumps(resource), json.dumps(payload)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**stack.env, "PREFECT_API_URL": stack.api},
    )
    assert p.returncode == 0, p.stderr[-2000:]


def test_a_critical_anomaly_and_a_failed_training_run_each_notify_once(stack):
    from ringflow.training.config import load_config

    receiver = _Receiver()
    try:
        out = stack.cli("deploy", "--config", str(SMOKE), env={"RINGFLOW_NOTIFY_WEBHOOK_URL": receiver.url}).stdout
        assert "ringflow-notify-critical-anomaly" in out and "ringflow-notify-training-failed" in out, out

        def payload(batch: str, anomalies: list[Anomaly]) -> dict:
            return _anomaly_payload(
                anomalies[0].id if anomalies else None,
                f"mon-{batch}",
                batch=batch,
                anomalies=anomalies,
                links={
                    "mlflow_run": f"{stack.mlflow}/#/experiments/1/runs/mon-{batch}",
                    "prefect_flow_run": f"http://127.0.0.1:{stack.prefect_port}/runs/flow-run/x",
                },
            )

        # a healthy batch (no anomaly) and a warning: the report events a monitoring run emits, no message
        _emit(stack, "ringflow.anomaly.reported", {}, payload("2013-05", []))
        _emit(
            stack,
            "ringflow.anomaly.reported",
            {"ringflow.anomaly.severity": "warning"},
            payload("2013-06", [_drift("2013-06", "drift 0.4")]),
        )
        # a critical one (reported, so no rerun starts): exactly one message with evidence and links
        critical = Anomaly(
            type=AnomalyType.PERFORMANCE_DROP,
            severity=Severity.CRITICAL,
            message="AUC fell by 0.09",
            evidence={"auc": 0.61, "champion_auc": 0.70},
            key={"batch": "2013-07"},
        )
        _emit(
            stack,
            "ringflow.anomaly.reported",
            {"ringflow.anomaly.severity": "critical"},
            payload("2013-07", [critical]),
        )

        # a failed training run: the serve process runs it, it fails at once on a missing source
        cfg = load_config(SMOKE).model_dump(mode="json")
        cfg["data"]["source"] = str(stack.home / "no-such-source.csv")
        with stack.client() as c:
            dep = c.read_deployment_by_name(TRAINING_DEPLOYMENT)
            fr = c.create_flow_run_from_deployment(dep.id, parameters={"config": cfg, "reason": "notify-test"})
            deadline = time.monotonic() + 180
            while not (state := c.read_flow_run(fr.id).state).is_final() and time.monotonic() < deadline:
                time.sleep(1)
            # Failed (the flow's own error), not Crashed (the runner could not even load the flow)
            assert state.is_failed(), state

        deadline = time.monotonic() + 90
        while (
            not receiver.of_kind("critical-anomaly") or not receiver.of_kind("training-failed")
        ) and time.monotonic() < deadline:
            time.sleep(1)
        time.sleep(10)  # a second message for either, or one for the healthy batch, would land by now
        [anomaly] = receiver.of_kind("critical-anomaly")
        assert anomaly["batch"] == "2013-07" and anomaly["anomalies"] == [critical.model_dump(mode="json")]
        assert anomaly["mlflow_run"] == f"{stack.mlflow}/#/experiments/1/runs/mon-2013-07"
        assert anomaly["prefect_flow_run"].endswith("/runs/flow-run/x")
        assert "AUC fell by 0.09" in anomaly["text"]
        [failed] = receiver.of_kind("training-failed")
        assert failed["flow_run_id"] == str(fr.id) and failed["reason"] == "notify-test"
        assert failed["prefect_flow_run"].endswith(f"/runs/flow-run/{fr.id}"), failed
        assert failed["state"] == "Failed" and "no-such-source.csv" in failed["message"], failed
        assert len(receiver.received) == 2, receiver.received  # nothing for the healthy batch or the warning
    finally:
        stack.cli("deploy", "--config", str(SMOKE))  # no URL: the notification automations go
        receiver.close()
    with stack.client() as c:
        assert not c.read_automations_by_name("ringflow-notify-critical-anomaly")


# --------------------------------------------------------------------------- work pools


def test_deploy_to_work_pools_of_two_types_with_job_variables(stack):
    """`ringflow deploy --work-pool`: the same deployments (schedules, concurrency limit, rerun
    trigger) on a pool whose worker runs them, with the job variables given on the command line."""
    from prefect.client.schemas.actions import WorkPoolCreate

    k8s_template = {  # the shape of a kubernetes pool's base job template (variables + job config)
        "job_configuration": {"image": "{{ image }}", "env": "{{ env }}", "namespace": "{{ namespace }}"},
        "variables": {
            "type": "object",
            "properties": {
                "image": {"type": "string", "default": "prefecthq/prefect:3-latest"},
                "env": {"type": "object", "additionalProperties": {"type": "string"}},
                "namespace": {"type": "string", "default": "default"},
            },
        },
    }
    with stack.client() as c:
        c.create_work_pool(WorkPoolCreate(name="team-process", type="process"), overwrite=True)
        c.create_work_pool(
            WorkPoolCreate(name="team-k8s", type="kubernetes", base_job_template=k8s_template), overwrite=True
        )
    try:
        missing = stack.cli("deploy", "--config", str(SMOKE), "--work-pool", "no-such-pool", check=False)
        assert missing.returncode == 2 and "work pool 'no-such-pool' does not exist" in missing.stderr, missing.stderr
        bad = stack.cli(
            "deploy", "--config", str(SMOKE), "--work-pool", "team-process", "--job-variable", "env", check=False
        )
        assert bad.returncode == 2 and "--job-variable 'env': expected key=value" in bad.stderr, bad.stderr

        stack.cli(
            "deploy",
            "--config",
            str(SMOKE),
            "--work-pool",
            "team-process",
            "--job-variable",
            "env.MLFLOW_TRACKING_URI=http://mlflow:5000",
            "-jv",
            "stream_output=false",
        )
        with stack.client() as c:
            deps = {n: c.read_deployment_by_name(n) for n in (TRAINING_DEPLOYMENT, MONITORING_DEPLOYMENT)}
            for name, d in deps.items():
                assert d.work_pool_name == "team-process", name
                assert d.job_variables == {
                    "env": {"MLFLOW_TRACKING_URI": "http://mlflow:5000"},
                    "stream_output": False,
                }, d.job_variables
                assert d.global_concurrency_limit.limit == 1 and [s.active for s in d.schedules] == [True], name
                # the worker imports the flow by module path, in the repository the pull step names
                assert d.entrypoint in (
                    "ringflow.flows.training_pipeline.training_pipeline",
                    "ringflow.flows.monitoring.monitoring_flow",
                )
                assert d.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
            train = deps[TRAINING_DEPLOYMENT]
            assert [s.schedule.cron for s in train.schedules] == ["0 3 * * 1"]
            [a] = c.read_automations_by_name("ringflow-rerun-on-anomaly")  # the trigger, carried by the deployment
            assert a.actions[0].deployment_id == train.id
            assert a.id in {o.id for o in c.read_resource_related_automations(f"prefect.deployment.{train.id}")}

        stack.cli(
            "deploy",
            "--config",
            str(SMOKE),
            "--work-pool",
            "team-k8s",
            "-jv",
            "image=ringflow:latest",
            "-jv",
            'env={"RINGFLOW_HOME": "/data/ringflow"}',
        )
        with stack.client() as c:
            train = c.read_deployment_by_name(TRAINING_DEPLOYMENT)
            assert train.work_pool_name == "team-k8s"
            # exactly what this deploy gave: nothing left over from the other pool's
            assert train.job_variables == {"image": "ringflow:latest", "env": {"RINGFLOW_HOME": "/data/ringflow"}}
            assert len(c.read_automations_by_name("ringflow-rerun-on-anomaly")) == 1
    finally:
        # back to the serve process (an update cannot take a deployment off its pool): the down/up
        # test after this one restarts the runner on the recreated deployments
        with stack.client() as c:
            for name in (TRAINING_DEPLOYMENT, MONITORING_DEPLOYMENT):
                c.delete_deployment(c.read_deployment_by_name(name).id)
        stack.cli("deploy", "--config", str(SMOKE))


# --------------------------------------------------------------------------- down / restart


@pytest.mark.horovod  # `ringflow run` with the stack down
def test_down_stops_everything_and_state_survives_a_restart(stack):
    family = stack.family()
    assert len(family) >= 3
    # down also stops what a dead first process left behind (MLflow's uvicorn on its port)
    os.kill(stack.pids()["mlflow"], 9)
    out = stack.cli("down").stdout
    for name in ("prefect", "mlflow", "evidently", "serve"):
        assert f"{name:8s} stopped" in out, out
    assert "mlflow   stopped 1 leftover process" in out or "mlflow   stopped 2 leftover process" in out, out
    gone, alive = psutil.wait_procs(family, timeout=5)
    assert not alive, [p.pid for p in alive]
    # supervisors, servers and workers, also those restarted by a supervisor (tests above)
    assert not _tagged_in_home(stack.home)
    assert not (stack.home / "stack" / "env").exists()
    assert stack.pids() == {}
    listening = {c.laddr.port for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
    assert not {stack.prefect_port, stack.mlflow_port} & listening  # nobody listens on the ports
    assert "not running" in stack.cli("down").stdout  # a second down stops nothing

    # With the stack down, a run goes to the same store on its own (embedded SQLite) and its
    # artifacts land where the server serves them from (not in an mlflow-artifacts: location
    # that only a running server could resolve).
    run = stack.cli("run", "--config", str(SMOKE), "--set", "training.epochs=1", timeout=600)
    assert "finished" in run.stdout, run.stdout[-3000:]
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{stack.home / 'mlflow.db'}")
    exp = client.get_experiment_by_name("ringflow")
    assert exp.artifact_location == (stack.home / "artifacts" / "ringflow").as_uri()
    [latest] = client.search_runs(
        [exp.experiment_id], "tags.`ringflow.kind` = 'training'", order_by=["attribute.start_time DESC"], max_results=1
    )
    assert latest.info.status == "FINISHED"
    assert client.list_artifacts(latest.info.run_id, artifacts.TRAINING_DIR)

    # Restart without the runner: deployments and automation come from the persisted database.
    _start(stack, "--no-serve")
    with stack.client() as c:
        assert c.read_deployment_by_name(TRAINING_DEPLOYMENT).schedules
        assert len(c.read_automations_by_name("ringflow-rerun-on-anomaly")) == 1
    assert set(stack.pids()) == {"prefect", "mlflow", "evidently"}


def test_up_refuses_a_port_it_does_not_own(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        s = Stack(tmp_path / "home")
        s.env["RINGFLOW_PREFECT_PORT"] = str(busy.getsockname()[1])
        try:
            p = s.cli("up", "--config", str(SMOKE), check=False, timeout=60)
        finally:
            _stop(s)
    assert p.returncode != 0
    assert "in use by a process ringflow did not start" in p.stderr


def test_a_failed_up_stops_what_it_started(tmp_path):
    # MLflow's port is taken: prefect starts first, and must not be left running alone.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        s = Stack(tmp_path / "home")
        s.env["RINGFLOW_MLFLOW_PORT"] = str(busy.getsockname()[1])
        try:
            p = s.cli("up", "--config", str(SMOKE), "--no-serve", check=False, timeout=300)
            assert p.returncode != 0
            assert "in use by a process ringflow did not start" in p.stderr, p.stderr
            assert "stopped what this `up` had started: prefect" in p.stderr, p.stderr
            assert s.pids() == {}
            assert not _tagged_in_home(s.home)
            assert _port_free(s.prefect_port)
        finally:
            _stop(s)


def _tagged_in_home(home: Path) -> list[int]:
    out = []
    for p in psutil.process_iter(["environ"]):
        env = p.info.get("environ") or {}
        if env.get("RINGFLOW_STACK_SERVICE") and env.get("RINGFLOW_HOME") == str(home):
            out.append(p.pid)
    return out


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# --------------------------------------------------------------------------- auth


@pytest.fixture(scope="module")
def auth_stack(tmp_path_factory):
    pytest.importorskip("flask_wtf", reason="MLflow basic-auth needs mlflow[auth] (Flask-WTF<2)")
    prefect_secret = f"ops:{uuid.uuid4().hex}"
    mlflow_password = uuid.uuid4().hex
    s = Stack(
        tmp_path_factory.mktemp("auth") / "home",
        {"PREFECT_SERVER_API_AUTH_STRING": prefect_secret, "MLFLOW_AUTH_ADMIN_PASSWORD": mlflow_password},
    )
    s.prefect_secret, s.mlflow_password = prefect_secret, mlflow_password
    _start(s)
    yield s
    _stop(s)


def test_auth_refuses_anonymous_requests_to_both_servers(auth_stack):
    s = auth_stack
    r = httpx.post(f"{s.api}/deployments/filter", json={})
    assert r.status_code == 401
    r = httpx.post(f"{s.api}/deployments/filter", json={}, auth=parse_auth_string(s.prefect_secret))
    assert r.status_code == 200 and len(r.json()) == 2  # the serve process authenticated and deployed
    search = f"{s.mlflow}/api/2.0/mlflow/experiments/search?max_results=5"
    assert httpx.get(search).status_code == 401
    assert httpx.get(search, auth=("admin", "wrong")).status_code == 401
    assert httpx.get(search, auth=("admin", s.mlflow_password)).status_code == 200


def test_auth_clients_work_with_env_credentials_and_secrets_stay_out_of_files(auth_stack):
    s = auth_stack
    # The CLI as a client: only the client-side variables, found through the env file.
    client_env = {
        "PREFECT_API_AUTH_STRING": s.prefect_secret,
        "PREFECT_SERVER_API_AUTH_STRING": "",
        "MLFLOW_AUTH_ADMIN_PASSWORD": "",
    }
    out = s.cli("status", env=client_env).stdout
    assert "deployment training-pipeline/training-pipeline: READY" in out, out
    anon = s.cli(
        "deploy",
        "--config",
        str(SMOKE),
        check=False,
        env={"PREFECT_SERVER_API_AUTH_STRING": "", "MLFLOW_AUTH_ADMIN_PASSWORD": ""},
    )
    assert anon.returncode != 0 and "401" in (anon.stdout + anon.stderr)

    # MLflow tracking with MLFLOW_TRACKING_USERNAME/PASSWORD, in a clean process.
    code = (
        "import mlflow\n"
        "mlflow.set_experiment('auth-check')\n"
        "with mlflow.start_run() as r: mlflow.log_metric('x', 1.0)\n"
        "print(mlflow.get_run(r.info.run_id).data.metrics['x'])\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={
            **s.env,
            "MLFLOW_TRACKING_URI": s.mlflow,
            "MLFLOW_TRACKING_USERNAME": "admin",
            "MLFLOW_TRACKING_PASSWORD": s.mlflow_password,
        },
    )
    assert p.returncode == 0 and p.stdout.strip().splitlines()[-1] == "1.0", p.stderr[-2000:]

    stack_dir = s.home / "stack"
    secrets = [parse_auth_string(s.prefect_secret)[1], s.mlflow_password]
    for f in [stack_dir / "env", *stack_dir.glob("*.log"), *stack_dir.glob("*.pid"), stack_dir / "mlflow-auth.ini"]:
        text = f.read_text(errors="replace")
        assert not any(x in text for x in secrets), f"a credential leaked into {f}"
    assert (stack_dir / "mlflow-flask-secret").stat().st_mode & 0o077 == 0


def test_status_without_client_credentials_names_the_variable(auth_stack):
    p = auth_stack.cli(
        "status", check=False, env={"PREFECT_SERVER_API_AUTH_STRING": "", "MLFLOW_AUTH_ADMIN_PASSWORD": ""}
    )
    assert p.returncode == 1
    assert "requires a login: set PREFECT_API_AUTH_STRING=user:password" in p.stderr, p.stderr
    assert "Traceback" not in p.stdout + p.stderr
    wrong = auth_stack.cli(
        "status",
        check=False,
        env={
            "PREFECT_SERVER_API_AUTH_STRING": "",
            "MLFLOW_AUTH_ADMIN_PASSWORD": "",
            "PREFECT_API_AUTH_STRING": "ops:wrong",
        },
    )
    assert wrong.returncode == 1 and "refused PREFECT_API_AUTH_STRING" in wrong.stderr, wrong.stderr


def test_a_changed_mlflow_admin_password_is_refused_or_rotated(auth_stack):
    s = auth_stack
    new_password = uuid.uuid4().hex
    before = s.pids()
    p = s.cli("up", "--config", str(SMOKE), check=False, env={"MLFLOW_AUTH_ADMIN_PASSWORD": new_password})
    assert p.returncode != 0
    assert "MLFLOW_AUTH_ADMIN_PASSWORD is not the password of MLflow admin 'admin'" in p.stderr, p.stderr
    assert "--rotate-mlflow-admin-password" in p.stderr
    assert s.pids() == before  # nothing stopped or started

    out = s.cli(
        "up", "--config", str(SMOKE), "--rotate-mlflow-admin-password", env={"MLFLOW_AUTH_ADMIN_PASSWORD": new_password}
    ).stdout
    assert "password changed" in out, out
    search = f"{s.mlflow}/api/2.0/mlflow/experiments/search?max_results=5"
    assert httpx.get(search, auth=("admin", new_password)).status_code == 200
    assert httpx.get(search, auth=("admin", s.mlflow_password)).status_code == 401
    after = s.pids()
    assert after["mlflow"] == before["mlflow"] and after["serve"] != before["serve"]  # runner has the new one
    s.env["MLFLOW_AUTH_ADMIN_PASSWORD"] = s.mlflow_password = new_password

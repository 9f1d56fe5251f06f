"""``ringflow cluster``: real network namespaces, real sshd, real horovodrun across hosts.

Needs root and network namespaces (CI runs as root); skips with the reason elsewhere. Every
test builds its cluster under its own RINGFLOW_HOME, so its namespaces, links and subnet are its
own, and checks that ``cluster down`` leaves ``ip netns list``, ``ip link`` and the process table
as they were.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import re
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from ringflow.infra.hosts import CLUSTER_RANGE, link_names, load_state, netns_names, netns_pids, prefix_for

ROOT = Path(__file__).resolve().parents[1]
RINGFLOW = str(Path(sys.executable).with_name("ringflow"))

pytestmark = pytest.mark.cluster


def _namespaces_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth links, /etc/netns)"
    if not os.access("/usr/sbin/sshd", os.X_OK):
        return "needs Debian's openssh-server (/usr/sbin/sshd; `make install` installs it)"
    probe = f"rfprobe{os.getpid()}"
    p = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if p.returncode != 0:
        return f"cannot create a network namespace here: {p.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


_reason = _namespaces_unavailable()
if _reason:
    pytestmark = [pytest.mark.cluster, pytest.mark.skip(reason=_reason)]


def cli(home: Path, *args: str, env: dict[str, str] | None = None, check: bool = True, timeout: float = 600):
    e = {**os.environ, "RINGFLOW_HOME": str(home), **(env or {})}
    for k in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL"):
        e.pop(k, None)
    p = subprocess.run([RINGFLOW, "cluster", *args], cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"ringflow cluster {' '.join(args)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


def machine_snapshot() -> tuple[set[str], set[str]]:
    return set(netns_names()), set(link_names())


def processes_mentioning(text: str) -> list[str]:
    """Live processes whose command line mentions ``text`` (the cluster's home), except this one."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmd and state != "Z":
            found.append(f"{d.name}: {cmd[:200]}")
    return found


def assert_clean(home: Path, before: tuple[set[str], set[str]]) -> None:
    after = machine_snapshot()
    assert after == before, f"netns/links differ after down: +{after[0] - before[0]} {after[1] - before[1]}"
    prefix = prefix_for(home)
    assert not any(n.startswith(prefix) for n in os.listdir("/etc/netns")) if os.path.isdir("/etc/netns") else True
    assert processes_mentioning(str(home)) == []


@pytest.fixture
def cluster_home(tmp_path):
    home = tmp_path / "ringflow-home"
    home.mkdir()
    before = machine_snapshot()
    yield home, before
    cli(home, "down", check=False)  # a failing test still removes its cluster


def test_up_status_down_leaves_the_machine_as_before(cluster_home, tmp_path):
    home, before = cluster_home
    root_ssh_existed = Path("/root/.ssh").exists()

    out = cli(home, "up", "--hosts", "3", "--no-stack").stdout
    state = load_state(home)
    assert [h.name for h in state.hosts] == ["h0", "h1", "h2"]
    for h in state.hosts:
        assert ipaddress.ip_address(h.address) in CLUSTER_RANGE  # never a private or public address
        assert re.search(rf"^{h.name}\s+{re.escape(h.address)}\s+{h.netns}", out, re.M), out
        assert h.netns in netns_names()
    sshd = {k: r.pid for k, r in state.processes.items()}
    assert set(sshd) == {"h1/sshd", "h2/sshd"}

    # idempotent: a second up starts nothing and reports the same hosts
    cli(home, "up", "--hosts", "3", "--no-stack")
    assert {k: r.pid for k, r in load_state(home).processes.items()} == sshd
    # a different size is refused, naming what exists
    p = cli(home, "up", "--hosts", "4", "--no-stack", check=False)
    assert p.returncode == 1 and "a cluster of 3 hosts exists" in p.stderr

    # a host is a host: its own hostname, its own address, passwordless ssh with the cluster's key
    h1 = state.host("h1")
    ssh = subprocess.run(
        ["ip", "netns", "exec", h1.netns, "ssh", "h2", "hostname; hostname -i; ip -4 -o addr show eth0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ssh.returncode == 0, ssh.stderr
    lines = ssh.stdout.splitlines()
    assert lines[0] == "h2" and lines[1].strip() == state.host("h2").address
    assert Path("/root/.ssh").exists() == root_ssh_existed  # root's ~/.ssh untouched

    status = cli(home, "status").stdout
    assert "sshd running" in status and "h2" in status

    # a second cluster (another RINGFLOW_HOME) gets its own names and subnet; removing it leaves ours
    other = tmp_path / "other-home"
    other.mkdir()
    try:
        cli(other, "up", "--hosts", "2", "--no-stack")
        o = load_state(other)
        assert o.prefix != state.prefix and o.subnet != state.subnet
    finally:
        cli(other, "down")
    assert all(h.netns in netns_names() for h in state.hosts)
    assert all(pid in netns_pids(state.host(k.split("/")[0]).netns) for k, pid in sshd.items())

    cli(home, "down")
    assert_clean(home, before)
    assert cli(home, "status", check=False).returncode == 1


def test_failed_up_removes_what_it_made(cluster_home):
    home, before = cluster_home
    p = cli(home, "up", "--hosts", "3", "--no-stack", env={"RINGFLOW_CLUSTER_SSHD": "/bin/false"}, check=False)
    assert p.returncode == 1
    assert "sshd on h1" in p.stderr and "exited during start-up" in p.stderr, p.stderr
    assert_clean(home, before)
    assert "nothing to remove" in cli(home, "down").stdout


# --------------------------------------------------------------------------- the pipeline on the cluster


SECRET_ENV = {
    # random values that cannot appear on a command line by chance; the stack runs with auth on
    "RINGFLOW_DATA_KEY": base64.b64encode(secrets.token_bytes(32)).decode(),
    "PREFECT_SERVER_API_AUTH_STRING": f"ringflow:pf-{secrets.token_hex(12)}",
    "MLFLOW_AUTH_ADMIN_PASSWORD": f"mf-{secrets.token_hex(12)}",
}
SECRET_ENV["PREFECT_API_AUTH_STRING"] = SECRET_ENV["PREFECT_SERVER_API_AUTH_STRING"]
SECRET_ENV["MLFLOW_TRACKING_USERNAME"] = "admin"
SECRET_ENV["MLFLOW_TRACKING_PASSWORD"] = SECRET_ENV["MLFLOW_AUTH_ADMIN_PASSWORD"]
SECRET_VALUES = [SECRET_ENV[k] for k in ("RINGFLOW_DATA_KEY", "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_AUTH_STRING")]


class CmdlineSampler(threading.Thread):
    """Reads every process's /proc/<pid>/cmdline (all namespaces share the process table) until
    stopped: which ones held a secret value, and which training ranks it saw on which host."""

    def __init__(self, netns_of_host: dict[str, str]):
        super().__init__(daemon=True)
        self.inode_to_host = {}
        for host, ns in netns_of_host.items():
            self.inode_to_host[os.stat(f"/run/netns/{ns}").st_ino] = host
        self.leaks: list[str] = []
        self.rank_hosts: set[str] = set()
        self.samples = 0
        self._done = threading.Event()

    def run(self):
        needles = [v.encode() for v in SECRET_VALUES]
        while not self._done.is_set():
            for d in Path("/proc").iterdir():
                if not d.name.isdigit():
                    continue
                try:
                    cmd = (d / "cmdline").read_bytes()
                except OSError:
                    continue
                if any(n in cmd for n in needles):
                    shown = cmd.replace(bytes(1), b" ")[:300]
                    self.leaks.append(f"{d.name}: {shown!r}")
                # a rank is `python -m ringflow.training.train ...` (its --config-json names horovodrun too)
                if cmd.split(bytes(1))[1:3] == [b"-m", b"ringflow.training.train"]:
                    try:
                        host = self.inode_to_host.get(os.stat(d / "ns" / "net").st_ino)
                    except OSError:
                        continue
                    if host:
                        self.rank_hosts.add(host)
            self.samples += 1
            time.sleep(0.1)

    def stop(self):
        self._done.set()
        self.join(10)


@pytest.fixture(scope="module")
def stack_cluster(tmp_path_factory):
    """A 3-host cluster with the stack (auth on) on h0 and the worker on h1, shared by the tests below."""
    home = tmp_path_factory.mktemp("cluster") / "ringflow-home"
    home.mkdir()
    before = machine_snapshot()
    try:
        cli(home, "up", "--hosts", "3", "-c", "configs/smoke.yaml", env=SECRET_ENV)
        yield home, load_state(home), before
    finally:
        cli(home, "down", check=False)


def mlflow_run(state, run_id: str) -> dict:
    h0 = state.host("h0")
    r = httpx.get(
        f"http://{h0.address}:5000/api/2.0/mlflow/runs/get",
        params={"run_id": run_id},
        auth=("admin", SECRET_ENV["MLFLOW_AUTH_ADMIN_PASSWORD"]),
        timeout=10,
    )
    r.raise_for_status()
    return r.json()["run"]


@pytest.mark.slow
@pytest.mark.horovod
def test_cluster_run_trains_across_hosts_with_no_secret_on_any_command_line(stack_cluster):
    home, state, _ = stack_cluster
    out = cli(home, "status").stdout
    assert "prefect healthy" in out and "mlflow healthy" in out and "worker running" in out, out

    sampler = CmdlineSampler({h.name: h.netns for h in state.hosts})
    sampler.start()
    try:
        # rank 0 on h2, not on h1 where the worker launches horovodrun: the task must find its
        # outputs on the shared filesystem and rank 0 must reach MLflow at h0's address
        p = cli(
            home,
            "run",
            "-c",
            "configs/smoke.yaml",
            "--set",
            "training.horovod.hosts=h2:1,h1:1",
            "--set",
            "gate.baseline=none",
            env=SECRET_ENV,
            check=False,
        )
    finally:
        sampler.stop()
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    assert sampler.leaks == [], "secret values on a command line:\n" + "\n".join(sampler.leaks[:5])
    assert sampler.rank_hosts == {"h1", "h2"}, (
        f"sampled training ranks on {sampler.rank_hosts} ({sampler.samples} samples)"
    )

    h0 = state.host("h0").address
    assert "training pipeline 'smoke' finished" in p.stdout
    assert f"MLflow store   http://{h0}:5000" in p.stdout
    assert "-H h2:1,h1:1" in p.stdout and "--network-interface eth0" in p.stdout and "--ssh-identity-file" in p.stdout
    run_id = re.search(r"training run\s+([0-9a-f]{32})", p.stdout).group(1)

    summary = json.loads((home / "runs" / run_id / "summary.json").read_text())
    assert [r["host"] for r in sorted(summary["per_rank"], key=lambda r: r["rank"])] == ["h2", "h1"]
    assert summary["hosts"] == ["h1", "h2"]
    run = mlflow_run(state, run_id)
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["ringflow.hosts"] == "h1,h2"
    assert run["info"]["artifact_uri"].startswith("mlflow-artifacts:")  # served over HTTP by h0
    # the shards were encrypted and the remote ranks decrypted them (training finished)
    manifest = json.loads(Path(tags["manifest_path"]).read_text())
    assert manifest["encrypted"] is True
    assert not list((home / "runs" / run_id).glob(".secrets-*")), "the secrets file outlived the run"


def train_on_h1(home: Path, state, overrides: list[str], when, action) -> tuple[int, str]:
    """``ringflow train`` launched on h1 (as the worker's flow would) on the cluster run's shards;
    ``action()`` runs once when an output line matches the regex ``when``."""
    from ringflow.infra.cluster import client_env, cluster_overrides
    from ringflow.infra.hosts import host_argv

    manifest = next(home.glob("data/*/manifest.json"))
    argv = [RINGFLOW, "train", "--manifest", str(manifest), "-c", "configs/smoke.yaml"]
    for s in cluster_overrides(state) + overrides:
        argv += ["--set", s]
    env = {**os.environ, **SECRET_ENV, **client_env(state), "RINGFLOW_HOME": str(home)}
    p = subprocess.Popen(
        host_argv(state.host("h1"), argv),
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines, done = [], False
    for line in p.stdout:
        lines.append(line)
        if not done and re.search(when, line):
            action()
            done = True
    return p.wait(timeout=60), "".join(lines)


def kill_ranks_on(state, host: str) -> list[int]:
    pids = []
    for pid in netns_pids(state.host(host).netns):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"ringflow.training.train" in cmd:
            os.kill(pid, 9)
            pids.append(pid)
    assert pids, f"no training rank found on {host}"
    return pids


def ringflow_processes_on(state) -> list[str]:
    left = []
    for h in state.hosts:
        for pid in netns_pids(h.netns):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(bytes(1), b" ").decode(errors="replace")
            except OSError:
                continue
            if "ringflow.training.train" in cmd or "horovodrun" in cmd or "ringflow train" in cmd:
                left.append(f"{h.name} {pid}: {cmd[:150]}")
    return left


@pytest.mark.slow
@pytest.mark.horovod
def test_hostfile_from_a_node_list_places_the_ranks(stack_cluster):
    # A Slurm allocation's node list (`scontrol show hostnames > hosts`): bare names, one a line
    home, state, _ = stack_cluster
    if not list(home.glob("data/*/manifest.json")):  # run alone: shard first, on h1 as the worker would
        from ringflow.infra.cluster import client_env
        from ringflow.infra.hosts import host_argv

        env = {**os.environ, **SECRET_ENV, **client_env(state), "RINGFLOW_HOME": str(home)}
        p = subprocess.run(
            host_argv(state.host("h1"), [RINGFLOW, "shard", "-c", "configs/smoke.yaml"]),
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    hosts = home / "hosts"
    hosts.write_text("h2\nh1\n")
    rc, out = train_on_h1(
        home,
        state,
        ["training.horovod.hosts=", f"training.horovod.hostfile={hosts}"],
        when=r"^$never",
        action=lambda: None,
    )
    assert rc == 0, out[-5000:]
    run_dir = next(p for p in (home / "runs").iterdir() if (p / "hostfile").is_file())
    assert (run_dir / "hostfile").read_text() == "h2 slots=1\nh1 slots=1\n"
    assert f"--hostfile {run_dir / 'hostfile'}" in out and " -H " not in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [r["host"] for r in sorted(summary["per_rank"], key=lambda r: r["rank"])] == ["h2", "h1"]
    assert ringflow_processes_on(state) == []


@pytest.mark.slow
@pytest.mark.horovod
def test_elastic_training_goes_on_without_h2_and_h2_rejoins(stack_cluster):
    home, state, _ = stack_cluster
    rc, out = train_on_h1(
        home,
        state,
        [
            "training.epochs=40",
            "training.early_stopping_patience=40",
            "training.elastic.enabled=true",
            "training.elastic.min_np=1",
            "training.elastic.max_np=2",
            "training.elastic.blacklist_cooldown_s=[2,4]",
        ],
        when=r"epoch 3/40 \(size 2\)",
        action=lambda: kill_ranks_on(state, "h2"),
    )
    assert rc == 0, out[-5000:]
    sizes = re.findall(r"epoch (\d+)/40 \(size (\d)\)", out)
    seq = [int(s) for _, s in sizes]
    assert 1 in seq, f"never went on at size 1 after losing h2: {sizes}"
    assert 2 in seq[seq.index(1) :], f"h2 never rejoined: {sizes}"
    assert int(sizes[-1][0]) == 40  # finished every epoch, from the last commit on
    assert "elastic reset: now rank 0 of 1" in out
    assert ringflow_processes_on(state) == []


@pytest.mark.slow
@pytest.mark.horovod
def test_lost_host_without_elastic_fails_naming_host_and_rank(stack_cluster):
    home, state, _ = stack_cluster
    veth = f"{state.prefix}v2"  # h2's link on the bridge: down = the host is gone, also for the retry

    def lose_h2():
        kill_ranks_on(state, "h2")
        subprocess.run(["ip", "link", "set", veth, "down"], check=True)

    try:
        rc, out = train_on_h1(
            home,
            state,
            ["training.epochs=40", "training.early_stopping_patience=40"],
            when=r"epoch 3/40",
            action=lose_h2,
        )
    finally:
        subprocess.run(["ip", "link", "set", veth, "up"], check=False)
    assert rc == 1, out[-5000:]
    failed = [line for line in out.splitlines() if line.startswith("FAILED:")]
    assert failed and "rank 1" in failed[0] and "host h2" in failed[0], out[-3000:]
    assert ringflow_processes_on(state) == []


MONITOR_ON_THE_WORKER = """
import sys
from pathlib import Path

from ringflow.flows.deployments import follow_flow_run
from ringflow.infra.cluster import use_stack
from ringflow.infra.hosts import load_state

use_stack(load_state(Path(sys.argv[1])))
from prefect.deployments import run_deployment

fr = run_deployment(name="monitoring/monitoring", parameters={"batch": sys.argv[2], "trigger_rerun": False}, timeout=0)
fr = follow_flow_run(fr.id, timeout_s=1200)
print(f"flow run {fr.name} ended {fr.state.name}: {fr.state.message}")
sys.exit(0 if fr.state.is_completed() else 1)
"""


@pytest.mark.slow
@pytest.mark.horovod
def test_monitoring_on_the_worker_shows_in_the_evidently_ui_on_h0(stack_cluster):
    """The worker on h1 writes the snapshots and h0's ``evidently ui`` reads them: one workspace."""
    from ringflow.training.config import load_config

    home, state, _ = stack_cluster
    if not list(home.glob("runs/*/summary.json")):  # run alone: the champion comes from a cluster run
        cli(home, "run", "-c", "configs/smoke.yaml", "--set", "gate.baseline=none", env=SECRET_ENV)
    env = {**os.environ, **SECRET_ENV, "RINGFLOW_HOME": str(home)}
    for k in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "RINGFLOW_EVIDENTLY_WORKSPACE"):
        env.pop(k, None)
    # the monitoring deployment, run by the worker on h1 (as its schedule or the Prefect UI would)
    p = subprocess.run(
        [sys.executable, "-c", MONITOR_ON_THE_WORKER, str(home), "2013-03"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]

    ui = f"http://{state.host('h0').address}:8000"
    name = load_config(ROOT / "configs/smoke.yaml").registry.model_name
    projects = httpx.get(f"{ui}/api/projects", timeout=10).json()
    found = [pr for pr in projects if pr["name"] == name]
    assert found, f"no project {name!r} in the Evidently UI on h0: {[pr['name'] for pr in projects]}"
    snapshots = httpx.get(f"{ui}/api/projects/{found[0]['id']}/snapshots", timeout=10).json()
    # the batch's snapshots, stamped with its start (drift, and quality: 2013-03 is labelled)
    assert [s["timestamp"][:10] for s in snapshots].count("2013-03-01") == 2, snapshots
    status = cli(home, "status").stdout
    assert re.search(rf"^Evidently UI {re.escape(ui)}\s", status, re.M) and "evidently healthy" in status, status


def test_down_after_training_leaves_the_machine_as_before(stack_cluster):
    home, state, before = stack_cluster
    cli(home, "down")
    assert_clean(home, before)

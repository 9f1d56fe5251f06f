"""``ringflow cluster``: real network namespaces, real sshd, real horovodrun across hosts.

Needs root and network namespaces (CI runs as root); skips with the reason elsewhere. Every
test builds its cluster under its own RINGFLOW_HOME, so its namespaces, links and subnet are its
own, and checks that ``cluster down`` leaves ``ip netns list``, ``ip link`` and the process table
as they were.
"""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.cluster import CLUSTER_RANGE, link_names, load_state, netns_names, netns_pids, prefix_for

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
    ssh = subprocess.run(["ip", "netns", "exec", h1.netns, "ssh", "h2", "hostname; hostname -i; ip -4 -o addr show eth0"],
                         capture_output=True, text=True, timeout=60)
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

"""Several hosts on one machine: network namespaces with their own address, hostname, /etc and sshd.

``ringflow cluster up`` (infra/cluster.py, its command in flows/cli.py) builds, for ``--hosts N``:

- a bridge ``<prefix>br`` holding ``<subnet>.1`` in the root namespace (so this machine, its
  browser and the CLI reach every host) and, per host ``h<i>``, a network namespace
  ``<prefix>h<i>`` with a veth ``eth0`` at ``<subnet>.<10+i>``. The subnet is a free /24 of
  198.18.0.0/15 (RFC 2544, never a private or public range);
- per host, ``/etc/netns/<ns>/hosts`` (every host's name -> its address, so a host's own name
  resolves to its own address: Horovod's process-set context resolves the hostname, trap 2 in
  docs/cluster.md) and ``/etc/netns/<ns>/ssh/ssh_config`` (the cluster's key and known_hosts,
  so ssh never reads or writes root's ``~/.ssh``); ``ip netns exec`` mounts both over /etc;
- every process of a host runs in that namespace and in its own UTS namespace whose hostname is
  the host's name (``h1``), as on a real machine;
- ``h1..`` run ringflow's own sshd (config, keys and logs under ``$RINGFLOW_HOME/cluster``).

The prefix is derived from the cluster directory, so two clusters (a test's and a user's) never
share a name, and :func:`down` removes exactly the namespaces, links, /etc/netns entries and
processes carrying this prefix: also after an ``up`` that failed half way, whose state file may
be incomplete. The namespaces share the filesystem, as cluster hosts share an NFS mount:
``$RINGFLOW_HOME`` (data, run outputs) is the shared directory.

Plain Python, no Prefect: the stack, the worker and the deployments are composed in
``infra/cluster.py``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from ringflow.training.launch import start_ticks as _start_ticks

CLUSTER_RANGE = ipaddress.IPv4Network("198.18.0.0/15")
"""RFC 2544 benchmarking range: the only addresses cluster hosts may have."""
NETNS_ETC = Path("/etc/netns")
HOST_OFFSET = 10
"""h<i> gets <subnet>.<10+i>; .1 is the bridge in the root namespace."""
MAX_HOSTS = 16
BIN = Path(sys.executable).parent


class ClusterError(RuntimeError):
    """The cluster cannot be built, used or removed; the message says why and what to do."""


class ClusterSettings(BaseSettings):
    """Cluster knobs from the environment (all optional)."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    sshd: str = Field("/usr/sbin/sshd", alias="RINGFLOW_CLUSTER_SSHD")
    """The sshd binary (Debian's ``openssh-server``; ``make install`` installs it)."""
    startup_timeout_s: float = Field(240, alias="RINGFLOW_CLUSTER_STARTUP_TIMEOUT")
    """How long ``up`` waits for each host's services (sshd, stack, worker)."""
    stop_grace_s: float = Field(10, alias="RINGFLOW_CLUSTER_STOP_GRACE")


class Host(BaseModel):
    name: str
    """Hostname inside the host (``h0``, ``h1``, ...), resolvable on every host."""
    netns: str
    address: str
    roles: list[str]


class ProcessRecord(BaseModel):
    pid: int
    start_ticks: int | None
    argv: list[str]
    log: str


class ClusterState(BaseModel):
    """What ``up`` built (``$RINGFLOW_HOME/cluster/cluster.json``)."""

    prefix: str
    subnet: str
    bridge: str
    bridge_address: str
    hosts: list[Host]
    shared_home: str
    """``$RINGFLOW_HOME``: the filesystem every host shares (data, run outputs, secrets files)."""
    processes: dict[str, ProcessRecord] = {}
    """``<host>/<service>`` -> the process ``up`` started."""
    stack: bool = False
    """h0 runs the stack and h1 the worker (``up`` without ``--no-stack``)."""

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        raise ClusterError(f"no host {name!r} in cluster {self.prefix} (hosts: {[h.name for h in self.hosts]})")

    @property
    def training_hosts(self) -> list[Host]:
        return [h for h in self.hosts if "ranks" in h.roles]


# --------------------------------------------------------------------------- names and files


def cluster_dir(home: Path) -> Path:
    return home / "cluster"


def state_file(home: Path) -> Path:
    return cluster_dir(home) / "cluster.json"


def ssh_dir(home: Path) -> Path:
    return cluster_dir(home) / "ssh"


def identity_file(home: Path) -> Path:
    """The private key every host accepts (``training.horovod.ssh_identity_file``)."""
    return ssh_dir(home) / "id_ed25519"


def log_dir(home: Path) -> Path:
    return cluster_dir(home) / "logs"


def prefix_for(home: Path) -> str:
    """``rf`` + 4 hex digits of the cluster directory: short enough for interface names (15
    characters), distinct per RINGFLOW_HOME."""
    digest = hashlib.sha256(str(cluster_dir(home).resolve()).encode()).hexdigest()
    return f"rf{digest[:4]}"


def load_state(home: Path) -> ClusterState | None:
    path = state_file(home)
    if not path.is_file():
        return None
    try:
        return ClusterState.model_validate_json(path.read_text())
    except ValueError as e:
        raise ClusterError(f"{path} is not a valid cluster state ({e}); run `ringflow cluster down`") from None


def save_state(home: Path, state: ClusterState) -> None:
    path = state_file(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(state.model_dump_json(indent=2))
    os.replace(tmp, path)  # atomic: a crash leaves the old or the new state, never half of one


# --------------------------------------------------------------------------- shell helpers


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(list(cmd), capture_output=True, text=True)
    if check and p.returncode != 0:
        raise ClusterError(f"`{' '.join(cmd)}` failed ({p.returncode}): {p.stderr.strip() or p.stdout.strip()}")
    return p


def preflight(settings: ClusterSettings | None = None) -> None:
    """Refuse clearly where namespace hosts cannot be built."""
    settings = settings or ClusterSettings()
    if os.geteuid() != 0:
        raise ClusterError(
            "ringflow cluster needs root: it creates network namespaces, veth links and "
            "/etc/netns entries (run it as root, e.g. with sudo)"
        )
    for tool in ("ip", "unshare", "ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            raise ClusterError(f"`{tool}` not found: install iproute2, util-linux and openssh-client")
    if not os.access(settings.sshd, os.X_OK):
        raise ClusterError(
            f"sshd not found at {settings.sshd}: install Debian's openssh-server (`make install` "
            "does) or point RINGFLOW_CLUSTER_SSHD at it"
        )
    p = _run("ip", "netns", "list", check=False)
    if p.returncode != 0:
        raise ClusterError(f"`ip netns` does not work here ({p.stderr.strip()}): network namespaces are needed")


def netns_names() -> list[str]:
    out = _run("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def link_names() -> list[str]:
    out = _run("ip", "-o", "link", "show", check=False).stdout
    names = []
    for line in out.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.append(parts[1].strip().split("@")[0])
    return names


def _used_networks() -> list[ipaddress.IPv4Network]:
    out = _run("ip", "-4", "-o", "addr", "show", check=False).stdout
    nets = []
    for line in out.splitlines():
        f = line.split()
        if "inet" in f:
            nets.append(ipaddress.IPv4Interface(f[f.index("inet") + 1]).network)  # `ip -4`: IPv4 only
    return nets


def pick_subnet(prefix: str) -> ipaddress.IPv4Network:
    """A /24 of 198.18.0.0/15 that no interface of this machine uses, starting at one derived
    from the prefix (so a cluster usually gets the same subnet again)."""
    subnets = list(CLUSTER_RANGE.subnets(new_prefix=24))
    used = _used_networks()
    start = int(prefix[2:], 16) % len(subnets)
    for i in range(len(subnets)):
        net = subnets[(start + i) % len(subnets)]
        if not any(net.overlaps(u) for u in used):
            return net
    raise ClusterError("every /24 of 198.18.0.0/15 is in use on this machine")


def host_argv(host: Host, argv: list[str]) -> list[str]:
    """``argv`` run on ``host``: inside its network namespace (with its /etc/netns files mounted
    over /etc) and a UTS namespace whose hostname is the host's name. Same pid: every layer execs."""
    return [
        "ip",
        "netns",
        "exec",
        host.netns,
        "unshare",
        "--uts",
        "--",
        "sh",
        "-c",
        'hostname "$0" && exec "$@"',
        host.name,
        *argv,
    ]


def is_running(rec: ProcessRecord) -> bool:
    """The recorded process is alive and is the one ``up`` started (start time matches)."""
    ticks = _start_ticks(rec.pid)
    if ticks is None or (rec.start_ticks is not None and ticks != rec.start_ticks):
        return False
    try:
        state = Path(f"/proc/{rec.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def start_process(
    host: Host, argv: list[str], env: dict[str, str], log: Path, cwd: Path | None = None
) -> ProcessRecord:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        out.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
        out.flush()
        p = subprocess.Popen(
            host_argv(host, argv),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=cwd,
        )
    return ProcessRecord(pid=p.pid, start_ticks=_start_ticks(p.pid), argv=argv, log=str(log))


def netns_pids(netns: str) -> list[int]:
    out = _run("ip", "netns", "pids", netns, check=False).stdout
    return [int(x) for x in out.split() if x.isdigit()]


def tcp_open(address: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for(
    what: str,
    ready: Callable[[], bool],
    timeout: float,
    log: Path | None = None,
    alive: Callable[[], bool] | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if alive is not None and not alive():
            raise ClusterError(
                f"{what} exited during start-up" + (f"; last lines of {log}:\n{tail(log)}" if log else "")
            )
        time.sleep(0.5)
    raise ClusterError(
        f"{what} not ready within {timeout:.0f}s (RINGFLOW_CLUSTER_STARTUP_TIMEOUT)"
        + (f"; last lines of {log}:\n{tail(log)}" if log else "")
    )


def tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


# --------------------------------------------------------------------------- network


def plan(home: Path, n_hosts: int) -> ClusterState:
    """Names and addresses for a new cluster of ``n_hosts`` (h0 = stack, h1 = worker + ranks, h2.. = ranks)."""
    if not 2 <= n_hosts <= MAX_HOSTS:
        raise ClusterError(
            f"--hosts {n_hosts}: a cluster has 2 to {MAX_HOSTS} hosts (h0 runs the stack, h1.. run training ranks)"
        )
    prefix = prefix_for(home)
    net = pick_subnet(prefix)
    base = net.network_address
    hosts = []
    for i in range(n_hosts):
        roles = ["stack"] if i == 0 else (["worker", "ranks"] if i == 1 else ["ranks"])
        hosts.append(Host(name=f"h{i}", netns=f"{prefix}h{i}", address=str(base + HOST_OFFSET + i), roles=roles))
    return ClusterState(
        prefix=prefix,
        subnet=str(net),
        bridge=f"{prefix}br",
        bridge_address=str(base + 1),
        hosts=hosts,
        shared_home=str(home),
    )


def build_network(state: ClusterState) -> None:
    """Bridge, namespaces, veth pairs, addresses, per-host /etc files. Skips what exists."""
    prefixlen = ipaddress.ip_network(state.subnet).prefixlen
    links = set(link_names())
    if state.bridge not in links:
        _run("ip", "link", "add", state.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{state.bridge_address}/{prefixlen}", "dev", state.bridge)
    _run("ip", "link", "set", state.bridge, "up")
    existing = set(netns_names())
    for i, h in enumerate(state.hosts):
        veth = f"{state.prefix}v{i}"
        if h.netns not in existing:
            _run("ip", "netns", "add", h.netns)
            _run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", h.netns)
            _run("ip", "-n", h.netns, "addr", "add", f"{h.address}/{prefixlen}", "dev", "eth0")
        _run("ip", "link", "set", veth, "master", state.bridge, "up")
        _run("ip", "-n", h.netns, "link", "set", "eth0", "up")
        _run("ip", "-n", h.netns, "link", "set", "lo", "up")
        write_etc(state, h)


def write_etc(state: ClusterState, host: Host) -> None:
    """``/etc/netns/<ns>/hosts`` and ``.../ssh/ssh_config``: what ``ip netns exec`` mounts over /etc."""
    home = Path(state.shared_home)
    etc = NETNS_ETC / host.netns
    (etc / "ssh").mkdir(parents=True, exist_ok=True)
    lines = ["127.0.0.1 localhost"] + [f"{h.address} {h.name}" for h in state.hosts]
    (etc / "hosts").write_text("\n".join(lines) + "\n")
    (etc / "ssh" / "ssh_config").write_text(
        "# ringflow cluster: the cluster's own key and known hosts; root's ~/.ssh is never used\n"
        "Host *\n"
        f"  IdentityFile {identity_file(home)}\n"
        "  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {ssh_dir(home) / 'known_hosts'}\n"
        f"  GlobalKnownHostsFile {ssh_dir(home) / 'known_hosts'}\n"
        "  BatchMode yes\n"
        "  ConnectTimeout 10\n"
        "  LogLevel ERROR\n"
    )


def write_ssh_files(state: ClusterState) -> None:
    """Client key, host key, authorized_keys, known_hosts and sshd_config (kept across up/down)."""
    home = Path(state.shared_home)
    d = ssh_dir(home)
    d.mkdir(parents=True, exist_ok=True)
    d.chmod(0o700)
    host_key = d / "host_ed25519"
    for key, comment in ((identity_file(home), "ringflow-cluster"), (host_key, "ringflow-cluster-host")):
        if not key.is_file():
            _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(key))
    (d / "authorized_keys").write_text(identity_file(home).with_suffix(".pub").read_text())
    pub = host_key.with_suffix(".pub").read_text().split()
    (d / "known_hosts").write_text("".join(f"{h.name},{h.address} {pub[0]} {pub[1]}\n" for h in state.hosts))
    (d / "sshd_config").write_text(
        "# ringflow cluster sshd (one per host, started with -o ListenAddress=<host address>)\n"
        "Port 22\n"
        f"HostKey {host_key}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\n"
        "PubkeyAuthentication yes\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "PermitRootLogin prohibit-password\n"
        "StrictModes no\n"  # the key files live in the user's RINGFLOW_HOME, whatever its modes
        "UsePAM no\n"
        "PidFile none\n"
        "PrintMotd no\n"
        "MaxStartups 64\n"  # horovodrun opens several sessions per host at once
    )


def start_sshd(state: ClusterState, host: Host, settings: ClusterSettings) -> None:
    key = f"{host.name}/sshd"
    rec = state.processes.get(key)
    if rec is not None and is_running(rec):
        return
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege-separation directory
    home = Path(state.shared_home)
    log = log_dir(home) / f"{host.name}-sshd.log"
    argv = [
        settings.sshd,
        "-D",
        "-f",
        str(ssh_dir(home) / "sshd_config"),
        "-o",
        f"ListenAddress={host.address}",
        "-E",
        str(log),
    ]
    rec = start_process(host, argv, {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}, log)
    state.processes[key] = rec
    save_state(home, state)
    wait_for(
        f"sshd on {host.name} ({host.address}:22)",
        lambda: tcp_open(host.address, 22),
        settings.startup_timeout_s,
        log,
        alive=lambda: is_running(rec),
    )


# --------------------------------------------------------------------------- teardown


def _kill(pids: list[int], grace_s: float) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _alive(p)]
        if alive:
            time.sleep(0.2)
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    if state == "Z":
        try:  # our own child (sshd, worker started by this process): reap it
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        return False
    return True


def down(home: Path, settings: ClusterSettings | None = None, echo: Callable[[str], object] = print) -> list[str]:
    """Remove everything carrying this cluster's prefix: processes in its namespaces, the
    namespaces, its links, its /etc/netns entries and the state file. Returns what it removed.

    Works from the names alone, so it also cleans up after an ``up`` that failed half way.
    """
    settings = settings or ClusterSettings()
    prefix = prefix_for(home)
    removed: list[str] = []
    namespaces = [n for n in netns_names() if n.startswith(prefix)]
    state = None
    try:
        state = load_state(home)
    except ClusterError:
        pass
    # every process of every host: services, flow runs, horovodrun, ranks started over ssh
    for _ in range(3):  # a dying process may have spawned another meanwhile
        pids = [p for ns in namespaces for p in netns_pids(ns)]
        if state is not None:  # recorded processes that never reached their namespace
            pids += [r.pid for r in state.processes.values() if is_running(r) and r.pid not in pids]
        if not pids:
            break
        _kill(pids, settings.stop_grace_s)
        removed.append(f"{len(pids)} processes")
    for ns in namespaces:
        _run("ip", "netns", "del", ns, check=False)
        removed.append(f"netns {ns}")
    for link in link_names():
        if link.startswith(prefix):
            _run("ip", "link", "del", link, check=False)
            removed.append(f"link {link}")
    if NETNS_ETC.is_dir():
        for d in NETNS_ETC.iterdir():
            if d.name.startswith(prefix):
                shutil.rmtree(d, ignore_errors=True)
                removed.append(f"{d}")
    # the kernel destroys a namespace's veth asynchronously: return once they are gone
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (
        any(n.startswith(prefix) for n in link_names()) or any(n.startswith(prefix) for n in netns_names())
    ):
        time.sleep(0.2)
    leftover = [n for n in link_names() + netns_names() if n.startswith(prefix)]
    if leftover:
        raise ClusterError(f"could not remove {leftover}; remove them with `ip link del` / `ip netns del`")
    state_file(home).unlink(missing_ok=True)
    for line in removed:
        echo(f"removed {line}")
    return removed

"""Launching the training program with horovodrun: the command, its process tree, its output.

Plain Python (no Prefect) so a cluster launcher or a test can use the same pieces as the
``train`` task: :func:`horovodrun_command` builds the command from the config,
:class:`RankOutput` follows every rank's output and names the rank that failed first, and
:func:`kill_tree` ends horovodrun and every rank it started.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

from ringflow.training import rank_server
from ringflow.training.config import PipelineConfig
from ringflow.training.hvdrun import GLOO_CHECKED
from ringflow.training.rank_server import PROGRAM, rank_command

DISCOVER_HOSTS = Path(str(resources.files("ringflow.infra") / "discover_hosts.sh"))
"""Elastic mode's host discovery script, shipped as package data (a wheel has no checkout)."""
HOSTS_ENV = "RINGFLOW_HOSTS"


FATAL_EXIT = 78
"""Exit code of a rank that stopped on an error a retry would meet again (EX_CONFIG: bad data,
config, key or checkpoint). Its reason is printed on a line starting with :data:`FATAL_PREFIX`."""
FATAL_PREFIX = "ringflow-error: "

# What a rank's last lines say when it died of the machine or the network, not of the program.
_INFRA_SIGNS = (
    "HorovodInternalError",
    "ConnectionError",
    "ConnectionResetError",
    "Connection reset",
    "Connection refused",
    "Broken pipe",
    "BrokenPipeError",
    "MemoryError",
    "OSError: [Errno",
    "No route to host",
    "ssh:",
    "timed out",
)


class TrainingError(RuntimeError):
    """horovodrun failed; the message names the first failing rank, its exit code and last lines.

    ``retryable``: a second attempt can succeed (a killed rank, a lost host, I/O, a launcher
    that did not start); False for errors that would repeat (bad data, config, key, a bug).
    """

    def __init__(self, message: str, rank: int | None = None, exit_code: int | None = None, retryable: bool = True):
        super().__init__(message)
        self.rank = rank
        self.exit_code = exit_code
        self.retryable = retryable


class TrainingTimeout(TrainingError):
    """The run exceeded ``training.timeout_s``; every process of it was killed (not retried: the
    same work under the same limit would run out again)."""

    def __init__(self, message: str):
        super().__init__(message, retryable=False)


def horovodrun_path(python: str | None = None) -> str:
    """The ``horovodrun`` next to the interpreter, so launcher and ranks share one venv."""
    return str(Path(python or sys.executable).with_name("horovodrun"))


class HorovodUnavailable(RuntimeError):
    """No working Horovod beside this interpreter: found before any work, with what to run."""


INSTALL_HOROVOD = "infra/install_horovod.sh"


def check_horovod(python: str | None = None) -> None:
    """Refuse to start a pipeline whose train stage cannot run: ``horovodrun`` must sit next to
    the interpreter and ``horovod.torch`` must import with Gloo built in (what ``horovodrun
    --check-build`` lists, without its 9 s start-up). Raises :class:`HorovodUnavailable`."""
    fix = (
        f"build and install it with `ringflow install-horovod` ({INSTALL_HOROVOD}; `make install` runs it "
        "in a checkout): PyPI's horovod 0.28.1 does not build against torch >= 2.1 as shipped"
    )
    runner = Path(horovodrun_path(python))
    if not runner.is_file():
        raise HorovodUnavailable(f"horovodrun not found at {runner}: Horovod is not installed; {fix}")
    try:
        import horovod.torch as hvd
    except ImportError as e:
        raise HorovodUnavailable(f"horovod.torch does not import ({e}); {fix}") from None
    if not hvd.gloo_built():
        raise HorovodUnavailable(f"this Horovod was built without Gloo (horovodrun --gloo cannot run); {fix}")
    _gloo_checked.add(str(runner))


_gloo_checked: set[str] = set()
"""The horovodrun paths :func:`check_horovod` found working with Gloo in this process."""


def gloo_checked(python: str | None = None) -> bool:
    """Whether :func:`check_horovod` passed in this process for ``python``'s horovodrun (the
    launch may then skip horovodrun's own probe: ``training/hvdrun.py``)."""
    return horovodrun_path(python) in _gloo_checked


LOOPBACK_NAMES = ("localhost", "127.0.0.1")
"""Two names of this machine that Horovod treats as two local hosts (both resolve to a local
address, so no ssh). Horovod blacklists the whole host of a failed worker: with one host name a
lost rank takes every slot with it, with two the job shrinks to the other half and goes on."""


def one_host_elastic_slots(max_np: int) -> list[tuple[str, int]]:
    """The slots of a one-host elastic job split over the two loopback names (sizes differ by <= 1)."""
    first = (max_np + 1) // 2
    return [(name, n) for name, n in zip(LOOPBACK_NAMES, (first, max_np - first), strict=True) if n > 0]


_HOSTFILE_LINE = re.compile(r"^([\w.-]+)(?:\s+slots\s*=\s*(\d+))?$")


def read_hostfile(path: str | Path, world_size: int) -> list[tuple[str, int]]:
    """The (host, slots) of a hostfile (``training.horovod.hostfile``): ``host slots=N`` lines, or
    bare host names (``scontrol show hostnames``), which share ``world_size`` evenly (rounded up).
    Blank lines and ``#`` comments are skipped. ValueError naming the file and line otherwise."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"training.horovod.hostfile={path}: cannot read it ({e.strerror or e})") from None
    entries: list[tuple[str, int | None]] = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = _HOSTFILE_LINE.match(line)
        if not m or (m.group(2) is not None and int(m.group(2)) < 1):
            raise ValueError(
                f"training.horovod.hostfile={path} line {n}: {line!r} is neither a host name nor "
                "'host slots=N' (N >= 1)"
            )
        entries.append((m.group(1), int(m.group(2)) if m.group(2) else None))
    if not entries:
        raise ValueError(f"training.horovod.hostfile={path} lists no host")
    share = -(-world_size // len(entries))
    return [(h, n if n is not None else share) for h, n in entries]


def write_hostfile(hosts: list[tuple[str, int]], directory: Path) -> Path:
    """``directory/hostfile`` in horovodrun's own format (``host slots=N``), written atomically."""
    from ringflow.training.manifest import atomic_write_bytes

    path = Path(directory) / "hostfile"
    atomic_write_bytes(path, "".join(f"{h} slots={n}\n" for h, n in hosts).encode())
    return path


def hosts_for(cfg: PipelineConfig) -> str:
    tc = cfg.training
    if tc.horovod.hosts:
        return tc.horovod.hosts
    if tc.horovod.hostfile is not None and not tc.elastic.enabled and tc.horovod.hostfile.is_file():
        return ",".join(f"{h}:{n}" for h, n in read_hostfile(tc.horovod.hostfile, tc.world_size))
    if tc.elastic.enabled:
        return ",".join(f"{h}:{n}" for h, n in one_host_elastic_slots(tc.elastic.max_np or tc.world_size))
    return f"localhost:{tc.world_size}"


def uses_rank_server(cfg: PipelineConfig) -> bool:
    """Whether ranks can be forked by a rank server (``training.fork_ranks``): horovodrun starts
    them all on this host (``localhost`` slots; another host, even a namespace host sharing this
    filesystem, runs its ranks in its own place), and not elastically (Horovod restarts those)."""
    tc = cfg.training
    if not tc.fork_ranks or tc.launcher != "horovodrun" or tc.elastic.enabled or tc.horovod.hostfile is not None:
        return False
    if not sys.platform.startswith("linux"):  # a Unix socket of packets, prctl
        return False
    return all(h.rsplit(":", 1)[0] in ("localhost", "127.0.0.1") for h in hosts_for(cfg).split(","))


@contextmanager
def rank_server_held(cfg: PipelineConfig) -> Iterator[bool]:
    """Hold this process's rank server (:func:`ringflow.training.rank_server.hold`) while the
    block runs, when ``cfg``'s ranks are forked by one (:func:`uses_rank_server`); yields whether
    it is held. The command, the flow and every launch hold it, each from as early as it can."""
    held = uses_rank_server(cfg) and rank_server.hold()
    try:
        yield held
    finally:
        if held:
            rank_server.release()


def check_launchable(cfg: PipelineConfig, num_shards: int) -> None:
    """Refuse, before anything starts, a launch that cannot work (ValueError naming the setting)."""
    tc = cfg.training
    most = tc.elastic.max_np or tc.world_size if tc.elastic.enabled else tc.world_size
    if most > num_shards:
        raise ValueError(
            f"training.world_size={tc.world_size}"
            + (f" (elastic max_np={most})" if tc.elastic.enabled else "")
            + f" exceeds the {num_shards} shards of the manifest: a rank would have no data. Use at most "
            f"{num_shards} ranks, or re-shard with sharding.num_shards >= {most}"
        )
    if tc.launcher == "mpijob" and tc.elastic.enabled:
        raise ValueError(
            "training.elastic.enabled with training.launcher=mpijob: the MPIJob has a fixed number "
            "of workers; use launcher horovodrun for elastic training"
        )
    if tc.horovod.hostfile is not None and not tc.elastic.enabled and tc.launcher == "horovodrun":
        listed = sum(n for _, n in read_hostfile(tc.horovod.hostfile, tc.world_size))
        if listed < tc.world_size:
            raise ValueError(
                f"training.world_size={tc.world_size} exceeds the {listed} slots of "
                f"training.horovod.hostfile={tc.horovod.hostfile}"
            )
    if tc.elastic.enabled and not tc.horovod.hosts:
        slots = one_host_elastic_slots(most)
        survivors = min(n for _, n in slots) if len(slots) > 1 else 0
        if tc.elastic.min_np > survivors:
            raise ValueError(
                f"training.elastic.min_np={tc.elastic.min_np}: on one host the {most} elastic slots are split "
                f"over the names {' and '.join(h for h, _ in slots)}, and a lost rank takes its whole "
                f"name with it (Horovod blacklists the host), leaving {survivors}; set "
                f"training.elastic.min_np <= {survivors}, or list several hosts in training.horovod.hosts"
            )


def horovodrun_command(
    cfg: PipelineConfig,
    manifest_path: str | Path,
    output_dir: str | Path,
    resume: bool = False,
    python: str | None = None,
    hostfile: str | Path | None = None,
    gloo_checked: bool = False,
    program_args: Sequence[str] = (),
    rank_server: str | Path | None = None,
) -> list[str]:
    """The full horovodrun command line for this config (``program_args``: more arguments of the
    training program, e.g. a final fit's, ``training/final_fit.py``).

    ``gloo_checked``: :func:`check_horovod` passed in this process, so the launcher is
    ``python -m ringflow.training.hvdrun --gloo-checked`` (horovodrun without the probe it runs on
    every launch: 2.4 s) rather than the ``horovodrun`` script.

    ``rank_server``: the socket of a :class:`~ringflow.training.rank_server.RankServer` on this
    host; every rank is then forked by it instead of starting an interpreter and importing torch
    (:func:`uses_rank_server` says when it applies).

    Fusion threshold, cycle time and autotune are horovodrun flags (they configure the background
    thread of every rank); compression and backward passes per step are read by the program.
    ``hostfile`` (default ``training.horovod.hostfile``) is passed as ``--hostfile``: the train task
    gives the copy it wrote in horovodrun's format (:func:`write_hostfile`), an MPIJob the
    operator's ``/etc/mpi/hostfile``.
    """
    tc, hv, el = cfg.training, cfg.training.horovod, cfg.training.elastic
    python = python or sys.executable
    launcher = [python, "-m", "ringflow.training.hvdrun", GLOO_CHECKED] if gloo_checked else [horovodrun_path(python)]
    cmd = [*launcher, "-np", str(tc.world_size)]
    if el.enabled:
        # a single host never agrees on common NICs without an explicit interface (stack notes §0.3)
        cmd += [
            "--min-np",
            str(el.min_np),
            "--max-np",
            str(el.max_np or tc.world_size),
            "--host-discovery-script",
            str(DISCOVER_HOSTS),
            "--reset-limit",
            str(el.reset_limit),
            "--elastic-timeout",
            str(hv.start_timeout_s),
            "--network-interface",
            hv.network_interface or "lo",
        ]
        if el.blacklist_cooldown_s is not None:
            cmd += ["--blacklist-cooldown-range", *(str(s) for s in el.blacklist_cooldown_s)]
    else:
        hostfile = hostfile if hostfile is not None else hv.hostfile
        cmd += ["--hostfile", str(hostfile)] if hostfile is not None else ["-H", hosts_for(cfg)]
        if hv.network_interface:
            cmd += ["--network-interface", hv.network_interface]
    cmd += ["--gloo", "--start-timeout", str(hv.start_timeout_s)]
    if hv.ssh_identity_file is not None:
        cmd += ["--ssh-identity-file", str(hv.ssh_identity_file)]
    if hv.ssh_port is not None:
        cmd += ["--ssh-port", str(hv.ssh_port)]
    if hv.fusion_threshold_mb is not None:
        cmd += ["--fusion-threshold-mb", str(hv.fusion_threshold_mb)]
    if hv.cycle_time_ms is not None:
        cmd += ["--cycle-time-ms", str(hv.cycle_time_ms)]
    if hv.cache_capacity is not None:
        cmd += ["--cache-capacity", str(hv.cache_capacity)]
    if hv.autotune:
        cmd += ["--autotune", "--autotune-log-file", str(Path(output_dir) / "autotune.csv")]
    program = rank_command(python, rank_server) if rank_server is not None else [python, "-m", PROGRAM]
    cmd += [
        *program,
        "--manifest",
        str(manifest_path),
        "--config-json",
        cfg.model_dump_json(),
        "--output-dir",
        str(output_dir),
    ]
    if resume:
        cmd.append("--resume")
    return [*cmd, *program_args]


def launch_env(cfg: PipelineConfig, base: dict[str, str] | None = None, **extra: str | None) -> dict[str, str]:
    """Environment for horovodrun and its ranks: unbuffered output, the elastic host list for
    discover_hosts.sh; ``extra`` values of None are removed. Ranks import ringflow from the same
    environment as the launcher (``python -m ringflow.training.train`` with its interpreter)."""
    env = dict(os.environ if base is None else base)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault(HOSTS_ENV, hosts_for(cfg))
    for k, v in extra.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


# --------------------------------------------------------------------------- output


_RANK_LINE = re.compile(r"^\[(\d+)\]<(stdout|stderr)>:(.*)$")
_SSH_UNREACHABLE = re.compile(r"ssh: connect to host (\S+) port \d+")
SSH_FAILED = 255
"""ssh's own exit code: the rank's host could not be reached (or refused the key)."""


def rank_hosts(command: list[str]) -> dict[int, str]:
    """The host of every rank of a fixed-size horovodrun command: Horovod fills the ``-H`` slots
    in order (``-H`` or a readable ``--hostfile``). Empty for an elastic command, whose ranks move
    between hosts."""
    if "-np" not in command:
        return {}
    if "-H" in command:
        items = command[command.index("-H") + 1].split(",")
    elif "--hostfile" in command:
        try:
            items = [f"{h}:{n}" for h, n in read_hostfile(command[command.index("--hostfile") + 1], 1)]
        except ValueError:
            return {}
    else:
        return {}
    hosts: list[str] = []
    for item in items:
        name, sep, slots = item.strip().rpartition(":")
        hosts += [name] * int(slots) if sep else [slots]
    return dict(enumerate(hosts[: int(command[command.index("-np") + 1])]))


_EXIT_LINE = re.compile(r"Process (\d+) exit with status code (-?\d+)")


class RankOutput:
    """Follows horovodrun's merged output: the last lines of every rank and the first failure."""

    def __init__(self, keep: int = 25, hosts: dict[int, str] | None = None):
        self.keep = keep
        self.hosts = dict(hosts or {})
        """rank -> host (:func:`rank_hosts`), so a failure names the host as well as the rank."""
        self.lines: dict[int, deque[str]] = {}
        self.launcher: deque[str] = deque(maxlen=keep)
        self.first_failure: tuple[int, int] | None = None
        self.fatal: list[tuple[int, str]] = []
        """(rank, reason) of ranks that stopped on an error a retry would meet again."""

    def feed(self, line: str) -> None:
        line = line.rstrip("\n")
        m = _RANK_LINE.match(line)
        if m:
            rank, text = int(m.group(1)), m.group(3)
            self.lines.setdefault(rank, deque(maxlen=self.keep)).append(text)
            if text.startswith(FATAL_PREFIX):
                self.fatal.append((rank, text[len(FATAL_PREFIX) :]))
            return
        self.launcher.append(line)
        e = _EXIT_LINE.search(line)
        if e and self.first_failure is None:
            self.first_failure = (int(e.group(1)), int(e.group(2)))

    def tail(self, rank: int, n: int = 15) -> list[str]:
        return list(self.lines.get(rank, []))[-n:]

    def failure_message(self, returncode: int) -> TrainingError:
        if self.fatal:
            # The cause, whichever rank horovodrun saw exit first (the others only lost their peer).
            rank, reason = self.fatal[0]
            return TrainingError(
                f"training rank {rank} stopped: {reason}", rank=rank, exit_code=FATAL_EXIT, retryable=False
            )
        if self.first_failure is None:
            last = "\n  ".join(list(self.launcher)[-15:]) or "(no output)"
            return TrainingError(
                f"horovodrun exited with code {returncode} before any rank failed; last launcher lines:\n  {last}",
                exit_code=returncode,
            )
        rank, code = self.first_failure
        unreachable = next(
            (m.group(1) for line in self.tail(rank, self.keep) if (m := _SSH_UNREACHABLE.search(line))), None
        )
        host = self.hosts.get(rank) or unreachable
        if code == SSH_FAILED:  # not a signal: ssh could not start or keep the rank on its host
            how = f"host {host or '?'} unreachable over ssh (exit {code})"
        else:
            how = f"killed by signal {code - 128} ({_signal_name(code - 128)})" if code > 128 else f"exit code {code}"
        where = f" on host {host}" if host else ""
        last = "\n  ".join(self.tail(rank)) or "(no output)"
        # killed (signal, OOM), lost host (ssh 255) or a network/collective error: worth a retry;
        # a plain traceback of the program is a bug that would fail the same way again
        retryable = (
            code > 128
            or code < 0
            or code == 255
            or any(sign in line for line in self.tail(rank, self.keep) for sign in _INFRA_SIGNS)
        )
        return TrainingError(
            f"training rank {rank} failed first ({how}){where}; horovodrun exited {returncode} and "
            f"stopped the other ranks. Last lines of rank {rank}:\n  {last}",
            rank=rank,
            exit_code=code,
            retryable=retryable,
        )


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return "unknown"


# --------------------------------------------------------------------------- processes


def start_ticks(pid: int) -> int | None:
    """Process start time in clock ticks since boot (Linux): exact, unlike a wall-clock time, so a
    pid reused by another process is told apart. None when it cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])  # field 22 overall
    except (OSError, ValueError, IndexError):
        return None


def kill_tree(pid: int, grace_s: float = 5.0) -> list[int]:
    """SIGTERM horovodrun's process group and the groups of all its descendants, then SIGKILL
    what is left after ``grace_s``. Returns the pids that had to be killed.

    horovodrun runs every rank under a middleman that calls ``setsid``, so killing the
    launcher's own group alone would leave the ranks to Horovod's orphan clean-up.
    """
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    groups = {pid}
    for p in procs:
        try:
            groups.add(os.getpgid(p.pid))
        except ProcessLookupError:
            pass
    groups.discard(os.getpgid(0))  # never our own group
    for g in groups:
        try:
            os.killpg(g, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    # anything spawned meanwhile under a survivor goes too
    for p in list(alive):
        try:
            alive.extend(c for c in p.children(recursive=True) if c not in alive)
        except psutil.NoSuchProcess:
            pass
    for g in groups:
        try:
            os.killpg(g, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace_s)
    return [p.pid for p in alive]

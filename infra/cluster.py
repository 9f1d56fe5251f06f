"""The team's services on the namespace cluster (``ringflow cluster up | status | down``).

The hosts are network namespaces on this machine (``infra/hosts.py`` builds them); this module
puts the team's services on them (``flows/deployments.py`` sends the deployments to the worker's
pool and submits work; ``flows/cli.py`` holds the commands):

- ``h0`` runs the stack, ``ringflow up --no-serve`` inside h0 (infra/stack.py), bound to h0's
  address; MLflow serves artifacts over HTTP, so no host needs a path on h0's disk; its Evidently
  UI reads the one workspace on the shared filesystem (:func:`evidently_workspace`) that the
  worker's monitoring runs write;
- ``h1`` runs a real ``prefect worker`` of the process pool ``ringflow-cluster``; the training
  and monitoring deployments (from this repository's source) and the rerun automation go to it;
- ``h1..hN`` run sshd: the worker's flow runs launch ``horovodrun`` from h1 across them with
  ``--network-interface eth0`` and the cluster's ssh key, ranks report to MLflow at h0's address.

The same settings describe real machines (README "Scale out").
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from ringflow.infra.hosts import (
    BIN,
    ClusterError,
    ClusterSettings,
    ClusterState,
    build_network,
    cluster_dir,
    host_argv,
    identity_file,
    is_running,
    load_state,
    log_dir,
    netns_names,
    plan,
    preflight,
    save_state,
    start_process,
    start_sshd,
    tail,
    wait_for,
    write_ssh_files,
)
from ringflow.infra.hosts import down as remove_cluster
from ringflow.infra.stack_settings import HEALTH_PATHS, ServerName, prefect_auth_tuple
from ringflow.training.version import SOURCE_ROOT as REPO_ROOT  # the checkout (or the installed package)

WORK_POOL = "ringflow-cluster"
PREFECT_PORT = 4200
MLFLOW_PORT = 5000
EVIDENTLY_PORT = 8000
NETWORK_INTERFACE = "eth0"
"""Every namespace host's interface (``ip link add ... peer name eth0``)."""
SERVER_SECRETS = ("PREFECT_SERVER_API_AUTH_STRING", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY")


def h0_home(home: Path) -> Path:
    """h0's own disk: the stack's pid files, Prefect and MLflow databases, served artifacts."""
    return cluster_dir(home) / "h0"


def results_dir(home: Path) -> Path:
    """Prefect results of flow runs, on the shared filesystem so ``cluster run`` can read them."""
    return cluster_dir(home) / "results"


def evidently_workspace(home: Path) -> Path:
    """The cluster's one Evidently workspace, ``<home>/evidently`` on the shared filesystem: h0's
    ``evidently ui`` reads it and the worker's monitoring runs write it (both are given it as
    RINGFLOW_EVIDENTLY_WORKSPACE), as does ``ringflow monitor`` on this machine with the same
    RINGFLOW_HOME."""
    from ringflow.monitoring.reports import WORKSPACE_DIR

    return home / WORKSPACE_DIR


def urls(state: ClusterState) -> dict[ServerName, str]:
    h0 = state.host("h0")
    return {
        "prefect": f"http://{h0.address}:{PREFECT_PORT}",
        "mlflow": f"http://{h0.address}:{MLFLOW_PORT}",
        "evidently": f"http://{h0.address}:{EVIDENTLY_PORT}",
    }


def client_env(state: ClusterState) -> dict[str, str]:
    """How any host (and this machine) reaches the stack on h0: URLs, plus credentials from the
    environment (infra/stack.py derives client credentials from server ones)."""
    from ringflow.infra.stack_settings import StackSettings
    from ringflow.infra.stack_settings import client_env as stack_client_env

    return stack_client_env(
        StackSettings(host=state.host("h0").address, prefect_port=PREFECT_PORT, mlflow_port=MLFLOW_PORT)
    )


def _base_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "PREFECT_API_KEY", "RINGFLOW_HOSTS_FILE")
    }
    env.update(
        PYTHONUNBUFFERED="1", PREFECT_SERVER_ANALYTICS_ENABLED="false", MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false"
    )
    return env


# --------------------------------------------------------------------------- services


def start_stack(state: ClusterState, config: Path | None, settings: ClusterSettings) -> None:
    """``ringflow up --no-serve`` inside h0 (idempotent: it starts only what is not running)."""
    import subprocess

    import httpx

    home = Path(state.shared_home)
    h0 = state.host("h0")
    stack_home = h0_home(home)
    (stack_home / "artifacts").mkdir(parents=True, exist_ok=True)
    env = _base_env()
    env.update(
        RINGFLOW_HOME=str(stack_home),
        RINGFLOW_HOST=h0.address,
        RINGFLOW_PREFECT_PORT=str(PREFECT_PORT),
        RINGFLOW_MLFLOW_PORT=str(MLFLOW_PORT),
        RINGFLOW_EVIDENTLY_PORT=str(EVIDENTLY_PORT),
        # the UI reads the workspace on the shared filesystem, not one under h0's own home
        RINGFLOW_EVIDENTLY_WORKSPACE=str(evidently_workspace(home)),
        # served artifacts (mlflow-artifacts:/ URIs): ranks and flows upload over HTTP
        RINGFLOW_MLFLOW_ARTIFACTS_DESTINATION=str(stack_home / "artifacts"),
        # MLflow's host check admits loopback and private ranges only; 198.18/15 is neither
        MLFLOW_SERVER_ALLOWED_HOSTS=",".join(
            [f"{h0.address}:{MLFLOW_PORT}", h0.address, f"h0:{MLFLOW_PORT}", "h0", "localhost:*", "127.0.0.1:*"]
        ),
    )
    argv = [str(BIN / "ringflow"), "up", "--no-serve"] + (["--config", str(Path(config).resolve())] if config else [])
    log = log_dir(home) / "h0-stack.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        p = subprocess.run(
            host_argv(h0, argv),
            env=env,
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=settings.startup_timeout_s,
        )
    if p.returncode != 0:
        raise ClusterError(
            f"the stack did not start on h0 (`ringflow up` exited {p.returncode}); last lines of {log}:\n{tail(log)}"
        )
    u = urls(state)
    for name, path in HEALTH_PATHS.items():
        try:
            ok = (
                httpx.get(
                    u[name] + path, timeout=5, auth=prefect_auth(state) if name == "prefect" else None
                ).status_code
                == 200
            )
        except httpx.HTTPError:
            ok = False
        if not ok:
            raise ClusterError(f"{name} on h0 does not answer at {u[name]} from this machine; see {log}")


def start_worker(state: ClusterState, settings: ClusterSettings) -> None:
    """A real ``prefect worker`` of the process pool on h1; its flow runs see the shared home."""
    home = Path(state.shared_home)
    h1 = state.host("h1")
    key = "h1/worker"
    rec = state.processes.get(key)
    if rec is None or not is_running(rec):
        env = _base_env()
        for k in SERVER_SECRETS:
            env.pop(k, None)  # a client: no server secrets
        env.update(client_env(state))
        env.update(
            RINGFLOW_HOME=str(home),
            PREFECT_HOME=str(cluster_dir(home) / "h1" / "prefect"),
            RINGFLOW_EVIDENTLY_WORKSPACE=str(evidently_workspace(home)),  # the one h0's UI reads
            PREFECT_RESULTS_PERSIST_BY_DEFAULT="true",
            PREFECT_LOCAL_STORAGE_PATH=str(results_dir(home)),
        )
        argv = [
            str(BIN / "prefect"),
            "worker",
            "start",
            "--pool",
            WORK_POOL,
            "--type",
            "process",
            "--name",
            f"{state.prefix}-h1",
        ]
        (cluster_dir(home) / "h1" / "prefect").mkdir(parents=True, exist_ok=True)
        rec = start_process(h1, argv, env, log_dir(home) / "h1-worker.log", cwd=REPO_ROOT)
        state.processes[key] = rec
        save_state(home, state)
    wait_for(
        "prefect worker on h1",
        lambda: _worker_online(state),
        settings.startup_timeout_s,
        Path(rec.log),
        alive=lambda: is_running(rec),
    )


def prefect_auth(state: ClusterState) -> tuple[str, str] | None:
    """HTTP basic auth for the Prefect API on h0, when it has auth on."""
    return prefect_auth_tuple(client_env(state))


def _worker_online(state: ClusterState) -> bool:
    import httpx

    try:
        r = httpx.post(
            f"{urls(state)['prefect']}/api/work_pools/{WORK_POOL}/workers/filter",
            json={},
            auth=prefect_auth(state),
            timeout=5,
        )
        return r.status_code == 200 and any(
            w["name"] == f"{state.prefix}-h1" and w.get("status") == "ONLINE" for w in r.json()
        )
    except (httpx.HTTPError, ValueError):
        return False


def use_stack(state: ClusterState) -> None:
    """Point this process's Prefect and MLflow clients at h0 (before Prefect is imported)."""
    os.environ.update(client_env(state))
    os.environ["PREFECT_LOCAL_STORAGE_PATH"] = str(results_dir(Path(state.shared_home)))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def cluster_overrides(state: ClusterState) -> list[str]:
    """Config defaults for training across the cluster's hosts; ``--set`` values come after and win."""
    hosts = state.training_hosts
    return [
        f"training.horovod.hosts={','.join(f'{h.name}:1' for h in hosts)}",
        f"training.world_size={len(hosts)}",
        f"training.horovod.network_interface={NETWORK_INTERFACE}",
        f"training.horovod.ssh_identity_file={identity_file(Path(state.shared_home))}",
        # the namespace hosts share this machine's cores: one torch thread per rank
        "training.threads_per_rank=1",
    ]


def up(
    home: Path,
    n_hosts: int,
    config: Path | None = None,
    *,
    stack: bool = True,
    deploy: Callable[[ClusterState], object] | None = None,
    echo: Callable[[str], object] = print,
) -> ClusterState:
    """Build (or complete) the cluster; idempotent. A first ``up`` that fails removes what it made.

    ``deploy``: called once the worker is online (flows/deployments.py ``deploy_to_pool``)."""
    settings = ClusterSettings()
    preflight(settings)
    state = load_state(home)
    if state is not None and len(state.hosts) != n_hosts:
        raise ClusterError(
            f"a cluster of {len(state.hosts)} hosts exists under {cluster_dir(home)}; "
            "`ringflow cluster down` first to build one of another size"
        )
    fresh = state is None or any(h.netns not in netns_names() for h in state.hosts)
    if state is None:
        state = plan(home, n_hosts)
        save_state(home, state)  # before anything exists: down finds it even if up dies next
    try:
        build_network(state)
        write_ssh_files(state)
        for h in state.training_hosts:
            start_sshd(state, h, settings)
        if stack:
            state.stack = True
            save_state(home, state)
            echo("starting the stack on h0 (Prefect server, MLflow server) ...")
            start_stack(state, config, settings)
            start_worker(state, settings)
            if deploy is not None:
                deploy(state)
    except BaseException:
        if fresh:
            remove_cluster(home, settings, echo=lambda _: None)
        raise
    return state


def status_rows(state: ClusterState) -> list[dict[str, str]]:
    import httpx

    rows = []
    present = set(netns_names())
    u = urls(state)
    for h in state.hosts:
        services = []
        for key, rec in state.processes.items():
            if key.startswith(f"{h.name}/"):
                services.append(f"{key.split('/', 1)[1]} {'running' if is_running(rec) else 'STOPPED'}")
        if "stack" in h.roles and state.stack:
            for name, path in HEALTH_PATHS.items():
                try:
                    auth = prefect_auth(state) if name == "prefect" else None
                    ok = h.netns in present and httpx.get(u[name] + path, timeout=3, auth=auth).status_code == 200
                except httpx.HTTPError:
                    ok = False
                services.append(f"{name} {'healthy' if ok else 'DOWN'}")
        rows.append(
            {
                "host": h.name,
                "address": h.address,
                "netns": h.netns + ("" if h.netns in present else " (MISSING)"),
                "roles": ",".join(h.roles),
                "services": ", ".join(services) or "-",
            }
        )
    return rows


def print_status(state: ClusterState, echo: Callable[[str], object] = print) -> None:
    echo(f"cluster {state.prefix}: subnet {state.subnet}, shared home {state.shared_home}")
    cols = ["host", "address", "netns", "roles", "services"]
    rows = status_rows(state)
    width = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    echo("  ".join(c.ljust(width[c]) for c in cols).rstrip())
    for r in rows:
        echo("  ".join(r[c].ljust(width[c]) for c in cols).rstrip())
    if state.stack:
        u = urls(state)
        echo(f"Prefect UI  {u['prefect']}   (work pool {WORK_POOL}, worker on h1)")
        echo(f"MLflow UI   {u['mlflow']}")
        echo(f"Evidently UI {u['evidently']}   (workspace {evidently_workspace(Path(state.shared_home))})")

"""``training.launcher: mpijob``: the training run as a Kubeflow MPI Operator ``MPIJob``.

Plain Python (no Prefect), like :mod:`training.launch`. :func:`render_mpijob` builds the
``kubeflow.org/v2beta1`` MPIJob from the config: the launcher runs the same
:func:`~training.launch.horovodrun_command` the train task runs locally, on the operator's
hostfile (``/etc/mpi/hostfile``, one line per worker pod), and the workers run ``sshd``. The
secrets reach the ranks as a file only: the Kubernetes Secret ``training.mpijob.secret`` is
mounted read-only (0400) and only its *path* (``RINGFLOW_SECRETS_FILE``) is in the environment,
which horovodrun copies onto every rank's command line (training/secrets.py).

:func:`validate_mpijob` checks a document against the operator's own CRD schema (committed in
``infra/k8s/schemas/``) before anything is submitted. :func:`run_mpijob` submits it with
``kubectl``, streams the launcher's log through :class:`~training.launch.RankOutput` and waits
for its end; that part needs a cluster and is not exercised by the tests (infra/kubernetes.md).
"""

from __future__ import annotations

import copy
import json
import math
import queue
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from ringflow.training.config import PipelineConfig
from ringflow.training.launch import RankOutput, TrainingError, TrainingTimeout, horovodrun_command
from ringflow.training.secrets import SECRETS_FILE_ENV, is_secret

API_VERSION = "kubeflow.org/v2beta1"
CRD_FILE = Path(str(resources.files("ringflow.infra") / "k8s" / "schemas" / "kubeflow.org_mpijobs.yaml"))
OPERATOR_HOSTFILE = "/etc/mpi/hostfile"
"""Where the MPI Operator mounts the hostfile it writes for the launcher (``host slots=N``)."""
SECRETS_DIR = "/etc/ringflow/secrets"
SECRETS_KEY = "secrets.json"
SECRETS_PATH = f"{SECRETS_DIR}/{SECRETS_KEY}"
_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,50}[a-z0-9])?$")


class MPIJobError(ValueError):
    """The rendered MPIJob does not validate against the operator's CRD schema (the message names
    the field); nothing was submitted."""


def mpijob_name(run_id: str, attempt: int = 1) -> str:
    """``ringflow-<run id prefix>-a<attempt>``: a DNS label, unique per MLflow run and attempt."""
    return f"ringflow-{run_id[:12].lower()}-a{attempt}"


def render_mpijob(
    cfg: PipelineConfig,
    manifest_path: str | Path,
    output_dir: str | Path,
    home: str | Path,
    name: str,
    env: dict[str, str | None] | None = None,
    resume: bool = False,
    labels: dict[str, str] | None = None,
    program_args: Sequence[str] = (),
) -> dict[str, Any]:
    """The MPIJob for this config. ``home`` (``RINGFLOW_HOME``) is where the ``training.mpijob.pvc``
    claim is mounted in every pod: the manifest, the shards and ``output_dir`` must lie under it.
    ``env``: plain variables for the launcher (horovodrun passes them to the ranks); a secret
    among them is refused: secrets go in the Secret ``training.mpijob.secret``."""
    tc, mj = cfg.training, cfg.training.mpijob
    if tc.elastic.enabled:
        raise ValueError(
            "training.elastic.enabled with training.launcher=mpijob: the MPIJob has a fixed number "
            "of workers; use launcher horovodrun for elastic training"
        )
    if not _NAME.match(name):
        raise ValueError(f"MPIJob name {name!r} is not a DNS label (lower-case letters, digits, '-')")
    home = Path(home)
    for what, p in (("manifest", manifest_path), ("output directory", output_dir)):
        if not Path(p).is_relative_to(home):
            raise ValueError(
                f"the {what} {p} is not under RINGFLOW_HOME={home}, the mount of "
                f"training.mpijob.pvc={mj.pvc}: the MPIJob's pods would not see it"
            )
    env = {k: v for k, v in (env or {}).items() if v is not None}
    leaked = sorted(k for k, v in env.items() if v and is_secret(k))
    if leaked:
        raise ValueError(
            f"secret variables {leaked} would be in the MPIJob's pod spec and every rank's argv: put "
            f"them in the Secret training.mpijob.secret={mj.secret} (key {SECRETS_KEY}) instead"
        )
    command = horovodrun_command(
        cfg,
        manifest_path,
        output_dir,
        resume=resume,
        python=mj.python,
        hostfile=OPERATOR_HOSTFILE,
        program_args=program_args,
    )
    launcher_env = {"PYTHONUNBUFFERED": "1", "RINGFLOW_HOME": str(home), **env, SECRETS_FILE_ENV: SECRETS_PATH}
    volumes = [
        {"name": "ringflow-home", "persistentVolumeClaim": {"claimName": mj.pvc}},
        # 0400: training.secrets.load_secrets refuses a file others can read
        {
            "name": "secrets",
            "secret": {
                "secretName": mj.secret,
                "defaultMode": 0o400,
                "items": [{"key": SECRETS_KEY, "path": SECRETS_KEY}],
            },
        },
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": mj.shm_size}},
    ]
    mounts = [
        {"name": "ringflow-home", "mountPath": str(home)},
        {"name": "secrets", "mountPath": SECRETS_DIR, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    workers = math.ceil(tc.world_size / mj.slots_per_worker)
    worker_resources = {"cpu": mj.worker_cpu, "memory": mj.worker_memory}

    def pod(container: dict[str, Any]) -> dict[str, Any]:
        return copy.deepcopy(
            {
                "metadata": {"labels": dict(labels or {})},
                "spec": {
                    "containers": [
                        {
                            "image": mj.image,
                            "imagePullPolicy": mj.image_pull_policy,
                            "volumeMounts": mounts,
                            **container,
                        }
                    ],
                    "volumes": volumes,
                },
            }
        )

    return {
        "apiVersion": API_VERSION,
        "kind": "MPIJob",
        "metadata": {
            "name": name,
            "namespace": mj.namespace,
            "labels": {
                "app.kubernetes.io/name": "ringflow",
                "app.kubernetes.io/component": "training",
                **(labels or {}),
            },
        },
        "spec": {
            "slotsPerWorker": mj.slots_per_worker,
            "mpiImplementation": "OpenMPI",  # the hostfile format horovodrun --hostfile reads
            "launcherCreationPolicy": "WaitForWorkersReady",
            "sshAuthMountPath": mj.ssh_auth_mount_path,
            "runPolicy": {"cleanPodPolicy": "Running", "backoffLimit": 0, "activeDeadlineSeconds": tc.timeout_s},
            "mpiReplicaSpecs": {
                "Launcher": {
                    "replicas": 1,
                    "restartPolicy": "Never",
                    "template": pod(
                        {
                            "name": "launcher",
                            "command": command,
                            "env": [{"name": k, "value": v} for k, v in launcher_env.items()],
                            "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}},
                        }
                    ),
                },
                "Worker": {
                    "replicas": workers,
                    "restartPolicy": "Never",
                    "template": pod(
                        {
                            "name": "worker",
                            "command": ["/usr/sbin/sshd", "-De"],
                            "resources": {"requests": worker_resources, "limits": dict(worker_resources)},
                        }
                    ),
                },
            },
        },
    }


# --------------------------------------------------------------------------- validation


def crd_schema(crd_file: Path = CRD_FILE) -> dict[str, Any]:
    """The ``v2beta1`` openAPIV3Schema of the committed MPIJob CRD, closed: an object schema
    with ``properties`` accepts no other field, as the API server's strict field validation
    (kubectl's default) refuses unknown fields instead of dropping them."""
    import yaml

    crd = yaml.safe_load(Path(crd_file).read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == API_VERSION.split("/")[1])
    schema = _closed(version["schema"]["openAPIV3Schema"])
    if not isinstance(schema, dict):
        raise MPIJobError(f"{crd_file}: the {API_VERSION} openAPIV3Schema is not an object")
    return schema


def _closed(node: Any) -> Any:
    if isinstance(node, list):
        return [_closed(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _closed(v) for k, v in node.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return out


_schema_cache: dict[Path, dict[str, Any]] = {}


def validate_mpijob(doc: dict[str, Any], crd_file: Path = CRD_FILE) -> None:
    """MPIJobError naming every field of ``doc`` that the operator's CRD schema refuses."""
    import jsonschema

    if crd_file not in _schema_cache:
        _schema_cache[crd_file] = crd_schema(crd_file)
    validator = jsonschema.Draft7Validator(_schema_cache[crd_file])
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    if doc.get("apiVersion") != API_VERSION or doc.get("kind") != "MPIJob":
        raise MPIJobError(f"not an {API_VERSION} MPIJob: apiVersion={doc.get('apiVersion')!r} kind={doc.get('kind')!r}")
    name = (doc.get("metadata") or {}).get("name", "")
    if not _NAME.match(str(name)):
        raise MPIJobError(f"metadata.name {name!r} is not a DNS label")
    if errors:
        lines = [f"  {'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:300]}" for e in errors[:10]]
        raise MPIJobError(
            f"MPIJob {name} does not match the MPI Operator's CRD ({Path(crd_file).name}):\n" + "\n".join(lines)
        )


# --------------------------------------------------------------------------- submitting (needs a cluster)


class InfoLogger(Protocol):
    """Where the launcher's log lines go (a logger, or the train task's progress reporter)."""

    def info(self, msg: str, /) -> None: ...


def kubectl(
    *args: str, input: str | None = None, check: bool = True, kubectl_bin: str = "kubectl"
) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([kubectl_bin, *args], input=input, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise TrainingError(f"kubectl {' '.join(args[:3])} exited {p.returncode}: {p.stderr.strip()[-2000:]}")
    return p


def mpijob_state(name: str, namespace: str) -> tuple[str | None, str]:
    """(``Succeeded`` | ``Failed`` | None while running, the condition's message)."""
    status = json.loads(kubectl("get", "mpijob", name, "-n", namespace, "-o", "json").stdout).get("status") or {}
    for cond in status.get("conditions") or []:
        if cond.get("type") in ("Succeeded", "Failed") and cond.get("status") == "True":
            return cond["type"], cond.get("message", "")
    return None, ""


def run_mpijob(
    doc: dict[str, Any], timeout_s: float, log_file: Path, logger: InfoLogger, poll_s: float = 5.0
) -> RankOutput:
    """Submit ``doc``, stream the launcher's log (every rank's output, as horovodrun prints it) into
    ``log_file`` and ``logger``, and wait for the MPIJob's end. Raises :class:`TrainingError`
    naming the first failing rank, or :class:`TrainingTimeout`; the MPIJob is deleted on timeout,
    error or cancellation (its pods with it)."""
    if shutil.which("kubectl") is None:
        raise TrainingError(
            "training.launcher=mpijob needs kubectl on PATH (and a kubeconfig or in-cluster "
            "service account allowed to create MPIJobs)",
            retryable=False,
        )
    validate_mpijob(doc)
    name, ns = doc["metadata"]["name"], doc["metadata"]["namespace"]
    output = RankOutput()
    kubectl("create", "-f", "-", input=json.dumps(doc))
    lines: queue.Queue[str] = queue.Queue()
    seen = threading.Event()  # the launcher's log has started: never follow it a second time (no duplicates)

    def follow() -> subprocess.Popen[str]:
        # the launcher Job exists only once the workers are ready: until its log starts, retry
        p = subprocess.Popen(
            ["kubectl", "logs", "-f", "-n", ns, f"job/{name}-launcher", "--pod-running-timeout=60s"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            text=True,
        )

        out = p.stdout
        if out is None:  # stdout=PIPE above
            raise RuntimeError("kubectl logs started without a pipe")

        def pump() -> None:
            for line in out:
                seen.set()
                lines.put(line)

        threading.Thread(target=pump, daemon=True, name=f"mpijob-log-{name}").start()
        return p

    logs = follow()
    deadline = time.monotonic() + timeout_s
    state: str | None = None
    message, finished = "", False
    ended_at = math.inf  # when the MPIJob's end was seen
    try:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "a") as sink:
            sink.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} MPIJob {ns}/{name}\n")
            next_poll = 0.0
            while True:
                try:
                    line = lines.get(timeout=1.0)
                    sink.write(line)
                    output.feed(line)
                    logger.info(line.rstrip())
                    continue
                except queue.Empty:
                    pass
                now = time.monotonic()
                if now >= deadline:
                    raise TrainingTimeout(f"MPIJob {ns}/{name} exceeded training.timeout_s={timeout_s:g}s; deleted it")
                if state is None and now >= next_poll:
                    state, message = mpijob_state(name, ns)
                    next_poll = now + poll_s
                    if state is not None:
                        ended_at = now
                    elif logs.poll() is not None and not seen.is_set():
                        logs = follow()
                if state is not None and ((logs.poll() is not None and lines.empty()) or now - ended_at > 30):
                    break  # ended, and its log read to the end (or given 30 s to arrive)
        finished = True
    finally:
        if logs.poll() is None:
            logs.terminate()
            logs.wait(5)
        if not finished or state == "Failed":
            kubectl("delete", "mpijob", name, "-n", ns, "--ignore-not-found", "--wait=false", check=False)
    if state == "Failed":
        err = output.failure_message(1)
        err.args = (f"MPIJob {ns}/{name} failed ({message}): {err}",)
        raise err
    return output


def main(argv: list[str] | None = None) -> None:
    """``python -m ringflow.training.mpijob -c CONFIG --manifest M --output-dir O``: print the MPIJob (YAML)
    the train task would submit, validated, for a look or a ``kubectl create -f -`` by hand."""
    import argparse
    import sys

    import yaml

    from ringflow.training.config import ConfigError, load_config

    ap = argparse.ArgumentParser(prog="python -m ringflow.training.mpijob", description=main.__doc__)
    ap.add_argument("-c", "--config", type=Path)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--manifest", required=True, help="manifest.json under --home")
    ap.add_argument("--output-dir", required=True, help="the run's output directory under --home")
    ap.add_argument("--home", default="/ringflow", help="RINGFLOW_HOME in the pods (the claim's mount)")
    ap.add_argument("--name", default="ringflow-example-a1")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="a plain launcher variable")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        env = dict(e.split("=", 1) for e in args.env)
        doc = render_mpijob(cfg, args.manifest, args.output_dir, args.home, args.name, env=env)
        validate_mpijob(doc)
    except (ConfigError, ValueError) as e:
        sys.exit(f"error: {e}")
    sys.stdout.write(yaml.safe_dump(doc, sort_keys=False, width=120))


if __name__ == "__main__":
    main()

"""infra/k8s without a cluster: every manifest against the Kubernetes schemas (kubernetes-validate,
offline), the MPIJob against the MPI Operator's own CRD schema, the work pool template on the real
Prefect server of the tests. What only a cluster shows is listed in infra/kubernetes.md."""

from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from ringflow.infra.stack_settings import HEALTH_PATHS
from ringflow.monitoring.events import MONITORING_DEPLOYMENT, TRAINING_DEPLOYMENT
from ringflow.training.config import ConfigError, load_config
from ringflow.training.launch import check_launchable
from ringflow.training.mpijob import (
    CRD_FILE,
    OPERATOR_HOSTFILE,
    SECRETS_PATH,
    MPIJobError,
    mpijob_name,
    render_mpijob,
    validate_mpijob,
)

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "infra" / "k8s"
K8S_VERSION = "1.33"
"""The Kubernetes API the manifests are checked against (kubernetes-validate's bundled schemas)."""


def k8s_validate(doc: dict) -> None:
    # strict: an unknown field is an error (kubectl's default server-side field validation)
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def pod_template(template: dict) -> dict:
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}


def test_kubernetes_validate_is_offline_and_strict(monkeypatch):
    import socket

    def no_network(*a, **k):
        raise AssertionError("kubernetes-validate tried the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    k8s_validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"a": "b"}})
    with pytest.raises(kubernetes_validate.ValidationError):
        k8s_validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "dat": {"a": "b"}})


def test_every_server_manifest_validates():
    docs = [d for d in yaml.safe_load_all((K8S / "servers.yaml").read_text()) if d]
    kinds = {d["kind"] for d in docs}
    assert {"StatefulSet", "Deployment", "Service", "PersistentVolumeClaim", "Role", "RoleBinding"} <= kinds
    for d in docs:
        k8s_validate(d)
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {("Deployment", "mlflow"), ("Deployment", "prefect-server"), ("StatefulSet", "postgres")} <= names
    init = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "postgres-init")
    assert init["data"]["10-ringflow.sh"] == (ROOT / "infra" / "postgres-init.sh").read_text()
    # no password in any manifest: every one comes from the Secret, by reference
    text = (K8S / "servers.yaml").read_text()
    for d in docs:
        for c in d.get("spec", {}).get("template", {}).get("spec", {}).get("containers") or []:
            for e in c.get("env", []):
                if "PASSWORD" in e["name"]:
                    assert "secretKeyRef" in e.get("valueFrom", {}), (d["metadata"]["name"], e)
    assert "password:" not in text.lower()
    # the servers' readiness probes ask the health paths `ringflow up` and `status` ask (one home)
    probes = {
        d["metadata"]["name"]: d["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"]
        for d in docs
        if d["kind"] == "Deployment" and d["metadata"]["name"] in ("prefect-server", "mlflow")
    }
    assert probes == {"prefect-server": HEALTH_PATHS["prefect"], "mlflow": HEALTH_PATHS["mlflow"]}


def test_the_crd_is_the_operators_with_its_version():
    crd = yaml.safe_load(CRD_FILE.read_text())
    assert crd["metadata"]["name"] == "mpijobs.kubeflow.org"
    assert [v["name"] for v in crd["spec"]["versions"]] == ["v2beta1"]
    readme = (K8S / "schemas" / "README.md").read_text()
    assert "v0.8.0" in readme and "kubeflow/mpi-operator" in readme


def test_the_crd_schema_refuses_what_the_operator_would(tmp_path):
    cfg = load_config(ROOT / "configs" / "smoke.yaml", ["training.launcher=mpijob"])
    good = render_mpijob(cfg, "/ringflow/data/m/manifest.json", "/ringflow/runs/r", "/ringflow", "ringflow-x-a1")
    validate_mpijob(good)
    bad = copy.deepcopy(good)
    worker = bad["spec"]["mpiReplicaSpecs"]["Worker"]
    worker["template"]["spec"]["containers"][0]["volumeMount"] = []  # misspelled field
    worker["replicas"] = "two"  # wrong type
    bad["spec"]["mpiImplementation"] = "OpenMPI4"  # not in the enum
    with pytest.raises(MPIJobError) as e:
        validate_mpijob(bad)
    msg = str(e.value)
    assert "volumeMount" in msg and "spec.mpiReplicaSpecs.Worker.replicas" in msg and "spec.mpiImplementation" in msg


def test_the_mpijob_the_train_task_submits_validates_and_keeps_secrets_in_a_file():
    cfg = load_config(
        ROOT / "configs" / "flights.yaml",
        [
            "training.launcher=mpijob",
            "training.world_size=4",
            "training.mpijob.slots_per_worker=2",
            "training.mpijob.image=registry.example/ringflow:1",
        ],
    )
    run_id = "0123456789abcdef0123456789abcdef"
    doc = render_mpijob(
        cfg,
        "/ringflow/data/abc/manifest.json",
        f"/ringflow/runs/{run_id}",
        "/ringflow",
        mpijob_name(run_id, 2),
        resume=True,
        env={
            "MLFLOW_TRACKING_URI": "http://mlflow.ringflow.svc:5000",
            "MLFLOW_RUN_ID": run_id,
            "HOROVOD_TIMELINE": None,
        },
        labels={"ringflow/mlflow-run-id": run_id},
    )
    validate_mpijob(doc)
    assert doc["metadata"]["name"] == "ringflow-0123456789ab-a2"
    spec = doc["spec"]
    assert spec["slotsPerWorker"] == 2 and spec["mpiReplicaSpecs"]["Worker"]["replicas"] == 2
    assert spec["runPolicy"]["activeDeadlineSeconds"] == cfg.training.timeout_s
    for role in ("Launcher", "Worker"):
        k8s_validate(pod_template(spec["mpiReplicaSpecs"][role]["template"]))

    launcher = spec["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]
    cmd = launcher["command"]
    assert cmd[0] == "/usr/local/bin/horovodrun" and cmd[cmd.index("-np") + 1] == "4"
    assert cmd[cmd.index("--hostfile") + 1] == OPERATOR_HOSTFILE and "-H" not in cmd
    assert cmd[cmd.index("-m") + 1] == "ringflow.training.train" and cmd[-1] == "--resume"
    assert load_config(None).model_validate_json(cmd[cmd.index("--config-json") + 1]) == cfg
    env = {e["name"]: e["value"] for e in launcher["env"]}
    assert env["RINGFLOW_SECRETS_FILE"] == SECRETS_PATH and env["MLFLOW_RUN_ID"] == run_id
    assert "HOROVOD_TIMELINE" not in env
    # the secret is a read-only 0400 file in every pod, from the Secret; never an env value
    for role in ("Launcher", "Worker"):
        pod = spec["mpiReplicaSpecs"][role]["template"]["spec"]
        secret = next(v["secret"] for v in pod["volumes"] if "secret" in v)
        assert secret == {
            "secretName": "ringflow-training-secrets",
            "defaultMode": 0o400,
            "items": [{"key": "secrets.json", "path": "secrets.json"}],
        }
        c = pod["containers"][0]
        assert all("valueFrom" not in e for e in c.get("env", [])) and "envFrom" not in c
        assert {"name": "ringflow-home", "mountPath": "/ringflow"} in c["volumeMounts"]


def test_render_refuses_what_the_mpijob_cannot_run():
    cfg = load_config(ROOT / "configs" / "smoke.yaml", ["training.launcher=mpijob"])
    with pytest.raises(ValueError, match="RINGFLOW_DATA_KEY.*training.mpijob.secret"):
        render_mpijob(cfg, "/h/m.json", "/h/out", "/h", "ringflow-x-a1", env={"RINGFLOW_DATA_KEY": "k"})
    with pytest.raises(ValueError, match="not under RINGFLOW_HOME=/h"):
        render_mpijob(cfg, "/elsewhere/m.json", "/h/out", "/h", "ringflow-x-a1")
    elastic = load_config(
        ROOT / "configs" / "smoke.yaml", ["training.launcher=mpijob", "training.elastic.enabled=true"]
    )
    with pytest.raises(ValueError, match="training.elastic.enabled"):
        render_mpijob(elastic, "/h/m.json", "/h/out", "/h", "ringflow-x-a1")
    with pytest.raises(ValueError, match="training.elastic.enabled"):
        check_launchable(elastic, 2)  # the train task's first check, before any MLflow run
    with pytest.raises(ConfigError, match="training.launcher"):
        load_config(ROOT / "configs" / "smoke.yaml", ["training.launcher=slurm"])


# --------------------------------------------------------------------------- the work pool


def _job_manifest(template: dict, job_variables: dict) -> dict:
    """The Job a Kubernetes worker would create: Prefect's own templating of the pool's
    job_configuration with the variables' defaults and the deployment's job variables, then what
    prefect-kubernetes does to it (env dict -> list, the command as args)."""
    from prefect.utilities.templating import apply_values
    from prefect.workers.base import BaseJobConfiguration

    values = {**BaseJobConfiguration._get_base_config_defaults(template["variables"]["properties"]), **job_variables}
    values["name"] = values.get("name") or "flow-run-1"
    values["command"] = values.get("command") or "prefect flow-run execute"
    conf = apply_values(template["job_configuration"], values)
    job = conf["job_manifest"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    container["env"] = [{"name": k, "value": v} for k, v in (container.get("env") or {}).items()]
    container["args"] = shlex.split(container["args"])
    job["metadata"]["name"] = job["metadata"].pop("generateName") + "abcde"
    return job


def test_work_pool_template_renders_a_valid_job():
    template = json.loads((K8S / "work-pool.json").read_text())
    job = _job_manifest(template, {"image": "registry.example/ringflow:1", "cpu_request": "4", "memory_request": "8Gi"})
    k8s_validate(job)
    pod = job["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "ringflow-flows" and job["metadata"]["namespace"] == "ringflow"
    c = pod["containers"][0]
    assert c["envFrom"] == [{"secretRef": {"name": "ringflow-flow-secrets", "optional": True}}]
    env = {e["name"]: e["value"] for e in c["env"]}
    mount = next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == "ringflow-home")
    assert env["RINGFLOW_HOME"] == mount == "/ringflow"  # the MPIJob mounts the same claim there
    assert not any("PASSWORD" in k or "AUTH" in k for k in env)


def test_prefect_server_creates_the_kubernetes_pool_and_checks_job_variables(prefect_harness):
    from prefect import get_client
    from prefect.exceptions import PrefectHTTPStatusError

    from ringflow.flows.deployments import create_kubernetes_pool, deploy_to_kubernetes

    pool = create_kubernetes_pool("ringflow-k8s-test")
    assert pool.type == "kubernetes"
    assert pool.base_job_template == json.loads((K8S / "work-pool.json").read_text())
    create_kubernetes_pool("ringflow-k8s-test")  # again: updated, not refused

    cfg = load_config(ROOT / "configs" / "smoke.yaml", ["training.launcher=mpijob"])
    ids = deploy_to_kubernetes(
        cfg,
        "ringflow-k8s-test",
        "registry.example/ringflow:1",
        {"cpu_request": "4", "memory_request": "8Gi", "finished_job_ttl": 600},
    )
    assert set(ids) == {TRAINING_DEPLOYMENT, MONITORING_DEPLOYMENT}
    with get_client(sync_client=True) as client:
        dep = client.read_deployment(ids[TRAINING_DEPLOYMENT])
    assert dep.work_pool_name == "ringflow-k8s-test"
    assert dep.job_variables["image"] == "registry.example/ringflow:1" and dep.job_variables["cpu_request"] == "4"
    assert dep.parameters["config"]["training"]["launcher"] == "mpijob"

    # the server validates job variables against the template's schema: a wrong type is refused
    with pytest.raises(PrefectHTTPStatusError, match=r"a day\\*' is not valid under any of the given schemas"):
        deploy_to_kubernetes(cfg, "ringflow-k8s-test", "registry.example/ringflow:1", {"finished_job_ttl": "a day"})
    with get_client(sync_client=True) as client:
        assert client.read_deployment(dep.id).job_variables["finished_job_ttl"] == 600  # unchanged


def test_the_example_mpijob_validates_and_the_cli_prints_what_the_task_renders(capsys):
    from ringflow.training.mpijob import main

    doc = yaml.safe_load((K8S / "mpijob.example.yaml").read_text())
    validate_mpijob(doc)
    for role in ("Launcher", "Worker"):
        k8s_validate(pod_template(doc["spec"]["mpiReplicaSpecs"][role]["template"]))
    # the example is what its header's command prints today: a config or launcher change that
    # leaves it stale (an old module path, old defaults) fails here
    flights = load_config(ROOT / "configs" / "flights.yaml", ["training.launcher=mpijob"])
    run_id = "<mlflow run id>"
    env = {"MLFLOW_TRACKING_URI": "http://mlflow.ringflow.svc:5000", "MLFLOW_RUN_ID": run_id}
    assert doc == render_mpijob(
        flights,
        "/ringflow/data/<fingerprint>/manifest.json",
        f"/ringflow/runs/{run_id}",
        "/ringflow",
        "ringflow-example-a1",
        env=env,
    ), "infra/k8s/mpijob.example.yaml is stale: regenerate it with the command in its header"

    main(
        [
            "-c",
            str(ROOT / "configs" / "smoke.yaml"),
            "--set",
            "training.launcher=mpijob",
            "--manifest",
            "/ringflow/data/f/manifest.json",
            "--output-dir",
            "/ringflow/runs/r",
            "--name",
            "ringflow-r-a1",
        ]
    )
    printed = yaml.safe_load(capsys.readouterr().out)
    cfg = load_config(ROOT / "configs" / "smoke.yaml", ["training.launcher=mpijob"])
    assert printed == render_mpijob(
        cfg, "/ringflow/data/f/manifest.json", "/ringflow/runs/r", "/ringflow", "ringflow-r-a1"
    )
    with pytest.raises(SystemExit, match="not under RINGFLOW_HOME=/ringflow"):
        main(["--manifest", "/elsewhere/manifest.json", "--output-dir", "/ringflow/runs/r"])

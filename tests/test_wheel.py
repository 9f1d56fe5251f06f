"""ringflow as a tool in someone else's environment: the wheel, installed with the lock into a new
virtual environment with no checkout on its path, run from another directory.

The install commands are README's "Install into your own environment" block, run as written.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.horovod, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]


def _readme_install_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Install into your own environment", 1)[1]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def _user_env(env_dir: Path, work: Path) -> dict[str, str]:
    """A user's shell: no project venv on PATH, nothing of the checkout importable, own homes."""
    path = [p for p in os.environ["PATH"].split(os.pathsep) if not p.startswith(sys.prefix)]
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "VIRTUAL_ENV", "MLFLOW_TRACKING_URI", "PREFECT_API_URL", "RINGFLOW_HOME")
    }
    return {
        **env,
        "PATH": os.pathsep.join(path),
        "ENV": str(env_dir),
        "WORK": str(work),
        "RINGFLOW_HOME": str(work / "home"),
        "PREFECT_HOME": str(work / "prefect"),
    }


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """README's block: wheel, venv, lock, ringflow, Horovod, then a smoke run to a champion."""
    base = tmp_path_factory.mktemp("user")
    env_dir, work = base / "env", base / "work"
    work.mkdir()
    env = _user_env(env_dir, work)
    out = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", _readme_install_block()],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return env_dir, work, env, out.stdout


def test_smoke_run_from_the_wheel_registers_a_champion(installed):
    env_dir, work, _, stdout = installed
    assert re.search(r"^ringflow \d+\.\d+\.\d+ \(commit ", stdout, re.M)  # --version
    assert "status=completed" in stdout and re.search(r"model version  \S+ v1 .*PROMOTED", stdout), stdout[-3000:]
    assert not list(work.glob("configs")), "the packaged config was used, not a checkout's"


def test_only_ringflow_is_installed(installed):
    env_dir, work, env, _ = installed
    py = str(env_dir / "bin" / "python")
    for generic in ("flows", "tasks", "training", "monitoring", "infra", "configs"):
        out = subprocess.run([py, "-c", f"import {generic}"], cwd=work, env=env, capture_output=True, text=True)
        assert out.returncode != 0 and "ModuleNotFoundError" in out.stderr, generic
    out = subprocess.run(
        [
            py,
            "-c",
            "import ringflow.training, ringflow.infra.stack, ringflow.flows.cli; print(ringflow.training.__file__)",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(env_dir)) and str(ROOT) not in out.stdout


def test_the_wheel_ships_the_kubernetes_files(installed):
    """ringflow deploy's Kubernetes work-pool template and the MPIJob manifests and schema: data in
    ringflow.infra.k8s, found through the package."""
    env_dir, work, env, _ = installed
    probe = (
        "from importlib import resources; k8s = resources.files('ringflow.infra') / 'k8s'; "
        "print(*sorted(p.name for p in k8s.iterdir()), *sorted(p.name for p in (k8s / 'schemas').iterdir()))"
    )
    out = subprocess.run(
        [str(env_dir / "bin" / "python"), "-c", probe], cwd=work, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    shipped = set(out.stdout.split())
    assert {"work-pool.json", "mpijob.example.yaml", "servers.yaml", "kubeflow.org_mpijobs.yaml"} <= shipped, shipped


def test_elastic_run_finds_the_packaged_discovery_script(installed):
    """Elastic mode runs infra/discover_hosts.sh: shipped in the wheel, found through the package."""
    env_dir, work, env, _ = installed
    out = subprocess.run(
        [
            str(env_dir / "bin" / "ringflow"),
            "run",
            "-c",
            "smoke",
            "--set",
            "training.elastic.enabled=true",
            "--set",
            "training.elastic.min_np=1",
            "--set",
            "training.elastic.max_np=2",
            "--set",
            "training.epochs=2",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "status=completed" in out.stdout
    where = subprocess.run(
        [
            str(env_dir / "bin" / "python"),
            "-c",
            "from ringflow.training.launch import DISCOVER_HOSTS as d; print(d.is_file(), d)",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert where[0] == "True" and where[1].startswith(str(env_dir)), where

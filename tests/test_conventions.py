"""What users of the stack expect by convention: declared dependencies, telemetry off, the torch
source a Makefile variable (issue 14)."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

from ringflow.tasks import artifacts
from ringflow.tasks.training_artifacts import AUTOTUNE_FILE, TIMELINE_FILE

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_PACKAGES = ["flows", "infra", "tasks", "monitoring", "training"]
"""The floors, top to bottom: a module imports its own floor and those below, never one above."""
LOCAL_MODULES = {"ringflow", "tests", "benchmarks"}
NOT_FROM_AN_INDEX = {
    # built from a patched sdist by infra/install_horovod.sh (make install), see pyproject.toml
    "horovod",
}


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(spec: str) -> str:
    return _normalized(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", spec).group(0))


def _imported_modules(paths: list[Path]) -> dict[str, Path]:
    """Top-level module -> a file importing it (absolute imports, also those inside functions)."""
    found: dict[str, Path] = {}
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], path)
    return found


def _undeclared(paths: list[Path], declared: set[str]) -> list[str]:
    dists = packages_distributions()
    missing = []
    for module, where in sorted(_imported_modules(paths).items()):
        if module in sys.stdlib_module_names or module in LOCAL_MODULES or module in NOT_FROM_AN_INDEX:
            continue
        provided_by = {_normalized(d) for d in dists.get(module, [])}
        assert provided_by, f"{where.relative_to(ROOT)} imports {module!r}, which no installed distribution provides"
        if not provided_by & declared:
            missing.append(f"{module} ({' or '.join(sorted(provided_by))}, imported by {where.relative_to(ROOT)})")
    return missing


def _ringflow_imports(path: Path) -> set[str]:
    """The ringflow floors a module imports (``ringflow.<floor>``), also inside functions."""
    floors = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names = (
            [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else [node.module]
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
            else []
        )
        for name in names:
            parts = name.split(".")
            if parts[0] in RUNTIME_PACKAGES:
                raise AssertionError(
                    f"{path.relative_to(ROOT)} imports {name!r}: the installed name is ringflow.{name}"
                )
            if parts[0] == "ringflow" and len(parts) > 1:
                floors.add(parts[1])
    return floors


def test_imports_follow_the_floors():
    """flows -> infra -> tasks -> monitoring -> training: no arrow runs up (and so no cycle between
    floors); training never imports Prefect; every import uses the installed name ``ringflow.*``."""
    rank = {pkg: i for i, pkg in enumerate(RUNTIME_PACKAGES)}
    upward = []
    for pkg in RUNTIME_PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            upward += [
                f"{path.relative_to(ROOT)} -> ringflow.{floor}"
                for floor in _ringflow_imports(path)
                if floor in rank and rank[floor] < rank[pkg]
            ]
    assert not upward, "imports against the floors: " + ", ".join(sorted(upward))
    for path in (ROOT / "training").rglob("*.py"):
        assert "prefect" not in _imported_modules([path]), f"{path.relative_to(ROOT)} imports Prefect"
    for path in [*(ROOT / "tests").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")]:
        _ringflow_imports(path)  # no old top-level names in helpers either


def test_every_directly_imported_package_is_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {_requirement_name(r) for r in project["dependencies"]}
    extras = project["optional-dependencies"]
    dev = runtime | {_requirement_name(r) for r in extras["dev"]}
    # a feature's optional extra (gate.baseline=lightgbm: ringflow[lightgbm]) is imported only
    # when the feature is chosen, and the code names the extra when it is missing
    optional = {_requirement_name(r) for name, reqs in extras.items() if name != "dev" for r in reqs}
    code = [p for pkg in RUNTIME_PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    assert not _undeclared(code, runtime | optional), "add to [project] dependencies (or a feature's extra)"
    helpers = [*(ROOT / "tests").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")]
    assert not _undeclared(helpers, dev), "add to [project.optional-dependencies] dev"


def _env_without(*prefixes: str) -> dict[str, str]:
    # MLflow also stays quiet under pytest or CI: drop those markers to see what the CLI does alone
    drop = (
        "PYTEST_",
        "CI",
        "GITHUB_",
        "MLFLOW_DISABLE_TELEMETRY",
        "DO_NOT_TRACK",
        "PREFECT_SERVER_ANALYTICS",
        *prefixes,
    )
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


def test_the_lock_pins_every_declared_dependency():
    """make install installs from requirements.lock: a dependency added to pyproject.toml and not
    re-locked (`make lock`) would be missing on a fresh machine, and an exact pin must agree."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.split("#")[0].strip().partition("==")
            pins[_normalized(name)] = version
    for spec in [*project["dependencies"], *project["optional-dependencies"]["dev"]]:
        name = _requirement_name(spec)
        assert name in pins, f"{spec} is declared in pyproject.toml but not in requirements.lock: run `make lock`"
        exact = re.search(r"==\s*([^,;\s]+)", spec)
        assert not exact or pins[name] == exact.group(1), f"requirements.lock has {name}=={pins[name]}, not {spec}"


def test_cli_turns_library_telemetry_off(tmp_path):
    probe = (
        "from ringflow.flows.cli import _prepare_environment; _prepare_environment()\n"
        "from mlflow.telemetry.utils import is_telemetry_disabled\n"
        "import os; print(is_telemetry_disabled(), os.environ['PREFECT_SERVER_ANALYTICS_ENABLED'],"
        " os.environ['DO_NOT_TRACK'])\n"
    )
    env = {**_env_without(), "RINGFLOW_HOME": str(tmp_path / "home")}
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "false", "true"]

    # a user who opts in keeps the choice
    env["MLFLOW_DISABLE_TELEMETRY"] = "false"
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "from ringflow.flows.cli import _prepare_environment; "
            "_prepare_environment(); import os; print(os.environ['MLFLOW_DISABLE_TELEMETRY'])",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.stdout.strip() == "false", out.stderr


def test_stack_services_send_no_telemetry(tmp_path, monkeypatch):
    from ringflow.infra.services import stack_services
    from ringflow.infra.stack_settings import StackSettings

    for key in ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK", "PREFECT_SERVER_ANALYTICS_ENABLED"):
        monkeypatch.delenv(key, raising=False)
    (tmp_path / "stack").mkdir()
    services = stack_services(StackSettings(), tmp_path, None)
    assert services
    for svc in services:
        assert svc.env["MLFLOW_DISABLE_TELEMETRY"] == "true", svc.name
        assert svc.env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false", svc.name
        assert svc.env["DO_NOT_TRACK"] == "true", svc.name


def test_stack_evidently_ui_reads_the_workspace_its_flow_runs_write(tmp_path):
    """``RINGFLOW_EVIDENTLY_WORKSPACE`` (``ringflow cluster`` sets it) reaches the UI and, through
    the serve process's environment, every monitoring run it executes."""
    from ringflow.infra.services import stack_services
    from ringflow.infra.stack_settings import StackSettings

    (tmp_path / "stack").mkdir()
    workspace = tmp_path / "shared" / "evidently"
    services = {s.name: s for s in stack_services(StackSettings(), tmp_path / "home", None, workspace=workspace)}
    ui = services["evidently"].cmd
    assert ui[ui.index("--workspace") + 1] == str(workspace)
    assert services["serve"].env["RINGFLOW_EVIDENTLY_WORKSPACE"] == str(workspace)
    default = {s.name: s for s in stack_services(StackSettings(), tmp_path, None)}["evidently"].cmd
    assert default[default.index("--workspace") + 1] == str(tmp_path / "evidently")


def _install_recipe(*make_args: str) -> str:
    out = subprocess.run(
        ["make", "-n", "-B", "-f", "Makefile", ".venv/.ringflow-installed", *make_args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return next(line for line in out.stdout.splitlines() if "pip install" in line and "torch==" in line)


def test_torch_source_is_a_makefile_variable():
    assert "--index-url" not in _install_recipe()  # empty: this machine's configured index
    cpu = "https://download.pytorch.org/whl/cpu"
    assert f"--index-url {cpu}" in _install_recipe(f"TORCH_INDEX={cpu}")


# --------------------------------------------------------------------------- Evidently


def _batch(rng, n: int, shift: float, unseen: float, missing: float):
    import numpy as np
    import pandas as pd

    from ringflow.monitoring.reports import PREDICTION

    df = pd.DataFrame(
        {
            "x": rng.normal(shift, 1, n),
            "c": rng.choice(["a", "b"], n),
            PREDICTION: rng.beta(2, 5 + 4 * shift, n),
            "target": rng.integers(0, 2, n),
        }
    )
    df.loc[: int(n * unseen) - 1, "c"] = "zzz"
    df.loc[: int(n * missing) - 1, "x"] = np.nan
    return df


@pytest.mark.slow
def test_evidently_report_shows_the_rule_values_and_the_workspace_trends_them(tmp_path):
    """The drift report carries the anomaly rules' numbers with their thresholds (Evidently's own
    metrics and tests); every snapshot lands in the workspace, and `evidently ui` serves the
    dashboard's series (drift share, prediction PSI, AUC) per batch, on the batches' dates."""
    import datetime as dt

    import httpx
    import numpy as np

    from ringflow.monitoring.reports import DASHBOARD_PANELS, EvidentlyWorkspace, RuleThresholds, build_reports

    rng = np.random.default_rng(0)
    reference = _batch(rng, 2000, 0.0, 0.0, 0.1)
    rules = RuleThresholds(
        prediction_psi=0.2, max_missing_increase=0.2, max_unseen_share=0.05, vocabulary={"c": ["a", "b"]}
    )
    workspace = EvidentlyWorkspace(path=str(tmp_path / "evidently"), project="flights-delay")
    calm = build_reports(
        reference,
        _batch(rng, 2000, 0.0, 0.0, 0.1),
        ["x"],
        ["c"],
        tmp_path / "calm",
        target="target",
        rules=rules,
        workspace=workspace,
        batch_label="2013-03",
        batch_time=dt.datetime(2013, 3, 1),
    )
    shifted = build_reports(
        reference,
        _batch(rng, 2000, 1.0, 0.2, 0.5),
        ["x"],
        ["c"],
        tmp_path / "shifted",
        target="target",
        rules=rules,
        workspace=workspace,
        batch_label="2013-04",
        batch_time=dt.datetime(2013, 4, 1),
    )

    assert all(c.passed for c in calm.rule_checks), calm.rule_checks
    failed = {(c.rule, c.column): c for c in shifted.rule_checks if not c.passed}
    assert set(failed) == {("missing_share", "x"), ("unseen_share", "c"), ("prediction_psi", "prediction")}, failed
    assert failed[("missing_share", "x")].value == pytest.approx(0.5)
    assert failed[("missing_share", "x")].threshold == pytest.approx(0.3)  # reference 0.1 + 0.2
    assert failed[("unseen_share", "c")].value == pytest.approx(0.2, abs=0.01)
    assert shifted.prediction_drift.method == "psi" and shifted.prediction_drift.threshold == 0.2
    report = json.loads(Path(shifted.drift_json).read_text())
    tested = {t["metric_config"]["params"]["type"].rsplit(":", 1)[1] for t in report["tests"]}
    assert {"MissingValueCount", "OutListValueCount", "ValueDrift"} <= tested, tested

    port = _free_port()
    env = {**os.environ, "DO_NOT_TRACK": "true"}
    ui = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("evidently")),
            "ui",
            "--workspace",
            workspace.path,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}/api"
    try:
        _wait_for(lambda: httpx.get(f"{base}/version", timeout=2).status_code == 200, ui)
        (project,) = httpx.get(f"{base}/projects", timeout=10).json()
        assert project["name"] == "flights-delay"
        dashboard = httpx.get(f"{base}/v2/dashboards/{project['id']}", timeout=10).json()
        panels = {p["title"]: p for p in dashboard["panels"]}
        assert set(DASHBOARD_PANELS) <= set(panels)
        for title in DASHBOARD_PANELS:
            (value,) = panels[title]["values"]
            query = {
                "series_filter": [
                    {"tags": [], "metadata": {}, "metric": value["metric"], "metric_labels": value["metric_labels"]}
                ]
            }
            data = httpx.post(f"{base}/v2/snapshots/{project['id']}/data_series_batch", json=query, timeout=30).json()
            assert [s["timestamp"][:10] for s in data["sources"]] == ["2013-03-01", "2013-04-01"], title
            (series,) = data["series"]
            assert len(series["values"]) == 2 and all(v is not None for v in series["values"]), (title, series)
            if title == DASHBOARD_PANELS[1]:  # prediction PSI, as the report computed it
                assert series["values"] == pytest.approx([calm.prediction_drift.score, shifted.prediction_drift.score])
    finally:
        os.killpg(ui.pid, 15)
        ui.wait(timeout=30)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(ready, proc, timeout: float = 120) -> None:
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            if ready():
                return
        except Exception:  # noqa: BLE001 - not listening yet
            pass
        assert proc.poll() is None, "the process exited"
        assert time.monotonic() < deadline, "not ready in time"
        time.sleep(0.5)


# --------------------------------------------------------------------------- Prefect + Horovod


def _artifact(key: str):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as c:
        found = c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return sorted(found, key=lambda a: a.created)[-1] if found else None


def test_progress_artifact_follows_rank_zero_epoch_lines(prefect_harness):
    import logging

    from prefect import flow

    from ringflow.tasks.training_artifacts import PROGRESS_KEY, EpochProgress

    seen = []

    @flow
    def follow() -> list:
        progress = EpochProgress(logging.getLogger("test"), "epochs done of 4")
        for line in [
            "[1]<stdout>:epoch 1/4: from rank 1, ignored",
            "[0]<stdout>:training: world_size=2",
            "[0]<stdout>:epoch 1/4: train_loss=0.5",
            "[0]<stdout>:epoch 3/4 (size 2): train_loss=0.4",
        ]:
            progress.info(line)
            seen.append(_artifact(PROGRESS_KEY).data)
        return seen

    assert follow() == [0.0, 0.0, 25.0, 75.0]


@pytest.mark.horovod
@pytest.mark.slow
def test_training_publishes_progress_rank_table_and_horovod_files(
    prefect_harness, ringflow_home, smoke_config, smoke_manifest
):
    """A real np=2 training with the timeline and autotune on: the progress artifact ends at 100,
    the per-rank table has both ranks, the timeline and the autotune log are in the MLflow run."""
    from mlflow import MlflowClient

    from ringflow.tasks.train import train_model
    from ringflow.tasks.training_artifacts import PROGRESS_KEY, RANK_TABLE_KEY
    from ringflow.training.config import with_overrides

    cfg = with_overrides(
        smoke_config, {"training.epochs": 2, "training.horovod.timeline": True, "training.horovod.autotune": True}
    )
    result = train_model.with_options(retries=0)(cfg, str(smoke_manifest.path))

    assert _artifact(PROGRESS_KEY).data == 100.0
    table = json.loads(_artifact(RANK_TABLE_KEY).data)
    assert [row["rank"] for row in table] == [0, 1] and all(row["samples/s"] > 0 for row in table), table
    assert {row["host"] for row in table} == set(result.hosts)

    client = MlflowClient(f"sqlite:///{ringflow_home / 'mlflow.db'}")
    logged = {a.path: a for a in client.list_artifacts(result.run_id, artifacts.HOROVOD_DIR)}
    assert f"{artifacts.HOROVOD_DIR}/{TIMELINE_FILE}" in logged, logged
    assert logged[f"{artifacts.HOROVOD_DIR}/{TIMELINE_FILE}"].file_size > 1000
    assert f"{artifacts.HOROVOD_DIR}/{AUTOTUNE_FILE}" in logged, logged
    timeline = (Path(result.output_dir) / "horovod-timeline.json").read_text()
    assert "allreduce" in timeline.lower()

"""What users of the stack expect by convention: declared dependencies, telemetry off, the torch
source a Makefile variable (issue 14)."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_PACKAGES = ["flows", "tasks", "training", "monitoring"]
LOCAL_MODULES = {*RUNTIME_PACKAGES, "tests", "benchmarks"}
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


def test_every_directly_imported_package_is_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {_requirement_name(r) for r in project["dependencies"]}
    dev = runtime | {_requirement_name(r) for r in project["optional-dependencies"]["dev"]}
    code = [p for pkg in RUNTIME_PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    assert not _undeclared(code, runtime), "add to [project] dependencies"
    helpers = [*(ROOT / "tests").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")]
    assert not _undeclared(helpers, dev), "add to [project.optional-dependencies] dev"


def _env_without(*prefixes: str) -> dict[str, str]:
    # MLflow also stays quiet under pytest or CI: drop those markers to see what the CLI does alone
    drop = ("PYTEST_", "CI", "GITHUB_", "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK",
            "PREFECT_SERVER_ANALYTICS", *prefixes)
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


def test_cli_turns_library_telemetry_off(tmp_path):
    probe = (
        "from flows.cli import _prepare_environment; _prepare_environment()\n"
        "from mlflow.telemetry.utils import is_telemetry_disabled\n"
        "import os; print(is_telemetry_disabled(), os.environ['PREFECT_SERVER_ANALYTICS_ENABLED'],"
        " os.environ['DO_NOT_TRACK'])\n"
    )
    env = {**_env_without(), "RINGFLOW_HOME": str(tmp_path / "home")}
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "false", "true"]

    # a user who opts in keeps the choice
    env["MLFLOW_DISABLE_TELEMETRY"] = "false"
    out = subprocess.run([sys.executable, "-c", "from flows.cli import _prepare_environment; "
                          "_prepare_environment(); import os; print(os.environ['MLFLOW_DISABLE_TELEMETRY'])"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "false", out.stderr


def test_stack_services_send_no_telemetry(tmp_path, monkeypatch):
    from flows.stack import StackSettings, _services

    for key in ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK", "PREFECT_SERVER_ANALYTICS_ENABLED"):
        monkeypatch.delenv(key, raising=False)
    (tmp_path / "stack").mkdir()
    services = _services(StackSettings(), tmp_path, None)
    assert services
    for svc in services:
        assert svc.env["MLFLOW_DISABLE_TELEMETRY"] == "true", svc.name
        assert svc.env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false", svc.name
        assert svc.env["DO_NOT_TRACK"] == "true", svc.name


def _install_recipe(*make_args: str) -> str:
    out = subprocess.run(["make", "-n", "-B", "-f", "Makefile", ".venv/.ringflow-installed", *make_args],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return next(line for line in out.stdout.splitlines() if "pip install" in line and "torch==" in line)


def test_torch_source_is_a_makefile_variable():
    assert "--index-url" not in _install_recipe()  # empty: this machine's configured index
    cpu = "https://download.pytorch.org/whl/cpu"
    assert f"--index-url {cpu}" in _install_recipe(f"TORCH_INDEX={cpu}")

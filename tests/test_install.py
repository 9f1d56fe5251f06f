"""The install step left a working Horovod with PyTorch and Gloo in the project's venv."""

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.horovod
def test_horovodrun_check_build_lists_pytorch_and_gloo():
    horovodrun = Path(sys.executable).with_name("horovodrun")
    out = subprocess.run([str(horovodrun), "--check-build"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "[X] PyTorch" in out.stdout
    assert "[X] Gloo" in out.stdout


def test_cli_help_lists_commands():
    ringflow = Path(sys.executable).with_name("ringflow")
    out = subprocess.run([str(ringflow), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for cmd in ("run", "shard", "train"):
        assert cmd in out.stdout


def test_cli_rejects_invalid_config_before_work(tmp_path):
    ringflow = Path(sys.executable).with_name("ringflow")
    out = subprocess.run(
        [str(ringflow), "run", "--set", "training.world_size=0"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parents[1],
        env={"RINGFLOW_HOME": str(tmp_path / "h"), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 2
    assert "training.world_size" in out.stderr
    assert not (tmp_path / "h").exists()  # nothing was created


def _ringflow(*args: str, **kw) -> subprocess.CompletedProcess:
    ringflow = Path(sys.executable).with_name("ringflow")
    return subprocess.run([str(ringflow), *args], capture_output=True, text=True, timeout=120, **kw)


def test_cli_version_names_release_and_commit():
    out = _ringflow("--version")
    assert out.returncode == 0, out.stderr
    from ringflow.training.version import source_commit, version

    assert out.stdout.strip() == f"ringflow {version()} (commit {source_commit()})"
    assert version() != "unknown" and len(source_commit() or "") == 40  # this checkout's HEAD


def test_cli_database_is_a_choice():
    help_text = _ringflow("up", "--help", env={**os.environ, "COLUMNS": "250"}).stdout
    assert "<sqlite|postgresql>" in help_text
    out = _ringflow("up", "--database", "mysql")
    assert out.returncode == 2 and "'mysql' is not one of" in out.stderr


def test_every_subcommand_help_is_complete():
    """Each command's help is whole sentences (the synth help once stopped mid-sentence)."""
    from typer.main import get_command

    from ringflow.flows.cli import app

    root = get_command(app)
    groups = [(name, cmd) for name, cmd in root.commands.items()]
    for name, cmd in list(groups):
        if hasattr(cmd, "commands"):
            groups += [(f"{name} {sub}", c) for sub, c in cmd.commands.items()]
    for name, cmd in groups:
        text = " ".join((cmd.help or "").split())
        assert text and text.endswith("."), f"`ringflow {name}` help does not end a sentence: {text!r}"
        for param in cmd.params:
            if getattr(param, "help", None) is None and param.name not in ("help",):
                raise AssertionError(f"`ringflow {name}` option {param.name} has no help")
    up_help = " ".join((root.commands["up"].help or "").split())
    assert "Evidently" in up_help and "PostgreSQL" in up_help


def test_run_without_horovod_fails_before_any_work(tmp_path):
    """A Python where horovod does not import: `ringflow run` names the install script and writes
    nothing (no shards, no Prefect or MLflow state)."""
    home = tmp_path / "h"
    code = (
        "import sys; sys.modules['horovod'] = None  # as if horovod were not installed\n"
        "from ringflow.flows.cli import app; app(['run', '-c', 'configs/smoke.yaml'])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parents[1],
        env={**os.environ, "RINGFLOW_HOME": str(home)},
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert "infra/install_horovod.sh" in out.stderr and "horovod.torch does not import" in out.stderr
    assert not home.exists() or not any(home.rglob("*.parquet"))

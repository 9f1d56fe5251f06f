"""The install step left a working Horovod with PyTorch and Gloo in the project's venv."""

import subprocess
import sys
from pathlib import Path


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
    out = subprocess.run([str(ringflow), "run", "--set", "training.world_size=0"],
                         capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1],
                         env={"RINGFLOW_HOME": str(tmp_path / "h"), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 2
    assert "training.world_size" in out.stderr
    assert not (tmp_path / "h").exists()  # nothing was created

"""The benchmark suite at tiny sizes, so it cannot rot. No timing is asserted: only that every
benchmark runs on the real stack, writes its JSON, and that RESULTS.md renders from it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.horovod, pytest.mark.slow]

BENCH = ROOT / "benchmarks"


def _run(args: list[str], timeout: int = 600) -> None:
    p = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


def test_a_reference_rank_killed_by_a_signal_is_told_from_one_that_failed():
    from benchmarks.bench_training import _rank_signal

    # torchrun's report when a DDP rank aborted in CI: the other rank got the agent's SIGTERM
    report = """Failures:
  [1]:
    exitcode  : -15 (pid: 31280)  (SIGTERM)
Root Cause (first observed failure):
  [0]:
    exitcode  : -6 (pid: 31281)  (SIGABRT)"""
    assert _rank_signal(report) == 6
    assert _rank_signal("exitcode  : 1 (pid: 31281)") is None  # an error of its own: no rerun
    assert _rank_signal("exitcode  : -15 (pid: 31281)  (SIGTERM)") is None  # stopped from outside


def test_allreduce_quick_measures_every_method(tmp_path):
    out = tmp_path / "allreduce.json"
    _run([str(BENCH / "bench_allreduce.py"), "--quick", "--repeats", "1", "--out", str(out)])
    d = json.loads(out.read_text())
    methods = {(r["case"], r["method"]) for r in d["variants"][0]["rows"]}
    assert {
        ("single", "hvd"),
        ("single", "hvd_inplace"),
        ("single", "torch"),
        ("single", "memcpy"),
        ("grad_like", "hvd_fused"),
        ("grad_like", "torch_bucket"),
    } <= methods
    assert d["machine"]["cores"] >= 1 and d["machine"]["horovod"]


def test_training_bench_runs_trainer_and_ddp_reference(tmp_path):
    out = tmp_path / "training.json"
    _run(
        [
            str(BENCH / "bench_training.py"),
            "--config",
            str(ROOT / "configs" / "smoke.yaml"),
            "--cases",
            "hvd_np2,np2_unpinned,ddp_np2",
            "--rounds",
            "1",
            "--epochs",
            "2",
            "--no-quality",
            "--out",
            str(out),
        ]
    )
    d = json.loads(out.read_text())
    assert set(d["cases"]) == {"hvd_np2", "np2_unpinned", "ddp_np2"}
    assert all(c["samples_per_s"] > 0 for c in d["cases"].values())
    assert "hvd_vs_ddp_np2" in d["derived"] and "pinned_vs_unpinned" in d["derived"]


def test_make_run_bench_times_the_command_against_another_revision(tmp_path):
    """Two real `ringflow run`s of the smoke config: this checkout and HEAD from a git worktree,
    each with its stage table read back; the worktree is gone afterwards."""
    out = tmp_path / "make_run.json"
    _run([str(BENCH / "bench_make_run.py"), "--quick", "--against", "HEAD", "--out", str(out)], timeout=900)
    d = json.loads(out.read_text())
    assert [(r["round"], r["variant"]) for r in d["rows"]] == [(1, "checkout"), (1, "against")]
    for row in d["rows"]:
        assert row["promoted"] and row["wall_s"] > row["flow_call_s"] > row["train_stage_s"] > row["epochs_s"] > 0
        assert row["cpu_s"] > 0 and row["load_max"] >= row["load_start"] >= 0
    assert d["medians"]["against"]["runs"] == 1 and not d["targets_apply"]
    worktrees = subprocess.run(["git", "-C", str(ROOT), "worktree", "list"], capture_output=True, text=True).stdout
    assert "ringflow-bench-make-run" not in worktrees


def test_results_md_renders_known_and_foreign_results(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT))
    from benchmarks import run_all

    _run([str(BENCH / "bench_allreduce.py"), "--quick", "--repeats", "1", "--out", str(tmp_path / "allreduce.json")])
    results = {
        "allreduce": json.loads((tmp_path / "allreduce.json").read_text()),
        "sharding": {"meta": {"rows": 10}, "cases": [{"shards": 2, "wall_s": 1.5, "per": {"a": 1}}]},
    }
    md = run_all.render(results, {"allreduce": {"ran": True, "rc": 0, "wall_s": 3.0}})
    assert "## Allreduce" in md and "## Targets" in md and "## Sharding" in md
    assert "| shards | wall_s | per |" in md


def test_results_md_names_no_script_that_does_not_exist_and_no_ratio_it_lacks():
    sys.path.insert(0, str(ROOT))
    from benchmarks import run_all

    results = {
        "rank_server_stop35": {"how": "A/B of two revisions", "median": {"wall_s": 20.1}},
        "model_quality_old_network": {"meta": {"seeds": 3}},
        "training_levers_quiet9": {"derived": {"val_auc_spread": 0.0}, "cases": {}},  # no DDP case
    }
    md = run_all.render(results, {})
    assert "## Rank_server_stop35 (a round's measurement)" in md and "bench_rank" not in md
    assert "## Model_quality_old_network (from `benchmarks/bench_model_quality.py`)" in md
    assert "DDP throughput at np=2 (`training_levers_quiet9`)" not in md and "-x" not in md

"""The ``baseline`` task: tune, fit and score the reference model beside the training.

The baseline (``training/baseline.py``) needs only the manifest's train shards, its validation
file and its test file, none of the network's outputs, so the flow submits this task before the
train task and the two run side by side: the trees are fitted while the ranks start and train,
and the evaluation only logs and compares what this task returns. Logging stays in the
evaluation, which owns the training run's MLflow writes after training (the baseline is a model
of that run, never registered).

Where the flow holds a rank server (``training.fork_ranks``), the server forks the baseline's job
(``training/baseline_job.py``) too, and this task imports what logging the models needs while
the job fits: in one process the two took turns on the interpreter lock (scikit-learn's tree
grower is a Python loop), and the imports ran after the fits, on one core, while the evaluation
waited (``benchmarks/README.md``, "Eleventh round"). Without a server the task fits in its own
process, as the job would.
"""

from __future__ import annotations

import base64
import importlib
import logging
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from prefect import get_run_logger, task

from ringflow.tasks.timings import Laps, record
from ringflow.training import rank_server
from ringflow.training.baseline_job import ScoredBaseline, read_scored, score_baseline
from ringflow.training.config import PipelineConfig
from ringflow.training.manifest import KEY_ENV, Manifest

STAGE = "baseline"


def _warm_model_logging() -> None:
    """Do beside the training what logging the baseline and the candidate model and drawing the
    curves would otherwise do first, after it: import MLflow's sklearn and pyfunc flavors, skops
    and matplotlib, and let MLflow map the installed packages to their modules (its requirement
    check scans every installed distribution once per process: about 1 s here)."""
    for module in ("matplotlib.pyplot", "mlflow.pyfunc", "mlflow.sklearn", "skops.io"):
        importlib.import_module(module)
    from mlflow.utils.requirements_utils import warn_dependency_requirement_mismatches

    warn_dependency_requirement_mismatches([f"numpy=={np.__version__}"])  # satisfied: no warning


@task(name="baseline", retries=1, retry_delay_seconds=2)
def fit_baseline(cfg: PipelineConfig, manifest_path: str) -> ScoredBaseline:
    """Tune ``gate.baseline`` on the train window, choose its threshold on the validation window,
    score the test window; submitted beside the train task."""
    from ringflow.tasks.shard import resolve_data_key

    log = get_run_logger()
    key = resolve_data_key(cfg)
    server = rank_server.hold_running()
    if server is not None:
        try:
            scored = _score_in_forked_job(server, cfg, manifest_path, key, log)
        finally:
            rank_server.release()
        if scored is not None:
            return scored
        log.warning("baseline: the rank server did not run its job; fitting it in this process")
    lap = Laps(STAGE, concurrent=True)
    scored = score_baseline(cfg, Manifest.load(manifest_path), key, log)
    lap("tune, fit and score", "work")
    _warm_model_logging()
    lap("imports for model logging")
    return scored


class BaselineJobError(RuntimeError):
    """The baseline's forked job failed; the message ends with what it wrote."""


def _score_in_forked_job(
    server: rank_server.RankServer,
    cfg: PipelineConfig,
    manifest_path: str,
    key: bytes | None,
    log: logging.Logger | logging.LoggerAdapter[Any],
) -> ScoredBaseline | None:
    """Have ``server`` fork the baseline's job and import the model-logging modules meanwhile;
    the job's result, or None when the server did not run it (the caller fits it itself). Its
    output lines go to the run's log; a failure raises with them."""
    work = Path(tempfile.mkdtemp(prefix="ringflow-baseline-"))  # 0700: the config and the result
    try:
        config_path, output, result = work / "config.json", work / "output.log", work / "scored.pkl"
        config_path.write_text(cfg.model_dump_json())
        env = dict(os.environ)
        if key is not None:  # from a Prefect Secret block: to the job in its environment, never argv
            env[KEY_ENV] = base64.b64encode(key).decode()
        argv = ["--config-json", f"@{config_path}", "--manifest", manifest_path, "--output", str(result)]
        lap = Laps(STAGE, concurrent=True)
        with open(output, "wb") as out, ThreadPoolExecutor(1, thread_name_prefix="baseline-job") as pool:
            t0 = time.perf_counter()
            job = pool.submit(
                rank_server.run_forked, server.socket_path, rank_server.BASELINE_PROGRAM, argv, env, out.fileno()
            )
            _warm_model_logging()
            lap("imports for model logging")
            status = job.result()
            record(STAGE, "tune, fit and score", time.perf_counter() - t0, "work", concurrent=True)
        lines = output.read_text(errors="replace").splitlines()
        if status is None:
            return None
        if status != 0:
            tail = "\n".join(lines[-20:])
            raise BaselineJobError(
                f"baseline: its job ({rank_server.BASELINE_PROGRAM}) exited with status {status}:\n{tail}"
            )
        for line in lines:
            log.info("%s", line)
        return read_scored(result)
    finally:
        shutil.rmtree(work, ignore_errors=True)

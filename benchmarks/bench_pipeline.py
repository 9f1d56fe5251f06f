"""End-to-end pipeline wall time per stage, and the orchestration overhead.

    .venv/bin/python benchmarks/bench_pipeline.py [--quick] [--config configs/flights.yaml]

Two kinds of run, each in a fresh process with a fresh ``RINGFLOW_HOME`` (so sharding is really
done, MLflow is an empty SQLite store and no champion exists), interleaved over rounds:

- ``flow``: ``training_pipeline(config)`` as ``ringflow run`` calls it (Prefect flow, ephemeral
  Prefect API started in the background before the imports, ``flows/prefect_api.py``; MLflow run,
  lineage, model logging, registry). Stage times are the Prefect task runs' start/end times
  (read back from the Prefect API); ``horovodrun`` wall time is the ``training_wall_time_s``
  metric the train task logs around it.
- ``bare``: the same stages' own work with neither Prefect nor MLflow: ``shard_dataset``,
  the same ``horovodrun ... training.train`` command (no ``MLFLOW_RUN_ID``), and scoring the test
  window with the trained model (load, ``predict_proba``, ``classification_metrics``); the
  baseline is tuned beside horovodrun as the flow tunes it, and what is left of it after the
  training counts as evaluation work.

Orchestration overhead = flow wall (the call, plus any wait for the API the imports did not hide)
- (bare shard + horovodrun wall in the flow + bare evaluate):
the time in Prefect and MLflow outside the stages' own work. Reported as a share of the flow
wall time, both from the flow call and from process start (imports + ephemeral API start-up).

Where the seconds go inside the flow comes from the flow's own record (``tasks/timings.py``, the
same table the CLI prints and the summary artifact shows): per stage, the timed parts, work vs
overhead; reported as medians per part.

The load average is sampled every half second during every child run; a run during which it
exceeded ``LOADED`` (1.5) at any point is marked ``under_load`` and its numbers are never reported
as meeting a target (``run_all.py`` says "under load" instead).

Writes ``benchmarks/results/pipeline.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T_PROCESS = time.perf_counter()  # process start (as near as Python lets us)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (  # noqa: E402
    LOADED,
    ROOT,
    LoadSampler,
    bench_env,
    load_avg,
    machine_facts,
    median,
    timed_run,
    write_result,
)

SCRATCH = Path(tempfile.gettempdir()) / "ringflow-bench"
STAGES = ["shard", "train", "evaluate", "register"]


# --------------------------------------------------------------------------- children


def child_flow(cfg_path: str, out: Path, early_api: bool = True) -> None:
    # as `ringflow run` does: the ephemeral Prefect API starts while the rest is imported
    # (``flow_late``: as it did before, the flow call starts it)
    from ringflow.training.environment import process_defaults

    process_defaults()
    from ringflow.flows.prefect_api import no_heartbeats_on_a_temporary_server, start_early

    wait_api = start_early() if early_api else (lambda: 0.0)
    t_imp = time.perf_counter()
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from ringflow.flows.training_pipeline import training_pipeline
    from ringflow.tasks import timings
    from ringflow.training.config import load_config

    imports_s = time.perf_counter() - t_imp
    cfg = load_config(cfg_path)
    api_wait_s = wait_api()
    timings.begin_call()
    t0 = time.perf_counter()
    with no_heartbeats_on_a_temporary_server():
        state = training_pipeline(cfg, return_state=True)
    flow_s = time.perf_counter() - t0
    result = state.result()
    result.timings.end_call(time.time() - (time.perf_counter() - t0 - flow_s))
    result.timings.add("prefect", "Prefect API start (what the imports did not hide)", api_wait_s)
    fr_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        fr = client.read_flow_run(fr_id)
        trs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[fr_id])))
    tasks = [
        {
            "name": t.name,
            "task_key": t.task_key,
            "state": t.state_type.value if t.state_type else None,
            "start": t.start_time.timestamp() if t.start_time else None,
            "end": t.end_time.timestamp() if t.end_time else None,
            "total_run_time_s": t.total_run_time.total_seconds() if t.total_run_time else None,
        }
        for t in trs
    ]
    import mlflow

    run = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(result.training_run_id)
    from ringflow.training.summary import TrainingSummary

    summary = TrainingSummary.load(Path(os.environ["RINGFLOW_HOME"]) / "runs" / result.training_run_id)
    out.write_text(
        json.dumps(
            {
                "imports_s": imports_s,
                "api_wait_s": api_wait_s,
                "flow_call_s": flow_s,
                "flow_run_s": fr.total_run_time.total_seconds() if fr.total_run_time else None,
                "flow_start": fr.start_time.timestamp() if fr.start_time else None,
                "flow_end": fr.end_time.timestamp() if fr.end_time else None,
                "tasks": tasks,
                "timings": [p.model_dump() for p in result.timings.parts],
                "horovodrun_s": run.data.metrics.get("training_wall_time_s"),
                "train_program_s": summary.wall_time_s,
                "epochs": summary.epochs,
                "train_status": summary.status,
                "promoted": result.promoted,
                "process_to_end_s": time.perf_counter() - T_PROCESS,
            }
        )
    )


def child_bare(cfg_path: str, out: Path) -> None:
    t_imp = time.perf_counter()
    from ringflow.training.config import load_config
    from ringflow.training.launch import check_horovod, horovodrun_command, launch_env
    from ringflow.training.metrics import classification_metrics
    from ringflow.training.model import load_model, predict_proba
    from ringflow.training.sharding import shard_dataset
    from ringflow.training.summary import TrainingSummary

    imports_s = time.perf_counter() - t_imp
    home = Path(os.environ["RINGFLOW_HOME"])
    cfg = load_config(cfg_path)
    t0 = time.perf_counter()
    manifest = shard_dataset(cfg, home / "data", key=None, progress=lambda s: None)
    shard_s = time.perf_counter() - t0
    run_dir = home / "runs" / "bare"
    check_horovod()  # as the flow does first: the launch then skips horovodrun's own Gloo probe
    cmd = horovodrun_command(cfg, manifest.path.resolve(), run_dir, gloo_checked=True)
    env = launch_env(cfg, MLFLOW_RUN_ID=None, MLFLOW_TRACKING_URI=None, RINGFLOW_HOME=str(home))
    # as the flow does: the baseline is tuned beside horovodrun (it needs only the shards)
    baseline = None
    if cfg.gate.baseline != "none":
        import logging
        from concurrent.futures import ThreadPoolExecutor

        from ringflow.tasks.baseline import score_baseline  # the same fit; it touches neither Prefect nor MLflow

        pool = ThreadPoolExecutor(max_workers=1)
        baseline = pool.submit(score_baseline, cfg, manifest, None, logging.getLogger("bench"))
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=cfg.training.timeout_s)
    train_s = time.perf_counter() - t0
    summary = TrainingSummary.load(run_dir)
    t0 = time.perf_counter()
    net, pre = load_model(run_dir)
    test = manifest.read(manifest.test)
    p = predict_proba(net, pre, test)
    metrics = classification_metrics(test[manifest.target_column].to_numpy(), p)
    if baseline is not None:
        baseline.result()  # what is left of it after the training
    eval_s = time.perf_counter() - t0
    out.write_text(
        json.dumps(
            {
                "imports_s": imports_s,
                "shard_s": shard_s,
                "train_s": train_s,
                "train_program_s": summary.wall_time_s,
                "epochs": summary.epochs,
                "evaluate_s": eval_s,
                "register_s": 0.0,
                "test_auc": metrics["roc_auc"],
                "process_to_end_s": time.perf_counter() - T_PROCESS,
            }
        )
    )


# --------------------------------------------------------------------------- driver


def run_child(kind: str, cfg_path: str, prefect_home: Path, timeout: int = 1800) -> dict:
    home = Path(tempfile.mkdtemp(prefix=f"pipe-{kind}-", dir=SCRATCH))
    out = home / "result.json"
    env = bench_env(
        RINGFLOW_HOME=str(home),
        MLFLOW_TRACKING_URI=f"sqlite:///{home / 'mlflow.db'}",
        PREFECT_HOME=str(prefect_home),
        PREFECT_LOGGING_LEVEL="WARNING",
    )
    for k in ("PREFECT_API_URL", "MLFLOW_RUN_ID", "RINGFLOW_DATA_KEY"):
        env.pop(k, None)
    load0 = load_avg()
    with LoadSampler() as load:
        p, wall = timed_run(
            [sys.executable, __file__, "--child", kind, "--config", cfg_path, "--child-out", str(out)],
            env=env,
            timeout=timeout,
            cwd=ROOT,
        )
    if p.returncode != 0 or not out.exists():
        raise RuntimeError(f"pipeline {kind} run failed (exit {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    res = json.loads(out.read_text())
    res.update(
        kind=kind,
        process_wall_s=wall,
        load_before=load0,
        load_max=max(load.samples),
        load_mean=round(sum(load.samples) / len(load.samples), 2),
        under_load=load.under_load,
    )
    shutil.rmtree(home, ignore_errors=True)
    return res


def stage_times(flow: dict) -> dict[str, float]:
    """Seconds per stage from the Prefect task runs (all attempts of a stage's task summed)."""
    out = {s: 0.0 for s in STAGES}
    for t in flow["tasks"]:
        if t["start"] and t["end"]:
            for s in STAGES:
                if t["name"].startswith(s):
                    out[s] += t["end"] - t["start"]
    return out


def analyse(flows: list[dict], bares: list[dict]) -> dict:
    st = [stage_times(f) for f in flows]
    bare = {
        "shard": median([b["shard_s"] for b in bares]),
        "train": median([b["train_s"] for b in bares]),
        "evaluate": median([b["evaluate_s"] for b in bares]),
        "register": 0.0,
    }
    stages = []
    for s in STAGES:
        task_s = median([x[s] for x in st])
        stages.append({"stage": s, "task_s": task_s, "bare_s": bare[s], "diff_s": task_s - bare[s]})
    # the API start that the imports did not hide is part of the call's cost (as `ringflow run` waits for it)
    flow_call = median([f["flow_call_s"] + f.get("api_wait_s", 0.0) for f in flows])
    flow_run = median([f["flow_run_s"] for f in flows])
    proc = median([f["process_wall_s"] for f in flows])
    hvd = median([f["horovodrun_s"] for f in flows])
    work = bare["shard"] + hvd + bare["evaluate"]
    in_tasks = sum(median([x[s] for x in st]) for s in STAGES)
    totals = {
        "flow_call_wall_s": flow_call,
        "flow_process_wall_s": proc,
        "flow_process_imports_s": median([f["imports_s"] for f in flows]),
        "horovodrun_wall_in_flow_s": hvd,
        "stage_work_s (bare shard + horovodrun + bare evaluate)": work,
        "orchestration_overhead_s": flow_call - work,
        "orchestration_overhead_share": (flow_call - work) / flow_call,
        "orchestration_overhead_share_incl_process_startup": (proc - work) / proc,
        "outside_task_runs_s (flow wall - sum of task runs)": flow_call - in_tasks,
        # where the overhead goes
        "prefect_api_start_and_flow_run_creation_s (flow call - flow run)": flow_call - flow_run,
        "mlflow_in_train_task_s (train task - horovodrun)": median([x["train"] for x in st]) - hvd,
        "mlflow_in_ranks_s (horovodrun in flow - bare horovodrun)": hvd - bare["train"],
        "evaluate_mlflow_s (evaluate task - bare scoring)": median([x["evaluate"] for x in st]) - bare["evaluate"],
        "orchestration_overhead_share_of_flow_run (persistent Prefect server case)": (flow_run - work) / flow_run,
        "horovodrun_launch_s (bare horovodrun - training program wall)": bare["train"]
        - median([b["train_program_s"] for b in bares]),
        "bare_process_wall_s": median([b["process_wall_s"] for b in bares]),
        "bare_horovodrun_s": bare["train"],
        "train_epochs_flow / bare": f"{flows[0]['epochs']} / {bares[0]['epochs']}",
    }
    loads = [r["load_max"] for r in flows + bares if r.get("load_max") is not None]
    return {
        "stages": stages,
        "stage_parts": stage_parts(flows),
        "totals": totals,
        "load_max": max(loads, default=None),
        "under_load": any(r.get("under_load", True) for r in flows + bares),
    }


def stage_parts(flows: list[dict]) -> list[dict]:
    """Median seconds of every timed part of the flow runs (``tasks/timings.py``), in stage order."""
    keys: list[tuple[str, str, str]] = []
    for f in flows:
        for p in f.get("timings", []):
            if (p["stage"], p["part"], p["kind"]) not in keys:
                keys.append((p["stage"], p["part"], p["kind"]))
    rows = []
    for stage, part, kind in keys:
        vals = [
            sum(p["seconds"] for p in f.get("timings", []) if (p["stage"], p["part"]) == (stage, part)) for f in flows
        ]
        rows.append({"stage": stage, "part": part, "kind": kind, "median_s": median(vals)})
    if rows:
        work = sum(r["median_s"] for r in rows if r["kind"] == "work")
        total = sum(r["median_s"] for r in rows)
        rows.append({"stage": "all", "part": "sum of the parts", "kind": f"work {work:.2f} s", "median_s": total})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke config, one round")
    p.add_argument("--config", default=None, help="default: configs/flights.yaml (quick: configs/smoke.yaml)")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--out", default=None)
    p.add_argument(
        "--late-api",
        action="store_true",
        help="also run `flow_late` (the flow call starts the Prefect API, as before flows/prefect_api.py)",
    )
    p.add_argument("--child", choices=["flow", "flow_late", "bare"], help=argparse.SUPPRESS)
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--reanalyse", action="store_true", help="recompute the summary of the existing result JSON")
    args = p.parse_args(argv)
    if args.reanalyse:
        path = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / "pipeline.json"
        data = json.loads(path.read_text())
        data.update(analyse(data["flow_runs"], data["bare_runs"]))
        write_result("pipeline", data, path)
        print(json.dumps(data["totals"], indent=1))
        return 0
    cfg_path = args.config or str(ROOT / "configs" / ("smoke.yaml" if args.quick else "flights.yaml"))
    if args.child:
        if args.child == "bare":
            child_bare(cfg_path, Path(args.child_out))
        else:
            child_flow(cfg_path, Path(args.child_out), early_api=args.child == "flow")
        return 0

    SCRATCH.mkdir(parents=True, exist_ok=True)
    prefect_home = SCRATCH / "prefect-home"  # one Prefect DB for all runs: migrations happen once, in the warm-up
    rounds = args.rounds or (1 if args.quick else 2)
    facts = machine_facts()
    # warm-up (not measured): creates the Prefect database, fills OS caches for both kinds
    subprocess.run(
        [sys.executable, "-c", "from prefect import flow\n@flow\ndef w(): return 1\nw()"],
        env=bench_env(PREFECT_HOME=str(prefect_home)),
        capture_output=True,
        timeout=600,
        cwd=ROOT,
    )
    flows, bares, lates = [], [], []
    kinds = ("bare", "flow", "flow_late") if args.late_api else ("bare", "flow")
    for r in range(rounds):
        for kind in kinds if r % 2 == 0 else kinds[::-1]:
            res = run_child(kind, cfg_path, prefect_home)
            {"flow": flows, "bare": bares, "flow_late": lates}[kind].append(res)
            print(
                f"round {r} {kind}: load max {res['load_max']}{' UNDER LOAD' if res['under_load'] else ''}, "
                f"process {res['process_wall_s']:.1f}s"
                + (
                    f", flow {res['flow_call_s']:.1f}s, horovodrun {res['horovodrun_s']:.1f}s"
                    if kind != "bare"
                    else f", shard {res['shard_s']:.1f}s, horovodrun {res['train_s']:.1f}s, evaluate {res['evaluate_s']:.2f}s"
                ),
                flush=True,
            )
    a = analyse(flows, bares)
    if lates:
        late = analyse(lates, bares)
        a["late_api"] = {
            "how": "the same flow runs with the Prefect API started by the flow call (as before flows/prefect_api.py)",
            "flow_process_wall_s": late["totals"]["flow_process_wall_s"],
            "flow_call_wall_s": late["totals"]["flow_call_wall_s"],
            "orchestration_overhead_share": late["totals"]["orchestration_overhead_share"],
            "orchestration_overhead_share_incl_process_startup": late["totals"][
                "orchestration_overhead_share_incl_process_startup"
            ],
        }
    data = {
        "benchmark": "pipeline",
        "quick": args.quick,
        "config": os.path.relpath(cfg_path, ROOT),
        "rounds": rounds,
        "machine": facts,
        "load_after": load_avg(),
        "loaded_threshold": LOADED,
        "how": (
            f"{rounds} round(s) of one `flow` and one `bare` run each, alternating order, each in a fresh "
            "process and RINGFLOW_HOME; medians. Stage = Prefect task run end - start. Overhead = flow "
            "wall - (bare shard + horovodrun wall inside the flow + bare evaluate). Parts: the flow's own "
            "stage timings (tasks/timings.py). Load average sampled every 0.5 s; a run over "
            f"{LOADED} at any point is under load."
        ),
        **a,
        "flow_runs": flows,
        "bare_runs": bares,
        "flow_late_runs": lates,
    }
    path = write_result("pipeline", data, args.out)
    print(f"wrote {path}")
    for s in a["stages"]:
        print(f"  {s['stage']:9s} task {s['task_s']:7.2f}s  bare {s['bare_s']:7.2f}s")
    for row in a["stage_parts"]:
        print(f"  {row['stage']:9s} {row['part'][:70]:70s} {row['kind']:9s} {row['median_s']:7.2f}s")
    for k, v in a["totals"].items():
        print(f"  {k}: {v if isinstance(v, str) else round(v, 3)}")
    if "late_api" in a:
        print(f"  API started by the flow call (before): {a['late_api']}")
    print(f"  load max {a['load_max']}" + (" -> UNDER LOAD: not a target measurement" if a["under_load"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark the monitoring flow on a 28k-row batch (July 2013) and 1M- and 3M-row batches (July resampled).

Each case runs in a fresh process (so peak RSS is its own) against a scratch RINGFLOW_HOME with a
registered champion (the test suite's real pyfunc logistic regression; the pipeline's champion is
not needed to measure monitoring). Reports wall time of the flow, peak RSS, time per task (from
the Prefect API) and the share spent inside Evidently. The batch is read and scored in chunks and
Evidently reads a sample of ``max_current_rows`` (the config's default unless given), so the peak
should not grow with the batch's rows.

    .venv/bin/python benchmarks/bench_monitoring.py            # the three cases
    .venv/bin/python benchmarks/bench_monitoring.py --rows 1000000 --max-current-rows 0   # no sampling

Writes ``benchmarks/results/monitoring.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "monitoring.json"
JULY_ROWS = 28_280


def _rss_mb() -> float:
    from ringflow.training.memory import peak_rss_mb  # VmHWM: ru_maxrss carries the forking process's mark

    return peak_rss_mb()


def _batch_arg(rows: int, home: Path) -> str:
    return "2013-07" if rows == JULY_ROWS else str(home / f"july-{rows}.parquet")


def prepare(rows_list: list[int], home: Path) -> None:
    """In its own process: register the champion and write the resampled batches."""
    sys.path.insert(0, str(ROOT))
    import mlflow

    from ringflow.training.config import load_config
    from ringflow.training.data import in_window, load_labelled
    from tests.test_monitoring_flow import register_champion

    cfg = load_config(ROOT / "configs" / "flights.yaml")
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    df, _ = load_labelled(cfg.data)
    register_champion(cfg, df)
    july = df[in_window(df, cfg.data, "2013-07-01", "2013-08-01")].drop(columns=["target"])
    assert len(july) == JULY_ROWS, len(july)
    for rows in rows_list:
        if rows != JULY_ROWS:  # resampled with replacement: July's distribution at any size
            july.sample(n=rows, replace=True, random_state=0).reset_index(drop=True).to_parquet(_batch_arg(rows, home))


def run_case(rows: int, max_current_rows: int | None, home: Path) -> dict:
    """In a fresh process (peak RSS is the flow's own): run the flow once, measure."""
    sys.path.insert(0, str(ROOT))
    import mlflow
    import numpy as np
    from prefect import flow, get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from ringflow.flows.monitoring import monitoring_flow
    from ringflow.training.config import load_config, with_overrides

    cfg = load_config(ROOT / "configs" / "flights.yaml")
    cfg = with_overrides(cfg, {"monitoring.max_current_rows": max_current_rows})
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    batch = _batch_arg(rows, home)

    @flow
    def warm() -> None:  # starts the ephemeral API outside the measured call
        return None

    warm()
    rss_before = _rss_mb()
    t0 = time.perf_counter()
    state = monitoring_flow(cfg, batch=batch, trigger_rerun=False, return_state=True)
    wall = time.perf_counter() - t0
    result = state.result()
    with get_client(sync_client=True) as c:
        tasks = c.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    per_task = {}
    for t in tasks:
        name = t.name.rsplit("-", 1)[0]
        per_task[name] = per_task.get(name, 0.0) + t.total_run_time.total_seconds()
    m = mlflow.get_run(result.monitoring_run_id).data.metrics
    evidently_s = float(m.get("evidently_seconds", np.nan))
    import_s = float(m.get("evidently_import_seconds", np.nan))
    return {
        "batch_rows": result.rows,
        "evidently_current_rows": min(result.rows, max_current_rows or result.rows),
        "reference_rows": cfg.monitoring.reference_sample_rows,
        "wall_s": round(wall, 2),
        "evidently_s": round(evidently_s, 2),
        "evidently_share": round(evidently_s / wall, 3),
        "evidently_import_s": round(import_s, 2),
        "peak_rss_mb": round(_rss_mb(), 0),
        "rss_before_flow_mb": round(rss_before, 0),
        "per_task_s": {k: round(v, 2) for k, v in sorted(per_task.items(), key=lambda kv: -kv[1])},
        "anomalies": [a.type.value for a in result.anomalies],
        "drifted_share": result.drifted_share,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument(
        "--rows",
        type=int,
        nargs="*",
        default=[28_280, 1_000_000, 3_000_000],
        help="batch sizes (28280 = July 2013 as is; others resample July)",
    )
    p.add_argument(
        "--max-current-rows",
        type=int,
        default=None,
        help="Evidently's sample of the batch (default: the config's); 0 = every row",
    )
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.max_current_rows is None:
        from ringflow.training.config import MonitoringConfig

        a.max_current_rows = MonitoringConfig().max_current_rows
    mcr = a.max_current_rows or None
    if a.prepare:
        prepare(a.rows, Path(os.environ["RINGFLOW_HOME"]))
        return
    if a.child:
        print("RESULT " + json.dumps(run_case(a.rows[0], mcr, Path(os.environ["RINGFLOW_HOME"]))))
        return
    cases = []
    with tempfile.TemporaryDirectory(prefix="ringflow-bench-") as tmp:
        home = Path(tmp)
        from ringflow.training.environment import process_defaults  # telemetry off, a patient ephemeral Prefect API

        env = {
            **process_defaults(dict(os.environ)),
            "RINGFLOW_HOME": str(home),
            "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
            "PREFECT_HOME": str(home / "prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",  # a busy shared machine
            "PREFECT_LOGGING_LEVEL": "WARNING",
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        }
        prep = subprocess.run(
            [sys.executable, __file__, "--prepare", "--rows", *map(str, a.rows)],
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if prep.returncode != 0:
            sys.stderr.write(prep.stdout[-3000:] + prep.stderr[-5000:])
            raise SystemExit(f"preparing the champion and batches failed (exit {prep.returncode})")
        for rows in a.rows:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    "--rows",
                    str(rows),
                    "--max-current-rows",
                    str(a.max_current_rows),
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=3600,
            )
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if out.returncode != 0 or line is None:
                sys.stderr.write(out.stdout[-3000:] + out.stderr[-5000:])
                raise SystemExit(f"case rows={rows} failed (exit {out.returncode})")
            cases.append(json.loads(line[len("RESULT ") :]))
    meta = {
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "max_current_rows": mcr,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    key = "sampled" if mcr else "unsampled"
    previous[key] = {"meta": meta, "cases": cases}
    RESULTS.write_text(json.dumps(previous, indent=1))
    print(
        f"\nmonitoring benchmark ({meta['cpus']} CPUs, batch sampled to {mcr} rows for Evidently, "
        f"reference {cases[0]['reference_rows']} rows)\n"
    )
    print("| batch rows | Evidently rows | wall s | Evidently s (share) | + import s | peak RSS MB | slowest tasks |")
    print("|---:|---:|---:|---:|---:|---:|---|")
    for c in cases:
        slow = ", ".join(f"{k} {v}s" for k, v in list(c["per_task_s"].items())[:3])
        print(
            f"| {c['batch_rows']:,} | {c['evidently_current_rows']:,} | {c['wall_s']} | {c['evidently_s']} "
            f"({c['evidently_share']:.0%}) | {c['evidently_import_s']} | {c['peak_rss_mb']:.0f} | {slow} |"
        )
    print(f"\nwritten to {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

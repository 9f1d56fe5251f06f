"""Flow-run submission through the Prefect API of `ringflow up`: SQLite vs ringflow's PostgreSQL.

    .venv/bin/python benchmarks/bench_stack.py [--quick] [--out PATH]

For each database, one stack (`ringflow up --no-serve --database X` in a scratch RINGFLOW_HOME,
free ports, then `ringflow deploy` with the smoke config) and bursts of N concurrent submissions
of the training deployment (`create_flow_run_from_deployment`, one client per thread, as N
people pressing Run or N automations firing). Without a runner the runs stay Scheduled, so this
measures the API and its database, not training (a smoke training run takes about a minute of
this machine's 2 cores: the runner's `limit` and the deployment's concurrency limit of 1 queue
the rest). The two databases are measured alternately, burst by burst, on the same machine.

Under load (``--part load``): for each database in turn, a full stack (``ringflow up --database
X`` with its runner) gets 20 training-pipeline runs submitted at once (smoke config, one rank, 2
epochs, a seed each: what ``tests/test_stack_load.py`` checks), then for ``--window-min`` minutes
the runner trains them one after another (concurrency limit 1) while a probe of 5 concurrent
submissions hits the API every 20 s. Probes are scheduled far in the future (same API call and
database insert, never executed), so the load stays the 20 runs. Measured: runs/min completed
in the window, the p50/p95 latency of every submission under that load (the 20 and the probes),
and the machine's load average sampled through the window (the machine is shared with other
jobs: the figures move with it). ``--part all`` (default) measures both; a single part keeps
the other part's last figures in the result file.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RESULTS_DIR, ROOT, VENV_BIN, bench_env, free_port, load_avg, machine_facts, write_result  # noqa: E402
from ringflow.infra.stack_settings import STACK_ROUTING_ENV  # noqa: E402
from ringflow.monitoring.events import TRAINING_DEPLOYMENT  # noqa: E402

SMOKE = ROOT / "configs" / "smoke.yaml"


class BenchStack:
    def __init__(self, base: Path, database: str):
        self.database = database
        self.home = base / database
        self.prefect_port = free_port()
        env = {k: v for k, v in bench_env().items() if k not in STACK_ROUTING_ENV}
        env.update(
            RINGFLOW_HOME=str(self.home),
            RINGFLOW_PREFECT_PORT=str(self.prefect_port),
            RINGFLOW_MLFLOW_PORT=str(free_port()),
            RINGFLOW_EVIDENTLY_PORT=str(free_port()),
            RINGFLOW_POSTGRES_PORT=str(free_port()),
            RINGFLOW_POSTGRES_STATE_DIR=str(base / "pg-state"),
        )  # as root, not /var/lib/ringflow
        self.env = env

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.prefect_port}/api"

    def cli(self, *args: str) -> None:
        p = subprocess.run(
            [str(VENV_BIN / "ringflow"), *args], cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=900
        )
        if p.returncode != 0:
            raise RuntimeError(f"ringflow {' '.join(args)} ({self.database}): {p.stdout[-2000:]}\n{p.stderr[-2000:]}")

    def up(self, serve: bool = False) -> None:
        if serve:  # the runner deploys when it starts
            self.cli("up", "--config", str(SMOKE), "--database", self.database)
        else:
            self.cli("up", "--config", str(SMOKE), "--no-serve", "--database", self.database)
            self.cli("deploy", "--config", str(SMOKE))

    def down(self) -> None:
        subprocess.run([str(VENV_BIN / "ringflow"), "down"], cwd=ROOT, env=self.env, capture_output=True, timeout=300)


def _burst(api: str, deployment_id, n: int) -> tuple[list[float], float]:
    """n submissions at once; per-submission latency (s) and the burst's wall time."""
    from prefect.client.orchestration import SyncPrefectClient

    def submit(_: int) -> float:
        with SyncPrefectClient(api) as client:
            t0 = time.perf_counter()
            client.create_flow_run_from_deployment(deployment_id, parameters={"reason": "bench"})
            return time.perf_counter() - t0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=n) as pool:
        latencies = list(pool.map(submit, range(n)))
    return latencies, time.perf_counter() - t0


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def measure_bursts(base: Path, bursts: int, burst: int) -> dict:
    """Bursts of concurrent submissions without a runner, both databases alternating."""
    from prefect.client.orchestration import SyncPrefectClient

    stacks = [BenchStack(base, "sqlite"), BenchStack(base, "postgresql")]
    load_before = load_avg()
    results: dict[str, dict] = {}
    try:
        for s in stacks:
            s.up()
        deployments = {}
        for s in stacks:
            with SyncPrefectClient(s.api) as c:
                deployments[s.database] = c.read_deployment_by_name(TRAINING_DEPLOYMENT).id
            _burst(s.api, deployments[s.database], 4)  # warm-up: connections, caches
        lat: dict[str, list[float]] = {s.database: [] for s in stacks}
        rates: dict[str, list[float]] = {s.database: [] for s in stacks}
        for i in range(bursts):
            for s in stacks if i % 2 == 0 else list(reversed(stacks)):  # alternate who goes first
                xs, wall = _burst(s.api, deployments[s.database], burst)
                lat[s.database] += xs
                rates[s.database].append(burst / wall * 60)
        for s in stacks:
            with SyncPrefectClient(s.api) as c:
                created = len(c.read_flow_runs(limit=200))
            xs = lat[s.database]
            results[s.database] = {
                "submissions": len(xs),
                "flow_runs_in_api": created,
                "p50_ms": round(statistics.median(xs) * 1000, 1),
                "p95_ms": round(_pct(xs, 0.95) * 1000, 1),
                "max_ms": round(max(xs) * 1000, 1),
                "submissions_per_min_median": round(statistics.median(rates[s.database])),
            }
    finally:
        for s in stacks:
            s.down()
    return {
        "what": "flow-run submissions through the Prefect API of `ringflow up`, bursts of concurrent clients, SQLite vs PostgreSQL",
        "how": (
            f"{bursts} bursts of {burst} concurrent create_flow_run_from_deployment calls per database, "
            "alternating databases; no runner (runs stay Scheduled): the API and its database only"
        ),
        "machine": machine_facts(),
        "load_before": load_before,
        "load_after": load_avg(),
        "results": results,
    }


LOAD_RUNS = 20
PROBE_EVERY_S = 20
PROBE_SIZE = 5


def load_parameters(i: int) -> dict:
    """The i-th of the 20 training runs: smoke config, one rank, 2 epochs, its own seed."""
    from ringflow.training.config import load_config

    cfg = load_config(
        SMOKE,
        [
            "training.world_size=1",
            "training.epochs=2",
            "training.early_stopping_patience=1",
            f"training.seed={100 + i}",
        ],
    )
    return {"config": cfg.model_dump(mode="json"), "reason": f"load bench {i}"}


def _submit_at_once(api: str, deployment_id, parameters: list[dict], state=None) -> tuple[list, list[float]]:
    from prefect.client.orchestration import SyncPrefectClient

    def submit(params: dict):
        with SyncPrefectClient(api) as client:
            t0 = time.perf_counter()
            run = client.create_flow_run_from_deployment(deployment_id, parameters=params, state=state)
            return run.id, time.perf_counter() - t0

    with ThreadPoolExecutor(max_workers=len(parameters)) as pool:
        done = list(pool.map(submit, parameters))
    return [i for i, _ in done], [t for _, t in done]


def measure_under_load(base: Path, window_min: float) -> dict:
    """Per database: 20 real training runs at once through the stack's runner, probes of the API."""
    from datetime import UTC, datetime

    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.states import Scheduled

    never = Scheduled(scheduled_time=datetime(2099, 1, 1, tzinfo=UTC))
    params = [load_parameters(i) for i in range(LOAD_RUNS)]
    results: dict[str, dict] = {}
    for database in ("sqlite", "postgresql"):
        s = BenchStack(base, database)
        try:
            s.up(serve=True)
            with SyncPrefectClient(s.api) as c:
                dep = c.read_deployment_by_name(TRAINING_DEPLOYMENT).id
            loads = [load_avg()]
            t0 = time.monotonic()
            ids, burst_lat = _submit_at_once(s.api, dep, params)
            probe_lat: list[float] = []
            completed_at: dict = {}
            most_running = 0
            while (elapsed := time.monotonic() - t0) < window_min * 60:
                _, xs = _submit_at_once(s.api, dep, [{"reason": "probe"}] * PROBE_SIZE, state=never)
                probe_lat += xs
                loads.append(load_avg())
                with SyncPrefectClient(s.api) as c:
                    runs = c.read_flow_runs(
                        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)), limit=LOAD_RUNS
                    )
                for r in runs:
                    if r.state.is_completed() and r.id not in completed_at:
                        completed_at[r.id] = time.monotonic() - t0
                most_running = max(most_running, sum(r.state.is_running() for r in runs))
                time.sleep(max(0.0, PROBE_EVERY_S - (time.monotonic() - t0 - elapsed)))
            window_s = time.monotonic() - t0
            states: dict[str, int] = {}
            for r in runs:
                states[r.state.name] = states.get(r.state.name, 0) + 1
            done = sorted(completed_at.values())
            every = burst_lat + probe_lat
            results[database] = {
                "window_s": round(window_s),
                "runs_submitted": LOAD_RUNS,
                "runs_completed": len(done),
                "runs_per_min": round(len(done) / (window_s / 60), 2),
                "steady_runs_per_min": (
                    round((len(done) - 1) / ((done[-1] - done[0]) / 60), 2) if len(done) >= 2 else None
                ),
                "first_completion_s": round(done[0]) if done else None,
                "states_at_end": states,
                "most_running_at_once": most_running,
                "submissions": len(every),
                "p50_ms": round(statistics.median(every) * 1000, 1),
                "p95_ms": round(_pct(every, 0.95) * 1000, 1),
                "burst20_p50_ms": round(statistics.median(burst_lat) * 1000, 1),
                "burst20_p95_ms": round(_pct(burst_lat, 0.95) * 1000, 1),
                "probes_p50_ms": round(statistics.median(probe_lat) * 1000, 1) if probe_lat else None,
                "probes_p95_ms": round(_pct(probe_lat, 0.95) * 1000, 1) if probe_lat else None,
                "load_1min_mean": round(statistics.mean(x[0] for x in loads if x), 2),
                "load_1min_max": round(max(x[0] for x in loads if x), 2),
            }
            print(database, results[database], flush=True)
        finally:
            s.down()
    return {
        "what": (
            "20 training-pipeline runs submitted at once to a full `ringflow up` stack (runner "
            "included), SQLite vs PostgreSQL, one after the other"
        ),
        "how": (
            f"smoke config, one rank, 2 epochs, a seed per run; the runner trains them one at a time "
            f"(deployment concurrency limit 1) for {window_min:g} min per database; every {PROBE_EVERY_S} s "
            f"{PROBE_SIZE} concurrent probe submissions scheduled far ahead (same API call, never run); "
            "latency = the 20 plus every probe; load average sampled at every probe"
        ),
        "window_min": window_min,
        "machine": machine_facts(),
        "results": results,
    }


def _table(bursts: dict | None, under_load: dict | None) -> str:
    rows = []
    if bursts:
        before, after = (", ".join(map(str, bursts[k])) for k in ("load_before", "load_after"))
        rows += [
            f"Submissions alone (no runner, {bursts['machine']['date']}, load before/after {before} / {after}):",
            "",
            "| database | submissions | p50 latency | p95 latency | max | submissions/min (burst of 20, median) |",
            "|---|---|---|---|---|---|",
        ]
        for db, r in bursts["results"].items():
            rows.append(
                f"| {db} | {r['submissions']} | {r['p50_ms']} ms | {r['p95_ms']} ms | {r['max_ms']} ms | "
                f"{r['submissions_per_min_median']} |"
            )
    if under_load:
        rows += [
            "",
            (
                f"Under load: 20 training runs at once, the runner training them ({under_load['machine']['date']}; "
                "the machine is shared with other jobs, load average sampled during each window):"
            ),
            "",
            (
                "| database | window | runs completed | runs/min held | submission p50 | submission p95 | "
                "burst of 20 p50/p95 | probes p50/p95 | load avg (1 min) mean / max |"
            ),
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for db, r in under_load["results"].items():
            rows.append(
                f"| {db} | {r['window_s']} s | {r['runs_completed']} of {r['runs_submitted']} | "
                f"{r['runs_per_min']} | {r['p50_ms']} ms | {r['p95_ms']} ms | "
                f"{r['burst20_p50_ms']} / {r['burst20_p95_ms']} ms | "
                f"{r['probes_p50_ms']} / {r['probes_p95_ms']} ms | {r['load_1min_mean']} / {r['load_1min_max']} |"
            )
    return "\n".join(rows).strip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="2 bursts per database instead of 5; 4 min windows")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--burst", type=int, default=20, help="concurrent submissions per burst")
    ap.add_argument("--part", choices=["bursts", "load", "all"], default="all")
    ap.add_argument("--window-min", type=float, default=None, help="minutes of training per database (default 8)")
    a = ap.parse_args(argv)
    window = a.window_min or (4.0 if a.quick else 8.0)
    path = Path(a.out) if a.out else RESULTS_DIR / "stack.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}

    base = Path(tempfile.mkdtemp(prefix="ringflow-bench-stack-"))
    base.chmod(0o755)  # as root, PostgreSQL runs as user postgres and must reach base/pg-state
    try:
        bursts = (
            measure_bursts(base, 2 if a.quick else 5, a.burst)
            if a.part in ("bursts", "all")
            else previous.get("bursts") or _legacy_bursts(previous)
        )
        under_load = measure_under_load(base, window) if a.part in ("load", "all") else previous.get("under_load")
    finally:
        shutil.rmtree(base, ignore_errors=True)

    data = {
        "benchmark": "stack",
        "what": "flow-run submission latency through the Prefect API of `ringflow up` (alone, and with 20 "
        "training runs in flight) and runs/min held, SQLite vs PostgreSQL",
        "quick": a.quick,
        "bursts": bursts,
        "under_load": under_load,
        "table_markdown": _table(bursts, under_load),
    }
    path = write_result("stack", data, a.out)
    print(data["table_markdown"])
    print(f"wrote {path}")
    return 0


def _legacy_bursts(previous: dict) -> dict | None:
    """The bursts part of a result file written before the load part existed."""
    if "results" not in previous:
        return None
    return {k: previous[k] for k in ("what", "how", "machine", "load_before", "load_after", "results") if k in previous}


if __name__ == "__main__":
    sys.exit(main())

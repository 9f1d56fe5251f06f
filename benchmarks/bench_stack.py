"""Flow-run submission through the Prefect API of `ringflow up`: SQLite vs ringflow's PostgreSQL.

    .venv/bin/python benchmarks/bench_stack.py [--quick] [--out PATH]

For each database, one stack (`ringflow up --no-serve --database X` in a scratch RINGFLOW_HOME,
free ports, then `ringflow deploy` with the smoke config) and bursts of N concurrent submissions
of the training deployment (`create_flow_run_from_deployment`, one client per thread, as N
people pressing Run or N automations firing). Without a runner the runs stay Scheduled, so this
measures the API and its database, not training (a smoke training run takes about a minute of
this machine's 2 cores: the runner's `limit` and the deployment's concurrency limit of 1 queue
the rest). The two databases are measured alternately, burst by burst, on the same machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import ROOT, VENV_BIN, bench_env, free_port, load_avg, machine_facts, write_result  # noqa: E402

SMOKE = ROOT / "configs" / "smoke.yaml"
SCRUB = ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_API_AUTH_STRING", "PREFECT_SERVER_API_AUTH_STRING",
         "PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_HOME",
         "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD")


class BenchStack:
    def __init__(self, base: Path, database: str):
        self.database = database
        self.home = base / database
        self.prefect_port = free_port()
        env = {k: v for k, v in bench_env().items() if k not in SCRUB}
        env.update(RINGFLOW_HOME=str(self.home), RINGFLOW_PREFECT_PORT=str(self.prefect_port),
                   RINGFLOW_MLFLOW_PORT=str(free_port()), RINGFLOW_EVIDENTLY_PORT=str(free_port()),
                   RINGFLOW_POSTGRES_PORT=str(free_port()))
        self.env = env

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.prefect_port}/api"

    def cli(self, *args: str) -> None:
        p = subprocess.run([str(VENV_BIN / "ringflow"), *args], cwd=ROOT, env=self.env,
                           capture_output=True, text=True, timeout=900)
        if p.returncode != 0:
            raise RuntimeError(f"ringflow {' '.join(args)} ({self.database}): {p.stdout[-2000:]}\n{p.stderr[-2000:]}")

    def up(self) -> None:
        self.cli("up", "--config", str(SMOKE), "--no-serve", "--database", self.database)
        self.cli("deploy", "--config", str(SMOKE))

    def down(self) -> None:
        subprocess.run([str(VENV_BIN / "ringflow"), "down"], cwd=ROOT, env=self.env,
                       capture_output=True, timeout=300)


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="2 bursts per database instead of 5")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--burst", type=int, default=20, help="concurrent submissions per burst")
    a = ap.parse_args(argv)
    bursts = 2 if a.quick else 5
    from prefect.client.orchestration import SyncPrefectClient

    base = Path(tempfile.mkdtemp(prefix="ringflow-bench-stack-"))
    base.chmod(0o755)  # PostgreSQL runs as user postgres and must reach its data directory
    stacks = [BenchStack(base, "sqlite"), BenchStack(base, "postgresql")]
    load_before = load_avg()
    results: dict[str, dict] = {}
    try:
        for s in stacks:
            s.up()
        deployments = {}
        for s in stacks:
            with SyncPrefectClient(s.api) as c:
                deployments[s.database] = c.read_deployment_by_name("training-pipeline/training-pipeline").id
            _burst(s.api, deployments[s.database], 4)  # warm-up: connections, caches
        lat: dict[str, list[float]] = {s.database: [] for s in stacks}
        rates: dict[str, list[float]] = {s.database: [] for s in stacks}
        for i in range(bursts):
            for s in (stacks if i % 2 == 0 else list(reversed(stacks))):  # alternate who goes first
                xs, wall = _burst(s.api, deployments[s.database], a.burst)
                lat[s.database] += xs
                rates[s.database].append(a.burst / wall * 60)
        for s in stacks:
            with SyncPrefectClient(s.api) as c:
                created = len(c.read_flow_runs(limit=200))
            xs = lat[s.database]
            results[s.database] = {
                "submissions": len(xs), "flow_runs_in_api": created,
                "p50_ms": round(statistics.median(xs) * 1000, 1), "p95_ms": round(_pct(xs, 0.95) * 1000, 1),
                "max_ms": round(max(xs) * 1000, 1),
                "submissions_per_min_median": round(statistics.median(rates[s.database])),
            }
    finally:
        for s in stacks:
            s.down()
        shutil.rmtree(base, ignore_errors=True)

    rows = ["| database | submissions | p50 latency | p95 latency | max | submissions/min (burst of %d, median) |" % a.burst,
            "|---|---|---|---|---|---|"]
    for db, r in results.items():
        rows.append(f"| {db} | {r['submissions']} | {r['p50_ms']} ms | {r['p95_ms']} ms | {r['max_ms']} ms | "
                    f"{r['submissions_per_min_median']} |")
    data = {
        "benchmark": "stack",
        "what": "flow-run submissions through the Prefect API of `ringflow up`, bursts of concurrent clients, SQLite vs PostgreSQL",
        "how": (f"{bursts} bursts of {a.burst} concurrent create_flow_run_from_deployment calls per database, "
                "alternating databases; no runner (runs stay Scheduled): the API and its database only"),
        "quick": a.quick, "machine": machine_facts(), "load_before": load_before, "load_after": load_avg(),
        "results": results, "table_markdown": "\n".join(rows),
    }
    path = write_result("stack", data, a.out)
    print("\n".join(rows))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

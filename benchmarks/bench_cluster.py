"""What the veth path between namespace hosts costs: np=2 across two hosts next to np=2 on one.

    .venv/bin/python benchmarks/bench_cluster.py [--quick]      # as root (it builds a cluster)

Builds a ``ringflow cluster`` without the stack (``up --no-stack``: namespaces h0..h2, sshd on
h1 and h2) in a temporary RINGFLOW_HOME, and launches every job from h1 (as the worker would):

- ``one_host``:  ``horovodrun -np 2 -H h1:2 --network-interface lo`` (both ranks on h1: Gloo's
  traffic stays on h1's loopback, as on any single machine),
- ``two_hosts``: ``horovodrun -np 2 -H h1:1,h2:1 --network-interface eth0 --ssh-identity-file ...``
  (rank 1 started over ssh on h2; every byte crosses veth -> bridge -> veth).

Each job measures, in one process pair: the allreduce bus bandwidth of ``hvd.allreduce_`` for
several message sizes (median of repeats), and the step throughput of the default TabularNet
(flights shapes, batch 1024 per rank, ``hvd.DistributedOptimizer``) on synthetic rows: the
trainer's compute + gradient allreduce without its data loading and MLflow logging. The two
placements alternate (A B A B ...) and each row is the median over the jobs. Both placements share
this machine's cores; only the network path differs. Writes ``benchmarks/results/cluster.json``.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import ROOT, bench_env, horovodrun, load_avg, machine_facts, median, write_result  # noqa: E402

KB, MB = 1024, 1024 * 1024
SIZES = [64 * KB, 1 * MB, 16 * MB]
# TabularNet(num_numeric=12, cardinalities=[17, 4, 106], embedding_dim=8, hidden_sizes=[128, 64]): the flights
# model when results/cluster.json was measured (14.1k parameters). Today's adds the additive inputs (11.2k
# parameters, same 64x128 largest layer); this job keeps the measured shapes so its rows stay comparable.
NUMERIC, CARDINALITIES = 12, [17, 4, 106]


def worker(args) -> None:
    import horovod.torch as hvd
    import torch

    from ringflow.training.model import TabularNet

    hvd.init()
    torch.set_num_threads(1)
    rank = hvd.rank()
    rows = []
    for nbytes in SIZES:
        x = torch.zeros(nbytes // 4)
        iters = max(2, min(200, (4 if args.quick else 16) * MB // nbytes))
        hvd.allreduce_(x, op=hvd.Sum, name=f"w{nbytes}")  # warm-up: negotiation, buffers
        times = []
        for r in range(args.repeats):
            hvd.allreduce(torch.zeros(1), name=f"b{nbytes}.{r}")  # barrier
            t0 = time.perf_counter()
            for _ in range(iters):
                hvd.allreduce_(x, op=hvd.Sum, name=f"ar{nbytes}")
            times.append((time.perf_counter() - t0) / iters)
        t = median(times)
        rows.append({"case": "allreduce", "bytes": nbytes, "time_us": t * 1e6, "busbw_gbs": nbytes / t / 1e9})

    torch.manual_seed(rank)
    net = TabularNet(NUMERIC, CARDINALITIES, 8, [128, 64])
    opt = hvd.DistributedOptimizer(torch.optim.Adam(net.parameters(), lr=1e-3), named_parameters=net.named_parameters())
    hvd.broadcast_parameters(net.state_dict(), root_rank=0)
    batch = 1024
    x_num = torch.randn(batch, NUMERIC)
    x_cat = torch.stack([torch.randint(0, c, (batch,)) for c in CARDINALITIES], dim=1)
    y = torch.randint(0, 2, (batch,)).float()
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def step():
        opt.zero_grad()
        loss_fn(net(x_num, x_cat), y).backward()
        opt.step()

    for _ in range(10):
        step()
    steps = 50 if args.quick else 200
    hvd.allreduce(torch.zeros(1), name="train.barrier")
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    wall = time.perf_counter() - t0
    rows.append(
        {
            "case": "train_step",
            "batch_per_rank": batch,
            "steps": steps,
            "step_ms": wall / steps * 1e3,
            "samples_per_s": hvd.size() * batch * steps / wall,
        }
    )
    if rank == 0:
        Path(args.worker_out).write_text(json.dumps(rows))


def run_job(state, placement: str, key: Path, repeats: int, quick: bool) -> list[dict]:
    from ringflow.infra.hosts import host_argv

    # one host: Horovod resolves a single local host to 127.0.0.1 and insists on its interface (lo)
    hosts, nic = ("h1:2", "lo") if placement == "one_host" else ("h1:1,h2:1", "eth0")
    with tempfile.TemporaryDirectory(dir=state.shared_home) as d:  # shared: rank 0 writes it
        out = Path(d) / "rows.json"
        cmd = [
            horovodrun(),
            "-np",
            "2",
            "-H",
            hosts,
            "--gloo",
            "--network-interface",
            nic,
            "--ssh-identity-file",
            str(key),
            sys.executable,
            __file__,
            "--worker",
            "--repeats",
            str(repeats),
            "--worker-out",
            str(out),
        ] + (["--quick"] if quick else [])
        p = subprocess.run(
            host_argv(state.host("h1"), cmd), env=bench_env(), cwd=ROOT, capture_output=True, text=True, timeout=900
        )
        if p.returncode != 0 or not out.exists():
            raise RuntimeError(f"{placement} job failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
        return json.loads(out.read_text())


def summarize(jobs: dict[str, list[list[dict]]]) -> dict:
    out: dict = {}
    for placement, runs in jobs.items():
        rows = [r for run in runs for r in run]
        ar = {}
        for nbytes in SIZES:
            sel = [r for r in rows if r["case"] == "allreduce" and r["bytes"] == nbytes]
            ar[str(nbytes)] = {
                "busbw_gbs": median([r["busbw_gbs"] for r in sel]),
                "time_us": median([r["time_us"] for r in sel]),
            }
        tr = [r for r in rows if r["case"] == "train_step"]
        out[placement] = {
            "allreduce": ar,
            "train_samples_per_s": median([r["samples_per_s"] for r in tr]),
            "train_step_ms": median([r["step_ms"] for r in tr]),
        }
    one, two = out["one_host"], out["two_hosts"]
    out["two_vs_one"] = {
        "allreduce_busbw": {
            k: two["allreduce"][k]["busbw_gbs"] / one["allreduce"][k]["busbw_gbs"] for k in one["allreduce"]
        },
        "train_samples_per_s": two["train_samples_per_s"] / one["train_samples_per_s"],
    }
    return out


def render(result: dict) -> str:
    """RESULTS.md section: the two placements side by side and what the veth hop costs."""
    s = result["summary"]
    one, two, ratio = s["one_host"], s["two_hosts"], s["two_vs_one"]
    lines = [
        "| measure | np=2 on one host (h1:2) | np=2 across hosts (h1:1,h2:1) | across / one |",
        "|---|---|---|---|",
    ]
    for k in one["allreduce"]:
        n = int(k)
        size = f"{n // MB} MiB" if n >= MB else f"{n // KB} KiB"
        lines.append(
            f"| allreduce {size}, bus bandwidth GB/s | {one['allreduce'][k]['busbw_gbs']:.3f} | "
            f"{two['allreduce'][k]['busbw_gbs']:.3f} | {ratio['allreduce_busbw'][k]:.2f}x |"
        )
    lines.append(
        f"| TabularNet step, samples/s (batch 1024/rank) | {one['train_samples_per_s']:.0f} | "
        f"{two['train_samples_per_s']:.0f} | {ratio['train_samples_per_s']:.2f}x |"
    )
    big = max(one["allreduce"], key=int)
    lines += [
        "",
        f"Measured {result['machine']['date']} ({'quick' if result['quick'] else 'full'}: {result['rounds']} "
        f"A/B rounds, medians; load {result['load_before']} -> {result['load_after']}). The veth path "
        f"(namespace -> bridge -> namespace) carries {ratio['allreduce_busbw'][big]:.2f}x the bus bandwidth "
        f"of the one-host path for {int(big) // MB} MiB messages; the trainer's step, whose gradients "
        f"are ~60 KB, runs at {ratio['train_samples_per_s']:.2f}x. Both placements share the same cores, "
        "so this is the cost of the network path alone, not of a second machine's compute. The load "
        "average says how much other work shared the cores: above their count, repeat before relying on a ratio.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--worker", action="store_true")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--worker-out")
    p.add_argument("--rounds", type=int, default=None, help="A/B rounds (default 3, quick 1)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.worker:
        args.repeats = args.repeats or 5
        worker(args)
        return 0
    if os.geteuid() != 0:
        print("bench_cluster: needs root (it builds network-namespace hosts); skipped", file=sys.stderr)
        return 0
    from ringflow.infra.cluster import up
    from ringflow.infra.hosts import down, identity_file

    repeats = args.repeats or (3 if args.quick else 7)
    rounds = args.rounds or (1 if args.quick else 3)
    facts = machine_facts()
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        state = up(home, 3, stack=False, echo=lambda _: None)
        try:
            load_before = load_avg()
            t0 = time.perf_counter()
            jobs: dict[str, list] = {"one_host": [], "two_hosts": []}
            for r in range(rounds):
                order = ["one_host", "two_hosts"] if r % 2 == 0 else ["two_hosts", "one_host"]
                for placement in order:
                    jobs[placement].append(run_job(state, placement, identity_file(home), repeats, args.quick))
            wall = time.perf_counter() - t0
        finally:
            down(home, echo=lambda _: None)
    result = {
        "machine": facts,
        "quick": args.quick,
        "rounds": rounds,
        "repeats": repeats,
        "load_before": load_before,
        "load_after": load_avg(),
        "wall_s": round(wall, 1),
        "summary": summarize(jobs),
        "jobs": jobs,
    }
    result["table_markdown"] = render(result)
    path = write_result("cluster", result, Path(args.out) if args.out else None)
    s = result["summary"]
    print(f"bench_cluster: wrote {path}")
    for k, v in s["two_vs_one"]["allreduce_busbw"].items():
        print(
            f"  allreduce {int(k) // KB:>6d} KiB  one host {s['one_host']['allreduce'][k]['busbw_gbs']:.3f} GB/s  "
            f"two hosts {s['two_hosts']['allreduce'][k]['busbw_gbs']:.3f} GB/s  ({v:.2f}x)"
        )
    print(
        f"  train step  one host {s['one_host']['train_samples_per_s']:.0f} samples/s  two hosts "
        f"{s['two_hosts']['train_samples_per_s']:.0f} samples/s  ({s['two_vs_one']['train_samples_per_s']:.2f}x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

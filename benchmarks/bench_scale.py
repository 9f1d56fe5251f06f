"""The cost-growth curve: shard, train (one epoch, np=2), evaluate and monitor at 1x, 3x, 10x, 30x flights.

    .venv/bin/python benchmarks/bench_scale.py            # 1x 3x 10x 30x (about 25 min on 2 cores)
    .venv/bin/python benchmarks/bench_scale.py --quick    # 1x 3x, into --out

What: the data is a directory of monthly Parquet files: 1x is the real 2013 flights+weather
(336,776 rows), Kx is ``ringflow synth --factor K`` (resampled per month, jittered weather: a scale
workload, not new information). Config: the default windows (train January-April, validation May,
test June 1-15) and the default model. Each stage runs in a process of its own, so its peak RSS
(VmHWM, not ``ru_maxrss``, which carries the forking process's mark) is its own:

- shard: ``shard_dataset`` (streaming, two passes);
- train: ``horovodrun -np 2`` of the training program, one epoch; time is the epoch's wall time,
  memory the larger rank's peak RSS;
- evaluate: load the trained model and score the test window (the evaluate stage's work);
- monitor: the month of June read from the directory in chunks (``monitoring/batch.py``), scored
  chunk by chunk with the model, the reference sampled from the train shards row group by row
  group, Evidently's drift and quality reports on a ``max_current_rows`` sample (the monitoring
  flow's work without MLflow/Prefect).

The log-log slope of time (and of memory) against rows says how each stage grows: 1.0 is linear,
0 is flat. Output: ``results/scale.json`` (with a ready table) and ``scale.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import ROOT, bench_env, horovodrun, machine_facts, write_result  # noqa: E402

HERE = Path(__file__).resolve().parent
STAGES = ("shard", "train", "evaluate", "monitor")

SHARD = """
import json, sys, time
from ringflow.training.memory import peak_rss_mb
from ringflow.training.config import load_config
from ringflow.training.sharding import shard_dataset
cfg = load_config(sys.argv[1], ["data.source=" + sys.argv[2]])
t0 = time.perf_counter()
m = shard_dataset(cfg, sys.argv[3], progress=lambda *a: None)
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_mb": peak_rss_mb(),
                  "rows": m.rows_total, "train_rows": m.windows["train"].rows, "manifest": str(m.path)}))
"""

EVALUATE = """
import json, sys, time
from ringflow.training.memory import peak_rss_mb
t0 = time.perf_counter()
from ringflow.training.manifest import Manifest
from ringflow.training.metrics import classification_metrics
from ringflow.training.model import load_model, predict_proba
m = Manifest.load(sys.argv[1])
net, pre = load_model(sys.argv[2])
test = m.read(m.test)
auc = classification_metrics(test[m.target_column], predict_proba(net, pre, test))["roc_auc"]
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_mb": peak_rss_mb(),
                  "rows": len(test), "roc_auc": auc}))
"""

MONITOR = """
import json, sys, time
from ringflow.training.memory import peak_rss_mb
t0 = time.perf_counter()
from ringflow.monitoring.batch import batch_chunks, describe_month
from ringflow.monitoring.reference import reference_from_manifest
from ringflow.monitoring.reports import PREDICTION, build_reports
from ringflow.monitoring.scoring import score_chunks
from ringflow.training.config import load_config
from ringflow.training.data import TARGET
from ringflow.training.manifest import Manifest
from ringflow.training.metrics import classification_metrics
from ringflow.training.model import load_model, predict_proba
cfg = load_config(sys.argv[1], ["data.source=" + sys.argv[4]])
d, m = cfg.data, cfg.monitoring
net, pre = load_model(sys.argv[3])
batch = describe_month(cfg, "2013-06")
ref = reference_from_manifest(Manifest.load(sys.argv[2]), None, m.reference_sample_rows)
ref.frame[PREDICTION] = predict_proba(net, pre, ref.frame)
s = score_chunks(batch_chunks(batch, cfg), batch.rows, lambda chunk: predict_proba(net, pre, chunk),
                 features=d.feature_columns, vocabulary={c: pre.vocab[c] for c in pre.categorical}, target=TARGET,
                 sample_rows=m.max_current_rows)
build_reports(ref.frame, s.sample, d.numeric_features, d.categorical_features, sys.argv[5], target=TARGET,
              reference_rows=m.reference_sample_rows, current_rows=m.max_current_rows)
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_mb": peak_rss_mb(), "rows": batch.rows,
                  "evidently_rows": len(s.sample), "roc_auc": classification_metrics(s.target, s.prediction)["roc_auc"]}))
"""


def _child(code: str, *args: str, timeout: int = 3600) -> dict:
    p = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, env=bench_env(), capture_output=True, text=True, timeout=timeout
    )
    if p.returncode != 0:
        raise RuntimeError(f"stage failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def make_data(factor: int, out: Path) -> None:
    if factor == 1:  # the real rows, as monthly files
        from ringflow.training.data import load_flights

        out.mkdir(parents=True)
        df = load_flights()
        for month, part in df.groupby("month"):
            part.to_parquet(out / f"flights-2013-{month:02d}.parquet", index=False)
    else:
        from ringflow.training.synth import synthesize

        synthesize(factor, out, progress=lambda *a: None)


def train(cfg_path: Path, manifest: str, out: Path) -> dict:
    from ringflow.training.config import load_config, with_overrides
    from ringflow.training.launch import horovodrun_command, launch_env

    cfg = with_overrides(load_config(cfg_path), {"training.epochs": 1, "training.timeout_s": 3600})
    cmd = horovodrun_command(cfg, manifest, out)
    cmd[0] = horovodrun()
    t0 = time.perf_counter()
    p = subprocess.run(
        cmd, cwd=ROOT, env=launch_env(cfg, MLFLOW_RUN_ID=None), capture_output=True, text=True, timeout=3600
    )
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"training failed:\n{p.stdout[-3000:]}\n{p.stderr[-2000:]}")
    s = json.loads((out / "summary.json").read_text())
    epoch = s["history"][0]
    return {
        "seconds": epoch["epoch_time_s"],
        "launch_wall_s": wall,
        "peak_mb": max(r["peak_rss_mb"] for r in s["per_rank"]),
        "samples_per_s": epoch["samples_per_s"],
        "val_roc_auc": epoch.get("val_roc_auc"),
    }


def slope(xs: list[float], ys: list[float]) -> float | None:
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if x and y and x > 0 and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / den if den else None


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for stage in STAGES:
        xs = [r["rows"] for r in rows if r.get(stage)]
        a.plot(xs, [r[stage]["seconds"] for r in rows if r.get(stage)], "o-", label=stage)
        b.plot(xs, [r[stage]["peak_mb"] for r in rows if r.get(stage)], "o-", label=stage)
    for ax, what in ((a, "seconds"), (b, "peak RSS (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("source rows")
        ax.set_ylabel(what)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    a.set_title("time per stage (train: one epoch, np=2)")
    b.set_title("peak memory per stage process (train: larger rank)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1x and 3x only")
    ap.add_argument("--factors", default=None, help="comma-separated, e.g. 1,3,10,30")
    ap.add_argument("--out", type=Path, default=None, help="result JSON (default benchmarks/results/scale.json)")
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temp dir, removed)")
    a = ap.parse_args(argv)
    factors = [int(x) for x in a.factors.split(",")] if a.factors else ([1, 3] if a.quick else [1, 3, 10, 30])
    work = a.work or Path(tempfile.mkdtemp(prefix="ringflow-scale-"))
    cfg_path = ROOT / "configs" / "flights.yaml"
    machine = machine_facts()
    rows: list[dict] = []
    try:
        for k in factors:
            src = work / f"x{k}"
            print(f"== {k}x: data", flush=True)
            if not src.exists():
                make_data(k, src)
            row: dict = {"factor": k}
            print(f"== {k}x: shard", flush=True)
            row["shard"] = _child(SHARD, str(cfg_path), str(src), str(work / f"data-x{k}"))
            row["rows"] = row["shard"]["rows"]
            manifest = row["shard"].pop("manifest")
            print(f"== {k}x: train", flush=True)
            run_dir = work / f"run-x{k}"
            shutil.rmtree(run_dir, ignore_errors=True)
            row["train"] = train(cfg_path, manifest, run_dir)
            print(f"== {k}x: evaluate", flush=True)
            row["evaluate"] = _child(EVALUATE, manifest, str(run_dir))
            print(f"== {k}x: monitor", flush=True)
            row["monitor"] = _child(
                MONITOR, str(cfg_path), manifest, str(run_dir), str(src), str(work / f"reports-x{k}")
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)

    xs = [r["rows"] for r in rows]
    slopes = {
        s: {"time": slope(xs, [r[s]["seconds"] for r in rows]), "memory": slope(xs, [r[s]["peak_mb"] for r in rows])}
        for s in STAGES
    }
    png = HERE / ("scale.png" if a.out is None else "scale-quick.png")
    if a.out is not None:
        png = a.out.with_suffix(".png")
    plot(rows, png)
    header = "| factor | rows | " + " | ".join(f"{s} s | {s} peak MiB" for s in STAGES) + " |"
    lines = [header, "|" + "---|" * (2 + 2 * len(STAGES))]
    for r in rows:
        cells = [f"{r['factor']}x", f"{r['rows']:,}"]
        for s in STAGES:
            cells += [f"{r[s]['seconds']:.1f}", f"{r[s]['peak_mb']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(
        "| log-log slope | | "
        + " | ".join(f"{_f(slopes[s]['time'])} | {_f(slopes[s]['memory'])}" for s in STAGES)
        + " |"
    )
    mem = {s: (rows[-1][s]["peak_mb"] / rows[1][s]["peak_mb"]) if len(rows) > 1 else None for s in STAGES}
    result = {
        "how": "one process per stage; peak RSS = VmHWM of that process (train: the larger rank); "
        "train = one epoch of the default model at np=2",
        "factors": factors,
        "rows": rows,
        "slopes": slopes,
        "plot": str(png.relative_to(ROOT)) if png.is_relative_to(ROOT) else str(png),
        "memory_ratio_last_vs_3x": mem,
        "targets": {"time_slope_max": 1.05, "shard_memory_ratio_30x_vs_3x_max": 1.2},
        "table_markdown": "\n".join(lines) + f"\n\n![cost growth]({png.name})\n",
        "machine": machine,
    }
    print(write_result("scale", result, a.out))
    return 0


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


if __name__ == "__main__":
    sys.exit(main())

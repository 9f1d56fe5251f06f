"""Run every ``benchmarks/bench_*.py``, collect ``benchmarks/results/*.json``, write ``RESULTS.md``.

    .venv/bin/python benchmarks/run_all.py            # everything (make bench), ~25-40 min on 2 cores
    .venv/bin/python benchmarks/run_all.py --quick    # smoke: fewer sizes/repeats, into
                                                      #   $TMPDIR/ringflow-bench/quick-results/ (the
                                                      #   committed results stay untouched);
                                                      #   benchmarks without --quick/--out are skipped
    .venv/bin/python benchmarks/run_all.py --render   # only regenerate RESULTS.md from the JSON
    .venv/bin/python benchmarks/run_all.py --only allreduce,training

Benchmarks run one after another (they would disturb each other's timings). A failing benchmark
is reported in RESULTS.md and the exit code, and the others still run. Benchmarks are never
timed test asserts: the numbers live here, with the machine and its load next to them.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RESULTS_DIR, ROOT, bench_env, load_avg, machine_facts  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS_MD = HERE / "RESULTS.md"
RUNLOG = RESULTS_DIR / "_run_all.json"
# --quick never overwrites the full results: its JSON and RESULTS.md go to scratch, outside the tree
QUICK_DIR = Path(tempfile.gettempdir()) / "ringflow-bench" / "quick-results"
# our benchmarks first (they need a quiet machine most), then the others alphabetically
FIRST = ["allreduce", "training", "pipeline"]


def discover() -> list[str]:
    names = [p.stem.removeprefix("bench_") for p in sorted(HERE.glob("bench_*.py"))]
    return [n for n in FIRST if n in names] + [n for n in names if n not in FIRST]


def supports_quick(name: str) -> bool:
    return '"--quick"' in (HERE / f"bench_{name}.py").read_text()


def run_benchmarks(names: list[str], quick: bool, timeout: int) -> dict[str, Any]:
    log: dict[str, Any] = {}
    for name in names:
        script = HERE / f"bench_{name}.py"
        if quick and not supports_quick(name):
            log[name] = {"ran": False, "why": "no --quick mode: results kept from its last full run"}
            print(f"== {name}: skipped in --quick (no --quick mode)", flush=True)
            continue
        cmd = [sys.executable, str(script)]
        if quick:
            if '"--out"' not in script.read_text():
                log[name] = {"ran": False, "why": "has --quick but no --out: would overwrite its full results"}
                continue
            cmd += ["--quick", "--out", str(QUICK_DIR / f"{name}.json")]
        print(f"== {name}: {' '.join(cmd[1:])}  (load {load_avg()})", flush=True)
        t0 = time.perf_counter()
        try:
            p = subprocess.run(
                cmd, cwd=ROOT, env=bench_env(), timeout=timeout, text=True, stdout=sys.stdout, stderr=subprocess.PIPE
            )
            rc, err = p.returncode, p.stderr
        except subprocess.TimeoutExpired:
            rc, err = 124, f"timed out after {timeout}s"
        wall = time.perf_counter() - t0
        log[name] = {
            "ran": True,
            "quick": quick,
            "rc": rc,
            "wall_s": round(wall, 1),
            "error_tail": err[-2000:] if rc else "",
        }
        print(f"== {name}: exit {rc} in {wall:.0f}s", flush=True)
        if rc:
            print(err[-2000:], file=sys.stderr)
    return log


# --------------------------------------------------------------------------- rendering helpers


def fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 100:
            return f"{v:.1f}"
        return f"{v:.{digits}g}" if abs(v) < 1 else f"{v:.{digits}f}".rstrip("0").rstrip(".")
    if isinstance(v, list):
        return ", ".join(fmt(x) for x in v)
    if isinstance(v, dict):
        return "; ".join(f"{k}={fmt(x)}" for k, x in v.items())
    return str(v).replace("|", "\\|")


def table(headers: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(c.replace("|", "\\|") if isinstance(c, str) else fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def human_bytes(n: int) -> str:
    for unit, k in (("MB", 1024**2), ("KB", 1024)):
        if n >= k:
            return f"{n / k:g} {unit}"
    return f"{n} B"


def machine_line(m: dict | None) -> str:
    if not m:
        return ""
    return (
        f"_Measured {m.get('date', '?')} on {m.get('cpu_model', '?')}, {m.get('cores', '?')} cores, "
        f"{m.get('ram_gib', '?')} GiB RAM, torch {m.get('torch', '?')}, horovod {m.get('horovod', '?')}, "
        f"Python {m.get('python', '?')}; load average at start {fmt(m.get('load_avg_1_5_15'))}._"
    )


# --------------------------------------------------------------------------- per-benchmark sections


def render_allreduce(d: dict) -> str:
    out = [
        "## Allreduce (np=2, Gloo, one host)",
        "",
        "**What.** `hvd.allreduce` (out of place) and `hvd.allreduce_` (in place) next to "
        "`torch.distributed` Gloo `all_reduce`, on the same tensors, and a one-thread memory copy of "
        "the same bytes by one process as the physical reference.",
        "",
        "**How.** One `horovodrun -np 2 --gloo` job per Horovod setting; inside it both ranks also "
        "join a torch Gloo group, and each size is measured interleaved (order rotated per repeat), "
        f"{d['repeats']} repeats, median; bus bandwidth = 2(n-1)/n x bytes / time (= bytes/time at n=2); "
        "latency = time per operation (blocks of up to 300 ops for small sizes).",
        "",
        machine_line(d.get("machine")),
        "",
    ]
    default = next((v for v in d["variants"] if v["variant"] == "default"), d["variants"][0])
    by = {(r["case"], r["bytes"], r["method"]): r for r in default["rows"]}
    sizes = sorted({b for (c, b, _) in by if c == "single"})
    rows = []
    for s in sizes:
        g = lambda m, s=s: by.get(("single", s, m), {})  # noqa: E731
        t = g("torch").get("time_us")
        rows.append(
            [
                human_bytes(s),
                g("hvd").get("time_us"),
                g("hvd").get("busbw_gbs"),
                g("hvd_inplace").get("time_us"),
                g("hvd_inplace").get("busbw_gbs"),
                t,
                g("torch").get("busbw_gbs"),
                g("memcpy").get("busbw_gbs"),
                (t / g("hvd").get("time_us")) if t and g("hvd") else None,
                (t / g("hvd_inplace").get("time_us")) if t and g("hvd_inplace") else None,
            ]
        )
    out += [
        f"### Default Horovod settings (load before/after: {fmt(default['load_before'])} / {fmt(default['load_after'])})",
        "",
        table(
            [
                "size",
                "hvd us",
                "hvd GB/s",
                "hvd_ in-place us",
                "hvd_ GB/s",
                "torch us",
                "torch GB/s",
                "memcpy GB/s",
                "hvd/torch bw",
                "hvd_/torch bw",
            ],
            rows,
        ),
        "",
    ]
    grad = [r for r in default["rows"] if r["case"] == "grad_like"]
    if grad:
        out += [
            "### Gradient-sized traffic (the default TabularNet's 9 parameter tensors, one step)",
            "",
            table(
                ["method", "bytes", "time per step-reduce us"], [[r["method"], r["bytes"], r["time_us"]] for r in grad]
            ),
            "",
            "`hvd_fused`: `allreduce_async_` per tensor + `synchronize` (what `hvd.DistributedOptimizer` "
            "does, Tensor Fusion packs them); `torch_bucket`: flatten + one `all_reduce` (what a DDP "
            "bucket does); `torch_per_tensor`: one `all_reduce` per tensor.",
            "",
        ]
    others = [v for v in d["variants"] if v is not default]
    if others:
        # lever table: hvd_ (in-place) / torch bandwidth ratio and hvd latency per size, per variant
        vs = [default] + others
        common = sorted(set.intersection(*[{r["bytes"] for r in v["rows"] if r["case"] == "single"} for v in vs]))
        rows = []
        for v in vs:
            b = {(r["case"], r["bytes"], r["method"]): r for r in v["rows"]}
            cells = [v["variant"], fmt(v["env"]) or "(none)"]
            for s in common:
                h, t = b.get(("single", s, "hvd_inplace")), b.get(("single", s, "torch"))
                cells.append(f"{h['time_us']:.0f} us / {t['time_us'] / h['time_us']:.2f}x" if h and t else "-")
            gl = b.get(("grad_like", next((r["bytes"] for r in v["rows"] if r["case"] == "grad_like"), 0), "hvd_fused"))
            gt = b.get(("grad_like", gl["bytes"], "torch_bucket")) if gl else None
            cells.append(f"{gl['time_us']:.0f} us / {gt['time_us'] / gl['time_us']:.2f}x" if gl and gt else "-")
            idle = next((r["cpu_share"] for r in v["rows"] if r["case"] == "idle"), None)
            cells.append(fmt([round(x, 3) for x in idle]) if idle else "-")
            rows.append(cells)
        out += [
            "### Horovod levers (each a separate job; cell = `hvd.allreduce_` time / its speed vs torch "
            "Gloo in the same job, >1x = Horovod faster)",
            "",
            table(
                ["variant", "env"]
                + [human_bytes(s) for s in common]
                + ["grad-like (fused vs bucket)", "idle CPU/rank"],
                rows,
            ),
            "",
            "`idle CPU/rank`: CPU seconds per second that each Horovod rank burns while the program "
            "sleeps for 2 s (the background thread's coordination cycle).",
            "",
        ]
    return "\n".join(out)


def render_training(d: dict) -> str:
    cfg = str(d.get("config") or "")
    workload = "flights default workload" if cfg.endswith("flights.yaml") else f"`{cfg}`"
    out = [
        f"## Training throughput and scaling ({workload})",
        "",
        "**What.** The project's own trainer (`training/train.py` under `horovodrun`, command from "
        "`training.launch.horovodrun_command`) at np=1 and np=2 and with each lever, next to "
        "`benchmarks/_ddp_reference.py` (same TabularNet, shards, batch, AdamW, LR schedule and thread "
        "rule under torch DDP/Gloo).",
        "",
        f"**How.** {d.get('train_rows', '?')} training rows, `{d.get('config')}`"
        + (f" with {', '.join(f'`{o}`' for o in d['overrides'])}" if d.get("overrides") else "")
        + "; each case is a fresh "
        f"launch with {d['epochs_per_throughput_run']} epochs (early stopping off); samples/s = all ranks' "
        "samples / epoch wall time (validation excluded), median of epochs 2..E, then median over "
        f"{d['rounds']} interleaved rounds (case order rotated per round). `vs np2` = throughput / "
        "`hvd_np2` (the trainer's defaults at np=2).",
        "",
        machine_line(d.get("machine")) + f" Load after: {fmt(d.get('load_after'))}.",
        "",
    ]
    rows = [
        [
            name,
            c["what"],
            c["samples_per_s"],
            c.get("vs_hvd_np2"),
            fmt(c["samples_per_s_each_round"]),
            c.get("step_wall_ms"),
            c.get("fwd_bwd_ms"),
            c["launch_wall_s"],
            c.get("val_auc"),
        ]
        for name, c in d["cases"].items()
    ]
    out += [
        table(
            [
                "case",
                "what",
                "samples/s (median)",
                "vs np2",
                "per round",
                "step wall ms",
                "fwd+bwd ms/rank",
                "launch wall s",
                "val AUC (last epoch)",
            ],
            rows,
        ),
        "",
        "`step wall ms`: epoch wall / steps (everything a step costs); `fwd+bwd ms/rank`: the trainer's own "
        "per-rank compute timer (forward + backward only). The difference is data indexing, the "
        "optimizer and, at np=2, the time in and waiting for collectives.",
        "",
    ]
    timelines = {name: c["timeline_ms_per_step"] for name, c in d["cases"].items() if "timeline_ms_per_step" in c}
    for name, t in timelines.items():
        keys = [k for k in t if k != "steps"]
        out += [
            f"Horovod timeline of `{name}` (`benchmarks/_timeline.py`), ms per step over {fmt(t['steps'])} "
            "steps: `negotiate` runs from a gradient being ready on this rank until it is ready on every "
            "rank (the rest of the backward pass and any wait for the slower rank); `allreduce` is the "
            "collective itself.",
            "",
            table(["activity", "ms/step"], [[k.removesuffix("_ms"), t[k]] for k in keys]),
            "",
        ]
    der = d.get("derived", {})
    if der:
        out += ["### Derived", "", table(["quantity", "value"], [[k, v] for k, v in der.items()]), ""]
    if d.get("quality"):
        out += [
            "### Model quality (full default runs: configured epochs and early stopping)",
            "",
            table(
                ["run", "np", "best val AUC", "epochs run", "status", "samples/s"],
                [
                    [q["case"], q["np"], q["val_auc"], q["epochs"], q.get("status"), q["samples_per_s"]]
                    for q in d["quality"]
                ],
            ),
            "",
        ]
    return "\n".join(out)


def render_pipeline(d: dict) -> str:
    out = [
        "## End-to-end pipeline (shard -> train -> evaluate -> register)",
        "",
        "**What.** `flows.training_pipeline.training_pipeline(config)` on the default config in a fresh "
        "process and a fresh `RINGFLOW_HOME` (ephemeral Prefect API, MLflow on SQLite), next to the same "
        "stages' work done bare (no Prefect, no MLflow): `shard_dataset`, `horovodrun ... training.train`, "
        "scoring the test window (and, in runs from `pipeline_latency` on, fitting the baseline as the flow does).",
        "",
        "**How.** " + d.get("how", ""),
        "",
        machine_line(d.get("machine")),
        "",
    ]
    if d.get("stages"):
        out += [
            table(
                ["stage", "Prefect task run s (median)", "bare work s (median)", "difference s"],
                [[s["stage"], s.get("task_s"), s.get("bare_s"), s.get("diff_s")] for s in d["stages"]],
            ),
            "",
        ]
    if d.get("stage_parts"):
        out += [
            "Where the flow's seconds go (its own stage timings, `tasks/timings.py`: the table `ringflow run` "
            "prints and the summary artifact shows), medians:",
            "",
            table(
                ["stage", "part", "kind", "s (median)"],
                [[r["stage"], r["part"], r["kind"], r["median_s"]] for r in d["stage_parts"]],
            ),
            "",
        ]
    if d.get("totals"):
        out += [table(["quantity", "value"], [[k, v] for k, v in d["totals"].items()]), ""]
    if d.get("late_api"):
        out += [
            "The same flow runs, interleaved, with the Prefect API started by the flow call (as before "
            "`flows/prefect_api.py`):",
            "",
            table(["quantity", "value"], [[k, v] for k, v in d["late_api"].items() if k != "how"]),
            "",
        ]
    if "under_load" in d:
        out += [
            f"Load average (1 min) at most {d.get('load_max')} during the runs: "
            + (
                f"**under load** (over {d.get('loaded_threshold', 1.5)}): not a target measurement."
                if d["under_load"]
                else "quiet."
            ),
            "",
        ]
    return "\n".join(out)


def _generic(obj: Any, depth: int = 0) -> list[str]:
    """Render another engineer's result JSON without knowing its shape: scalars as a key/value
    table, lists of records as one table, nested objects as sub-sections."""
    out: list[str] = []
    if isinstance(obj, dict):
        scalars = {
            k: v
            for k, v in obj.items()
            if not isinstance(v, (dict, list))
            or (isinstance(v, list) and all(not isinstance(x, (dict, list)) for x in v))
        }
        if scalars:
            out += [table(["key", "value"], [[k, v] for k, v in scalars.items()]), ""]
        for k, v in obj.items():
            if k in scalars or k == "runs":  # raw repeats stay in the JSON
                continue
            out += [f"{'#' * min(6, 4 + depth)} {k}", ""] + _generic(v, depth + 1)
    elif isinstance(obj, list) and obj and all(isinstance(x, dict) for x in obj):
        cols: list[str] = []
        for x in obj:
            cols += [k for k in x if k not in cols]
        out += [table(cols, [[x.get(c) for c in cols] for x in obj]), ""]
    else:
        out += [fmt(obj), ""]
    return out


def render_generic(name: str, d: dict) -> str:
    # a follow-up run (scale_followup.json) comes from its base benchmark's script; a round's A/B
    # rows (rank_server_stop35.json) from the round that benchmarks/README.md describes
    here = Path(__file__).parent
    parts = name.split("_")
    prefixes = ("_".join(parts[:i]) for i in range(len(parts), 0, -1))  # model_quality_old_network
    script = next((s for s in prefixes if (here / f"bench_{s}.py").exists()), None)
    if script:
        source = f"(from `benchmarks/bench_{script}.py`)"
        how = "Collected as written by its benchmark; see that script's docstring for what and how."
    else:
        source = "(a round's measurement)"
        how = "Measured as the round of `benchmarks/README.md` that cites this file describes (its `how`, if any, is below)."
    head = [
        f"## {name.capitalize()} {source}",
        "",
        f"{how} Raw per-repeat data: `benchmarks/results/{name}.json`.",
        "",
    ]
    if isinstance(d.get("table_markdown"), str):
        # the benchmark rendered its own table: use it as is, plus its scalar facts
        facts = {k: v for k, v in d.items() if k != "table_markdown" and not isinstance(v, (dict, list))}
        machine = d.get("machine") if isinstance(d.get("machine"), dict) else {}
        return "\n".join(
            head
            + [
                d["table_markdown"].strip(),
                "",
                table(["key", "value"], [[k, v] for k, v in {**facts, **machine}.items()]),
                "",
            ]
        )
    return "\n".join(head + _generic({k: v for k, v in d.items() if k != "runs"}))


RENDERERS = {"allreduce": render_allreduce, "training": render_training, "pipeline": render_pipeline}


def targets(results: dict[str, dict]) -> str:
    """One row per target and result file (a follow-up run gets its own row, labelled)."""
    rows = []
    for name, ar in results.items():
        if name.split("_")[0] != "allreduce" or "variants" not in ar:
            continue
        default = next((v for v in ar["variants"] if v["variant"] == "default"), None)
        if default:
            by = {(r["bytes"], r["method"]): r for r in default["rows"] if r["case"] == "single"}
            big = sorted(b for (b, m) in by if b >= 1024**2 and m == "torch")
            ratio = lambda b, m, by=by: by[(b, "torch")]["time_us"] / by[(b, m)]["time_us"]  # noqa: E731
            worst = min((ratio(b, "hvd") for b in big), default=None)
            worst_ip = min((ratio(b, "hvd_inplace") for b in big), default=None)
            per = ", ".join(f"{human_bytes(b)} {ratio(b, 'hvd_inplace'):.2f}x" for b in big)
            rows.append(
                [
                    f"Horovod allreduce bus bandwidth >= torch Gloo for >= 1 MB (`{name}`, load "
                    f"{fmt(default['load_before'])})",
                    f"worst hvd/torch {fmt(worst)}x; in place `allreduce_`: worst {fmt(worst_ip)}x ({per})",
                    "met"
                    if worst is not None and worst >= 1
                    else ("met in place only" if worst_ip is not None and worst_ip >= 1 else "not met"),
                ]
            )
    for name, tr in results.items():
        if name.split("_")[0] != "training" or "derived" not in tr:
            continue
        der = tr["derived"]
        e = der.get("efficiency_vs_best_np1")
        dauc = der.get("auc_np2_minus_np1")
        extra = "; ".join(
            f"{k} {fmt(der[k])}"
            for k in (
                "efficiency_vs_one_thread_np1",
                "val_auc_spread",
                "efficiency_fast_step_vs_best_np1",
                "efficiency_fast_pinned_vs_best_np1",
                "efficiency_best_levers_vs_np1_batch2048",
                "efficiency_batch2048_vs_np1_batch2048",
                "pinned_vs_unpinned",
                "ddp_efficiency_vs_best_np1",
                "auc_np2_minus_np1_batch2048",
            )
            if k in der
        )
        if e is not None:  # a run without np=1 cases (e.g. a levers follow-up) has no efficiency
            rows.append(
                [
                    f"scaling efficiency >= 0.85 at equal quality, |dAUC| <= 0.005 (`{name}`)",
                    f"trainer defaults {fmt(e)} (vs the faster np=1 setting)"
                    + (f", dAUC {fmt(dauc)}" if dauc is not None else "")
                    + (f"; {extra}" if extra else ""),
                    "met" if e >= 0.85 and (dauc is None or abs(dauc) <= 0.005) else "not met",
                ]
            )
        if (e1 := der.get("efficiency_vs_one_thread_np1")) is not None:
            spread = der.get("val_auc_spread")
            rows.append(
                [
                    f"per-worker efficiency >= 0.85 (np=2 / twice one-thread np=1), val AUC within 0.005 (`{name}`)",
                    f"{fmt(e1)}; val AUC spread {fmt(spread)}",
                    "met" if e1 >= 0.85 and (spread is None or spread <= 0.005) else "not met",
                ]
            )
        r = der.get("hvd_vs_ddp_np2")
        if r is None:  # a run without the DDP reference (a levers follow-up) has no ratio to show
            continue
        extra = "; ".join(f"{k} {fmt(der[k])}x" for k in ("fast_step_vs_ddp_np2", "fast_pinned_vs_ddp_np2") if k in der)
        rows.append(
            [
                f"Horovod trainer >= 1.0x DDP throughput at np=2 (`{name}`)",
                f"defaults {fmt(r)}x" + (f"; {extra}" if extra else ""),
                "met" if r and r >= 1 else "not met",
            ]
        )
    for name, pl in results.items():
        if name.split("_")[0] != "pipeline" or not pl.get("totals"):
            continue
        t = pl["totals"]
        share = t.get("orchestration_overhead_share")
        if pl.get("under_load"):
            verdict = "under load"
        else:
            verdict = "met" if share is not None and share <= 0.15 else "not met"
        rows.append(
            [
                f"orchestration overhead <= 0.15 of the flow call (`{name}`)",
                f"{fmt(share)} of the flow call; {fmt(t.get('orchestration_overhead_share_of_flow_run (persistent Prefect server case)'))} "
                "of the flow run alone (API already up)",
                verdict,
            ]
        )
    for name, mr in results.items():
        if not name.startswith("make_run") or not mr.get("targets_apply"):
            continue
        m = mr["medians"]["checkout"]
        quiet = m["quiet_runs"] == m["runs"]
        rows.append(
            [
                f"`make run` at most 20 s wall on a quiet 2-core machine (`{name}`)",
                f"median {fmt(m['wall_s'])} s of {m['runs']} runs, {m['quiet_runs']} quiet",
                ("met" if mr["target_wall_met"] else "not met") if quiet else "under load",
            ]
        )
        rows.append(
            [
                f"`ringflow run` at most 4x its epoch seconds (`{name}`)",
                f"{fmt(m['wall_over_epochs'])}x (epochs {fmt(m['epochs_s'])} s)",
                ("met" if mr["target_epoch_ratio_met"] else "not met") if quiet else "under load",
            ]
        )
    if not rows:
        return ""
    return "\n".join(["## Targets", "", table(["target", "measured", "verdict"], rows), ""])


def render(results: dict[str, dict], runlog: dict[str, Any]) -> str:
    facts = machine_facts()
    parts = [
        "# Benchmark results",
        "",
        "Generated by `benchmarks/run_all.py` (`make bench`) from `benchmarks/results/*.json`; do not "
        "edit by hand. How to read them and what the levers do: `benchmarks/README.md`.",
        "",
        f"Rendered {facts['date']} on {facts['cpu_model']}, {facts['cores']} cores, {facts['ram_gib']} GiB "
        f"RAM, torch {facts.get('torch')}, horovod {facts.get('horovod')}. Every section names the "
        "machine, date and load of its own run: the machine is shared, so compare numbers only "
        "within one table (they were measured side by side), never across tables or dates.",
        "",
    ]
    if quick := [f"`{n}`" for n, r in results.items() if r.get("quick")]:
        parts += [f"**From a `--quick` run (fewer sizes, repeats or cases): {', '.join(quick)}.**", ""]
    if runlog:
        parts += [
            "### Last run",
            "",
            table(
                ["benchmark", "ran", "exit", "wall s", "note"],
                [
                    [n, r.get("ran"), r.get("rc"), r.get("wall_s"), r.get("why") or (r.get("error_tail") or "")[-200:]]
                    for n, r in runlog.items()
                ],
            ),
            "",
        ]
    parts.append(targets(results))
    for name, d in results.items():
        try:
            base = name.split("_")[0]
            if name not in RENDERERS and base in RENDERERS:
                # a follow-up run of one of ours (e.g. training_followup.json): same layout, own title
                body = RENDERERS[base](d).split("\n", 1)
                parts.append(f"{body[0]}: follow-up run `results/{name}.json`\n{body[1]}")
                continue
            parts.append(RENDERERS.get(name, lambda dd, name=name: render_generic(name, dd))(d))
        except (KeyError, TypeError, ValueError) as e:  # a changed JSON shape must not lose the rest
            parts.append(
                f"## {name}\n\n(could not render: {type(e).__name__}: {e}; raw data in "
                f"`benchmarks/results/{name}.json`)\n"
            )
    return "\n".join(parts).rstrip() + "\n"


def collect(directory: Path = RESULTS_DIR) -> dict[str, dict]:
    results = {}
    order = discover()
    files = {p.stem: p for p in sorted(directory.glob("*.json")) if not p.stem.startswith("_")}
    for name in order + [n for n in files if n not in order]:
        if name in files:
            try:
                results[name] = json.loads(files[name].read_text())
            except json.JSONDecodeError as e:
                results[name] = {"error": f"unreadable JSON: {e}"}
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: each benchmark's --quick mode")
    p.add_argument("--render", action="store_true", help="only regenerate RESULTS.md from results/*.json")
    p.add_argument("--only", default=None, help="comma list of benchmark names (allreduce,training,...)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per benchmark")
    p.add_argument("--results-md", default=None, help=f"default {RESULTS_MD} (--quick: {QUICK_DIR}/RESULTS.md)")
    args = p.parse_args(argv)
    results_dir = QUICK_DIR if args.quick else RESULTS_DIR
    results_dir.mkdir(parents=True, exist_ok=True)
    runlog_path = results_dir / RUNLOG.name
    results_md = Path(args.results_md) if args.results_md else (QUICK_DIR / "RESULTS.md" if args.quick else RESULTS_MD)
    runlog: dict[str, Any] = {}
    if runlog_path.exists():
        runlog = json.loads(runlog_path.read_text())
    rc = 0
    if not args.render:
        names = discover()
        if args.only:
            want = args.only.split(",")
            names = [n for n in names if n in want]
        fresh = run_benchmarks(names, args.quick, args.timeout)
        runlog.update(fresh)
        runlog_path.write_text(json.dumps(runlog, indent=1))
        rc = 1 if any(r.get("rc") for r in fresh.values()) else 0
    results_md.write_text(render(collect(results_dir), runlog))
    print(f"wrote {results_md}")
    return rc


if __name__ == "__main__":
    sys.exit(main())

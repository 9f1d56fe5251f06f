"""Training throughput of the project's Horovod trainer, its scaling, its levers, and a DDP reference.

    .venv/bin/python benchmarks/bench_training.py [--quick] [--config configs/flights.yaml]

Workload: the default flights config (105k training rows, TabularNet ~14k parameters), sharded
once with the project's own ``training.sharding.shard_dataset`` into a scratch directory.

Throughput runs: every case is one real ``horovodrun`` of ``training/train.py`` (the command comes
from ``training.launch.horovodrun_command``, so fusion/cycle/autotune flags are exactly the
pipeline's), ``epochs`` short and early stopping off; samples/s = all ranks' samples / epoch
wall time (the trainer's own ``samples_per_s``, validation excluded), median over epochs 2..E
(epoch 1 warms up), then median over rounds. Cases run interleaved: each round runs every case
once, in a rotated order, so load from other users of the machine hits all of them alike. A
lever the config already holds (``num_groups: 1`` on flights.yaml, Horovod's defaults on
flights-x10.yaml) is skipped unless ``--cases`` names it: it would be ``hvd_np2`` again.

Reference: ``benchmarks/_ddp_reference.py``, the same model, data, batch, optimizer and thread
rule under torch DistributedDataParallel (Gloo), launched with torchrun. A reference run whose rank
dies by a signal (a Gloo abort, seen once under heavy load) runs once more; the crash stays in
the case's result as ``reference_crashes``.

Quality: full default runs (epochs and early stopping as configured) at np=1 and np=2: best
validation AUC.

Writes ``benchmarks/results/training.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import signal
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import ROOT, bench_env, load_avg, machine_facts, median, timed_run, write_result  # noqa: E402
from benchmarks._timeline import step_breakdown  # noqa: E402

HERE = Path(__file__).resolve().parent
SCRATCH = Path(tempfile.gettempdir()) / "ringflow-bench"


@dataclass
class Case:
    name: str
    np: int
    overrides: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    kind: str = "horovod"  # horovod | ddp
    what: str = ""


def _mpi_built() -> bool:
    try:
        import horovod.torch as hvd

        return bool(hvd.mpi_built())
    except Exception:  # noqa: BLE001  (no horovod, or one without the torch extension)
        return False


def cases(quick: bool) -> list[Case]:
    core = [
        Case("hvd_np1", 1, what="trainer np=1, default threads (2 = all cores)"),
        Case("hvd_np1_t1", 1, {"training.threads_per_rank": 1}, what="trainer np=1, 1 thread"),
        Case("hvd_np2", 2, what="trainer np=2, defaults (1 thread/rank, pinned)"),
        Case("ddp_np1_t1", 1, {"training.threads_per_rank": 1}, kind="ddp", what="DDP reference np=1, 1 thread"),
        Case("ddp_np2", 2, kind="ddp", what="DDP reference np=2, 1 thread/rank"),
    ]
    levers = [
        Case("np2_unpinned", 2, {"training.pin_ranks": False}, what="np=2, ranks not pinned to cores"),
        Case(
            "np2_batch2048_lr2x",
            2,
            {"training.batch_size": 2048, "training.learning_rate": 0.004},
            what="np=2, batch 2048/rank, LR x2 (linear scaling)",
        ),
        Case("np2_bpps2", 2, {"training.horovod.backward_passes_per_step": 2}, what="np=2, backward_passes_per_step=2"),
        Case("np2_cycle_0.1ms", 2, {"training.horovod.cycle_time_ms": 0.1}, what="np=2, cycle time 0.1 ms"),
        Case("np2_cycle_5ms", 2, {"training.horovod.cycle_time_ms": 5}, what="np=2, cycle time 5 ms"),
        Case("np2_fusion_off", 2, {"training.horovod.fusion_threshold_mb": 0}, what="np=2, tensor fusion off"),
        Case("np2_cache_off", 2, {"training.horovod.cache_capacity": 0}, what="np=2, response cache off"),
        Case("np2_groups1", 2, {"training.horovod.num_groups": 1}, what="np=2, all gradients in one grouped allreduce"),
        Case(
            "np2_horovod_defaults",
            2,
            {"training.horovod.num_groups": 0, "training.horovod.cycle_time_ms": None},
            what="np=2, Horovod's own defaults (tensor fusion per tensor, cycle 1 ms): ringflow's before 2026-12-07",
        ),
        Case(
            "np2_groups1_cycle_0.1ms",
            2,
            {"training.horovod.num_groups": 1, "training.horovod.cycle_time_ms": 0.1},
            what="np=2, one grouped allreduce and cycle time 0.1 ms",
        ),
        Case(
            "np2_groups1_cycle_0.5ms",
            2,
            {"training.horovod.num_groups": 1, "training.horovod.cycle_time_ms": 0.5},
            what="np=2, one grouped allreduce and cycle time 0.5 ms",
        ),
        Case("np2_autotune", 2, {"training.horovod.autotune": True}, what="np=2, Horovod autotune"),
        Case("np2_threads2", 2, {"training.threads_per_rank": 2}, what="np=2, 2 threads/rank (oversubscribed)"),
        Case("np2_fp16", 2, {"training.horovod.compression": "fp16"}, what="np=2, fp16 gradient compression"),
        Case(
            "hvd_np1_t1_batch2048_lr2x",
            1,
            {"training.threads_per_rank": 1, "training.batch_size": 2048, "training.learning_rate": 0.004},
            what="trainer np=1, 1 thread, batch 2048, LR x2 (the np=1 side of the batch lever)",
        ),
        Case(
            "hvd_np2_timeline",
            2,
            env={"RFBENCH_TIMELINE": "1"},
            what="np=2 with the Horovod timeline on: where the step time goes",
        ),
        Case(
            "ddp_np2_dataloader",
            2,
            kind="ddp",
            env={"RFBENCH_LOADER": "dataloader"},
            what="DDP np=2 fed by a DataLoader instead of in-memory indexing",
        ),
    ]
    if _mpi_built():
        # the MPI controller (shared memory within a host) needs a Horovod built with MPI
        # (HOROVOD_WITH_MPI=1 and Open MPI); the project's install builds Gloo only
        levers.append(
            Case(
                "np2_mpi",
                2,
                env={"RFBENCH_CONTROLLER": "mpi"},
                what="np=2, MPI controller and CPU ops (Horovod built with MPI)",
            )
        )
    if quick:
        return [c for c in core if c.name in ("hvd_np1_t1", "hvd_np2", "ddp_np2")]
    return core + levers


QUALITY_CASES = [
    Case("quality_np1", 1, {"training.threads_per_rank": 1}),
    Case("quality_np2", 2),
    Case(
        "quality_np1_batch2048_lr2x",
        1,
        {"training.threads_per_rank": 1, "training.batch_size": 2048, "training.learning_rate": 0.004},
    ),
    Case("quality_np2_batch2048_lr2x", 2, {"training.batch_size": 2048, "training.learning_rate": 0.004}),
]


def ensure_manifest(cfg) -> Path:
    from ringflow.training.sharding import shard_dataset

    m = shard_dataset(cfg, SCRATCH / "data", key=None, progress=lambda s: None)
    return Path(m.path)


def _cfg_for(base, case: Case, epochs: int, throughput: bool):
    from ringflow.training.config import with_overrides

    ov = dict(case.overrides)
    ov["training.world_size"] = case.np
    if throughput:
        ov["training.epochs"] = epochs
        ov["training.early_stopping_patience"] = 1000
    return with_overrides(base, ov)


def changes_nothing(base, case: Case) -> bool:
    """A Horovod lever whose overrides the config already holds (``num_groups: 1`` on
    flights.yaml, whose default it is): its run would only measure ``hvd_np2`` again."""
    default = Case("hvd_np2", 2)
    return (
        case.kind == default.kind
        and case.np == default.np
        and case.env == default.env
        and _cfg_for(base, case, 1, True) == _cfg_for(base, default, 1, True)
    )


def run_case(base, case: Case, manifest: Path, epochs: int, throughput: bool = True, timeout: int = 900) -> dict:
    from ringflow.training.launch import horovodrun_command

    cfg = _cfg_for(base, case, epochs, throughput)
    out = Path(tempfile.mkdtemp(prefix=f"{case.name}-", dir=SCRATCH))
    env = bench_env(**case.env)
    env.pop("MLFLOW_RUN_ID", None)  # the trainer logs nowhere: we measure training, not MLflow
    timeline = out / "horovod-timeline.json"
    if case.env.get("RFBENCH_TIMELINE"):
        env["HOROVOD_TIMELINE"] = str(timeline)
    if case.kind == "horovod":
        cmd = horovodrun_command(cfg, manifest, out, python=sys.executable)
        if case.env.get("RFBENCH_CONTROLLER") == "mpi":
            cmd[cmd.index("--gloo")] = "--mpi"
            env.update(HOROVOD_CPU_OPERATIONS="MPI", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(case.np),
            str(HERE / "_ddp_reference.py"),
            "--manifest",
            str(manifest),
            "--config-json",
            cfg.model_dump_json(),
            "--out",
            str(out / "ddp.json"),
            "--loader",
            case.env.get("RFBENCH_LOADER", "memory"),
        ]
    load0 = load_avg()
    p, wall = timed_run(cmd, env=env, timeout=timeout, cwd=ROOT)
    reference_crashes = []
    if case.kind == "ddp" and p.returncode != 0 and (crash_signal := _rank_signal(p.stderr)):
        # The reference is torch's, not ours: a rank of it aborted once in about a hundred runs
        # under heavy load (SIGABRT, "terminate called without an active exception"). Run it
        # once more and keep the crash in the result, rather than lose the round.
        reference_crashes.append({"signal": crash_signal, "stderr_tail": p.stderr[-2000:]})
        print(f"  {case.name}: a rank died by signal {crash_signal}; running the reference once more", flush=True)
        p, wall = timed_run(cmd, env=env, timeout=timeout, cwd=ROOT)
    if p.returncode != 0:
        raise RuntimeError(f"case {case.name} failed (exit {p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}")
    if case.kind == "horovod":
        from ringflow.training.summary import TrainingSummary

        summary = TrainingSummary.load(out)
        hist = [h.model_dump() for h in summary.history]  # plain records, as the DDP reference's
        # the last epoch's, like the DDP reference's (throughput runs keep every epoch)
        auc = summary.history[-1].val_roc_auc if summary.history else summary.best_val_roc_auc
        extra = {
            "status": summary.status,
            "best_epoch": summary.best_epoch,
            "step_time_ms_per_rank": [r.step_time_ms for r in summary.per_rank],
            "train_wall_s": summary.wall_time_s,
        }
    else:
        s = json.loads((out / "ddp.json").read_text())
        hist = s["history"]
        auc = s["val_roc_auc_last"]
        extra = {"threads": s["threads"]}
    if timeline.is_file():
        extra["timeline_ms_per_step"] = step_breakdown(timeline)
    thr = [h["samples_per_s"] for h in hist]
    steady = thr[1:] if len(thr) > 1 else thr
    # per-step wall time (all of a step: data, forward, backward, allreduce waits, optimizer)
    bs = cfg.training.batch_size
    step_ms = [
        h["epoch_time_s"] * 1000 / max(1, round(h["samples_per_s"] * h["epoch_time_s"] / (case.np * bs))) for h in hist
    ]
    extra["step_wall_ms"] = median(step_ms[1:] if len(step_ms) > 1 else step_ms)
    return {
        "case": case.name,
        "np": case.np,
        "samples_per_s": median(steady),
        "per_epoch_samples_per_s": thr,
        "epochs": len(hist),
        "val_auc": auc,
        "launch_wall_s": round(wall, 2),
        "load_before": load0,
        **extra,
        **({"reference_crashes": reference_crashes} if reference_crashes else {}),
    }


def _rank_signal(torchrun_stderr: str) -> int | None:
    """The signal that killed the first failed rank, from torchrun's failure report
    ("exitcode  : -6 (pid: ...)"); None when every rank that failed exited by itself."""
    codes = (int(m.group(1)) for m in re.finditer(r"exitcode\s*:\s*(-?\d+)", torchrun_stderr))
    return next((-code for code in codes if code < 0 and code != -signal.SIGTERM), None)


def summarize(runs: list[dict], all_cases: list[Case]) -> dict:
    by: dict[str, list[dict]] = {}
    for r in runs:
        by.setdefault(r["case"], []).append(r)
    table = {}
    for c in all_cases:
        rs = by.get(c.name, [])
        if not rs:
            continue
        table[c.name] = {
            "what": c.what,
            "np": c.np,
            "kind": c.kind,
            "rounds": len(rs),
            "samples_per_s": median([r["samples_per_s"] for r in rs]),
            "samples_per_s_each_round": [round(r["samples_per_s"]) for r in rs],
            "launch_wall_s": median([r["launch_wall_s"] for r in rs]),
            "step_wall_ms": median([r["step_wall_ms"] for r in rs]),
            "val_auc": median([r["val_auc"] for r in rs if r.get("val_auc") is not None] or [math.nan]),
        }
        fwd_bwd = [x for r in rs for x in r.get("step_time_ms_per_rank", [])]
        if fwd_bwd:
            table[c.name]["fwd_bwd_ms"] = median(fwd_bwd)
        if timelines := [r["timeline_ms_per_step"] for r in rs if "timeline_ms_per_step" in r]:
            table[c.name]["timeline_ms_per_step"] = {k: median([t[k] for t in timelines]) for k in timelines[0]}
    base = table.get("hvd_np2", {}).get("samples_per_s")
    for row in table.values():
        if base and row["np"] == 2:
            row["vs_hvd_np2"] = row["samples_per_s"] / base
    derived: dict[str, Any] = {}

    def thr(n):
        return table.get(n, {}).get("samples_per_s")

    np1_best = max([x for x in (thr("hvd_np1"), thr("hvd_np1_t1")) if x] or [0]) or None
    if thr("hvd_np2") and np1_best:
        derived["efficiency_vs_best_np1"] = thr("hvd_np2") / (2 * np1_best)
    if thr("hvd_np2") and thr("hvd_np1"):
        derived["efficiency_vs_default_np1"] = thr("hvd_np2") / (2 * thr("hvd_np1"))
    if thr("np2_batch2048_lr2x") and thr("hvd_np1_t1_batch2048_lr2x"):
        derived["efficiency_batch2048_vs_np1_batch2048"] = thr("np2_batch2048_lr2x") / (
            2 * thr("hvd_np1_t1_batch2048_lr2x")
        )
    if thr("hvd_np2") and thr("np2_unpinned"):
        derived["pinned_vs_unpinned"] = thr("hvd_np2") / thr("np2_unpinned")
    ddp1 = thr("ddp_np1_t1")
    if thr("ddp_np2") and ddp1:
        derived["ddp_efficiency_vs_best_np1"] = thr("ddp_np2") / (2 * ddp1)
    if thr("hvd_np2") and thr("ddp_np2"):
        derived["hvd_vs_ddp_np2"] = thr("hvd_np2") / thr("ddp_np2")
    if thr("hvd_np2") and thr("hvd_np1_t1"):
        derived["efficiency_vs_one_thread_np1"] = thr("hvd_np2") / (2 * thr("hvd_np1_t1"))
    aucs = [row["val_auc"] for row in table.values() if row["val_auc"] == row["val_auc"]]
    if len(aucs) > 1:
        derived["val_auc_spread"] = max(aucs) - min(aucs)
    return {"cases": table, "derived": derived}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="3 cases, 1 round, 2 epochs, no quality runs")
    p.add_argument("--config", default=str(ROOT / "configs" / "flights.yaml"))
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, e.g. data.source=/tmp/flights-x10 (repeatable)",
    )
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None, help="epochs per throughput run (default 3; quick 2)")
    p.add_argument("--cases", default=None, help="comma list of case names (default: all)")
    p.add_argument("--no-quality", action="store_true")
    p.add_argument("--quality", default=None, help="comma list of quality runs (default: all)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from ringflow.training.config import load_config

    SCRATCH.mkdir(parents=True, exist_ok=True)
    base = load_config(args.config, args.set)
    manifest = ensure_manifest(base)
    all_cases = cases(args.quick)
    if args.cases:
        want = args.cases.split(",")
        known = {c.name for c in cases(False)}
        if unknown := [n for n in want if n not in known]:
            p.error(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        all_cases = [c for c in cases(False) if c.name in want]
    elif same := [c.name for c in all_cases if c.name != "hvd_np2" and changes_nothing(base, c)]:
        print(f"skipped, the same as hvd_np2 on this config: {', '.join(same)}", flush=True)
        all_cases = [c for c in all_cases if c.name not in same]
    rounds = args.rounds or (1 if args.quick else 3)
    epochs = args.epochs or (2 if args.quick else 3)
    facts = machine_facts()
    runs = []
    for r in range(rounds):
        k = r % len(all_cases)
        for case in all_cases[k:] + all_cases[:k]:
            res = run_case(base, case, manifest, epochs)
            res["round"] = r
            runs.append(res)
            print(
                f"round {r} {case.name:22s} {res['samples_per_s']:>9.0f} samples/s  "
                f"(epochs {[round(x) for x in res['per_epoch_samples_per_s']]}, load {res['load_before']})",
                flush=True,
            )
    quality = []
    qcases = {c.name: c for c in QUALITY_CASES}
    qnames = args.quality.split(",") if args.quality else list(qcases)
    if not (args.quick or args.no_quality):
        # full default runs; np=1 with 1 thread (threads change speed, not the math)
        for case in (qcases[n] for n in qnames):
            res = run_case(base, case, manifest, epochs=base.training.epochs, throughput=False)
            quality.append(
                {
                    k: res[k]
                    for k in (
                        "case",
                        "np",
                        "val_auc",
                        "epochs",
                        "status",
                        "best_epoch",
                        "samples_per_s",
                        "launch_wall_s",
                    )
                }
            )
            print(f"quality {case.name}: best val AUC {res['val_auc']:.4f} after {res['epochs']} epochs", flush=True)
    summary = summarize(runs, all_cases)
    q = {x["case"]: x["val_auc"] for x in quality}
    if "quality_np1" in q and "quality_np2" in q:
        summary["derived"]["auc_np1"] = q["quality_np1"]
        summary["derived"]["auc_np2"] = q["quality_np2"]
        summary["derived"]["auc_np2_minus_np1"] = q["quality_np2"] - q["quality_np1"]
    if "quality_np1_batch2048_lr2x" in q and "quality_np2_batch2048_lr2x" in q:
        summary["derived"]["auc_np2_minus_np1_batch2048"] = (
            q["quality_np2_batch2048_lr2x"] - q["quality_np1_batch2048_lr2x"]
        )
    data = {
        "benchmark": "training",
        "quick": args.quick,
        "config": str(Path(args.config).relative_to(ROOT)) if Path(args.config).is_relative_to(ROOT) else args.config,
        "overrides": args.set,
        "epochs_per_throughput_run": epochs,
        "rounds": rounds,
        "machine": facts,
        "load_after": load_avg(),
        "train_rows": json.loads(Path(manifest).read_text())["windows"]["train"]["rows"],
        **summary,
        "quality": quality,
        "runs": runs,
    }
    path = write_result("training", data, args.out)
    print(f"wrote {path}")
    for name, row in summary["cases"].items():
        print(
            f"  {name:24s} {row['samples_per_s']:>9.0f} samples/s {row.get('vs_hvd_np2', float('nan')):6.2f}x  {row['what']}"
        )
    for k, v in summary["derived"].items():
        print(f"  {k}: {v:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

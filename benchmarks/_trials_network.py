"""Fast single-process trials of network variants (issue 27), not a benchmark of the pipeline.

    nice -n 10 .venv/bin/python benchmarks/_trials_network.py --variant default --seeds 0,1,2
    nice -n 10 .venv/bin/python benchmarks/_trials_network.py --variant x \\
        --set training.model.dropout=0.2 --set training.learning_rate=0.003 --seeds 0,1,2 --test

One process plays the ranks of a ``world_size``-rank run with the code the ranks run
(``training/``): the same preprocessing (``Preprocessor.for_data`` on the train window), network
(``TabularNet.for_preprocessor``), optimizer groups, learning-rate schedule (``learning_rate`` with
the configured world size), epoch orders, moving average of the weights (``training.ema_decay``:
``training.averaging``, validated and kept in place of the trained weights) and early stopping rule; one global batch of
``batch_size * world_size`` rows per step stands in for the ranks' averaged gradient. Train
January-April, validation May: the May ROC AUC of the best epoch is the only number a choice may
use. With ``--test`` the chosen variants are also scored on the three test windows, as trained
(the best epoch's weights) and after a final fit: the preprocessing and network fitted again on
January-May for the epoch count early stopping picked (the cosine schedule over that many
epochs), as ``training.final_fit`` will.

A variant is a set of overrides on ``configs/flights.yaml`` as it is when the trial runs: the
rows of ``network_trials.jsonl`` up to 2026-12-07 are relative to the default before issue 27's
change (hidden [128, 64], 8 epochs, the route cross only). ``--may-final-fit`` also checks the
final fit on May alone (squeezed, and as the pipeline's: ``may_auc_pipeline``; with the
preprocessing fitted again on the refit's rows: ``may_auc_pipeline_refit_pre``, and on the test
windows ``pipeline_refit_pre_final_fit_test``), ``--final-planned`` sizes the final fits by the planned epochs,
``--pipeline-timing`` times the real pipeline against old overrides, ``--step-timing`` times one
rank's training step against ``--set``'s overrides, ``--swa-from E`` validates
and keeps an equal average of the weights from epoch E on (SWA), ``--recency-half-life DAYS``
weights the train rows by their age, ``--summary`` prints the table.

Every result is appended as a JSON line to ``benchmarks/results/network_trials.jsonl`` (variant,
overrides, seed, May AUC per epoch, test scores, seconds per epoch, load average, date).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RESULTS_DIR, ROOT, load_avg  # noqa: E402
from ringflow.training.averaging import weight_average  # noqa: E402
from ringflow.training.config import PipelineConfig, load_config, with_overrides  # noqa: E402
from ringflow.training.data import in_window, load_labelled  # noqa: E402
from ringflow.training.metrics import roc_auc  # noqa: E402
from ringflow.training.model import TabularNet, predict_logits  # noqa: E402
from ringflow.training.preprocess import Preprocessor  # noqa: E402
from ringflow.training.train import epoch_order, epoch_seed, learning_rate  # noqa: E402

TRAIN = ("2013-01-01", "2013-05-01")
VALIDATION = ("2013-05-01", "2013-06-01")
FINAL = ("2013-01-01", "2013-06-01")
# The final fit checked on May alone: epochs chosen on April (train January-March), the refit on
# January-April scored on May. Never touches June or July.
MAY_CHECK_TRAIN, MAY_CHECK_VAL = ("2013-01-01", "2013-04-01"), ("2013-04-01", "2013-05-01")
TESTS = {
    "jun1-15": ("2013-06-01", "2013-06-16"),
    "jun16-jul1": ("2013-06-16", "2013-07-01"),
    "jul": ("2013-07-01", "2013-08-01"),
}
OUT = RESULTS_DIR / "network_trials.jsonl"

_DATA: pd.DataFrame | None = None
RECENCY_HALF_LIFE: float | None = None
"""``--recency-half-life DAYS`` (a trial of this harness only, no config field): every train row's
loss is weighted 0.5 ** (its age in days at the train window's end / DAYS), the weights scaled to
a mean of 1, so the months nearest the data to score count more (the flights drift month to
month)."""
SWA_FROM: int | None = None
"""``--swa-from E`` (a trial of this harness only, no config field): from epoch E (1-based) on, an
equal average of the weights after every step (torch's ``AveragedModel``, SWA) is validated and
kept in place of the trained weights."""


def frame(cfg: PipelineConfig, window: tuple[str, str]) -> pd.DataFrame:
    global _DATA
    if _DATA is None:
        _DATA, _ = load_labelled(cfg.data)
    return _DATA[in_window(_DATA, cfg.data, window[0], window[1])]


def tensors(pre: Preprocessor, df: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    x_num, x_cat = pre.transform(df)
    return torch.from_numpy(x_num), torch.from_numpy(x_cat), df["target"].to_numpy(dtype=np.float32)


def fit(
    cfg: PipelineConfig,
    train_window: tuple[str, str],
    val_window: tuple[str, str] | None,
    epochs: int,
    pre: Preprocessor | None = None,
    schedule_epochs: int | None = None,
) -> tuple[TabularNet, Preprocessor, list[float], int, float]:
    """Train as the ranks do. -> (best net, preprocessor, validation AUC per epoch, best epoch, s/epoch).

    ``pre``: a fitted preprocessor to use (else fitted on the train window); ``schedule_epochs``:
    the epochs the learning-rate schedule is planned over (else ``epochs``)."""
    tc = cfg.training
    size = tc.world_size
    train_df = frame(cfg, train_window)
    pre = pre or Preprocessor.for_data(train_df, cfg.data)
    x_num, x_cat, y_np = tensors(pre, train_df)
    y = torch.from_numpy(y_np)
    weights = None
    if RECENCY_HALF_LIFE is not None:
        stamps = pd.to_datetime(train_df[cfg.data.timestamp_column], utc=True)
        age_days = (pd.Timestamp(train_window[1], tz="UTC") - stamps).dt.total_seconds().to_numpy() / 86400
        w = 0.5 ** (age_days / RECENCY_HALF_LIFE)
        weights = torch.from_numpy((w / w.mean()).astype(np.float32))
    val = tensors(pre, frame(cfg, val_window)) if val_window else None
    torch.manual_seed(tc.seed)
    net = TabularNet.for_preprocessor(pre, tc.model)
    opt = torch.optim.AdamW(net.param_groups(tc.weight_decay, tc.model.level_weight_decay), lr=tc.learning_rate)
    average = weight_average(net, tc.ema_decay)  # as the ranks: updated after every step
    scored = average.net if average is not None else net  # validated, kept and returned
    swa = torch.optim.swa_utils.AveragedModel(net) if SWA_FROM is not None else None
    batch = tc.batch_size * size  # the global batch of `size` ranks
    steps = math.ceil(len(y) / batch)
    tc_run = tc.model_copy(update={"epochs": schedule_epochs or epochs})
    aucs: list[float] = []
    best_auc, best_epoch, bad, best_state = -math.inf, 0, 0, None
    seconds = 0.0
    for epoch in range(epochs):
        t0 = time.perf_counter()
        torch.manual_seed(epoch_seed(tc.seed, epoch, 0) + 1)  # dropout masks, as rank 0's
        order = torch.from_numpy(epoch_order(len(y), steps * batch, tc.seed, epoch, 0))
        net.train()
        swa_epoch = swa is not None and SWA_FROM is not None and epoch + 1 >= SWA_FROM
        for i in range(steps):
            idx = order[i * batch : (i + 1) * batch]
            if weights is None:
                loss = net.training_loss(x_num[idx], x_cat[idx], y[idx])  # the ranks' loss (k members: their mean)
            else:
                logits = net.member_logits(x_num[idx], x_cat[idx])
                loss = torch.nn.functional.binary_cross_entropy_with_logits(
                    logits, y[idx].unsqueeze(1).expand_as(logits), weight=weights[idx].unsqueeze(1).expand_as(logits)
                )
            opt.zero_grad()
            loss.backward()
            lr = learning_rate(tc_run, size, epoch * steps + i, steps)
            for g in opt.param_groups:
                g["lr"] = lr
            opt.step()
            if average is not None:
                average.update(net)
            if swa is not None and swa_epoch:
                swa.update_parameters(net)
        if swa is not None and swa_epoch:
            scored = swa.module  # type: ignore[assignment]
        seconds += time.perf_counter() - t0
        if val is None:
            continue
        auc = roc_auc(val[2], predict_logits(scored, val[0].numpy(), val[1].numpy()))
        aucs.append(round(float(auc), 5))
        if auc > best_auc:
            best_auc, best_epoch, bad = auc, epoch + 1, 0
            best_state = {k: v.detach().clone() for k, v in scored.state_dict().items()}
        else:
            bad += 1
            if bad >= tc.early_stopping_patience:
                break
    if best_state is not None:
        scored.load_state_dict(best_state)
    return scored, pre, aucs, best_epoch or epochs, seconds / max(1, len(aucs) or epochs)


def test_scores(cfg: PipelineConfig, net: TabularNet, pre: Preprocessor) -> dict[str, float]:
    out = {}
    for name, window in TESTS.items():
        x_num, x_cat, y = tensors(pre, frame(cfg, window))
        out[name] = round(float(roc_auc(y, predict_logits(net, x_num.numpy(), x_cat.numpy()))), 5)
    return out


def trial(
    name: str, overrides: dict[str, Any], seed: int, test: bool, may_final_fit: bool, planned: bool = False
) -> dict[str, Any]:
    """One seed of a variant; ``planned``: the final fits train for the planned epochs instead of
    the count early stopping picked."""
    cfg = with_overrides(load_config(ROOT / "configs" / "flights.yaml"), {**overrides, "training.seed": seed})
    load = load_avg()
    t0 = time.perf_counter()
    net, pre, aucs, best_epoch, s_per_epoch = fit(cfg, TRAIN, VALIDATION, cfg.training.epochs)
    row: dict[str, Any] = {
        "variant": name,
        "overrides": {
            **overrides,
            **({"final_fit_epochs": "planned"} if planned else {}),
            **({"swa_from": SWA_FROM} if SWA_FROM is not None else {}),
            **({"recency_half_life": RECENCY_HALF_LIFE} if RECENCY_HALF_LIFE is not None else {}),
        },
        "seed": seed,
        "val_auc": max(aucs),
        "val_aucs": aucs,
        "best_epoch": best_epoch,
        "s_per_epoch": round(s_per_epoch, 2),
    }
    if may_final_fit:
        _, april_pre, april, april_epoch, _ = fit(cfg, MAY_CHECK_TRAIN, MAY_CHECK_VAL, cfg.training.epochs)
        refit, refit_pre, _, _, _ = fit(cfg, TRAIN, None, cfg.training.epochs if planned else april_epoch)
        x_num, x_cat, y = tensors(refit_pre, frame(cfg, VALIDATION))
        # and as training.final_fit does it: January-March's preprocessing, the planned schedule
        # stopped at the April-chosen epoch
        piped, _, _, _, _ = fit(cfg, TRAIN, None, april_epoch, pre=april_pre, schedule_epochs=cfg.training.epochs)
        xp_num, xp_cat, yp = tensors(april_pre, frame(cfg, VALIDATION))
        # the pipeline's rule with the preprocessing fitted again on the refit's rows (January-April)
        piped_pre, piped_pre_p, _, _, _ = fit(cfg, TRAIN, None, april_epoch, schedule_epochs=cfg.training.epochs)
        xr_num, xr_cat, yr = tensors(piped_pre_p, frame(cfg, VALIDATION))
        row["may_final_fit"] = {
            "april_auc": max(april),
            "epochs": april_epoch,
            "may_auc": round(float(roc_auc(y, predict_logits(refit, x_num.numpy(), x_cat.numpy()))), 5),
            "may_auc_pipeline": round(float(roc_auc(yp, predict_logits(piped, xp_num.numpy(), xp_cat.numpy()))), 5),
            "may_auc_pipeline_refit_pre": round(
                float(roc_auc(yr, predict_logits(piped_pre, xr_num.numpy(), xr_cat.numpy()))), 5
            ),
        }
    if test:
        row["test"] = test_scores(cfg, net, pre)
        final, final_pre, _, _, _ = fit(cfg, FINAL, None, cfg.training.epochs if planned else best_epoch)
        row["final_fit_test"] = test_scores(cfg, final, final_pre)
        # as training.final_fit does it: the first run's preprocessing, January-May for the best
        # epoch count, the planned schedule stopped there (training/final_fit.py)
        final, _, _, _, _ = fit(cfg, FINAL, None, best_epoch, pre=pre, schedule_epochs=cfg.training.epochs)
        row["pipeline_final_fit_test"] = test_scores(cfg, final, pre)
        # the same with the preprocessing fitted again on January-May (quantiles, vocabularies)
        final, final_pre, _, _, _ = fit(cfg, FINAL, None, best_epoch, schedule_epochs=cfg.training.epochs)
        row["pipeline_refit_pre_final_fit_test"] = test_scores(cfg, final, final_pre)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    row["load_avg"] = [load, load_avg()]
    row["date"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    with OUT.open("a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def summary() -> str:
    """The Markdown table of every variant in the results file: May AUC mean over its seeds, and
    the test windows (mean) where scored."""
    rows = [json.loads(line) for line in OUT.read_text().splitlines() if line.strip()]
    # one variant = one set of overrides (a trial is deterministic given its seed): the runs of a
    # seed under several names (a later one with --test, say) are merged into one row per seed
    merged: dict[str, dict[int, dict[str, Any]]] = {}
    names: dict[str, str] = {}
    for r in rows:
        key = json.dumps(r["overrides"], sort_keys=True)
        names.setdefault(key, r["variant"].removeprefix("TEST:").removeprefix("MFF:"))
        merged.setdefault(key, {}).setdefault(r["seed"], {}).update(r)
    by = {names[k]: [per_seed[s] for s in sorted(per_seed)] for k, per_seed in merged.items()}
    lines = [
        "| variant | overrides | seeds | May ROC AUC mean (min..max) | best epochs | s/epoch | "
        "May after a final fit (epochs chosen on April) | "
        "as trained: Jun 1-15 / Jun 16-Jul 1 / Jul | final fit: Jun 1-15 / Jun 16-Jul 1 / Jul | "
        "final fit as the pipeline's: Jun 1-15 / Jun 16-Jul 1 / Jul |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rs in sorted(by.items(), key=lambda kv: -float(np.mean([r["val_auc"] for r in kv[1]]))):
        val = [r["val_auc"] for r in rs]
        cells = []
        for key in ("test", "final_fit_test", "pipeline_final_fit_test", "pipeline_refit_pre_final_fit_test"):
            scored = [r[key] for r in rs if key in r]
            cells.append(
                " / ".join(f"{np.mean([t[w] for t in scored]):.4f}" for w in TESTS) + f" ({len(scored)} seeds)"
                if scored
                else ""
            )
        checked = [r["may_final_fit"] for r in rs if "may_final_fit" in r]
        may_final = (
            f"{np.mean([c['may_auc'] for c in checked]):.4f} ({min(c['may_auc'] for c in checked):.4f}.."
            f"{max(c['may_auc'] for c in checked):.4f}; "
            + (
                "refit for the planned epochs)"
                if "final_fit_epochs" in rs[0]["overrides"]
                else f"refit for {','.join(str(c['epochs']) for c in checked)} epochs)"
            )
            if checked
            else ""
        )
        overrides = ", ".join(f"`{k}={json.dumps(v)}`" for k, v in rs[0]["overrides"].items()) or "(none)"
        lines.append(
            f"| {name} | {overrides} | {','.join(str(r['seed']) for r in rs)} | "
            f"{np.mean(val):.4f} ({min(val):.4f}..{max(val):.4f}) | {','.join(str(r['best_epoch']) for r in rs)} | "
            f"{np.median([r['s_per_epoch'] for r in rs]):.2f} | {may_final} | {cells[0]} | {cells[1]} | {cells[2]} |"
        )
    return "\n".join(lines)


def pipeline_epoch_times(old: dict[str, Any], rounds: int = 2) -> dict[str, list[dict[str, Any]]]:
    """The real pipeline (horovodrun np=2) on configs/flights.yaml as is ("new") and with the
    ``old`` overrides, interleaved ``rounds`` times, no baseline: seconds per epoch and in all."""
    import tempfile

    from prefect.testing.utilities import prefect_test_harness

    out: dict[str, list[dict[str, Any]]] = {}
    with prefect_test_harness():
        from ringflow.flows.training_pipeline import training_pipeline

        for name, overrides in [("old", old), ("new", {})] * rounds:
            home = Path(tempfile.mkdtemp(prefix=f"ringflow-trials-{name}-"))
            os.environ["RINGFLOW_HOME"] = str(home)
            os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{home / 'mlflow.db'}"
            cfg = with_overrides(load_config(ROOT / "configs" / "flights.yaml"), {**overrides, "gate.baseline": "none"})
            load = load_avg()
            t0 = time.perf_counter()
            training_pipeline(cfg, reason=f"trials-timing-{name}")
            s = json.loads(next(home.rglob("summary.json")).read_text())
            times = [h["epoch_time_s"] for h in s["history"]]
            row = {
                "epochs": len(times),
                "mean_epoch_s": round(sum(times) / len(times), 3),
                "train_wall_s": round(s["wall_time_s"], 1),
                "pipeline_s": round(time.perf_counter() - t0, 1),
                "best_val_auc": s["best_val_roc_auc"],
                "load_avg": load,
            }
            out.setdefault(name, []).append(row)
            print(name, row, flush=True)
    return out


def step_times(overrides: dict[str, Any], rounds: int = 5, steps: int = 50) -> dict[str, Any]:
    """One rank's training step (forward, backward, AdamW step; ``batch_size`` rows, the default
    config's preprocessing on January-April) of configs/flights.yaml as is ("default") and with
    ``overrides`` ("variant"), interleaved ``rounds`` times on this process's torch threads:
    milliseconds per step (median and range of the rounds' means) and parameter counts. No
    allreduce: the ranks' compute only."""
    cfgs = {
        "default": load_config(ROOT / "configs" / "flights.yaml"),
        "variant": with_overrides(load_config(ROOT / "configs" / "flights.yaml"), overrides),
    }
    train_df = frame(cfgs["default"], TRAIN)
    pre = Preprocessor.for_data(train_df, cfgs["default"].data)
    x_num, x_cat, y_np = tensors(pre, train_df)
    y = torch.from_numpy(y_np)
    setups = {}
    for name, cfg in cfgs.items():
        torch.manual_seed(0)
        net = TabularNet.for_preprocessor(pre, cfg.training.model)
        opt = torch.optim.AdamW(net.param_groups(cfg.training.weight_decay, cfg.training.model.level_weight_decay))
        setups[name] = (net, opt, cfg.training.batch_size)
    ms: dict[str, list[float]] = {name: [] for name in setups}
    order = torch.from_numpy(np.random.default_rng(0).permutation(len(y)))
    for _ in range(rounds + 1):  # the first round warms up and is not counted
        for name, (net, opt, batch) in setups.items():
            net.train()
            t0 = time.perf_counter()
            for i in range(steps):
                idx = order[(i * batch) % (len(y) - batch) :][:batch]
                loss = net.training_loss(x_num[idx], x_cat[idx], y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            ms[name].append((time.perf_counter() - t0) / steps * 1000)
    out: dict[str, Any] = {"threads": torch.get_num_threads(), "load_avg": load_avg()}
    for name, (net, _, _) in setups.items():
        counted = ms[name][1:]
        out[name] = {
            "ms_per_step": round(float(np.median(counted)), 2),
            "range": [round(min(counted), 2), round(max(counted), 2)],
            "parameters": sum(p.numel() for p in net.parameters()),
        }
    out["ratio"] = round(out["variant"]["ms_per_step"] / out["default"]["ms_per_step"], 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--variant")
    p.add_argument("--summary", action="store_true", help="print the Markdown table of every result and exit")
    p.add_argument("--set", action="append", default=[], help="key=value (YAML value), as ringflow run --set")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--test", action="store_true", help="also score June/July, as trained and after a final fit")
    p.add_argument(
        "--may-final-fit",
        action="store_true",
        help="also check the final fit on May alone: epochs chosen on April, refit on January-April, scored on May",
    )
    p.add_argument(
        "--final-planned", action="store_true", help="final fits train for training.epochs, not the chosen count"
    )
    p.add_argument(
        "--pipeline-timing",
        metavar="OLD_OVERRIDES_JSON",
        help="time the real pipeline on flights.yaml against these overrides (interleaved, twice)",
    )
    p.add_argument(
        "--step-timing",
        action="store_true",
        help="time one rank's training step: flights.yaml against --set's overrides",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--swa-from", type=int, help="SWA from this epoch (1-based) on, validated and kept (SWA_FROM)")
    p.add_argument("--recency-half-life", type=float, help="weight train rows by recency (RECENCY_HALF_LIFE)")
    a = p.parse_args()
    global SWA_FROM, RECENCY_HALF_LIFE
    SWA_FROM = a.swa_from
    RECENCY_HALF_LIFE = a.recency_half_life
    if a.pipeline_timing:
        print(json.dumps(pipeline_epoch_times(json.loads(a.pipeline_timing))))
        return
    if a.step_timing:
        torch.set_num_threads(a.threads)
        print(json.dumps(step_times({k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in a.set)})))
        return
    if a.summary or not a.variant:
        print(summary())
        return
    torch.set_num_threads(a.threads)
    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in a.set)}
    rows = [trial(a.variant, overrides, int(s), a.test, a.may_final_fit, a.final_planned) for s in a.seeds.split(",")]
    for r in rows:
        print(json.dumps({k: r[k] for k in r if k not in ("overrides", "date")}), flush=True)
    mean = float(np.mean([r["val_auc"] for r in rows]))
    line = f"{a.variant}: May AUC mean {mean:.4f} over {len(rows)} seeds"
    if a.may_final_fit:
        line += f"; May AUC after the final fit (April-chosen epochs) {np.mean([r['may_final_fit']['may_auc'] for r in rows]):.4f}"
        line += f", as the pipeline's {np.mean([r['may_final_fit']['may_auc_pipeline'] for r in rows]):.4f}"
        line += f", refit preprocessing {np.mean([r['may_final_fit']['may_auc_pipeline_refit_pre'] for r in rows]):.4f}"
    for key in ("test", "final_fit_test", "pipeline_final_fit_test", "pipeline_refit_pre_final_fit_test"):
        if all(key in r for r in rows):
            means = {w: float(np.mean([r[key][w] for r in rows])) for w in TESTS}
            line += f"; {key} " + " / ".join(f"{v:.4f}" for v in means.values())
    print(line, flush=True)


if __name__ == "__main__":
    main()

"""Model quality: the pipeline's network against tuned tree models, over seeds and windows.

    nice -n 10 .venv/bin/python benchmarks/bench_model_quality.py                 # ~12 min on 2 cores
    nice -n 10 .venv/bin/python benchmarks/bench_model_quality.py --seeds 0 --variants after,before
    nice -n 10 .venv/bin/python benchmarks/bench_model_quality.py --seeds 0 --final-fit on   # one seed, final fit only

For every seed (``training.seed``; the data's sharding stays fixed) each network variant runs the
real training pipeline (shard -> horovodrun np=2 -> evaluate) on the default config in its own
RINGFLOW_HOME with only the listed overrides, and its candidate is scored on three windows
neither it nor any choice here saw: the default test window (June 1-15), the rest of June and
July. Next to it, in this process and on the same rows, the two tuned references
(``training/baseline.py``: ``hgb`` and ``lightgbm``, each a seeded grid trained on January-April
with early stopping on May, the best May ROC AUC kept), scored as tuned and after the final fit
(the chosen settings and rounds refitted on January-May). Every choice is made on May alone.
With ``--final-fit both`` (default) each network variant also runs with ``training.final_fit``
(through the real pipeline: a second Horovod run on January-May for the epoch count May chose).

Results: ``benchmarks/results/model_quality.json`` and a Markdown table on stdout (mean, and
min..max over the seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RESULTS_DIR, ROOT, load_avg, machine_facts  # noqa: E402

TRAIN = ("2013-01-01", "2013-05-01")
VALIDATION = ("2013-05-01", "2013-06-01")
WINDOWS = {
    "2013-06-01..06-16 (default test)": ("2013-06-01", "2013-06-16"),
    "2013-06-16..07-01": ("2013-06-16", "2013-07-01"),
    "2013-07 (July)": ("2013-07-01", "2013-08-01"),
}
VARIANTS: dict[str, dict[str, Any]] = {
    # the network as it was before issue 17: the source columns only, constant LR after warm-up
    "before": {
        "data.features.crosses": [],
        "data.features.missing_indicators": False,
        "data.features.clip_quantile": 0.0,
        "data.features.numeric_scaling": "standard",
        "data.features.calendar": False,
        "training.lr_schedule": "constant",
        "training.epochs": 8,
        "training.early_stopping_patience": 3,
        "training.model.additive_features": [],
    },
    # derived inputs, quantile scaling and the cosine schedule, but every input through the MLP
    "all deep": {"training.model.additive_features": []},
    "after": {},  # the defaults (configs/flights.yaml): carrier, airports, route, distance, minute additive
}
REFERENCES = ["hgb", "lightgbm"]
METRICS = ["roc_auc", "pr_auc", "log_loss"]


def _load(cfg):
    from ringflow.training.data import in_window, load_labelled

    data, _ = load_labelled(cfg.data)

    def window(start: str, end: str):
        return data[in_window(data, cfg.data, start, end)]

    return window


def _scores(y, p) -> dict[str, float]:
    from ringflow.training.metrics import classification_metrics

    m = classification_metrics(y, p)
    return {k: round(float(m[k]), 5) for k in METRICS}


def run_network(name: str, overrides: dict[str, Any], seed: int, final_fit: bool = False) -> dict[str, Any]:
    """One real pipeline run; the candidate scored on every window (``final_fit``: the pipeline's
    final fit on, so the candidate is the model retrained on train + validation)."""
    import mlflow
    import numpy as np
    from mlflow import MlflowClient

    from ringflow.flows.training_pipeline import training_pipeline
    from ringflow.training.config import load_config, with_overrides
    from ringflow.training.pyfunc import predict_rows

    label = name.replace(" ", "-") + ("-final-fit" if final_fit else "")
    home = Path(tempfile.mkdtemp(prefix=f"ringflow-quality-{label}-{seed}-"))
    os.environ["RINGFLOW_HOME"] = str(home)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{home / 'mlflow.db'}"
    # the references are scored here, once per seed: the pipeline's own baseline is not needed
    cfg = with_overrides(
        load_config(ROOT / "configs" / "flights.yaml"),
        {**overrides, "training.seed": seed, "gate.baseline": "none", "training.final_fit": final_fit},
    )
    t0 = time.perf_counter()
    result = training_pipeline(cfg, reason=f"bench-model-quality-{label}-{seed}")
    seconds = time.perf_counter() - t0
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    run = MlflowClient().get_run(result.training_run_id)
    # the validation evidence is the select child's with the final fit (the training run's otherwise)
    evidence = MlflowClient().get_run(result.select_run_id) if result.select_run_id else run
    logged = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        output_format="list",
        filter_string=f"source_run_id = '{result.training_run_id}'",
    )
    newest = {m.name: m for m in sorted(logged, key=lambda m: m.creation_timestamp)}
    network = mlflow.pyfunc.load_model(f"models:/{newest['model'].model_id}")
    window = _load(cfg)
    scores = {}
    for label, (start, end) in WINDOWS.items():
        rows = window(start, end)
        scores[label] = _scores(rows["target"].to_numpy(), np.asarray(predict_rows(network, rows)))
    return {
        "seed": seed,
        "pipeline_seconds": round(seconds, 1),
        "training_status": result.training_status,
        "best_val_roc_auc": evidence.data.metrics.get("best_val_roc_auc", evidence.data.metrics.get("val_roc_auc")),
        "final_fit_epochs": result.final_fit_epochs,
        "windows": scores,
        "ringflow_home": str(home),
    }


def run_references(seed: int) -> dict[str, Any]:
    """The tuned references, as tuned (January-April) and after the final fit (January-May)."""
    import pandas as pd

    from ringflow.training.baseline import baseline_proba, refit_baseline, tune_baseline
    from ringflow.training.config import load_config

    cfg = load_config(ROOT / "configs" / "flights.yaml")
    window = _load(cfg)
    train, val = window(*TRAIN), window(*VALIDATION)
    num, cat = cfg.data.numeric_features, cfg.data.categorical_features
    out: dict[str, Any] = {}
    for kind in REFERENCES:
        tuned = tune_baseline(kind, train, val, "target", num, cat, seed=seed)
        t0 = time.perf_counter()
        final = refit_baseline(kind, tuned.params, pd.concat([train, val]), "target", num, cat, seed=seed)
        refit_s = time.perf_counter() - t0
        for label, model in ((kind, tuned.model), (f"{kind}, final fit", final)):
            out[label] = {
                "settings": tuned.params,
                "val_roc_auc": round(tuned.val_roc_auc, 5),
                "seconds": round(tuned.seconds if model is tuned.model else refit_s, 1),
                "windows": {
                    w: _scores(rows["target"].to_numpy(), baseline_proba(model, rows, num, cat))
                    for w, rows in ((w, window(*span)) for w, span in WINDOWS.items())
                },
            }
    return out


def _cell(values: list[float]) -> str:
    if not values:
        return "n/a"
    mean = statistics.fmean(values)
    return f"{mean:.4f}" if len(values) == 1 else f"{mean:.4f} ({min(values):.4f}..{max(values):.4f})"


def table(networks: dict[str, list[dict[str, Any]]], references: list[dict[str, Any]]) -> str:
    lines = ["| window | model | ROC AUC | PR AUC | log loss |", "|---|---|---|---|---|"]
    for label in WINDOWS:
        for variant, runs in networks.items():
            cells = [_cell([r["windows"][label][k] for r in runs]) for k in METRICS]
            lines.append(f"| {label} | network {variant} | " + " | ".join(cells) + " |")
        for ref in references[0] if references else []:
            cells = [_cell([r[ref]["windows"][label][k] for r in references]) for k in METRICS]
            lines.append(f"| {label} | tuned {ref} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--variants", default="after", help=f"comma-separated network variants ({', '.join(VARIANTS)})")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (at least 3 for a spread)")
    p.add_argument(
        "--final-fit",
        choices=["both", "off", "on"],
        default="both",
        help="network runs without (off), with (on) or both with and without training.final_fit",
    )
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "model_quality.json")
    args = p.parse_args(argv)
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}: choose from {list(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # the ephemeral API's default 20 s start is too short on a loaded 2-core machine
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    load_before, t0 = load_avg(), time.perf_counter()
    references = [run_references(s) for s in seeds]
    modes = {"both": [False, True], "off": [False], "on": [True]}[args.final_fit]
    networks = {
        n + (", final fit" if final else ""): [run_network(n, VARIANTS[n], s, final_fit=final) for s in seeds]
        for n in names
        for final in modes
    }
    out = {
        "benchmark": "model_quality",
        "machine": machine_facts(),
        "load_before": load_before,
        "load_after": load_avg(),
        "wall_s": round(time.perf_counter() - t0, 1),
        "seeds": seeds,
        "networks": networks,
        "references": references,
        "table_markdown": table(networks, references),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(out["table_markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

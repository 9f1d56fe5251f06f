"""Model quality: the pipeline's network against the baseline, before and after issue 17's changes.

    .venv/bin/python benchmarks/bench_model_quality.py            # three variants, ~10-15 min on 2 cores
    .venv/bin/python benchmarks/bench_model_quality.py --only after

Each variant runs the real training pipeline (shard -> horovodrun np=2 -> evaluate) on the default
config, in its own RINGFLOW_HOME, with only the listed overrides. The candidate it logs and the
baseline its evaluation fitted (same train window, January-April 2013) are then scored on three
windows neither saw: the default test window (June 1-15), the rest of June and July. The
baseline is the same model in every variant (same train rows, same seed), a sanity check.
Results: ``benchmarks/results/model_quality.json`` and a Markdown table on stdout (README).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RESULTS_DIR, ROOT, load_avg, machine_facts  # noqa: E402

WINDOWS = {
    "2013-06-01..06-16 (default test)": ("2013-06-01", "2013-06-16"),
    "2013-06-16..07-01": ("2013-06-16", "2013-07-01"),
    "2013-07 (July)": ("2013-07-01", "2013-08-01"),
}
VARIANTS = {
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
METRICS = ["roc_auc", "pr_auc", "log_loss"]


def run_variant(name: str, overrides: dict) -> dict:
    import mlflow
    import numpy as np
    from mlflow import MlflowClient

    from ringflow.flows.training_pipeline import training_pipeline
    from ringflow.training.baseline import baseline_proba
    from ringflow.training.config import load_config, with_overrides
    from ringflow.training.data import in_window, load_labelled
    from ringflow.training.metrics import classification_metrics
    from ringflow.training.pyfunc import predict_rows

    home = Path(tempfile.mkdtemp(prefix=f"ringflow-quality-{name}-"))
    os.environ["RINGFLOW_HOME"] = str(home)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{home / 'mlflow.db'}"
    cfg = with_overrides(load_config(ROOT / "configs" / "flights.yaml"), overrides)
    t0 = time.perf_counter()
    result = training_pipeline(cfg, reason=f"bench-model-quality-{name}")
    seconds = time.perf_counter() - t0
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    client = MlflowClient()
    run = client.get_run(result.training_run_id)
    logged = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        output_format="list",
        filter_string=f"source_run_id = '{result.training_run_id}'",
    )
    newest = {m.name: m for m in sorted(logged, key=lambda m: m.creation_timestamp)}
    network = mlflow.pyfunc.load_model(f"models:/{newest['model'].model_id}")
    baseline = mlflow.sklearn.load_model(f"models:/{newest['baseline'].model_id}")
    data, _ = load_labelled(cfg.data)
    num, cat = cfg.data.numeric_features, cfg.data.categorical_features
    windows = {}
    for label, (start, end) in WINDOWS.items():
        rows = data[in_window(data, cfg.data, start, end)]
        y = rows["target"].to_numpy()
        net = classification_metrics(y, np.asarray(predict_rows(network, rows)))
        base = classification_metrics(y, baseline_proba(baseline, rows, num, cat))
        windows[label] = {
            "rows": len(rows),
            "candidate": {k: net[k] for k in METRICS},
            "baseline": {k: base[k] for k in METRICS},
        }
    return {
        "overrides": overrides,
        "pipeline_seconds": round(seconds, 1),
        "training_status": result.training_status,
        "epochs": run.data.params.get("training.epochs"),
        "decision": result.decision,
        "windows": windows,
        "training_run_id": result.training_run_id,
        "ringflow_home": str(home),
    }


def table(results: dict) -> str:
    lines = ["| window | model | ROC AUC | PR AUC | log loss |", "|---|---|---|---|---|"]
    for label in WINDOWS:
        for variant, r in results.items():
            w = r["windows"][label]
            lines.append(
                f"| {label} | network, {variant} | " + " | ".join(f"{w['candidate'][k]:.4f}" for k in METRICS) + " |"
            )
        w = next(iter(results.values()))["windows"][label]
        lines.append(f"| {label} | baseline hgb | " + " | ".join(f"{w['baseline'][k]:.4f}" for k in METRICS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", help=f"comma-separated variants ({', '.join(VARIANTS)})")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "model_quality.json")
    args = p.parse_args(argv)
    names = args.only.split(",") if args.only else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}: choose from {list(VARIANTS)}")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # the ephemeral API's default 20 s start is too short on a loaded 2-core machine
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    load_before = load_avg()
    results = {n: run_variant(n, VARIANTS[n]) for n in names}
    out = {
        "benchmark": "model_quality",
        "machine": machine_facts(),
        "load_before": load_before,
        "load_after": load_avg(),
        "results": results,
        "table_markdown": table(results),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(out["table_markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

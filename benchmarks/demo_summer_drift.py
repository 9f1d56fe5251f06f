"""Demo: a January-April champion meets the summer; monitoring flags it and a rerun fixes it.

1. Train the champion with ``configs/flights.yaml`` (train Jan-Apr, validation May, test June
   1-15) unless a champion is already registered.
2. Monitor month by month (June, July, August): drift / AUC drop against the champion.
3. On the first month with a rerun plan, run the training pipeline with exactly the parameters
   the ``ringflow-rerun-on-anomaly`` automation would pass (the plan's config and reason, the
   monitoring run as parent, the anomaly id): here in-process, so no server is needed.
4. Score the old champion and the rerun's model on the rerun's test window (data neither saw in
   training) and on the whole flagged month; print both.

    RINGFLOW_HOME=.ringflow-demo .venv/bin/python benchmarks/demo_summer_drift.py [--months 2013-06 2013-07 2013-08]

Needs the full training pipeline (shard -> Horovod -> evaluate -> register); about 10-20 min on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "flights.yaml")
    p.add_argument("--months", nargs="*", default=["2013-06", "2013-07", "2013-08"])
    p.add_argument("--set", dest="overrides", action="append", default=[], help="key.path=value")
    a = p.parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

    import mlflow
    from mlflow import MlflowClient

    from ringflow.flows.monitoring import monitoring_flow, print_result
    from ringflow.flows.training_pipeline import print_summary, training_pipeline
    from ringflow.training.config import PipelineConfig, get_settings, load_config
    from ringflow.training.data import TARGET, in_window, load_labelled, month_window
    from ringflow.training.metrics import classification_metrics
    from ringflow.training.pyfunc import predict_rows

    cfg = load_config(a.config, a.overrides)
    settings = get_settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", settings.tracking_uri)
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    client = MlflowClient()
    name = cfg.registry.model_name

    try:
        old = client.get_model_version_by_alias(name, "champion")
        print(f"champion: {name} v{old.version} (already registered)")
    except mlflow.exceptions.MlflowException:
        print_summary(training_pipeline(cfg, reason="demo: initial champion"))
        old = client.get_model_version_by_alias(name, "champion")

    out: dict = {"champion_version": str(old.version), "months": {}}
    flagged = None
    for month in a.months:
        r = monitoring_flow(cfg, batch=month, trigger_rerun=False)
        print_result(r)
        out["months"][month] = {
            "roc_auc": r.metrics.get("roc_auc"),
            "drop": r.roc_auc_drop,
            "drifted_share": r.drifted_share,
            "anomalies": [x.type.value for x in r.anomalies],
            "decision": r.decision,
        }
        if r.rerun_overrides and flagged is None:
            flagged = r
            break
    if flagged is None:
        print("no month produced a rerun plan")
        return out

    # exactly the parameters the automation passes: rerun.config, rerun.reason, monitoring run, anomaly id
    rerun_cfg = PipelineConfig.model_validate(flagged.rerun_config)
    rerun = training_pipeline(
        rerun_cfg, reason=flagged.rerun_reason, parent_run_id=flagged.monitoring_run_id, anomaly_id=flagged.anomaly_id
    )
    print_summary(rerun)
    if not rerun.model_version:
        print("the rerun registered no model (training did not complete)")
        return out

    df, _ = load_labelled(cfg.data)
    start, end = month_window(flagged.batch)
    t = rerun_cfg.data.windows.test
    windows = {f"rerun test window {t}": (t.start, t.end), f"month {flagged.batch}": (start, end)}
    old_model = mlflow.pyfunc.load_model(f"models:/{name}/{old.version}")
    new_model = mlflow.pyfunc.load_model(f"models:/{name}/{rerun.model_version}")
    out["comparison"] = {}
    for label, (lo, hi) in windows.items():
        rows = df[in_window(df, cfg.data, lo, hi)]
        old_auc = classification_metrics(rows[TARGET], predict_rows(old_model, rows))["roc_auc"]
        new_auc = classification_metrics(rows[TARGET], predict_rows(new_model, rows))["roc_auc"]
        out["comparison"][label] = {"old_champion": old_auc, "rerun": new_auc, "rows": len(rows)}
        print(
            f"{label:45s} old champion v{old.version} AUC {old_auc:.4f}  rerun v{rerun.model_version} AUC "
            f"{new_auc:.4f}  ({new_auc - old_auc:+.4f})"
        )
    out["rerun_version"], out["rerun_promoted"] = rerun.model_version, rerun.promoted
    (settings.home / "demo_summer_drift.json").write_text(json.dumps(out, indent=1, default=str))
    return out


if __name__ == "__main__":
    main()

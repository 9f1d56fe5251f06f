"""Where a ringflow MLflow run keeps its artifacts, once: the task that logs a file and every
reader (the monitoring flow, the tests) use these names, so a moved file cannot silently leave a
reader looking in the old place."""

from __future__ import annotations

from typing import Final

from ringflow.training.summary import SUMMARY_FILE

# --------------------------------------------------------------------------- training runs
DATA_DIR: Final = "data"
"""The shard manifest the run trained on."""
CONFIG_DIR: Final = "config"
CONFIG_ARTIFACT: Final = f"{CONFIG_DIR}/pipeline_config.json"
"""The run's resolved :class:`~ringflow.training.config.PipelineConfig` (JSON)."""
TRAINING_DIR: Final = "training"
"""horovodrun's log and the training summary."""
SUMMARY_ARTIFACT: Final = f"{TRAINING_DIR}/{SUMMARY_FILE}"
"""The run's :class:`~ringflow.training.summary.TrainingSummary` (JSON)."""
HOROVOD_DIR: Final = "horovod"
"""Horovod's timeline and autotune log, when the run wrote them."""

# --------------------------------------------------------------------------- evaluation (training run)
EVALUATION_DIR: Final = "evaluation"
ROC_PR_CURVES: Final = f"{EVALUATION_DIR}/roc_pr_curves.png"
CALIBRATION_CURVE: Final = f"{EVALUATION_DIR}/calibration_curve.png"
GATE_REPORT: Final = f"{EVALUATION_DIR}/gate.md"
BASELINE_GRID: Final = f"{EVALUATION_DIR}/baseline_grid.json"
"""Every setting the baseline's tuning tried, and the one it chose."""

# --------------------------------------------------------------------------- monitoring runs
MONITORING_DIR: Final = "monitoring"
"""The Evidently reports, the anomalies and the decision of a monitoring run."""

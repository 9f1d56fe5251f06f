"""The names of the classification metrics, once: what :func:`ringflow.training.metrics.classification_metrics`
computes, what the gate may compare (``gate.primary_metric``), what each training epoch and the
evaluation log to MLflow, and what the pipeline reports. Light on purpose (no numpy, no
scikit-learn): the config imports it."""

from __future__ import annotations

from typing import Final, Literal, get_args

MetricName = Literal["roc_auc", "pr_auc", "accuracy", "f1", "log_loss", "brier"]
METRIC_NAMES: Final[tuple[MetricName, ...]] = get_args(MetricName)
"""Every metric computed on a test or validation window, in the order they are shown."""

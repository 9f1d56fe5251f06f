"""Binary-classification metrics and plots, shared by evaluation, the gate and monitoring.

The metrics are numpy only, computed as scikit-learn defines them (``tests/test_training.py``
checks them against it): every Horovod rank computes them each epoch, and importing
scikit-learn (and SciPy) cost each rank about a second of start-up. The plots use scikit-learn.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike

if TYPE_CHECKING:
    from matplotlib.figure import Figure

GREATER_IS_BETTER: dict[str, bool] = {
    "roc_auc": True,
    "pr_auc": True,
    "accuracy": True,
    "f1": True,
    "log_loss": False,
    "brier": False,
}


def classification_metrics(y_true: ArrayLike, proba: ArrayLike, threshold: float = 0.5) -> dict[str, float]:
    """ROC AUC, PR AUC, log loss, accuracy, F1, Brier score and the confusion matrix at ``threshold``.

    AUCs are NaN when the labels hold a single class (nothing to rank).
    """
    y = np.asarray(y_true).astype(int).ravel()
    p = np.clip(np.asarray(proba, dtype=np.float64).ravel(), 1e-7, 1 - 1e-7)
    if len(y) == 0:
        raise ValueError("cannot compute metrics on zero rows")
    if len(y) != len(p):
        raise ValueError(f"{len(y)} labels but {len(p)} predictions")
    pred = (p >= threshold).astype(int)
    two_classes = len(np.unique(y)) == 2
    tp = int(np.sum((pred == 1) & (y == 1)))
    fp = int(np.sum((pred == 1) & (y == 0)))
    fn = int(np.sum((pred == 0) & (y == 1)))
    tn = len(y) - tp - fp - fn
    return {
        "roc_auc": roc_auc(y, p) if two_classes else math.nan,
        "pr_auc": average_precision(y, p) if two_classes else math.nan,
        "log_loss": float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))),
        "accuracy": float(np.mean(pred == y)),
        "f1": float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else 0.0,
        "brier": float(np.mean((p - y) ** 2)),
        "positive_rate": float(y.mean()),
        "tn": int(tn),
        "fp": int(fp),
        "fn": int(fn),
        "tp": int(tp),
        "rows": int(len(y)),
    }


def max_f1_threshold(y_true: ArrayLike, proba: ArrayLike) -> float:
    """The decision threshold with the highest F1 on these rows (chosen on validation data).

    Delays are the minority class: at 0.5 a well-ranked model can predict "no delay" for every
    row (F1 = 0). 0.5 when the labels hold a single class (nothing to choose from).
    """
    y = np.asarray(y_true).astype(int).ravel()
    p = np.asarray(proba, dtype=np.float64).ravel()
    if len(np.unique(y)) < 2 or not np.all(np.isfinite(p)):
        return 0.5
    precision, recall, thresholds = precision_recall_curve(y, p)
    # precision/recall have one more entry than thresholds (the end point recall = 0)
    f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
    return float(thresholds[int(np.argmax(f1))])


def _binary_clf_curve(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False and true positives at each distinct score, highest score first (scikit-learn's)."""
    order = np.argsort(p, kind="mergesort")[::-1]
    p, y = p[order], y[order]
    ends = np.r_[np.where(np.diff(p))[0], y.size - 1]
    tps = np.cumsum(y, dtype=np.float64)[ends]
    return 1 + ends - tps, tps, p[ends]


def precision_recall_curve(y_true: ArrayLike, proba: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``sklearn.metrics.precision_recall_curve`` (binary, no weights): precision and recall by
    increasing threshold, ending at (1, 0)."""
    fps, tps, thresholds = _binary_clf_curve(np.asarray(y_true).ravel(), np.asarray(proba, dtype=np.float64).ravel())
    ps = tps + fps
    precision = np.divide(tps, ps, out=np.zeros_like(tps), where=ps != 0)
    recall = tps / tps[-1] if tps[-1] else np.ones_like(tps)
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0], thresholds[::-1]


def average_precision(y_true: ArrayLike, proba: ArrayLike) -> float:
    """``sklearn.metrics.average_precision_score`` (binary): the step-wise area under the PR curve."""
    precision, recall, _ = precision_recall_curve(y_true, proba)
    return float(-np.sum(np.diff(recall) * precision[:-1]))


def roc_auc(y_true: ArrayLike, proba: ArrayLike) -> float:
    """``sklearn.metrics.roc_auc_score`` (binary): the trapezoidal area under the ROC curve."""
    fps, tps, _ = _binary_clf_curve(np.asarray(y_true).ravel(), np.asarray(proba, dtype=np.float64).ravel())
    fpr, tpr = np.r_[0.0, fps] / fps[-1], np.r_[0.0, tps] / tps[-1]
    return float(np.trapezoid(tpr, fpr))


def roc_and_calibration_figures(y_true: ArrayLike, curves: dict[str, np.ndarray]) -> tuple[Figure, Figure]:
    """Two matplotlib figures, one line per model in ``curves``: ROC and precision-recall curves
    side by side, and the calibration curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn import metrics as skm
    from sklearn.calibration import calibration_curve

    y = np.asarray(y_true).astype(int).ravel()
    roc, (ax, ax_pr) = plt.subplots(1, 2, figsize=(10, 5))
    for label, p in curves.items():
        fpr, tpr, _ = skm.roc_curve(y, p)
        ax.plot(fpr, tpr, label=f"{label} (AUC {skm.roc_auc_score(y, p):.3f})")
        precision, recall, _ = skm.precision_recall_curve(y, p)
        ax_pr.plot(recall, precision, label=f"{label} (AP {skm.average_precision_score(y, p):.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=1, label="chance")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC curve (test window)")
    ax.legend(loc="lower right")
    ax_pr.axhline(y.mean(), color="k", ls=":", lw=1, label=f"chance ({y.mean():.3f})")
    ax_pr.set(xlabel="recall", ylabel="precision", title="Precision-recall curve (test window)")
    ax_pr.legend(loc="upper right")
    roc.tight_layout()
    cal, ax = plt.subplots(figsize=(5, 5))
    for label, p in curves.items():
        frac, mean = calibration_curve(y, p, n_bins=10, strategy="quantile")
        ax.plot(mean, frac, "o-", label=label)
    ax.plot([0, 1], [0, 1], "k:", lw=1, label="perfectly calibrated")
    ax.set(xlabel="mean predicted probability", ylabel="observed delay rate", title="Calibration (test window)")
    ax.legend(loc="upper left")
    return roc, cal

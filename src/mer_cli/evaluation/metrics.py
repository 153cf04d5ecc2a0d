"""Predictions -> metrics and curves, all computed by scikit-learn.

Input: true labels ``y_true`` (N,) and class probabilities ``y_prob`` (N, C). Output: a plain
dict of metrics (the names `metrics.json` uses) and the ROC / precision-recall curves to plot.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    auc,
    average_precision_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_curve,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from mer_cli.core.registry import Registry


@dataclass(frozen=True)
class Metric:
    """One scalar metric of a split: ``compute(y_true (N,), y_prob (N, C))``; ``percent``: shown
    as a percentage; ``from_labels``: computed from the predicted labels alone (the comparison's
    bootstrap resamples those, `evaluation.stats`)."""

    name: str
    title: str
    higher_is_better: bool
    compute: Callable[[np.ndarray, np.ndarray], float]
    percent: bool = True
    from_labels: bool = False


def _labels(y_prob: np.ndarray) -> list[int]:
    return list(range(y_prob.shape[1]))


def _onehot(y_true: np.ndarray, y_prob: np.ndarray) -> np.ndarray:
    return np.eye(y_prob.shape[1])[y_true]


def f1_macro(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    """Macro F1 over every class of the model (a class never true nor predicted scores 0)."""
    return float(
        f1_score(y_true, y_prob.argmax(axis=1), labels=_labels(y_prob), average="macro", zero_division=0)
    )


def accuracy(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    return float(accuracy_score(y_true, y_prob.argmax(axis=1)))


def balanced_accuracy(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    """Mean recall over the classes present in ``y_true``."""
    return float(balanced_accuracy_score(y_true, y_prob.argmax(axis=1)))


def roc_auc_micro(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    """Micro-averaged one-vs-rest ROC-AUC (Keras' AUC metric on one-hot targets); NaN if undefined."""
    return _safe(lambda: roc_auc_score(_onehot(y_true, y_prob), y_prob, average="micro"))


def roc_auc_macro(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    """Macro ROC-AUC over the classes present in ``y_true``."""
    onehot = _onehot(y_true, y_prob)
    present = onehot.sum(axis=0) > 0
    return _safe(lambda: roc_auc_score(onehot[:, present], y_prob[:, present], average="macro"))


def loss(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class (probabilities floored at 1e-12)."""
    return float(log_loss(y_true, np.clip(y_prob, 1e-12, 1.0), labels=_labels(y_prob)))


# the one definition of each metric: metrics.json, the training history, the report's tables
METRICS: Registry[Metric] = Registry("metric")
for _m in (
    Metric("f1_macro", "macro F1", True, f1_macro, from_labels=True),
    Metric(
        "accuracy",
        "accuracy",
        True,
        lambda y, p: float(accuracy_score(y, p.argmax(axis=1))),
        from_labels=True,
    ),
    Metric(
        "balanced_accuracy",
        "balanced accuracy",
        True,
        lambda y, p: float(balanced_accuracy_score(y, p.argmax(axis=1))),
        from_labels=True,
    ),
    Metric("roc_auc_micro", "ROC-AUC (micro)", True, roc_auc_micro),
    Metric("roc_auc_macro", "ROC-AUC (macro)", True, roc_auc_macro),
    Metric("loss", "loss", False, loss, percent=False),
):
    METRICS.add(_m.name, _m)

# headline metrics, in the order tables and summaries show them
HEADLINE = ("f1_macro", "accuracy", "balanced_accuracy", "roc_auc_micro")
# the comparison's tables (label-based ones also get a bootstrap interval) and bar charts
TABLE = ("f1_macro", "accuracy", "balanced_accuracy", "roc_auc_micro", "roc_auc_macro", "loss")
BARS = tuple(m for m in TABLE if METRICS.get(m).from_labels)
# metrics.json's order of the scalar metrics of a split
SCORE_ORDER = ("loss", "f1_macro", "accuracy", "balanced_accuracy", "roc_auc_micro", "roc_auc_macro")


def score(y_true: np.ndarray, y_prob: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Every metric of one split. Per-class entries are keyed by class name.

    A metric that is undefined on this split (ROC-AUC of a class with no clip) is NaN.
    """
    n_classes = len(class_names)
    labels = list(range(n_classes))
    y_pred = y_prob.argmax(axis=1)
    onehot = np.eye(n_classes)[y_true]
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    present = onehot.sum(axis=0) > 0
    scalars = {m: METRICS.get(m).compute(y_true, y_prob) for m in SCORE_ORDER}
    return {
        "n_clips": len(y_true),
        **scalars,
        "roc_auc_per_class": {
            name: _safe(lambda c=c: roc_auc_score(onehot[:, c], y_prob[:, c]))
            for c, name in enumerate(class_names)
        },
        "pr_auc_per_class": {
            name: _safe(lambda c=c: average_precision_score(onehot[:, c], y_prob[:, c]))
            if present[c]
            else math.nan
            for c, name in enumerate(class_names)
        },
        "per_class": {
            name: {
                "precision": float(precision[c]),
                "recall": float(recall[c]),
                "f1": float(f1[c]),
                "support": int(support[c]),
            }
            for c, name in enumerate(class_names)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def _safe(fn: object) -> float:
    try:
        return float(fn())  # type: ignore[operator]
    except ValueError:  # only one class present: the curve is undefined
        return math.nan


@dataclass(frozen=True)
class Curve:
    x: np.ndarray  # false positive rate (ROC) or recall (PR)
    y: np.ndarray  # true positive rate (ROC) or precision (PR)
    area: float


def roc_curves(y_true: np.ndarray, y_prob: np.ndarray) -> dict[str, Curve]:
    """One-vs-rest ROC per class index (as str) plus ``"micro"`` over all (clip, class) pairs."""
    n_classes = y_prob.shape[1]
    onehot = np.eye(n_classes)[y_true]
    curves = {}
    for c in range(n_classes):
        if 0 < onehot[:, c].sum() < len(onehot):
            fpr, tpr, _ = roc_curve(onehot[:, c], y_prob[:, c])
            curves[str(c)] = Curve(fpr, tpr, float(auc(fpr, tpr)))
    fpr, tpr, _ = roc_curve(onehot.ravel(), y_prob.ravel())
    curves["micro"] = Curve(fpr, tpr, float(auc(fpr, tpr)))
    return curves


def pr_curves(y_true: np.ndarray, y_prob: np.ndarray) -> dict[str, Curve]:
    """Precision-recall per class index (as str); area = average precision."""
    onehot = np.eye(y_prob.shape[1])[y_true]
    curves = {}
    for c in range(y_prob.shape[1]):
        if onehot[:, c].sum() > 0:
            precision, recall, _ = precision_recall_curve(onehot[:, c], y_prob[:, c])
            curves[str(c)] = Curve(
                recall, precision, float(average_precision_score(onehot[:, c], y_prob[:, c]))
            )
    return curves

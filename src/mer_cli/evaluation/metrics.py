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


ECE_BINS = 15  # confidence bins of the expected calibration error (the common choice since Guo et al. 2017)


def _confidence(y_true: np.ndarray, y_prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each clip's confidence (its top probability) and whether that top class is the true one."""
    return y_prob.max(axis=1), (y_prob.argmax(axis=1) == y_true).astype(np.float64)


def _binned_gap(confidence: np.ndarray, correct: np.ndarray, bins: list[np.ndarray]) -> float:
    n = len(confidence)
    return float(sum(len(b) / n * abs(correct[b].mean() - confidence[b].mean()) for b in bins if len(b)))


def _equal_width_bins(confidence: np.ndarray, n_bins: int) -> list[np.ndarray]:
    """Clip indices per confidence bin (0, 1/n], ..., ((n-1)/n, 1]."""
    which = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    return [np.flatnonzero(which == b) for b in range(n_bins)]


def ece(y_true: np.ndarray, y_prob: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error with equal-width confidence bins ((0, 1/n], ..., ((n-1)/n, 1]):
    the clip-weighted mean |accuracy - mean confidence| over the bins."""
    confidence, correct = _confidence(y_true, y_prob)
    return _binned_gap(confidence, correct, _equal_width_bins(confidence, n_bins))


@dataclass(frozen=True)
class Reliability:
    """A reliability diagram's numbers: per equal-width confidence bin (the bins of `ece`), its
    clip count, mean confidence and accuracy (NaN for an empty bin)."""

    edges: np.ndarray  # (n_bins + 1,)
    counts: np.ndarray  # (n_bins,)
    confidence: np.ndarray  # (n_bins,)
    accuracy: np.ndarray  # (n_bins,)


def reliability(y_true: np.ndarray, y_prob: np.ndarray, n_bins: int = ECE_BINS) -> Reliability:
    confidence, correct = _confidence(y_true, y_prob)
    bins = _equal_width_bins(confidence, n_bins)
    return Reliability(
        edges=np.linspace(0.0, 1.0, n_bins + 1),
        counts=np.array([len(b) for b in bins]),
        confidence=np.array([confidence[b].mean() if len(b) else np.nan for b in bins]),
        accuracy=np.array([correct[b].mean() if len(b) else np.nan for b in bins]),
    )


def ece_adaptive(y_true: np.ndarray, y_prob: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error with equal-count bins: clips sorted by confidence, cut into
    ``n_bins`` groups of (nearly) equal size, so sparse confidence ranges do not dominate."""
    confidence, correct = _confidence(y_true, y_prob)
    order = np.argsort(confidence, kind="stable")
    return _binned_gap(confidence, correct, list(np.array_split(order, min(n_bins, len(order)))))


def brier(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    """Multi-class Brier score: the mean over clips of sum_c (p_c - [c is the true class])^2."""
    return float(((y_prob - _onehot(y_true, y_prob)) ** 2).sum(axis=1).mean())


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
    Metric("ece", "ECE", False, ece),
    Metric("ece_adaptive", "ECE (adaptive bins)", False, ece_adaptive),
    Metric("brier", "Brier score", False, brier, percent=False),
    Metric("nll", "NLL", False, loss, percent=False),  # the same as loss: calibration's usual name
):
    METRICS.add(_m.name, _m)

# headline metrics, in the order tables and summaries show them
HEADLINE = ("f1_macro", "accuracy", "balanced_accuracy", "roc_auc_micro")
# the comparison's tables (label-based ones also get a bootstrap interval) and bar charts
# (ECE beside macro F1: how far the model's confidence can be taken at its word)
TABLE = ("f1_macro", "ece", "accuracy", "balanced_accuracy", "roc_auc_micro", "roc_auc_macro", "loss")
BARS = tuple(m for m in TABLE if METRICS.get(m).from_labels)
# metrics.json's order of the scalar metrics of a split
SCORE_ORDER = (
    "loss",
    "f1_macro",
    "accuracy",
    "balanced_accuracy",
    "roc_auc_micro",
    "roc_auc_macro",
    "ece",
    "ece_adaptive",
    "brier",
    "nll",
)


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

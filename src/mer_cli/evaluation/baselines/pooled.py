"""Pooled per-clip statistics and the scikit-learn classifiers fitted on them.

Input: per stream, each clip's (T, D) frames. Output: one vector per clip (`pool`: per feature
the mean, standard deviation, minimum, maximum and least-squares slope over the clip's frames,
per stream, streams side by side), and a classifier's class probabilities on the validation
and test clips (`fit_predict`: a StandardScaler fitted on the training vectors, then logistic
regression or an RBF SVM, its C chosen on validation macro F1).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from mer_cli.evaluation.metrics import f1_macro

# the statistics per feature, in the order `statistics` lays them out
STATISTICS = ("mean", "std", "min", "max", "slope")


def statistics(x: np.ndarray) -> np.ndarray:
    """(T, D) frames -> (5 D,): per feature its mean, std (ddof 0), min, max, then the slope of its
    least-squares line over the frame index (units per frame; 0 for a one-frame clip), each a
    block of D values in `STATISTICS` order."""
    x = np.asarray(x, dtype=np.float64)
    t = np.arange(len(x), dtype=np.float64)
    t -= t.mean()
    mean = x.mean(axis=0)
    denominator = float(t @ t)
    slope = (t @ (x - mean)) / denominator if denominator > 0 else np.zeros(x.shape[1])
    return np.concatenate([mean, x.std(axis=0), x.min(axis=0), x.max(axis=0), slope])


def pool(streams: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
    """Per clip, the `statistics` of each stream side by side: (N, sum over streams of 5 D).
    ``streams[s][i]``: clip i's frames of stream s."""
    n = len(streams[0])
    return np.stack([np.concatenate([statistics(stream[i]) for stream in streams]) for i in range(n)])


def logistic_regression(c: float, seed: int) -> Pipeline:
    """Standardised statistics, then multinomial logistic regression (lbfgs) with inverse
    regularisation ``c``."""
    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000, random_state=seed))


def svm(c: float, seed: int) -> Pipeline:
    """Standardised statistics, then an RBF SVM (gamma "scale", one-vs-rest decision values);
    `probabilities` turns its decision values into probabilities by a softmax (no Platt scaling:
    nothing is fitted on the training vectors twice, and nothing random)."""
    return make_pipeline(StandardScaler(), SVC(C=c, kernel="rbf", gamma="scale", random_state=seed))


CLASSIFIERS: dict[str, Callable[[float, int], Pipeline]] = {"logreg": logistic_regression, "svm": svm}


@dataclass(frozen=True)
class Fitted:
    """A classifier fitted on the training vectors: its chosen C, validation macro F1 per C
    tried, and class probabilities on the validation and test vectors ((N, C) each)."""

    c: float
    validation: dict[str, float]
    val_prob: np.ndarray
    test_prob: np.ndarray


def probabilities(model: Pipeline, x: np.ndarray, n_classes: int) -> np.ndarray:
    """(N, n_classes): the model's probabilities (an SVM's: the softmax of its one-vs-rest
    decision values), with 0 for a class the training split lacks."""
    out = np.zeros((len(x), n_classes))
    if hasattr(model, "predict_proba"):
        out[:, model.classes_] = model.predict_proba(x)
        return out
    scores = model.decision_function(x)
    if scores.ndim == 1:  # two classes: one decision value, for the second
        scores = np.stack([-scores, scores], axis=1) / 2
    scores = np.exp(scores - scores.max(axis=1, keepdims=True))
    out[:, model.classes_] = scores / scores.sum(axis=1, keepdims=True)
    return out


def fit_predict(
    kind: str,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    test_x: np.ndarray,
    n_classes: int,
    c_grid: Sequence[float],
    seed: int = 0,
) -> Fitted:
    """Fit ``kind`` (`CLASSIFIERS`) on ``train`` (vectors, labels) once per C of ``c_grid``; keep
    the C with the best macro F1 on ``val`` (the smallest C among equals: the most regularised),
    and its probabilities on the validation and test vectors. The test labels are never seen."""
    make = CLASSIFIERS[kind]
    validation: dict[str, float] = {}
    best: tuple[float, float, Any] | None = None
    for c in c_grid:
        with warnings.catch_warnings():  # a C too large to converge in max_iter is just a worse C
            warnings.simplefilter("ignore", ConvergenceWarning)
            model = make(float(c), seed).fit(*train)
        val_prob = probabilities(model, val[0], n_classes)
        score = f1_macro(val[1], val_prob)
        validation[f"{float(c):g}"] = score
        if best is None or score > best[1] or (score == best[1] and c < best[0]):
            best = (float(c), score, (model, val_prob))
    assert best is not None  # Settings refuses an empty grid
    c, _, (model, val_prob) = best
    return Fitted(c, validation, val_prob, probabilities(model, test_x, n_classes))

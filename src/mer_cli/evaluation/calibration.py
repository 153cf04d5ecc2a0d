"""Temperature scaling: one temperature T fitted on the validation split (never the test split)
so that softmax(logits / T) says "90 %" about as often as it is right.

Input: validation labels (N,) and the model's class probabilities (N, C) at T = 1; since
log-probabilities differ from logits by a constant per clip, softmax(log p / T) is exactly the
model's softmax(logits / T). Output: T (> 1 softens an overconfident model).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.optimize import minimize_scalar

from mer_cli.core.errors import ConfigError

CALIBRATIONS = ("none", "temperature")
T_RANGE = (0.05, 20.0)  # temperatures searched (in log space): far past any model's useful range


def check(calibration: str) -> str:
    if calibration not in CALIBRATIONS:
        raise ConfigError(f"eval.calibration={calibration!r}: valid: {', '.join(CALIBRATIONS)}")
    return calibration


def rescale(y_prob: np.ndarray, temperature: float) -> np.ndarray:
    """Class probabilities (N, C) as the same model would give them at ``temperature``."""
    z = np.log(np.clip(y_prob.astype(np.float64), 1e-300, None)) / temperature
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)


def nll(y_true: np.ndarray, y_prob: np.ndarray, class_weights: Sequence[float] | None = None) -> float:
    """Mean negative log-probability of the true class (floored at 1e-12): the training history's
    val/loss and what temperature scaling minimizes. ``class_weights`` (one per class): the
    weighted mean as torch's weighted cross-entropy takes it, sum_i w[y_i] nll_i / sum_i w[y_i]."""
    per_clip = -np.log(np.clip(y_prob[np.arange(len(y_true)), y_true], 1e-12, None))
    if class_weights is None:
        return float(per_clip.mean())
    w = np.asarray(class_weights, dtype=np.float64)[y_true]
    return float((w * per_clip).sum() / w.sum())


def fit_temperature(y_val: np.ndarray, prob_val: np.ndarray) -> float:
    """The temperature minimizing the validation NLL (bounded 1-D search over log T:
    deterministic). Only validation data goes in: the test split never sets its own calibration."""
    lo, hi = (math.log(t) for t in T_RANGE)
    best = minimize_scalar(
        lambda log_t: nll(y_val, rescale(prob_val, math.exp(log_t))),
        bounds=(lo, hi),
        method="bounded",
        options={"xatol": 1e-6},
    )
    return float(math.exp(best.x))

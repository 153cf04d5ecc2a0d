"""Late fusion: per-clip class probabilities (N, C) of each member model, combined by a
plain or weighted average or a stacking classifier (fitted on validation only).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression

from mer_cli.core.errors import ConfigError, MerError

# late fusion's combiners (``modality.combiner``); what weighted and stacking fit sees validation only
COMBINERS = ("mean", "weighted", "stacking")


WEIGHT_STEPS = 20  # weighted: member weights are multiples of 1/20 (0.05), as the old 2-member grid


STACKING_C = 1.0  # stacking: inverse L2 strength of the logistic regression (scikit-learn's default)


STACKING_SEED = 0


_MIN_PROB = 1e-7  # a fused true-class probability is floored here before its log


def weighted_average(probs: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """``sum_m weights[m] * probs[m]`` over the members' class probabilities (N, C), in member
    order; equal weights are the notebook's plain average. Python-float weights keep the
    members' dtype."""
    out = float(weights[0]) * probs[0]
    for w, p in zip(weights[1:], probs[1:], strict=True):
        out = out + float(w) * p
    return out


def simplex_grid(n_members: int, steps: int = WEIGHT_STEPS) -> np.ndarray:
    """Every weight vector (G, n_members) of non-negative multiples of ``1/steps`` summing to 1,
    the first member's weight ascending (for two members: (0, 1), (0.05, 0.95), ..., (1, 0))."""
    return np.array(list(_compositions(n_members, steps)), dtype=np.float64) / steps


def _compositions(n: int, total: int) -> Iterator[tuple[int, ...]]:
    if n == 1:
        yield (total,)
        return
    for k in range(total + 1):
        for rest in _compositions(n - 1, total - k):
            yield (k, *rest)


def fit_weights(probs: Sequence[np.ndarray], y_true: np.ndarray, steps: int = WEIGHT_STEPS) -> list[float]:
    """The member weights on the simplex grid (`simplex_grid`) whose weighted average has the
    lowest log loss on *validation* predictions (the first such on the grid: deterministic).

    Fitted on validation, never on test: the test split must not choose its own fusion.
    """
    grid = simplex_grid(len(probs), steps)
    # each member's probability of the true class (N, M); the fused one is linear in the weights
    true_prob = np.stack([p[np.arange(len(y_true)), y_true] for p in probs], axis=1).astype(np.float64)
    losses = -np.log(np.clip(true_prob @ grid.T, _MIN_PROB, 1.0)).mean(axis=0)
    return [float(w) for w in grid[int(np.argmin(losses))]]


@dataclass(frozen=True)
class Stacker:
    """A multinomial logistic regression on the members' concatenated class probabilities, kept
    as plain numbers (late.json), never as a pickled estimator."""

    inputs: tuple[str, ...]  # member names, in the order their probabilities are concatenated
    classes: tuple[int, ...]  # the class index of each row of ``coef`` (validation's classes)
    coef: np.ndarray  # (len(classes), len(inputs) * n_classes)
    intercept: np.ndarray  # (len(classes),)
    n_classes: int

    def predict_proba(self, probs: Mapping[str, np.ndarray]) -> np.ndarray:
        """Class probabilities (N, n_classes); a class validation lacked gets 0."""
        x = np.concatenate([probs[m] for m in self.inputs], axis=1).astype(np.float64)
        logits = x @ self.coef.T + self.intercept
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        out = np.zeros((len(x), self.n_classes))
        out[:, list(self.classes)] = e / e.sum(axis=1, keepdims=True)
        return out

    def state(self) -> dict[str, Any]:
        return {
            "model": "logistic_regression",
            "C": STACKING_C,
            "inputs": list(self.inputs),
            "classes": list(self.classes),
            "coef": self.coef.tolist(),
            "intercept": self.intercept.tolist(),
            "n_classes": self.n_classes,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Stacker:
        return cls(
            tuple(state["inputs"]),
            tuple(int(c) for c in state["classes"]),
            np.array(state["coef"], dtype=np.float64),
            np.array(state["intercept"], dtype=np.float64),
            int(state["n_classes"]),
        )


def fit_stacker(probs: Mapping[str, np.ndarray], y_true: np.ndarray, n_classes: int) -> Stacker:
    """Fit the stacking classifier on *validation* probabilities and labels (lbfgs: deterministic)."""
    inputs = tuple(probs)
    x = np.concatenate([probs[m] for m in inputs], axis=1).astype(np.float64)
    if len(np.unique(y_true)) < 2:
        raise MerError("late fusion: stacking needs at least two classes among the validation clips")
    lr = LogisticRegression(C=STACKING_C, max_iter=1000, random_state=STACKING_SEED).fit(x, y_true)
    coef, intercept = lr.coef_, lr.intercept_
    if coef.shape[0] == 1:  # two classes: scikit-learn keeps one row, p(second) = sigmoid(z)
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
    # through plain floats, as late.json holds them: training and mer-evaluate use the same numbers
    return Stacker.from_state(
        {
            "inputs": inputs,
            "classes": lr.classes_.tolist(),
            "coef": coef.tolist(),
            "intercept": intercept.tolist(),
            "n_classes": n_classes,
        }
    )


@dataclass(frozen=True)
class LateFusion:
    """How late fusion turns its members' class probabilities into one (fitted, if at all, on
    validation): ``mean`` and ``weighted`` average with ``weights``, ``stacking`` uses ``stacker``.
    ``temperature``: eval.calibration=temperature's, fitted on the fused validation probabilities
    (averaging members makes a fused model underconfident even when each member is calibrated);
    `combine` leaves it to the caller (runs.late.late_predictions, the exported graph)."""

    combiner: str
    members: tuple[str, ...]
    weights: tuple[float, ...] | None = None
    stacker: Stacker | None = None
    temperature: float = 1.0

    def combine(self, probs: Mapping[str, np.ndarray]) -> np.ndarray:
        if self.stacker is not None:
            return self.stacker.predict_proba(probs)
        assert self.weights is not None
        return weighted_average([probs[m] for m in self.members], self.weights)

    def state(self) -> dict[str, Any]:
        """What was chosen or fitted, as plain values (late.json, metrics.json)."""
        out: dict[str, Any] = {"combiner": self.combiner}
        if self.weights is not None:
            out["weights"] = dict(zip(self.members, self.weights, strict=True))
        if self.stacker is not None:
            out["stacker"] = self.stacker.state()
        if self.temperature != 1.0:  # calibrated: an uncalibrated run's late.json stays as it was
            out["temperature"] = self.temperature
        return out

    @classmethod
    def from_state(cls, state: Mapping[str, Any], members: Sequence[str]) -> LateFusion:
        weights = state.get("weights")
        stacker = state.get("stacker")
        temperature = float(state.get("temperature", 1.0))
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature {temperature} is not a positive number")
        return cls(
            str(state["combiner"]),
            tuple(members),
            tuple(float(weights[m]) for m in members) if weights is not None else None,
            Stacker.from_state(stacker) if stacker is not None else None,
            temperature,
        )


def fit_late(
    combiner: str,
    val_probs: Mapping[str, np.ndarray],
    y_val: np.ndarray,
    n_classes: int,
    weights: Mapping[str, float] | None = None,
) -> LateFusion:
    """The late fusion ``combiner`` of the members ``val_probs`` (name -> validation class
    probabilities (N, C)); its arguments are validation data only, so the test split can never
    choose its own fusion. ``weights``: mean's fixed weight per member (None: equal)."""
    members = tuple(val_probs)
    if combiner == "mean":
        chosen = tuple(weights[m] for m in members) if weights else (1.0 / len(members),) * len(members)
        return LateFusion(combiner, members, weights=chosen)
    if combiner == "weighted":
        fitted = fit_weights([val_probs[m] for m in members], y_val)
        return LateFusion(combiner, members, weights=tuple(fitted))
    if combiner == "stacking":
        return LateFusion(combiner, members, stacker=fit_stacker(val_probs, y_val, n_classes))
    raise ConfigError(f"modality.combiner={combiner!r}: valid: {', '.join(COMBINERS)}")

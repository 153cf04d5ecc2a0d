"""Uncertainty and significance for the comparison report: bootstrap intervals, seed spread, tests.

Input: per run, the test split's true and predicted labels (and, when clip ids carry one, the actor
of each clip). Output: plain numbers: confidence intervals, mean/std across seeds, p-values.

Clips of one actor are not independent (same voice, same face), so when actor ids are known the
bootstrap resamples actors (cluster bootstrap) and takes all their clips; else it resamples clips.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

from mer_cli.evaluation.metrics import METRICS

# label-based metrics the bootstrap recomputes (same definitions as evaluate.score / scikit-learn)
# the metrics computed from predicted labels alone: resampled by the bootstrap (the registry says which)
BOOTSTRAP_METRICS = tuple(name for name, m in METRICS.items() if m.from_labels)
EXACT_MCNEMAR_BELOW = 25  # discordant pairs; below this the exact binomial test is used


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(C, C) counts, rows = true class, columns = predicted class."""
    return np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes).reshape(
        n_classes, n_classes
    )


def f1_macro(cm: np.ndarray) -> float:
    # a class never true nor predicted scores 0, as scikit-learn with zero_division=0
    tp = np.diag(cm).astype(float)
    denom = cm.sum(axis=0) + cm.sum(axis=1)  # 2 tp + fp + fn
    return float(np.mean(np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)))


def accuracy(cm: np.ndarray) -> float:
    return float(np.trace(cm) / cm.sum())


def balanced_accuracy(cm: np.ndarray) -> float:
    # mean recall over the classes present in y_true (scikit-learn skips absent ones)
    support = cm.sum(axis=1)
    present = support > 0
    return float(np.mean(np.diag(cm)[present] / support[present]))


METRIC_FROM_CONFUSION: dict[str, Callable[[np.ndarray], float]] = {
    "f1_macro": f1_macro,
    "accuracy": accuracy,
    "balanced_accuracy": balanced_accuracy,
}


def f1_macro_batched(cms: np.ndarray) -> np.ndarray:
    """`f1_macro` of every matrix in a stack (..., C, C)."""
    tp = np.diagonal(cms, axis1=-2, axis2=-1).astype(float)
    denom = cms.sum(axis=-2) + cms.sum(axis=-1)
    return np.mean(np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0), axis=-1)


def accuracy_batched(cms: np.ndarray) -> np.ndarray:
    return np.trace(cms, axis1=-2, axis2=-1) / cms.sum(axis=(-2, -1))


def balanced_accuracy_batched(cms: np.ndarray) -> np.ndarray:
    support = cms.sum(axis=-1)
    present = support > 0
    recall = np.divide(
        np.diagonal(cms, axis1=-2, axis2=-1), support, out=np.zeros(support.shape), where=present
    )
    return recall.sum(axis=-1) / present.sum(axis=-1)


# the same metrics over a stack of confusion matrices (bootstrap draws x runs), one call each
METRIC_FROM_CONFUSIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "f1_macro": f1_macro_batched,
    "accuracy": accuracy_batched,
    "balanced_accuracy": balanced_accuracy_batched,
}


@dataclass(frozen=True)
class Sample:
    """One run's test predictions, the unit the bootstrap works on.

    ``test_key`` names the set of test clips: samples with the same key (seeds of one model, or two
    models on the same split) share each bootstrap resample; different keys (CV folds) resample
    independently.
    """

    y_true: np.ndarray  # (N,) int
    y_pred: np.ndarray  # (N,) int
    groups: np.ndarray | None  # (N,) actor id per clip; None: clips are independent units
    test_key: str


class _Resampler:
    """Draws one index array per distinct test set and bootstrap iteration (shared across runs)."""

    def __init__(self, samples: Sequence[Sample], rng: np.random.Generator) -> None:
        self.rng = rng
        self.shape: dict[str, tuple[np.ndarray | None, int]] = {}
        for s in samples:
            self.shape.setdefault(s.test_key, (s.groups, len(s.y_true)))
        self.groups = {
            k: (_cluster_members(g) if g is not None else None) for k, (g, _) in self.shape.items()
        }

    def draw(self) -> dict[str, np.ndarray]:
        out = {}
        for key, (_, n) in self.shape.items():
            members = self.groups[key]
            if members is None:
                out[key] = self.rng.integers(0, n, size=n)
            else:
                picked = self.rng.integers(0, len(members), size=len(members))
                out[key] = np.concatenate([members[a] for a in picked])
        return out


def _cluster_members(groups: np.ndarray) -> list[np.ndarray]:
    _, inverse = np.unique(groups, return_inverse=True)
    return [np.flatnonzero(inverse == a) for a in range(int(inverse.max()) + 1)]


def point(sample: Sample, n_classes: int, metric: str) -> float:
    return METRIC_FROM_CONFUSION[metric](confusion(sample.y_true, sample.y_pred, n_classes))


def bootstrap(
    samples: Sequence[Sample], n_classes: int, metrics: Sequence[str], n_boot: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """Bootstrap distribution (n_boot,) of the mean of each metric over ``samples`` (the runs).

    Two levels when there are several runs: runs are drawn with replacement (seed-to-seed
    variation), then each test set is resampled by actor or clip (test-sample variation).
    """
    rng = np.random.default_rng(seed)
    resampler = _Resampler(samples, rng)
    picked = np.zeros((n_boot, len(samples)), dtype=np.int64)  # the runs draw b picks
    draws = []
    for b in range(n_boot):
        if len(samples) > 1:
            picked[b] = rng.integers(0, len(samples), size=len(samples))
        draws.append(resampler.draw())
    chosen = _counts(picked, len(samples))
    stacked = {key: _stack(draws, key) for key in resampler.shape}
    out = {}
    # every run's confusion matrix on every draw at once: (n_boot, runs, C, C)
    cms = np.stack([_confusions(s, stacked[s.test_key], n_classes) for s in samples], axis=1)
    for m in metrics:
        values = METRIC_FROM_CONFUSIONS[m](cms)  # (n_boot, runs)
        out[m] = np.sum(values * chosen, axis=1) / len(samples)
    return out


def _counts(picked: np.ndarray, n: int) -> np.ndarray:
    """(draws, n): how often each row of ``picked`` (draws, n) holds each of 0 .. n-1."""
    return (picked[:, :, None] == np.arange(n)).sum(axis=1).astype(float)


def _stack(draws: Sequence[dict[str, np.ndarray]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Test set ``key``'s resamples (index arrays of any length) end to end, and the draw each
    index belongs to."""
    parts = [d[key] for d in draws]
    return np.concatenate(parts), np.repeat(np.arange(len(parts)), [len(p) for p in parts])


def _confusions(sample: Sample, stacked: tuple[np.ndarray, np.ndarray], n_classes: int) -> np.ndarray:
    """(draws, C, C): ``sample``'s confusion matrix on each resample (`_stack`), counted in one
    ``bincount`` with the draw number as the leading digit."""
    idx, draw_of = stacked
    n_draws = int(draw_of[-1]) + 1 if len(draw_of) else 0
    cell = sample.y_true * n_classes + sample.y_pred  # each clip's cell in one matrix
    codes = draw_of * (n_classes * n_classes) + cell[idx]
    counts = np.bincount(codes, minlength=n_draws * n_classes * n_classes)
    return counts.reshape(n_draws, n_classes, n_classes)


def interval(draws: np.ndarray, confidence: float) -> tuple[float, float]:
    """Percentile interval of a bootstrap distribution."""
    tail = (1.0 - confidence) / 2 * 100
    lo, hi = np.percentile(draws, [tail, 100 - tail])
    return float(lo), float(hi)


@dataclass(frozen=True)
class Spread:
    """Mean and spread of one metric across runs (seeds or folds)."""

    mean: float
    std: float | None  # sample standard deviation (ddof=1); None for a single run
    ci: tuple[float, float] | None  # t-interval of the mean across runs; None for a single run
    n: int


def spread(values: Sequence[float | None], confidence: float) -> Spread:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if len(v) == 0:
        return Spread(math.nan, None, None, 0)
    if len(v) == 1:
        return Spread(float(v[0]), None, None, 1)
    mean, std = float(v.mean()), float(v.std(ddof=1))
    half = float(sps.t.ppf(0.5 + confidence / 2, df=len(v) - 1)) * std / math.sqrt(len(v))
    return Spread(mean, std, (mean - half, mean + half), len(v))


@dataclass(frozen=True)
class McNemar:
    """McNemar's test on paired correctness: b = only A right, c = only B right."""

    b: int
    c: int
    statistic: float | None  # chi-square with continuity correction; None for the exact test
    p_value: float
    method: str  # "exact" (binomial, b + c < 25) or "chi2" (1 dof, continuity-corrected)


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> McNemar:
    """Paired test of two classifiers on the same clips (boolean arrays, one entry per clip)."""
    if correct_a.shape != correct_b.shape:
        raise ValueError("McNemar needs both models' results on the same clips")
    b = int(np.sum(correct_a & ~correct_b))
    c = int(np.sum(~correct_a & correct_b))
    if b + c == 0:
        return McNemar(b, c, None, 1.0, "exact")
    if b + c < EXACT_MCNEMAR_BELOW:
        return McNemar(b, c, None, float(sps.binomtest(b, b + c, 0.5).pvalue), "exact")
    statistic = (abs(b - c) - 1) ** 2 / (b + c)
    return McNemar(b, c, float(statistic), float(sps.chi2.sf(statistic, df=1)), "chi2")


@dataclass(frozen=True)
class PairedDifference:
    """Mean difference A - B of a metric over matched runs, its bootstrap interval and p-value."""

    diff: float
    ci: tuple[float, float]
    p_value: float


def paired_bootstrap(
    pairs: Sequence[tuple[Sample, Sample]],
    n_classes: int,
    metric: str,
    n_boot: int,
    confidence: float,
    seed: int = 0,
) -> PairedDifference:
    """Paired bootstrap of ``metric(A) - metric(B)``; both samples of a pair are on the same clips.

    Each iteration draws matched pairs (seeds) with replacement and one resample (actors or clips)
    per test set, applied to both models. Two-sided p-value: twice the smaller share of draws on
    either side of zero (add-one smoothed, at most 1), so never below `p_floor` (n_boot).
    """
    rng = np.random.default_rng(seed)
    a_samples = [a for a, _ in pairs]
    resampler = _Resampler(a_samples, rng)
    observed = float(np.mean([point(a, n_classes, metric) - point(b, n_classes, metric) for a, b in pairs]))
    picked = np.zeros((n_boot, len(pairs)), dtype=np.int64)  # the matched pairs draw k picks
    index_draws = []
    for k in range(n_boot):
        if len(pairs) > 1:
            picked[k] = rng.integers(0, len(pairs), size=len(pairs))
        index_draws.append(resampler.draw())
    chosen = _counts(picked, len(pairs))
    stacked = {key: _stack(index_draws, key) for key in resampler.shape}
    fn = METRIC_FROM_CONFUSIONS[metric]
    # both models of a pair on the same resampled clips: (n_boot,) differences per pair
    diffs = np.stack(
        [
            fn(_confusions(a, stacked[a.test_key], n_classes))
            - fn(_confusions(b, stacked[a.test_key], n_classes))
            for a, b in pairs
        ],
        axis=1,
    )
    draws = np.sum(diffs * chosen, axis=1) / len(pairs)
    below = (np.sum(draws <= 0) + 1) / (n_boot + 1)
    above = (np.sum(draws >= 0) + 1) / (n_boot + 1)
    return PairedDifference(observed, interval(draws, confidence), float(min(1.0, 2 * min(below, above))))


def p_floor(n_boot: int) -> float:
    """The smallest p-value `paired_bootstrap` can return with ``n_boot`` draws: 2 / (n_boot + 1).

    A p at this floor means no draw fell on the other side of zero; the data may support a smaller
    one, which only more draws can show. Holm's adjustment over m tests multiplies it by m.
    """
    return 2.0 / (n_boot + 1)


def format_p(p: float, floor: float | None = None) -> str:
    """A p-value for people: "0.034", "< 0.001", or "≤ 0.012" when ``p`` is at its ``floor``.

    ``floor``: the smallest value the test can return (`p_floor`, times the Holm factor), None for
    a test without one. At the floor the true p is only known to be at most that value, so it is
    written as a bound (rounded up to two significant digits, which keeps the bound true).
    """
    if floor is not None and p <= floor * (1 + 1e-9):
        return f"≤ {round_up(min(1.0, floor))}"
    return f"{p:.3f}" if p >= 0.001 else "< 0.001"


def round_up(x: float, digits: int = 2) -> str:
    """``x`` rounded up to ``digits`` significant digits: 0.011988 -> "0.012", 0.001998 -> "0.002"."""
    decimals = digits - 1 - math.floor(math.log10(x))
    up = math.ceil(x * 10.0**decimals - 1e-9) / 10.0**decimals
    if up < 1e-4:
        return f"{up:.{digits - 1}e}"
    return f"{up:.{max(0, decimals)}f}".rstrip("0").rstrip(".") if decimals > 0 else f"{up:.0f}"


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (same order as given): controls the family-wise error."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def majority_scores(y_true: np.ndarray, n_classes: int) -> dict[str, float]:
    """What always predicting the test split's most frequent class scores on each metric."""
    majority = int(np.bincount(y_true, minlength=n_classes).argmax())
    cm = confusion(y_true, np.full_like(y_true, majority), n_classes)
    return {m: fn(cm) for m, fn in METRIC_FROM_CONFUSION.items()}

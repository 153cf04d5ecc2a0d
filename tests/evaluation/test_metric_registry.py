"""Each metric has one definition (the registry); the bootstrap's confusion-matrix forms and
metrics.json agree with it and with scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

from mer_cli.evaluation import metrics, stats

SKLEARN = {
    "f1_macro": lambda y, p: f1_score(y, p, labels=list(range(6)), average="macro", zero_division=0),
    "accuracy": accuracy_score,
    "balanced_accuracy": balanced_accuracy_score,
}


def _predictions(seed: int, n: int = 200, absent: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 6, size=n)
    if absent is not None:  # a class with no test clip: F1 counts it as 0, balanced accuracy skips it
        y_true[y_true == absent] = (absent + 1) % 6
    logits = rng.normal(size=(n, 6)) + 1.5 * np.eye(6)[y_true]
    prob = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y_true, prob


@pytest.mark.parametrize("absent", [None, 2])
@pytest.mark.parametrize("name", stats.BOOTSTRAP_METRICS)
def test_every_form_of_a_label_metric_gives_scikit_learns_value(name, absent):
    y_true, prob = _predictions(3, absent=absent)
    y_pred = prob.argmax(axis=1)
    reference = float(SKLEARN[name](y_true, y_pred))
    cm = stats.confusion(y_true, y_pred, 6)
    assert metrics.METRICS.get(name).compute(y_true, prob) == pytest.approx(reference, abs=1e-12)
    assert stats.METRIC_FROM_CONFUSION[name](cm) == pytest.approx(reference, abs=1e-12)
    assert float(stats.METRIC_FROM_CONFUSIONS[name](cm[None])[0]) == pytest.approx(reference, abs=1e-12)
    assert metrics.score(y_true, prob, [f"c{i}" for i in range(6)])[name] == reference


def test_the_bootstrap_resamples_exactly_the_label_metrics():
    assert stats.BOOTSTRAP_METRICS == ("f1_macro", "accuracy", "balanced_accuracy")
    assert set(stats.METRIC_FROM_CONFUSIONS) == set(stats.BOOTSTRAP_METRICS)
    assert metrics.BARS == stats.BOOTSTRAP_METRICS  # the bar charts show what has an interval


def test_an_unknown_metric_is_one_line_listing_the_valid_ones():
    with pytest.raises(Exception, match=r"metric='f1': valid: f1_macro, accuracy, balanced_accuracy"):
        metrics.METRICS.get("f1")

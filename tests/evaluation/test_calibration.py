"""Calibration metrics of every split: ECE (equal-width and equal-count bins), Brier score, NLL,
checked against a hand-computed example and a plain reimplementation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import brier_score_loss, log_loss

from conftest import run_cli
from mer_cli.evaluation import calibration, metrics
from mer_cli.runs.outputs import read_predictions


def test_ece_of_a_hand_computed_example():
    # confidences 0.9 (right), 0.9 (wrong), 0.6 (right), 0.6 (wrong); of 15 bins of width 1/15,
    # 0.9 falls in (0.867, 0.933] and 0.6 in (0.533, 0.6]: each bin has accuracy 0.5, so the gaps
    # are |0.5 - 0.9| = 0.4 and |0.5 - 0.6| = 0.1, each bin holding half the clips
    y_prob = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.6, 0.4]])
    y_true = np.array([0, 1, 1, 1])
    assert metrics.ece(y_true, y_prob) == pytest.approx(2 / 4 * 0.4 + 2 / 4 * 0.1)
    # two equal-count bins hold the same pairs here
    assert metrics.ece_adaptive(y_true, y_prob, n_bins=2) == pytest.approx(0.25)


def _reference_ece(y_true: np.ndarray, y_prob: np.ndarray, n_bins: int) -> float:
    total = 0.0
    for lo, hi in zip(np.linspace(0, 1, n_bins + 1)[:-1], np.linspace(0, 1, n_bins + 1)[1:], strict=True):
        conf = y_prob.max(axis=1)
        inside = (conf > lo) & (conf <= hi) if lo > 0 else (conf >= lo) & (conf <= hi)
        if inside.any():
            acc = (y_prob.argmax(axis=1)[inside] == y_true[inside]).mean()
            total += inside.mean() * abs(acc - conf[inside].mean())
    return total


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ece_matches_a_plain_loop_over_bins_and_brier_and_nll_match_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 6, size=300)
    logits = rng.normal(size=(300, 6)) * 2 + 2 * np.eye(6)[y_true]
    y_prob = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert metrics.ece(y_true, y_prob) == pytest.approx(_reference_ece(y_true, y_prob, 15), abs=1e-12)
    onehot = np.eye(6)[y_true]
    per_class = sum(brier_score_loss(onehot[:, c], y_prob[:, c]) for c in range(6))
    assert metrics.brier(y_true, y_prob) == pytest.approx(per_class, abs=1e-12)
    assert metrics.METRICS.get("nll").compute(y_true, y_prob) == pytest.approx(
        log_loss(y_true, y_prob, labels=list(range(6)))
    )


def test_a_calibrated_model_scores_a_lower_ece_than_an_overconfident_one():
    rng = np.random.default_rng(5)
    n = 4000
    conf = rng.uniform(0.5, 1.0, size=n)
    right = rng.random(n) < conf  # right exactly as often as it says
    y_pred = np.zeros(n, dtype=int)
    y_true = np.where(right, 0, 1)
    calibrated = np.stack([conf, 1 - conf], axis=1)
    overconfident = np.stack([np.full(n, 0.99), np.full(n, 0.01)], axis=1)
    assert (calibrated.argmax(1) == y_pred).all()
    assert metrics.ece(y_true, calibrated) < 0.03 < metrics.ece(y_true, overconfident)


def test_every_split_of_metrics_json_has_the_calibration_metrics():
    y_true = np.array([0, 1, 2, 1])
    y_prob = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8], [0.6, 0.3, 0.1]])
    scored = metrics.score(y_true, y_prob, ["a", "b", "c"])
    assert {"ece", "ece_adaptive", "brier", "nll"} <= set(scored)
    assert scored["nll"] == scored["loss"]


def test_temperature_scaling_of_an_overconfident_model_lowers_its_nll_and_keeps_its_labels():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, size=500)
    logits = 6.0 * (rng.normal(size=(500, 4)) + 0.8 * np.eye(4)[y])  # right often, far too sure
    prob = np.exp(logits - logits.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    t = calibration.fit_temperature(y, prob)
    scaled = calibration.rescale(prob, t)
    assert t > 1.5  # softened
    assert calibration.nll(y, scaled) < calibration.nll(y, prob)
    assert (scaled.argmax(1) == prob.argmax(1)).all()  # accuracy and F1 unchanged
    np.testing.assert_allclose(calibration.rescale(prob, 1.0), prob, atol=1e-12)


@pytest.mark.slow
def test_eval_calibration_temperature_is_fitted_on_validation_and_applied_to_test_and_evaluate(tmp_path):
    common = ("experiment=smoke", "modality=acoustic", "trainer.loop.max_epochs=4", "seed=3")
    raw, cal = tmp_path / "raw", tmp_path / "cal"
    for run, extra in ((raw, ()), (cal, ("eval.calibration=temperature",))):
        proc = run_cli("train", *common, *extra, f"hydra.run.dir={run}")
        assert proc.returncode == 0, proc.stderr
    temperature = json.loads((cal / "calibration.json").read_text())["temperature"]
    metrics = json.loads((cal / "metrics.json").read_text())
    assert metrics["run"]["temperature"] == temperature
    assert json.loads((raw / "metrics.json").read_text())["run"]["temperature"] is None
    # the same weights (same seed and config): the temperature is what the raw run's validation
    # probabilities call for, and the test probabilities are the raw ones rescaled by it
    raw_val, raw_test = (read_predictions(raw / "predictions.csv", s) for s in ("val", "test"))
    assert temperature == pytest.approx(calibration.fit_temperature(raw_val.y_true, raw_val.y_prob), rel=1e-3)
    cal_test = read_predictions(cal / "predictions.csv", "test")
    np.testing.assert_allclose(cal_test.y_prob, calibration.rescale(raw_test.y_prob, temperature), atol=2e-6)
    proc = run_cli("evaluate", str(cal), "--no-plots")
    assert proc.returncode == 0, proc.stderr
    (again,) = (cal / "evaluations").iterdir()
    assert json.loads((again / "metrics.json").read_text())["test"] == metrics["test"]


@pytest.mark.parametrize("seed", [0, 1])
def test_reliability_bins_match_scikit_learns_calibration_curve(seed):
    from sklearn.calibration import calibration_curve

    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(500, 6)) * 2
    y_true = rng.integers(0, 6, 500)
    y_prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    r = metrics.reliability(y_true, y_prob, n_bins=10)
    correct = (y_prob.argmax(1) == y_true).astype(int)
    accuracy, confidence = calibration_curve(correct, y_prob.max(1), n_bins=10, strategy="uniform")
    filled = r.counts > 0
    np.testing.assert_allclose(r.accuracy[filled], accuracy, atol=1e-12)
    np.testing.assert_allclose(r.confidence[filled], confidence, atol=1e-12)
    assert r.counts.sum() == 500
    # ECE is the count-weighted gap of these same bins
    gap = np.nansum(r.counts * np.abs(r.accuracy - r.confidence)) / 500
    assert metrics.ece(y_true, y_prob, n_bins=10) == pytest.approx(gap)

"""Late fusion's combiners on hand-made probabilities with a known answer, and the proof that what
they fit sees validation only."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from mer_cli.core.errors import ConfigError
from mer_cli.evaluation import calibration
from mer_cli.models.fusion import late as late_fusion
from mer_cli.runs import upgrade
from mer_cli.runs.late import fuse_and_report, late_predictions, late_weights
from mer_cli.runs.outputs import Predictions

N_CLASSES = 4


def informative(y: np.ndarray, rng: np.random.Generator, strength: float = 2.0) -> np.ndarray:
    """Class probabilities (N, C) that lean towards the true class, with noise."""
    logits = strength * np.eye(N_CLASSES)[y] + rng.standard_normal((len(y), N_CLASSES))
    e = np.exp(logits)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def noise(n: int, rng: np.random.Generator) -> np.ndarray:
    """Class probabilities that know nothing about the clip."""
    return rng.dirichlet(np.ones(N_CLASSES), size=n).astype(np.float32)


def test_mean_is_the_notebooks_plain_average_to_the_bit():
    rng = np.random.default_rng(0)
    a, v = noise(50, rng), noise(50, rng)
    fused = late_fusion.fit_late(
        "mean", {"acoustic": a, "visual": v}, np.zeros(50, dtype=np.int64), N_CLASSES
    )
    assert fused.weights == (0.5, 0.5)
    out = fused.combine({"acoustic": a, "visual": v})
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, 0.5 * a + (1.0 - 0.5) * v)  # the formula before combiners
    np.testing.assert_array_equal(out, (a + v) / 2)


def test_simplex_grid_is_the_old_two_member_grid_and_covers_n_members():
    np.testing.assert_allclose(late_fusion.simplex_grid(2)[:, 0], np.linspace(0.0, 1.0, 21))
    three = late_fusion.simplex_grid(3)
    assert three.shape == (231, 3)  # C(22, 2) ways to split 20 steps among 3 members
    np.testing.assert_allclose(three.sum(axis=1), 1.0)
    assert three.min() == 0.0


def test_weighted_gives_a_member_of_pure_noise_no_weight():
    rng = np.random.default_rng(1)
    y = rng.integers(0, N_CLASSES, 400)
    probs = [informative(y, rng, 3.0), noise(len(y), rng), informative(y, rng, 3.0)]
    weights = late_fusion.fit_weights(probs, y)
    assert sum(weights) == pytest.approx(1.0)
    assert weights[1] == 0.0
    assert min(weights[0], weights[2]) > 0.0  # two informative members with their own errors: both help
    # a member that knows the answer takes all the weight
    perfect = np.eye(N_CLASSES)[y]
    assert late_fusion.fit_weights([probs[1], perfect], y) == [0.0, 1.0]


def test_stacking_recovers_a_known_linear_rule_that_no_average_can():
    rng = np.random.default_rng(2)
    swap = np.array([1, 0, 3, 2])  # the acoustic model always names the class paired with the true one

    def members(n):
        y = rng.integers(0, N_CLASSES, n)
        return y, {"acoustic": informative(swap[y], rng, strength=3.0), "visual": noise(n, rng)}

    y_val, val = members(300)
    y_test, test = members(300)
    stacked = late_fusion.fit_late("stacking", val, y_val, N_CLASSES)
    assert np.mean(stacked.combine(test).argmax(axis=1) == y_test) > 0.9
    weighted = late_fusion.fit_late("weighted", val, y_val, N_CLASSES)
    assert np.mean(weighted.combine(test).argmax(axis=1) == y_test) < 0.3
    coef = np.asarray(stacked.stacker.coef)[:, :N_CLASSES]  # rows: classes; columns: acoustic's
    np.testing.assert_array_equal(coef.argmax(axis=1), swap)  # class c is read off acoustic's swap[c]


@pytest.mark.parametrize("n_classes", [2, 3])
def test_the_stackers_plain_numbers_predict_as_scikit_learn_does(n_classes):
    rng = np.random.default_rng(3)
    y = rng.integers(0, n_classes, 60)
    probs = {m: rng.dirichlet(np.ones(n_classes), 60) for m in ("acoustic", "visual")}
    stacker = late_fusion.fit_stacker(probs, y, n_classes)
    x = np.concatenate(list(probs.values()), axis=1)
    lr = LogisticRegression(C=late_fusion.STACKING_C, max_iter=1000, random_state=0).fit(x, y)
    np.testing.assert_allclose(stacker.predict_proba(probs), lr.predict_proba(x), rtol=0, atol=1e-12)
    again = late_fusion.Stacker.from_state(json.loads(json.dumps(stacker.state())))
    np.testing.assert_array_equal(again.predict_proba(probs), stacker.predict_proba(probs))


def test_a_class_validation_never_saw_gets_probability_zero_from_the_stacker():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, 80)  # class 3 absent
    probs = {"a": noise(80, rng), "b": noise(80, rng)}
    out = late_fusion.fit_stacker(probs, y, N_CLASSES).predict_proba(probs)
    assert out.shape == (80, N_CLASSES)
    np.testing.assert_array_equal(out[:, 3], 0.0)
    np.testing.assert_allclose(out.sum(axis=1), 1.0)


# ---------------------------------------------------------------------------------------------
# Through the pipeline: late.json holds what was fitted, from validation alone


def _members(seed: int = 5, n: int = 120) -> dict[str, dict[str, Predictions]]:
    rng = np.random.default_rng(seed)
    y = {s: rng.integers(0, N_CLASSES, n) for s in ("val", "test")}
    strengths = {"acoustic": 1.0, "visual": 2.0}
    return {
        m: {
            s: Predictions(s, tuple(f"{s}{i}" for i in range(n)), y[s], informative(y[s], rng, k))
            for s in ("val", "test")
        }
        for m, k in strengths.items()
    }


def _relabel(members, split, y):
    return {
        m: {s: (Predictions(s, p.clip_ids, y, p.y_prob) if s == split else p) for s, p in by_split.items()}
        for m, by_split in members.items()
    }


def _fitted(tmp_path, name, combiner, members):
    out = tmp_path / name
    fuse_and_report(
        combiner, None, members, {m: m for m in members}, ("a", "b", "c", "d"), out, 0, "hand-made", False
    )
    late = json.loads((out / "late.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    return late, metrics


@pytest.mark.parametrize("combiner", ["weighted", "stacking"])
def test_what_late_fusion_fits_depends_on_validation_labels_never_on_test_labels(tmp_path, combiner):
    members = _members()
    rng = np.random.default_rng(6)
    late, metrics = _fitted(tmp_path, "base", combiner, members)
    assert late["format"] == upgrade.LATE_FORMAT and late["combiner"] == combiner
    assert metrics["run"]["combiner"] == combiner

    n = len(members["acoustic"]["test"].y_true)
    test_relabelled = _relabel(members, "test", rng.integers(0, N_CLASSES, n))
    late_t, metrics_t = _fitted(tmp_path, "test_labels", combiner, test_relabelled)
    assert late_t == late  # weights or coefficients: identical to the bit
    assert metrics_t["test"] != metrics["test"]  # the test scores did see the new labels

    # validation labels that follow the weaker (acoustic) member: what is fitted moves
    val_relabelled = _relabel(members, "val", members["acoustic"]["val"].y_prob.argmax(axis=1))
    late_v, _ = _fitted(tmp_path, "val_labels", combiner, val_relabelled)
    if combiner == "weighted":
        assert late_v["weights"]["acoustic"] > late["weights"]["acoustic"]
        assert metrics["run"]["weights"] == late["weights"]
    else:
        assert late_v["stacker"]["coef"] != late["stacker"]["coef"]
        assert "stacker" not in metrics["run"]  # its coefficients are in late.json only


@pytest.mark.parametrize("combiner", ["mean", "weighted", "stacking"])
def test_late_json_reproduces_the_fused_predictions(tmp_path, combiner):
    members = _members(seed=7)
    late, _ = _fitted(tmp_path, "run", combiner, members)
    combined = upgrade.late_json(late, tmp_path / "late.json")
    (test,) = late_predictions(members, combined, ("test",))
    written = np.loadtxt(
        tmp_path / "run" / "predictions.csv", delimiter=",", skiprows=1, usecols=(4, 5, 6, 7)
    )
    np.testing.assert_allclose(written[-len(test.y_true) :], test.y_prob, atol=1e-6)


def test_late_json_format_1_is_read_as_a_mean_with_its_acoustic_weight(tmp_path):
    old = {"format": 1, "acoustic_weight": 0.25, "members": {"acoustic": "acoustic", "visual": "visual"}}
    combined = upgrade.late_json(old, tmp_path / "late.json")
    assert (combined.combiner, combined.members, combined.weights) == (
        "mean",
        ("acoustic", "visual"),
        (0.25, 0.75),
    )


@pytest.mark.parametrize(
    ("combiner", "acoustic_weight", "message"),
    [
        ("mean", "fit", "modality.acoustic_weight=fit is now modality.combiner=weighted"),
        ("stacking", 0.3, "fixed weights are for modality.combiner=mean"),
        ("mean", 1.5, "modality.acoustic_weight=1.5: must be in [0, 1]"),
        ("median", None, "modality.combiner='median': valid: mean, weighted, stacking"),
    ],
)
def test_late_fusion_settings_that_make_no_sense_are_one_error_line(combiner, acoustic_weight, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        late_weights(combiner, acoustic_weight)


def test_a_fixed_acoustic_weight_is_the_means_first_member_weight():
    assert late_weights("mean", 0.3) == {"acoustic": 0.3, "visual": 0.7}
    assert late_weights("mean", None) is None


def test_eval_calibration_temperature_gives_the_fused_model_its_own_temperature_from_validation(tmp_path):
    members = _members(seed=3)
    args = ("mean", None, members, {m: m for m in members}, ("a", "b", "c", "d"))
    fuse_and_report(*args, tmp_path / "raw", 0, "hand-made", None, False)
    fuse_and_report(*args, tmp_path / "cal", 0, "hand-made", None, False, calibration_method="temperature")
    raw_late = json.loads((tmp_path / "raw" / "late.json").read_text())
    late = json.loads((tmp_path / "cal" / "late.json").read_text())
    assert "temperature" not in raw_late  # an uncalibrated run's late.json is as before
    # its metrics.json says so as a single model's does: null
    assert json.loads((tmp_path / "raw" / "metrics.json").read_text())["run"]["temperature"] is None
    t = late["temperature"]
    metrics = json.loads((tmp_path / "cal" / "metrics.json").read_text())
    assert metrics["run"]["temperature"] == t
    # the temperature is the one that minimises the fused validation NLL, computed here by hand
    fused_val = (members["acoustic"]["val"].y_prob + members["visual"]["val"].y_prob) / 2
    y_val = members["acoustic"]["val"].y_true
    assert t == pytest.approx(calibration.fit_temperature(y_val, fused_val))
    assert calibration.nll(y_val, calibration.rescale(fused_val, t)) < calibration.nll(y_val, fused_val)
    # and it is applied to test, read back from late.json by everything that re-scores the run
    fused_test = (members["acoustic"]["test"].y_prob + members["visual"]["test"].y_prob) / 2
    (test,) = late_predictions(members, upgrade.late_json(late, tmp_path / "late.json"), ("test",))
    np.testing.assert_allclose(test.y_prob, calibration.rescale(fused_test, t), atol=1e-12)
    assert (test.y_prob.argmax(1) == fused_test.argmax(1)).all()  # calibration never changes a label
    # test labels play no part in it
    relabelled = _relabel(members, "test", np.zeros_like(members["acoustic"]["test"].y_true))
    fuse_and_report(
        "mean",
        None,
        relabelled,
        {m: m for m in members},
        ("a", "b", "c", "d"),
        tmp_path / "cal2",
        0,
        "hand-made",
        None,
        False,
        calibration_method="temperature",
    )
    assert json.loads((tmp_path / "cal2" / "late.json").read_text())["temperature"] == t

import math

import numpy as np

from mer_cli.evaluation.metrics import pr_curves, roc_curves, score

NAMES = ("a", "b", "c")


def test_metrics_on_a_hand_computed_case():
    y_true = np.array([0, 0, 1, 1, 2, 2])
    # predictions: 0, 1, 1, 1, 2, 0  -> class 0: P 1/2 R 1/2; class 1: P 2/3 R 1; class 2: P 1 R 1/2
    y_prob = np.array(
        [
            [0.8, 0.1, 0.1],
            [0.2, 0.7, 0.1],
            [0.1, 0.8, 0.1],
            [0.3, 0.6, 0.1],
            [0.1, 0.1, 0.8],
            [0.5, 0.2, 0.3],
        ]
    )
    m = score(y_true, y_prob, NAMES)
    f1 = [0.5, 2 * (2 / 3) / (2 / 3 + 1), 2 * 0.5 / 1.5]
    assert math.isclose(m["f1_macro"], sum(f1) / 3)
    assert math.isclose(m["accuracy"], 4 / 6)
    assert math.isclose(m["balanced_accuracy"], (0.5 + 1 + 0.5) / 3)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["per_class"]["b"] == {"precision": 2 / 3, "recall": 1.0, "f1": f1[1], "support": 2}
    assert math.isclose(m["loss"], -np.mean(np.log([0.8, 0.2, 0.8, 0.6, 0.8, 0.3])))
    # class c: positives score 0.1 and 0.8... 0.3 ranks above negatives 0.1,0.1,0.1,0.1: AUC = 1
    assert math.isclose(m["roc_auc_per_class"]["c"], 1.0)


def test_perfect_predictions_score_one_and_absent_classes_are_undefined_not_crashes():
    y_true = np.array([0, 1, 0, 1])
    y_prob = np.array([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.7, 0.2, 0.1], [0.2, 0.7, 0.1]])
    m = score(y_true, y_prob, NAMES)
    assert m["accuracy"] == 1.0
    assert m["roc_auc_micro"] == 1.0
    assert math.isnan(m["roc_auc_per_class"]["c"])  # no clip of class c: undefined
    assert math.isnan(m["pr_auc_per_class"]["c"])
    assert m["per_class"]["c"]["support"] == 0


def rank_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """ROC-AUC as the Mann-Whitney probability that a positive outscores a negative (ties: 1/2)."""
    pos, neg = score[positive], score[~positive]
    return float(np.mean((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])))


def average_precision(positive: np.ndarray, score: np.ndarray) -> float:
    """Mean over the positives of the precision among the clips scored at least as high (no ties)."""
    hits = positive[np.argsort(-score)]
    return float(np.mean((np.cumsum(hits) / np.arange(1, len(hits) + 1))[hits]))


def test_roc_and_pr_areas_match_their_definitions():
    # areas checked against the rank (Mann-Whitney) and precision-at-each-hit definitions, not
    # against scikit-learn again
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 3, 200)
    y_prob = rng.dirichlet(np.ones(3), 200)
    y_prob[np.arange(200), y_true] += 0.3
    y_prob /= y_prob.sum(1, keepdims=True)
    onehot = np.eye(3, dtype=bool)[y_true]
    m = score(y_true, y_prob, NAMES)
    curves = roc_curves(y_true, y_prob)
    micro = rank_auc(onehot.ravel(), y_prob.ravel())
    assert 0.7 < micro < 0.95  # informative, not perfect: the check below is not trivial
    assert math.isclose(m["roc_auc_micro"], micro, rel_tol=1e-9)
    assert math.isclose(curves["micro"].area, micro, rel_tol=1e-9)
    for c, name in enumerate(NAMES):
        assert math.isclose(m["roc_auc_per_class"][name], rank_auc(onehot[:, c], y_prob[:, c]), rel_tol=1e-9)
        assert math.isclose(curves[str(c)].area, rank_auc(onehot[:, c], y_prob[:, c]), rel_tol=1e-9)
        ap = average_precision(onehot[:, c], y_prob[:, c])
        assert math.isclose(m["pr_auc_per_class"][name], ap, rel_tol=1e-9)
        assert math.isclose(pr_curves(y_true, y_prob)[str(c)].area, ap, rel_tol=1e-9)
    assert math.isclose(m["roc_auc_macro"], np.mean([rank_auc(onehot[:, c], y_prob[:, c]) for c in range(3)]))

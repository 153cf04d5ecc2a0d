"""The classic baselines against independent references: pooled statistics against numpy by
hand, the logistic regression baseline against scikit-learn used directly, DTW against a
brute-force dynamic programme over every cell (and dtaidistance where installed), the pruned
1-NN search against the exhaustive one; their settings are chosen on validation, never test."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from mer_cli.core.errors import ConfigError
from mer_cli.data.splits import Split, Splits
from mer_cli.evaluation import baselines
from mer_cli.evaluation.baselines import dtw, pooled, suite


def test_pooled_statistics_are_numpys_per_feature_and_stream():
    rng = np.random.default_rng(0)
    acoustic, visual = rng.standard_normal((17, 3)), rng.standard_normal((5, 2))
    x = pooled.statistics(acoustic)
    slope = [np.polyfit(np.arange(17), acoustic[:, f], 1)[0] for f in range(3)]
    by_hand = [acoustic.mean(0), acoustic.std(0), acoustic.min(0), acoustic.max(0), slope]
    np.testing.assert_allclose(x, np.concatenate(by_hand), rtol=1e-10, atol=1e-12)
    # streams side by side, clip by clip; one frame: no spread, no slope
    both = pooled.pool([[acoustic, acoustic[:1]], [visual, visual[:1]]])
    assert both.shape == (2, 5 * 3 + 5 * 2)
    np.testing.assert_allclose(both[0, 15:], pooled.statistics(visual))
    one = pooled.statistics(acoustic[:1])
    np.testing.assert_array_equal(one[3:6], 0.0)  # std
    np.testing.assert_array_equal(one[12:15], 0.0)  # slope


def splits_of(streams: dict[str, list], labels: dict[str, np.ndarray], n_classes: int) -> Splits:
    """Splits of hand-made clips: ``streams[split]`` = (acoustic clips, visual clips)."""
    names = tuple("abcdef"[:n_classes])
    parts = [
        Split(
            name,
            tuple(f"{1001 + i % 4}_{name}{i}" for i in range(len(labels[name]))),
            streams[name][0],
            streams[name][1],
            labels[name].astype(np.int64),
        )
        for name in ("train", "val", "test")
    ]
    return Splits(*parts, class_names=names, source="hand-made")


def noisy_splits(seed: int, n: int = 24, n_classes: int = 3) -> Splits:
    """Clips whose class shifts their mean a little: learnable, not perfectly."""
    rng = np.random.default_rng(seed)
    streams, labels = {}, {}
    for split in ("train", "val", "test"):
        y = np.arange(n) % n_classes
        acoustic = [rng.standard_normal((int(rng.integers(6, 20)), 3)) + 0.6 * c for c in y]
        visual = [rng.standard_normal((int(rng.integers(3, 8)), 2)) - 0.4 * c for c in y]
        streams[split], labels[split] = (acoustic, visual), y
    return splits_of(streams, labels, n_classes)


def test_frames_a_validity_mask_marks_lost_are_left_out_unless_ignored():
    rng = np.random.default_rng(5)
    aus = [rng.standard_normal((6, 2)) for _ in range(3)]
    masks = [np.array([1, 1, 0, 1, 0, 1], bool)] * 3
    split = Split("train", ("a", "b", "c"), [rng.standard_normal((4, 3))] * 3, aus, np.zeros(3, np.int64))
    split = Split(split.name, split.clip_ids, split.mfcc, split.aus, split.labels, valid={"visual": masks})
    splits = Splits(split, split, split, class_names=("x",), source="masked")
    honoured = suite.Inputs(splits, ("visual",)).pooled(split)
    np.testing.assert_allclose(honoured[1], pooled.statistics(aus[1][masks[1]]), rtol=1e-6)
    ignored = suite.Inputs(splits, ("visual",), honour_masks=False).pooled(split)
    np.testing.assert_allclose(ignored[1], pooled.statistics(aus[1]), rtol=1e-6)


def test_the_logistic_regression_baseline_is_scikit_learns_with_c_chosen_on_val():
    splits = noisy_splits(1)
    grid = (0.01, 0.1, 1.0)
    settings = suite.Settings(methods=("logreg",), c_grid=grid)
    (result,) = suite.compute(splits, ["acoustic", "visual"], settings)

    def vectors(split: Split) -> np.ndarray:
        return np.stack(
            [
                np.concatenate([pooled.statistics(a), pooled.statistics(v)])
                for a, v in zip(split.mfcc, split.aus, strict=True)
            ]
        )

    x = {s.name: vectors(s) for s in splits.all()}
    fitted = {
        c: make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000, random_state=0)).fit(
            x["train"], splits.train.labels
        )
        for c in grid
    }
    val_f1 = {c: f1_score(splits.val.labels, m.predict(x["val"]), average="macro") for c, m in fitted.items()}
    chosen = min(grid, key=lambda c: (-val_f1[c], c))
    assert result.outcome.chosen == {"C": chosen}
    np.testing.assert_allclose(result.outcome.test_prob, fitted[chosen].predict_proba(x["test"]), atol=1e-9)
    np.testing.assert_allclose(result.outcome.val_prob, fitted[chosen].predict_proba(x["val"]), atol=1e-9)


def brute_force_dtw(a: np.ndarray, b: np.ndarray, window: float) -> float:
    """Every cell of the cost matrix in plain Python, the window as the module documents it."""
    a, b = dtw.znormalise(a), dtw.znormalise(b)
    n, m = len(a), len(b)
    r = math.ceil(window * max(n, m) - 1e-12)

    def inside(i: int, j: int) -> bool:
        if n >= m:  # along a: b's frames around the stretched diagonal
            centre = i * (m - 1) / (n - 1) if n > 1 else 0.0
            return math.floor(centre) - r <= j <= math.ceil(centre) + r
        centre = j * (n - 1) / (m - 1)
        return math.floor(centre) - r <= i <= math.ceil(centre) + r

    cost = np.full((n + 1, m + 1), math.inf)
    cost[0, 0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            if inside(i - 1, j - 1):
                step = float(((a[i - 1] - b[j - 1]) ** 2).sum())
                cost[i, j] = step + min(cost[i - 1, j], cost[i, j - 1], cost[i - 1, j - 1])
    return float(cost[n, m])


def test_dtw_is_the_brute_force_minimum_over_warping_paths_in_the_window():
    rng = np.random.default_rng(2)
    for _ in range(40):
        n, m = (int(v) for v in rng.integers(1, 11, 2))
        window = float(rng.choice([0.0, 0.05, 0.1, 0.25, 1.0]))
        a, b = rng.standard_normal((n, 3)), rng.standard_normal((m, 3))
        expected = brute_force_dtw(a, b, window)
        assert dtw.distance(a, b, window) == pytest.approx(expected, rel=1e-9)
        assert dtw.distance(b, a, window) == pytest.approx(expected, rel=1e-9)  # symmetric
    a = rng.standard_normal((9, 2))
    b = rng.standard_normal((9, 2))
    assert dtw.distance(a, b, 0.0) == pytest.approx(((dtw.znormalise(a) - dtw.znormalise(b)) ** 2).sum())


def test_dtw_is_dtaidistances_dependent_dtw():
    dtw_ndim = pytest.importorskip("dtaidistance.dtw_ndim")
    rng = np.random.default_rng(3)
    for _ in range(20):
        n, m = (int(v) for v in rng.integers(2, 15, 2))
        a, b = dtw.znormalise(rng.standard_normal((n, 4))), dtw.znormalise(rng.standard_normal((m, 4)))
        # dtaidistance: the square root of the least sum of squared frame distances
        assert dtw.distance(a, b, 1.0) == pytest.approx(dtw_ndim.distance(a, b) ** 2, rel=1e-9)
        b = dtw.znormalise(rng.standard_normal((n, 4)))
        for window in (0.0, 0.1, 0.3):  # equal lengths: its window w allows shifts below w
            shifts = math.ceil(window * n - 1e-12) + 1
            expected = dtw_ndim.distance(a, b, window=shifts) ** 2
            assert dtw.distance(a, b, window) == pytest.approx(expected, rel=1e-9)


def clustered(
    rng: np.random.Generator, n: int, templates: list[np.ndarray], noise: float
) -> tuple[list, np.ndarray]:
    """Clips of random length, each a class template stretched to it, plus noise."""
    y = rng.integers(0, len(templates), n)
    clips = []
    for c in y:
        t = templates[c]
        length = int(rng.integers(len(t) // 2, len(t) + 1))
        grid = np.linspace(0, len(t) - 1, length)
        stretched = np.stack([np.interp(grid, np.arange(len(t)), t[:, f]) for f in range(t.shape[1])], axis=1)
        clips.append(stretched + noise * rng.standard_normal(stretched.shape))
    return clips, y


@pytest.mark.slow
def test_the_pruned_search_finds_the_exhaustive_neighbours():
    rng = np.random.default_rng(4)
    for noise in (0.05, 3.0):  # tight bounds (pruning) and loose ones (abandoning only)
        templates_a = [np.cumsum(rng.standard_normal((30, 3)), axis=0) for _ in range(3)]
        templates_v = [np.cumsum(rng.standard_normal((10, 2)), axis=0) for _ in range(3)]
        ref_a, y = clustered(rng, 40, templates_a, noise)
        ref_v = [clustered(rng, 1, [templates_v[c]], noise)[0][0] for c in y]
        query_a, yq = clustered(rng, 15, templates_a, noise)
        query_v = [clustered(rng, 1, [templates_v[c]], noise)[0][0] for c in yq]
        ref_a[7] = ref_a[3].copy()  # a tie: the lower index wins in both searches
        ref_v[7] = ref_v[3].copy()
        refs = [dtw.pack(ref_a), dtw.pack(ref_v)]
        queries = [dtw.pack(query_a), dtw.pack(query_v)]
        for window in (0.0, 0.1, 0.3):
            scales = dtw.stream_scales(refs, window)
            index, dist = dtw.nearest(queries, refs, window, scales)
            full_index, full_dist = dtw.nearest(queries, refs, window, scales, exhaustive=True)
            np.testing.assert_array_equal(index, full_index)
            np.testing.assert_allclose(dist, full_dist, rtol=1e-12)
            # and the exhaustive search is the least of the pairwise distances, streams scaled
            pairwise = np.array(
                [
                    [
                        dtw.distance(query_a[q], ref_a[k], window) / scales[0]
                        + dtw.distance(query_v[q], ref_v[k], window) / scales[1]
                        for k in range(len(ref_a))
                    ]
                    for q in range(2)
                ]
            )
            np.testing.assert_array_equal(full_index[:2], pairwise.argmin(axis=1))
            assert not (index == 7).any()  # reference 7 is reference 3: a tie, and 3 comes first


def bump(length: int, at: int) -> np.ndarray:
    x = np.zeros((length, 1))
    x[at : at + 4, 0] = 1.0
    return x


def test_the_dtw_window_is_chosen_on_validation_not_test():
    # class 0 references: a bump early; class 1: flat (z-normalised to 0). A query with its bump
    # later is nearer to the bump by warping (a window), nearer to flat without one. Validation
    # calls such queries class 0, so warping wins there; test calls them class 1, where no
    # window would win: a choice made on test labels would be window 0.
    train_a = [bump(40, 5), bump(40, 6), np.zeros((40, 1)), np.zeros((40, 1))]
    shifted = [bump(40, 20), bump(40, 22), bump(40, 24), bump(40, 26)]
    constant = [np.zeros((3, 1))] * 4
    streams = {"train": (train_a, constant), "val": (shifted, constant), "test": (shifted, constant)}
    labels = {"train": np.array([0, 0, 1, 1]), "val": np.zeros(4, int), "test": np.ones(4, int)}
    splits = splits_of(streams, labels, 2)
    settings = suite.Settings(methods=("dtw",), dtw_windows=(0.0, 0.5))
    (result,) = suite.compute(splits, ["acoustic"], settings)
    assert result.outcome.chosen == {"window": 0.5}
    # every validation clip right with the window: macro F1 0.5 (class 1 neither true nor predicted)
    assert result.outcome.validation == {"0": 0.0, "0.5": 0.5}
    assert (result.outcome.test_prob.argmax(axis=1) == 0).all()  # wrong on test, as it must be


def test_settings_and_a_missing_numba_are_one_line(monkeypatch):
    with pytest.raises(ConfigError, match=r"report.methods='knn': valid: logreg, svm, dtw"):
        suite.Settings(methods=("knn",))
    with pytest.raises(ConfigError, match=r"report.dtw_windows=\[1.5\]"):
        suite.Settings(dtw_windows=(1.5,))
    monkeypatch.setitem(sys.modules, "numba", None)  # import numba: ImportError
    monkeypatch.delitem(sys.modules, "mer_cli.evaluation.baselines.dtw_kernels", raising=False)
    monkeypatch.delattr(baselines, "dtw_kernels", raising=False)
    with pytest.raises(ConfigError, match=r"needs numba: pip install 'mer-cli\[baselines\]'"):
        suite.check(suite.Settings())
    suite.check(suite.Settings(methods=("logreg", "svm")))  # they need no numba

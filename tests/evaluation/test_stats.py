"""Statistics of the comparison report against hand-computed cases and scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

from mer_cli.core.errors import ConfigError, DataError
from mer_cli.data import folds, synthetic
from mer_cli.evaluation import stats


def correctness(both: int, only_a: int, only_b: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    a = np.array([True] * both + [True] * only_a + [False] * only_b + [False] * neither)
    b = np.array([True] * both + [False] * only_a + [True] * only_b + [False] * neither)
    return a, b


def test_mcnemar_exact_on_a_known_table():
    # 10 clips only A gets right, 2 only B: two-sided binomial p = 2 * P(X <= 2 | n=12, 1/2)
    a, b = correctness(both=30, only_a=10, only_b=2, neither=8)
    result = stats.mcnemar(a, b)
    assert (result.b, result.c, result.method) == (10, 2, "exact")
    assert result.p_value == pytest.approx(2 * (1 + 12 + 66) / 2**12)  # 0.0386


def test_mcnemar_chi2_with_continuity_correction_for_many_discordant_pairs():
    a, b = correctness(both=50, only_a=30, only_b=15, neither=5)
    result = stats.mcnemar(a, b)
    assert result.method == "chi2"
    assert result.statistic == pytest.approx((30 - 15 - 1) ** 2 / 45)  # 4.356
    assert result.p_value == pytest.approx(0.036888, abs=1e-5)


def test_mcnemar_of_identical_models_is_not_significant():
    a, _ = correctness(both=20, only_a=0, only_b=0, neither=10)
    assert stats.mcnemar(a, a).p_value == 1.0


def test_metrics_from_confusion_match_scikit_learn():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 5, size=200)  # class 5 never true: absent classes handled as sklearn does
    y_pred = np.where(rng.random(200) < 0.5, y_true, rng.integers(0, 6, size=200))
    cm = stats.confusion(y_true, y_pred, 6)
    assert stats.f1_macro(cm) == pytest.approx(
        f1_score(y_true, y_pred, labels=list(range(6)), average="macro", zero_division=0)
    )
    assert stats.accuracy(cm) == pytest.approx(accuracy_score(y_true, y_pred))
    with pytest.warns(UserWarning, match="y_pred contains classes not in y_true"):
        expected = balanced_accuracy_score(y_true, y_pred)
    assert stats.balanced_accuracy(cm) == pytest.approx(expected)


def test_the_bootstrap_draws_all_at_once_give_each_draws_own_metric():
    """The bootstrap counts every draw's confusion matrix in one bincount and scores the stack;
    each draw must score exactly what scoring that resample alone gives (scikit-learn above)."""
    rng = np.random.default_rng(1)
    sample = stats.Sample(rng.integers(0, 4, 60), rng.integers(0, 5, 60), None, "t")  # class 4 never true
    draws = [rng.integers(0, 60, size=n) for n in (60, 45, 70, 1)]  # cluster draws vary in length
    stacked = stats._confusions(sample, stats._stack([{"t": d} for d in draws], "t"), 5)
    for d, cm in zip(draws, stacked, strict=True):
        np.testing.assert_array_equal(cm, stats.confusion(sample.y_true[d], sample.y_pred[d], 5))
    for name, batched in stats.METRIC_FROM_CONFUSIONS.items():
        expected = [stats.METRIC_FROM_CONFUSION[name](cm) for cm in stacked]
        np.testing.assert_allclose(batched(stacked), expected, rtol=1e-12)


def classifier_sample(n_actors: int, clips_per_actor: int, seed: int, key: str = "t") -> stats.Sample:
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_actors), clips_per_actor)
    y_true = rng.integers(0, 4, size=len(groups))
    y_pred = np.where(rng.random(len(groups)) < 0.6, y_true, rng.integers(0, 4, size=len(groups)))
    return stats.Sample(y_true, y_pred, groups, key)


def wrong_class(rng: np.random.Generator, y_true: np.ndarray, n_classes: int = 4) -> np.ndarray:
    return (y_true + rng.integers(1, n_classes, size=len(y_true))) % n_classes


def test_actor_bootstrap_interval_covers_the_true_accuracy_about_95_percent_of_the_time():
    """Known answer: every actor has an own accuracy drawn around 0.6 (Beta(1.2, 0.8)), so clips of
    one actor are dependent and the population accuracy is exactly 0.6. 200 simulated test sets of
    20 actors x 5 clips, a 95 % interval from 200 draws each.

    The percentile interval with 20 clusters covers slightly less than 95 % (about 93 %); with
    200 repetitions the binomial sd of the coverage is sqrt(0.93 * 0.07 / 200) = 0.018, so the
    band [0.88, 0.99] is about 3 sd either side. Resampling clips ignores the dependence: its
    interval is too narrow and covers clearly less (about 83 %).
    """
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(20), 5)
    covered = {"actors": 0, "clips": 0}
    for rep in range(200):
        actor_accuracy = rng.beta(1.2, 0.8, size=20)
        y_true = rng.integers(0, 4, size=len(groups))
        right = rng.random(len(groups)) < actor_accuracy[groups]
        y_pred = np.where(right, y_true, wrong_class(rng, y_true))
        for unit, g in (("actors", groups), ("clips", None)):
            draws = stats.bootstrap([stats.Sample(y_true, y_pred, g, "t")], 4, ("accuracy",), 200, seed=rep)
            lo, hi = stats.interval(draws["accuracy"], 0.95)
            covered[unit] += lo <= 0.6 <= hi
    coverage = {unit: n / 200 for unit, n in covered.items()}
    assert 0.88 <= coverage["actors"] <= 0.99, coverage
    assert coverage["clips"] <= 0.90 and coverage["clips"] < coverage["actors"] - 0.05, coverage


def test_cluster_bootstrap_resamples_actors_not_clips():
    # every actor's clips are all right or all wrong: only resampling actors sees that dependence
    groups = np.repeat(np.arange(20), 10)
    y_true = np.zeros(200, dtype=np.int64)
    y_pred = np.where(groups % 2 == 0, 0, 1)
    by_actor = stats.Sample(y_true, y_pred, groups, "t")
    by_clip = stats.Sample(y_true, y_pred, None, "t")
    width = {}
    for name, sample in (("actor", by_actor), ("clip", by_clip)):
        lo, hi = stats.interval(stats.bootstrap([sample], 2, ("accuracy",), 500)["accuracy"], 0.95)
        width[name] = hi - lo
    assert width["actor"] > 2 * width["clip"]


def test_spread_across_seeds_is_mean_std_and_t_interval():
    s = stats.spread([0.4, 0.5, 0.6], 0.95)
    assert (s.mean, s.n) == (pytest.approx(0.5), 3)
    assert s.std == pytest.approx(0.1)
    assert s.ci == (pytest.approx(0.5 - 0.248414, abs=1e-6), pytest.approx(0.5 + 0.248414, abs=1e-6))
    single = stats.spread([0.7], 0.95)
    assert (single.mean, single.std, single.ci) == (0.7, None, None)


def test_paired_bootstrap_tells_a_better_model_from_an_equal_one():
    good = classifier_sample(30, 8, seed=2)
    same = stats.Sample(good.y_true, good.y_pred.copy(), good.groups, "t")
    rng = np.random.default_rng(3)
    worse_pred = np.where(rng.random(len(good.y_true)) < 0.5, good.y_pred, (good.y_pred + 1) % 4)
    worse = stats.Sample(good.y_true, worse_pred, good.groups, "t")
    equal = stats.paired_bootstrap([(good, same)], 4, "f1_macro", 500, 0.95)
    assert (equal.diff, equal.p_value) == (0.0, 1.0)
    better = stats.paired_bootstrap([(good, worse)], 4, "f1_macro", 500, 0.95)
    assert better.diff == pytest.approx(stats.point(good, 4, "f1_macro") - stats.point(worse, 4, "f1_macro"))
    assert better.diff > 0.2
    assert better.ci[0] > 0
    # no draw at or below zero: the p-value is the floor 2 / (B + 1), the smallest it can show
    assert better.p_value == pytest.approx(2 / 501) == stats.p_floor(500)


def simulated_pair(
    rng: np.random.Generator, accuracy_a: float, accuracy_b: float
) -> tuple[stats.Sample, stats.Sample]:
    """Two models with independent errors on one test set of 20 actors x 6 clips, 4 classes."""
    groups = np.repeat(np.arange(20), 6)
    y_true = rng.integers(0, 4, size=len(groups))
    a, b = (
        stats.Sample(
            y_true, np.where(rng.random(len(y_true)) < acc, y_true, wrong_class(rng, y_true)), groups, "t"
        )
        for acc in (accuracy_a, accuracy_b)
    )
    return a, b


def test_paired_bootstrap_p_values_under_no_difference_are_not_concentrated_near_zero():
    """Two equally good models (accuracy 0.6 each): p should be about uniform on (0, 1].

    200 repetitions (B = 100 each). Binomial sd of a share near 0.05 is 0.015 and near 0.5 is
    0.035: the bounds are 3 sd from the nominal 5 % and 50 %.
    """
    rng = np.random.default_rng(1)
    pairs = [simulated_pair(rng, 0.6, 0.6) for _ in range(200)]
    p = np.array(
        [
            stats.paired_bootstrap([pair], 4, "f1_macro", 100, 0.95, seed=rep).p_value
            for rep, pair in enumerate(pairs)
        ]
    )
    assert np.mean(p < 0.05) <= 0.10
    assert 0.39 <= np.mean(p < 0.5) <= 0.61
    assert 0.4 <= p.mean() <= 0.6


def test_paired_bootstrap_finds_a_known_difference():
    # accuracy 0.8 vs 0.55 on 120 clips: found (p < 0.05) in nearly every repetition
    rng = np.random.default_rng(2)
    pairs = [simulated_pair(rng, 0.8, 0.55) for _ in range(40)]
    p = [
        stats.paired_bootstrap([pair], 4, "f1_macro", 100, 0.95, seed=rep).p_value
        for rep, pair in enumerate(pairs)
    ]
    assert np.mean(np.array(p) < 0.05) >= 0.9


def test_p_values_at_the_resolution_floor_are_written_as_a_bound():
    floor = stats.p_floor(1000)
    assert floor == pytest.approx(0.001998, abs=1e-6)
    holm_floor = 6 * floor  # Holm's factor for the smallest of six p-values
    assert stats.format_p(holm_floor, holm_floor) == "≤ 0.012"  # 0.011988, rounded up: still a bound
    assert stats.format_p(floor, floor) == "≤ 0.002"
    assert stats.format_p(0.0341, holm_floor) == "0.034"
    assert stats.format_p(0.0341, None) == "0.034"
    assert stats.format_p(0.0004, None) == "< 0.001"  # no floor (McNemar): the usual cut
    assert stats.format_p(0.0004, stats.p_floor(100_000)) == "< 0.001"
    assert stats.format_p(1.0, 1.0) == "≤ 1"  # B too small for m pairs: nothing can be shown
    # the bound is rounded up, never down: 2/(199+1) = 0.01 exactly, 2/(1 + 1999) = 0.001
    assert stats.format_p(0.01, stats.p_floor(199)) == "≤ 0.01"
    assert stats.format_p(0.0114, 0.0114) == "≤ 0.012"
    # the Holm-adjusted p of a pair at the floor is the floor times the number of pairs
    assert stats.holm([floor, floor, 0.5]) == pytest.approx([3 * floor, 3 * floor, 0.5])


def test_holm_adjustment_by_hand():
    # sorted 0.01, 0.03, 0.04 -> 3 * 0.01, 2 * 0.03, max(0.06, 1 * 0.04)
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])


def test_chance_is_what_the_majority_class_scores():
    y_true = np.array([0, 0, 0, 1, 2, 2])
    chance = stats.majority_scores(y_true, 3)
    assert chance["accuracy"] == pytest.approx(0.5)
    assert chance["balanced_accuracy"] == pytest.approx(1 / 3)
    assert chance["f1_macro"] == pytest.approx((2 * 0.5 / 1.5) / 3)  # F1 of class 0 only


# ---------------------------------------------------------------------------------------------
# Speaker-independent folds


@pytest.fixture(scope="module")
def small_data():
    return synthetic.generate(synthetic.Spec(n_actors=12, clips_per_actor_per_class=1))


def test_actor_ids_follow_the_pattern():
    assert folds.actor_ids(["1001_DFA_ANG_XX", "1091_IEO_SAD_HI"], folds.CREMA_D_ACTOR_PATTERN) == (
        "1001",
        "1091",
    )
    assert folds.actor_ids(["spk7-clip3"], r"^spk(\d+)-") == ("7",)
    assert folds.maybe_actor_ids(["clip_a", "1001_DFA_ANG_XX"], folds.CREMA_D_ACTOR_PATTERN) is None
    with pytest.raises(DataError, match="'clip_a': no actor id"):
        folds.actor_ids(["clip_a"], folds.CREMA_D_ACTOR_PATTERN)


def test_folds_are_actor_disjoint_and_test_every_clip_once(small_data):
    pattern = folds.CREMA_D_ACTOR_PATTERN
    all_clips = {c for s in small_data.all() for c in s.clip_ids}
    tested: list[str] = []
    for i in range(4):
        fold = folds.split(small_data, 4, i, pattern)
        actors = [set(folds.actor_ids(s.clip_ids, pattern)) for s in fold.all()]
        assert not (actors[0] & actors[1]) and not (actors[0] & actors[2]) and not (actors[1] & actors[2])
        assert {c for s in fold.all() for c in s.clip_ids} == all_clips
        assert [s.name for s in fold.all()] == ["train", "val", "test"]
        assert len(actors[2]) == 3  # 12 actors, 4 folds
        tested += fold.test.clip_ids
    assert sorted(tested) == sorted(all_clips)


def test_fold_settings_are_checked(small_data):
    with pytest.raises(ConfigError, match=r"cv.folds=2: needs at least 3"):
        folds.split(small_data, 2, 0, folds.CREMA_D_ACTOR_PATTERN)
    with pytest.raises(ConfigError, match=r"cv.fold=5: must be in 0..3"):
        folds.split(small_data, 4, 5, folds.CREMA_D_ACTOR_PATTERN)
    with pytest.raises(DataError, match=r"12 actors are too few for cv\.folds=13"):
        folds.split(small_data, 13, 0, folds.CREMA_D_ACTOR_PATTERN)
    with pytest.raises(ConfigError, match="not a regular expression"):
        folds.split(small_data, 3, 0, "(")

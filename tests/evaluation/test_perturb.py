"""The corruptions of evaluation.perturb, as pure functions on clips: deterministic per seed,
different across seeds, the identity at strength 0, and exactly the stated amount of damage."""

from __future__ import annotations

import numpy as np
import pytest

from mer_cli.core.errors import ConfigError
from mer_cli.evaluation import perturb

F = 3  # features per frame


@pytest.fixture
def clips() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.normal(5.0, 2.0, size=(n, F)).astype(np.float32) for n in (20, 40, 7, 1)]


@pytest.fixture
def ref() -> perturb.Reference:
    return perturb.Reference(np.array([10.0, -3.0, 0.5]), np.array([2.0, 0.5, 4.0]), "hand-made")


def condition(name: str, variant: str, strength: float, amount: float | None = None) -> perturb.Condition:
    stream = "acoustic" if name == "noise" else "visual"
    return perturb.Condition(name, variant, stream, strength, "u", strength if amount is None else amount)


ALTERING = [("noise", "gaussian", 0.5), ("frame_drop", "random", 0.5), ("gap", "contiguous", 0.5)]


@pytest.mark.parametrize(("name", "variant", "strength"), ALTERING)
def test_same_seed_same_clips_other_seed_other_clips(clips, ref, name, variant, strength) -> None:
    c = condition(name, variant, strength)
    first, again, other = (perturb.apply(c, clips, ref, seed) for seed in (3, 3, 4))
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert any(not np.array_equal(a, b) for a, b in zip(first, other, strict=True))


@pytest.mark.parametrize(
    ("name", "variant"),
    [("noise", "gaussian"), ("frame_drop", "random"), ("gap", "contiguous"), ("shift", "delay")],
)
def test_strength_zero_is_the_clean_data(clips, ref, name, variant) -> None:
    out = perturb.apply(condition(name, variant, 0.0), clips, ref, seed=0)
    assert all(np.array_equal(a, b) and a.dtype == np.float32 for a, b in zip(out, clips, strict=True))


def test_the_input_clips_are_never_changed(clips, ref) -> None:
    before = [c.copy() for c in clips]
    for name, variant, strength in [*ALTERING, ("missing", "zeros", 1.0), ("shift", "delay", 1.0)]:
        perturb.apply(
            condition(name, variant, strength, amount=3.0 if name == "shift" else None), clips, ref, 1
        )
    assert all(np.array_equal(a, b) for a, b in zip(before, clips, strict=True))


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
def test_frame_drop_loses_the_stated_fraction_of_each_clip(clips, ref, fraction) -> None:
    out = perturb.apply(condition("frame_drop", "random", fraction), clips, ref, seed=2)
    for x, y in zip(clips, out, strict=True):
        lost = ~np.all(y == x, axis=1)
        assert lost.sum() == int(np.floor(fraction * len(x) + 0.5))  # 20 frames at 0.25: 5
        assert np.array_equal(y[lost], np.broadcast_to(ref.mean.astype(np.float32), y[lost].shape))
        assert len(y) == len(x)  # the clip keeps its length (and its timing)


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
def test_gap_is_one_contiguous_run_of_the_stated_fraction(clips, ref, fraction) -> None:
    out = perturb.apply(condition("gap", "contiguous", fraction), clips, ref, seed=5)
    for x, y in zip(clips, out, strict=True):
        lost = np.flatnonzero(~np.all(y == x, axis=1))
        assert len(lost) == int(np.floor(fraction * len(x) + 0.5))
        if len(lost):
            assert np.array_equal(lost, np.arange(lost[0], lost[0] + len(lost)))  # one gap
            assert np.all(y[lost] == ref.mean.astype(np.float32))


def test_gap_positions_vary_across_clips_and_seeds(ref) -> None:
    clips = [np.arange(100 * F, dtype=np.float32).reshape(100, F)] * 20
    starts = {
        int(np.flatnonzero(np.all(y == ref.mean.astype(np.float32), axis=1))[0])
        for seed in (0, 1)
        for y in perturb.apply(condition("gap", "contiguous", 0.1), clips, ref, seed)
    }
    assert len(starts) > 5


def test_shift_moves_frames_by_the_stated_count(clips, ref) -> None:
    frames = perturb.seconds_to_frames(0.25, 30.0)
    assert frames == 8  # 7.5 frames rounded half up
    out = perturb.apply(condition("shift", "delay", 0.25, amount=frames), clips, ref, seed=0)
    for x, y in zip(clips, out, strict=True):
        k = min(frames, len(x))
        assert len(y) == len(x)
        assert np.array_equal(y[k:], x[: len(x) - k])  # frame t shows what frame t - 8 showed
        assert np.all(y[:k] == ref.mean.astype(np.float32))


def test_missing_zeros_is_the_training_mean_at_every_frame(clips, ref) -> None:
    out = perturb.apply(condition("missing", "zeros", 1.0), clips, ref, seed=0)
    assert [len(y) for y in out] == [len(x) for x in clips]
    assert all(np.all(y == ref.mean.astype(np.float32)) for y in out)


def test_noise_has_the_stated_std_per_feature(ref) -> None:
    x = [np.zeros((20000, F), np.float32)]
    (y,) = perturb.apply(condition("noise", "gaussian", 0.25), x, ref, seed=0)
    # 20,000 draws: the sample std is within 2 % of 0.25 x the training std (4 sigma ~ 2 %)
    np.testing.assert_allclose(y.std(axis=0), 0.25 * ref.std, rtol=0.02)
    np.testing.assert_allclose(y.mean(axis=0), 0.0, atol=0.25 * ref.std.max() * 0.03)


def test_a_conditions_data_do_not_depend_on_the_other_corruptions_asked_for(clips, ref) -> None:
    rates = {"acoustic": 100.0, "visual": 30.0}
    alone = perturb.conditions(["gap"], rates)
    among = [c for c in perturb.conditions(["noise", "gap", "shift"], rates) if c.corruption == "gap"]
    assert alone == among
    for a, b in zip(alone, among, strict=True):
        assert all(
            np.array_equal(p, q)
            for p, q in zip(perturb.apply(a, clips, ref, 9), perturb.apply(b, clips, ref, 9), strict=True)
        )


def test_conditions_convert_seconds_at_the_frame_rate_and_fall_back_to_frames() -> None:
    timed = perturb.conditions(["shift"], {"visual": 30.0})
    assert [(c.strength, c.unit, c.amount) for c in timed] == [
        (0.1, "s", 3.0),
        (0.25, "s", 8.0),
        (0.5, "s", 15.0),
    ]
    untimed = perturb.conditions(["shift"], {"visual": None})
    assert [(c.unit, c.amount) for c in untimed] == [("frames", 3.0), ("frames", 8.0), ("frames", 15.0)]
    everything = perturb.conditions(perturb.names(None), {"acoustic": 100.0, "visual": 30.0})
    # noise: 2 streams x 4; frame_drop 3; gap 3; missing: 2 variants x 2 streams; shift 3; snr 4
    assert len(everything) == 8 + 3 + 3 + 4 + 3 + 4


def test_an_unknown_corruption_is_one_line_listing_the_valid_ones() -> None:
    with pytest.raises(
        ConfigError, match=r"--perturb: corruption='blur': valid: noise, frame_drop, gap, missing, shift, snr"
    ):
        perturb.names(["noise", "blur"])
    assert perturb.names(["missing", "noise", "missing"]) == ("missing", "noise")


def test_reference_from_the_train_clips_is_their_mean_and_std(clips) -> None:
    ref = perturb.reference_from_clips(clips, "train")
    frames = np.concatenate(clips).astype(np.float64)
    np.testing.assert_allclose(ref.mean, frames.mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(ref.std, frames.std(axis=0), rtol=1e-10)


def snr_condition(db: float) -> perturb.Condition:
    return perturb.Condition("snr", "white", "acoustic", db, "dB SNR", db)


@pytest.mark.parametrize("db", [20.0, 10.0, 5.0, 0.0, -3.0])
def test_mix_at_snr_adds_noise_of_exactly_the_stated_ratio(db) -> None:
    t = np.arange(16000) / 16000
    signal = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    mixed = perturb.mix_at_snr(signal, db, np.random.default_rng(0))
    noise = mixed.astype(np.float64) - signal
    measured = 10 * np.log10(np.sum(signal.astype(np.float64) ** 2) / np.sum(noise**2))
    assert mixed.dtype == np.float32
    assert measured == pytest.approx(db, abs=1e-3)  # float32 rounding of the mixture alone
    assert abs(np.corrcoef(noise[:-1], noise[1:])[0, 1]) < 0.05  # white: no correlation in time


def test_a_silent_recording_stays_silent() -> None:
    silent = np.zeros(800, np.float32)
    assert np.array_equal(perturb.mix_at_snr(silent, 0.0, np.random.default_rng(0)), silent)


def test_waveform_noise_is_drawn_in_order_from_the_condition_and_seed_alone() -> None:
    rng = np.random.default_rng(1)
    waves = [rng.normal(size=n).astype(np.float32) for n in (400, 90, 1000)]
    first = list(perturb.apply_to_waveforms(snr_condition(5.0), iter(waves), seed=3))
    again = list(perturb.apply_to_waveforms(snr_condition(5.0), waves, seed=3))
    other = list(perturb.apply_to_waveforms(snr_condition(5.0), waves, seed=4))
    assert [w.shape for w in first] == [w.shape for w in waves]
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert all(not np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_recordings_and_features_are_corrupted_by_their_own_kind_only(clips, ref) -> None:
    with pytest.raises(
        ConfigError, match=r"snr/white/acoustic@10: corrupts the recordings, not their features"
    ):
        perturb.apply(snr_condition(10.0), clips, ref, seed=0)
    with pytest.raises(ConfigError, match=r"noise/gaussian/acoustic@0.5: corrupts features, not recordings"):
        perturb.apply_to_waveforms(condition("noise", "gaussian", 0.5), [], seed=0)

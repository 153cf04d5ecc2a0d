"""The data profile (its statistics against numpy on the same clips), preprocess.scaling=auto's
rule (each branch triggered by data built to trigger it), its warnings, and data.max_frames."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from conftest import compose_train
from mer_cli.core.errors import ConfigError
from mer_cli.data.load import load_data
from mer_cli.data.splits import Split, Splits
from mer_cli.preprocess import moments, profile, sequences
from mer_cli.runs import train


def clips_of(rng: np.random.Generator, n: int, lo: int, hi: int, d: int, make=None) -> list[np.ndarray]:
    """``n`` clips of ``lo``..``hi`` frames of ``d`` features: standard normal, or ``make(t, i)``."""
    out = []
    for i in range(n):
        t = int(rng.integers(lo, hi + 1))
        x = make(t, i) if make is not None else rng.standard_normal((t, d))
        out.append(np.asarray(x, dtype=np.float32))
    return out


def splits_of(clips: list[np.ndarray], visual: list[np.ndarray] | None = None, **kw) -> Splits:
    """Train holds ``clips`` as its acoustic stream (val and test: two of them each)."""
    visual = visual or [c[:, :1] for c in clips]
    labels = np.arange(len(clips)) % 3

    def split(name, idx):
        return Split(
            name,
            tuple(f"{name}{i}" for i in idx),
            tuple(clips[i] for i in idx),
            tuple(visual[i] for i in idx),
            labels[idx],
        )

    return Splits(
        split("train", np.arange(len(clips))),
        split("val", np.arange(2)),
        split("test", np.arange(2)),
        ("a", "b", "c"),
        "tiny",
        **kw,
    )


def fitted(clips, scaling="auto", percentile=100, **kw) -> profile.StreamProfile:
    prep = sequences.fit(clips, percentile=percentile, normalize=True, scaling=scaling, **kw)
    return prep.profile


def spikes(rng, t, d, size):
    """Standard normal frames, about 1 in 100 of them a spike of ``size`` (heavy tails)."""
    return rng.standard_normal((t, d)) + size * (rng.random((t, d)) < 0.01)


def test_the_profile_statistics_are_numpys_on_the_same_clips(monkeypatch):
    rng = np.random.default_rng(0)

    def make(t, i):  # a scale and an offset per clip, and a constant feature
        x = rng.standard_t(5, (t, 3)) * 10 ** rng.uniform(-1, 1) + rng.normal(0, 50)
        return np.hstack([x, np.full((t, 1), 7.0)])

    clips = clips_of(rng, 40, 4, 60, 4, make)
    monkeypatch.setattr(moments, "CHUNK_VALUES", 100)  # many blocks combined, not one
    p = fitted(clips, percentile=80)
    cut = [c[: p.target_length].astype(np.float64) for c in clips]
    frames = np.concatenate(cut)
    np.testing.assert_allclose(p.mean, frames.mean(0), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(p.std, frames.std(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(p.min, frames.min(0))
    np.testing.assert_allclose(p.kurtosis[:3], stats.kurtosis(frames[:, :3], axis=0), rtol=1e-7)
    assert np.isnan(p.kurtosis[3]) and p.constant.tolist() == [False, False, False, True]
    lengths = np.array([len(c) for c in clips])
    assert p.target_length == int(np.ceil(np.percentile(lengths, 80)))
    assert p.frames_cut == pytest.approx(1 - np.minimum(lengths, p.target_length).sum() / lengths.sum())
    assert p.lengths == (lengths.min(), lengths.max(), np.median(lengths), lengths.sum())
    # clip-level: the clips of at least MIN_CLIP_FRAMES frames, each by its own frames
    long = [c[:, :3] for c in cut if len(c) >= moments.MIN_CLIP_FRAMES]
    assert p.clips_profiled == len(long)
    clip_std = np.array([c.std(0) for c in long])
    clip_mean = np.array([c.mean(0) for c in long])
    p5, p95 = np.percentile(clip_std, [5, 95], axis=0)
    np.testing.assert_allclose(p.clip_scale_spread[:3], np.log10(p95 / p5), rtol=1e-5)
    m5, m95 = np.percentile(clip_mean, [5, 95], axis=0)
    np.testing.assert_allclose(p.clip_offset_spread[:3], (m95 - m5) / np.median(clip_std, 0), rtol=1e-5)
    z = np.concatenate([(c - c.mean(0)) / c.std(0) for c in long])
    np.testing.assert_allclose(p.kurtosis_within_clips[:3], stats.kurtosis(z, axis=0), rtol=1e-6)
    assert np.isnan(p.clip_scale_spread[3])  # constant in every clip: no scale to compare
    # more per-clip values than it keeps: every k-th clip (here 4 features x 40 clips / 40: every 4th)
    monkeypatch.setattr(moments, "CLIP_SAMPLE_VALUES", 40)
    sampled = fitted(clips, percentile=80)
    every_4th = [c[:, :3] for c in cut[::4] if len(c) >= moments.MIN_CLIP_FRAMES]
    assert sampled.clips_profiled == len(every_4th) < len(long)
    p5, p95 = np.percentile([c.std(0) for c in every_4th], [5, 95], axis=0)
    np.testing.assert_allclose(sampled.clip_scale_spread[:3], np.log10(p95 / p5), rtol=1e-5)
    np.testing.assert_allclose(sampled.kurtosis, p.kurtosis, rtol=1e-12)  # pooled: every frame still


def test_scales_that_differ_by_orders_of_magnitude_across_clips_choose_per_clip():
    rng = np.random.default_rng(1)
    clips = clips_of(rng, 60, 20, 40, 6, lambda t, i: rng.standard_normal((t, 6)) * 10 ** rng.uniform(-2, 2))
    p = fitted(clips)
    assert p.scaling == p.recommended == "per_clip"
    assert p.scaling_reason.startswith("clip-level scale spread up to 10^")
    assert p.scaling_reason.endswith("across clips on 6 of 6 features")
    assert np.all(p.clip_scale_spread > profile.SCALE_SPREAD_LOG10)
    # standardized over all frames instead: the profile says what auto would do
    explicit = fitted(clips, scaling="standard")
    assert explicit.scaling == "standard" and explicit.recommended == "per_clip"
    (warning,) = profile.warnings(profile.describe(splits_of(clips), {"acoustic": explicit}))
    assert warning.startswith("acoustic: clip-level scale spread up to 10^")
    assert warning.endswith(
        "preprocess.scaling=standard does not cope with that: preprocess.scaling=auto chooses per_clip"
    )


def test_scales_across_clips_and_heavy_tails_within_them_choose_signed_log_then_per_clip():
    rng = np.random.default_rng(2)
    clips = clips_of(rng, 40, 200, 240, 3, lambda t, i: spikes(rng, t, 3, 50) * 10 ** rng.uniform(-2, 2))
    p = fitted(clips)
    assert p.scaling == "signed_log_per_clip"
    assert "heavy tails within clips (excess kurtosis up to" in p.scaling_reason


@pytest.mark.parametrize(("size", "kind"), [(50.0, "signed_log"), (0.2, "robust")])
def test_heavy_tails_within_features_choose_signed_log_where_values_reach_far_else_robust(size, kind):
    rng = np.random.default_rng(3)
    # spikes beyond +-10 (where the logarithm compresses), or tails of small numbers
    clips = clips_of(rng, 40, 200, 240, 3, lambda t, i: spikes(rng, t, 3, 50) * size / 50)
    p = fitted(clips)
    assert np.all(p.clip_scale_spread < profile.SCALE_SPREAD_LOG10)  # no scale spread across clips
    assert np.all(p.kurtosis > profile.HEAVY_KURTOSIS)
    assert p.scaling == kind, p.scaling_reason
    assert p.scaling_reason.startswith("heavy tails (excess kurtosis up to")


def test_plain_balanced_data_keeps_standard_scaling_and_warns_of_nothing():
    rng = np.random.default_rng(4)
    clips = clips_of(rng, 30, 20, 40, 5)
    p = fitted(clips, percentile=95)
    assert p.scaling == "standard" and p.scaling_reason.startswith("neither clip-level scale spread")
    described = profile.describe(splits_of(clips), {"acoustic": p})
    assert described.class_counts == {"train": [10, 10, 10], "val": [1, 1, 0], "test": [1, 1, 0]}
    assert profile.warnings(described) == []
    text = profile.summary(described)
    assert "classes (3): train 10 per class; val a 1, b 1, c 0" in text
    assert "acoustic: 5 features, 0 constant, 0 near-constant" in text
    assert "acoustic: scaling standard: auto: neither" in text


def test_constant_and_near_constant_features_are_reported():
    rng = np.random.default_rng(5)

    def make(t, i):  # varying; constant everywhere; constant within each clip, another value per clip
        return np.hstack([rng.standard_normal((t, 1)), np.full((t, 1), 3.0), np.full((t, 1), float(i))])

    p = fitted(clips_of(rng, 20, 10, 20, 3, make))
    assert np.flatnonzero(p.constant).tolist() == [1]
    assert np.flatnonzero(p.near_constant).tolist() == [2]
    assert p.scaling == "standard"  # counted over the two varying features only
    assert "3 features, 1 constant, 1 near-constant" in profile.summary(
        profile.describe(splits_of(clips_of(rng, 20, 10, 20, 3, make)), {"acoustic": p})
    )


def test_a_length_cut_losing_more_than_5_percent_of_a_streams_frames_is_a_warning():
    rng = np.random.default_rng(6)
    lengths = np.concatenate([rng.integers(20, 40, 46), [400, 600, 800, 1000]])  # long-tailed
    clips = [rng.standard_normal((n, 2)).astype(np.float32) for n in lengths]
    p = fitted(clips, percentile=95)
    assert p.frames_cut > profile.CUT_WARNING
    assert p.frames_cut == pytest.approx(1 - np.minimum(lengths, p.target_length).sum() / lengths.sum())
    (warning,) = profile.warnings(profile.describe(splits_of(clips), {"acoustic": p}))
    assert warning.startswith(
        f"acoustic: the target length of {p.target_length} frames (data.max_frames=auto"
    )
    assert f"cuts {100 * p.frames_cut:.1f} % of the training frames" in warning


def test_frame_rates_that_disagree_with_the_streams_lengths_are_a_warning():
    rng = np.random.default_rng(7)
    acoustic = clips_of(rng, 10, 40, 60, 2)
    visual = [c[::2] for c in acoustic]  # half the frames: 2:1, recorded as 100 / 30
    rates = {"acoustic": {"frame_rate_hz": 100.0}, "visual": {"frame_rate_hz": 30.0}}
    splits = splits_of(acoustic, visual, ingest_settings=rates)
    described = profile.describe(splits, {"acoustic": fitted(acoustic)})
    assert described.length_ratio == pytest.approx(
        np.median([len(a) / len(v) for a, v in zip(acoustic, visual, strict=True)])
    )
    assert profile.frame_rates_consistent(described) is False
    assert any("recorded frame rates' (3.33)" in w for w in profile.warnings(described))
    unrecorded = profile.describe(splits_of(acoustic, visual), {})
    assert profile.frame_rates_consistent(unrecorded) is None  # no rates recorded: nothing to check


def test_max_frames_sets_the_target_length_per_stream_or_for_every_one():
    clips = clips_of(np.random.default_rng(8), 10, 5, 30, 2)
    prep = sequences.fit(clips, percentile=95, normalize=True, max_frames=7)
    assert prep.target.length == 7 and prep.profile.length_rule == "data.max_frames=7"
    assert max(prep.apply(clips).lengths.tolist()) == 7
    assert sequences.max_frames_of("auto", "visual") is None
    assert sequences.max_frames_of(7, "visual") == 7
    assert sequences.max_frames_of({"acoustic": 300}, "acoustic") == 300
    assert sequences.max_frames_of({"acoustic": 300}, "visual") is None
    with pytest.raises(ConfigError, match=r"^data\.max_frames=0: valid: auto, a number of frames"):
        sequences.max_frames_of(0, "acoustic")
    with pytest.raises(ConfigError, match=r"^data\.max_frames: vision is not an input stream"):
        train.check_max_frames(compose_train("data.max_frames={vision:3}"))


@pytest.mark.slow
def test_auto_chooses_standard_on_the_embedded_data_for_every_stream_a_model_reads():
    cfg = compose_train()
    splits = load_data(cfg.data, cfg.cv)
    preps = train.fit_preprocessing(cfg, splits, "early", ["acoustic", "visual"], [])
    preps |= train.fit_preprocessing(cfg, splits, "joint", ["acoustic", "visual"], [])
    assert sorted(preps) == ["acoustic", "early", "visual"]
    for name, prep in preps.items():
        assert cfg.preprocess.scaling == "auto"
        assert prep.scaler.kind == prep.profile.recommended == "standard", (
            name,
            prep.profile.recommended_reason,
        )

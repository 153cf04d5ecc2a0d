"""The data profile: what the training split's clips look like across clips as well as within
features, and the scaler that ``preprocess.scaling=auto`` chooses from it.

Input: per model input stream, the training clips as the model reads them (cut to the target
length), streamed a block of clips at a time (never all frames at once, never a float64 copy of
them), and their lengths before the cut; for the whole dataset, its `Splits` (labels of every
split, the streams' lengths and recorded frame rates). Output: `StreamProfile` per stream and a
`DataProfile` (profile.json in the run directory: `as_dict`; the log block: `summary`,
`warnings`). Only training clips are described: nothing here looks at validation or test frames
(class counts are counted for every split, never fitted on).

Per feature of a stream: mean, std, min, max and excess kurtosis of its pooled frames; across
clips, the spread of each clip's own scale (log10 of the 95th over the 5th percentile of the
per-clip std) and offset (the 5th-95th percentile range of the per-clip means, in median per-clip
stds); the excess kurtosis within clips (of each clip's standardized frames, pooled). Clip-level
statistics read clips of at least `MIN_CLIP_FRAMES` frames (a shorter clip's std is mostly noise),
at most `CLIP_SAMPLE_VALUES` per-clip values (every k-th clip beyond that).

The rule of `recommend` (docs/data.md#feature-scaling), over the features that are not constant:
at least `SHARE` of them with a clip-level scale spread above 10^`SCALE_SPREAD_LOG10`: per_clip,
signed_log_per_clip if at least `SHARE` also have heavy tails within clips; else at least `SHARE`
with heavy tails (excess kurtosis above `HEAVY_KURTOSIS`): signed_log if most of those reach past
+-`LOG_REACH` (where the logarithm compresses), else robust; else standard.
"""

from __future__ import annotations

import math
import warnings as _warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from mer_cli.data import spec
from mer_cli.data.splits import Splits
from mer_cli.preprocess.scaling import CHUNK_VALUES, MIN_SPREAD

FORMAT = 1  # profile.json's format
SCALE_SPREAD_LOG10 = 1.5  # a feature whose per-clip std spans more (p95 / p5, log10) varies in scale by clip
HEAVY_KURTOSIS = 10.0  # excess kurtosis above this: heavy tails (normal 0, Laplace 3, t(5) 6)
SHARE = 1 / 3  # of the varying features: enough of them to change the whole stream's scaler
LOG_REACH = 10.0  # |x| beyond this: sign(x) log1p(|x|) compresses (by 4x at 10)
MIN_CLIP_FRAMES = 8  # clip-level statistics from clips of at least this many frames
MIN_CLIPS = 5  # clips with a varying feature needed for its clip-level spread
CLIP_SAMPLE_VALUES = 1 << 22  # per-clip statistics kept (clips x features), float32 each
NEAR_CONSTANT_CLIPS = 0.9  # constant within at least this share of the clips: near-constant
NEAR_CONSTANT_RELATIVE = 1e-5  # std below this x |mean|: near-constant (float32 rounding noise)
CUT_WARNING = 0.05  # the length cut losing more of a stream's training frames: a warning
FRAME_RATE_TOLERANCE = 0.15  # median length ratio this far (relative) from the recorded rates': a warning


@dataclass(frozen=True)
class StreamProfile:
    """One input stream's training clips (as the model reads them: cut to ``target_length``)."""

    n_clips: int
    lengths: tuple[int, int, float, int]  # min, max, median, total frames before the cut
    target_length: int
    length_rule: str  # how the target length was set (data.max_frames, preprocess.length_percentile)
    frames_cut: float  # share of the training frames beyond the target length
    mean: np.ndarray  # (D,) float64, pooled over the frames read
    std: np.ndarray
    min: np.ndarray
    max: np.ndarray
    kurtosis: np.ndarray  # (D,) excess kurtosis of the pooled frames; nan for a constant feature
    kurtosis_within_clips: np.ndarray  # (D,) of each clip's standardized frames, pooled; nan: none
    clip_scale_spread: np.ndarray  # (D,) log10(p95 / p5) of the per-clip std; nan: too few clips
    clip_offset_spread: np.ndarray  # (D,) (p95 - p5) of the per-clip means / median per-clip std
    constant: np.ndarray  # (D,) bool: std below MIN_SPREAD
    near_constant: np.ndarray  # (D,) bool
    clips_profiled: int  # clips behind the clip-level statistics
    scaling_setting: str | None = None  # preprocess.scaling (None: preprocess.normalize=false)
    scaling: str | None = None  # the scaler fitted (None: features as they are)
    scaling_reason: str = ""
    recommended: str = "standard"  # what auto chooses (`recommend`), whatever the setting
    recommended_reason: str = ""

    @property
    def n_features(self) -> int:
        return len(self.mean)


@dataclass(frozen=True)
class DataProfile:
    """The dataset as training sees it: its input streams' profiles, class counts, frame rates."""

    source: str
    class_names: tuple[str, ...]
    class_counts: dict[str, list[int]]  # split -> clips per class
    frame_rates: dict[str, float | None]  # data stream -> recorded frames per second (None: unknown)
    length_ratio: float | None  # median over train clips of acoustic / visual frame counts
    streams: dict[str, StreamProfile]


# ---------------------------------------------------------------------------------------------
# Describing a stream: one streamed pass


def _blocks(clips: Iterable[np.ndarray]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(frames as float64, per-clip frame counts) of consecutive clips, about `CHUNK_VALUES`
    values at a time (a clip of no frames is skipped)."""
    parts: list[np.ndarray] = []
    values = 0
    for clip in clips:
        if not len(clip):
            continue
        parts.append(clip)
        values += clip.size
        if values >= CHUNK_VALUES:
            yield np.concatenate(parts).astype(np.float64), np.array([len(p) for p in parts])
            parts, values = [], 0
    if parts:
        yield np.concatenate(parts).astype(np.float64), np.array([len(p) for p in parts])


class _Pooled:
    """Count, mean, central moment sums M2..M4, min and max per feature, float64; blocks combined
    with Pébay's pairwise formulas (no cancellation from a large offset)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean = self.m2 = self.m3 = self.m4 = self.min = self.max = np.zeros(0)

    def update(self, x: np.ndarray) -> None:
        nb = len(x)
        mb = x.mean(axis=0)
        d = x - mb
        d2 = d * d
        m2b, m3b, m4b = d2.sum(axis=0), (d2 * d).sum(axis=0), (d2 * d2).sum(axis=0)
        if self.n == 0:
            self.n, self.mean, self.m2, self.m3, self.m4 = nb, mb, m2b, m3b, m4b
            self.min, self.max = x.min(axis=0), x.max(axis=0)
            return
        na, n = self.n, self.n + nb
        delta = mb - self.mean
        m2a, m3a = self.m2, self.m3
        self.m4 = (
            self.m4
            + m4b
            + delta**4 * na * nb * (na * na - na * nb + nb * nb) / n**3
            + 6 * delta**2 * (na * na * m2b + nb * nb * m2a) / n**2
            + 4 * delta * (na * m3b - nb * m3a) / n
        )
        self.m3 = m3a + m3b + delta**3 * na * nb * (na - nb) / n**2 + 3 * delta * (na * m2b - nb * m2a) / n
        self.m2 = m2a + m2b + delta**2 * na * nb / n
        self.mean = self.mean + delta * nb / n
        self.min, self.max = np.minimum(self.min, x.min(axis=0)), np.maximum(self.max, x.max(axis=0))
        self.n = n


def describe_stream(
    clips: Iterable[np.ndarray], lengths: np.ndarray, target_length: int, length_rule: str
) -> StreamProfile:
    """The profile of one stream's training ``clips`` (each (T, D), as the model reads them),
    whose frame counts before the cut to ``target_length`` are ``lengths`` (N,)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    pooled = _Pooled()
    z4 = frames_z = constant_in = multi = np.zeros(0)
    stds: list[np.ndarray] = []
    means: list[np.ndarray] = []
    stride, seen = 0, 0
    for x, n in _blocks(clips):
        pooled.update(x)
        if not stride:  # every k-th clip for the clip-level statistics, where there are too many
            stride = max(1, math.ceil(len(lengths) * x.shape[1] / CLIP_SAMPLE_VALUES))
            z4, frames_z, constant_in = (np.zeros(x.shape[1]) for _ in range(3))
            multi = np.zeros(())
        starts = np.concatenate([[0], np.cumsum(n)[:-1]])
        clip_mean = np.add.reduceat(x, starts, axis=0) / n[:, None]  # (k, D)
        dev = x - np.repeat(clip_mean, n, axis=0)
        dev2 = dev * dev
        clip_std = np.sqrt(np.add.reduceat(dev2, starts, axis=0) / n[:, None])
        clip_m4 = np.add.reduceat(dev2 * dev2, starts, axis=0) / n[:, None]
        varies = clip_std >= MIN_SPREAD
        constant_in += ((~varies) & (n >= 2)[:, None]).sum(axis=0)
        multi = multi + (n >= 2).sum()
        long = n >= MIN_CLIP_FRAMES
        within = long[:, None] & varies
        # sum over a clip's standardized frames of z^4 = T * m4 / std^4
        z4 += np.where(within, n[:, None] * clip_m4 / np.where(varies, clip_std, 1.0) ** 4, 0.0).sum(axis=0)
        frames_z += np.where(within, n[:, None], 0).sum(axis=0)
        keep = long & ((seen + np.arange(len(n))) % stride == 0)
        stds.append(clip_std[keep].astype(np.float32))
        means.append(clip_mean[keep].astype(np.float32))
        seen += len(n)
    if pooled.n == 0:
        raise ValueError("no training frames to profile")
    std = np.sqrt(pooled.m2 / pooled.n)
    constant = ~(std >= MIN_SPREAD)
    with np.errstate(divide="ignore", invalid="ignore"):
        kurtosis = np.where(constant, np.nan, pooled.n * pooled.m4 / pooled.m2**2 - 3.0)
        within_kurtosis = np.where(frames_z > 0, z4 / frames_z - 3.0, np.nan)
    scale_spread, offset_spread = _clip_spreads(np.concatenate(stds), np.concatenate(means))
    share_constant = constant_in / multi if multi else np.zeros_like(std)
    near = ~constant & (
        (std < NEAR_CONSTANT_RELATIVE * np.abs(pooled.mean)) | (share_constant >= NEAR_CONSTANT_CLIPS)
    )
    kept = np.minimum(lengths, target_length).sum()
    total = int(lengths.sum())
    return StreamProfile(
        n_clips=len(lengths),
        lengths=(int(lengths.min()), int(lengths.max()), float(np.median(lengths)), total),
        target_length=int(target_length),
        length_rule=length_rule,
        frames_cut=float(1 - kept / total) if total else 0.0,
        mean=pooled.mean,
        std=std,
        min=pooled.min,
        max=pooled.max,
        kurtosis=kurtosis,
        kurtosis_within_clips=within_kurtosis,
        clip_scale_spread=scale_spread,
        clip_offset_spread=offset_spread,
        constant=constant,
        near_constant=near,
        clips_profiled=int(sum(len(s) for s in stds)),
    )


def _clip_spreads(stds: np.ndarray, means: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per feature, over the clips where it varies (at least `MIN_CLIPS` of them, else nan):
    log10(p95 / p5) of the clips' stds, and (p95 - p5) of their means over their median std."""
    stds = stds.astype(np.float64)
    varies = stds >= MIN_SPREAD
    enough = varies.sum(axis=0) >= MIN_CLIPS
    masked = np.where(varies, stds, np.nan)
    centres = np.where(varies, means.astype(np.float64), np.nan)
    with _warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        _warnings.simplefilter("ignore", RuntimeWarning)  # all-nan columns: set to nan below anyway
        p5, p95 = np.nanpercentile(masked, [5, 95], axis=0) if len(stds) else (np.nan, np.nan)
        m5, m95 = np.nanpercentile(centres, [5, 95], axis=0) if len(stds) else (np.nan, np.nan)
        median = np.nanmedian(masked, axis=0) if len(stds) else np.nan
        scale = np.where(enough, np.log10(p95 / p5), np.nan)
        offset = np.where(enough, (m95 - m5) / median, np.nan)
    return np.broadcast_to(scale, enough.shape).copy(), np.broadcast_to(offset, enough.shape).copy()


# ---------------------------------------------------------------------------------------------
# preprocess.scaling=auto


def recommend(p: StreamProfile) -> tuple[str, str]:
    """The scaler ``preprocess.scaling=auto`` chooses for ``p`` and why (the module's rule)."""
    varying = ~p.constant
    n = int(varying.sum())
    if n == 0:
        return "standard", "every feature is constant"
    with np.errstate(invalid="ignore"):
        spread = varying & (p.clip_scale_spread > SCALE_SPREAD_LOG10)
        heavy = varying & (p.kurtosis > HEAVY_KURTOSIS)
        heavy_within = varying & (p.kurtosis_within_clips > HEAVY_KURTOSIS)
    if spread.sum() >= SHARE * n:
        reason = (
            f"clip-level scale spread up to 10^{np.max(p.clip_scale_spread[spread]):.1f} across clips on "
            f"{int(spread.sum())} of {n} features"
        )
        if heavy_within.sum() >= SHARE * n:
            top = np.max(p.kurtosis_within_clips[heavy_within])
            return "signed_log_per_clip", (
                f"{reason}, and heavy tails within clips (excess kurtosis up to {top:.3g}) on "
                f"{int(heavy_within.sum())} of {n}"
            )
        return "per_clip", reason
    if heavy.sum() >= SHARE * n:
        top = np.max(p.kurtosis[heavy])
        reason = f"heavy tails (excess kurtosis up to {top:.3g}) on {int(heavy.sum())} of {n} features"
        reach = np.maximum(np.abs(p.min), np.abs(p.max))[heavy]
        far = int((reach > LOG_REACH).sum())
        if 2 * far > heavy.sum():
            return "signed_log", f"{reason}, {far} of them with values beyond ±{LOG_REACH:g}"
        return "robust", f"{reason}, most with values within ±{LOG_REACH:g}"
    return "standard", (
        f"neither clip-level scale spread above 10^{SCALE_SPREAD_LOG10} nor heavy tails on a third "
        f"of the {n} features"
    )


def with_scaling(p: StreamProfile, setting: str | None, kind: str | None, reason: str) -> StreamProfile:
    """``p`` with the scaling fitted (``kind``, from ``setting``: None for preprocess.normalize=false)
    and what auto would have chosen."""
    recommended, why = recommend(p)
    return replace(
        p,
        scaling_setting=setting,
        scaling=kind,
        scaling_reason=reason,
        recommended=recommended,
        recommended_reason=why,
    )


# ---------------------------------------------------------------------------------------------
# The whole dataset


def describe(splits: Splits, streams: Mapping[str, StreamProfile]) -> DataProfile:
    """The dataset's profile: the input ``streams``' profiles (fitted on train), the clips per
    class of every split, the data streams' recorded frame rates and their train clips' median
    length ratio (frame counts only: no frame is read)."""
    n_classes = len(splits.class_names)
    counts = {s.name: np.bincount(s.labels, minlength=n_classes).tolist() for s in splits.all()}
    rates = {name: spec.frame_rate(splits, name) for name in splits.train.streams}
    a, v = splits.train.mfcc.lengths, splits.train.aus.lengths
    ratio = float(np.median(a / v)) if len(a) and (v > 0).all() else None
    return DataProfile(splits.source, tuple(splits.class_names), counts, rates, ratio, dict(streams))


def recorded_ratio(p: DataProfile) -> float | None:
    """acoustic / visual frame rate as recorded, or None where a rate is unknown."""
    a, v = p.frame_rates.get("acoustic"), p.frame_rates.get("visual")
    return float(a) / float(v) if a and v else None


def frame_rates_consistent(p: DataProfile) -> bool | None:
    """Whether the streams' median length ratio matches their recorded frame rates (None: no rates)."""
    recorded = recorded_ratio(p)
    if recorded is None or p.length_ratio is None:
        return None
    return abs(p.length_ratio / recorded - 1) <= FRAME_RATE_TOLERANCE


def choices(p: DataProfile) -> dict[str, dict[str, Any]]:
    """What was chosen per input stream, for metrics.json's ``run.preprocessing``."""
    return {
        name: {
            "scaling": s.scaling,
            "scaling_reason": s.scaling_reason,
            "target_length": s.target_length,
            "frames_cut": round(s.frames_cut, 6),
        }
        for name, s in p.streams.items()
    }


# ---------------------------------------------------------------------------------------------
# Presenting it: the log block, its warnings, profile.json


def _top(values: np.ndarray) -> tuple[float, int] | None:
    """The largest finite value and its feature index, or None."""
    finite = np.isfinite(values)
    if not finite.any():
        return None
    i = int(np.argmax(np.where(finite, values, -np.inf)))
    return float(values[i]), i


def _classes_line(p: DataProfile) -> str:
    parts = []
    for split, counts in p.class_counts.items():
        if len(set(counts)) == 1:
            parts.append(f"{split} {counts[0]} per class")
        else:
            listed = ", ".join(f"{c} {k}" for c, k in zip(p.class_names, counts, strict=True))
            ratio = max(counts) / min(counts) if min(counts) else math.inf
            parts.append(f"{split} {listed} (largest / smallest {ratio:.2g})")
    return f"classes ({len(p.class_names)}): " + "; ".join(parts)


def _frame_rate_line(p: DataProfile) -> str:
    ratio = "n/a" if p.length_ratio is None else f"{p.length_ratio:.3g}"
    recorded = recorded_ratio(p)
    if recorded is None:
        return f"frame rates: not recorded; median acoustic / visual frames per train clip {ratio}"
    rates = ", ".join(f"{k} {v:g}/s" for k, v in p.frame_rates.items() if v)
    verdict = "consistent" if frame_rates_consistent(p) else "INCONSISTENT"
    return (
        f"frame rates: {rates} (ratio {recorded:.3g}); median acoustic / visual frames per train "
        f"clip {ratio}: {verdict}"
    )


def _stream_lines(name: str, s: StreamProfile) -> list[str]:
    lo, hi, median, total = s.lengths
    lines = [
        f"{name}: target length {s.target_length} frames ({s.length_rule}), cutting "
        f"{100 * s.frames_cut:.1f} % of the {total:,} training frames; {s.n_clips} train clips of "
        f"{lo}..{hi} frames (median {median:g})"
    ]
    spread, kurt = _top(s.clip_scale_spread), _top(s.kurtosis)
    with np.errstate(invalid="ignore"):
        n_spread = int((s.clip_scale_spread > SCALE_SPREAD_LOG10).sum())
        n_heavy = int((s.kurtosis > HEAVY_KURTOSIS).sum())
    offset = _top(s.clip_offset_spread)
    lines.append(
        f"{name}: {s.n_features} features, {int(s.constant.sum())} constant, {int(s.near_constant.sum())} "
        "near-constant; clip-level scale spread "
        + (f"up to 10^{spread[0]:.2f} (feature {spread[1]})" if spread else "n/a")
        + f", {n_spread} above 10^{SCALE_SPREAD_LOG10}; excess kurtosis "
        + (f"up to {kurt[0]:.3g} (feature {kurt[1]})" if kurt else "n/a")
        + f", {n_heavy} above {HEAVY_KURTOSIS:g}; clip offsets spread "
        + (f"up to {offset[0]:.3g} clip stds" if offset else "n/a")
        + f" ({s.clips_profiled} clips of {MIN_CLIP_FRAMES}+ frames)"
    )
    chosen = s.scaling or "none"
    how = "auto: " if s.scaling_setting == "auto" else ""
    lines.append(f"{name}: scaling {chosen}: {how}{s.scaling_reason}")
    return lines


def summary(p: DataProfile) -> str:
    """The profile as the block at the start of training (and what mer-profile prints)."""
    lines = [f"data profile of the training split ({p.source}):", _classes_line(p), _frame_rate_line(p)]
    for name, s in p.streams.items():
        lines += _stream_lines(name, s)
    return "\n  ".join(lines)


def warnings(p: DataProfile) -> list[str]:
    """One line per problem the profile shows: a length cut losing more than `CUT_WARNING` of a
    stream's training frames, a scaling that ignores what auto would act on, frame rates that
    disagree with the streams' lengths."""
    out = []
    for name, s in p.streams.items():
        if s.frames_cut > CUT_WARNING:
            out.append(
                f"{name}: the target length of {s.target_length} frames ({s.length_rule}) cuts "
                f"{100 * s.frames_cut:.1f} % of the training frames: data.max_frames=N keeps more"
            )
        if s.recommended != "standard" and s.scaling != s.recommended:
            setting = (
                "preprocess.normalize=false"
                if s.scaling_setting is None
                else f"preprocess.scaling={s.scaling_setting}"
            )
            out.append(
                f"{name}: {s.recommended_reason}; {setting} does not cope with that: "
                f"preprocess.scaling=auto chooses {s.recommended}"
            )
    if frame_rates_consistent(p) is False:
        out.append(
            f"the streams' median length ratio over the train clips ({p.length_ratio:.3g}) is not their "
            f"recorded frame rates' ({recorded_ratio(p):.3g}): a stream's frame rate may be recorded wrong"
        )
    return out


def _plain(values: np.ndarray) -> list[Any]:
    return [None if not math.isfinite(v) else float(v) for v in np.asarray(values, dtype=np.float64)]


def as_dict(p: DataProfile) -> dict[str, Any]:
    """profile.json: plain numbers (nan: null), one entry per feature in its stream's column order."""
    return {
        "format": FORMAT,
        "split": "train",
        "source": p.source,
        "classes": {"names": list(p.class_names), "counts": p.class_counts},
        "frame_rates": {
            "recorded_hz": p.frame_rates,
            "recorded_ratio": recorded_ratio(p),
            "median_length_ratio": p.length_ratio,
            "consistent": frame_rates_consistent(p),
        },
        "streams": {
            name: {
                "n_clips": s.n_clips,
                "frames": dict(zip(("min", "max", "median", "total"), s.lengths, strict=True)),
                "target_length": s.target_length,
                "length_rule": s.length_rule,
                "frames_cut": s.frames_cut,
                "n_features": s.n_features,
                "constant": np.flatnonzero(s.constant).tolist(),
                "near_constant": np.flatnonzero(s.near_constant).tolist(),
                "clips_profiled": s.clips_profiled,
                "scaling": {
                    "setting": s.scaling_setting,
                    "kind": s.scaling,
                    "reason": s.scaling_reason,
                    "auto": s.recommended,
                    "auto_reason": s.recommended_reason,
                },
                "features": {
                    key: _plain(getattr(s, key))
                    for key in (
                        "mean",
                        "std",
                        "min",
                        "max",
                        "kurtosis",
                        "kurtosis_within_clips",
                        "clip_scale_spread",
                        "clip_offset_spread",
                    )
                },
            }
            for name, s in p.streams.items()
        },
        "warnings": warnings(p),
    }

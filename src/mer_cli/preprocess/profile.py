"""The data profile: what the training split's clips look like across clips as well as within
features, and the scaler that ``preprocess.scaling=auto`` chooses from it.

Input: per model input stream, the training clips as the model reads them (cut to the target
length), streamed a block of clips at a time (never all frames at once, never a float64 copy of
them), and their lengths before the cut; for the whole dataset, its `Splits` (labels of every
split, the streams' lengths and recorded frame rates). Output: `StreamProfile` per stream and a
`DataProfile` (profile.json in the run directory: `as_dict`; the log block: `summary`,
`warnings`). Only training clips are described: nothing here looks at validation or test frames
(class counts are counted for every split, never fitted on).

Per feature of a stream (`moments.measure`, one streamed pass): mean, std, min, max and excess
kurtosis of its pooled frames; across clips, the spread of each clip's own scale (log10 of the
95th over the 5th percentile of the per-clip std) and offset (the 5th-95th percentile range of
the per-clip means, in median per-clip stds); the excess kurtosis within clips; constant and
near-constant features; the share of frames the length cut loses.

The rule of `recommend` (docs/data.md#feature-scaling), over the features that are not constant:
at least `SHARE` of them with a clip-level scale spread above 10^`SCALE_SPREAD_LOG10`: per_clip,
signed_log_per_clip if at least `SHARE` also have heavy tails within clips; else at least `SHARE`
with heavy tails (excess kurtosis above `HEAVY_KURTOSIS`): signed_log if most of those reach past
+-`LOG_REACH` (where the logarithm compresses), else robust; else standard.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from mer_cli.data import spec
from mer_cli.data.splits import Splits
from mer_cli.preprocess import moments
from mer_cli.preprocess.scaling import MIN_SPREAD

FORMAT = 1  # profile.json's format
SCALE_SPREAD_LOG10 = 1.5  # a feature whose per-clip std spans more (p95 / p5, log10) varies in scale by clip
HEAVY_KURTOSIS = 10.0  # excess kurtosis above this: heavy tails (normal 0, Laplace 3, t(5) 6)
SHARE = 1 / 3  # of the varying features: enough of them to change the whole stream's scaler
LOG_REACH = 10.0  # |x| beyond this: sign(x) log1p(|x|) compresses (by 4x at 10)
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


def describe_stream(
    clips: Iterable[np.ndarray], lengths: np.ndarray, target_length: int, length_rule: str
) -> StreamProfile:
    """The profile of one stream's training ``clips`` (each (T, D), as the model reads them: one
    streamed pass, `moments.measure`), whose frame counts before the cut to ``target_length`` are
    ``lengths`` (N,)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    m = moments.measure(clips, len(lengths))
    constant = ~(m.std >= MIN_SPREAD)
    near = ~constant & (
        (m.std < NEAR_CONSTANT_RELATIVE * np.abs(m.mean)) | (m.constant_in_clips >= NEAR_CONSTANT_CLIPS)
    )
    kept, total = int(np.minimum(lengths, target_length).sum()), int(lengths.sum())
    return StreamProfile(
        n_clips=len(lengths),
        lengths=(int(lengths.min()), int(lengths.max()), float(np.median(lengths)), total),
        target_length=int(target_length),
        length_rule=length_rule,
        frames_cut=1 - kept / total if total else 0.0,
        mean=m.mean,
        std=m.std,
        min=m.min,
        max=m.max,
        kurtosis=np.where(constant, np.nan, m.kurtosis),
        kurtosis_within_clips=m.kurtosis_within_clips,
        clip_scale_spread=m.clip_scale_spread,
        clip_offset_spread=m.clip_offset_spread,
        constant=constant,
        near_constant=near,
        clips_profiled=m.clips_profiled,
    )


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
        + f" ({s.clips_profiled} clips of {moments.MIN_CLIP_FRAMES}+ frames)"
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

"""Streamed statistics of one stream's clips, pooled over all frames and clip by clip: the numbers
the data profile (`profile`) is made of.

Input: the clips, an iterable of (T, D) arrays read once, a block of about `CHUNK_VALUES` values
at a time (never all frames at once, never a float64 copy of them). Output: `Moments`: per
feature the pooled mean, std, range and excess kurtosis (central moments up to the fourth,
blocks combined with Pébay's pairwise formulas: no cancellation from a large offset); the excess
kurtosis within clips (of each clip's own standardized frames, pooled); across clips the spread
of the per-clip std (log10 of its 95th over its 5th percentile) and of the per-clip mean (5th to
95th percentile, in median per-clip stds); the share of clips within which the feature is
constant. Per-clip statistics come from `np.add.reduceat` within a block, over the clips of at
least `MIN_CLIP_FRAMES` frames (a shorter clip's std is mostly noise), at most
`CLIP_SAMPLE_VALUES` of them kept (every k-th clip beyond that).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from mer_cli.preprocess.scaling import CHUNK_VALUES, MIN_SPREAD

MIN_CLIP_FRAMES = 8  # clip-level statistics from clips of at least this many frames
MIN_CLIPS = 5  # clips in which a feature varies needed for its clip-level spreads
CLIP_SAMPLE_VALUES = 1 << 22  # per-clip statistics kept (clips x features), float32 each


@dataclass(frozen=True)
class Moments:
    """Per feature (each (D,) float64; nan where undefined) of one stream's clips."""

    mean: np.ndarray
    std: np.ndarray
    min: np.ndarray
    max: np.ndarray
    kurtosis: np.ndarray  # excess kurtosis of the pooled frames (nan: no spread)
    kurtosis_within_clips: np.ndarray  # of each clip's standardized frames, pooled (nan: none)
    clip_scale_spread: np.ndarray  # log10(p95 / p5) of the per-clip std (nan: under MIN_CLIPS)
    clip_offset_spread: np.ndarray  # (p95 - p5) of the per-clip means / median per-clip std
    constant_in_clips: np.ndarray  # share of the clips of 2+ frames in which it does not vary
    clips_profiled: int  # clips behind the clip-level statistics


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
    """Count, mean, central moment sums M2..M4, min and max per feature, float64, block by block."""

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


class _PerClip:
    """The per-clip statistics of the blocks seen so far."""

    def __init__(self, n_clips: int, n_features: int) -> None:
        # every k-th clip kept for the percentiles across clips, where there are too many
        self.stride = max(1, math.ceil(n_clips * n_features / CLIP_SAMPLE_VALUES))
        self.z4, self.frames_z, self.constant_in = (np.zeros(n_features) for _ in range(3))
        self.multi, self.seen = 0, 0
        self.stds: list[np.ndarray] = []
        self.means: list[np.ndarray] = []

    def update(self, x: np.ndarray, n: np.ndarray) -> None:
        starts = np.concatenate([[0], np.cumsum(n)[:-1]])
        clip_mean = np.add.reduceat(x, starts, axis=0) / n[:, None]  # (clips, D)
        dev = x - np.repeat(clip_mean, n, axis=0)
        dev2 = dev * dev
        clip_std = np.sqrt(np.add.reduceat(dev2, starts, axis=0) / n[:, None])
        clip_m4 = np.add.reduceat(dev2 * dev2, starts, axis=0) / n[:, None]
        varies = clip_std >= MIN_SPREAD
        self.constant_in += ((~varies) & (n >= 2)[:, None]).sum(axis=0)
        self.multi += int((n >= 2).sum())
        long = n >= MIN_CLIP_FRAMES
        within = long[:, None] & varies
        # a clip's standardized frames z: the sum of z^4 is T * m4 / std^4
        self.z4 += np.where(within, n[:, None] * clip_m4 / np.where(varies, clip_std, 1.0) ** 4, 0.0).sum(0)
        self.frames_z += np.where(within, n[:, None], 0).sum(axis=0)
        keep = long & ((self.seen + np.arange(len(n))) % self.stride == 0)
        self.stds.append(clip_std[keep].astype(np.float32))
        self.means.append(clip_mean[keep].astype(np.float32))
        self.seen += len(n)


def measure(clips: Iterable[np.ndarray], n_clips: int) -> Moments:
    """The `Moments` of ``clips`` (``n_clips`` of them, each (T, D)), in one pass."""
    pooled = _Pooled()
    per_clip: _PerClip | None = None
    for x, n in _blocks(clips):
        pooled.update(x)
        per_clip = per_clip or _PerClip(n_clips, x.shape[1])
        per_clip.update(x, n)
    if per_clip is None:
        raise ValueError("no training frames to profile")
    std = np.sqrt(pooled.m2 / pooled.n)
    with np.errstate(divide="ignore", invalid="ignore"):
        kurtosis = np.where(std >= MIN_SPREAD, pooled.n * pooled.m4 / pooled.m2**2 - 3.0, np.nan)
        within = np.where(per_clip.frames_z > 0, per_clip.z4 / per_clip.frames_z - 3.0, np.nan)
    stds, means = np.concatenate(per_clip.stds), np.concatenate(per_clip.means)
    scale, offset = _clip_spreads(stds, means)
    return Moments(
        mean=pooled.mean,
        std=std,
        min=pooled.min,
        max=pooled.max,
        kurtosis=kurtosis,
        kurtosis_within_clips=within,
        clip_scale_spread=scale,
        clip_offset_spread=offset,
        constant_in_clips=per_clip.constant_in / max(per_clip.multi, 1),
        clips_profiled=len(stds),
    )


def _clip_spreads(stds: np.ndarray, means: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per feature, over the clips where it varies (at least `MIN_CLIPS` of them, else nan):
    log10(p95 / p5) of the clips' stds, and (p95 - p5) of their means over their median std."""
    varies = stds >= MIN_SPREAD
    enough = varies.sum(axis=0) >= MIN_CLIPS
    if not len(stds):
        return np.full(stds.shape[1], np.nan), np.full(stds.shape[1], np.nan)
    masked = np.where(varies, stds.astype(np.float64), np.nan)
    centres = np.where(varies, means.astype(np.float64), np.nan)
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # all-nan columns: set to nan below anyway
        p5, p95 = np.nanpercentile(masked, [5, 95], axis=0)
        m5, m95 = np.nanpercentile(centres, [5, 95], axis=0)
        scale = np.where(enough, np.log10(p95 / p5), np.nan)
        offset = np.where(enough, (m95 - m5) / np.nanmedian(masked, axis=0), np.nan)
    return scale, offset

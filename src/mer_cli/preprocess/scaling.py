"""Feature scalers fitted by streaming over a stream's training clips, and a profile of those clips.

Input: the training clips of one stream, an iterable of (T, D) float arrays, read chunk by
chunk (never all frames at once, never a float64 copy of them). Output: a fitted `Scaler`
(plain-number `state` for the checkpoint, `transform` for any clip or batch of frames) and a
`Profile` (frame counts, feature ranges) for the log, with a warning when feature scales differ
by orders of magnitude.

Kinds (``preprocess.scaling``):
  standard    per feature, (x - mean) / std over all training frames (running moments, Chan's
              parallel formula, float64)
  robust      per feature, (x - median) / IQR: exact (numpy's percentiles) while the training
              frames hold at most `EXACT_MAX_VALUES` values, else refined fixed-bin histograms,
              each quantile within `ROBUST_TOLERANCE` x IQR (one more pass per refinement)
  per_clip    every clip standardized by its own frames: nothing is fitted
  signed_log  sign(x) * log1p(|x|), then standardized as ``standard`` (statistics of the
              compressed values)
A spread (std or IQR) below `MIN_SPREAD` is a constant feature: it is centred, never divided by
(no division by zero, no NaN); a robust feature whose IQR is zero (mostly one value) falls back
to its std. Under per_clip, a clip of one frame therefore becomes all zeros.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

import numpy as np

from mer_cli.core.errors import ConfigError

KINDS = ("standard", "robust", "per_clip", "signed_log")
MIN_SPREAD = 1e-8  # a std or IQR below this is a constant feature: centred, scale 1
CHUNK_VALUES = 1 << 20  # frame x feature values per streamed chunk (8 MiB in float64)
EXACT_MAX_VALUES = 1 << 22  # robust: up to this many frame x feature values (32 MiB), exact
ROBUST_TOLERANCE = 1e-4  # robust, streamed: each quantile within this fraction of the IQR
_BINS = 1024  # histogram bins per refinement pass
_MAX_PASSES = 12  # refinements: 1024**12 bins cover any float64 range
SCALE_RATIO_WARNING = 1e3  # largest / smallest per-feature std above this: the profile warns


def check_kind(kind: str) -> str:
    """``kind`` if it names a scaler, else a one-line `ConfigError` listing the valid ones."""
    if kind not in KINDS:
        raise ConfigError(f"preprocess.scaling={kind} is not one of: {', '.join(KINDS)}")
    return kind


def signed_log(x: np.ndarray) -> np.ndarray:
    """sign(x) * log1p(|x|) in float64: odd, monotone, ~x near 0, ~log|x| for large |x|."""
    x = np.asarray(x, dtype=np.float64)
    return np.sign(x) * np.log1p(np.abs(x))


def _spread_or_one(spread: np.ndarray) -> np.ndarray:
    spread = np.array(spread, dtype=np.float64)
    spread[~(spread >= MIN_SPREAD)] = 1.0  # constant feature: centred, never divided by ~0
    return spread


@dataclass(frozen=True)
class Scaler:
    """A fitted scaler of one stream: ``(f(x) - center) / scale`` per feature, where f is the
    identity or `signed_log`; under ``per_clip`` center and scale come from each clip itself."""

    kind: str
    center: np.ndarray | None  # (D,) float64; None for per_clip
    scale: np.ndarray | None  # (D,) float64, never below MIN_SPREAD; None for per_clip

    def transform(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """``x`` (T, D) scaled, as float32 (into ``out`` when given; ``out=x`` scales in place).

        Rows are independent frames (one clip or many) except under ``per_clip``, where ``x``
        is one clip's frames."""
        v = signed_log(x) if self.kind == "signed_log" else np.asarray(x, dtype=np.float64)
        if self.kind == "per_clip":  # the clip's own statistics (a clip of no frames stays empty)
            scaled = (v - v.mean(axis=0)) / _spread_or_one(v.std(axis=0)) if len(v) else v
        else:
            assert self.center is not None and self.scale is not None  # fitted: every other kind
            scaled = (v - self.center) / self.scale
        if out is None:
            return scaled.astype(np.float32)
        out[...] = scaled
        return out

    def state(self) -> dict[str, object]:
        """Plain numbers for the checkpoint (`from_state` rebuilds the same scaler)."""
        return {
            "kind": self.kind,
            "center": None if self.center is None else self.center.tolist(),
            "scale": None if self.scale is None else self.scale.tolist(),
        }

    @staticmethod
    def from_state(state: dict[str, object]) -> Scaler:
        center, scale = state["center"], state["scale"]
        return Scaler(
            check_kind(str(state["kind"])),
            None if center is None else np.asarray(center, dtype=np.float64),
            None if scale is None else np.asarray(scale, dtype=np.float64),
        )


# ---------------------------------------------------------------------------------------------
# What went through: the data profile


@dataclass(frozen=True)
class Profile:
    """Frame counts and per-feature value ranges of one stream's training clips."""

    n_clips: int
    min_frames: int
    max_frames: int
    feature_min: np.ndarray  # (D,)
    feature_max: np.ndarray  # (D,)
    feature_std: np.ndarray  # (D,)

    @property
    def n_constant(self) -> int:
        return int(np.sum(~(self.feature_std >= MIN_SPREAD)))

    def std_range(self) -> tuple[float, float]:
        """Smallest and largest std over the non-constant features ((nan, nan) if none)."""
        varying = self.feature_std[self.feature_std >= MIN_SPREAD]
        return (float(varying.min()), float(varying.max())) if len(varying) else (math.nan, math.nan)

    def summary(self, name: str) -> str:
        lo, hi = self.std_range()
        return (
            f"{name}: {self.n_clips} train clips of {self.min_frames}..{self.max_frames} frames, "
            f"{len(self.feature_std)} features, "
            f"values {self.feature_min.min():.3g}..{self.feature_max.max():.3g}, "
            f"per-feature std {lo:.3g}..{hi:.3g}, {self.n_constant} constant"
        )

    def warning(self, name: str, kind: str | None) -> str | None:
        """A warning line when the per-feature std spans more than `SCALE_RATIO_WARNING` and the
        chosen scaling (``kind``, None: none) does not already cope with it."""
        lo, hi = self.std_range()
        if not hi / lo > SCALE_RATIO_WARNING or kind in ("robust", "signed_log", "per_clip"):
            return None
        return (
            f"{name}: feature scales differ by orders of magnitude (per-feature std {lo:.3g} to "
            f"{hi:.3g}); preprocess.scaling=robust or preprocess.scaling=signed_log copes with that"
        )


class _Moments:
    """Running count, mean, sum of squared deviations (M2), min and max per feature, float64;
    chunks combined with the parallel formula of Chan, Golub & LeVeque."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: np.ndarray = np.zeros(0)
        self.m2: np.ndarray = np.zeros(0)
        self.min: np.ndarray = np.zeros(0)
        self.max: np.ndarray = np.zeros(0)

    def update(self, x: np.ndarray) -> None:
        nb = len(x)
        if nb == 0:
            return
        mb = x.mean(axis=0)
        m2b = ((x - mb) ** 2).sum(axis=0)
        if self.n == 0:
            self.n, self.mean, self.m2 = nb, mb, m2b
            self.min, self.max = x.min(axis=0), x.max(axis=0)
            return
        n = self.n + nb
        delta = mb - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + m2b + delta**2 * (self.n * nb / n)
        self.min, self.max = np.minimum(self.min, x.min(axis=0)), np.maximum(self.max, x.max(axis=0))
        self.n = n

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / max(self.n, 1))


def _chunks(clips: Iterable[np.ndarray], lengths: list[int] | None = None) -> Iterator[np.ndarray]:
    """The clips' frames as float64 chunks of about `CHUNK_VALUES` values (short clips grouped,
    so 150k tiny clips cost a few hundred numpy calls, and a chunk's memory stays bounded);
    ``lengths`` collects each clip's frame count."""
    parts: list[np.ndarray] = []
    values = 0
    for clip in clips:
        if lengths is not None:
            lengths.append(len(clip))
        parts.append(clip)
        values += clip.size
        if values >= CHUNK_VALUES:
            yield np.concatenate(parts).astype(np.float64)
            parts, values = [], 0
    if parts:
        yield np.concatenate(parts).astype(np.float64)


# ---------------------------------------------------------------------------------------------
# Fitting


def fit(
    kind: str | None, clips: Iterable[np.ndarray], exact_max_values: int = EXACT_MAX_VALUES
) -> tuple[Scaler | None, Profile]:
    """The ``kind`` scaler (None: no scaler) fitted on the training ``clips`` (each (T, D)) and
    their profile, in one streamed pass (robust scaling of more than ``exact_max_values`` values
    takes a few more: ``clips`` must then be re-iterable, e.g. a list of arrays or views)."""
    if kind is not None:
        check_kind(kind)
    lengths: list[int] = []
    raw, logged = _Moments(), _Moments()
    buffer: list[np.ndarray] | None = [] if kind == "robust" else None
    buffered = 0
    for x in _chunks(clips, lengths):
        raw.update(x)
        if kind == "signed_log":
            logged.update(signed_log(x))
        if buffer is not None:
            buffered += x.size
            if buffered <= exact_max_values:
                buffer.append(x)
            else:
                buffer = None  # too many values to hold: quartiles from histograms instead
    if raw.n == 0:
        raise ValueError("no training frames to fit a scaler on")
    profile = Profile(len(lengths), min(lengths), max(lengths), raw.min, raw.max, raw.std)

    if kind is None:
        return None, profile
    if kind == "per_clip":
        return Scaler(kind, None, None), profile
    if kind == "standard":
        return Scaler(kind, raw.mean, _spread_or_one(raw.std)), profile
    if kind == "signed_log":
        return Scaler(kind, logged.mean, _spread_or_one(logged.std)), profile
    # robust
    if buffer is not None:  # small enough: numpy's own percentiles
        q25, median, q75 = np.percentile(np.concatenate(buffer), [25, 50, 75], axis=0)
    else:
        if iter(clips) is clips:
            raise ValueError(
                "robust scaling of this many frames reads the clips again: pass a list, not an iterator"
            )
        q25, median, q75 = _streamed_quartiles(clips, raw)
    iqr = q75 - q25
    scale = np.where(iqr >= MIN_SPREAD, iqr, _spread_or_one(raw.std))  # IQR 0: fall back to std
    return Scaler(kind, np.asarray(median, dtype=np.float64), scale), profile


def _streamed_quartiles(clips: Iterable[np.ndarray], moments: _Moments) -> tuple[np.ndarray, ...]:
    """numpy's (linear) 25th, 50th and 75th percentiles per feature, from histogram refinement.

    Each percentile interpolates two order statistics (ranks k and k + 1 of the n values). Every
    pass counts, per rank and feature, the values below a bracket and in each of `_BINS` equal
    bins across it, then narrows the bracket to the bin that holds the rank: the first bracket is
    [min, max], each pass divides its width by `_BINS`. Passes stop when every bracket is
    narrower than `ROBUST_TOLERANCE` x the IQR (or `MIN_SPREAD`); the estimate is the bracket's
    midpoint, so each order statistic, and each percentile, is off by at most half that width."""
    n = moments.n
    positions = (n - 1) * np.array([0.25, 0.5, 0.75])
    below_rank = np.floor(positions).astype(np.int64)
    ranks = np.stack([below_rank, np.minimum(below_rank + 1, n - 1)], axis=1).reshape(-1)  # (6,)
    n_features = len(moments.mean)
    lo = np.repeat(moments.min[None, :], len(ranks), axis=0)  # (6, D) lower bracket edges
    width = np.repeat(((moments.max - moments.min) * (1 + 1e-9) + 1e-300)[None, :], len(ranks), axis=0)

    def estimates() -> np.ndarray:
        order = (lo + width / 2).reshape(3, 2, n_features)  # (quartile, k | k+1, D)
        frac = (positions - below_rank)[:, None]
        return order[:, 0] + frac * (order[:, 1] - order[:, 0])

    for _ in range(_MAX_PASSES):
        q = estimates()
        tolerance = ROBUST_TOLERANCE * np.maximum(q[2] - q[0], MIN_SPREAD)
        if np.all(width / 2 <= tolerance[None, :]):
            break
        bin_width = width / _BINS
        below = np.zeros((len(ranks), n_features), dtype=np.int64)
        counts = np.zeros((len(ranks), n_features * _BINS), dtype=np.int64)
        offsets = np.arange(n_features) * _BINS
        # ranks k and k + 1 mostly share a bracket: counted once then
        same = [r > 0 and np.array_equal(lo[r], lo[r - 1]) for r in range(len(ranks))]
        for x in _chunks(clips):
            for r in range(len(ranks)):
                if same[r]:
                    continue
                idx = np.floor((x - lo[r]) / bin_width[r])
                below[r] += (idx < 0).sum(axis=0)
                inside = (idx >= 0) & (idx < _BINS)
                flat = (idx.astype(np.int64) + offsets)[inside]
                counts[r] += np.bincount(flat, minlength=n_features * _BINS)
        for r in range(len(ranks)):
            if same[r]:
                below[r], counts[r] = below[r - 1], counts[r - 1]
        cum = below[:, :, None] + np.cumsum(counts.reshape(len(ranks), n_features, _BINS), axis=2)
        holds = cum > ranks[:, None, None]  # bins at or past the rank
        # float rounding at a bin edge can leave a rank past the last bin: keep the last one
        b = np.where(holds.any(axis=2), holds.argmax(axis=2), _BINS - 1)
        lo, width = lo + b * bin_width, bin_width
    q = estimates()
    return q[0], q[1], q[2]


def with_frame_counts(profile: Profile, lengths: Iterable[int]) -> Profile:
    """``profile`` with its frame-count range from ``lengths`` (e.g. before clips were cut)."""
    counts = list(lengths)
    return replace(profile, min_frames=min(counts), max_frames=max(counts))

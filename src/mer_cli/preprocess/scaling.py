"""Feature scalers fitted by streaming over a stream's training clips.

Input: the training clips of one stream, an iterable of (T, D) float arrays, read chunk by
chunk (never all frames at once, never a float64 copy of them). Output: a fitted `Scaler`
(plain-number `state` for the checkpoint, `transform` for any clip or batch of frames). What the
clips look like (and which kind ``preprocess.scaling=auto`` picks) is the data profile's
(`preprocess.profile`).

Kinds (``preprocess.scaling``, or the one auto chose):
  standard    per feature, (x - mean) / std over all training frames (running moments, Chan's
              parallel formula, float64)
  robust      per feature, (x - median) / IQR: exact (numpy's percentiles) while the training
              frames hold at most `EXACT_MAX_VALUES` values, else refined fixed-bin histograms,
              each quantile within `ROBUST_TOLERANCE` x IQR (one more pass per refinement)
  per_clip    every clip standardized by its own frames: nothing is fitted
  signed_log  sign(x) * log1p(|x|), then standardized as ``standard`` (statistics of the
              compressed values)
  signed_log_per_clip  sign(x) * log1p(|x|), then each clip standardized by its own compressed
              frames (nothing is fitted): a clip's scale becomes an offset, which its own mean takes
A spread (std or IQR) below `MIN_SPREAD` is a constant feature: it is centred, never divided by
(no division by zero, no NaN); a robust feature whose IQR is zero (mostly one value) falls back
to its std. Under per_clip, a clip of one frame therefore becomes all zeros.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from mer_cli.core.errors import ConfigError

KINDS = ("standard", "robust", "per_clip", "signed_log", "signed_log_per_clip")
AUTO = "auto"  # preprocess.scaling=auto: the data profile picks one of KINDS per stream
PER_CLIP_KINDS = ("per_clip", "signed_log_per_clip")  # nothing fitted: each clip by its own frames
LOG_KINDS = ("signed_log", "signed_log_per_clip")  # sign(x) log1p(|x|) first
MIN_SPREAD = 1e-8  # a std or IQR below this is a constant feature: centred, scale 1
CHUNK_VALUES = 1 << 20  # frame x feature values per streamed chunk (8 MiB in float64)
EXACT_MAX_VALUES = 1 << 22  # robust: up to this many frame x feature values (32 MiB), exact
ROBUST_TOLERANCE = 1e-4  # robust, streamed: each quantile within this fraction of the IQR
_BINS = 1024  # histogram bins per refinement pass
_MAX_PASSES = 12  # refinements: 1024**12 bins cover any float64 range


def check_kind(kind: str) -> str:
    """``kind`` if it names a scaler, else a one-line `ConfigError` listing the valid ones."""
    if kind not in KINDS:
        raise ConfigError(f"preprocess.scaling={kind} is not one of: {', '.join(KINDS)}")
    return kind


def check_setting(setting: str) -> str:
    """``preprocess.scaling``: a scaler's kind or ``auto``, else one `ConfigError` line."""
    if setting not in (*KINDS, AUTO):
        raise ConfigError(f"preprocess.scaling={setting} is not one of: {', '.join((*KINDS, AUTO))}")
    return setting


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
    center: np.ndarray | None  # (D,) float64; None for the PER_CLIP_KINDS
    scale: np.ndarray | None  # (D,) float64, never below MIN_SPREAD; None for the PER_CLIP_KINDS

    def transform(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """``x`` (T, D) scaled, as float32 (into ``out`` when given; ``out=x`` scales in place).

        Rows are independent frames (one clip or many) except under ``per_clip``, where ``x``
        is one clip's frames."""
        v = signed_log(x) if self.kind in LOG_KINDS else np.asarray(x, dtype=np.float64)
        if self.kind in PER_CLIP_KINDS:  # the clip's own statistics (a clip of no frames stays empty)
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


def _chunks(clips: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    """The clips' frames as float64 chunks of about `CHUNK_VALUES` values (short clips grouped,
    so 150k tiny clips cost a few hundred numpy calls, and a chunk's memory stays bounded)."""
    parts: list[np.ndarray] = []
    values = 0
    for clip in clips:
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
) -> Scaler | None:
    """The ``kind`` scaler (None: no scaler) fitted on the training ``clips`` (each (T, D)), in
    one streamed pass (robust scaling of more than ``exact_max_values`` values takes a few more:
    ``clips`` must then be re-iterable, e.g. a list of arrays or views); the per-clip kinds read
    nothing."""
    if kind is None:
        return None
    check_kind(kind)
    if kind in PER_CLIP_KINDS:
        return Scaler(kind, None, None)
    raw, logged = _Moments(), _Moments()
    buffer: list[np.ndarray] | None = [] if kind == "robust" else None
    buffered = 0
    for x in _chunks(clips):
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
    if kind == "standard":
        return Scaler(kind, raw.mean, _spread_or_one(raw.std))
    if kind == "signed_log":
        return Scaler(kind, logged.mean, _spread_or_one(logged.std))
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
    return Scaler(kind, np.asarray(median, dtype=np.float64), scale)


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

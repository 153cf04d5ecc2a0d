"""Per-frame validity masks honoured before anything is fitted: the frames a face back-end could
not measure (`data.splits.Split.valid`) are treated as padding is.

Input: a stream's clips (a sequence of (T_i, F) arrays, usually ragged `data.splits.Clips`) and
its masks (``masks[i]``: clip i's (T_i,) bool, True where the frame was measured). Output: a view
of the clips, prepared clip by clip when read (no copy of the split):

- `Compacted` (a stream with its own encoder: single-stream models, late fusion's members, joint,
  xattn): every invalid frame left out, the valid ones shifted together and the clip's length
  reduced. Every encoder is exact under padding, so the model's output is exactly that of the
  clip without those frames; target lengths and scalers fitted on it see valid frames only.
- `Filled` (early fusion, whose fused frame joins the streams and cannot be half removed): each
  invalid frame's values interpolated linearly from the nearest valid frames on either side (the
  first or last valid frame held beyond them), before the streams are aligned; lengths kept.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import cached_property
from typing import overload

import numpy as np

from mer_cli.core.errors import ConfigError

# data.frame_validity: honour the stored masks (as padding), or ignore them (the values as the
# back-end filled them: interpolated, zeroed or kept, per its invalid_frames setting)
RULES = ("honour", "ignore")


def check_rule(value: object) -> str:
    """``data.frame_validity`` as one of `RULES`, or one ConfigError line."""
    if value not in RULES:
        raise ConfigError(f"data.frame_validity={value!r}: valid: {', '.join(RULES)}")
    return str(value)


def interpolate_invalid(x: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """``x`` (T, F) with each invalid frame (``valid`` False) replaced by the linear interpolation
    of the nearest valid frames before and after it (in time); before the first valid frame its
    values are held, after the last one the last's. ``valid`` must hold at least one True."""
    if valid.all():
        return x
    kept = np.flatnonzero(valid)
    missing = np.flatnonzero(~valid)
    after = np.searchsorted(kept, missing)  # the first valid frame past each missing one
    hi = kept[np.minimum(after, len(kept) - 1)]
    lo = kept[np.maximum(after - 1, 0)]
    span = np.where(hi > lo, hi - lo, 1)
    w = np.where(hi > lo, (missing - lo) / span, 0.0)[:, None]  # 0 beyond the ends: held
    out = x.astype(np.float64, copy=True)
    out[missing] = out[lo] * (1 - w) + out[hi] * w
    return out.astype(x.dtype)


class _Masked(Sequence[np.ndarray]):
    """Clips read with their masks; the subclasses say what becomes of the invalid frames."""

    def __init__(self, clips: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> None:
        self.clips, self.masks = clips, masks

    def __len__(self) -> int:
        return len(self.clips)

    @overload
    def __getitem__(self, i: int) -> np.ndarray: ...
    @overload
    def __getitem__(self, i: slice) -> _Masked: ...
    def __getitem__(self, i: int | slice) -> np.ndarray | _Masked:
        if isinstance(i, slice):
            return self.take(range(len(self))[i])
        return self.read(self.clips[i], np.asarray(self.masks[i], dtype=bool))

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))

    def read(self, x: np.ndarray, valid: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @property
    def n_features(self) -> int:
        n = getattr(self.clips, "n_features", None)
        return int(n) if n is not None else int(self.clips[0].shape[1])

    @property
    def in_memory(self) -> bool:
        return bool(getattr(self.clips, "in_memory", True))

    def take(self, idx: Sequence[int]) -> _Masked:
        idx = list(idx)
        parts = [p.take(idx) if hasattr(p, "take") else [p[i] for i in idx] for p in (self.clips, self.masks)]
        return type(self)(*parts)


class Compacted(_Masked):
    """``compacted[i]``: clip i's valid frames only, in order, (n_valid_i, F)."""

    def read(self, x: np.ndarray, valid: np.ndarray) -> np.ndarray:
        return x if valid.all() else x[valid]

    @cached_property
    def lengths(self) -> np.ndarray:
        """(N,) int64: each clip's count of valid frames (from the masks: no frame is read)."""
        return valid_counts(self.masks)


class Filled(_Masked):
    """``filled[i]``: clip i with its invalid frames interpolated (`interpolate_invalid`), (T_i, F)."""

    def read(self, x: np.ndarray, valid: np.ndarray) -> np.ndarray:
        return interpolate_invalid(x, valid)

    @property
    def lengths(self) -> np.ndarray:
        lengths = getattr(self.clips, "lengths", None)
        return np.asarray(lengths) if lengths is not None else np.array([len(x) for x in self.clips])


def valid_counts(masks: Sequence[np.ndarray]) -> np.ndarray:
    """(N,) int64: each clip's count of valid frames (ragged masks counted on their stores)."""
    counts = getattr(masks, "counts", None)
    if counts is not None:
        return np.asarray(counts(), dtype=np.int64)
    return np.array([int(np.count_nonzero(m)) for m in masks], dtype=np.int64)

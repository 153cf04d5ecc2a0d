"""Early fusion's input: streams at different frame rates aligned to the first one's
frames and concatenated per frame, e.g. mfcc (T_a, D_a) + action units (T_v, D_v)
-> (T_a, D_a + D_v), clip by clip when read (no copy).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import overload

import numpy as np


def stretch_frames(x: np.ndarray, n_frames: int) -> np.ndarray:
    """Linearly interpolate ``x`` (T, F) along time to ``n_frames`` frames.

    Output frame i samples input time ``i * (T - 1) / (n_frames - 1)``: the first and last frames
    are kept. That is the grid of the notebook's ``scipy.ndimage.zoom(x, (n_frames / T, 1),
    order=1)``, with one difference: zoom computes the last position in floating point, which for
    some sizes (e.g. 16 -> 80, 8 -> 26) lands a hair past T - 1, and in zoom's default
    ``mode="constant"`` that frame is outside the input and written as 0. mer-cli keeps the last
    input frame there (as zoom does with ``mode="nearest"``), so the fused clip does not end in
    a frame of zero action units. Every other frame equals zoom's.
    """
    t_in = x.shape[0]
    if n_frames == 1 or t_in == 1:
        return np.repeat(x[:1], n_frames, axis=0)
    pos = np.arange(n_frames) * ((t_in - 1) / (n_frames - 1))
    lo = np.minimum(np.floor(pos).astype(np.int64), t_in - 1)
    hi = np.minimum(lo + 1, t_in - 1)
    w = (pos - lo)[:, None].astype(x.dtype)
    return x[lo] * (1 - w) + x[hi] * w


def early_fuse(first: np.ndarray, *others: np.ndarray) -> np.ndarray:
    """Per-frame concatenation at the first stream's frame rate: every other stream is stretched
    to its frame count, e.g. mfcc (T_a, D_a) + aus (T_v, D_v) -> (T_a, D_a + D_v)."""
    return np.concatenate([first, *(stretch_frames(x, first.shape[0]) for x in others)], axis=1)


class EarlyFused(Sequence[np.ndarray]):
    """Clips of several streams fused per clip when read (`early_fuse`): ``fused[i]`` is
    (T_i of the first stream, sum of features); no fused copy of the split is ever held.
    ``parts``: each stream's clips (sequences of (T, D) arrays, all of the same length)."""

    def __init__(self, parts: Sequence[Sequence[np.ndarray]]) -> None:
        self.parts = tuple(parts)

    def __len__(self) -> int:
        return len(self.parts[0])

    @overload
    def __getitem__(self, i: int) -> np.ndarray: ...
    @overload
    def __getitem__(self, i: slice) -> EarlyFused: ...
    def __getitem__(self, i: int | slice) -> np.ndarray | EarlyFused:
        if isinstance(i, slice):
            return self.take(range(len(self))[i])
        return early_fuse(*(p[i] for p in self.parts))

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))

    @property
    def lengths(self) -> np.ndarray:
        """(N,) frame counts: the first stream's (the fused clip is at its frame rate)."""
        first = self.parts[0]
        lengths = getattr(first, "lengths", None)
        return np.asarray(lengths) if lengths is not None else np.array([len(x) for x in first])

    @property
    def n_features(self) -> int:
        return sum(int(getattr(p, "n_features", None) or p[0].shape[1]) for p in self.parts)

    @property
    def in_memory(self) -> bool:
        return all(getattr(p, "in_memory", True) for p in self.parts)

    def take(self, idx: Sequence[int]) -> EarlyFused:
        idx = list(idx)
        return EarlyFused([p.take(idx) if hasattr(p, "take") else [p[i] for i in idx] for p in self.parts])

"""Fusion of streams: early (align frames, concatenate) and late (combine probabilities).

Early fusion input: one clip's frames of each stream, e.g. mfcc (T_a, D_a) and action units
(T_v, D_v); output (T_a, D_a+D_v), at the first stream's frame rate.
Late fusion input: per-clip class probabilities of an acoustic and a visual model; output the same.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import log_loss


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


def late_fuse(prob_acoustic: np.ndarray, prob_visual: np.ndarray, acoustic_weight: float) -> np.ndarray:
    """Weighted average of class probabilities (N, C); 0.5 is the notebook's plain average."""
    return acoustic_weight * prob_acoustic + (1.0 - acoustic_weight) * prob_visual


def fit_acoustic_weight(
    prob_acoustic: np.ndarray, prob_visual: np.ndarray, y_true: np.ndarray, n_classes: int
) -> float:
    """The weight in [0, 1] (steps of 0.05) with the lowest log loss on *validation* predictions.

    Fitted on validation, never on test: the test split must not choose its own fusion.
    """
    grid = np.linspace(0.0, 1.0, 21)
    losses = [
        log_loss(
            y_true,
            np.clip(late_fuse(prob_acoustic, prob_visual, w), 1e-7, 1.0),
            labels=list(range(n_classes)),
        )
        for w in grid
    ]
    return float(grid[int(np.argmin(losses))])

"""1-nearest-neighbour classification with dynamic time warping: the classic time-series baseline.

Input: per stream, the clips of a query set and of the reference (training) set, each (T, D)
frames; the Sakoe-Chiba window as a fraction of the longer clip. Output: each query's nearest
reference (index, distance), and from that the baseline's labels.

The distance (`distance`, and the compiled kernels below):
  - each clip is z-normalised per feature over its own frames (the UCR archive's convention: a
    constant feature becomes 0), so DTW compares shapes, not offsets or gains;
  - dependent multivariate DTW per stream: the cost of matching frame i of one clip with frame
    j of the other is the squared Euclidean distance of the two D-vectors, and the distance is
    the least total cost of a warping path (steps right, down, diagonal), not square-rooted;
  - the window of radius ``r = ceil(window * max(n, m))`` frames around the stretched diagonal:
    along the longer clip (length L, index k), the shorter one's (length l) frames
    ``floor(k (l-1)/(L-1)) - r`` to ``ceil(k (l-1)/(L-1)) + r`` may match frame k. For equal
    lengths this is the usual band ``|i - j| <= r`` (r = 0: the Euclidean distance); for unequal
    ones with r = 0 it is the diagonal of the stretched series, one or two frames wide, and it
    always holds a path. The same rule whichever clip comes first, so the distance is symmetric;
  - several streams: each stream's distance divided by its own scale (the median distance of
    that stream between random pairs of training clips, `stream_scales`) and summed, so that a
    stream with more frames or more features does not decide alone.

The search (`nearest`) visits the references of each query in the order of a lower bound
(LB_Keogh: every frame of the query must match some frame of the reference within the window,
so it costs at least its squared distance to the window's per-feature envelope) and stops when
the bound exceeds the best distance found; DTW itself abandons a reference once a whole row of
its cost matrix exceeds what is left to beat. Both only skip references that cannot be nearer,
so the neighbours are those of the exhaustive search (ties: the lowest reference index).

The kernels (`dtw_kernels`) are compiled with numba (the ``baselines`` extra); without it `kernels`
raises one ConfigError line naming the extra.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from mer_cli.core.errors import ConfigError

# pairs of training clips whose median DTW distance is a stream's scale (`stream_scales`)
SCALE_PAIRS = 256


def kernels() -> ModuleType:
    """`dtw_kernels` (numba); one ConfigError line naming the extra when numba is not installed."""
    try:
        from mer_cli.evaluation.baselines import dtw_kernels
    except ImportError as e:
        if e.name != "numba":
            raise
        raise ConfigError(
            "report.methods includes dtw: 1-NN DTW needs numba: pip install 'mer-cli[baselines]'"
        ) from None
    return dtw_kernels


@dataclass(frozen=True)
class Packed:
    """One stream's clips z-normalised and end to end: ``frames`` (sum T, D) float64 and
    ``offsets`` (N + 1,): clip i is ``frames[offsets[i]:offsets[i + 1]]``."""

    frames: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def clip(self, i: int) -> np.ndarray:
        return self.frames[self.offsets[i] : self.offsets[i + 1]]


_threads = os.cpu_count() or 1  # `nearest`'s threads (`use_threads`)


def use_threads(threads: int) -> None:
    """`nearest`'s queries on ``threads`` threads (by default one per CPU)."""
    global _threads
    _threads = max(1, int(threads))


def znormalise(x: np.ndarray) -> np.ndarray:
    """(T, D) -> (T, D) float64: each feature minus its mean over the clip, over its std (ddof 0);
    a constant feature becomes 0."""
    x = np.asarray(x, dtype=np.float64)
    centred = x - x.mean(axis=0)
    std = x.std(axis=0)
    return np.divide(centred, std, out=np.zeros_like(centred), where=std > 0)


def pack(clips: Sequence[np.ndarray]) -> Packed:
    """Clips (each (T_i, D)) z-normalised (`znormalise`) and packed end to end."""
    offsets = np.concatenate([[0], np.cumsum([len(c) for c in clips])]).astype(np.int64)
    width = int(np.asarray(clips[0]).shape[1]) if len(clips) else 0
    frames = np.concatenate([znormalise(c) for c in clips]) if len(clips) else np.zeros((0, width))
    return Packed(np.ascontiguousarray(frames), offsets)


def distance(a: np.ndarray, b: np.ndarray, window: float) -> float:
    """The DTW distance of two clips (each (T, D), z-normalised here) within ``window``."""
    k = kernels()
    a, b = znormalise(a), znormalise(b)
    lo, hi = np.empty(len(a), np.int64), np.empty(len(a), np.int64)
    k.band(len(a), len(b), k.radius(window, len(a), len(b)), lo, hi)
    return float(k.dtw(a, b, lo, hi, np.inf, np.zeros(len(a))))


def _nothing(n: int) -> Packed:
    """``n`` clips of one frame without features: a stream whose distances are all 0."""
    return Packed(np.zeros((n, 0)), np.arange(n + 1, dtype=np.int64))


def stream_scales(references: Sequence[Packed], window: float, seed: int = 0) -> np.ndarray:
    """(S,): per stream, the median DTW distance between SCALE_PAIRS random pairs of distinct
    reference clips (training clips only); 1 where that median is 0 or there is no pair."""
    n = len(references[0])
    out = np.ones(len(references))
    if n < 2:
        return out
    rng = np.random.default_rng(seed)
    first = rng.integers(0, n, SCALE_PAIRS)
    second = (first + rng.integers(1, n, SCALE_PAIRS)) % n  # never the clip itself
    pairs = np.stack([first, second], axis=1).astype(np.int64)
    for s, ref in enumerate(references):
        d = kernels().pair_distances(ref.frames, ref.offsets, pairs, float(window))
        median = float(np.median(d))
        out[s] = median if median > 0 else 1.0
    return out


def nearest(
    queries: Sequence[Packed],
    references: Sequence[Packed],
    window: float,
    scales: np.ndarray,
    exhaustive: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Each query's nearest reference: (Q,) int64 indices and (Q,) float64 distances (the sum over
    streams of DTW / scale). ``queries[s]``, ``references[s]``: stream s of every clip.
    ``exhaustive``: every distance computed in full, no pruning (the reference of the tests)."""
    if len({len(q) for q in queries}) != 1 or len({len(r) for r in references}) != 1:
        raise ValueError("every stream needs the same clips")
    if not len(references[0]):
        raise ValueError("no reference clip")
    # the cheapest stream first (frames squared times features): what it costs exactly is then
    # known before the dearer one starts, which can then be abandoned earlier
    cost = [float(np.mean(np.diff(r.offsets).astype(float) ** 2)) * r.frames.shape[1] for r in references]
    order = list(np.argsort(cost, kind="stable"))
    queries, references = [queries[s] for s in order], [references[s] for s in order]
    scales = np.asarray(scales, dtype=np.float64)[order]
    if len(order) == 1:  # compiled for two streams: the other one empty (one frame, no feature: 0)
        queries, references = (
            [_nothing(len(queries[0])), *queries],
            [_nothing(len(references[0])), *references],
        )
        scales = np.concatenate([[1.0], scales])
    arguments: tuple[Any, ...] = (
        tuple(q.frames for q in queries),
        tuple(q.offsets for q in queries),
        tuple(r.frames for r in references),
        tuple(r.offsets for r in references),
        scales,
        float(window),
        bool(exhaustive),
        # lb_keogh's scratch: 4 m D values for the longest reference of each stream
        max(4 * int(np.diff(r.offsets).max()) * r.frames.shape[1] for r in references),
    )
    n = len(queries[0])
    index, dist = np.zeros(n, np.int64), np.zeros(n)
    kernel = kernels().nearest
    # the kernel holds no GIL: threads share the queries, in chunks (each writes its own rows)
    chunks = np.array_split(np.arange(n), min(n, 8 * _threads)) if n else []

    def run(chunk: np.ndarray) -> None:
        kernel(*arguments, int(chunk[0]), int(chunk[-1]) + 1, index, dist)

    with ThreadPoolExecutor(max_workers=_threads) as pool:
        list(pool.map(run, [c for c in chunks if len(c)]))  # list: an error in a thread is raised here
    return index, dist

"""The compiled kernels of `dtw` (numba): the window, DTW with early abandoning, LB_Keogh and the
pruned 1-NN search. Imported only through `dtw.kernels`, which says which extra installs numba.

Arrays: a clip is (T, D) float64, z-normalised; a stream's clips are ``frames`` (sum T, D) with
``offsets`` (N + 1,); a window is, per frame i of the first clip, the frames ``lo[i]..hi[i]`` of
the second that it may match (both non-decreasing in i). Compiled functions are cached on disk.
"""

from __future__ import annotations

import math

import numba
import numpy as np

# pruning skips a reference only when its bound or partial cost exceeds the best distance by this
# relative margin, so floating-point rounding of a bound equal to the distance never drops a tie
PRUNE_SLACK = 1e-9
# `nearest`: references measured in full first, per query; their bounds decide whether the bounds
# of the rest are worth computing (at least this share of the probed ones ruled out by them)
PROBE = 8
PRUNE_WORTH = 0.25
# a DTW computes its bound's per-row shares when the bound is at least this share of its budget
TAILS_FROM = 0.1


@numba.njit(cache=True, nogil=True)
def radius(window: float, n: int, m: int) -> int:
    """The window's radius in frames for clips of ``n`` and ``m`` frames: ceil(window * max)."""
    return math.ceil(window * max(n, m) - 1e-12)  # 0.05 * 300 is 15.000000000000002


@numba.njit(cache=True, nogil=True)
def band(n: int, m: int, r: int, lo: np.ndarray, hi: np.ndarray) -> None:
    """Fill ``lo``, ``hi`` (n,) with the window of radius ``r`` between clips of n and m frames,
    defined along the longer clip (`dtw`'s module doc)."""
    if n >= m:
        for i in range(n):
            if n == 1:
                f = c = 0
            else:
                f = (i * (m - 1)) // (n - 1)
                c = -((-i * (m - 1)) // (n - 1))
            lo[i] = max(0, f - r)
            hi[i] = min(m - 1, c + r)
        return
    # along the second clip's frames k: the first clip's rows floor(.) - r .. ceil(.) + r; then
    # per row the range of k that reach it
    for i in range(n):
        lo[i] = m
        hi[i] = -1
    for k in range(m):
        f = (k * (n - 1)) // (m - 1)
        c = -((-k * (n - 1)) // (m - 1))
        for i in range(max(0, f - r), min(n - 1, c + r) + 1):
            lo[i] = min(lo[i], k)
            hi[i] = max(hi[i], k)


# reassociation lets the per-frame sum of squares use SIMD lanes; no fast-math flag that assumes
# finite values (inf marks the cells outside the window)
@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract", "nsz"})
def dtw(
    a: np.ndarray, b: np.ndarray, lo: np.ndarray, hi: np.ndarray, limit: float, tail: np.ndarray
) -> float:
    """The least cost of a warping path from (0, 0) to (n-1, m-1) within the window, the cost of a
    cell the squared Euclidean distance of the two frames. inf as soon as the cheapest cell of a
    row i plus ``tail[i]`` (a lower bound of what rows i+1.. still cost: zeros, or the suffix sums
    of `lb_keogh`'s rows) exceeds ``limit``: every path crosses every row, and costs only add up."""
    n, m, d = a.shape[0], b.shape[0], a.shape[1]
    # column j of the cost matrix at index j + 1 (index 0: the column before the first); inf
    # outside the window of the row each buffer holds
    prev = np.full(m + 1, np.inf)
    cur = np.full(m + 1, np.inf)
    prev[0] = 0.0  # the path starts at (0, 0): as if from a cell (-1, -1) that cost nothing
    for i in range(n):
        row_min = np.inf
        left = np.inf
        for j in range(lo[i], hi[i] + 1):
            cost = 0.0
            for f in range(d):
                diff = a[i, f] - b[j, f]
                cost += diff * diff
            value = cost + min(prev[j + 1], prev[j], left)
            cur[j + 1] = value
            left = value
            row_min = min(row_min, value)
        if row_min + tail[i] > limit:
            return np.inf
        if i == 0:
            prev[0] = np.inf
        else:  # row i - 1 is done with: its buffer is all inf again before it takes row i + 1
            for j in range(lo[i - 1], hi[i - 1] + 1):
                prev[j + 1] = np.inf
        prev, cur = cur, prev
    return float(prev[m])


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract", "nsz"})
def lb_keogh(
    a: np.ndarray, b: np.ndarray, lo: np.ndarray, hi: np.ndarray, rows: np.ndarray, scratch: np.ndarray
) -> float:
    """A lower bound of `dtw` (LB_Keogh): the sum over a's frames i of the squared distance,
    feature by feature, to b's min..max over a span of frames holding ``lo[i]..hi[i]`` (frame i
    matches one of those at least). Each frame's share goes to ``rows`` (n,).

    The spans all have the width of the widest window row (one or two frames wider than a row
    where the clips' lengths differ: a looser bound, still a bound), so every envelope comes
    from running maxima within blocks of that width, forward and backward (van Herk and
    Gil-Werman), without a branch on the data. ``scratch``: at least 4 m D float64."""
    n, m, d = a.shape[0], b.shape[0], a.shape[1]
    width = 1
    for i in range(n):
        width = max(width, hi[i] - lo[i] + 1)
    width = min(width, m)
    last = m - width  # the last span's first frame
    # scratch[((w * m) + k) * d + f]: w = 0, 1 the max and min from the start of k's block to k;
    # w = 2, 3 from k to the end of its block
    for k in range(m):
        first = k % width == 0
        for f in range(d):
            x = b[k, f]
            here = k * d + f
            scratch[here] = x if first else max(scratch[here - d], x)
            scratch[m * d + here] = x if first else min(scratch[m * d + here - d], x)
    for k in range(m - 1, -1, -1):
        first = k == m - 1 or (k + 1) % width == 0
        for f in range(d):
            x = b[k, f]
            here = 2 * m * d + k * d + f
            scratch[here] = x if first else max(scratch[here + d], x)
            scratch[m * d + here] = x if first else min(scratch[m * d + here + d], x)
    total = 0.0
    for i in range(n):
        start = min(lo[i], last)
        end = start + width - 1  # the span start..end crosses at most one block boundary
        share = 0.0
        for f in range(d):
            upper = max(scratch[2 * m * d + start * d + f], scratch[end * d + f])
            lower = min(scratch[3 * m * d + start * d + f], scratch[m * d + end * d + f])
            gap = max(a[i, f] - upper, 0.0) + max(lower - a[i, f], 0.0)
            share += gap * gap
        rows[i] = share
        total += share
    return total


@numba.njit(cache=True, nogil=True)
def pair_distances(frames: np.ndarray, offsets: np.ndarray, pairs: np.ndarray, window: float) -> np.ndarray:
    """(P,): `dtw` of the clip pairs ``pairs`` (P, 2) of one stream."""
    out = np.empty(pairs.shape[0])
    for p in range(pairs.shape[0]):
        a = frames[offsets[pairs[p, 0]] : offsets[pairs[p, 0] + 1]]
        b = frames[offsets[pairs[p, 1]] : offsets[pairs[p, 1] + 1]]
        n, m = a.shape[0], b.shape[0]
        lo = np.empty(n, np.int64)
        hi = np.empty(n, np.int64)
        band(n, m, radius(window, n, m), lo, hi)
        out[p] = dtw(a, b, lo, hi, np.inf, np.zeros(n))
    return out


@numba.njit(cache=True, nogil=True)
def _pair(q_frames, q_offsets, r_frames, r_offsets, s, q, k, window):
    """Stream ``s`` of query ``q`` and reference ``k``, and their window: (a, b, lo, hi)."""
    a = q_frames[s][q_offsets[s][q] : q_offsets[s][q + 1]]
    b = r_frames[s][r_offsets[s][k] : r_offsets[s][k + 1]]
    n, m = a.shape[0], b.shape[0]
    lo = np.empty(n, np.int64)
    hi = np.empty(n, np.int64)
    band(n, m, radius(window, n, m), lo, hi)
    return a, b, lo, hi


@numba.njit(cache=True, nogil=True)
def _distance(q_frames, q_offsets, r_frames, r_offsets, scales, window, q, k, best, bounds, scratch):
    """Query ``q`` to reference ``k``: the sum over streams of DTW / scale, or inf as soon as it
    cannot be below ``best``. ``bounds`` (S,): each stream's LB_Keogh / scale (zeros: none)."""
    total = 0.0
    for s in range(len(scales)):
        a, b, lo, hi = _pair(q_frames, q_offsets, r_frames, r_offsets, s, q, k, window)
        # what is left to spend on this stream: the best, less the streams before and after it
        budget = best - total + PRUNE_SLACK * best
        for later in range(s + 1, len(scales)):
            budget -= bounds[later]
        tail = np.zeros(a.shape[0])
        if bounds[s] > TAILS_FROM * budget:  # a bound this large abandons earlier row by row
            lb_keogh(a, b, lo, hi, tail, scratch)
            after = 0.0  # the shares of the rows after row i
            for i in range(a.shape[0] - 1, -1, -1):
                share = tail[i]
                tail[i] = after
                after += share
        total += dtw(a, b, lo, hi, budget * scales[s], tail) / scales[s]
        if total == np.inf:
            break
    return total


@numba.njit(cache=True, nogil=True)
def _bounds(q_frames, q_offsets, r_frames, r_offsets, scales, window, q, k, bounds, scratch):
    """Fill ``bounds`` (S,) with each stream's LB_Keogh / scale of query ``q`` to reference ``k``;
    return their sum."""
    total = 0.0
    for s in range(len(scales)):
        a, b, lo, hi = _pair(q_frames, q_offsets, r_frames, r_offsets, s, q, k, window)
        bounds[s] = lb_keogh(a, b, lo, hi, np.empty(a.shape[0]), scratch) / scales[s]
        total += bounds[s]
    return total


@numba.njit(cache=True, nogil=True)
def nearest(
    q_frames,
    q_offsets,
    r_frames,
    r_offsets,
    scales,
    window,
    exhaustive,
    scratch_size,
    first,
    stop,
    index,
    dist,
):
    """For queries ``first`` .. ``stop - 1``, the reference with the least sum over streams of
    DTW / scale into ``index`` (Q,) int64 and that sum into ``dist`` (Q,) float64. Tuples of
    per-stream arrays; no GIL held, so threads can share the queries. Ties go to the lowest
    reference index; ``exhaustive``: every distance in full, in index order.

    Otherwise the first PROBE references are measured in full, with their bounds (LB_Keogh /
    scale, summed over streams). Where the bound would have ruled out at least PRUNE_WORTH of
    them, the rest are visited by increasing bound until the bound exceeds the best distance,
    each DTW abandoned once its partial cost plus the bound of what is left (its later rows, the
    other streams) exceeds the best. Where bounds are loose (noisy frames: every frame lies within
    the envelope of its window) computing them would cost more than they save: the rest are
    visited in index order, each DTW abandoned once a whole row exceeds the best.
    ``scratch_size``: `lb_keogh`'s scratch for the longest reference of any stream."""
    n_streams = len(scales)
    n_r = len(r_offsets[0]) - 1
    scratch = np.empty(scratch_size)
    bounds = np.zeros((n_r, n_streams))  # per reference and stream: LB_Keogh / scale
    bound = np.zeros(n_r)  # their sum over streams
    for q in range(first, stop):
        bounds[:] = 0.0
        probed = n_r if exhaustive else min(PROBE, n_r)
        best = np.inf
        best_k = -1
        for k in range(probed):
            total = _distance(
                q_frames, q_offsets, r_frames, r_offsets, scales, window, q, k, np.inf, bounds[k], scratch
            )
            if total < best:
                best = total
                best_k = k
        use_bounds = False
        if probed < n_r:
            ruled_out = 0
            for k in range(probed):
                b = _bounds(
                    q_frames, q_offsets, r_frames, r_offsets, scales, window, q, k, bounds[k], scratch
                )
                ruled_out += b > best
            use_bounds = ruled_out >= PRUNE_WORTH * probed
        rest = np.arange(probed, n_r)
        if use_bounds:
            for k in rest:
                bound[k] = _bounds(
                    q_frames, q_offsets, r_frames, r_offsets, scales, window, q, k, bounds[k], scratch
                )
            rest = rest[np.argsort(bound[probed:])]
        else:
            bounds[:] = 0.0  # the probes' bounds say nothing of the rest
        for k in rest:
            if use_bounds and bound[k] > best + PRUNE_SLACK * best:
                break  # sorted by bound: no later reference can be nearer
            total = _distance(
                q_frames, q_offsets, r_frames, r_offsets, scales, window, q, k, best, bounds[k], scratch
            )
            if total < best or (total == best and k < best_k):
                best = total
                best_k = k
        index[q] = best_k
        dist[q] = best

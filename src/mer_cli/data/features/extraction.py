"""Clips' files -> their features, stream by stream, in each back-end's batches, through the
cache: the one path mer-ingest and mer-predict both take, so a clip gives the same frames in
training and in prediction.

Input: clip id -> stream -> file, the opened extractors, an optional cache root. Output, one clip
at a time in the input's order (memory holds one batch, never the corpus): the clip's `Frames`
per stream, or one line naming the file and what is wrong with it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mer_cli.data.features.base import Extractor, Frames
from mer_cli.data.features.cache import FeatureCache, content_hash


@dataclass(frozen=True)
class Extracted:
    clip_id: str
    frames: dict[str, Frames] | None  # None: the clip cannot be used (``problem`` says why)
    problem: str | None = None  # one line: what is wrong with ``file``
    file: Path | None = None


def check_frames(frames: Frames) -> str | None:
    """Why a back-end's output cannot be stored, or None."""
    x = frames.values
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        return f"no frames ({x.shape})"
    if not np.isfinite(x).all():
        return "non-finite feature values"
    if frames.valid is not None and frames.valid.shape != (x.shape[0],):
        return f"validity mask of {frames.valid.shape} for {x.shape[0]} frames"
    return None


def _extract_stream(
    extractor: Extractor, paths: list[Path], cache: FeatureCache | None
) -> list[Frames | str]:
    out: list[Frames | str | None] = [None] * len(paths)
    digests: list[str | None] = [None] * len(paths)
    todo: list[int] = []
    for i, p in enumerate(paths):
        if cache is not None:
            try:
                digests[i] = content_hash(p)
            except OSError as e:
                out[i] = e.strerror or str(e)
                continue
            hit = cache.get(digests[i])  # type: ignore[arg-type]
            if hit is not None:
                out[i] = hit
                continue
        todo.append(i)
    for start in range(0, len(todo), max(1, extractor.batch_size)):
        idx = todo[start : start + max(1, extractor.batch_size)]
        for i, got in zip(idx, extractor.extract([paths[i] for i in idx]), strict=True):
            if isinstance(got, Frames):
                problem = check_frames(got)
                if problem is not None:
                    got = problem
                elif cache is not None:
                    cache.put(digests[i], got)  # type: ignore[arg-type]
            out[i] = got
    return out  # type: ignore[return-value]


class Extraction:
    """Every clip's frames per stream (``files``: clip id -> stream -> file), in ``files``' order,
    as an iterator of `Extracted`; ``caches`` (stream -> `FeatureCache`) count hits and misses.

    Clips go through in chunks of the largest batch size among the back-ends; a clip whose file
    of any stream fails is one `Extracted` with its ``problem`` (``x.wav: too short ...``), and
    the others go on. The progress bar counts clips (clips/s)."""

    def __init__(
        self,
        files: Mapping[str, Mapping[str, Path]],
        extractors: Mapping[str, Extractor],
        cache_root: Path | None = None,
        progress: bool = True,
        desc: str = "features",
    ) -> None:
        self.files, self.extractors, self.progress, self.desc = files, extractors, progress, desc
        self.caches = (
            {s: FeatureCache(cache_root, s, e.record()) for s, e in extractors.items()} if cache_root else {}
        )

    def __iter__(self) -> Iterator[Extracted]:
        ids = list(self.files)
        chunk = max(max(1, e.batch_size) for e in self.extractors.values())
        bar = tqdm(total=len(ids), desc=self.desc, unit="clip", disable=None if self.progress else True)
        try:
            for start in range(0, len(ids), chunk):
                batch = ids[start : start + chunk]
                results = {
                    s: _extract_stream(e, [self.files[c][s] for c in batch], self.caches.get(s))
                    for s, e in self.extractors.items()
                }
                for k, clip_id in enumerate(batch):
                    yield self._clip(clip_id, {s: results[s][k] for s in self.extractors})
                bar.update(len(batch))
        finally:
            bar.close()

    def _clip(self, clip_id: str, got: Mapping[str, Frames | str]) -> Extracted:
        for s, g in got.items():
            if isinstance(g, str):
                return Extracted(clip_id, None, g, self.files[clip_id][s])
        return Extracted(clip_id, dict(got))  # type: ignore[arg-type]

    def cache_line(self) -> str | None:
        """``cache: acoustic 10 hit / 2 new, ...`` (None without a cache)."""
        if not self.caches:
            return None
        parts = [f"{s} {c.hits} cached / {c.misses} new" for s, c in self.caches.items()]
        return "feature cache: " + ", ".join(parts)

"""Clips of named streams in train/val/test splits: `Clips` (a stream's clips stored ragged),
`Split`, `Splits`; the names every format shares (splits, the notebook's classes, stream fields).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any, overload

import numpy as np

log = logging.getLogger(__name__)


SPLIT_NAMES = ("train", "val", "test")


# The notebook's label order: 0 neutral, 1 anger, 2 happy, 3 fear, 4 disgust, 5 sad.
NOTEBOOK_CLASS_NAMES = ("neutral", "anger", "happy", "fear", "disgust", "sad")


NAN_POLICIES = ("error", "zero", "drop")


# the file formats' two streams, under the names the rest of mer-cli uses (config, models, reports)
STREAM_FIELDS = {"acoustic": "mfcc", "visual": "aus"}


class Clips(Sequence[np.ndarray]):
    """One stream's clips, stored ragged: every clip's frames end to end in one or more stores
    (``(frames (sum T, F), offsets (M + 1,))``, in memory or in a native dataset directory), and
    which stored clips this sequence holds, in order. ``clips[i]`` is clip i's (T_i, F) float32
    frames: a view of an in-memory store, or read from the file when it is asked for. Taking a
    subset (`take`, `concat`) copies no frames, only clip numbers.
    """

    def __init__(
        self,
        stores: Sequence[tuple[Any, np.ndarray]],
        index: np.ndarray | None = None,
        zero_nonfinite: bool = False,
    ) -> None:
        self.stores = tuple(stores)
        counts = [len(offsets) - 1 for _, offsets in self.stores]
        self._base = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        n_stored = int(self._base[-1])
        # which stored clips, in order (numbered across the stores)
        self.order = np.arange(n_stored, dtype=np.int64) if index is None else np.asarray(index, np.int64)
        # data.nan_policy=zero: NaN/inf become 0 when a clip is read (the stored frames stay as they are)
        self.zero_nonfinite = zero_nonfinite

    @staticmethod
    def pack(clips: Sequence[np.ndarray]) -> Clips:
        """Per-clip arrays (each (T_i, F)) copied end to end into one in-memory store."""
        offsets = np.concatenate([[0], np.cumsum([len(c) for c in clips])]).astype(np.int64)
        if not len(clips):
            return Clips([(np.zeros((0, 0), np.float32), offsets)])
        return Clips([(np.concatenate(clips).astype(np.float32, copy=False), offsets)])

    @staticmethod
    def pack_masks(masks: Sequence[np.ndarray]) -> Clips:
        """Per-clip validity masks (each (T_i,) bool) end to end into one in-memory store:
        ``clips[i]`` is then clip i's (T_i,) bool mask."""
        offsets = np.concatenate([[0], np.cumsum([len(m) for m in masks])]).astype(np.int64)
        frames = np.concatenate(masks).astype(bool) if len(masks) else np.zeros(0, bool)
        return Clips([(frames, offsets)])

    def __len__(self) -> int:
        return len(self.order)

    @overload
    def __getitem__(self, i: int) -> np.ndarray: ...
    @overload
    def __getitem__(self, i: slice) -> Clips: ...
    def __getitem__(self, i: int | slice) -> np.ndarray | Clips:
        if isinstance(i, slice):
            return self.take(np.arange(len(self))[i])
        g = int(self.order[i])
        s = int(np.searchsorted(self._base, g, side="right")) - 1
        frames, offsets = self.stores[s]
        local = g - int(self._base[s])
        x = frames[int(offsets[local]) : int(offsets[local + 1])]
        if self.zero_nonfinite:
            x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
        return x

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))

    @cached_property
    def lengths(self) -> np.ndarray:
        """(N,) int64: each clip's frame count (read from the offsets alone, never the frames)."""
        stored = np.concatenate([np.diff(offsets) for _, offsets in self.stores]).astype(np.int64)
        return stored[self.order]

    @property
    def n_features(self) -> int:
        return int(self.stores[0][0].shape[1])

    @property
    def in_memory(self) -> bool:
        """Every store is an array in memory (none is read from a file clip by clip)."""
        return all(isinstance(frames, np.ndarray) for frames, _ in self.stores)

    def take(self, idx: Sequence[int] | np.ndarray) -> Clips:
        """The clips ``idx``, in that order (no frame is copied)."""
        return Clips(self.stores, self.order[np.asarray(idx, dtype=np.int64)], self.zero_nonfinite)

    def counts(self) -> np.ndarray:
        """(N,) int64: each clip's count of True entries, for masks (`pack_masks`) held in memory:
        computed on the stores at once, never clip by clip."""
        stored = []
        for values, offsets in self.stores:
            running = np.concatenate([[0], np.cumsum(np.asarray(values, dtype=bool), dtype=np.int64)])
            stored.append(np.diff(running[offsets]))
        return np.concatenate(stored).astype(np.int64)[self.order]

    def with_zeroed_nonfinite(self) -> Clips:
        return Clips(self.stores, self.order, zero_nonfinite=True)

    @staticmethod
    def concat(parts: Sequence[Clips]) -> Clips:
        """The clips of ``parts`` one after another, over the union of their stores."""
        stores: list[tuple[Any, np.ndarray]] = []
        index = []
        for p in parts:
            base = []
            for store in p.stores:
                found = next((k for k, s in enumerate(stores) if s is store), None)
                if found is None:
                    stores.append(store)
                    found = len(stores) - 1
                base.append(found)
            # the part's clip numbers, renumbered into the union's
            new_base = np.concatenate([[0], np.cumsum([len(o) - 1 for _, o in stores])])
            which = np.searchsorted(p._base, p.order, side="right") - 1
            local = p.order - p._base[which]
            index.append(new_base[np.asarray(base, dtype=np.int64)[which]] + local)
        zero = any(p.zero_nonfinite for p in parts)
        return Clips(stores, np.concatenate(index) if index else np.zeros(0, np.int64), zero)

    def nonfinite(self, chunk_rows: int = 1 << 18) -> np.ndarray:
        """Positions (in this sequence) of the clips holding a NaN or infinite value; the stores
        are scanned ``chunk_rows`` frames at a time, so a file-backed one is never read whole."""
        bad_stored: list[np.ndarray] = []
        for s, (frames, offsets) in enumerate(self.stores):
            rows: list[np.ndarray] = []
            for start in range(0, int(offsets[-1]), chunk_rows):
                block = np.asarray(frames[start : start + chunk_rows])
                finite = np.isfinite(block).all(axis=1)
                if not finite.all():
                    rows.append(start + np.flatnonzero(~finite))
            if rows:
                clip = np.searchsorted(offsets, np.concatenate(rows), side="right") - 1
                bad_stored.append(self._base[s] + np.unique(clip))
        if not bad_stored:
            return np.zeros(0, np.int64)
        return np.flatnonzero(np.isin(self.order, np.concatenate(bad_stored)))


@dataclass(frozen=True)
class Split:
    """One split: parallel per-clip sequences. ``mfcc[i]`` is (T_a, D_a), ``aus[i]`` is (T_v, D_v),
    both float32; optionally ``valid[stream][i]`` (T,) bool per stream. Per-clip arrays given here
    are packed into one ragged `Clips` store per stream (and per mask)."""

    name: str
    clip_ids: tuple[str, ...]
    mfcc: Clips
    aus: Clips
    labels: np.ndarray  # (N,) int64
    # each clip's speaker where the data says (a native dataset's speaker field, data.speaker_file);
    # None: unknown, and whoever needs one parses it from the clip id (data.speaker_pattern)
    speakers: tuple[str, ...] | None = None
    # per stream name (acoustic | visual), which frames the feature back-end measured: ``valid[s][i]``
    # is clip i's (T_i,) bool mask (False: the face toolkit lost the face), parallel to the
    # stream's clips; a stream without an entry (or None: no stream) has every frame valid
    valid: Mapping[str, Clips] | None = None

    def __post_init__(self) -> None:
        for stream in ("mfcc", "aus"):
            value = getattr(self, stream)
            if not isinstance(value, Clips):
                object.__setattr__(self, stream, Clips.pack([np.asarray(x, np.float32) for x in value]))
        if self.speakers is not None and len(self.speakers) != len(self.clip_ids):
            raise ValueError(f"{self.name}: {len(self.speakers)} speakers for {len(self.clip_ids)} clips")
        if self.valid is not None:
            masks = {
                s: m if isinstance(m, Clips) else Clips.pack_masks([np.asarray(x, bool) for x in m])
                for s, m in self.valid.items()
            }
            for s, m in masks.items():
                if s not in STREAM_FIELDS:
                    raise ValueError(f"{self.name}: a validity mask for {s!r}, not a stream")
                if not np.array_equal(m.lengths, getattr(self, STREAM_FIELDS[s]).lengths):
                    raise ValueError(f"{self.name}: the {s} validity masks do not have one entry per frame")
            object.__setattr__(self, "valid", masks or None)

    def __len__(self) -> int:
        return len(self.clip_ids)

    @property
    def streams(self) -> dict[str, Clips]:
        """``{"acoustic": mfcc, "visual": aus}``: each clip's frames by stream name."""
        return {name: getattr(self, field) for name, field in STREAM_FIELDS.items()}

    def take(self, index: Sequence[int] | np.ndarray) -> Split:
        """The clips at ``index``, in that order (no frame is copied)."""
        idx = np.asarray(index, dtype=np.int64)
        return replace(
            self,
            clip_ids=tuple(self.clip_ids[i] for i in idx.tolist()),
            mfcc=self.mfcc.take(idx),
            aus=self.aus.take(idx),
            labels=self.labels[idx],
            speakers=None if self.speakers is None else tuple(self.speakers[i] for i in idx.tolist()),
            valid=None if self.valid is None else {s: m.take(idx) for s, m in self.valid.items()},
        )

    def mask(self, stream: str) -> Clips:
        """``stream``'s validity masks (`valid`): all True where none is stored."""
        if self.valid is not None and stream in self.valid:
            return self.valid[stream]
        return Clips.pack_masks([np.ones(n, bool) for n in self.streams[stream].lengths])


@dataclass(frozen=True)
class Splits:
    train: Split
    val: Split
    test: Split
    class_names: tuple[str, ...]
    source: str  # file path or "synthetic(...)": where the clips came from
    # per stream, how its features were computed from raw files (mer-ingest's settings, see
    # `ingest.settings_record`); None: not recorded (the notebook's pickle, the embedded data)
    ingest_settings: Mapping[str, Any] | None = None
    # data.leakage's check of the splits' speakers (metrics.json's run.speakers); None: not run
    speaker_check: Mapping[str, Any] | None = None
    # the protocol file that re-split the clips (data.split_file: path, sha256, counts; see
    # `protocol.Protocol.record`); None: the data's own splits
    protocol: Mapping[str, Any] | None = None

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def all(self) -> tuple[Split, Split, Split]:
        return self.train, self.val, self.test

    def limit(self, clips_per_split: int | None) -> Splits:
        """A stratified, deterministic slice: at most ``clips_per_split`` clips per split."""
        if clips_per_split is None:
            return self
        train, val, test = (_stratified_head(s, clips_per_split) for s in self.all())
        return replace(self, train=train, val=val, test=test)


def _stratified_head(split: Split, n: int) -> Split:
    if len(split) <= n:
        return split
    # round-robin over classes, so a small slice still holds every class
    order = np.argsort(split.labels, kind="stable")
    by_class = [order[split.labels[order] == c] for c in np.unique(split.labels)]
    picked: list[int] = []
    rank = 0
    while len(picked) < n:
        for members in by_class:
            if rank < len(members) and len(picked) < n:
                picked.append(int(members[rank]))
        rank += 1
    return split.take(sorted(picked))

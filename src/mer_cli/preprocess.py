"""Fit preprocessing on train (target lengths, per-feature scaling), apply it to every split.

Input: per stream, each clip's frames (a model's input streams, see `pipeline.model_inputs`).
Output: `SequenceSet`: named streams of ragged frames (every clip cut to the stream's target
length and scaled, stored end to end, never padded), labels and clip ids. A batch is padded
when it is gathered (`Ragged.pad`). Nothing here ever looks at validation or test data while
fitting.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch


@dataclass(frozen=True)
class TargetLength:
    """Every clip is cut or zero-padded (at the end) to ``length`` frames."""

    length: int

    def pad_or_truncate(self, x: np.ndarray) -> np.ndarray:
        out = np.zeros((self.length, x.shape[1]), dtype=np.float32)
        n = min(self.length, x.shape[0])
        out[:n] = x[:n]  # keep the start, as the notebook does
        return out


def fit_target_length(train: Sequence[np.ndarray], percentile: float) -> TargetLength:
    """Ceil of the ``percentile``-th percentile of the train clips' frame counts."""
    lengths = np.array([x.shape[0] for x in train])
    # fitted on train only: test lengths must not move the cut-off
    return TargetLength(math.ceil(np.percentile(lengths, percentile)))


@dataclass(frozen=True)
class Scaler:
    """Per-feature standardization; statistics from train frames only (padding excluded)."""

    mean: np.ndarray  # (F,)
    std: np.ndarray  # (F,)

    def transform(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.std).astype(np.float32)


def fit_scaler(train: Sequence[np.ndarray]) -> Scaler:
    frames = np.concatenate(train, axis=0).astype(np.float64)
    std = frames.std(axis=0)
    std[std < 1e-8] = 1.0  # a constant feature stays as it is instead of dividing by zero
    return Scaler(frames.mean(axis=0), std)


@dataclass(frozen=True)
class Ragged:
    """One stream of one split: every clip's frames end to end, clip ``i`` at rows
    ``offsets[i]:offsets[i + 1]`` of ``frames``; padded only per batch, by `pad`."""

    frames: np.ndarray  # (sum of lengths, F) float32
    offsets: np.ndarray  # (N + 1,) int64, offsets[0] == 0
    max_length: int  # no clip is longer: a batch is never padded beyond it

    @cached_property
    def lengths(self) -> torch.Tensor:
        """(N,) int64: each clip's frame count."""
        return torch.from_numpy(np.diff(self.offsets))

    @property
    def n_features(self) -> int:
        return int(self.frames.shape[1])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def pad(self, idx: torch.Tensor, length: int) -> torch.Tensor:
        """Clips ``idx`` as (B, ``length``, F) float32, zero after each clip's end (``length`` at
        least the longest clip of ``idx``)."""
        x = torch.zeros(len(idx), length, self.n_features)
        frames = torch.from_numpy(self.frames)
        for row, i in enumerate(idx.tolist()):
            start, end = int(self.offsets[i]), int(self.offsets[i + 1])
            x[row, : end - start] = frames[start:end]
        return x

    def take(self, idx: Sequence[int]) -> Ragged:
        """The clips ``idx``, in that order, as a new (compact) `Ragged`."""
        parts = [self.frames[self.offsets[i] : self.offsets[i + 1]] for i in idx]
        offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
        frames = np.concatenate(parts) if parts else self.frames[:0]
        return Ragged(frames, offsets, self.max_length)


@dataclass(frozen=True)
class SequenceSet:
    """One split as a model reads it: its named input streams, labels and clip ids."""

    streams: Mapping[str, Ragged]
    y: torch.Tensor  # (N,) int64
    clip_ids: tuple[str, ...]

    @property
    def lengths(self) -> torch.Tensor:
        """(N,) frame counts of the first stream: the one batches are bucketed and sorted by."""
        return next(iter(self.streams.values())).lengths

    @property
    def n_features(self) -> dict[str, int]:
        return {name: r.n_features for name, r in self.streams.items()}

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def take(self, idx: Sequence[int]) -> SequenceSet:
        """The clips ``idx``, in that order."""
        idx = list(idx)
        return SequenceSet(
            {name: r.take(idx) for name, r in self.streams.items()},
            self.y[idx],
            tuple(self.clip_ids[i] for i in idx),
        )


@dataclass(frozen=True)
class StreamPrep:
    """What was fitted for one stream."""

    target: TargetLength
    scaler: Scaler | None  # None: features left as they are (the notebook)

    def apply(self, frames: Sequence[np.ndarray]) -> Ragged:
        """Every clip cut to the target length (keeping its start, as the notebook) and scaled."""
        lengths = [min(f.shape[0], self.target.length) for f in frames]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        out = np.empty((int(offsets[-1]), frames[0].shape[1]), dtype=np.float32)
        for f, start, n in zip(frames, offsets, lengths, strict=False):
            out[start : start + n] = self.scaler.transform(f[:n]) if self.scaler else f[:n]
        return Ragged(out, offsets, self.target.length)

    def state(self) -> dict[str, object]:
        return {
            "length": self.target.length,
            "mean": None if self.scaler is None else self.scaler.mean.tolist(),
            "std": None if self.scaler is None else self.scaler.std.tolist(),
        }

    @staticmethod
    def from_state(state: dict[str, object]) -> StreamPrep:
        scaler = None
        if state["mean"] is not None:
            scaler = Scaler(np.asarray(state["mean"]), np.asarray(state["std"]))
        return StreamPrep(TargetLength(int(state["length"])), scaler)  # type: ignore[call-overload]


def fit(train_frames: Sequence[np.ndarray], percentile: float, normalize: bool) -> StreamPrep:
    """Fit target length and (if ``normalize``) the scaler of one stream on its train clips."""
    # fitted on train only: validation and test clips never move the cut-off or the statistics
    target = fit_target_length(train_frames, percentile)
    scaler = (
        fit_scaler([target.pad_or_truncate(f)[: f.shape[0]] for f in train_frames]) if normalize else None
    )
    return StreamPrep(target, scaler)


def apply(
    preps: Mapping[str, StreamPrep],
    streams: Mapping[str, Sequence[np.ndarray]],
    labels: np.ndarray,
    clip_ids: tuple[str, ...],
) -> SequenceSet:
    """One split's input ``streams`` (name -> per-clip frames) through their fitted preps."""
    return SequenceSet(
        streams={name: prep.apply(streams[name]) for name, prep in preps.items()},
        y=torch.from_numpy(np.asarray(labels, dtype=np.int64).copy()),
        clip_ids=clip_ids,
    )

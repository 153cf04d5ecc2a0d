"""Fit preprocessing on train (target lengths, per-feature scaling), apply it to every split.

Input: per stream, each clip's frames (a model's input streams, see `pipeline.model_inputs`).
Scaling (standard, robust, per-clip, signed-log) lives in `scaling`, fitted by streaming.
Output: `SequenceSet`: named streams of ragged frames (every clip cut to the stream's target
length and scaled, stored end to end, never padded), labels and clip ids. A batch is padded
when it is gathered (`Ragged.pad`). Nothing here ever looks at validation or test data while
fitting.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch

from mer_cli import scaling as feature_scaling
from mer_cli.scaling import Scaler


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
    # the train clips as fitted (frame counts, feature ranges), for the log; None once loaded
    profile: feature_scaling.Profile | None = field(default=None, compare=False, repr=False)

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
            "scaling": None if self.scaler is None else self.scaler.state(),
        }

    @staticmethod
    def from_state(state: dict[str, object]) -> StreamPrep:
        length = TargetLength(int(state["length"]))  # type: ignore[call-overload]
        if "scaling" in state:
            scaling = state["scaling"]
            return StreamPrep(length, None if scaling is None else Scaler.from_state(scaling))  # type: ignore[arg-type]
        # a checkpoint from before scaling options: mean and std of per-feature standardization
        if state["mean"] is None:
            return StreamPrep(length, None)
        mean, std = (np.asarray(state[k], dtype=np.float64) for k in ("mean", "std"))
        return StreamPrep(length, Scaler("standard", mean, std))


def fit(
    train_frames: Sequence[np.ndarray], percentile: float, normalize: bool, scaling: str = "standard"
) -> StreamPrep:
    """Fit target length and (if ``normalize``) the ``scaling`` scaler of one stream on its train
    clips (`scaling.KINDS`), streaming over them; the prep's profile describes those clips."""
    # fitted on train only: validation and test clips never move the cut-off or the statistics
    target = fit_target_length(train_frames, percentile)
    # the scaler sees the frames the model sees: each clip up to the target length (views, no copy)
    scaler, profile = feature_scaling.fit(
        scaling if normalize else None, [f[: target.length] for f in train_frames]
    )
    return StreamPrep(target, scaler, feature_scaling.with_frame_counts(profile, map(len, train_frames)))


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

"""Fit preprocessing on train (target lengths, per-feature scaling), apply it to every split.

Input: per stream, each clip's frames (a model's input streams, see `runs.trained.model_inputs`): a
sequence of (T_i, F) arrays, usually ragged `data.splits.Clips`. Output: `SequenceSet`: named streams
whose clips are cut to the stream's target length and scaled clip by clip: when a batch reads
them for clips on disk (`Prepared`: memory does not grow with the dataset), once into one ragged
store for clips in memory (`Ragged`). Never padded here: a batch is padded when it is gathered
(`train.PadCollate`). Fitting streams over the train clips (lengths only for the target length,
blocks of frames for the scaler); it never looks at validation or test data.
Scaling (standard, robust, per-clip, signed-log) lives in `scaling`, fitted by streaming; the
train clips' data profile, and the kind ``preprocess.scaling=auto`` takes from it, in `profile`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch

from mer_cli.core.errors import ConfigError
from mer_cli.preprocess import profile as data_profile
from mer_cli.preprocess import scaling as feature_scaling
from mer_cli.preprocess.scaling import Scaler


def clip_lengths(clips: Sequence[np.ndarray]) -> np.ndarray:
    """(N,) frame counts: a ragged sequence's own ``lengths`` (no frame is read), else each clip's."""
    lengths = getattr(clips, "lengths", None)
    if lengths is not None:
        return np.asarray(lengths, dtype=np.int64)
    return np.array([x.shape[0] for x in clips], dtype=np.int64)


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
    """Ceil of the ``percentile``-th percentile of the train clips' frame counts (their lengths
    alone: a ragged stream's frames are never read)."""
    # fitted on train only: test lengths must not move the cut-off
    return TargetLength(math.ceil(np.percentile(clip_lengths(train), percentile)))


@dataclass(frozen=True)
class Ragged:
    """Prepared frames held in memory: every clip's frames end to end, clip ``i`` at rows
    ``offsets[i]:offsets[i + 1]`` of ``frames`` (hand-built sets, benchmarks)."""

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

    def clip(self, i: int) -> np.ndarray:
        return self.frames[int(self.offsets[i]) : int(self.offsets[i + 1])]

    def pad(self, idx: torch.Tensor, length: int) -> torch.Tensor:
        return pad_clips([self.clip(i) for i in idx.tolist()], length, self.n_features)

    def take(self, idx: Sequence[int]) -> Ragged:
        """The clips ``idx``, in that order, as a new (compact) `Ragged`."""
        parts = [self.clip(i) for i in idx]
        offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
        frames = np.concatenate(parts) if parts else self.frames[:0]
        return Ragged(frames, offsets, self.max_length)


def drop_zero_frames(x: np.ndarray) -> np.ndarray:
    """``x`` without its frames whose features are all exactly 0, as Keras' ``Masking(0)`` skips
    them; a clip with no other frame keeps its first (zero) one, so that it has a frame to read."""
    keep = np.any(x != 0, axis=1)
    if keep.all():
        return x
    return x[keep] if keep.any() else x[:1]


def cut(x: np.ndarray, length: int, skip_zero_frames: bool) -> np.ndarray:
    """One clip's frames as the model reads them before scaling: its first ``length``, without
    the all-zero ones where ``skip_zero_frames`` (what the scaler is fitted on, too)."""
    x = x[:length]
    return drop_zero_frames(x) if skip_zero_frames else x


class Prepared:
    """One input stream of one split as the model reads it, prepared clip by clip when a clip is
    read: the source clip (ragged, possibly on disk, possibly early-fused) cut to the target
    length (keeping its start, as the notebook), without its all-zero frames where
    ``skip_zero_frames`` (`drop_zero_frames`), and scaled. No prepared copy of the split exists."""

    def __init__(
        self,
        source: Sequence[np.ndarray],
        target: TargetLength,
        scaler: Scaler | None,
        skip_zero_frames: bool = False,
    ) -> None:
        self.source, self.target, self.scaler = source, target, scaler
        self.skip_zero_frames = skip_zero_frames
        self.max_length = target.length  # no clip is longer: a batch is never padded beyond it

    @cached_property
    def lengths(self) -> torch.Tensor:
        """(N,) int64: each clip's frame count after the cut (from the lengths alone), and after
        dropping all-zero frames (which reads every clip once)."""
        if self.skip_zero_frames:
            return torch.tensor([len(self._cut(i)) for i in range(len(self))], dtype=torch.int64)
        return torch.from_numpy(np.minimum(clip_lengths(self.source), self.target.length))

    @cached_property
    def n_features(self) -> int:
        n = getattr(self.source, "n_features", None)
        return int(n) if n is not None else int(self.source[0].shape[1])

    def __len__(self) -> int:
        return len(self.source)

    def clip(self, i: int) -> np.ndarray:
        """Clip ``i``'s (min(T_i, target), F) float32 frames (fewer without all-zero frames where
        ``skip_zero_frames``), scaled."""
        x = self._cut(i)
        return self.scaler.transform(x) if self.scaler else np.asarray(x, dtype=np.float32)

    def _cut(self, i: int) -> np.ndarray:
        return cut(self.source[i], self.target.length, self.skip_zero_frames)

    def pad(self, idx: torch.Tensor, length: int) -> torch.Tensor:
        return pad_clips([self.clip(i) for i in idx.tolist()], length, self.n_features)

    def materialize(self) -> Ragged:
        """Every clip prepared once, end to end into one in-memory `Ragged` (one prepared copy)."""
        lengths = self.lengths.numpy()
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        out = np.empty((int(offsets[-1]), self.n_features), dtype=np.float32)
        for i in range(len(self)):
            out[offsets[i] : offsets[i + 1]] = self.clip(i)
        return Ragged(out, offsets, self.max_length)

    def take(self, idx: Sequence[int]) -> Prepared:
        take = getattr(self.source, "take", None)
        source = take(list(idx)) if take is not None else [self.source[i] for i in idx]
        return Prepared(source, self.target, self.scaler, self.skip_zero_frames)


class Blank:
    """A stream with the lengths of ``stream`` and zeros for frames (one stream's contribution)."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.lengths: torch.Tensor = stream.lengths
        self.n_features: int = stream.n_features
        self.max_length: int = stream.max_length

    def __len__(self) -> int:
        return len(self.stream)

    def clip(self, i: int) -> np.ndarray:
        return np.zeros((int(self.lengths[i]), self.n_features), dtype=np.float32)

    def pad(self, idx: torch.Tensor, length: int) -> torch.Tensor:
        return torch.zeros(len(idx), length, self.n_features)

    def take(self, idx: Sequence[int]) -> Blank:
        return Blank(self.stream.take(idx))


Stream = Ragged | Prepared | Blank


def pad_clips(clips: Sequence[np.ndarray], length: int, n_features: int) -> torch.Tensor:
    """Clips (each (T_i, F), T_i <= ``length``) as (B, ``length``, F) float32, zero after each end."""
    x = torch.zeros(len(clips), length, n_features)
    for row, c in enumerate(clips):
        x[row, : len(c)] = torch.from_numpy(np.ascontiguousarray(c))
    return x


@dataclass(frozen=True)
class SequenceSet:
    """One split as a model reads it: its named input streams, labels and clip ids."""

    streams: Mapping[str, Any]  # name -> `Stream`: clip(i), pad(idx, length), lengths, n_features
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
    skip_zero_frames: bool = False  # drop all-zero frames after the cut (Keras' Masking(0))
    # the train clips as fitted (their data profile and the scaling chosen), for the log and
    # profile.json; None once loaded
    profile: data_profile.StreamProfile | None = field(default=None, compare=False, repr=False)

    def apply(self, frames: Sequence[np.ndarray]) -> Prepared | Ragged:
        """Every clip of ``frames`` cut to the target length (keeping its start, as the notebook),
        without its all-zero frames where ``skip_zero_frames``, and scaled. Clips read from disk
        are prepared each time a batch reads them (memory does not grow with the dataset); clips
        held in memory are prepared once, into one ragged store (a batch then costs a copy, as
        fast as before; memory: one prepared copy of the split)."""
        prepared = Prepared(frames, self.target, self.scaler, self.skip_zero_frames)
        return prepared.materialize() if getattr(frames, "in_memory", True) else prepared

    def state(self) -> dict[str, object]:
        return {
            "length": self.target.length,
            "scaling": None if self.scaler is None else self.scaler.state(),
            "skip_zero_frames": self.skip_zero_frames,
        }

    @staticmethod
    def from_state(state: dict[str, object]) -> StreamPrep:
        length = TargetLength(int(state["length"]))  # type: ignore[call-overload]
        if "scaling" in state:
            scaling = state["scaling"]
            scaler = None if scaling is None else Scaler.from_state(scaling)  # type: ignore[arg-type]
            return StreamPrep(length, scaler, bool(state.get("skip_zero_frames", False)))
        # a checkpoint from before scaling options: mean and std of per-feature standardization
        if state["mean"] is None:
            return StreamPrep(length, None)
        mean, std = (np.asarray(state[k], dtype=np.float64) for k in ("mean", "std"))
        return StreamPrep(length, Scaler("standard", mean, std))


def fit(
    train_frames: Sequence[np.ndarray],
    percentile: float,
    normalize: bool,
    scaling: str = "standard",
    skip_zero_frames: bool = False,
    max_frames: int | None = None,
) -> StreamPrep:
    """Fit target length and (if ``normalize``) the ``scaling`` scaler of one stream on its train
    clips (`scaling.KINDS`, or ``auto``: the kind the clips' data profile calls for,
    `profile.recommend`), streaming over them; the prep's profile describes those clips.
    ``max_frames``: the target length (None: the ``percentile`` of the train lengths).
    ``skip_zero_frames``: clips lose their all-zero frames after the cut (`drop_zero_frames`); the
    target length still comes from the clips' own frame counts, as the notebook's did."""
    # fitted on train only: validation and test clips never move the cut-off or the statistics
    if max_frames is None:
        target = fit_target_length(train_frames, percentile)
        rule = f"data.max_frames=auto: preprocess.length_percentile={percentile:g} of the train lengths"
    else:
        target, rule = TargetLength(int(max_frames)), f"data.max_frames={max_frames}"
    # the scaler and the profile see the frames the model sees: each clip up to the target
    # length, read lazily (a pass reads each clip once; clips on disk are never all in memory)
    frames = _Cut(train_frames, target.length, skip_zero_frames)
    described = data_profile.describe_stream(frames, clip_lengths(train_frames), target.length, rule)
    setting = feature_scaling.check_setting(scaling) if normalize else None
    kind: str | None
    if setting == feature_scaling.AUTO:
        kind, reason = data_profile.recommend(described)
    else:
        kind = setting
        reason = f"preprocess.scaling={setting}" if setting else "preprocess.normalize=false"
    scaler = feature_scaling.fit(kind, frames)
    return StreamPrep(
        target, scaler, skip_zero_frames, data_profile.with_scaling(described, setting, kind, reason)
    )


def max_frames_of(setting: object, stream: str) -> int | None:
    """``data.max_frames`` for ``stream``: ``auto`` (None: the percentile rule), a number of frames
    for every stream, or a mapping stream -> ``auto`` | frames (a stream it does not name: auto);
    a bad value is one `ConfigError` line."""
    value = setting.get(stream, "auto") if isinstance(setting, Mapping) else setting
    if value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        shown = dict(setting) if isinstance(setting, Mapping) else setting
        raise ConfigError(
            f"data.max_frames={shown}: valid: auto, a number of frames (at least 1), or per stream "
            "{acoustic: N, visual: N, early: N}"
        )
    return value


class _Cut:
    """Re-iterable view of clips, each up to ``length`` frames, without all-zero frames where
    ``skip_zero_frames`` (a robust fit reads them again)."""

    def __init__(self, clips: Sequence[np.ndarray], length: int, skip_zero_frames: bool = False) -> None:
        self.clips, self.length, self.skip_zero_frames = clips, length, skip_zero_frames

    def __iter__(self) -> Iterator[np.ndarray]:
        return (cut(clip, self.length, self.skip_zero_frames) for clip in self.clips)


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

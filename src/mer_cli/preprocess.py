"""Fit preprocessing on train (target lengths, per-feature scaling), apply it to every split.

Input: `data.Split` (variable-length clips). Output: `SequenceSet`, ready tensors: frames (N, T, F)
zero-padded to the stream's target length, the true length of each clip, labels and clip ids.
Nothing here ever looks at validation or test data while fitting.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mer_cli.data import Split
from mer_cli.errors import ConfigError
from mer_cli.fusion import early_fuse

# A stream is one sequence per clip that a model reads: the MFCCs, the action units, or both
# fused per frame (early fusion).
STREAMS = ("mfcc", "aus", "early")


def stream_frames(split: Split, stream: str) -> list[np.ndarray]:
    """The per-clip (T, F) arrays of ``stream``."""
    if stream == "mfcc":
        return list(split.mfcc)
    if stream == "aus":
        return list(split.aus)
    if stream == "early":
        return [early_fuse(m, a) for m, a in zip(split.mfcc, split.aus, strict=True)]
    raise ConfigError(f"unknown stream {stream!r}; valid: {', '.join(STREAMS)}")


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
class SequenceSet:
    """One split of one stream as tensors; ``x[i, lengths[i]:]`` is zero padding."""

    x: torch.Tensor  # (N, T, F) float32
    lengths: torch.Tensor  # (N,) int64, 1 <= lengths <= T
    y: torch.Tensor  # (N,) int64
    clip_ids: tuple[str, ...]

    @property
    def n_features(self) -> int:
        return int(self.x.shape[2])

    def __len__(self) -> int:
        return int(self.x.shape[0])


@dataclass(frozen=True)
class StreamPrep:
    """What was fitted for one stream."""

    target: TargetLength
    scaler: Scaler | None  # None: features left as they are (the notebook)

    def apply(self, frames: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        x = np.zeros((len(frames), self.target.length, frames[0].shape[1]), dtype=np.float32)
        lengths = np.empty(len(frames), dtype=np.int64)
        for i, f in enumerate(frames):
            n = min(f.shape[0], self.target.length)
            x[i, :n] = self.scaler.transform(f[:n]) if self.scaler else f[:n]
            lengths[i] = n
        return x, lengths

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


def fit(train: Split, stream: str, percentile: float, normalize: bool) -> StreamPrep:
    """Fit target length and (if ``normalize``) the scaler of ``stream`` on the train split."""
    frames = stream_frames(train, stream)
    # early fusion is standardized to the acoustic target length, as in the notebook: its
    # frames are audio frames, so the fused and the MFCC lengths coincide
    target = fit_target_length(frames, percentile)
    scaler = fit_scaler([target.pad_or_truncate(f)[: f.shape[0]] for f in frames]) if normalize else None
    return StreamPrep(target, scaler)


def apply(prep: StreamPrep, split: Split, stream: str) -> SequenceSet:
    x, lengths = prep.apply(stream_frames(split, stream))
    return SequenceSet(
        x=torch.from_numpy(x),
        lengths=torch.from_numpy(lengths),
        y=torch.from_numpy(split.labels.copy()),
        clip_ids=split.clip_ids,
    )

"""MFCC (+ delta) frames of a recording: the notebook's acoustic features, the default back-end.

Input: a WAV/FLAC/OGG file. Output: (T, n_mfcc * (1 + delta_orders)) float32 frames, T ~
seconds * 1000 / hop_ms (librosa's MFCC from a mel spectrogram, deltas over 9 frames).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mer_cli.core.errors import ConfigError
from mer_cli.data.features import audio
from mer_cli.data.features.base import Backend, Frames, each_file, settings_record


@dataclass(frozen=True)
class Settings:
    """Defaults: 16 kHz, 25 ms windows every 10 ms (100 frames/s), 26 cepstra from 40 mel bands
    plus their first-order deltas: 52 features per frame, the size and rate of the notebook's."""

    sample_rate: int = 16000  # Hz: every file is resampled to this
    window_ms: float = 25.0
    hop_ms: float = 10.0
    n_mfcc: int = 26
    n_mels: int = 40
    delta_orders: int = 1  # 0: cepstra only, 1: + deltas, 2: + delta-deltas

    def __post_init__(self) -> None:
        if self.delta_orders not in (0, 1, 2):
            raise ConfigError(f"delta orders {self.delta_orders}: valid: 0, 1, 2")
        if self.n_mels < self.n_mfcc:
            raise ConfigError(f"n_mels {self.n_mels} must be at least n_mfcc {self.n_mfcc}")
        if self.hop_ms <= 0 or self.window_ms < self.hop_ms:
            raise ConfigError(f"window {self.window_ms} ms, hop {self.hop_ms} ms: need 0 < hop <= window")

    @property
    def n_features(self) -> int:
        return self.n_mfcc * (1 + self.delta_orders)

    @property
    def feature_names(self) -> list[str]:
        """Column names in `frames`' order: cepstra, then each delta order's."""
        prefixes = ("mfcc", "delta", "delta2")[: 1 + self.delta_orders]
        return [f"{p}_{i}" for p in prefixes for i in range(self.n_mfcc)]

    @property
    def frame_rate_hz(self) -> float:
        """MFCC frames per second (the hop, rounded to whole samples)."""
        return self.sample_rate / round(self.hop_ms * self.sample_rate / 1000)


def frames(path: Path, settings: Settings) -> np.ndarray:
    """(T, n_features) float32 MFCC (+ delta) frames of the recording at ``path``.

    Raises ValueError for a clip shorter than one analysis window (its frames would be padding).
    """
    import librosa  # audio.load has checked the ingest extra is installed

    y = audio.load(path, settings.sample_rate)
    sr = settings.sample_rate
    n_fft = round(settings.window_ms * sr / 1000)
    if y.size < n_fft:
        raise ValueError(
            f"too short: {1000 * y.size / sr:.1f} ms of audio, less than one {settings.window_ms:g} ms window"
        )
    hop = round(settings.hop_ms * sr / 1000)
    mfcc = librosa.feature.mfcc(
        y=y,
        sr=sr,
        n_mfcc=settings.n_mfcc,
        n_fft=n_fft,
        hop_length=hop,
        win_length=n_fft,
        n_mels=settings.n_mels,
    )  # (n_mfcc, T)
    # deltas over 9 frames (librosa's default); "nearest" also handles clips shorter than that
    parts = [mfcc] + [
        librosa.feature.delta(mfcc, order=k, mode="nearest") for k in range(1, settings.delta_orders + 1)
    ]
    return np.ascontiguousarray(np.concatenate(parts).T, dtype=np.float32)


class Extractor:
    batch_size = 1

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def extract(self, paths: Sequence[Path]) -> list[Frames | str]:
        return each_file(paths, lambda p: frames(p, self.settings))

    def record(self) -> dict[str, Any]:
        return {
            **settings_record("mfcc", self.settings),
            "frame_rate_hz": self.settings.frame_rate_hz,
            "feature_names": self.settings.feature_names,
        }


BACKEND = Backend(
    name="mfcc",
    stream="acoustic",
    what="MFCC + deltas (librosa), the notebook's acoustic features",
    file_patterns=audio.PATTERNS,
    settings=Settings,
    open=Extractor,
    extra="ingest",
)

"""The one reader of recordings: a file's samples, mono, at the rate a back-end asks for (and
the writer of the float WAVs that robustness evaluation re-extracts from).

soundfile (libsndfile) reads WAV, FLAC and OGG and fails cleanly on a broken file (librosa.load
would fall back to the deprecated audioread); librosa resamples (soxr). Every audio back-end
reads through `load`, so mer-ingest and mer-predict hear the same samples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mer_cli.core.errors import ConfigError

PATTERNS = ("*.wav", "*.WAV", "*.flac", "*.FLAC", "*.ogg")


def _libraries() -> tuple[Any, Any]:  # (librosa, soundfile)
    try:  # the ingest extra: heavy (numba), needed only here
        import librosa
        import soundfile
    except ImportError as e:
        raise ConfigError("reading audio needs librosa and soundfile: pip install 'mer-cli[ingest]'") from e
    return librosa, soundfile


def read(path: Path) -> tuple[np.ndarray, int]:
    """(n,) float32 mono samples of ``path`` at its own rate, and that rate in Hz."""
    _, soundfile = _libraries()
    y, sr = soundfile.read(path, dtype="float32", always_2d=True)
    return np.ascontiguousarray(y.mean(axis=1), dtype=np.float32), int(sr)  # mono


def load(path: Path, sample_rate: int) -> np.ndarray:
    """(n,) float32 mono samples of ``path`` at ``sample_rate`` Hz.

    Raises ValueError (one line: the caller reports the file and goes on) for no samples or
    non-finite samples; `ConfigError` when the ingest extra is not installed."""
    librosa, _ = _libraries()
    y, sr = read(path)
    if sr != sample_rate and y.size:
        y = librosa.resample(y, orig_sr=sr, target_sr=sample_rate)
    if y.size == 0:
        raise ValueError("no audio samples")
    if not np.isfinite(y).all():
        raise ValueError("non-finite audio samples")
    return np.ascontiguousarray(y, dtype=np.float32)


def write(path: Path, samples: np.ndarray, sample_rate: int) -> None:
    """``samples`` as a mono 32-bit float WAV: read back by `read`, bit for bit (no quantization)."""
    _, soundfile = _libraries()
    soundfile.write(path, np.asarray(samples, dtype=np.float32), sample_rate, subtype="FLOAT")

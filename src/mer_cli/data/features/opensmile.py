"""openSMILE low-level descriptors (LLDs) of a recording: eGeMAPS v02 or ComParE 2016, per frame.

Input: a WAV/FLAC/OGG file, read through `audio.load` at ``sample_rate`` (every audio back-end
hears the same samples). Output: (T, n_LLD) float32 rows every 10 ms (100 frames/s), columns in
openSMILE's order and with its names: eGeMAPSv02 25 LLDs, ComParE_2016 65 (130 with ``deltas``).
The record names the installed opensmile version: an openSMILE upgrade can change the values,
and a record that differs in it does not match (`base.recipe_mismatch`).

Frames and time, measured with opensmile 2.6 (both sets; clips of 60 ms and more):
  T = floor((ms - 50) / 10) + 1 rows (96 for 1 s, 296 for 3 s); row k's frame starts at k * 10 ms
  (openSMILE's index: the first rows span 20 ms for eGeMAPS, 60 ms for ComParE), no padding.
  The MFCC back-end (librosa, centred frames) gives 1 + floor(ms / 10) frames (101, 301), frame
  k centred on k * 10 ms: openSMILE has 5 rows fewer, its rows start where MFCC's are centred and
  it stops ~50 ms before the end. Early fusion stretches each stream to the first stream's frame
  count, so openSMILE after MFCC (or the reverse) is off by 5 rows (50 ms between frame starts)
  at a clip's end, less on the way there, and exact at its start.
  Clips under ~60 ms give no row at all: one "too short" line.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mer_cli.core.errors import ConfigError
from mer_cli.data.features import audio
from mer_cli.data.features.base import Backend, Frames, each_file, settings_record

FEATURE_SETS = ("eGeMAPSv02", "ComParE_2016")
FRAME_RATE_HZ = 100.0  # openSMILE's LLD hop in both configs: 10 ms
# opensmile's process_signal scales float samples by 32768 into int16: 1.0 would wrap to -32768
_INT16_MAX = 32767 / 32768


@dataclass(frozen=True)
class Settings:
    """Defaults: the 25 eGeMAPS v02 LLDs of the 16 kHz signal."""

    feature_set: str = "eGeMAPSv02"  # eGeMAPSv02 | ComParE_2016
    deltas: bool = False  # ComParE only: + its 65 first-order deltas (openSMILE's, over 5 rows)
    sample_rate: int = 16000  # Hz: every file is resampled to this before openSMILE reads it

    def __post_init__(self) -> None:
        if self.feature_set not in FEATURE_SETS:
            raise ConfigError(f"feature set {self.feature_set!r}: valid: {', '.join(FEATURE_SETS)}")
        if self.deltas and self.feature_set != "ComParE_2016":
            raise ConfigError(f"deltas: {self.feature_set} has no LLD deltas in openSMILE (ComParE_2016 has)")
        if self.sample_rate <= 0:
            raise ConfigError(f"sample rate {self.sample_rate} Hz: must be positive")


def import_opensmile() -> Any:
    """The opensmile package, or `ConfigError` naming the pip extra."""
    try:
        import opensmile
    except ImportError as e:
        raise ConfigError("the opensmile back-end needs opensmile: pip install 'mer-cli[opensmile]'") from e
    return opensmile


def run_smile(smile: Any, y: np.ndarray, sample_rate: int) -> tuple[np.ndarray, np.ndarray]:
    """(T, F) float32 values and (T,) frame start times in seconds of ``smile`` on samples ``y``.

    Raises ValueError (one line) where openSMILE gives no frame (the clip is too short)."""
    y = np.clip(y, -1.0, _INT16_MAX)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = smile.process_signal(y, sample_rate)
    values = np.ascontiguousarray(df.to_numpy(), dtype=np.float32)
    # what opensmile returns for no frame: one row of NaN, and a "Segment too short" warning
    if any("too short" in str(w.message) for w in caught) or not np.isfinite(values).any():
        raise ValueError(
            f"too short: {1000 * y.size / sample_rate:.1f} ms of audio, openSMILE gives no frame for it"
        )
    starts = df.index.get_level_values("start").total_seconds().to_numpy()
    return values, starts


def check_hop(starts: np.ndarray, version: str) -> None:
    """`ConfigError` where openSMILE's rows are not 10 ms apart (another config or version)."""
    if starts.size > 2:
        hop = float(np.median(np.diff(starts)))
        if abs(hop - 1 / FRAME_RATE_HZ) > 1e-6:
            raise ConfigError(
                f"opensmile {version} gave LLD rows every {1000 * hop:g} ms, not {1000 / FRAME_RATE_HZ:g} ms"
            )


class Extractor:
    batch_size = 1  # openSMILE runs one signal at a time

    def __init__(self, settings: Settings) -> None:
        opensmile = import_opensmile()
        self.settings = settings
        self.version = str(opensmile.__version__)
        fs = opensmile.FeatureSet[settings.feature_set]
        self.smile = opensmile.Smile(feature_set=fs, feature_level=opensmile.FeatureLevel.LowLevelDescriptors)
        self.delta_smile = (
            opensmile.Smile(feature_set=fs, feature_level=opensmile.FeatureLevel.LowLevelDescriptors_Deltas)
            if settings.deltas
            else None
        )
        self.feature_names = list(self.smile.feature_names) + (
            list(self.delta_smile.feature_names) if self.delta_smile is not None else []
        )

    def frames(self, path: Path) -> np.ndarray:
        """(T, n_LLD) float32 rows of the recording at ``path``."""
        y = audio.load(path, self.settings.sample_rate)
        values, starts = run_smile(self.smile, y, self.settings.sample_rate)
        check_hop(starts, self.version)
        if self.delta_smile is None:
            return values
        deltas, _ = run_smile(self.delta_smile, y, self.settings.sample_rate)
        # openSMILE's delta level gives 2 rows more, flushed after the last LLD row: its first T
        # rows are the deltas of the T LLD rows
        if deltas.shape[0] < values.shape[0]:
            raise ValueError(f"openSMILE gave {deltas.shape[0]} delta rows for {values.shape[0]} LLD rows")
        return np.concatenate([values, deltas[: values.shape[0]]], axis=1)

    def extract(self, paths: Sequence[Path]) -> list[Frames | str]:
        return each_file(paths, self.frames)

    def record(self) -> dict[str, Any]:
        return {
            **settings_record("opensmile", self.settings),
            "opensmile_version": self.version,
            "frame_rate_hz": FRAME_RATE_HZ,
            "feature_names": self.feature_names,
        }


BACKEND = Backend(
    name="opensmile",
    stream="acoustic",
    what="openSMILE low-level descriptors per 10 ms frame: eGeMAPS v02 or ComParE 2016",
    file_patterns=audio.PATTERNS,
    settings=Settings,
    open=Extractor,
    extra="opensmile",
)

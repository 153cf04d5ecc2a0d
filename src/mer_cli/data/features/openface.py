"""OpenFace 2 ``FeatureExtraction`` CSVs: the notebook's 17 action-unit intensities per frame.

Input: one CSV per clip (OpenFace writes headers with a leading space: ``' AU01_r'``). Output:
(T, len(au_columns)) float32 frames; frames where OpenFace lost the face (``success == 0``)
interpolated, dropped or zeroed; the video's frame rate from its ``timestamp`` column.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mer_cli.core.errors import ConfigError, one_line
from mer_cli.data.features.base import Backend, Frames, settings_record

# the notebook's 17 OpenFace action-unit intensities
AU_COLUMNS = (
    "AU01_r",
    "AU02_r",
    "AU04_r",
    "AU05_r",
    "AU06_r",
    "AU07_r",
    "AU09_r",
    "AU10_r",
    "AU12_r",
    "AU14_r",
    "AU15_r",
    "AU17_r",
    "AU20_r",
    "AU23_r",
    "AU25_r",
    "AU26_r",
    "AU45_r",
)
# what to do with frames where OpenFace lost the face (success == 0):
#   interpolate: linear in time between tracked frames (keeps the clip's timing, which early
#     fusion relies on when it stretches faces to the audio length), the default
#   drop: remove them (shortens the clip); zero: keep them as zeros (the padding value)
FAILED_FRAME_POLICIES = ("interpolate", "drop", "zero")


@dataclass(frozen=True)
class Settings:
    au_columns: tuple[str, ...] = AU_COLUMNS
    failed_frames: str = "interpolate"

    def __post_init__(self) -> None:
        object.__setattr__(self, "au_columns", tuple(self.au_columns))
        if self.failed_frames not in FAILED_FRAME_POLICIES:
            raise ConfigError(
                f"failed frames {self.failed_frames!r}: valid: {', '.join(FAILED_FRAME_POLICIES)}"
            )
        if not self.au_columns:
            raise ConfigError("au_columns: name at least one column")


def read(path: Path, columns: Sequence[str], failed_frames: str) -> tuple[np.ndarray, float | None]:
    """(T, len(columns)) float32 action units of an OpenFace CSV, failed frames per
    ``failed_frames``, and the video's frames per second from OpenFace's ``timestamp`` column
    (None when it has none, or fewer than two distinct times). Raises ValueError (one line)."""
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise ValueError("empty file")
    header = [h.strip() for h in rows[0]]  # OpenFace writes ' AU01_r', with a space
    missing = [c for c in columns if c not in header]
    if missing:
        raise ValueError(f"no column {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    body = [r for r in rows[1:] if r]
    if not body:
        raise ValueError("no frames")
    idx = [header.index(c) for c in columns]
    try:
        x = np.array([[float(r[i]) for i in idx] for r in body], dtype=np.float64)
        ok = (
            np.array([float(r[header.index("success")]) != 0 for r in body])
            if "success" in header
            else np.ones(len(body), dtype=bool)
        )
    except (ValueError, IndexError) as e:
        raise ValueError(f"a row is not numbers or too short ({e})") from e
    ok &= np.isfinite(x).all(axis=1)
    fps = None
    if "timestamp" in header:
        try:
            times = [float(r[header.index("timestamp")]) for r in body]
        except (ValueError, IndexError):
            times = []
        # frames over the whole span: OpenFace rounds each timestamp to 1 ms, a span barely moves
        if len(times) > 1 and times[-1] > times[0]:
            fps = (len(times) - 1) / (times[-1] - times[0])
    if not ok.any():
        raise ValueError("the face was tracked in no frame (success == 0 everywhere)")
    return fill_failed(x, ok, failed_frames).astype(np.float32), fps


def fill_failed(x: np.ndarray, ok: np.ndarray, policy: str) -> np.ndarray:
    """``x`` (T, F) with its untracked frames (``ok`` False) handled per ``policy``."""
    if policy == "drop":
        return x[ok]
    if policy == "zero":
        x = x.copy()
        x[~ok] = 0.0
        return x
    if policy == "interpolate":
        t = np.arange(len(x))
        # np.interp holds the first/last tracked values beyond the ends
        return np.stack([np.interp(t, t[ok], x[ok, j]) for j in range(x.shape[1])], axis=1)
    raise ConfigError(f"failed frames {policy!r}: valid: {', '.join(FAILED_FRAME_POLICIES)}")


class Extractor:
    batch_size = 1

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def extract(self, paths: Sequence[Path]) -> list[Frames | str]:
        out: list[Frames | str] = []
        for p in paths:
            try:
                x, fps = read(p, self.settings.au_columns, self.settings.failed_frames)
            except (ValueError, OSError, UnicodeDecodeError, csv.Error) as e:
                out.append(one_line(e))
            else:
                out.append(Frames(x, frame_rate_hz=fps))
        return out

    def record(self) -> dict[str, Any]:
        # frame_rate_hz: measured on the files (mer-ingest stores the median over its clips)
        return {
            **settings_record("openface", self.settings),
            "frame_rate_hz": None,
            "feature_names": list(self.settings.au_columns),
        }


BACKEND = Backend(
    name="openface",
    stream="visual",
    what="OpenFace 2 FeatureExtraction CSVs: action-unit intensities",
    file_patterns=("*.csv",),
    settings=Settings,
    open=Extractor,
)

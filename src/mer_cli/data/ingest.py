"""Build a native dataset from raw per-clip files: OpenFace CSVs (faces) and WAV files (voices).

Input: a folder of OpenFace ``FeatureExtraction`` CSVs and a folder of WAV files, one of each per
clip, named like CREMA-D (``1001_DFA_ANG_XX``: actor, sentence, emotion, intensity). Output:
`Splits` split by actor (seeded), each clip's actor as its speaker, ready for `npz.save_npz`
(which stores the speakers as the dataset's speaker field), carrying the settings that made
its features (`settings_record`, reused by mer-predict on new files), and an `IngestReport` of
what could not be used and why.
"""

from __future__ import annotations

import csv
import logging
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from mer_cli.core.errors import ConfigError, DataError
from mer_cli.data import checks, speakers
from mer_cli.data.splits import SPLIT_NAMES, Splits

log = logging.getLogger(__name__)

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
CREMA_D_PATTERN = r"^(?P<actor>\d+)_(?P<sentence>[A-Z]+)_(?P<emotion>[A-Z]+)_(?P<intensity>[A-Z0-9]+)$"
# CREMA-D's emotion codes in the notebook's label order: 0 neutral, 1 anger, ..., 5 sad
CREMA_D_EMOTIONS = {
    "NEU": "neutral",
    "ANG": "anger",
    "HAP": "happy",
    "FEA": "fear",
    "DIS": "disgust",
    "SAD": "sad",
}


@dataclass(frozen=True)
class AudioSettings:
    """MFCC frames of a WAV file.

    Defaults: 16 kHz, 25 ms windows every 10 ms (100 frames/s), 26 cepstra from 40 mel bands
    plus their first-order deltas: 52 features per frame, the size and rate of the notebook's
    MFCC frames.
    """

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
        """Column names in `mfcc_frames`' order: cepstra, then each delta order's."""
        prefixes = ("mfcc", "delta", "delta2")[: 1 + self.delta_orders]
        return [f"{p}_{i}" for p in prefixes for i in range(self.n_mfcc)]

    @property
    def frame_rate_hz(self) -> float:
        """MFCC frames per second (the hop, rounded to whole samples)."""
        return self.sample_rate / round(self.hop_ms * self.sample_rate / 1000)

    @staticmethod
    def from_record(record: Mapping[str, Any]) -> AudioSettings:
        """The settings a `settings_record` holds for the acoustic stream."""
        return AudioSettings(**{f.name: record[f.name] for f in fields(AudioSettings)})


@dataclass(frozen=True)
class Names:
    """How a file name (without extension) gives the clip's actor and emotion."""

    pattern: str = CREMA_D_PATTERN  # a regex with named groups 'actor' and 'emotion'
    emotions: Mapping[str, str] = field(default_factory=lambda: dict(CREMA_D_EMOTIONS))  # code -> class

    def __post_init__(self) -> None:
        try:
            groups = re.compile(self.pattern).groupindex
        except re.error as e:
            raise ConfigError(f"name pattern {self.pattern!r}: not a regular expression ({e})") from e
        if not {"actor", "emotion"} <= set(groups):
            raise ConfigError(
                f"name pattern {self.pattern!r}: needs named groups (?P<actor>...) and (?P<emotion>...)"
            )

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.emotions.values()))  # in first-seen order, no repeats

    def parse(self, stem: str) -> tuple[str, int] | str:
        """(actor, label), or why the name cannot be used."""
        m = re.match(self.pattern, stem)
        if m is None:
            return "name does not match the pattern"
        code = m.group("emotion")
        if code not in self.emotions:
            return f"emotion code {code!r} is not one of {', '.join(self.emotions)}"
        return m.group("actor"), self.class_names.index(self.emotions[code])


@dataclass
class IngestReport:
    """What was left out and why: file names with a reason each."""

    unpaired: list[str] = field(default_factory=list)  # only an audio or only a video file
    unlabelled: list[str] = field(default_factory=list)  # name not understood
    unreadable: list[str] = field(default_factory=list)  # a file that failed to read

    def lines(self, shown: int = 5) -> list[str]:
        out = []
        for what, items in (
            ("unpaired", self.unpaired),
            ("unlabelled", self.unlabelled),
            ("unreadable", self.unreadable),
        ):
            if items:
                more = f"; and {len(items) - shown} more" if len(items) > shown else ""
                out.append(f"{len(items)} {what}: {'; '.join(items[:shown])}{more}")
        return out


# ---------------------------------------------------------------------------------------------
# One clip


def settings_record(
    audio: AudioSettings, au_columns: Sequence[str], failed_frames: str, video_fps: float | None
) -> dict[str, Any]:
    """Per stream, how its features are computed from a clip's files: kept in the .npz, in a
    trained model's feature spec, and reused by mer-predict on new files (plain JSON values)."""
    return {
        "acoustic": {
            **asdict(audio),
            "frame_rate_hz": audio.frame_rate_hz,
            "feature_names": audio.feature_names,
        },
        "visual": {
            "au_columns": list(au_columns),
            "failed_frames": failed_frames,
            "frame_rate_hz": video_fps,  # median over the clips' OpenFace timestamps; None: no timestamps
            "feature_names": list(au_columns),
        },
    }


def mfcc_frames(path: Path, settings: AudioSettings) -> np.ndarray:
    """(T, n_features) float32 MFCC (+ delta) frames of the WAV at ``path``; T ~ seconds * 1000 / hop_ms.

    Raises ValueError for a clip shorter than one analysis window (its frames would be padding).
    """
    try:  # the ingest extra: heavy (numba), needed only here
        import librosa
        import soundfile
    except ImportError as e:
        raise ConfigError("mer-ingest needs librosa to compute MFCCs: pip install 'mer-cli[ingest]'") from e
    # soundfile (libsndfile) reads WAV/FLAC/OGG and fails cleanly on a broken file; librosa.load
    # would fall back to the deprecated audioread for it
    y, sr = soundfile.read(path, dtype="float32", always_2d=True)
    y = y.mean(axis=1)  # mono
    if sr != settings.sample_rate and y.size:
        y = librosa.resample(y, orig_sr=sr, target_sr=settings.sample_rate)
        sr = settings.sample_rate
    if y.size == 0:
        raise ValueError("no audio samples")
    if not np.isfinite(y).all():
        raise ValueError("non-finite audio samples")
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


def au_frames(path: Path, columns: Sequence[str], failed_frames: str) -> np.ndarray:
    """(T, len(columns)) float32 action units of an OpenFace CSV; failed frames per ``failed_frames``."""
    return read_openface(path, columns, failed_frames)[0]


def read_openface(path: Path, columns: Sequence[str], failed_frames: str) -> tuple[np.ndarray, float | None]:
    """`au_frames`, and the video's frames per second from OpenFace's ``timestamp`` column (None
    when it has none, or fewer than two distinct times)."""
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
    if failed_frames == "drop":
        x = x[ok]
    elif failed_frames == "zero":
        x[~ok] = 0.0
    elif failed_frames == "interpolate":
        t = np.arange(len(x))
        # np.interp holds the first/last tracked values beyond the ends
        x = np.stack([np.interp(t, t[ok], x[ok, j]) for j in range(x.shape[1])], axis=1)
    else:
        raise ConfigError(f"failed frames {failed_frames!r}: valid: {', '.join(FAILED_FRAME_POLICIES)}")
    return x.astype(np.float32), fps


def read_wav(path: Path, audio: AudioSettings) -> np.ndarray | str:
    """`mfcc_frames`, or why the file cannot be used (one line): a broken file is not fatal."""
    try:
        return mfcc_frames(path, audio)
    except ConfigError:
        raise
    except Exception as e:  # soundfile and librosa raise many types for a bad file
        return " ".join(str(e).split()) or type(e).__name__


def read_csv(path: Path, columns: Sequence[str], failed_frames: str) -> tuple[np.ndarray, float | None] | str:
    """`read_openface`, or why the file cannot be used (one line)."""
    try:
        return read_openface(path, columns, failed_frames)
    except (ValueError, OSError, UnicodeDecodeError, csv.Error) as e:
        return " ".join(str(e).split())


# a stream's raw files: WAVs (voices), OpenFace CSVs (faces)
FILE_PATTERNS = {"acoustic": ("*.wav", "*.WAV"), "visual": ("*.csv",)}


def files_by_stem(folder: Path, stream: str) -> dict[str, Path]:
    """Clip name (file name without extension) -> file, for ``stream``'s files in ``folder``."""
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    return {p.stem: p for pattern in FILE_PATTERNS[stream] for p in sorted(folder.glob(pattern))}


def pair_files(audio_dir: Path, video_dir: Path) -> tuple[dict[str, tuple[Path, Path]], list[str]]:
    """Clip name -> (its .wav, its .csv) for every name with both files in the two folders, and
    one line per file without its partner (``x.wav: no x.csv``)."""
    wavs, csvs = files_by_stem(audio_dir, "acoustic"), files_by_stem(video_dir, "visual")
    unpaired = [f"{wavs[s].name}: no {s}.csv" for s in sorted(wavs.keys() - csvs.keys())]
    unpaired += [f"{csvs[s].name}: no {s}.wav" for s in sorted(csvs.keys() - wavs.keys())]
    return {s: (wavs[s], csvs[s]) for s in sorted(wavs.keys() & csvs.keys())}, unpaired


# ---------------------------------------------------------------------------------------------
# A folder


def split_actors(
    actors: Sequence[str], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, str]:
    """actor -> split; no actor in two splits, at least one per split, drawn from ``seed``."""
    unique = sorted(set(actors))
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ConfigError(
            f"val {val_fraction} and test {test_fraction} fractions: each in (0, 1), sum below 1"
        )
    if len(unique) < 3:
        raise DataError(f"{len(unique)} actor(s): need at least 3 to split train/val/test by actor")
    n_val = max(1, round(val_fraction * len(unique)))
    n_test = max(1, round(test_fraction * len(unique)))
    if n_val + n_test >= len(unique):
        n_val, n_test = 1, 1
    order = np.random.default_rng(seed).permutation(len(unique))
    return {
        unique[i]: "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
        for rank, i in enumerate(order)
    }


def build(
    audio_dir: Path,
    video_dir: Path,
    audio: AudioSettings,
    names: Names,
    au_columns: Sequence[str] = AU_COLUMNS,
    failed_frames: str = "interpolate",
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
    progress: bool = True,
) -> tuple[Splits, IngestReport]:
    """Read every paired clip, split by actor and validate as any dataset is validated."""
    if failed_frames not in FAILED_FRAME_POLICIES:
        raise ConfigError(f"failed frames {failed_frames!r}: valid: {', '.join(FAILED_FRAME_POLICIES)}")
    pairs, unpaired = pair_files(audio_dir, video_dir)
    report = IngestReport(unpaired=unpaired)
    labelled: list[tuple[str, str, int]] = []
    for stem in pairs:
        parsed = names.parse(stem)
        if isinstance(parsed, str):
            report.unlabelled.append(f"{stem}: {parsed}")
        else:
            labelled.append((stem, *parsed))
    if not labelled:
        raise DataError(
            f"{audio_dir}, {video_dir}: no clip with both a .wav and a .csv and a name matching "
            f"{names.pattern!r} ({len(pairs)} pairs, {len(unpaired)} unpaired files)"
        )

    clips: list[tuple[str, str, np.ndarray, np.ndarray, int]] = []
    fps: list[float] = []
    for stem, actor, label in tqdm(labelled, desc="ingest", unit="clip", disable=None if progress else True):
        wav, csv_path = pairs[stem]
        mfcc = read_wav(wav, audio)  # a broken file is reported and skipped, not fatal
        if isinstance(mfcc, str):
            report.unreadable.append(f"{wav.name}: {mfcc}")
            continue
        video = read_csv(csv_path, au_columns, failed_frames)
        if isinstance(video, str):
            report.unreadable.append(f"{csv_path.name}: {video}")
            continue
        clips.append((stem, actor, mfcc, video[0], label))
        if video[1] is not None:
            fps.append(video[1])
    if not clips:
        raise DataError(f"{audio_dir}, {video_dir}: no clip could be read ({'; '.join(report.lines(3))})")

    split_of = split_actors([c[1] for c in clips], val_fraction, test_fraction, seed)
    raw: dict[str, dict[str, Any]] = {s: {} for s in SPLIT_NAMES}
    for stem, actor, mfcc, aus, label in clips:
        raw[split_of[actor]][stem] = (mfcc, aus, label)
    source = f"ingest({audio_dir}, {video_dir})"
    splits = checks.from_mapping(raw, source, class_names=names.class_names)
    # the actor the file name gave each clip, kept as its speaker: the check needs no id pattern
    actor_of = {stem: actor for stem, actor, *_ in clips}
    splits = speakers.attach(splits, {s: actor_of for s in SPLIT_NAMES}, source)
    video_fps = round(float(np.median(fps)), 3) if fps else None
    record = settings_record(audio, au_columns, failed_frames, video_fps)
    return replace(splits, ingest_settings=record), report


def summary(splits: Splits) -> str:
    """Clips per split and class, as a small table."""
    width = max(len(n) for n in (*splits.class_names, "split"))
    head = f"{'class':<{width}}  " + "  ".join(f"{s.name:>5}" for s in splits.all())
    rows = [head]
    counts = [Counter(s.labels.tolist()) for s in splits.all()]
    for i, name in enumerate(splits.class_names):
        rows.append(f"{name:<{width}}  " + "  ".join(f"{c[i]:>5}" for c in counts))
    rows.append(f"{'total':<{width}}  " + "  ".join(f"{len(s):>5}" for s in splits.all()))
    return "\n".join(rows)

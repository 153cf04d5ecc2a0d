"""Build a native dataset from raw per-clip files: a recording and a face track (or a video) per
clip, each turned into frames by the feature back-ends the user picks (`features.catalog`).

Input: a folder of audio files and a folder of video-side files (OpenFace CSVs, any face
toolkit's tables, videos), one of each per clip, named like CREMA-D (``1001_DFA_ANG_XX``: actor,
sentence, emotion, intensity), and one opened extractor per stream. Output: a native dataset
directory (or an .npz), split by actor (seeded), each clip's actor as its speaker, written clip
by clip into a hidden sibling renamed into place (never half-written; memory holds one batch),
recording in ``ingest_settings`` per stream the back-end's record (what mer-predict re-extracts
new clips with; ``validity_mask: true`` where the dataset stores the back-end's per-frame validity
mask), and an `IngestReport` of what could not be used and why.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mer_cli.core.errors import ConfigError, DataError
from mer_cli.data import native, npz
from mer_cli.data.features import catalog
from mer_cli.data.features.base import Extractor
from mer_cli.data.features.extraction import Extraction
from mer_cli.data.splits import SPLIT_NAMES, Splits

log = logging.getLogger(__name__)

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
# Files


def files_by_stem(folder: Path, patterns: Sequence[str]) -> dict[str, Path]:
    """Clip name (file name without extension) -> file, for the files of ``folder`` matching
    ``patterns`` (a back-end's `file_patterns`)."""
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    return {p.stem: p for pattern in patterns for p in sorted(folder.glob(pattern))}


def pair_files(
    audio_dir: Path, video_dir: Path, audio_patterns: Sequence[str], video_patterns: Sequence[str]
) -> tuple[dict[str, dict[str, Path]], list[str]]:
    """Clip name -> {"acoustic": file, "visual": file} for every name with a file in both folders,
    and one line per file without its partner (``x.wav: no x.* among the video files``)."""
    audio, video = files_by_stem(audio_dir, audio_patterns), files_by_stem(video_dir, video_patterns)
    unpaired = [
        f"{audio[s].name}: no {s}.* among the video files" for s in sorted(audio.keys() - video.keys())
    ]
    unpaired += [
        f"{video[s].name}: no {s}.* among the audio files" for s in sorted(video.keys() - audio.keys())
    ]
    return {
        s: {"acoustic": audio[s], "visual": video[s]} for s in sorted(audio.keys() & video.keys())
    }, unpaired


def split_actors(
    actors: Sequence[str], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, str]:
    """actor -> split; no actor in two splits, drawn from ``seed``: at least one actor per split
    whose fraction is above 0. ``test_fraction=1`` (and val 0): every clip in test, the split-less
    ingest of new clips to evaluate or predict (such a dataset cannot be trained on)."""
    unique = sorted(set(actors))
    if val_fraction == 0 and test_fraction == 1:
        return dict.fromkeys(unique, "test")
    if not (0 <= val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ConfigError(
            f"val {val_fraction} and test {test_fraction} fractions: val in [0, 1), test in (0, 1), sum "
            "below 1 (or val 0 and test 1: every clip in test)"
        )
    wanted = 2 + (val_fraction > 0)
    if len(unique) < wanted:
        raise DataError(f"{len(unique)} actor(s): need at least {wanted} to split by actor")
    n_val = max(1, round(val_fraction * len(unique))) if val_fraction > 0 else 0
    n_test = max(1, round(test_fraction * len(unique)))
    if n_val + n_test >= len(unique):
        n_val, n_test = min(n_val, 1), 1
    order = np.random.default_rng(seed).permutation(len(unique))
    return {
        unique[i]: "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
        for rank, i in enumerate(order)
    }


# ---------------------------------------------------------------------------------------------
# A folder


@dataclass(frozen=True)
class Ingested:
    """What `write` wrote: clips per split, the record per stream, what was left out and the
    feature cache's hits (None without a cache)."""

    path: Path
    counts: dict[str, int]
    n_features: dict[str, int]
    record: dict[str, Any]
    report: IngestReport
    cache_line: str | None


@dataclass(frozen=True)
class Plan:
    """What an ingest will read, fixed before any file is: every labelled clip (in file-name
    order) with its files, actor, label and split, and what was left out so far."""

    pairs: dict[str, dict[str, Path]]  # clip -> stream -> file, labelled clips only, in order
    actor_of: dict[str, str]
    label_of: dict[str, int]
    split_of: dict[str, str]  # actor -> split
    report: IngestReport

    @property
    def wanted_splits(self) -> list[str]:
        """The splits that must end up with clips (test only for a split-less ingest)."""
        return sorted(set(self.split_of.values()))


def plan(
    audio_dir: Path,
    video_dir: Path,
    extractors: Mapping[str, Extractor],
    names: Names,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
) -> Plan:
    """Pair the files, label them by name and draw the splits by actor (seeded): no file read."""
    patterns = {s: catalog.backend_of(s, e.record()).file_patterns for s, e in extractors.items()}
    pairs, unpaired = pair_files(audio_dir, video_dir, patterns["acoustic"], patterns["visual"])
    report = IngestReport(unpaired=unpaired)
    actor_of: dict[str, str] = {}
    label_of: dict[str, int] = {}
    for stem in pairs:
        parsed = names.parse(stem)
        if isinstance(parsed, str):
            report.unlabelled.append(f"{stem}: {parsed}")
        else:
            actor_of[stem], label_of[stem] = parsed
    if not actor_of:
        raise DataError(
            f"{audio_dir}, {video_dir}: no clip with both an audio and a video file and a name matching "
            f"{names.pattern!r} ({len(pairs)} pairs, {len(unpaired)} unpaired files)"
        )
    split_of = split_actors(list(actor_of.values()), val_fraction, test_fraction, seed)
    labelled = {stem: pairs[stem] for stem in actor_of}
    return Plan(labelled, actor_of, label_of, split_of, report)


def extract_into(
    writer: native.DatasetWriter,
    planned: Plan,
    clips: Sequence[str],
    extractors: Mapping[str, Extractor],
    cache_root: Path | None,
    progress: bool,
) -> tuple[dict[str, int], dict[str, list[float]], Extraction]:
    """Extract ``clips`` (of ``planned``, in that order) into ``writer``; clips per split, each
    stream's measured frame rates (one per clip that had one) and the extraction (its cache)."""
    extraction = Extraction(
        {stem: planned.pairs[stem] for stem in clips},
        extractors,
        cache_root,
        progress=progress,
        desc="ingest",
    )
    rates: dict[str, list[float]] = {s: [] for s in extractors}
    counts = dict.fromkeys(SPLIT_NAMES, 0)
    for clip in extraction:
        if clip.frames is None:
            planned.report.unreadable.append(
                f"{clip.file.name if clip.file else clip.clip_id}: {clip.problem}"
            )
            continue
        actor = planned.actor_of[clip.clip_id]
        for s, f in clip.frames.items():
            if f.frame_rate_hz is not None:
                rates[s].append(f.frame_rate_hz)
        writer.add(
            planned.split_of[actor],
            clip.clip_id,
            clip.frames["acoustic"].values,
            clip.frames["visual"].values,
            planned.label_of[clip.clip_id],
            speaker=actor,  # the actor the file name gave: the leakage check needs no pattern
            valid={s: f.valid for s, f in clip.frames.items()},  # the face toolkit's, where it gave one
        )
        counts[planned.split_of[actor]] += 1
    return counts, rates, extraction


def check_splits_filled(
    counts: Mapping[str, int], wanted: Sequence[str], where: str, report: IngestReport
) -> None:
    """Refuse a dataset missing the clips of a split it should have (all its clips unreadable)."""
    empty = [s for s in wanted if counts[s] == 0]
    if empty:
        raise DataError(
            f"{where}: no clip of the {empty[0]} split could be read "
            f"({'; '.join(report.lines(3)) or 'no clips'}); nothing was written"
        )


def dataset_target(out: Path, wanted: Sequence[str]) -> Path:
    """Where the clips are written: ``out``, or for an .npz a hidden sibling folder (our own
    leftover of an interrupted .npz ingest removed)."""
    if out.suffix == ".npz" and set(wanted) != set(SPLIT_NAMES):
        raise ConfigError(
            f"{out}: an .npz holds train, val and test clips: write a split-less ingest to a directory"
        )
    target = out.with_name(f".{out.name}.clips") if out.suffix == ".npz" else out
    if target.exists():
        shutil.rmtree(target)
    return target


def finish_dataset(
    writer: native.DatasetWriter,
    records: Mapping[str, Mapping[str, Any]],
    rates: Mapping[str, Sequence[float]],
    out: Path,
) -> tuple[dict[str, Any], dict[str, int]]:
    """Record how the features were made, move the dataset into place (an .npz: converted);
    the record and the features per frame."""
    record = {s: measured_record(r, rates[s]) for s, r in records.items()}
    for s in writer.masked_streams:  # the dataset stores its per-frame validity (`Split.valid`)
        record[s]["validity_mask"] = True
    writer.ingest_settings = record
    n_features = writer.n_features()
    if not writer.finish():
        raise DataError(f"{writer.path}: appeared while writing; nothing was written")
    if out.suffix == ".npz":
        try:
            npz.save_npz(native.load_dir(writer.path, check_values=False), out)
        finally:
            shutil.rmtree(writer.path, ignore_errors=True)
    return record, n_features


def write(
    out: Path,
    audio_dir: Path,
    video_dir: Path,
    extractors: Mapping[str, Extractor],
    names: Names,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
    cache_root: Path | None = None,
    progress: bool = True,
) -> Ingested:
    """Extract every paired, labelled clip with ``extractors`` (stream -> opened back-end) and
    write the dataset to ``out`` (a directory; an .npz is written from a temporary directory).

    Splits are drawn from the actors of the labelled clips before any file is read. A broken file
    leaves its clip out (reported); nothing is written when no clip, or no clip of a split that
    should have some, could be read. Refuses an existing ``out``."""
    out = out.expanduser()
    if out.exists():
        raise DataError(f"{out}: already exists; choose a new path (nothing was written)")
    planned = plan(audio_dir, video_dir, extractors, names, val_fraction, test_fraction, seed)
    writer = native.DatasetWriter(dataset_target(out, planned.wanted_splits), names.class_names)
    try:
        counts, rates, extraction = extract_into(
            writer, planned, list(planned.pairs), extractors, cache_root, progress
        )
        check_splits_filled(counts, planned.wanted_splits, f"{audio_dir}, {video_dir}", planned.report)
        records = {s: e.record() for s, e in extractors.items()}
        record, n_features = finish_dataset(writer, records, rates, out)
    except BaseException:
        writer.abort()
        raise
    return Ingested(out, counts, n_features, record, planned.report, extraction.cache_line())


def measured_record(record: Mapping[str, Any], rates: Sequence[float]) -> dict[str, Any]:
    """A back-end's record with its frame rate measured on the files (the median of a video's
    timestamps over the clips) where its settings do not fix one."""
    out = dict(record)
    if out.get("frame_rate_hz") is None and rates:
        out["frame_rate_hz"] = round(float(np.median(rates)), 3)
    return out


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

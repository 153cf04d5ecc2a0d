"""Leakage between splits: does the test split share speakers with the train or validation split,
and does any split repeat another's clips?

Input: `Splits`, with each clip's speaker where the data knows it (`Split.speakers`), else parsed
from its id with ``data.speaker_pattern``, a regex whose first group is the speaker (CREMA-D's
``1001_DFA_ANG_XX`` -> ``1001``). Output: a `SpeakerCheck` for the run's metrics.json. A shared
speaker, a clip id in two splits or the same frames under two ids (`duplicates`) stops the run with
one line unless ``data.allow_speaker_overlap=true``, and then the run records it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from mer_cli.core.errors import ConfigError, DataError
from mer_cli.data import duplicates, folds
from mer_cli.data.folds import CREMA_D_ACTOR_PATTERN as CREMA_D_SPEAKER_PATTERN  # noqa: F401 (re-exported)
from mer_cli.data.splits import Splits

# the pairs of splits that must not share a speaker: the test split is scored against both
GUARDED_PAIRS = (("train", "test"), ("val", "test"))


@dataclass(frozen=True)
class SpeakerCheck:
    pattern: str
    checked: bool  # every clip id carried a speaker id (else nothing could be checked)
    speakers: dict[str, int] = field(default_factory=dict)  # per split: distinct speakers
    shared: dict[str, dict[str, int]] = field(default_factory=dict)  # "train/test": speakers, clips
    allowed: bool = False  # data.allow_speaker_overlap=true: a speaker-dependent split, on purpose
    # "train/test": {"clip_ids": n, "identical_features": m}: clips one split repeats of another
    duplicates: dict[str, dict[str, int]] = field(default_factory=dict)
    speakers_from: str = "pattern"  # "data": every clip's own speaker (dataset, data.speaker_file)

    @property
    def speaker_dependent(self) -> bool:
        return any(v["speakers"] for v in self.shared.values())

    @property
    def duplicated_clips(self) -> bool:
        return any(any(v.values()) for v in self.duplicates.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "pattern": self.pattern,
            "checked": self.checked,
            "speakers_from": self.speakers_from,
            "speakers": self.speakers,
            "shared": self.shared,
            "allow_speaker_overlap": self.allowed,
            "speaker_dependent": self.speaker_dependent,
            "duplicates": self.duplicates,
            "duplicated_clips": self.duplicated_clips,
        }


def check(splits: Splits, pattern: str, allow_overlap: bool) -> SpeakerCheck:
    """The speakers each split holds, what the test split shares and what any split repeats;
    DataError (one line naming the dataset, how many speakers or clips, and a few of them) on a
    shared speaker or a repeated clip unless ``allow_overlap``."""
    try:  # checked here, so a bad pattern names data.speaker_pattern (folds names cv.actor_pattern)
        re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"data.speaker_pattern={pattern!r}: not a regular expression ({e})") from None
    repeated = check_duplicates(splits, allow_overlap)
    ids = {s.name: folds.speakers_of(s, pattern) for s in splits.all()}
    known = all(s.speakers is not None for s in splits.all())
    if any(v is None for v in ids.values()):
        return SpeakerCheck(pattern, checked=False, allowed=allow_overlap, duplicates=repeated)
    speakers = {name: set(v or ()) for name, v in ids.items()}
    shared: dict[str, dict[str, int]] = {}
    for a, b in GUARDED_PAIRS:
        common = speakers[a] & speakers[b]
        clips = sum(1 for name in (a, b) for spk in ids[name] or () if spk in common)
        shared[f"{a}/{b}"] = {"speakers": len(common), "clips": clips}
        if common and not allow_overlap:
            by = "the data's speaker per clip" if known else f"data.speaker_pattern='{pattern}'"
            raise DataError(
                f"{splits.source}: {len(common)} speaker(s) ({_few(sorted(common))}) "
                f"are in both the {a} and {b} splits, {clips} clips: a speaker-dependent split "
                f"({by}); split by speaker, or set "
                "data.allow_speaker_overlap=true to run it anyway (recorded with every result)"
            )
    return SpeakerCheck(
        pattern,
        checked=True,
        speakers={name: len(v) for name, v in speakers.items()},
        shared=shared,
        allowed=allow_overlap,
        duplicates=repeated,
        speakers_from="data" if known else "pattern",
    )


def check_duplicates(splits: Splits, allow: bool) -> dict[str, dict[str, int]]:
    """Per pair of splits, the clip ids both hold and the clips with identical frames under
    another id; DataError (one line) on the first pair that repeats any, unless ``allow``."""
    found = duplicates.find(splits)
    if not allow:
        for pair, rep in found.items():
            if rep:
                raise DataError(f"{splits.source}: {_repeats_text(pair, rep)}")
    return {pair: rep.counts() for pair, rep in found.items()}


def _repeats_text(pair: str, rep: duplicates.Repeats) -> str:
    a, b = pair.split("/")
    what = []
    if rep.clip_ids:
        what.append(f"{len(rep.clip_ids)} clip id(s) in both ({_few(list(rep.clip_ids))})")
    if rep.identical:
        what.append(
            f"{len(rep.identical)} {b} clip(s) with the same frames as a {a} clip under another id "
            f"({_few([f'{x} = {y}' for x, y in rep.identical])})"
        )
    return (
        f"the {a} and {b} splits repeat clips: {' and '.join(what)}; remove the repeats, or set "
        "data.allow_speaker_overlap=true to run it anyway (recorded with every result)"
    )


def _few(items: list[str]) -> str:
    return ", ".join(items[:3]) + (", ..." if len(items) > 3 else "")

"""Speaker leakage: does the test split share speakers with the train or validation split?

Input: `Splits` and ``data.speaker_pattern``, a regex whose first group is the speaker in a clip id
(CREMA-D's ``1001_DFA_ANG_XX`` -> ``1001``). Output: a `SpeakerCheck` for the run's metrics.json;
a shared speaker stops the run with one line unless ``data.allow_speaker_overlap=true``, and then
the run records that its split is speaker-dependent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from mer_cli.core.errors import ConfigError, DataError
from mer_cli.data import folds
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

    @property
    def speaker_dependent(self) -> bool:
        return any(v["speakers"] for v in self.shared.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "pattern": self.pattern,
            "checked": self.checked,
            "speakers": self.speakers,
            "shared": self.shared,
            "allow_speaker_overlap": self.allowed,
            "speaker_dependent": self.speaker_dependent,
        }


def check(splits: Splits, pattern: str, allow_overlap: bool) -> SpeakerCheck:
    """The speakers each split holds and what the test split shares; DataError (one line naming
    the dataset, how many speakers and clips, and a few of them) on a shared speaker unless
    ``allow_overlap``."""
    try:  # checked here, so a bad pattern names data.speaker_pattern (folds names cv.actor_pattern)
        re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"data.speaker_pattern={pattern!r}: not a regular expression ({e})") from None
    ids = {s.name: folds.maybe_actor_ids(s.clip_ids, pattern) for s in splits.all()}
    if any(v is None for v in ids.values()):
        return SpeakerCheck(pattern, checked=False, allowed=allow_overlap)
    speakers = {name: set(v or ()) for name, v in ids.items()}
    shared: dict[str, dict[str, int]] = {}
    for a, b in GUARDED_PAIRS:
        common = speakers[a] & speakers[b]
        clips = sum(1 for name in (a, b) for spk in ids[name] or () if spk in common)
        shared[f"{a}/{b}"] = {"speakers": len(common), "clips": clips}
        if common and not allow_overlap:
            example = ", ".join(sorted(common)[:3])
            raise DataError(
                f"{splits.source}: {len(common)} speaker(s) ({example}{', ...' if len(common) > 3 else ''}) "
                f"are in both the {a} and {b} splits, {clips} clips: a speaker-dependent split "
                f"(data.speaker_pattern='{pattern}'); split by speaker, or set "
                "data.allow_speaker_overlap=true to run it anyway (recorded with every result)"
            )
    return SpeakerCheck(
        pattern,
        checked=True,
        speakers={name: len(v) for name, v in speakers.items()},
        shared=shared,
        allowed=allow_overlap,
    )

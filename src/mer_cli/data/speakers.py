"""Who speaks in each clip, from a mapping: ``data.speaker_file`` (a CSV with header ``clip,speaker``)
or a native dataset's speaker field.

Input: `Splits` and clip id -> speaker. Output: the same `Splits` with `Split.speakers` set for
every clip (the speaker check, speaker-level protocol files and cross-validation by actor then use
them instead of parsing clip ids with ``data.speaker_pattern``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from mer_cli.core.errors import DataError
from mer_cli.data import tables
from mer_cli.data.splits import Split, Splits

SPEAKER_FILE_COLUMNS = ("clip", "speaker")


def read_speaker_file(path: str | Path) -> dict[str, str]:
    """clip id -> speaker, from a ``clip,speaker`` CSV; a bad or repeated row is one `DataError`."""
    table = tables.read(path, "data.speaker_file", SPEAKER_FILE_COLUMNS)
    missing = [c for c in SPEAKER_FILE_COLUMNS if c not in table.header]
    if missing:
        raise DataError(
            f"{table.path}: the header has no {missing[0]!r} column (data.speaker_file: clip,speaker)"
        )
    clip, speaker = table.header.index("clip"), table.header.index("speaker")
    tables.unique_ids(table, clip, "data.speaker_file")
    out = {}
    for line, fields in table.rows:
        if not fields[speaker]:
            raise DataError(f"{table.path}:{line}: clip {fields[clip]!r} has an empty speaker")
        out[fields[clip]] = fields[speaker]
    return out


def with_speaker_file(splits: Splits, path: str | Path) -> Splits:
    """``splits`` with every clip's speaker from the file at ``path`` (it may name more clips)."""
    speaker_of = read_speaker_file(path)
    return attach(splits, {s.name: speaker_of for s in splits.all()}, str(Path(path).expanduser()))


def attach(splits: Splits, speaker_of: Mapping[str, Mapping[str, str]], where: str) -> Splits:
    """``splits`` with each clip's speaker from ``speaker_of[split][clip id]`` (``where`` names the
    mapping in the one-line error for a clip without a speaker)."""
    train, val, test = (_attach_split(s, speaker_of[s.name], where, splits.source) for s in splits.all())
    return replace(splits, train=train, val=val, test=test)


def _attach_split(split: Split, speaker_of: Mapping[str, str], where: str, source: str) -> Split:
    missing = [c for c in split.clip_ids if c not in speaker_of]
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise DataError(
            f"{where}: no speaker for {len(missing)} clip(s) of {source} ({split.name}: {shown}); "
            "every clip needs one"
        )
    return replace(split, speakers=tuple(speaker_of[c] for c in split.clip_ids))

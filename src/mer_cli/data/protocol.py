"""Protocol files (``data.split_file``): a published split of a corpus as one small CSV, applied to
any dataset.

Input: a CSV whose header names the key column, ``clip`` (clip ids) or ``speaker`` (every clip of
that speaker), and ``split`` (train | val | test), ``fold`` (0..K-1) or both, e.g.::

    speaker,split          clip,split,fold
    1001,train             1001_DFA_ANG_XX,train,0
    1002,test              ...

Output: `Splits` re-split by the file: every clip of the dataset is pooled and goes where the file
puts its id or its speaker (`apply_splits`), or, with ``cv.folds=K``, into the file's fold
(`apply_folds`). What the file does not name is left out of every split (a paper's exact lists
may skip clips); ids in the file that the data lacks are ignored (a whole corpus's protocol
applies to a subset of it, e.g. the embedded data's 40 actors); both are counted in the record.
Each result carries its protocol's `record` (path, sha256, counts) so that a result names it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from mer_cli.core.errors import ConfigError, DataError
from mer_cli.data import folds, tables
from mer_cli.data.splits import SPLIT_NAMES, Split, Splits

log = logging.getLogger(__name__)


KEY_COLUMNS = ("clip", "speaker")


ASSIGNMENT_COLUMNS = ("split", "fold")


@dataclass(frozen=True)
class Protocol:
    path: Path
    sha256: str
    by: str  # "clip" | "speaker": what the key column names
    split_of: dict[str, str] | None  # id -> train | val | test; None: the file has no split column
    fold_of: dict[str, int] | None  # id -> fold; None: the file has no fold column

    @property
    def assigned(self) -> dict[str, Any]:
        """id -> what the file assigns it (its split, else its fold)."""
        return (self.split_of if self.split_of is not None else self.fold_of) or {}

    @property
    def n_folds(self) -> int | None:
        return None if self.fold_of is None else len(set(self.fold_of.values()))

    def record(self) -> dict[str, Any]:
        """What a run stores about its protocol (metrics.json run.speakers.split_file)."""
        return {
            "path": str(self.path),
            "sha256": self.sha256,
            "by": self.by,
            "ids": len(self.assigned),
            "folds": self.n_folds,
        }

    def describe(self) -> str:
        return f"split by {self.path} (sha256 {self.sha256[:12]})"


def read(path: str | Path) -> Protocol:
    """The protocol file at ``path``; a malformed file or row is one `DataError` naming the file,
    the line and the id."""
    table = tables.read(path, "data.split_file", KEY_COLUMNS + ASSIGNMENT_COLUMNS)
    keys = [c for c in KEY_COLUMNS if c in table.header]
    if len(keys) != 1:
        found = "both 'clip' and 'speaker'" if keys else "neither 'clip' nor 'speaker'"
        raise DataError(f"{table.path}: the header names {found}; a split file is keyed by exactly one")
    if not any(c in table.header for c in ASSIGNMENT_COLUMNS):
        raise DataError(f"{table.path}: the header has no 'split' or 'fold' column (e.g. {keys[0]},split)")
    key = table.header.index(keys[0])
    tables.unique_ids(table, key, "data.split_file")
    split_col, fold_col = table.column("split"), table.column("fold")
    split_of: dict[str, str] | None = None if split_col is None else {}
    fold_of: dict[str, int] | None = None if fold_col is None else {}
    for line, fields in table.rows:
        where = f"{table.path}:{line}: {keys[0]} {fields[key]!r}"
        if split_of is not None and split_col is not None:
            split_of[fields[key]] = _split_name(fields[split_col], where)
        if fold_of is not None and fold_col is not None:
            fold_of[fields[key]] = _fold_number(fields[fold_col], where)
    return Protocol(table.path, table.sha256, keys[0], split_of, fold_of)


def _split_name(value: str, where: str) -> str:
    name = value.lower()
    if name not in SPLIT_NAMES:
        raise DataError(f"{where}: split {value!r} is not one of {', '.join(SPLIT_NAMES)}")
    return name


def _fold_number(value: str, where: str) -> int:
    if not value.isdigit():
        raise DataError(f"{where}: fold {value!r} is not a whole number 0, 1, 2, ...")
    return int(value)


def apply_splits(splits: Splits, protocol: Protocol, speaker_pattern: str) -> Splits:
    """Every clip of ``splits`` pooled and re-split train/val/test by ``protocol``'s split column."""
    if protocol.split_of is None:
        raise ConfigError(
            f"data.split_file={protocol.path}: has a fold column only; use it with "
            f"cv.folds={protocol.n_folds}, or add a split column"
        )
    pooled, keys = _pooled_keys(splits, protocol, speaker_pattern)
    split_of = protocol.split_of
    parts = {
        name: np.flatnonzero([split_of.get(k) == name for k in keys]).astype(np.int64) for name in SPLIT_NAMES
    }
    new = {name: replace(pooled.take(idx), name=name) for name, idx in parts.items()}
    for name, split in new.items():
        if not len(split):
            raise DataError(f"{protocol.path}: puts no clip of {splits.source} in the {name} split")
    _check_train_classes(new["train"], splits, protocol)
    record = _counted(protocol, splits, keys, new)
    return replace(
        splits,
        train=new["train"],
        val=new["val"],
        test=new["test"],
        source=f"{splits.source}, {protocol.describe()}",
        protocol=record,
    )


def apply_folds(splits: Splits, protocol: Protocol, n_folds: int, fold: int, speaker_pattern: str) -> Splits:
    """Fold ``fold`` of ``n_folds`` by ``protocol``'s fold column: test = that fold's clips,
    val = the next fold's, train = the rest (as `folds.split` does with its own folds)."""
    folds.check_fold(n_folds, fold)
    if protocol.fold_of is None:
        raise ConfigError(f"cv.folds={n_folds}: data.split_file={protocol.path} has no fold column")
    found = sorted(set(protocol.fold_of.values()))
    if found != list(range(n_folds)):
        raise ConfigError(
            f"cv.folds={n_folds}: data.split_file={protocol.path} has folds {_ranges(found)}; "
            f"cv.folds must match them, numbered 0..K-1"
        )
    pooled, keys = _pooled_keys(splits, protocol, speaker_pattern)
    fold_of_clip = np.array([protocol.fold_of.get(k, -1) for k in keys], dtype=np.int64)
    described = replace(splits, source=f"{splits.source}, {protocol.describe()}")
    out = folds.assigned(described, pooled, fold_of_clip, n_folds, fold, "from the split file")
    record = _counted(protocol, splits, keys, {s.name: s for s in out.all()})
    return replace(out, protocol=record)


def _pooled_keys(splits: Splits, protocol: Protocol, speaker_pattern: str) -> tuple[Split, list[str]]:
    """Every clip pooled, and each one's key in the file (its id, or its speaker)."""
    pooled = folds.pool(splits)
    seen: dict[str, int] = {}
    for i, clip_id in enumerate(pooled.clip_ids):
        if clip_id in seen:
            raise DataError(
                f"{splits.source}: clip id {clip_id!r} is in more than one split; a split file "
                "assigns clips by id, so every id must be unique (remove the repeat)"
            )
        seen[clip_id] = i
    if protocol.by == "clip":
        keys = list(pooled.clip_ids)
    else:
        speakers = folds.speakers_of(pooled, speaker_pattern)
        if speakers is None:
            bad = next(c for c in pooled.clip_ids if folds.maybe_actor_ids([c], speaker_pattern) is None)
            raise DataError(
                f"{protocol.path}: assigns speakers, but clip {bad!r} of {splits.source} has none "
                f"(data.speaker_pattern={speaker_pattern!r}; or give data.speaker_file=CSV)"
            )
        keys = list(speakers)
    assigned = protocol.assigned
    if not set(keys) & set(assigned):
        raise DataError(
            f"{protocol.path}: none of its {len(assigned)} {protocol.by} ids is in {splits.source} "
            f"(the file's first: {next(iter(assigned))!r}; the data's first: {keys[0]!r})"
        )
    return pooled, keys


def _check_train_classes(train: Split, splits: Splits, protocol: Protocol) -> None:
    missing = sorted(set(range(splits.n_classes)) - set(train.labels.tolist()))
    if missing:
        raise DataError(
            f"{protocol.path}: its train split holds no clip of class {splits.class_names[missing[0]]} "
            "(every class needs training clips)"
        )


def _counted(protocol: Protocol, splits: Splits, keys: list[str], new: dict[str, Split]) -> dict[str, Any]:
    """The protocol's record with what it did to this dataset: clips per split, clips it left
    out, ids it names that the data lacks (both also logged)."""
    assigned = protocol.assigned
    n_in = {name: len(s) for name, s in new.items()}
    left_out = sum(1 for k in keys if k not in assigned)
    absent = len(set(assigned) - set(keys))
    if left_out:
        log.warning(
            "%s: %d clip(s) of %s are not in the split file: left out of every split",
            protocol.path,
            left_out,
            splits.source,
        )
    if absent:
        log.info("%s: %d %s id(s) of the file are not in the data", protocol.path, absent, protocol.by)
    return {**protocol.record(), "clips": n_in, "left_out": left_out, "not_in_data": absent}


def _ranges(numbers: list[int]) -> str:
    shown = ", ".join(map(str, numbers[:6]))
    return shown + (", ..." if len(numbers) > 6 else "")

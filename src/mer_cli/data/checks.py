"""Raw per-split clips -> checked `Splits`: every format's reader ends here, so a pickle, an .npz and
a directory are validated alike; any problem is a `DataError` naming the file, the split, the
clip and what is wrong. (A clip id in two splits is not a reader's error: mer-train's leakage
check refuses it, or records it under data.allow_speaker_overlap=true; see `leakage`.)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import numpy as np

from mer_cli.core.errors import DataError, one_line
from mer_cli.data.splits import NAN_POLICIES, NOTEBOOK_CLASS_NAMES, SPLIT_NAMES, Clips, Split, Splits

log = logging.getLogger(__name__)


def from_mapping(
    raw: Any,
    source: str,
    class_names: Sequence[str] | None = None,
    nan_policy: str = "error",
) -> Splits:
    """Validate an in-memory ``{split: {clip_id: (mfcc, aus, label)}}`` mapping into `Splits`."""
    if nan_policy not in NAN_POLICIES:
        raise DataError(f"data.nan_policy={nan_policy!r}: must be one of {', '.join(NAN_POLICIES)}")
    if not isinstance(raw, Mapping):
        raise DataError(f"{source}: expected a dict with keys train/val/test, found {type(raw).__name__}")
    read = {name: _read_split(raw, name, source) for name in SPLIT_NAMES}
    _check_feature_sizes(read, source)
    # packed per split and stream into one ragged store; the per-clip arrays are dropped
    splits = {
        name: apply_nan_policy(
            Split(name, ids, Clips.pack(mfcc), Clips.pack(aus), labels), source, nan_policy
        )
        for name, (ids, mfcc, aus, labels) in read.items()
    }
    names = resolve_class_names(splits, source, class_names)
    return Splits(splits["train"], splits["val"], splits["test"], class_names=names, source=source)


_RawSplit = tuple[tuple[str, ...], list[np.ndarray], list[np.ndarray], np.ndarray]


def _read_split(raw: Mapping[str, Any], name: str, source: str) -> _RawSplit:
    """One split's ids, mfcc and action-unit frames (one array per clip) and labels, checked."""
    if name not in raw:
        raise DataError(f"{source}: split '{name}' is missing (found: {sorted(map(str, raw))})")
    clips = raw[name]
    if not isinstance(clips, Mapping):
        raise DataError(
            f"{source}: {name}: expected a dict clip_id -> (mfcc, aus, label), found {type(clips).__name__}"
        )
    if len(clips) == 0:
        raise DataError(f"{source}: split '{name}' is empty")
    ids, mfccs, auss, labels = [], [], [], []
    for clip_id, item in clips.items():
        where = f"{source}: {name}/{one_line(repr(clip_id) if not isinstance(clip_id, str) else clip_id, 80)}"
        if not isinstance(item, (tuple, list)) or len(item) != 3:
            got = f"{len(item)} items" if isinstance(item, (tuple, list)) else type(item).__name__
            raise DataError(f"{where}: expected a tuple (mfcc, action_units, label), found {got}")
        mfcc, aus, label = item
        if str(clip_id) in ids:  # e.g. keys 1 and "1" in one dict
            raise DataError(f"{where}: clip id appears twice in split '{name}'")
        ids.append(str(clip_id))
        mfccs.append(_as_frames(mfcc, where, "mfcc"))
        auss.append(_as_frames(aus, where, "action_units"))
        labels.append(_as_label(label, where))
    return tuple(ids), mfccs, auss, np.asarray(labels, dtype=np.int64)


def _as_frames(value: Any, where: str, stream: str) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as e:  # ragged nested lists
        raise DataError(f"{where}: {stream} is not a numeric array ({e})") from e
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number):
        raise DataError(f"{where}: {stream} is not numeric (dtype {arr.dtype})")
    if np.issubdtype(arr.dtype, np.complexfloating):
        raise DataError(f"{where}: {stream} is complex; expected real numbers")
    if arr.ndim != 2:
        raise DataError(f"{where}: {stream} must be 2-D (frames, features), found shape {arr.shape}")
    if arr.shape[0] == 0:
        raise DataError(f"{where}: {stream} has 0 frames")
    if arr.shape[1] == 0:
        raise DataError(f"{where}: {stream} has 0 features per frame")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _as_label(value: Any, where: str) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise DataError(f"{where}: label {one_line(repr(value), 60)} is not an integer")
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    if isinstance(value, np.ndarray) and value.size == 1:
        return _as_label(value.reshape(()).item(), where)
    raise DataError(f"{where}: label {one_line(repr(value), 60)} is not an integer")


def _check_feature_sizes(splits: dict[str, _RawSplit], source: str) -> None:
    for k, label in ((1, "mfcc"), (2, "action_units")):
        first_ids, first = splits["train"][0], cast(list[np.ndarray], splits["train"][k])
        expected = first[0].shape[1]
        for name, parts in splits.items():
            for clip_id, arr in zip(parts[0], cast(list[np.ndarray], parts[k]), strict=True):
                if arr.shape[1] != expected:
                    raise DataError(
                        f"{source}: {name}/{clip_id}: {label} has {arr.shape[1]} features per "
                        f"frame, but train/{first_ids[0]} has {expected}"
                    )


def apply_nan_policy(split: Split, source: str, policy: str) -> Split:
    bad_sets = [set(split.mfcc.nonfinite().tolist()), set(split.aus.nonfinite().tolist())]
    bad = sorted(bad_sets[0] | bad_sets[1])
    if not bad:
        return split
    names = [split.clip_ids[i] for i in bad]
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    if policy == "error":
        raise DataError(
            f"{source}: {split.name}/{names[0]}: NaN or infinite values in {len(bad)} clip(s) "
            f"({shown}); set data.nan_policy=zero or data.nan_policy=drop to accept them"
        )
    if policy == "drop":
        log.warning("%s: %s: dropped %d clip(s) with NaN/inf values: %s", source, split.name, len(bad), shown)
        dropped = set(bad)
        keep = [i for i in range(len(split)) if i not in dropped]
        if not keep:
            raise DataError(f"{source}: split '{split.name}' is empty after dropping NaN clips")
        return split.take(keep)
    log.warning("%s: %s: zeroed NaN/inf values in %d clip(s): %s", source, split.name, len(bad), shown)
    # zeroed as each clip is read: finite clips read as they are, the stored frames stay untouched
    return replace(split, mfcc=split.mfcc.with_zeroed_nonfinite(), aus=split.aus.with_zeroed_nonfinite())


def resolve_class_names(
    splits: dict[str, Split], source: str, class_names: Sequence[str] | None
) -> tuple[str, ...]:
    if class_names is None:
        # inferred from train: a label beyond them elsewhere is an error, not a new class
        n = int(splits["train"].labels.max()) + 1
        names = (
            NOTEBOOK_CLASS_NAMES if n == len(NOTEBOOK_CLASS_NAMES) else tuple(f"class_{i}" for i in range(n))
        )
    else:
        names = tuple(str(c) for c in class_names)
        if len(names) < 2 or len(set(names)) != len(names):
            raise DataError(f"data.class_names={list(names)}: need at least two distinct names")
    for s in splits.values():
        out = np.flatnonzero((s.labels < 0) | (s.labels >= len(names)))
        if out.size:
            i = int(out[0])
            raise DataError(
                f"{source}: {s.name}/{s.clip_ids[i]}: label {int(s.labels[i])} is outside the "
                f"{len(names)} classes (0..{len(names) - 1}: {', '.join(names)}; see data.class_names)"
            )
    missing = sorted(set(range(len(names))) - set(splits["train"].labels.tolist()))
    # a split-less dataset (no train clips: new clips to evaluate or predict on) is not trained on
    if missing and len(splits["train"]):
        raise DataError(
            f"{source}: train: no clip of class {missing[0]} ({names[missing[0]]}); every class "
            "needs training clips"
        )
    return names


def check_readable(path: Path) -> None:
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a file")

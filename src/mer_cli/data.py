"""Read and validate feature files into `Splits` (per clip: mfcc frames, action-unit frames, label).

Input: the notebook's pickle (``{"train"|"val"|"test": {clip_id: (mfcc, aus, label)}}``), read with
a restricted unpickler that never runs code. Output: `Splits`, plain arrays, checked clip by clip;
any problem is a `DataError` naming the file, the split, the clip and what is wrong.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from mer_cli.errors import DataError

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")
# The notebook's label order: 0 neutral, 1 anger, 2 happy, 3 fear, 4 disgust, 5 sad.
NOTEBOOK_CLASS_NAMES = ("neutral", "anger", "happy", "fear", "disgust", "sad")
NAN_POLICIES = ("error", "zero", "drop")


@dataclass(frozen=True)
class Split:
    """One split: parallel per-clip lists. ``mfcc[i]`` is (T_a, D_a), ``aus[i]`` is (T_v, D_v)."""

    name: str
    clip_ids: tuple[str, ...]
    mfcc: tuple[np.ndarray, ...]
    aus: tuple[np.ndarray, ...]
    labels: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.clip_ids)

    def take(self, index: Sequence[int] | np.ndarray) -> Split:
        """The clips at ``index``, in that order."""
        idx = [int(i) for i in index]
        return replace(
            self,
            clip_ids=tuple(self.clip_ids[i] for i in idx),
            mfcc=tuple(self.mfcc[i] for i in idx),
            aus=tuple(self.aus[i] for i in idx),
            labels=self.labels[idx],
        )


@dataclass(frozen=True)
class Splits:
    train: Split
    val: Split
    test: Split
    class_names: tuple[str, ...]
    source: str  # file path or "synthetic(...)": where the clips came from

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def all(self) -> tuple[Split, Split, Split]:
        return self.train, self.val, self.test

    def limit(self, clips_per_split: int | None) -> Splits:
        """A stratified, deterministic slice: at most ``clips_per_split`` clips per split."""
        if clips_per_split is None:
            return self
        train, val, test = (_stratified_head(s, clips_per_split) for s in self.all())
        return replace(self, train=train, val=val, test=test)


def _stratified_head(split: Split, n: int) -> Split:
    if len(split) <= n:
        return split
    # round-robin over classes, so a small slice still holds every class
    order = np.argsort(split.labels, kind="stable")
    by_class = [order[split.labels[order] == c] for c in np.unique(split.labels)]
    picked: list[int] = []
    rank = 0
    while len(picked) < n:
        for members in by_class:
            if rank < len(members) and len(picked) < n:
                picked.append(int(members[rank]))
        rank += 1
    return split.take(sorted(picked))


# ---------------------------------------------------------------------------------------------
# Safe pickle reading


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits plain containers, numbers, strings and numpy arrays; refuses every other global.

    A pickle can name any importable callable and have it called while loading; refusing all
    globals but numpy's array reconstructors means a hostile file is rejected, never executed.
    """

    ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"),
            ("collections", "OrderedDict"),
            ("builtins", "set"),
            ("builtins", "frozenset"),
            ("builtins", "complex"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refused to load {module}.{name}: only plain containers, numbers, strings and "
            "numpy arrays are allowed (a pickle naming other objects could run code)"
        )


def read_pickle(path: Path) -> Any:
    """Unpickle ``path`` with the restricted unpickler; every failure is one `DataError`."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    try:
        with path.open("rb") as f:
            return _RestrictedUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise DataError(f"{path}: not a usable pickle: {e}") from e
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError) as e:
        raise DataError(f"{path}: not a pickle or truncated ({type(e).__name__}: {e})") from e


# ---------------------------------------------------------------------------------------------
# Validation


def load(
    path: str | Path,
    class_names: Sequence[str] | None = None,
    nan_policy: str = "error",
) -> Splits:
    """Read and validate the notebook's pickle at ``path``.

    ``class_names``: names for labels 0..K-1; None takes the notebook's six when the data has six
    classes, else ``class_0, class_1, ...``. Raises `DataError` on the first problem found.
    """
    path = Path(path).expanduser()
    raw = read_pickle(path)
    return from_mapping(raw, str(path), class_names=class_names, nan_policy=nan_policy)


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
    splits = {name: _read_split(raw, name, source) for name in SPLIT_NAMES}
    _check_feature_sizes(splits, source)
    splits = {name: _apply_nan_policy(s, source, nan_policy) for name, s in splits.items()}
    _check_no_shared_clips(splits, source)
    names = _resolve_class_names(splits, source, class_names)
    return Splits(**splits, class_names=names, source=source)


def _read_split(raw: Mapping[str, Any], name: str, source: str) -> Split:
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
        where = f"{source}: {name}/{clip_id}"
        if not isinstance(item, (tuple, list)) or len(item) != 3:
            got = f"{len(item)} items" if isinstance(item, (tuple, list)) else type(item).__name__
            raise DataError(f"{where}: expected a tuple (mfcc, action_units, label), found {got}")
        mfcc, aus, label = item
        ids.append(str(clip_id))
        mfccs.append(_as_frames(mfcc, where, "mfcc"))
        auss.append(_as_frames(aus, where, "action_units"))
        labels.append(_as_label(label, where))
    return Split(name, tuple(ids), tuple(mfccs), tuple(auss), np.asarray(labels, dtype=np.int64))


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
        raise DataError(f"{where}: label {value!r} is not an integer")
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    if isinstance(value, np.ndarray) and value.size == 1:
        return _as_label(value.reshape(()).item(), where)
    raise DataError(f"{where}: label {value!r} is not an integer")


def _check_feature_sizes(splits: dict[str, Split], source: str) -> None:
    for stream in ("mfcc", "aus"):
        first = splits["train"]
        expected = getattr(first, stream)[0].shape[1]
        for s in splits.values():
            for clip_id, arr in zip(s.clip_ids, getattr(s, stream), strict=True):
                if arr.shape[1] != expected:
                    label = "mfcc" if stream == "mfcc" else "action_units"
                    raise DataError(
                        f"{source}: {s.name}/{clip_id}: {label} has {arr.shape[1]} features per "
                        f"frame, but {first.name}/{first.clip_ids[0]} has {expected}"
                    )


def _apply_nan_policy(split: Split, source: str, policy: str) -> Split:
    bad = [
        i
        for i, (m, a) in enumerate(zip(split.mfcc, split.aus, strict=True))
        if not (np.isfinite(m).all() and np.isfinite(a).all())
    ]
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
        keep = [i for i in range(len(split)) if i not in set(bad)]
        if not keep:
            raise DataError(f"{source}: split '{split.name}' is empty after dropping NaN clips")
        return split.take(keep)
    log.warning("%s: %s: zeroed NaN/inf values in %d clip(s): %s", source, split.name, len(bad), shown)
    fix = set(bad)
    return replace(
        split,
        mfcc=tuple(
            np.nan_to_num(m, nan=0.0, posinf=0.0, neginf=0.0) if i in fix else m
            for i, m in enumerate(split.mfcc)
        ),
        aus=tuple(
            np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0) if i in fix else a
            for i, a in enumerate(split.aus)
        ),
    )


def _check_no_shared_clips(splits: dict[str, Split], source: str) -> None:
    seen: dict[str, str] = {}
    for s in splits.values():
        for clip_id in s.clip_ids:
            if clip_id in seen:
                raise DataError(
                    f"{source}: {s.name}/{clip_id}: clip is also in split '{seen[clip_id]}' "
                    "(the same clip in two splits leaks test data into training)"
                )
            seen[clip_id] = s.name


def _resolve_class_names(
    splits: dict[str, Split], source: str, class_names: Sequence[str] | None
) -> tuple[str, ...]:
    max_label = max(int(s.labels.max()) for s in splits.values())
    if class_names is None:
        n = max_label + 1
        names = (
            NOTEBOOK_CLASS_NAMES if n == len(NOTEBOOK_CLASS_NAMES) else tuple(f"class_{i}" for i in range(n))
        )
    else:
        names = tuple(str(c) for c in class_names)
    for s in splits.values():
        out = np.flatnonzero((s.labels < 0) | (s.labels >= len(names)))
        if out.size:
            i = int(out[0])
            raise DataError(
                f"{source}: {s.name}/{s.clip_ids[i]}: label {int(s.labels[i])} is outside the "
                f"{len(names)} configured classes (0..{len(names) - 1}: {', '.join(names)})"
            )
    missing = sorted(set(range(len(names))) - set(splits["train"].labels.tolist()))
    if missing:
        raise DataError(
            f"{source}: train: no clip of class {missing[0]} ({names[missing[0]]}); every class "
            "needs training clips"
        )
    return names

"""Read and validate feature files into `Splits` (per clip: mfcc frames, action-unit frames, label).

Input: the notebook's pickle (``{"train"|"val"|"test": {clip_id: (mfcc, aus, label)}}``), read with
a restricted unpickler that never runs code, mer-cli's native ``.npz`` (no pickle at all, see
`save_npz`) or its native directory of ``.npy`` files (`save_dir`, `load_dir`: read clip by clip,
never whole). Output: `Splits`, each stream's clips stored ragged (`Clips`), checked clip by clip;
any problem is a `DataError` naming the file, the split, the clip and what is wrong.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import contextlib
import json
import logging
import os
import pickle
import shutil
import struct
import uuid
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar, cast, overload

import numpy as np

from mer_cli.core.artifacts import atomic_open
from mer_cli.core.errors import DataError

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")
# The notebook's label order: 0 neutral, 1 anger, 2 happy, 3 fear, 4 disgust, 5 sad.
NOTEBOOK_CLASS_NAMES = ("neutral", "anger", "happy", "fear", "disgust", "sad")
NAN_POLICIES = ("error", "zero", "drop")


# the file formats' two streams, under the names the rest of mer-cli uses (config, models, reports)
STREAM_FIELDS = {"acoustic": "mfcc", "visual": "aus"}


class Clips(Sequence[np.ndarray]):
    """One stream's clips, stored ragged: every clip's frames end to end in one or more stores
    (``(frames (sum T, F), offsets (M + 1,))``, in memory or in a native dataset directory), and
    which stored clips this sequence holds, in order. ``clips[i]`` is clip i's (T_i, F) float32
    frames: a view of an in-memory store, or read from the file when it is asked for. Taking a
    subset (`take`, `concat`) copies no frames, only clip numbers.
    """

    def __init__(
        self,
        stores: Sequence[tuple[Any, np.ndarray]],
        index: np.ndarray | None = None,
        zero_nonfinite: bool = False,
    ) -> None:
        self.stores = tuple(stores)
        counts = [len(offsets) - 1 for _, offsets in self.stores]
        self._base = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        n_stored = int(self._base[-1])
        # which stored clips, in order (numbered across the stores)
        self.order = np.arange(n_stored, dtype=np.int64) if index is None else np.asarray(index, np.int64)
        # data.nan_policy=zero: NaN/inf become 0 when a clip is read (the stored frames stay as they are)
        self.zero_nonfinite = zero_nonfinite

    @staticmethod
    def pack(clips: Sequence[np.ndarray]) -> Clips:
        """Per-clip arrays (each (T_i, F)) copied end to end into one in-memory store."""
        offsets = np.concatenate([[0], np.cumsum([len(c) for c in clips])]).astype(np.int64)
        if not len(clips):
            return Clips([(np.zeros((0, 0), np.float32), offsets)])
        return Clips([(np.concatenate(clips).astype(np.float32, copy=False), offsets)])

    def __len__(self) -> int:
        return len(self.order)

    @overload
    def __getitem__(self, i: int) -> np.ndarray: ...
    @overload
    def __getitem__(self, i: slice) -> Clips: ...
    def __getitem__(self, i: int | slice) -> np.ndarray | Clips:
        if isinstance(i, slice):
            return self.take(np.arange(len(self))[i])
        g = int(self.order[i])
        s = int(np.searchsorted(self._base, g, side="right")) - 1
        frames, offsets = self.stores[s]
        local = g - int(self._base[s])
        x = frames[int(offsets[local]) : int(offsets[local + 1])]
        if self.zero_nonfinite:
            x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
        return x

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))

    @cached_property
    def lengths(self) -> np.ndarray:
        """(N,) int64: each clip's frame count (read from the offsets alone, never the frames)."""
        stored = np.concatenate([np.diff(offsets) for _, offsets in self.stores]).astype(np.int64)
        return stored[self.order]

    @property
    def n_features(self) -> int:
        return int(self.stores[0][0].shape[1])

    @property
    def in_memory(self) -> bool:
        """Every store is an array in memory (none is read from a file clip by clip)."""
        return all(isinstance(frames, np.ndarray) for frames, _ in self.stores)

    def take(self, idx: Sequence[int] | np.ndarray) -> Clips:
        """The clips ``idx``, in that order (no frame is copied)."""
        return Clips(self.stores, self.order[np.asarray(idx, dtype=np.int64)], self.zero_nonfinite)

    def with_zeroed_nonfinite(self) -> Clips:
        return Clips(self.stores, self.order, zero_nonfinite=True)

    @staticmethod
    def concat(parts: Sequence[Clips]) -> Clips:
        """The clips of ``parts`` one after another, over the union of their stores."""
        stores: list[tuple[Any, np.ndarray]] = []
        index = []
        for p in parts:
            base = []
            for store in p.stores:
                found = next((k for k, s in enumerate(stores) if s is store), None)
                if found is None:
                    stores.append(store)
                    found = len(stores) - 1
                base.append(found)
            # the part's clip numbers, renumbered into the union's
            new_base = np.concatenate([[0], np.cumsum([len(o) - 1 for _, o in stores])])
            which = np.searchsorted(p._base, p.order, side="right") - 1
            local = p.order - p._base[which]
            index.append(new_base[np.asarray(base, dtype=np.int64)[which]] + local)
        zero = any(p.zero_nonfinite for p in parts)
        return Clips(stores, np.concatenate(index) if index else np.zeros(0, np.int64), zero)

    def nonfinite(self, chunk_rows: int = 1 << 18) -> np.ndarray:
        """Positions (in this sequence) of the clips holding a NaN or infinite value; the stores
        are scanned ``chunk_rows`` frames at a time, so a file-backed one is never read whole."""
        bad_stored: list[np.ndarray] = []
        for s, (frames, offsets) in enumerate(self.stores):
            rows: list[np.ndarray] = []
            for start in range(0, int(offsets[-1]), chunk_rows):
                block = np.asarray(frames[start : start + chunk_rows])
                finite = np.isfinite(block).all(axis=1)
                if not finite.all():
                    rows.append(start + np.flatnonzero(~finite))
            if rows:
                clip = np.searchsorted(offsets, np.concatenate(rows), side="right") - 1
                bad_stored.append(self._base[s] + np.unique(clip))
        if not bad_stored:
            return np.zeros(0, np.int64)
        return np.flatnonzero(np.isin(self.order, np.concatenate(bad_stored)))


@dataclass(frozen=True)
class Split:
    """One split: parallel per-clip sequences. ``mfcc[i]`` is (T_a, D_a), ``aus[i]`` is (T_v, D_v),
    both float32. Per-clip arrays given here are packed into one ragged `Clips` store per stream."""

    name: str
    clip_ids: tuple[str, ...]
    mfcc: Clips
    aus: Clips
    labels: np.ndarray  # (N,) int64

    def __post_init__(self) -> None:
        for stream in ("mfcc", "aus"):
            value = getattr(self, stream)
            if not isinstance(value, Clips):
                object.__setattr__(self, stream, Clips.pack([np.asarray(x, np.float32) for x in value]))

    def __len__(self) -> int:
        return len(self.clip_ids)

    @property
    def streams(self) -> dict[str, Clips]:
        """``{"acoustic": mfcc, "visual": aus}``: each clip's frames by stream name."""
        return {name: getattr(self, field) for name, field in STREAM_FIELDS.items()}

    def take(self, index: Sequence[int] | np.ndarray) -> Split:
        """The clips at ``index``, in that order (no frame is copied)."""
        idx = np.asarray(index, dtype=np.int64)
        return replace(
            self,
            clip_ids=tuple(self.clip_ids[i] for i in idx.tolist()),
            mfcc=self.mfcc.take(idx),
            aus=self.aus.take(idx),
            labels=self.labels[idx],
        )


@dataclass(frozen=True)
class Splits:
    train: Split
    val: Split
    test: Split
    class_names: tuple[str, ...]
    source: str  # file path or "synthetic(...)": where the clips came from
    # per stream, how its features were computed from raw files (mer-ingest's settings, see
    # `ingest.settings_record`); None: not recorded (the notebook's pickle, the embedded data)
    ingest_settings: Mapping[str, Any] | None = None

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
        # protocols 0-2 use Python 2 names (``__builtin__.set``); map them as pickle itself does
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        if (module, name) == ("_codecs", "encode"):
            # protocols 0-2 spell bytes (an array's buffer) as _codecs.encode(text, "latin1")
            return _latin1_encode
        raise pickle.UnpicklingError(
            f"refused to load {module}.{name}: only plain containers, numbers, strings and "
            "numpy arrays are allowed (a pickle naming other objects could run code)"
        )


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` limited to the one use numpy pickles make of it (no other codec runs)."""
    if not isinstance(text, str) or codecs.lookup(encoding).name != "iso8859-1" or errors != "strict":
        raise pickle.UnpicklingError(
            f"refused _codecs.encode(..., {encoding!r}): only latin1 text is allowed"
        )
    return text.encode("latin1")


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a file")


def read_pickle(path: Path) -> Any:
    """Unpickle ``path`` with the restricted unpickler; every failure is one `DataError`."""
    _check_readable(path)
    try:
        with path.open("rb") as f:
            if f.read(4) == ZIP_MAGIC:
                raise DataError(f"{path}: a zip (.npz) file, not a pickle: use data=npz")
            f.seek(0)
            return _RestrictedUnpickler(f).load()
    except DataError:
        raise
    except pickle.UnpicklingError as e:
        raise DataError(f"{path}: not a usable pickle: {_one_line(e)}") from e
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from e
    except Exception as e:  # any other failure to decode a user's bytes is a bad file, not our bug
        raise DataError(f"{path}: not a pickle or truncated ({type(e).__name__}: {_one_line(e)})") from e


def _one_line(e: BaseException | str, limit: int = 200) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
    read = {name: _read_split(raw, name, source) for name in SPLIT_NAMES}
    _check_feature_sizes(read, source)
    # packed per split and stream into one ragged store; the per-clip arrays are dropped
    splits = {
        name: _apply_nan_policy(
            Split(name, ids, Clips.pack(mfcc), Clips.pack(aus), labels), source, nan_policy
        )
        for name, (ids, mfcc, aus, labels) in read.items()
    }
    _check_no_shared_clips(splits, source)
    names = _resolve_class_names(splits, source, class_names)
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
        where = (
            f"{source}: {name}/{_one_line(repr(clip_id) if not isinstance(clip_id, str) else clip_id, 80)}"
        )
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
        raise DataError(f"{where}: label {_one_line(repr(value), 60)} is not an integer")
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    if isinstance(value, np.ndarray) and value.size == 1:
        return _as_label(value.reshape(()).item(), where)
    raise DataError(f"{where}: label {_one_line(repr(value), 60)} is not an integer")


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


def _apply_nan_policy(split: Split, source: str, policy: str) -> Split:
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
    if missing:
        raise DataError(
            f"{source}: train: no clip of class {missing[0]} ({names[missing[0]]}); every class "
            "needs training clips"
        )
    return names


# ---------------------------------------------------------------------------------------------
# The native format: .npz, no pickle anywhere
#
# One zip of plain arrays (numpy's .npz, read with allow_pickle=False, so it cannot run code):
#   format_version          ()        int, NPZ_FORMAT_VERSION
#   class_names             (K,)      str, label i is class_names[i]
#   <split>.clip_ids        (N,)      str                         for split in train, val, test
#   <split>.labels          (N,)      int64
#   <split>.mfcc            (sum T_a, D_a) float32, every clip's frames one after another
#   <split>.mfcc_offsets    (N + 1,)  int64, clip i is mfcc[offsets[i]:offsets[i + 1]]
#   <split>.aus, <split>.aus_offsets  the same for the action units
#   ingest_settings         ()        str, optional: JSON, per stream how mer-ingest computed it

NPZ_FORMAT_VERSION = 1
ZIP_MAGIC = b"PK\x03\x04"  # an .npz is a zip archive
_STREAM_KEYS = (("mfcc", "mfcc"), ("aus", "action_units"))


def save_npz(splits: Splits, path: str | Path) -> Path:
    """Write ``splits`` as a native ``.npz`` (atomically: a failed write leaves no file)."""
    path = Path(path).expanduser()
    arrays: dict[str, Any] = {  # Any: numpy types **kwds as its own keyword options
        "format_version": np.array(NPZ_FORMAT_VERSION, dtype=np.int64),
        "class_names": np.array(splits.class_names, dtype=str),
    }
    if splits.ingest_settings is not None:
        arrays["ingest_settings"] = np.array(json.dumps(splits.ingest_settings), dtype=str)
    for s in splits.all():
        arrays[f"{s.name}.clip_ids"] = np.array(s.clip_ids, dtype=str)
        arrays[f"{s.name}.labels"] = s.labels.astype(np.int64)
        for stream, _ in _STREAM_KEYS:
            clips = getattr(s, stream)
            arrays[f"{s.name}.{stream}"] = np.concatenate(list(clips)).astype(np.float32)
            arrays[f"{s.name}.{stream}_offsets"] = np.concatenate([[0], np.cumsum(clips.lengths)]).astype(
                np.int64
            )
    with atomic_open(path, "wb") as f:
        np.savez_compressed(f, **arrays)
    return path


def load_npz(
    path: str | Path,
    class_names: Sequence[str] | None = None,
    nan_policy: str = "error",
) -> Splits:
    """Read a native ``.npz`` dataset and validate it exactly as a pickle is validated.

    ``class_names``: None takes the names stored in the file. Raises `DataError` on any problem.
    """
    path = Path(path).expanduser()
    arrays = read_npz_arrays(path)
    raw, stored_names = _mapping_from_arrays(arrays, path)
    splits = from_mapping(
        raw,
        str(path),
        class_names=stored_names if class_names is None else class_names,
        nan_policy=nan_policy,
    )
    return replace(splits, ingest_settings=read_ingest_settings(arrays, path))


def read_npz_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of the .npz at ``path`` (no pickle allowed); any failure is one `DataError`."""
    _check_readable(path)
    try:
        with path.open("rb") as f:
            head = f.read(4)
        if head != ZIP_MAGIC:  # np.load would try it as a pickle (and refuse): say what it is
            hint = ": it looks like a pickle, use data=pickle" if head[:1] == b"\x80" else ""
            raise DataError(f"{path}: not an .npz file (no zip header){hint}")
        with np.load(path, allow_pickle=False) as npz:
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise DataError(f"{path}: a single .npy array, not an .npz dataset")
            arrays = {k: npz[k] for k in npz.files}
    except DataError:
        raise
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from e
    except (ValueError, zipfile.BadZipFile, EOFError) as e:
        if "allow_pickle" in str(e):
            raise DataError(f"{path}: holds pickled objects; a native .npz holds plain arrays only") from e
        raise DataError(f"{path}: not an .npz file or truncated ({_one_line(e)})") from e
    except Exception as e:  # any other failure to decode a user's bytes is a bad file, not our bug
        raise DataError(f"{path}: not an .npz file or truncated ({type(e).__name__}: {_one_line(e)})") from e
    return arrays


def read_ingest_settings(arrays: Mapping[str, np.ndarray], path: Path) -> dict[str, Any] | None:
    """The optional ``ingest_settings`` record of a native file (None: the file has none)."""
    if "ingest_settings" not in arrays:
        return None
    record = arrays["ingest_settings"]
    try:
        settings = json.loads(str(record)) if record.shape == () and record.dtype.kind == "U" else None
    except json.JSONDecodeError:
        settings = None
    if not isinstance(settings, dict):
        raise DataError(f"{path}: ingest_settings must be one JSON object (as mer-ingest writes it)")
    return settings


def _mapping_from_arrays(arrays: dict[str, np.ndarray], path: Path) -> tuple[dict[str, Any], list[str]]:
    def get(key: str) -> np.ndarray:
        if key not in arrays:
            raise DataError(f"{path}: missing array '{key}' (not a mer-cli .npz, or written by another tool)")
        return arrays[key]

    version = get("format_version")
    if version.shape != () or not np.issubdtype(version.dtype, np.integer):
        raise DataError(f"{path}: format_version must be one integer, found {version!r}")
    if int(version) != NPZ_FORMAT_VERSION:
        raise DataError(
            f"{path}: format_version {int(version)} is not supported "
            f"(this mer-cli reads {NPZ_FORMAT_VERSION})"
        )
    names = get("class_names")
    if names.ndim != 1 or names.dtype.kind != "U":
        raise DataError(f"{path}: class_names must be a 1-D array of strings")
    raw: dict[str, Any] = {}
    for split in SPLIT_NAMES:
        if not any(k.startswith(f"{split}.") for k in arrays):
            raise DataError(f"{path}: split '{split}' is missing")
        ids, labels = get(f"{split}.clip_ids"), get(f"{split}.labels")
        if ids.ndim != 1 or labels.shape != ids.shape:
            raise DataError(
                f"{path}: {split}: {ids.shape} clip ids but {labels.shape} labels; expected one per clip"
            )
        streams = [stream_clips(arrays, f"{split}.", stream, len(ids), path) for stream, _ in _STREAM_KEYS]
        clips: dict[str, Any] = {}
        for i, clip_id in enumerate(ids.tolist()):
            if clip_id in clips:
                raise DataError(f"{path}: {split}/{clip_id}: clip id appears twice in split '{split}'")
            clips[clip_id] = (streams[0][i], streams[1][i], labels[i])
        raw[split] = clips
    return raw, names.tolist()


def check_offsets(offsets: np.ndarray, n_clips: int, n_frames: int, what: str, frames_name: str) -> None:
    """``offsets`` (``what``, naming file and split) rise from 0 to the ``n_frames`` frames of
    ``frames_name``, one entry more than the ``n_clips`` clips; else one `DataError`."""
    ok = (
        offsets.shape == (n_clips + 1,)
        and np.issubdtype(offsets.dtype, np.integer)
        and offsets[0] == 0
        and offsets[-1] == n_frames
        and bool((np.diff(offsets) >= 0).all())
    )
    if not ok:
        raise DataError(
            f"{what} must rise from 0 to the {n_frames} frames of {frames_name}, "
            f"one more entry than the {n_clips} clips"
        )


def stream_clips(
    arrays: Mapping[str, np.ndarray], prefix: str, stream: str, n_clips: int, path: Path
) -> list[np.ndarray]:
    """Each clip's frames of ``stream`` (``mfcc`` | ``aus``) from the arrays ``<prefix><stream>``
    and ``<prefix><stream>_offsets``, after checking that they fit together."""
    where = prefix.rstrip(".") or "clips"
    label = dict(_STREAM_KEYS)[stream]
    for key in (f"{prefix}{stream}", f"{prefix}{stream}_offsets"):
        if key not in arrays:
            raise DataError(f"{path}: missing array '{key}' (not a mer-cli .npz, or written by another tool)")
    frames, offsets = arrays[f"{prefix}{stream}"], arrays[f"{prefix}{stream}_offsets"]
    check_offsets(offsets, n_clips, len(frames), f"{path}: {where}: {stream}_offsets", f"{prefix}{stream}")
    if frames.ndim != 2:
        raise DataError(f"{path}: {where}: {label} must be 2-D (frames, features), found {frames.shape}")
    return [frames[offsets[i] : offsets[i + 1]] for i in range(n_clips)]


# ---------------------------------------------------------------------------------------------
# The native directory: plain .npy files, read clip by clip, never loaded whole
#
#   DIR/dataset.json              {"format": "mer-cli dataset", "format_version": 1, "class_names": [...],
#                                  "ingest_settings": {...} (optional), "splits": {split: clip count}}
#   DIR/<split>/clip_ids.npy      (N,) str                     for split in train, val, test
#   DIR/<split>/labels.npy        (N,) int64
#   DIR/<split>/mfcc.npy          (sum T_a, D_a) float32, every clip's frames one after another
#   DIR/<split>/mfcc_offsets.npy  (N + 1,) int64, clip i is mfcc[offsets[i]:offsets[i + 1]]
#   DIR/<split>/aus.npy, aus_offsets.npy  the same for the action units
#
# Uncompressed .npy, so any tool can map a file (``np.load(..., mmap_mode="r")``). mer-cli itself
# reads a batch's clips with explicit reads (`NpyRows`) instead of mapping: every page of a mapping
# that was touched counts in the process's resident memory, so mapping a dataset larger than RAM
# would grow to its size over an epoch; pages read with pread stay in the kernel's page cache.

DIR_FORMAT = "mer-cli dataset"
DIR_FORMAT_VERSION = 1
DIR_INDEX = "dataset.json"
_NPY_HEADER_BYTES = 128  # room for any (rows, features) float32 header, so frames stream in first


class NpyRows:
    """The rows of a 2-D float32 ``.npy`` file, read on demand with ``pread`` (``rows[a:b]``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with path.open("rb") as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                else:
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                self.data_offset = f.tell()
        except (ValueError, OSError, EOFError) as e:
            raise DataError(f"{path}: not a .npy array ({_one_line(e)})") from e
        if len(shape) != 2 or fortran or dtype != np.dtype("<f4"):
            raise DataError(
                f"{path}: expected 2-D float32 frames (frames, features), found {dtype} {shape}"
                + (" in Fortran order" if fortran else "")
            )
        self.shape: tuple[int, int] = (int(shape[0]), int(shape[1]))
        self.dtype = np.dtype(np.float32)
        expected = self.data_offset + self.shape[0] * self.shape[1] * 4
        if path.stat().st_size < expected:
            raise DataError(f"{path}: truncated: {path.stat().st_size} bytes, the header promises {expected}")
        self._fd: int | None = None

    def _open(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(self.shape[0])
        out = np.empty((max(0, stop - start), self.shape[1]), dtype=np.float32)
        if out.size:
            want = out.nbytes
            at = self.data_offset + start * self.shape[1] * 4
            got = os.preadv(self._open(), [memoryview(out).cast("B")], at)  # type: ignore[arg-type]
            if got != want:
                raise DataError(f"{self.path}: short read at frame {start} (file changed while reading?)")
        return out

    def __getstate__(self) -> dict[str, Any]:  # a DataLoader worker opens its own descriptor
        return {**self.__dict__, "_fd": None}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)  # type: ignore[arg-type]


class _NpyAppender:
    """A 2-D float32 ``.npy`` written row block by row block; its header is written last."""

    def __init__(self, path: Path, n_features: int) -> None:
        self.f = path.open("wb")
        self.f.write(b"\0" * _NPY_HEADER_BYTES)
        self.rows, self.n_features = 0, n_features

    def append(self, frames: np.ndarray) -> None:
        self.f.write(np.ascontiguousarray(frames, dtype="<f4").tobytes())
        self.rows += len(frames)

    def close(self) -> None:
        header = repr({"descr": "<f4", "fortran_order": False, "shape": (self.rows, self.n_features)})
        body = header.encode("latin1")
        pad = _NPY_HEADER_BYTES - 10 - len(body) - 1  # magic 6 + version 2 + length 2, "\n" last
        self.f.seek(0)
        self.f.write(
            b"\x93NUMPY\x01\x00" + struct.pack("<H", _NPY_HEADER_BYTES - 10) + body + b" " * pad + b"\n"
        )
        self.f.close()


class DatasetWriter:
    """Writes a native directory clip by clip (`add`), into a hidden sibling renamed into place
    by `finish`: a reader never sees a half-written dataset, and a failure leaves none."""

    def __init__(
        self, path: Path, class_names: Sequence[str], ingest_settings: Mapping[str, Any] | None = None
    ):
        self.path = path
        self.tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self.tmp.mkdir(parents=True)
        self.class_names = list(class_names)
        self.ingest_settings = ingest_settings
        self.ids: dict[str, list[str]] = {s: [] for s in SPLIT_NAMES}
        self.labels: dict[str, list[int]] = {s: [] for s in SPLIT_NAMES}
        self.lengths: dict[tuple[str, str], list[int]] = {}
        self.files: dict[tuple[str, str], _NpyAppender] = {}

    def add(self, split: str, clip_id: str, mfcc: np.ndarray, aus: np.ndarray, label: int) -> None:
        self.ids[split].append(clip_id)
        self.labels[split].append(int(label))
        for stream, frames in (("mfcc", mfcc), ("aus", aus)):
            key = (split, stream)
            if key not in self.files:
                (self.tmp / split).mkdir(exist_ok=True)
                self.files[key] = _NpyAppender(self.tmp / split / f"{stream}.npy", frames.shape[1])
                self.lengths[key] = []
            self.files[key].append(frames)
            self.lengths[key].append(len(frames))

    def add_split(self, split: Split) -> None:
        for i, clip_id in enumerate(split.clip_ids):
            self.add(split.name, clip_id, split.mfcc[i], split.aus[i], int(split.labels[i]))

    def finish(self) -> bool:
        """Move the dataset into place; False (and nothing written) when ``path`` appeared meanwhile
        (another process wrote the same dataset first)."""
        try:
            for f in self.files.values():
                f.close()
            for (split, stream), lengths in self.lengths.items():
                offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
                np.save(self.tmp / split / f"{stream}_offsets.npy", offsets)
            for split in SPLIT_NAMES:
                (self.tmp / split).mkdir(exist_ok=True)
                np.save(self.tmp / split / "clip_ids.npy", np.array(self.ids[split], dtype=str))
                np.save(self.tmp / split / "labels.npy", np.array(self.labels[split], dtype=np.int64))
            index: dict[str, Any] = {
                "format": DIR_FORMAT,
                "format_version": DIR_FORMAT_VERSION,
                "class_names": self.class_names,
                "splits": {s: len(self.ids[s]) for s in SPLIT_NAMES},
            }
            if self.ingest_settings is not None:
                index["ingest_settings"] = dict(self.ingest_settings)
            (self.tmp / DIR_INDEX).write_text(json.dumps(index, indent=1) + "\n")
            try:
                os.rename(self.tmp, self.path)
            except OSError:
                if self.path.is_dir():
                    self.abort()
                    return False
                raise
            return True
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        for f in self.files.values():
            f.f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def save_dir(splits: Splits, path: str | Path) -> Path:
    """Write ``splits`` as a native directory (atomically); refuses to replace an existing path."""
    path = Path(path).expanduser()
    if path.exists():
        raise DataError(f"{path}: already exists; choose a new directory (nothing was written)")
    writer = DatasetWriter(path, splits.class_names, splits.ingest_settings)
    try:
        for s in splits.all():
            writer.add_split(s)
    except BaseException:
        writer.abort()
        raise
    if not writer.finish():
        raise DataError(f"{path}: appeared while writing; nothing was written")
    return path


def is_dataset_dir(path: Path) -> bool:
    return (path / DIR_INDEX).is_file()


def load_dir(
    path: str | Path,
    class_names: Sequence[str] | None = None,
    nan_policy: str = "error",
    check_values: bool = True,
) -> Splits:
    """Open a native dataset directory: ids, labels and offsets are read, frames stay on disk
    and are read per clip. Checked as a pickle is (``check_values=False`` skips the NaN scan,
    for a dataset mer-cli generated itself). Raises `DataError` on any problem."""
    if nan_policy not in NAN_POLICIES:
        raise DataError(f"data.nan_policy={nan_policy!r}: must be one of {', '.join(NAN_POLICIES)}")
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: not found")
    if not path.is_dir():
        hint = " (an .npz: use data=npz)" if path.suffix == ".npz" else " (a pickle: use data=pickle)"
        raise DataError(f"{path}: not a directory{hint}")
    index_path = path / DIR_INDEX
    try:
        index = json.loads(index_path.read_text())
    except FileNotFoundError:
        raise DataError(
            f"{path}: no {DIR_INDEX}: not a native dataset directory (write one with mer-convert)"
        ) from None
    except (OSError, ValueError) as e:
        raise DataError(f"{index_path}: not readable JSON ({_one_line(e)})") from e
    if not isinstance(index, dict) or index.get("format") != DIR_FORMAT:
        raise DataError(f"{index_path}: not a mer-cli dataset index (format must be {DIR_FORMAT!r})")
    if index.get("format_version") != DIR_FORMAT_VERSION:
        raise DataError(
            f"{index_path}: format_version {index.get('format_version')!r} is not supported "
            f"(this mer-cli reads {DIR_FORMAT_VERSION})"
        )
    stored_names = index.get("class_names")
    if not isinstance(stored_names, list) or not all(isinstance(c, str) for c in stored_names):
        raise DataError(f"{index_path}: class_names must be a list of strings")
    settings = index.get("ingest_settings")
    if settings is not None and not isinstance(settings, dict):
        raise DataError(f"{index_path}: ingest_settings must be one JSON object")
    source = str(path)
    splits = {name: _open_split(path / name, name, source) for name in SPLIT_NAMES}
    for stream, label in _STREAM_KEYS:
        expected = getattr(splits["train"], stream).n_features
        for s in splits.values():
            n = getattr(s, stream).n_features
            if n != expected:
                raise DataError(
                    f"{source}: {s.name}/{s.clip_ids[0]}: {label} has {n} features per frame, "
                    f"but train/{splits['train'].clip_ids[0]} has {expected}"
                )
    if check_values:
        splits = {name: _apply_nan_policy(s, source, nan_policy) for name, s in splits.items()}
    _check_no_shared_clips(splits, source)
    names = _resolve_class_names(splits, source, stored_names if class_names is None else class_names)
    return Splits(
        splits["train"], splits["val"], splits["test"], names, source=source, ingest_settings=settings
    )


def _open_split(folder: Path, name: str, source: str) -> Split:
    def small(file: str) -> np.ndarray:
        p = folder / file
        if not p.is_file():
            raise DataError(f"{source}: {name}: missing {p.name} (not a complete mer-cli dataset directory)")
        try:
            return np.load(p, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise DataError(f"{p}: not a plain .npy array ({_one_line(e)})") from e

    ids, labels = small("clip_ids.npy"), small("labels.npy")
    if ids.ndim != 1 or ids.dtype.kind != "U" or labels.shape != ids.shape:
        raise DataError(
            f"{source}: {name}: {ids.shape} clip ids but {labels.shape} labels; expected one per clip"
        )
    if len(ids) == 0:
        raise DataError(f"{source}: split '{name}' is empty")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{source}: {name}: labels must be integers, found {labels.dtype}")
    clip_ids = tuple(ids.tolist())
    if len(set(clip_ids)) != len(clip_ids):
        seen: set[str] = set()
        dup = next(c for c in clip_ids if c in seen or seen.add(c))  # type: ignore[func-returns-value]
        raise DataError(f"{source}: {name}/{dup}: clip id appears twice in split '{name}'")
    streams = {}
    for stream, label in _STREAM_KEYS:
        p = folder / f"{stream}.npy"
        if not p.is_file():
            raise DataError(f"{source}: {name}: missing {p.name} (not a complete mer-cli dataset directory)")
        frames = NpyRows(p)
        offsets = small(f"{stream}_offsets.npy")
        check_offsets(
            offsets, len(ids), len(frames), f"{source}: {name}: {stream}_offsets", f"{name}/{stream}.npy"
        )
        empty = np.flatnonzero(np.diff(offsets) == 0)
        if empty.size:
            raise DataError(f"{source}: {name}/{clip_ids[int(empty[0])]}: {label} has 0 frames")
        if frames.shape[1] == 0:
            raise DataError(f"{source}: {name}/{clip_ids[0]}: {label} has 0 features per frame")
        streams[stream] = Clips([(frames, offsets.astype(np.int64))])
    return Split(name, clip_ids, streams["mfcc"], streams["aus"], labels.astype(np.int64))

"""Read and validate feature files into `Splits` (per clip: mfcc frames, action-unit frames, label).

Input: the notebook's pickle (``{"train"|"val"|"test": {clip_id: (mfcc, aus, label)}}``), read with
a restricted unpickler that never runs code, or mer-cli's native ``.npz`` (no pickle at all, see
`save_npz`). Output: `Splits`, plain arrays, checked clip by clip; any problem is a `DataError`
naming the file, the split, the clip and what is wrong.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import json
import logging
import pickle
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from mer_cli.artifacts import atomic_open
from mer_cli.errors import DataError

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")
# The notebook's label order: 0 neutral, 1 anger, 2 happy, 3 fear, 4 disgust, 5 sad.
NOTEBOOK_CLASS_NAMES = ("neutral", "anger", "happy", "fear", "disgust", "sad")
NAN_POLICIES = ("error", "zero", "drop")


# the file formats' two streams, under the names the rest of mer-cli uses (config, models, reports)
STREAM_FIELDS = {"acoustic": "mfcc", "visual": "aus"}


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

    @property
    def streams(self) -> dict[str, tuple[np.ndarray, ...]]:
        """``{"acoustic": mfcc, "visual": aus}``: each clip's frames by stream name."""
        return {name: getattr(self, field) for name, field in STREAM_FIELDS.items()}

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
    splits = {name: _read_split(raw, name, source) for name in SPLIT_NAMES}
    _check_feature_sizes(splits, source)
    splits = {name: _apply_nan_policy(s, source, nan_policy) for name, s in splits.items()}
    _check_no_shared_clips(splits, source)
    names = _resolve_class_names(splits, source, class_names)
    return Splits(splits["train"], splits["val"], splits["test"], class_names=names, source=source)


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
        raise DataError(f"{where}: label {_one_line(repr(value), 60)} is not an integer")
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    if isinstance(value, np.ndarray) and value.size == 1:
        return _as_label(value.reshape(()).item(), where)
    raise DataError(f"{where}: label {_one_line(repr(value), 60)} is not an integer")


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
            arrays[f"{s.name}.{stream}"] = np.concatenate(clips).astype(np.float32)
            arrays[f"{s.name}.{stream}_offsets"] = np.concatenate(
                [[0], np.cumsum([len(c) for c in clips])]
            ).astype(np.int64)
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
    ok = (
        offsets.shape == (n_clips + 1,)
        and np.issubdtype(offsets.dtype, np.integer)
        and offsets[0] == 0
        and offsets[-1] == len(frames)
        and bool((np.diff(offsets) >= 0).all())
    )
    if not ok:
        raise DataError(
            f"{path}: {where}: {stream}_offsets must rise from 0 to the {len(frames)} frames of "
            f"{prefix}{stream}, one more entry than the {n_clips} clips"
        )
    if frames.ndim != 2:
        raise DataError(f"{path}: {where}: {label} must be 2-D (frames, features), found {frames.shape}")
    return [frames[offsets[i] : offsets[i + 1]] for i in range(n_clips)]

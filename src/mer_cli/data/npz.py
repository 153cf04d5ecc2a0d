"""The native .npz format: no pickle anywhere.

One zip of plain arrays (numpy's .npz, read with allow_pickle=False, so it cannot run code):
  format_version          ()        int, NPZ_FORMAT_VERSION
  class_names             (K,)      str, label i is class_names[i]
  <split>.clip_ids        (N,)      str                         for split in train, val, test
  <split>.labels          (N,)      int64
  <split>.speakers        (N,)      str, optional: each clip's speaker (mer-ingest's actor); without
                                    it speakers come from the clip ids (data.speaker_pattern)
  <split>.mfcc            (sum T_a, D_a) float32, every clip's frames one after another
  <split>.mfcc_offsets    (N + 1,)  int64, clip i is mfcc[offsets[i]:offsets[i + 1]]
  <split>.aus, <split>.aus_offsets  the same for the action units
  <split>.aus_valid       (sum T_v,) bool, optional: each frame's validity (False: the face back-end
                                    lost the face), aligned with <split>.aus_offsets; <split>.mfcc_valid
                                    the same for mfcc (see native.py; without it every frame is valid)
  ingest_settings         ()        str, optional: JSON, per stream how mer-ingest computed it
"""

from __future__ import annotations

import json
import logging
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from mer_cli.core.artifacts import atomic_open
from mer_cli.core.errors import DataError, one_line
from mer_cli.data import speakers
from mer_cli.data.checks import check_readable, from_mapping
from mer_cli.data.splits import SPLIT_NAMES, STREAM_FIELDS, Clips, Split, Splits

log = logging.getLogger(__name__)


NPZ_FORMAT_VERSION = 1


ZIP_MAGIC = b"PK\x03\x04"  # an .npz is a zip archive


STREAM_KEYS = (("mfcc", "mfcc"), ("aus", "action_units"))


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
        if s.speakers is not None:
            arrays[f"{s.name}.speakers"] = np.array(s.speakers, dtype=str)
        for stream, _ in STREAM_KEYS:
            clips = getattr(s, stream)
            arrays[f"{s.name}.{stream}"] = np.concatenate(list(clips)).astype(np.float32)
            arrays[f"{s.name}.{stream}_offsets"] = np.concatenate([[0], np.cumsum(clips.lengths)]).astype(
                np.int64
            )
        for name, masks in (s.valid or {}).items():
            arrays[f"{s.name}.{STREAM_FIELDS[name]}_valid"] = np.concatenate([np.zeros(0, bool), *masks])
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
    splits = replace(splits, ingest_settings=read_ingest_settings(arrays, path))
    train, val, test = (_with_masks(s, arrays, path) for s in splits.all())
    splits = replace(splits, train=train, val=val, test=test)
    if all(f"{s}.speakers" in arrays for s in SPLIT_NAMES):
        speaker_of = {s: _speakers_by_clip(arrays, s, path) for s in SPLIT_NAMES}
        splits = speakers.attach(splits, speaker_of, str(path))
    elif any(f"{s}.speakers" in arrays for s in SPLIT_NAMES):
        raise DataError(f"{path}: speakers for some splits only; a speaker field needs every split")
    return splits


def _speakers_by_clip(arrays: Mapping[str, np.ndarray], split: str, path: Path) -> dict[str, str]:
    ids = arrays[f"{split}.clip_ids"]
    given = check_speakers(arrays[f"{split}.speakers"], len(ids), f"{path}: {split}.speakers")
    return dict(zip(ids.tolist(), given, strict=True))


def _with_masks(split: Split, arrays: Mapping[str, np.ndarray], path: Path) -> Split:
    """``split`` with the validity masks the file stores for its streams, matched by clip id (a
    reader may have left clips out: data.nan_policy=drop)."""
    valid = {}
    ids = arrays[f"{split.name}.clip_ids"].tolist()
    for name, field in STREAM_FIELDS.items():
        masks = stream_masks(arrays, f"{split.name}.", field, len(ids), path)
        if masks is not None:
            by_id = dict(zip(ids, masks, strict=True))
            valid[name] = Clips.pack_masks([by_id[c] for c in split.clip_ids])
    return replace(split, valid=valid or None)


def stream_masks(
    arrays: Mapping[str, np.ndarray], prefix: str, stream: str, n_clips: int, path: Path
) -> list[np.ndarray] | None:
    """Each clip's (T,) bool validity mask of ``stream`` (``mfcc`` | ``aus``) from the array
    ``<prefix><stream>_valid``, aligned with ``<prefix><stream>_offsets``; None: the file has none."""
    key = f"{prefix}{stream}_valid"
    if key not in arrays:
        return None
    offsets = arrays[f"{prefix}{stream}_offsets"]
    mask = check_mask(arrays[key], int(offsets[-1]) if len(offsets) else 0, f"{path}: {key}")
    return [mask[offsets[i] : offsets[i + 1]] for i in range(n_clips)]


def check_mask(values: np.ndarray, n_frames: int, what: str) -> np.ndarray:
    """A stored validity mask (``what`` names file and array): one 0/1 (or bool) entry per frame
    of its stream, as a (n_frames,) bool array."""
    ok = values.shape == (n_frames,) and (
        values.dtype == bool
        or (np.issubdtype(values.dtype, np.integer) and bool(np.isin(values, (0, 1)).all()))
    )
    if not ok:
        raise DataError(
            f"{what}: expected {n_frames} entries of 0 or 1 (one per frame of its stream), "
            f"found {values.dtype} {values.shape}"
        )
    return values.astype(bool)


def check_speakers(values: np.ndarray, n_clips: int, what: str) -> tuple[str, ...]:
    """A speaker field (``what`` names file and split): one non-empty string per clip."""
    if values.shape != (n_clips,) or values.dtype.kind != "U":
        raise DataError(
            f"{what}: expected {n_clips} speaker names (strings), found {values.dtype} {values.shape}"
        )
    out = tuple(values.tolist())
    empty = [i for i, s in enumerate(out) if not s.strip()]
    if empty:
        raise DataError(f"{what}: clip {empty[0]} has an empty speaker")
    return out


def read_npz_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of the .npz at ``path`` (no pickle allowed); any failure is one `DataError`."""
    check_readable(path)
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
        raise DataError(f"{path}: not an .npz file or truncated ({one_line(e)})") from e
    except Exception as e:  # any other failure to decode a user's bytes is a bad file, not our bug
        raise DataError(f"{path}: not an .npz file or truncated ({type(e).__name__}: {one_line(e)})") from e
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
        streams = [stream_clips(arrays, f"{split}.", stream, len(ids), path) for stream, _ in STREAM_KEYS]
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
    label = dict(STREAM_KEYS)[stream]
    for key in (f"{prefix}{stream}", f"{prefix}{stream}_offsets"):
        if key not in arrays:
            raise DataError(f"{path}: missing array '{key}' (not a mer-cli .npz, or written by another tool)")
    frames, offsets = arrays[f"{prefix}{stream}"], arrays[f"{prefix}{stream}_offsets"]
    check_offsets(offsets, n_clips, len(frames), f"{path}: {where}: {stream}_offsets", f"{prefix}{stream}")
    if frames.ndim != 2:
        raise DataError(f"{path}: {where}: {label} must be 2-D (frames, features), found {frames.shape}")
    return [frames[offsets[i] : offsets[i + 1]] for i in range(n_clips)]

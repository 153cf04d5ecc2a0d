"""The native dataset directory: plain .npy files, read clip by clip, never loaded whole.

  DIR/dataset.json              {"format": "mer-cli dataset", "format_version": 1, "class_names": [...],
                                 "ingest_settings": {...} (optional), "splits": {split: clip count}}
  DIR/<split>/clip_ids.npy      (N,) str                     for split in train, val, test
  DIR/<split>/labels.npy        (N,) int64
  DIR/<split>/speakers.npy      (N,) str, optional: each clip's speaker (written when the data knows
                                them, e.g. mer-ingest's actors; without it speakers come from the ids)
  DIR/<split>/mfcc.npy          (sum T_a, D_a) float32, every clip's frames one after another
  DIR/<split>/mfcc_offsets.npy  (N + 1,) int64, clip i is mfcc[offsets[i]:offsets[i + 1]]
  DIR/<split>/aus.npy, aus_offsets.npy  the same for the action units
  DIR/<split>/aus_valid.npy     (sum T_v,) uint8, optional: 1 where the face back-end measured the
                                frame, 0 where it lost the face (confidence below its threshold, no
                                success, no face box), one entry per row of aus.npy (clip i is
                                aus_valid[offsets[i]:offsets[i + 1]]); mfcc_valid.npy the same for
                                mfcc. Written for a stream when any clip came with a mask (then every
                                clip of every split has one: all 1 where the back-end gave none);
                                without it every frame is valid (datasets written before masks)

Uncompressed .npy, so any tool can map a file (``np.load(..., mmap_mode="r")``). mer-cli itself
reads a batch's clips with explicit reads (`NpyRows`) instead of mapping: every page of a mapping
that was touched counts in the process's resident memory, so mapping a dataset larger than RAM
would grow to its size over an epoch; pages read with pread stay in the kernel's page cache.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import struct
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mer_cli.core.errors import DataError, one_line
from mer_cli.data.checks import apply_nan_policy, resolve_class_names
from mer_cli.data.npz import STREAM_KEYS, check_mask, check_offsets, check_speakers
from mer_cli.data.splits import NAN_POLICIES, SPLIT_NAMES, STREAM_FIELDS, Clips, Split, Splits

log = logging.getLogger(__name__)


DIR_FORMAT = "mer-cli dataset"


DIR_FORMAT_VERSION = 1


DIR_INDEX = "dataset.json"


SPEAKERS_FILE = "speakers.npy"


VALID_SUFFIX = "_valid.npy"  # <stream field>_valid.npy: a stream's per-frame validity mask


_STREAM_OF_FIELD = {field: stream for stream, field in STREAM_FIELDS.items()}


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
            raise DataError(f"{path}: not a .npy array ({one_line(e)})") from e
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
    """A 2-D float32 ``.npy`` (or, without ``n_features``, a 1-D one of ``dtype``) written row
    block by row block; its header is written last."""

    def __init__(self, path: Path, n_features: int | None, dtype: str = "<f4") -> None:
        self.f = path.open("wb")
        self.f.write(b"\0" * _NPY_HEADER_BYTES)
        self.rows, self.n_features, self.dtype = 0, n_features, dtype

    def append(self, frames: np.ndarray) -> None:
        self.f.write(np.ascontiguousarray(frames, dtype=self.dtype).tobytes())
        self.rows += len(frames)

    def close(self) -> None:
        shape = (self.rows,) if self.n_features is None else (self.rows, self.n_features)
        header = repr({"descr": self.dtype, "fortran_order": False, "shape": shape})
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
        self.speakers: dict[str, list[str | None]] = {s: [] for s in SPLIT_NAMES}
        self.lengths: dict[tuple[str, str], list[int]] = {}
        self.files: dict[tuple[str, str], _NpyAppender] = {}
        # the validity masks (`VALID_SUFFIX`) of the stream fields in ``masked``, from the first
        # clip that came with a mask (every clip before it written as all valid)
        self.masks: dict[tuple[str, str], _NpyAppender] = {}
        self.masked: set[str] = set()

    @property
    def masked_streams(self) -> list[str]:
        """The streams (acoustic, visual) written with a validity mask so far."""
        return [s for s, field in STREAM_FIELDS.items() if field in self.masked]

    def add(
        self,
        split: str,
        clip_id: str,
        mfcc: np.ndarray,
        aus: np.ndarray,
        label: int,
        speaker: str | None = None,
        valid: Mapping[str, np.ndarray | None] | None = None,
    ) -> None:
        """One clip; ``valid``: stream name (acoustic, visual) -> its (T,) bool validity mask, for
        the streams whose back-end gave one (a stream without: every frame valid)."""
        frames_of = {"mfcc": mfcc, "aus": aus}
        masks = {
            STREAM_FIELDS[s]: self._checked_mask(m, f"{split}/{clip_id}", s, len(frames_of[STREAM_FIELDS[s]]))
            for s, m in (valid or {}).items()
            if m is not None
        }
        self.ids[split].append(clip_id)
        self.labels[split].append(int(label))
        self.speakers[split].append(speaker)
        for stream, frames in frames_of.items():
            key = (split, stream)
            if key not in self.files:
                (self.tmp / split).mkdir(exist_ok=True)
                self.files[key] = _NpyAppender(self.tmp / split / f"{stream}.npy", frames.shape[1])
                self.lengths[key] = []
            if stream in masks and stream not in self.masked:
                self.masked.add(stream)
                for k, lengths in self.lengths.items():  # the clips so far: all valid
                    if k[1] == stream:
                        self._mask_file(k).append(np.ones(sum(lengths), np.uint8))
            if stream in self.masked:
                self._mask_file(key).append(masks.get(stream, np.ones(len(frames), np.uint8)))
            self.files[key].append(frames)
            self.lengths[key].append(len(frames))

    def _checked_mask(self, mask: np.ndarray, where: str, stream: str, n_frames: int) -> np.ndarray:
        m = np.asarray(mask)
        if m.shape != (n_frames,) or not (m.dtype == bool or np.isin(m, (0, 1)).all()):
            raise DataError(
                f"{self.path}: {where}: {stream} validity mask of {m.dtype} {m.shape}; expected "
                f"{n_frames} booleans, one per frame"
            )
        return m.astype(np.uint8)

    def _mask_file(self, key: tuple[str, str]) -> _NpyAppender:
        if key not in self.masks:
            split, field = key
            self.masks[key] = _NpyAppender(self.tmp / split / f"{field}{VALID_SUFFIX}", None, "|u1")
        return self.masks[key]

    def add_split(self, split: Split) -> None:
        for i, clip_id in enumerate(split.clip_ids):
            speaker = None if split.speakers is None else split.speakers[i]
            valid = {s: m[i] for s, m in (split.valid or {}).items()}
            self.add(split.name, clip_id, split.mfcc[i], split.aus[i], int(split.labels[i]), speaker, valid)

    def n_features(self) -> dict[str, int]:
        """Features per frame of each stream written so far (``acoustic``, ``visual``)."""
        names = {"mfcc": "acoustic", "aus": "visual"}
        return {names[stream]: int(f.n_features or 0) for (_, stream), f in self.files.items()}

    def _add_empty_splits(self) -> None:
        """A split without clips (a split-less ingest puts every clip in test) gets empty frame
        files with the other splits' feature counts, so every reader sees the same layout."""
        for stream in ("mfcc", "aus"):
            sizes = [f.n_features for (_, s), f in self.files.items() if s == stream]
            if not sizes:
                raise DataError(f"{self.path}: no clips to write")
            for split in SPLIT_NAMES:
                if (split, stream) not in self.files:
                    (self.tmp / split).mkdir(exist_ok=True)
                    self.files[split, stream] = _NpyAppender(self.tmp / split / f"{stream}.npy", sizes[0])
                    self.lengths[split, stream] = []
                    if stream in self.masked:
                        self._mask_file((split, stream))

    def finish(self) -> bool:
        """Move the dataset into place; False (and nothing written) when ``path`` appeared meanwhile
        (another process wrote the same dataset first)."""
        try:
            self._add_empty_splits()
            for f in (*self.files.values(), *self.masks.values()):
                f.close()
            for (split, stream), lengths in self.lengths.items():
                offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
                np.save(self.tmp / split / f"{stream}_offsets.npy", offsets)
            for split in SPLIT_NAMES:
                (self.tmp / split).mkdir(exist_ok=True)
                np.save(self.tmp / split / "clip_ids.npy", np.array(self.ids[split], dtype=str))
                np.save(self.tmp / split / "labels.npy", np.array(self.labels[split], dtype=np.int64))
                self._save_speakers(split)
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

    def _save_speakers(self, split: str) -> None:
        """speakers.npy when every clip of ``split`` came with a speaker (none: no file)."""
        given = self.speakers[split]
        if given and all(s is not None for s in given):
            np.save(self.tmp / split / SPEAKERS_FILE, np.array(given, dtype=str))
        elif any(s is not None for s in given):
            raise DataError(f"{self.path}: {split}: a speaker for some clips only; give one for every clip")

    def abort(self) -> None:
        for f in (*self.files.values(), *self.masks.values()):
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
        raise DataError(f"{index_path}: not readable JSON ({one_line(e)})") from e
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

    def first(s: Split) -> str:
        return f"{s.name}/{s.clip_ids[0]}" if s.clip_ids else s.name

    for stream, label in STREAM_KEYS:
        expected = getattr(splits["train"], stream).n_features
        for s in splits.values():
            n = getattr(s, stream).n_features
            if n != expected:
                raise DataError(
                    f"{source}: {first(s)}: {label} has {n} features per frame, "
                    f"but {first(splits['train'])} has {expected}"
                )
    if check_values:
        splits = {name: apply_nan_policy(s, source, nan_policy) for name, s in splits.items()}
    names = resolve_class_names(splits, source, stored_names if class_names is None else class_names)
    return Splits(
        splits["train"], splits["val"], splits["test"], names, source=source, ingest_settings=settings
    )


def open_parts(path: Path) -> tuple[dict[str, Split], list[str]]:
    """A directory's splits and class names as written, with none of `load_dir`'s checks: a part
    of a dataset (an ingest shard), whose splits need not hold every class."""
    index = json.loads((path / DIR_INDEX).read_text())
    return {name: _open_split(path / name, name, str(path)) for name in SPLIT_NAMES}, list(
        index["class_names"]
    )


def _open_split(folder: Path, name: str, source: str) -> Split:
    def small(file: str) -> np.ndarray:
        p = folder / file
        if not p.is_file():
            raise DataError(f"{source}: {name}: missing {p.name} (not a complete mer-cli dataset directory)")
        try:
            return np.load(p, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise DataError(f"{p}: not a plain .npy array ({one_line(e)})") from e

    ids, labels = small("clip_ids.npy"), small("labels.npy")
    if ids.ndim != 1 or ids.dtype.kind != "U" or labels.shape != ids.shape:
        raise DataError(
            f"{source}: {name}: {ids.shape} clip ids but {labels.shape} labels; expected one per clip"
        )
    # an empty split is allowed: a split-less ingest of new clips (all in test) is evaluated and
    # predicted on, never trained on (mer-train refuses an empty split)
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{source}: {name}: labels must be integers, found {labels.dtype}")
    clip_ids = tuple(ids.tolist())
    if len(set(clip_ids)) != len(clip_ids):
        seen: set[str] = set()
        dup = next(c for c in clip_ids if c in seen or seen.add(c))  # type: ignore[func-returns-value]
        raise DataError(f"{source}: {name}/{dup}: clip id appears twice in split '{name}'")
    streams, valid = {}, {}
    for stream, label in STREAM_KEYS:
        p = folder / f"{stream}.npy"
        if not p.is_file():
            raise DataError(f"{source}: {name}: missing {p.name} (not a complete mer-cli dataset directory)")
        frames = NpyRows(p)
        offsets = small(f"{stream}_offsets.npy")
        check_offsets(
            offsets, len(ids), len(frames), f"{source}: {name}: {stream}_offsets", f"{name}/{stream}.npy"
        )
        empty = np.flatnonzero(np.diff(offsets) == 0)
        if empty.size and len(ids):
            raise DataError(f"{source}: {name}/{clip_ids[int(empty[0])]}: {label} has 0 frames")
        if frames.shape[1] == 0:
            where = f"{name}/{clip_ids[0]}" if clip_ids else name
            raise DataError(f"{source}: {where}: {label} has 0 features per frame")
        streams[stream] = Clips([(frames, offsets.astype(np.int64))])
        if (folder / f"{stream}{VALID_SUFFIX}").is_file():  # optional: datasets before masks have none
            mask = check_mask(
                small(f"{stream}{VALID_SUFFIX}"), len(frames), f"{source}: {name}/{stream}{VALID_SUFFIX}"
            )
            valid[_STREAM_OF_FIELD[stream]] = Clips([(mask, offsets.astype(np.int64))])
    speakers = None  # optional: a dataset written before the field, or without known speakers
    if (folder / SPEAKERS_FILE).is_file():
        speakers = check_speakers(small(SPEAKERS_FILE), len(ids), f"{source}: {name}: {SPEAKERS_FILE}")
    labels = labels.astype(np.int64)
    return Split(name, clip_ids, streams["mfcc"], streams["aus"], labels, speakers, valid or None)

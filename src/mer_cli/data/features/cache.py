"""The feature cache: one file per (back-end recipe, input file content), so re-ingesting with
one more back-end, or after adding clips, extracts only what is new, and an interrupted
extraction resumes where it stopped.

  ROOT/<stream>-<backend>-<recipe hash>/recipe.json     the record's recipe (`base.recipe`)
  ROOT/<stream>-<backend>-<recipe hash>/<ab>/<content hash>.npz
                                        values (T, F) float32, valid (T,) bool (optional),
                                        frame_rate_hz () float (optional)

The content hash is blake2b of the file's bytes: a renamed file hits, an edited one misses.
Every entry is written to a temporary name and renamed into place, so a killed process leaves
no half-written entry; an unreadable entry counts as a miss and is written again.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mer_cli.data.features.base import Frames, recipe, recipe_key

_BLOCK = 1 << 20


def content_hash(path: Path) -> str:
    """blake2b (128 bits) of the bytes of ``path``, read in 1 MiB blocks."""
    h = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def default_root() -> Path:
    """``$XDG_CACHE_HOME/mer-cli/features`` (``~/.cache/mer-cli/features`` without it)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mer-cli" / "features"


class FeatureCache:
    """The entries of one back-end recipe (``record``: `Extractor.record`) for ``stream``."""

    def __init__(self, root: Path, stream: str, record: Mapping[str, Any]) -> None:
        self.folder = root.expanduser() / f"{stream}-{record['backend']}-{recipe_key(record)}"
        self.record = dict(record)
        self.hits = self.misses = 0

    def _entry(self, digest: str) -> Path:
        return self.folder / digest[:2] / f"{digest}.npz"

    def get(self, digest: str) -> Frames | None:
        path = self._entry(digest)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                values = np.ascontiguousarray(z["values"], dtype=np.float32)
                valid = z["valid"].astype(bool) if "valid" in z else None
                rate = float(z["frame_rate_hz"]) if "frame_rate_hz" in z else None
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            self.misses += 1  # a damaged entry (a full disk?): extracted again and replaced
            return None
        self.hits += 1
        return Frames(values, valid, rate)

    def put(self, digest: str, frames: Frames) -> None:
        path = self._entry(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        recipe_file = self.folder / "recipe.json"
        if not recipe_file.is_file():  # what the folder holds, for a person looking in it
            _write_atomic(recipe_file, (json.dumps(recipe(self.record), indent=1) + "\n").encode())
        arrays: dict[str, np.ndarray] = {"values": np.asarray(frames.values, dtype=np.float32)}
        if frames.valid is not None:
            arrays["valid"] = np.asarray(frames.valid, dtype=bool)
        if frames.frame_rate_hz is not None:
            arrays["frame_rate_hz"] = np.asarray(frames.frame_rate_hz, dtype=np.float64)
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        try:
            with tmp.open("wb") as f:
                np.savez(f, **arrays)  # type: ignore[arg-type]
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)

"""Atomic file writes and checkpoints: a run directory never holds a half-written file.

Every writer goes through a temporary file in the same directory and ``os.replace``, which is
atomic on POSIX: a reader (or a resumed run) sees the old file or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch


@contextlib.contextmanager
def atomic_open(path: Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``path`` for writing; move it into place only on success."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: Path, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)


def write_json(path: Path, obj: Any) -> None:
    """Strict JSON: NaN (an undefined metric, e.g. ROC-AUC of an absent class) becomes null."""
    write_text(path, json.dumps(_finite(obj), indent=2, allow_nan=False, default=_json_default) + "\n")


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return obj.tolist()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    with atomic_open(path, "wb") as f:
        torch.save(state, f)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    # weights_only: a checkpoint is tensors and plain values; refuse anything that runs code
    return torch.load(path, map_location=map_location, weights_only=True)

"""Atomic file writes and checkpoints: a run directory never holds a half-written file.

Every writer goes through a temporary file in the same directory and ``os.replace``, which is
atomic on POSIX: a reader (or a resumed run) sees the old file or the new one, never a mix.
Ctrl-C or kill during a write is held back until the file is in place (`deferred_interrupts`):
an exception raised inside a writer's callback (torch's zip writer, matplotlib) would otherwise
break it mid-file and surface as the writer's own error instead of a clean interruption.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import IO, Any

import torch

# the signals that stop a run (cli.py turns SIGTERM into KeyboardInterrupt as Ctrl-C does; in a
# submitit job USR2, or USR1, makes submitit requeue the job and exit: launchers.py)
INTERRUPT_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
_deferring = threading.local()


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold back the `INTERRUPT_SIGNALS` until the block has finished, then act on them as usual.

    Python runs a signal's handler in the main thread between two bytecodes, wherever that is:
    inside a C++ writer's Python callback, the resulting KeyboardInterrupt leaves a corrupt
    stream and an unrelated error. Here a signal that arrives inside the block is only recorded;
    on leaving, the handlers in force before are restored and the first recorded signal is
    handed to its handler (Ctrl-C: KeyboardInterrupt). Nested blocks defer to the outermost.
    Outside the main thread (signal handlers cannot be changed there) the block runs as is.
    """
    if getattr(_deferring, "active", False) or threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def record(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    previous: dict[int, Any] = {s: signal.signal(s, record) for s in INTERRUPT_SIGNALS}
    _deferring.active = True
    try:
        yield
    finally:
        _deferring.active = False
        for s, handler in previous.items():
            if handler is not None:  # None: a handler installed outside Python, not restorable
                signal.signal(s, handler)
        if received:
            _deliver(received[0], previous[received[0]])


def _deliver(signum: int, handler: Any) -> None:
    """Act on a held-back signal as its own handler would have."""
    if callable(handler):
        handler(signum, None)  # default_int_handler raises KeyboardInterrupt
    elif handler == signal.SIG_DFL:
        signal.raise_signal(signum)  # e.g. SIGTERM's default: end the process
    # SIG_IGN (or None: set outside Python): nothing to do


@contextlib.contextmanager
def atomic_open(path: Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``path`` for writing; move it into place only on success.

    An interruption during the write takes effect once the file is in place (or, if the write
    itself failed, once the temporary file is removed).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with deferred_interrupts():
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

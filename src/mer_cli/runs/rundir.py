"""Run directories: each run claims its own, atomically, and holds it while it runs.

Light on purpose (no torch, no Hydra): the console entry points import it before anything else.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from mer_cli.core.errors import MerError

LOCK_NAME = ".lock"


# what Hydra and the pipeline write before any training: a run directory holding nothing else
# was stopped (by bad input or an interruption) before it had anything worth keeping
SETUP_ONLY = frozenset({".hydra", "train.log", "config.yaml", "profile.json", LOCK_NAME})


_claimed: dict[str, Path] = {}


def claim(path: str) -> str:
    """Create a new directory ``path``, or ``path_2``, ``path_3``, ... when that name is taken.

    ``mkdir`` is exclusive, so two runs started in the same second never share a directory (a
    check-then-create would race). The default ``hydra.run.dir`` goes through this (the
    ``claim_dir`` resolver); Hydra resolves it several times per run, so one process gets the
    same answer for the same ``path``.
    """
    if path in _claimed:
        return str(_claimed[path])
    base = Path(path)
    base.parent.mkdir(parents=True, exist_ok=True)
    candidate, n = base, 1
    while True:
        try:
            candidate.mkdir()
            break
        except FileExistsError:
            n += 1
            candidate = base.with_name(f"{base.name}_{n}")
    _claimed[path] = candidate
    return str(candidate)


class RunDirBusy(MerError):
    """Another process holds the run directory: nothing of it may be touched."""


@contextlib.contextmanager
def hold(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir/.lock`` (an advisory ``flock``) while the block runs.

    A second run pointed at the same directory (the same explicit ``hydra.run.dir``) fails with
    one line instead of writing over the first. The kernel drops the lock when the process
    ends, however it ends, so a killed run never leaves a stale lock behind.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirBusy(
                f"{run_dir} is in use by another mer-train process: wait for it, or choose "
                "another hydra.run.dir"
            ) from None
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


@contextlib.contextmanager
def wait_and_hold(lock_path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an ``flock`` on ``lock_path`` while the block runs, waiting first for any other process
    that holds it (``on_wait`` is called then). Released however the holder ends, as in `hold`."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)  # Ctrl-C still interrupts the wait
        yield
    finally:
        os.close(fd)


def remove_if_nothing_trained(run_dir: Path) -> None:
    """Remove ``run_dir`` if it holds only set-up files: a failed start leaves no half-made run."""
    if not run_dir.is_dir() or any(p.name not in SETUP_ONLY for p in run_dir.iterdir()):
        return
    for p in run_dir.iterdir():
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    run_dir.rmdir()


def started() -> list[Path]:
    """This process's run directories: those it claimed, and an explicit ``hydra.run.dir=``
    on its command line (Hydra forgets its output dir when a job ends, however it ends)."""
    dirs = list(_claimed.values())
    for arg in sys.argv[1:]:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+") == "hydra.run.dir" and value:
            dirs.append(Path(value).expanduser())
    return dirs

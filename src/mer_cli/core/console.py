"""The console policy every entry point shares: one-line errors (MER_DEBUG=1 keeps the
traceback), exit codes, SIGINT/SIGTERM as a clean interruption.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable
from types import FrameType
from typing import NoReturn

from mer_cli.core import allocator


def stop_on_sigterm() -> None:
    """kill (SIGTERM) stops a command as Ctrl-C does: temporary files removed, last.pt kept."""
    with contextlib.suppress(ValueError):  # ValueError: not the main thread (a launcher's worker)
        signal.signal(signal.SIGTERM, _raise_interrupt)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def debug() -> bool:
    """MER_DEBUG=1: errors keep their traceback (for bug reports), instead of one line."""
    return os.environ.get("MER_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def guarded(
    prog: str,
    command: Callable[[], object],
    interrupted: str = "interrupted",
    on_interrupt: Callable[[], None] | None = None,
    malloc: str = "train",
) -> None:
    """Run ``command`` (which imports the heavy modules); an interruption it does not handle
    itself (during imports or Hydra's start-up) calls ``on_interrupt`` (the CLI removes the run
    directories this process started where nothing was trained), prints ``prog: interrupted``
    and exits 130."""
    stop_on_sigterm()
    allocator.configure(profile=malloc)  # before torch loads: its own start-up allocations follow it too
    try:
        command()
    except KeyboardInterrupt:
        if debug():
            raise
        if on_interrupt is not None:
            on_interrupt()
        print(f"{prog}: {interrupted}", file=sys.stderr)
        sys.exit(130)  # the shell's code for Ctrl-C


def fail(prog: str, message: str) -> NoReturn:
    """One line on stderr, ``prog: error: message``, and exit code 2; called in an ``except``
    block: with MER_DEBUG=1 it re-raises what was caught, traceback and all."""
    if debug():
        raise
    print(f"{prog}: error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(2)

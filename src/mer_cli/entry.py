"""Console-script entry points, free of heavy imports: they guard a command from its first line.

Ctrl-C or kill at any moment of a command, even while torch and Hydra are still loading, ends
with one line on stderr and exit code 130, never a traceback. The commands live in `cli`;
`cli.train_main` itself turns an interruption during training into the resume hint.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable
from types import FrameType

from mer_cli import allocator, launchers, rundir


def stop_on_sigterm() -> None:
    """kill (SIGTERM) stops a command as Ctrl-C does: temporary files removed, last.pt kept."""
    with contextlib.suppress(ValueError):  # ValueError: not the main thread (a launcher's worker)
        signal.signal(signal.SIGTERM, _raise_interrupt)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def debug() -> bool:
    """MER_DEBUG=1: errors keep their traceback (for bug reports), instead of one line."""
    return os.environ.get("MER_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def guarded(prog: str, command: Callable[[], object], interrupted: str = "interrupted") -> None:
    """Run ``command`` (which imports the heavy modules); an interruption it does not handle
    itself (during imports or Hydra's start-up) removes the run directories this process
    started where nothing was trained, prints ``prog: interrupted`` and exits 130."""
    stop_on_sigterm()
    allocator.configure()  # before torch loads, so its own start-up allocations follow it too
    try:
        command()
    except KeyboardInterrupt:
        if debug():
            raise
        for d in rundir.started():
            rundir.remove_if_nothing_trained(d)
        print(f"{prog}: {interrupted}", file=sys.stderr)
        sys.exit(130)  # the shell's code for Ctrl-C


def _cli(name: str) -> Callable[[], object]:
    def command() -> object:
        from mer_cli import cli  # the heavy imports, inside the guard

        return getattr(cli, name)()

    return command


def train() -> None:
    missing = launchers.missing_launcher(sys.argv[1:])  # before Hydra: one line, not its error
    if missing:
        print(f"mer-train: error: {missing}", file=sys.stderr)
        sys.exit(2)
    if {"-m", "--multirun"} & set(sys.argv[1:]):  # a parallel sweep's jobs may have trained
        hint = "interrupted: to continue the sweep, run the same command with resume=auto hydra.sweep.dir=DIR"
    else:
        hint = "interrupted before training started: nothing to resume"
    guarded("mer-train", _cli("train_main"), hint)


def evaluate() -> None:
    guarded("mer-evaluate", _cli("evaluate_main"))


def compare() -> None:
    guarded("mer-compare", _cli("compare_main"))


def convert() -> None:
    guarded("mer-convert", _cli("convert_main"))


def ingest() -> None:
    guarded("mer-ingest", _cli("ingest_main"))


def bench() -> None:
    def command() -> None:
        from mer_cli import bench

        bench.main()

    guarded("mer-bench", command)


def _module_main(module: str) -> Callable[[], object]:
    def command() -> object:
        import importlib

        return importlib.import_module(f"mer_cli.{module}").main()

    return command


def predict() -> None:
    guarded("mer-predict", _module_main("predict"))


def export() -> None:
    guarded("mer-export", _module_main("export"))

"""Console-script entry points, free of heavy imports: they guard a command from its first line.

Ctrl-C or kill at any moment of a command, even while torch and Hydra are still loading, ends
with one line on stderr and exit code 130, never a traceback. The commands live in
`commands`; `commands.train_main` itself turns an interruption during training into the resume hint.
"""

from __future__ import annotations

import runpy
import sys
from collections.abc import Callable
from pathlib import Path

from mer_cli.core import console
from mer_cli.runs import rundir
from mer_cli.sweeps import launchers


def remove_untrained_runs() -> None:
    """The run directories this process started where nothing was trained: removed."""
    for d in rundir.started():
        rundir.remove_if_nothing_trained(d)


def guarded(
    prog: str, command: Callable[[], object], interrupted: str = "interrupted", malloc: str = "train"
) -> None:
    console.guarded(prog, command, interrupted, on_interrupt=remove_untrained_runs, malloc=malloc)


def _cli(name: str) -> Callable[[], object]:
    def command() -> object:
        from mer_cli.cli import commands  # the heavy imports, inside the guard

        return getattr(commands, name)()

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
    guarded("mer-ingest", _module_main("ingest"), malloc="extract")  # allocator.PROFILES


def benchmarks_dir() -> Path:
    """The source checkout's benchmarks/ (an editable install's): the benchmarks ship outside the
    wheel, so `mer-bench` runs only from a checkout."""
    return Path(__file__).resolve().parents[3] / "benchmarks"


def bench() -> None:
    def command() -> None:
        script = benchmarks_dir() / "bench.py"
        if not script.is_file():
            print(
                f"mer-bench: error: {script}: not found: the benchmarks live in the source "
                "checkout (git clone, then pip install -e .)",
                file=sys.stderr,
            )
            sys.exit(2)
        sys.argv[0] = str(script)
        runpy.run_path(str(script), run_name="__main__")

    guarded("mer-bench", command)


def _module_main(module: str) -> Callable[[], object]:
    def command() -> object:
        import importlib

        return importlib.import_module(f"mer_cli.cli.{module}").main()

    return command


def predict() -> None:
    guarded("mer-predict", _module_main("predict"))


def export() -> None:
    guarded("mer-export", _module_main("export"))


def profile() -> None:
    guarded("mer-profile", _module_main("profile"))

"""``python -m mer_cli COMMAND ...`` (train, evaluate, predict, export, compare, convert, ingest,
profile): the console scripts without an installed entry point."""

import sys

from mer_cli.cli import entry

COMMANDS = {
    "train": entry.train,
    "evaluate": entry.evaluate,
    "predict": entry.predict,
    "export": entry.export,
    "compare": entry.compare,
    "convert": entry.convert,
    "ingest": entry.ingest,
    "profile": entry.profile,
}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: python -m mer_cli {{{','.join(COMMANDS)}}} [args...]")
    name = sys.argv.pop(1)
    sys.argv[0] = f"mer-{name}"
    COMMANDS[name]()

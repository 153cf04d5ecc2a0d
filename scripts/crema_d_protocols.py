"""Write the example CREMA-D protocol files of protocols/crema-d/ (for ``data.split_file``).

Source: CREMA-D, the Crowd-sourced Emotional Multimodal Actors Dataset (H. Cao, D. G. Cooper,
M. K. Keutmann, R. C. Gur, A. Nenkova, R. Verma: IEEE Transactions on Affective Computing 5(4),
2014), https://github.com/CheyneyComputerScience/CREMA-D, made available under the Open Data
Commons Open Database License (ODbL) v1.0. The only fact taken from it is its public metadata
layout: 91 actors numbered 1001..1091, and clip names ``<actor>_<sentence>_<emotion>_<level>``
(1001_DFA_ANG_XX), so a file keyed by speaker applies to its clips (and to the embedded synthetic
data, whose 40 actors are 1001..1040).

Output (CSV, one row per actor):
  speaker_split.csv   speaker,split   speaker-independent train/val/test: in each block of 20
                      consecutive actor numbers, 3 test, 3 val and 14 train (the last, 11-actor
                      block: 2, 2 and 7); 63 / 14 / 14 actors in all
  speaker_5folds.csv  speaker,fold    5 speaker-independent folds (0..4): in each block of 5
                      consecutive actors one actor per fold; 19 / 18 / 18 / 18 / 18 actors

Within a block the actors are ordered by a keyed hash (blake2b of "<SEED>:<actor>"), not by a
random generator, so the files are the same on every machine and Python version. Blocks keep
every range of actor numbers in every split: any prefix of the corpus (1001..10xx), such as the
embedded data, is split as the whole is. The CREMA-D demographics (sex, age, ethnicity) are not
used: these files balance nothing but actor counts.

    python scripts/crema_d_protocols.py [--out protocols/crema-d]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
from pathlib import Path

ACTORS = tuple(range(1001, 1092))  # CREMA-D's 91 actors
SEED = "mer-cli crema-d protocols v1"
SPLIT_BLOCK = 20  # actors per block of the train/val/test split
SPLIT_FRACTIONS = {"test": 0.15, "val": 0.15}  # of each block; the rest train
N_FOLDS = 5
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "protocols" / "crema-d"


def _hashed(actors: list[int]) -> list[int]:
    """``actors`` in the order of their keyed hash: a fixed shuffle, the same everywhere."""
    return sorted(actors, key=lambda a: hashlib.blake2b(f"{SEED}:{a}".encode(), digest_size=8).digest())


def _blocks(size: int) -> list[list[int]]:
    return [list(ACTORS[i : i + size]) for i in range(0, len(ACTORS), size)]


def split_of_actor() -> dict[int, str]:
    """actor -> train | val | test (see the module docstring)."""
    out: dict[int, str] = {}
    for block in _blocks(SPLIT_BLOCK):
        counts = {name: max(1, round(f * len(block))) for name, f in SPLIT_FRACTIONS.items()}
        order = _hashed(block)
        names = ["test"] * counts["test"] + ["val"] * counts["val"]
        names += ["train"] * (len(block) - len(names))
        out.update(zip(order, names, strict=True))
    return dict(sorted(out.items()))


def fold_of_actor() -> dict[int, int]:
    """actor -> fold 0..N_FOLDS-1: one actor of every block of N_FOLDS per fold."""
    out: dict[int, int] = {}
    for block in _blocks(N_FOLDS):
        out.update((actor, k) for k, actor in enumerate(_hashed(block)))
    return dict(sorted(out.items()))


def write(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, column, table in (
        ("speaker_split.csv", "split", split_of_actor()),
        ("speaker_5folds.csv", "fold", fold_of_actor()),
    ):
        path = out_dir / name
        with path.open("w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["speaker", column])
            w.writerows(table.items())
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="folder to write (default: %(default)s)"
    )
    for path in write(parser.parse_args().out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

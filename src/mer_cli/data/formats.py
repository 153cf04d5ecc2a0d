"""The dataset formats mer-cli reads, by name (``data=<name>``), and the one answer to "which
format is this path", used by mer-train, mer-evaluate, mer-predict and mer-convert alike.

Input: a path; output: the `Format` that reads it (``read(path, class_names, nan_policy)`` ->
`Splits`). Adding a format is one reader module and one entry below.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mer_cli.core.errors import DataError
from mer_cli.core.registry import Registry
from mer_cli.data import native, notebook_pickle, npz
from mer_cli.data.splits import Splits

Reader = Callable[..., Splits]  # (path, class_names=None, nan_policy="error") -> Splits


@dataclass(frozen=True)
class Format:
    name: str  # data=<name>
    what: str  # what such a path is, for messages
    recognises: Callable[[Path], bool]
    read: Reader


def _is_npz(path: Path) -> bool:
    """A zip archive, or a file named .npz (its reader then says what is wrong with it)."""
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(4) == npz.ZIP_MAGIC or path.suffix == ".npz"


# in the order `recognise` asks: a directory, then a zip (.npz), then any other file (a pickle)
FORMATS: Registry[Format] = Registry("data")
FORMATS.add(
    "native",
    Format(
        "native",
        "a native dataset directory written by mer-convert",
        native.is_dataset_dir,
        native.load_dir,
    ),
)
FORMATS.add(
    "npz", Format("npz", "a native dataset written by mer-convert or mer-ingest", _is_npz, npz.load_npz)
)
FORMATS.add("pickle", Format("pickle", "the notebook's feature pickle", Path.is_file, notebook_pickle.load))


def recognise(path: Path) -> Format:
    """The format of the dataset at ``path``; DataError naming the path when none reads it."""
    path = path.expanduser()
    if not path.exists():
        raise DataError(f"{path}: file not found")
    for _, fmt in FORMATS.items():
        if fmt.recognises(path):
            return fmt
    raise DataError(
        f"{path}: a directory without {native.DIR_INDEX}: not a dataset mer-cli reads "
        "(a native dataset directory, an .npz or the notebook's pickle)"
    )


def read(path: Path, class_names: Sequence[str] | None = None, nan_policy: str = "error") -> Splits:
    """The dataset at ``path``, in whichever format it is."""
    return recognise(path).read(path, class_names=class_names, nan_policy=nan_policy)

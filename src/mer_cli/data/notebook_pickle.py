"""The notebook's feature pickle (``{"train"|"val"|"test": {clip_id: (mfcc, aus, label)}}``),
read with a restricted unpickler that never runs code, then checked (`checks.from_mapping`).
"""

from __future__ import annotations

import _compat_pickle
import codecs
import logging
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from mer_cli.core.errors import DataError, one_line
from mer_cli.data.checks import check_readable, from_mapping
from mer_cli.data.npz import ZIP_MAGIC
from mer_cli.data.splits import Splits

log = logging.getLogger(__name__)


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits plain containers, numbers, strings and numpy arrays; refuses every other global.

    A pickle can name any importable callable and have it called while loading; refusing all
    globals but numpy's array reconstructors means a hostile file is rejected, never executed.
    """

    ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"),
            ("collections", "OrderedDict"),
            ("builtins", "set"),
            ("builtins", "frozenset"),
            ("builtins", "complex"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        # protocols 0-2 use Python 2 names (``__builtin__.set``); map them as pickle itself does
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        if (module, name) == ("_codecs", "encode"):
            # protocols 0-2 spell bytes (an array's buffer) as _codecs.encode(text, "latin1")
            return _latin1_encode
        raise pickle.UnpicklingError(
            f"refused to load {module}.{name}: only plain containers, numbers, strings and "
            "numpy arrays are allowed (a pickle naming other objects could run code)"
        )


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` limited to the one use numpy pickles make of it (no other codec runs)."""
    if not isinstance(text, str) or codecs.lookup(encoding).name != "iso8859-1" or errors != "strict":
        raise pickle.UnpicklingError(
            f"refused _codecs.encode(..., {encoding!r}): only latin1 text is allowed"
        )
    return text.encode("latin1")


def read_pickle(path: Path) -> Any:
    """Unpickle ``path`` with the restricted unpickler; every failure is one `DataError`."""
    check_readable(path)
    try:
        with path.open("rb") as f:
            if f.read(4) == ZIP_MAGIC:
                raise DataError(f"{path}: a zip (.npz) file, not a pickle: use data=npz")
            f.seek(0)
            return _RestrictedUnpickler(f).load()
    except DataError:
        raise
    except pickle.UnpicklingError as e:
        raise DataError(f"{path}: not a usable pickle: {one_line(e)}") from e
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from e
    except Exception as e:  # any other failure to decode a user's bytes is a bad file, not our bug
        raise DataError(f"{path}: not a pickle or truncated ({type(e).__name__}: {one_line(e)})") from e


def load(
    path: str | Path,
    class_names: Sequence[str] | None = None,
    nan_policy: str = "error",
) -> Splits:
    """Read and validate the notebook's pickle at ``path``.

    ``class_names``: names for labels 0..K-1; None takes the notebook's six when the data has six
    classes, else ``class_0, class_1, ...``. Raises `DataError` on the first problem found.
    """
    path = Path(path).expanduser()
    raw = read_pickle(path)
    return from_mapping(raw, str(path), class_names=class_names, nan_policy=nan_policy)

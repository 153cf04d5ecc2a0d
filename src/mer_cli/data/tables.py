"""Small CSV files a user hands mer-cli next to a dataset (``data.split_file``, ``data.speaker_file``).

Input: a path and the columns its header may name. Output: the header's column names and every
non-blank row with its line number, so that a bad row is one `DataError` naming the file, the
line and what is wrong. The file is read as text only: nothing it names is opened or imported.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mer_cli.core.errors import DataError, one_line


@dataclass(frozen=True)
class Table:
    path: Path
    header: tuple[str, ...]  # column names, stripped and lower-cased
    rows: tuple[tuple[int, tuple[str, ...]], ...]  # (line number, stripped fields), blank lines skipped
    sha256: str  # of the file's bytes: which protocol a result used

    def column(self, name: str) -> int | None:
        return self.header.index(name) if name in self.header else None


def read(path: str | Path, what: str, allowed: Sequence[str]) -> Table:
    """The CSV at ``path`` (``what`` it is, for messages: ``data.split_file``); its header must
    name only ``allowed`` columns, each once, and every row must have as many fields."""
    path = Path(path).expanduser()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found ({what})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({what}): {e.strerror or e}") from e
    try:
        text = data.decode("utf-8-sig")  # a spreadsheet's UTF-8 export starts with a BOM
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({what}; byte {e.start})") from None
    reader = csv.reader(text.splitlines())
    rows: list[tuple[int, tuple[str, ...]]] = []
    header: tuple[str, ...] | None = None
    try:
        for fields in reader:
            if not any(f.strip() for f in fields):
                continue
            stripped = tuple(f.strip() for f in fields)
            if header is None:
                header = _check_header(path, reader.line_num, stripped, what, allowed)
            elif len(stripped) != len(header):
                raise DataError(
                    f"{path}:{reader.line_num}: {len(stripped)} field(s), the header has {len(header)} "
                    f"({','.join(header)})"
                )
            else:
                rows.append((reader.line_num, stripped))
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: not CSV ({one_line(e)})") from None
    if header is None:
        raise DataError(f"{path}: empty ({what} needs a header: {','.join(allowed)})")
    if not rows:
        raise DataError(f"{path}: a header and no rows ({what})")
    return Table(path, header, tuple(rows), hashlib.sha256(data).hexdigest())


def _check_header(
    path: Path, line: int, fields: tuple[str, ...], what: str, allowed: Sequence[str]
) -> tuple[str, ...]:
    names = tuple(f.lower() for f in fields)
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise DataError(
            f"{path}:{line}: unknown column {unknown[0]!r} in the header "
            f"({what} columns: {', '.join(allowed)})"
        )
    repeated = [n for n in names if names.count(n) > 1]
    if repeated:
        raise DataError(f"{path}:{line}: column {repeated[0]!r} appears twice in the header")
    return names


def unique_ids(table: Table, key: int, what: str) -> dict[str, int]:
    """id -> line number for column ``key``: an empty or repeated id is one `DataError`."""
    first: dict[str, int] = {}
    for line, fields in table.rows:
        value = fields[key]
        if not value:
            raise DataError(f"{table.path}:{line}: empty {table.header[key]}")
        if value in first:
            raise DataError(
                f"{table.path}:{line}: {table.header[key]} {value!r} is listed twice (first on line "
                f"{first[value]}) in {what}"
            )
        first[value] = line
    return first

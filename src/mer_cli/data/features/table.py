"""Any face toolkit's per-frame table (OpenFace 2/3, py-feat, MediaPipe blendshapes, one's own)
-> frames: the columns a setting names, one row per video frame.

Input: one file per clip, a CSV (comma, semicolon or tab: whichever the header line holds most
of; header cells stripped of spaces, as OpenFace writes ``' AU01_r'``) or a ``.npy`` (T, F) array whose column
names come from ``npy_columns`` (or none: every column, unnamed). Output: (T, F) float32 frames in
``columns`` order, ``Frames.valid`` saying which rows the toolkit measured (confidence at least
the threshold, success not 0, no empty or NaN cell); invalid rows interpolated, dropped, zeroed
or kept per ``invalid_frames``; the video's frame rate fixed by a setting or measured on a
timestamp column. Presets: configs/features/video/{table,openface,pyfeat,mediapipe}.yaml.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mer_cli.core.errors import ConfigError, one_line
from mer_cli.data.features.base import Backend, Frames, settings_record
from mer_cli.data.features.openface import fill_failed

# what to do with invalid rows: interpolate, drop, zero (as the openface back-end), or keep the
# toolkit's values and leave them to the validity mask (empty or NaN cells kept as 0)
INVALID_FRAME_POLICIES = ("interpolate", "drop", "zero", "keep")
TIMESTAMP_UNITS = {"s": 1.0, "ms": 1e-3}
# cells that mean "not measured" (pandas writes NaN as an empty cell; R writes NA)
MISSING_CELLS = frozenset({"", "nan", "na", "n/a", "null"})
DELIMITERS = ",;\t"  # the first wins a tie: a one-column file is read with commas


def is_pattern(entry: str) -> bool:
    """A ``columns`` entry that selects by pattern: ``re:<regex>`` or a glob (``AU*_r``)."""
    return entry.startswith("re:") or any(c in entry for c in "*?[")


def matches(entry: str, name: str) -> bool:
    if entry.startswith("re:"):
        return re.search(entry[3:], name) is not None
    return fnmatch.fnmatchcase(name, entry)


@dataclass(frozen=True)
class Settings:
    """Defaults: every column of the table (but the timestamp, confidence and success ones),
    no rate, every row valid unless it has an empty or NaN cell, invalid rows interpolated."""

    # column names or patterns ("AU*_r", "re:^AU\d+_r$"), in the frames' order; a pattern's
    # matches come in the table's order; () = every column
    columns: tuple[str, ...] = ()
    frame_rate_hz: float | None = None  # the videos' rate; a timestamp column's, where it gives one, wins
    timestamp_column: str | None = None
    timestamp_unit: str = "s"  # s | ms
    confidence_column: str | None = None
    confidence_threshold: float = 0.5  # rows with confidence below this are invalid
    success_column: str | None = None  # rows where it is 0 are invalid
    invalid_frames: str = "interpolate"
    npy_columns: tuple[str, ...] = ()  # names of a .npy's columns (): unnamed

    def __post_init__(self) -> None:
        for name in ("columns", "npy_columns"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(c, str) and c for c in value):
                raise ConfigError(f"{name}: a list of non-empty column names, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        for entry in self.columns:
            if entry.startswith("re:"):
                try:
                    re.compile(entry[3:])
                except re.error as e:
                    raise ConfigError(f"columns: {entry!r} is not a regular expression ({e})") from e
        if self.invalid_frames not in INVALID_FRAME_POLICIES:
            raise ConfigError(
                f"invalid_frames {self.invalid_frames!r}: valid: {', '.join(INVALID_FRAME_POLICIES)}"
            )
        if self.timestamp_unit not in TIMESTAMP_UNITS:
            raise ConfigError(f"timestamp_unit {self.timestamp_unit!r}: valid: {', '.join(TIMESTAMP_UNITS)}")
        if self.frame_rate_hz is not None and not self.frame_rate_hz > 0:
            raise ConfigError(f"frame_rate_hz {self.frame_rate_hz}: must be above 0 (or null)")

    @property
    def named_columns(self) -> list[str] | None:
        """The feature names when no entry is a pattern (known before any file is read)."""
        if not self.columns or any(is_pattern(c) for c in self.columns):
            return None
        return list(dict.fromkeys(self.columns))

    @property
    def side_columns(self) -> list[str]:
        """The timestamp, confidence and success columns: never features themselves."""
        return [c for c in (self.timestamp_column, self.confidence_column, self.success_column) if c]


def select(header: Sequence[str], settings: Settings) -> list[int]:
    """The indices in ``header`` of the feature columns, in ``settings.columns`` order (a
    pattern's matches in the table's order, each column once). Raises ValueError naming the
    missing column or the pattern that matches nothing."""
    if not settings.columns:
        return [i for i, h in enumerate(header) if h not in settings.side_columns]
    picked: dict[int, None] = {}
    for entry in settings.columns:
        if is_pattern(entry):
            hits = [i for i, h in enumerate(header) if matches(entry, h)]
            if not hits:
                raise ValueError(f"no column matches {entry!r}")
        elif entry in header:
            hits = [header.index(entry)]
        else:
            raise ValueError(f"no column {entry}")
        picked.update(dict.fromkeys(hits))
    return list(picked)


def number_column(cells: Sequence[str], name: str, lines: Sequence[int]) -> np.ndarray:
    """(T,) float64 of a column's text cells (empty/NaN/NA cells as NaN). Raises ValueError
    naming the line and the column of the first cell that is not a number."""
    out = np.empty(len(cells), dtype=np.float64)
    for i, cell in enumerate(cells):
        try:
            out[i] = float(cell)  # surrounding spaces allowed, as float() allows them
        except ValueError:
            cell = cell.strip()
            if cell.lower() not in MISSING_CELLS:
                raise ValueError(f"line {lines[i]}, column {name}: {cell!r} is not a number") from None
            out[i] = np.nan
    return out


class Table:
    """A clip's table: ``header`` (None for an unnamed .npy) and its columns, ``values(i)`` the
    (T,) float64 numbers of column i."""

    def __init__(self, header: list[str] | None, columns: Sequence[np.ndarray | _LazyColumn]) -> None:
        self.header, self.columns = header, list(columns)

    @classmethod
    def read(cls, path: Path, npy_columns: Sequence[str]) -> Table:
        """Raises ValueError (one line) for an unreadable or malformed file."""
        if path.suffix.lower() == ".npy":
            return cls._read_npy(path, npy_columns)
        return cls._read_csv(path)

    @classmethod
    def _read_npy(cls, path: Path, npy_columns: Sequence[str]) -> Table:
        x = np.load(path, allow_pickle=False)
        if x.ndim != 2 or not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
            raise ValueError(f"a (frames, features) array of numbers, not {x.dtype} of shape {x.shape}")
        if npy_columns and len(npy_columns) != x.shape[1]:
            raise ValueError(f"{x.shape[1]} columns, npy_columns names {len(npy_columns)}")
        cols = [np.asarray(x[:, j], dtype=np.float64) for j in range(x.shape[1])]
        return cls(list(npy_columns) if npy_columns else None, cols)

    @classmethod
    def _read_csv(cls, path: Path) -> Table:
        text = path.read_text(encoding="utf-8-sig")  # -sig: the byte-order mark spreadsheets write
        header_line = text.partition("\n")[0]
        delimiter = max(DELIMITERS, key=header_line.count)  # max keeps the first of equal counts
        reader = csv.reader(io.StringIO(text), delimiter=delimiter)
        header = [h.strip() for h in next(reader, [])]
        if not any(header):
            raise ValueError("empty file")
        rows, lines = [], []
        for row in reader:
            if not "".join(row).strip():
                continue  # a blank line (a trailing one, usually)
            if len(row) != len(header):
                raise ValueError(f"line {reader.line_num} has {len(row)} cells, the header {len(header)}")
            rows.append(row)  # cells as written: a column is cut out (and read) only when used
            lines.append(reader.line_num)
        return cls(header, [_LazyColumn(rows, j, h, lines) for j, h in enumerate(header)])

    def __len__(self) -> int:
        return len(self.columns[0]) if self.columns else 0

    def index(self, name: str, what: str) -> int:
        if self.header is None:
            raise ValueError(f"its columns are unnamed: name them with npy_columns to use {what} {name}")
        if name not in self.header:
            raise ValueError(f"no {what} column {name}")
        return self.header.index(name)

    def values(self, i: int) -> np.ndarray:
        col = self.columns[i]
        return col.parse() if isinstance(col, _LazyColumn) else col


class _LazyColumn:
    """A CSV column, cut out of the rows and parsed to numbers only when used (an OpenFace CSV
    has ~700 columns; a clip needs a few)."""

    def __init__(self, rows: Sequence[Sequence[str]], j: int, name: str, lines: Sequence[int]) -> None:
        self.rows, self.j, self.name, self.lines = rows, j, name, lines

    def __len__(self) -> int:
        return len(self.rows)

    def parse(self) -> np.ndarray:
        j = self.j
        return number_column([r[j] for r in self.rows], self.name, self.lines)


def frame_rate(times_s: np.ndarray) -> float | None:
    """Frames per second over the whole span of the finite ``times_s`` (None with fewer than two
    distinct times): a tool rounds each timestamp (OpenFace to 1 ms), the span barely moves."""
    rows = np.flatnonzero(np.isfinite(times_s))
    if len(rows) < 2 or times_s[rows[-1]] <= times_s[rows[0]]:
        return None
    return float((rows[-1] - rows[0]) / (times_s[rows[-1]] - times_s[rows[0]]))


def read(path: Path, settings: Settings) -> tuple[Frames, list[str] | None]:
    """The clip's `Frames` (values (T, F) float32, valid (T,) bool, the measured rate where a
    timestamp column gives one) and its feature column names (None: an unnamed .npy). Raises
    ValueError (one line)."""
    table = Table.read(path, settings.npy_columns)
    if table.header is None and settings.columns:
        raise ValueError("its columns are unnamed: name them with npy_columns, or set columns: [] for all")
    if len(table) == 0:
        raise ValueError("no frames")
    idx = select(table.header, settings) if table.header is not None else list(range(len(table.columns)))
    if not idx:
        raise ValueError("no feature column")
    x = np.stack([table.values(i) for i in idx], axis=1)
    ok = np.isfinite(x).all(axis=1)
    why = ["an empty or NaN cell"]
    if settings.confidence_column:
        conf = table.values(table.index(settings.confidence_column, "confidence"))
        ok &= conf >= settings.confidence_threshold  # NaN compares False: invalid
        why.append(f"{settings.confidence_column} below {settings.confidence_threshold:g}")
    if settings.success_column:
        success = table.values(table.index(settings.success_column, "success"))
        ok &= np.isfinite(success) & (success != 0)
        why.append(f"{settings.success_column} 0")
    rate = None
    if settings.timestamp_column:
        times = table.values(table.index(settings.timestamp_column, "timestamp"))
        rate = frame_rate(times * TIMESTAMP_UNITS[settings.timestamp_unit])
    if not ok.any():
        raise ValueError(f"no valid frame ({' or '.join(why)} in every row)")
    if settings.invalid_frames == "keep":
        values = np.where(np.isfinite(x), x, 0.0)
        valid = ok
    else:
        values = fill_failed(x, ok, settings.invalid_frames)
        valid = ok[ok] if settings.invalid_frames == "drop" else ok
    names = [table.header[i] for i in idx] if table.header is not None else None
    return Frames(values.astype(np.float32), valid, rate), names


class Extractor:
    batch_size = 1

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # the feature names of the first file read, where patterns (or "every column") decide
        # them: every later file must give the same columns, or its frames would not line up
        self.names: list[str] | None = settings.named_columns

    def extract(self, paths: Sequence[Path]) -> list[Frames | str]:
        out: list[Frames | str] = []
        for p in paths:
            try:
                frames, names = read(p, self.settings)
            except (ValueError, OSError, EOFError, UnicodeDecodeError, csv.Error) as e:
                out.append(one_line(e))
                continue
            if self.names is None:
                self.names = names
            elif names is not None and names != self.names:
                out.append(one_line(f"its columns {_few(names)} are not the first file's {_few(self.names)}"))
                continue
            out.append(frames)
        return out

    def record(self) -> dict[str, Any]:
        # frame_rate_hz: the setting (None where timestamps measure it per file; mer-ingest may
        # store their median); feature_names: None until a file has resolved the patterns
        return {**settings_record("table", self.settings), "feature_names": self.names}


def _few(names: Sequence[str]) -> str:
    return ", ".join(names[:4]) + (f" ... ({len(names)})" if len(names) > 4 else "")


BACKEND = Backend(
    name="table",
    stream="visual",
    what="a face toolkit's per-frame table (CSV or .npy): the columns the settings name",
    file_patterns=("*.csv", "*.tsv", "*.npy"),
    settings=Settings,
    open=Extractor,
)

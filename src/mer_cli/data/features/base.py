"""The contract every feature back-end keeps: settings in, per-clip frames out, and a record
that says exactly how they were made.

A back-end (`Backend`) is a name, the stream it feeds (acoustic or visual), the raw files it
reads, a frozen settings dataclass and an ``open`` function that loads what it needs (a model)
once and returns an `Extractor`. The extractor turns a batch of files into `Frames` (or one line
saying why a file cannot be used) and gives its `record`: plain JSON values stored in the
dataset's ``ingest_settings`` and in every trained model's feature spec, from which
`from_record` builds the same extractor again (mer-predict on raw clips: no feature mismatch).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mer_cli.core.errors import ConfigError, MerError, one_line

STREAMS = ("acoustic", "visual")
# record keys that do not decide the features, never compared between two records: results of
# extraction (measured on the files, or derived from the settings), where a model happened to lie,
# what it was called there and which hub commit it came from (a back-end's ``weights``, a hash of
# the weight files, says which weights they are), and how the work was run (device, batch size)
MEASURED_KEYS = (
    "frame_rate_hz",
    "feature_names",
    "layer_size",
    "n_features",
    "model",
    "model_path",
    "model_id",
    "revision",
    "device",
    "batch_size",
    "validity_mask",  # mer-ingest's note that the dataset stores the back-end's masks
)


@dataclass(frozen=True)
class Frames:
    """One clip's features: ``values`` (T, F) float32; ``valid`` (T,) bool where a toolkit says
    which frames it could measure (None: all); ``frame_rate_hz`` measured on this file (a video's
    timestamps), None where the back-end's rate is fixed by its settings."""

    values: np.ndarray
    valid: np.ndarray | None = None
    frame_rate_hz: float | None = None


class Extractor(Protocol):
    """An opened back-end: its model (if any) is loaded once, then used for every batch."""

    batch_size: int  # files per `extract` call (1: the back-end gains nothing from batching)

    def extract(self, paths: Sequence[Path]) -> list[Frames | str]:
        """One entry per path, in order: its frames, or why the file cannot be used (one line).
        Raises `ConfigError` or `DataError` only for what stops every file (a missing model)."""
        ...

    def record(self) -> dict[str, Any]:
        """How features are made, as plain JSON values: ``backend`` (the registry name), every
        setting, the model's id and revision where there is a model, ``frame_rate_hz`` and
        ``feature_names`` (None: unnamed dimensions)."""
        ...


@dataclass(frozen=True)
class Backend:
    """A registry entry. ``settings`` is a frozen dataclass of plain fields (its defaults are
    the back-end's defaults); ``open`` loads the back-end with them."""

    name: str
    stream: str  # acoustic | visual
    what: str  # one line for --help and messages
    file_patterns: tuple[str, ...]  # the raw files it reads, as glob patterns
    settings: type
    open: Callable[[Any], Extractor]
    extra: str | None = None  # the pip extra that installs what it needs (None: the core install)
    # the setting that says where its pretrained model lies (what --audio-model / --video-model
    # set, in mer-ingest and in mer-predict on another machine); None: no model
    model_setting: str | None = None

    def make_settings(self, options: Mapping[str, Any], where: str) -> Any:
        """The settings from ``options`` (a config file's and the command line's values; unknown
        keys are one error line listing the valid ones)."""
        valid = {f.name for f in dataclasses.fields(self.settings)}
        unknown = sorted(set(options) - valid)
        if unknown:
            raise ConfigError(
                f"{where}: {self.name} has no option {', '.join(unknown)}: valid: {', '.join(sorted(valid))}"
            )
        try:
            return self.settings(**dict(options))
        except TypeError as e:
            raise ConfigError(f"{where}: {self.name}: {e}") from e

    def settings_from_record(self, record: Mapping[str, Any]) -> Any:
        """The settings a record (`Extractor.record`) was made with; keys the record lacks take
        their defaults (a record from before the setting existed)."""
        kwargs = {f.name: record[f.name] for f in dataclasses.fields(self.settings) if f.name in record}
        return self.settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()})


def each_file(paths: Sequence[Path], frames: Callable[[Path], np.ndarray]) -> list[Frames | str]:
    """``frames(path)`` for every path, a file's failure as its one line: audio and table
    libraries raise many types for a broken file. A `MerError` (a missing model, a missing extra)
    stops every file, so it is raised."""
    out: list[Frames | str] = []
    for p in paths:
        try:
            out.append(Frames(frames(p)))
        except MerError:
            raise
        except Exception as e:
            out.append(one_line(e))
    return out


def settings_record(backend: str, settings: Any) -> dict[str, Any]:
    """``backend`` and every field of ``settings`` as plain JSON values (tuples as lists)."""
    out: dict[str, Any] = {"backend": backend}
    for f in dataclasses.fields(settings):
        v = getattr(settings, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def recipe(record: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a record that decides the features (what two extractions must share to give
    the same frames): every key but the measured ones."""
    return {k: v for k, v in record.items() if k not in MEASURED_KEYS}


def recipe_key(record: Mapping[str, Any]) -> str:
    """A short stable hash of `recipe` (the feature cache's folder name)."""
    text = json.dumps(recipe(record), sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def recipe_mismatch(trained: Mapping[str, Any], new: Mapping[str, Any]) -> str | None:
    """What differs between two records' recipes ("backend=hf; the model's: mfcc"), or None."""
    a, b = recipe(trained), recipe(new)
    differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k in a)
    if not differ:
        return None
    return (
        f"computed with {', '.join(f'{k}={b.get(k)}' for k in differ)}; the model's training data "
        f"with {', '.join(f'{k}={a[k]}' for k in differ)}"
    )

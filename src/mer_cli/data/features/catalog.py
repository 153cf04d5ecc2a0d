"""The feature back-ends by name, one registry per stream, and the one way back from a record
to the extractor that made it.

Adding a back-end is one module (a `base.Backend` named ``BACKEND``) and one line below; the
presets users pick with ``mer-ingest --audio-features NAME`` are ``configs/features/<stream>/NAME.yaml``
(a back-end's name plus its options).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mer_cli.core.errors import ConfigError, DataError, MerError
from mer_cli.core.registry import Registry
from mer_cli.data.features import emotion2vec, hf_audio, hf_vision, mfcc, openface, opensmile, table
from mer_cli.data.features.base import Backend, Extractor, recipe_mismatch

BACKENDS: dict[str, Registry[Backend]] = {
    "acoustic": Registry("audio back-end"),
    "visual": Registry("video back-end"),
}
# in the order --help lists them: the notebook's two first
for _b in (
    mfcc.BACKEND,
    openface.BACKEND,
    opensmile.BACKEND,
    hf_audio.BACKEND,
    emotion2vec.BACKEND,
    table.BACKEND,
    hf_vision.BACKEND,
):
    BACKENDS[_b.stream].add(_b.name, _b)

# what a record from before back-ends were named (mer-ingest's MFCC and OpenFace only) was made by
LEGACY = {"acoustic": "mfcc", "visual": "openface"}


def get(stream: str, name: object, where: str = "") -> Backend:
    return BACKENDS[stream].get(name, ConfigError, where)


def backend_of(stream: str, record: Mapping[str, Any]) -> Backend:
    """The back-end that wrote ``record`` (a dataset's or a run's, for ``stream``)."""
    return BACKENDS[stream].get(record.get("backend", LEGACY[stream]), DataError, f"{stream} features")


def from_record(stream: str, record: Mapping[str, Any], **overrides: Any) -> Extractor:
    """The extractor that computes ``stream``'s features exactly as ``record`` says they were
    computed; ``overrides`` change settings that do not change the features (where the model
    lies now, the device, the batch size)."""
    backend = backend_of(stream, record)
    settings = backend.settings_from_record({**record, **overrides})
    return backend.open(settings)


def open_recorded(stream: str, record: Mapping[str, Any], model: str | None, where: str) -> Extractor:
    """The back-end that made a run's ``stream`` features, opened as its ``record`` says, for new
    recordings (mer-predict on raw clips, robustness re-extraction); ``model``: where its
    pretrained model lies on this machine (None: where the record says it lay). A model that is
    not the one the features came from (other weights) is refused in one line."""
    overrides = {}
    if model is not None:
        setting = backend_of(stream, record).model_setting
        if setting is None:
            raise MerError(
                f"{where}: the run's {stream} features use no pretrained model: drop the model flag"
            )
        overrides[setting] = model
    extractor = from_record(stream, record, **overrides)
    problem = recipe_mismatch(record, extractor.record())
    if problem is not None:
        raise DataError(
            f"{where}: {stream} features {problem}: predictions would not mean what training meant"
        )
    return extractor

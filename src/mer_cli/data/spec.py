"""The feature spec: what a trained model reads, recorded in its checkpoint and checked on new input.

Input at training time: the data (`Splits`, with mer-ingest's settings when it recorded
them), the modality, its streams and the model's input sizes. Output: a plain JSON-able dict,
``feature_spec`` in the checkpoint's meta (next to the fitted preprocessing, ``prep``):

    version       1
    modality      acoustic | visual | early | joint | xattn
    streams       the data streams the model reads, in order, each:
                    field          the data's name for it (mfcc | aus)
                    n_features     features per frame
                    feature_names  list, or None where the data did not name them
                    frame_rate_hz  frames per second, or None where unknown
                    ingest         how mer-ingest computed it from raw files (`ingest.settings_record`),
                                   or None (the notebook's pickle, the embedded data)
    inputs        the model's input streams after fusion -> features per frame
    class_names   label i is class_names[i]
    source        the training data

`mer-predict` checks every input against it, so a wrong file is one line naming the mismatch
("40 features, the model was trained on 52 (26 MFCC + 26 deltas)"), never a tensor shape error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mer_cli.core.errors import DataError
from mer_cli.data import synthetic
from mer_cli.data.features.base import recipe_mismatch
from mer_cli.data.splits import STREAM_FIELDS, Splits

SPEC_VERSION = 1
# frames per second of the embedded data's streams: known because it is generated that way
_SYNTHETIC_FRAME_RATES = {"acoustic": synthetic.AUDIO_FPS, "visual": synthetic.VIDEO_FPS}


def build(
    splits: Splits, modality: str, streams: Sequence[str], n_features: Mapping[str, int]
) -> dict[str, Any]:
    """The spec of a model of ``modality`` reading ``streams`` of ``splits`` (its train split's
    feature counts) with input sizes ``n_features`` (after fusion)."""
    recorded = splits.ingest_settings or {}
    out: dict[str, Any] = {}
    for name in streams:
        field = STREAM_FIELDS[name]
        ingest = recorded.get(name)
        rate = frame_rate(splits, name)
        out[name] = {
            "field": field,
            "n_features": getattr(splits.train, field).n_features,
            "feature_names": list(ingest["feature_names"])
            if ingest and ingest.get("feature_names")
            else None,
            "frame_rate_hz": rate,
            "ingest": dict(ingest) if ingest else None,
        }
    return {
        "version": SPEC_VERSION,
        "modality": modality,
        "streams": out,
        "inputs": {k: int(v) for k, v in n_features.items()},
        "class_names": list(splits.class_names),
        "source": splits.source,
    }


def frame_rate(splits: Splits, name: str) -> float | None:
    """Stream ``name``'s frames per second as the data records it (mer-ingest's settings, or the
    embedded data's known rates); None where unknown (the notebook's pickle)."""
    ingest = (splits.ingest_settings or {}).get(name)
    rate = ingest.get("frame_rate_hz") if ingest else None
    if rate is None and splits.source.startswith("synthetic"):
        rate = _SYNTHETIC_FRAME_RATES[name]
    return rate


def from_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint's spec; for a checkpoint from before specs were recorded, what its meta
    still tells: feature counts per stream where the model reads a stream as it is (an early
    fusion model's inputs only say the sum), no ingestion settings."""
    if "feature_spec" in meta:
        return dict(meta["feature_spec"])
    streams = list(meta["streams"])
    inputs = {k: int(v) for k, v in meta["n_features"].items()}
    return {
        "version": 0,
        "modality": meta["modality"],
        "streams": {
            name: {
                "field": STREAM_FIELDS[name],
                "n_features": inputs.get(name),  # None: only known summed with the others
                "feature_names": None,
                "frame_rate_hz": None,
                "ingest": None,
            }
            for name in streams
        },
        "inputs": inputs,
        "class_names": list(meta["class_names"]),
        "source": "unknown (a checkpoint from before feature specs were recorded)",
    }


def describe(stream_spec: Mapping[str, Any]) -> str:
    """A stream's feature count and, where known, what the features are: ``52 (26 MFCC + 26
    deltas)``, ``17 (action units AU01_r ... AU45_r)``."""
    n = stream_spec["n_features"]
    ingest = stream_spec.get("ingest")
    if not ingest:
        return str(n)
    if "n_mfcc" in ingest:
        k = ingest["n_mfcc"]
        parts = [f"{k} MFCC", f"{k} deltas", f"{k} delta-deltas"][: 1 + int(ingest["delta_orders"])]
        return f"{n} ({' + '.join(parts)})"
    # what the back-end made them from; a record from before back-ends were named is OpenFace's
    backend = ingest.get("backend", "openface")
    names = list(stream_spec.get("feature_names") or [])
    shown = (", ".join(names) if len(names) <= 3 else f"{names[0]} ... {names[-1]}") if names else ""
    if backend == "openface":
        return f"{n} (action units {shown})" if shown else str(n)
    return f"{n} ({backend}: {shown})" if shown else f"{n} ({backend})"


def mismatch(spec: Mapping[str, Any], frames: Mapping[str, int]) -> str | None:
    """What is wrong with features per frame ``frames`` (data stream -> count) for the model of
    ``spec``, or None when they are what it was trained on."""
    streams = spec["streams"]
    for name, n in frames.items():
        expected = streams[name]["n_features"]
        if expected is not None and n != expected:
            return (
                f"{name} ({streams[name]['field']}): {n} features per frame, the model was trained "
                f"on {describe(streams[name])}"
            )
    # a checkpoint without a spec knows an early fusion model's input only summed over its streams
    unknown = [name for name in frames if streams[name]["n_features"] is None]
    if unknown and len(spec["inputs"]) == 1:
        total, expected = sum(frames.values()), next(iter(spec["inputs"].values()))
        if total != expected:
            joined = " + ".join(unknown)
            return f"{joined}: {total} features per frame in all, the model was trained on {expected}"
    return None


def settings_mismatch(spec: Mapping[str, Any], recorded: Mapping[str, Any]) -> str | None:
    """What differs between how a feature file's streams were computed (its ``ingest_settings``)
    and how the model's training data's were, or None. Measured values (frame rates) and where a
    model happened to lie are not compared (`features.base.recipe`)."""
    for name, stream_spec in spec["streams"].items():
        trained, new = stream_spec.get("ingest"), recorded.get(name)
        if trained and new:
            problem = recipe_mismatch(trained, new)
            if problem is not None:
                return f"{name} {problem}"
    return None


def check_features(spec: Mapping[str, Any], frames: Mapping[str, int], where: str) -> None:
    """`mismatch` as a `DataError` naming ``where`` (a file, a clip)."""
    problem = mismatch(spec, frames)
    if problem is not None:
        raise DataError(f"{where}: {problem}")


def ingest_settings(spec: Mapping[str, Any], stream: str, where: str) -> dict[str, Any]:
    """How the model's training data computed ``stream`` from raw files, or a `DataError` saying
    it was not recorded (features from raw files would be a guess)."""
    settings = spec["streams"][stream].get("ingest")
    if not settings:
        what = (
            "sample rate, window, hop, MFCC count, deltas"
            if stream == "acoustic"
            else "AU columns, failed-frame policy"
        )
        raise DataError(
            f"{where}: trained on {spec['source']}, which does not record how its {stream} features "
            f"were computed ({what}): mer-predict cannot compute them from raw files without guessing; "
            "predict from a feature file with --data, or train on a dataset written by mer-ingest"
        )
    return dict(settings)

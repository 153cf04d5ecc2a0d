"""The one definition of which model a run is (`model_identity`) and which run of it
(`run_identity`), from its resolved config.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from mer_cli.core.config import flatten

# how a run executed, where it was tracked, what happens after it, whether it was resumed, which
# search trial it was: never part of a model (data.cache*: where generated clips are kept, never
# which clips)
_NOT_IDENTITY = re.compile(r"^(runtime|logger|compare|hydra|search)\.|^(resume|search)$|^data\.cache(_dir)?$")


# which run of a model: runs that differ only here are the same model (a comparison's samples)
RUN_KEYS = ("seed", "cv.fold")


# where late fusion read its members from: the members' own identities decide, not their paths
_MEMBER_SOURCES = re.compile(r"^modality\.\w+_run$")


_SINGLE_MODALITY_KEYS = ("modality.name", "modality.streams")


# late fusion before modality.combiner: its acoustic_weight (0.5, a number, or "fit") in today's keys
_LATE_BEFORE_COMBINER = {0.5: ("mean", None), "fit": ("weighted", None)}


def model_identity(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The one answer to "which model is this": the resolved config (nested or flattened) without
    run-time knobs (``runtime.*``), the tracker (``logger.*``), report settings, ``resume``, where
    late fusion's members came from, and the keys that tell one run of the model from another
    (seed, CV fold). The comparison report groups runs by it; `run_identity` adds seed and fold
    for the sweep's reuse of trained runs and the resume check."""
    flat = flatten(cfg)
    # only late fusion reads modality options beyond these: a stray one elsewhere (a sweep-wide
    # ++modality.acoustic_weight=...) changes nothing a single model learns
    single = flat.get("modality.name") != "late"
    if not single and "modality.combiner" not in flat:  # a late run from before combiners
        weight = flat.get("modality.acoustic_weight", 0.5)
        combiner, weight = _LATE_BEFORE_COMBINER.get(weight, ("mean", weight))
        flat = {**flat, "modality.combiner": combiner, "modality.acoustic_weight": weight}
    if not single and flat.get("modality.acoustic_weight") == 0.5:
        flat = {**flat, "modality.acoustic_weight": None}  # equal weights either way
    if "preprocess.normalize" in flat:  # a run from before scaling options was standardized
        scaling = flat.get("preprocess.scaling", "standard") if flat["preprocess.normalize"] else None
        flat = {**flat, "preprocess.scaling": scaling}  # unscaled: the scaling option changes nothing
    if "preprocess.length_percentile" in flat:  # a run from before zero frames could be skipped
        flat.setdefault("preprocess.skip_zero_frames", False)
    if str(flat.get("model.encoder._target_", "")).endswith(".TransformerEncoder"):
        # before attention_dropout was its own key, the encoder's dropout acted on the attention
        # weights too: such a run resumes only with +model.encoder.attention_dropout=<its dropout>
        flat.setdefault("model.encoder.attention_dropout", flat.get("model.encoder.dropout"))
    return {
        k: v
        for k, v in flat.items()
        if not _NOT_IDENTITY.match(k)
        and k not in RUN_KEYS
        and not _MEMBER_SOURCES.match(k)
        and not (single and k.startswith("modality.") and k not in _model_options(flat))
    }


# the jointly trained fusions' modality options (pipeline.STREAM_MODELS): they change the model
_JOINT_OPTIONS: dict[str, tuple[str, ...]] = {
    "joint": ("modality.ogm_alpha", "modality.ogm_noise"),
    "xattn": ("modality.ogm_alpha", "modality.ogm_noise", "modality.attention_heads"),
}


def _model_options(flat: Mapping[str, Any]) -> tuple[str, ...]:
    """The ``modality`` keys a single model's identity keeps (its name, streams, joint options)."""
    return _SINGLE_MODALITY_KEYS + _JOINT_OPTIONS.get(str(flat.get("modality.name")), ())


def run_identity(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """`model_identity` plus seed and CV fold: two configs with equal run identities train the
    very same weights (on the same hardware)."""
    flat = flatten(cfg)
    return {**model_identity(flat), **{k: flat.get(k) for k in RUN_KEYS}}


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``key: old -> new`` for every key whose value differs (a missing key reads as None)."""
    return [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in sorted(old.keys() | new.keys())
        if old.get(k) != new.get(k)
    ]

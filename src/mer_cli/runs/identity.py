"""The one definition of which model a run is (`model_identity`) and which run of it
(`run_identity`), from its resolved config.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from mer_cli.core.config import flatten
from mer_cli.models import modalities
from mer_cli.runs import upgrade
from mer_cli.training import options as trainer_options

# how a run executed, where it was tracked, what happens after it, whether it was resumed, which
# search trial it was, whether it only printed the data profile: never part of a model
# (data.cache*: where generated clips are kept, never which clips)
_NOT_IDENTITY = re.compile(
    r"^(runtime|logger|compare|report|hydra|search)\.|^(resume|search|profile_only)$"
    r"|^data\.(cache(_dir)?|speaker_pattern|allow_speaker_overlap)$"  # checks, not what is learned
    r"|^eval\.robustness(_seed|_audio)?$"  # what is measured after training, not what is learned
)


# which run of a model: runs that differ only here are the same model (a comparison's samples)
RUN_KEYS = ("seed", "cv.fold")


# where late fusion read its members from: the members' own identities decide, not their paths
_MEMBER_SOURCES = re.compile(r"^modality\.\w+_run$")


_SINGLE_MODALITY_KEYS = ("modality.name", "modality.streams")


# the training options (training/options.py) and the value that trains as before they existed: a
# run from before them trained with these, so it is the same model as today's default run; and
# the loop's length groups: the whole batch through the encoder at once (training/loop.Settings)
TRAINER_OPTION_DEFAULTS = {
    **{f"trainer.{k}": v for k, v in trainer_options.DEFAULTS.items()},
    "trainer.loop.length_groups": 1,
}
# the model options added since, and the value that builds the model as before them (learned
# layer weights, models/layer_mix.py: off)
MODEL_OPTION_DEFAULTS = {"model.layer_weights": None}
# the data options added since, and the value a run from before them is: no dataset stored a
# validity mask then, so honouring masks (today's default) is exactly what it did; its target
# lengths came from preprocess.length_percentile, as data.max_frames=auto's do
DATA_OPTION_DEFAULTS = {"data.frame_validity": "honour", "data.max_frames": "auto"}


def _with_option_defaults(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``flat`` with the training, model and data options' defaults where a run's trainer, model
    or data config lacks them (a group not recorded at all: nothing to assume)."""
    defaults: dict[str, Any] = {}
    for group, values in (
        ("trainer.", TRAINER_OPTION_DEFAULTS),
        ("model.", MODEL_OPTION_DEFAULTS),
        ("data.", DATA_OPTION_DEFAULTS),
    ):
        if any(k.startswith(group) for k in flat):
            defaults.update(values)
    return {**defaults, **flat}


def model_identity(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The one answer to "which model is this": the resolved config (nested or flattened) without
    run-time knobs (``runtime.*``), the tracker (``logger.*``), report settings, ``resume``, where
    late fusion's members came from, and the keys that tell one run of the model from another
    (seed, CV fold). The comparison report groups runs by it; `run_identity` adds seed and fold
    for the sweep's reuse of trained runs and the resume check."""
    # a run of an older version: today's keys
    flat = _with_option_defaults(upgrade.config_keys(flatten(cfg)))
    # only late fusion reads modality options beyond these: a stray one elsewhere (a sweep-wide
    # ++modality.acoustic_weight=...) changes nothing a single model learns
    single = flat.get("modality.name") != "late"
    if not single and flat.get("modality.acoustic_weight") == 0.5:
        flat = {**flat, "modality.acoustic_weight": None}  # equal weights either way
    return {
        k: v
        for k, v in flat.items()
        if not _NOT_IDENTITY.match(k)
        and k not in RUN_KEYS
        and not _MEMBER_SOURCES.match(k)
        and not (single and k.startswith("modality.") and k not in _model_options(flat))
    }


def _model_options(flat: Mapping[str, Any]) -> tuple[str, ...]:
    """The ``modality`` keys a single model's identity keeps (its name, streams, and the options
    its classifier takes: they change the model)."""
    name = flat.get("modality.name")
    options = modalities.get(name).options if name in modalities.MODALITIES else ()
    return _SINGLE_MODALITY_KEYS + tuple(f"modality.{k}" for k in options)


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

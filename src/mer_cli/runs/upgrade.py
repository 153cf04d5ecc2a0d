"""Old run directories read as today's: every upgrade of an older file format lives here.

Input: what an older mer-cli wrote (checkpoint.pt meta, late.json, config.yaml keys); output:
the same facts in today's format, the same numbers out. Older checkpoints and configs name model
classes by import path (``_target_: mer_cli.models.BiLSTMEncoder``); those strings are looked up
in the fixed tables below and never imported: any other is one error line.

  checkpoint.pt  format 1: one BiLSTMClassifier per run, streams named as in the files
                 format 2: the model as Hydra ``_target_`` strings
                 format 3 (today): the model as registry names + plain parameters
  late.json      format 1: one acoustic weight (before modality.combiner); format 2: today's
  config.yaml    keys of earlier versions, as `runs.identity` compares them
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mer_cli.core.errors import MerError
from mer_cli.models.fusion import late as late_fusion

CHECKPOINT_FORMAT = 3
LATE_FORMAT = 2

# the classes older mer-cli versions named, as today's registry names (models/registry.py)
OLD_CLASSIFIERS = {
    "mer_cli.models.Classifier": "single",
    "mer_cli.models.JointClassifier": "joint",
    "mer_cli.models.CrossAttentionClassifier": "xattn",
}
OLD_ENCODERS = {
    "mer_cli.models.BiLSTMEncoder": "birnn",
    "mer_cli.models.BiRNNEncoder": "birnn",
    "mer_cli.models.TransformerEncoder": "transformer",
    "mer_cli.models.TCNEncoder": "tcn",
}
# format 1 (one BiLSTMClassifier per run, streams named as in the files) -> modality and streams
FORMAT_1_STREAMS = {"mfcc": ("acoustic", ["acoustic"]), "aus": ("visual", ["visual"])}


def _named(table: Mapping[str, str], target: object, what: str, path: Path) -> str:
    if isinstance(target, str) and target in table:
        return table[target]
    raise MerError(f"{path}: {what} {target!r} is not a mer-cli model (valid: {', '.join(table)})")


def checkpoint(meta: dict[str, Any], path: Path) -> dict[str, Any]:
    """``meta`` (checkpoint.pt's, from ``path``) in today's format; MerError for an unknown one."""
    if meta.get("format") == 1:
        meta = _format_1_to_2(meta)
    if meta.get("format") == 2:
        meta = {**meta, "format": 3, "model_config": model_description(meta["model_config"], path)}
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise MerError(
            f"{path}: checkpoint format {meta.get('format')!r} is not supported (this mer-cli reads "
            f"formats 1 to {CHECKPOINT_FORMAT})"
        )
    return meta


def model_description(old: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """A format-2 model config (``_target_`` strings, ``_partial_``) as registry names."""
    params = {k: v for k, v in old.items() if k not in ("_target_", "encoder")}
    encoder = old.get("encoder")
    if not isinstance(encoder, Mapping):
        raise MerError(f"{path}: the model config has no encoder")
    return {
        "classifier": _named(OLD_CLASSIFIERS, old.get("_target_"), "model class", path),
        "encoder": {
            "name": _named(OLD_ENCODERS, encoder.get("_target_"), "encoder class", path),
            **{k: v for k, v in encoder.items() if k not in ("_target_", "_partial_")},
        },
        **params,
    }


def _format_1_to_2(meta: dict[str, Any]) -> dict[str, Any]:
    """A format-1 checkpoint (before encoders and heads were separate) as format 2: the same
    weights under the encoder's names, the same numbers out."""
    modality, streams = FORMAT_1_STREAMS.get(meta["stream"], ("early", ["acoustic", "visual"]))
    name = streams[0] if modality != "early" else "early"
    old = {k: v for k, v in meta["model_config"].items() if k != "_target_"}
    encoder = {
        "_target_": "mer_cli.models.BiLSTMEncoder",
        "_partial_": True,
        "hidden_sizes": old.pop("hidden_sizes", [512, 256]),
        "dropout": old.get("dropout", 0.8),
        "masking": old.pop("masking", "reverse"),
    }
    weights = {
        (f"encoder.{k}" if k.startswith(("lstms.", "frame_dropout.")) else k): v
        for k, v in meta["model"].items()
    }
    return {
        **meta,
        "format": 2,
        "modality": modality,
        "streams": streams,
        "model_config": {"_target_": "mer_cli.models.Classifier", "encoder": encoder, **old},
        "n_features": {name: meta["n_features"]},
        "prep": {name: meta["prep"]},
        "model": weights,
    }


def late_json(late: Mapping[str, Any], path: Path) -> late_fusion.LateFusion:
    """late.json's combiner. Format 1 (before ``modality.combiner``) held one acoustic weight."""
    members = list(late["members"])
    if late.get("format") == 1:
        w = float(late["acoustic_weight"])
        return late_fusion.LateFusion("mean", ("acoustic", "visual"), weights=(w, 1.0 - w))
    if late.get("format") != LATE_FORMAT:
        raise MerError(
            f"{path}: format {late.get('format')!r} is not supported (this mer-cli reads formats 1 "
            f"and {LATE_FORMAT})"
        )
    if late.get("combiner") not in late_fusion.COMBINERS:
        raise MerError(
            f"{path}: combiner {late.get('combiner')!r} is not one of {', '.join(late_fusion.COMBINERS)}"
        )
    try:
        return late_fusion.LateFusion.from_state(dict(late), members)
    except (KeyError, TypeError, ValueError) as e:
        raise MerError(f"{path}: not a mer-cli late.json ({type(e).__name__}: {e})") from None


# late fusion before modality.combiner: its acoustic_weight (0.5, a number, or "fit") in today's keys
_LATE_BEFORE_COMBINER = {0.5: ("mean", None), "fit": ("weighted", None)}


def config_keys(flat: Mapping[str, Any]) -> dict[str, Any]:
    """A flattened run config of any version with today's keys and meanings: the keys that
    decide which model a run is (`runs.identity`) compare equal across versions."""
    flat = dict(flat)
    if flat.get("modality.name") == "late" and "modality.combiner" not in flat:
        weight = flat.get("modality.acoustic_weight", 0.5)
        combiner, weight = _LATE_BEFORE_COMBINER.get(weight, ("mean", weight))
        flat.update({"modality.combiner": combiner, "modality.acoustic_weight": weight})
    if "preprocess.normalize" in flat:  # a run from before scaling options was standardized
        scaling = flat.get("preprocess.scaling", "standard") if flat["preprocess.normalize"] else None
        flat["preprocess.scaling"] = scaling  # unscaled: the scaling option changes nothing
    if "preprocess.length_percentile" in flat:  # a run from before zero frames could be skipped
        flat.setdefault("preprocess.skip_zero_frames", False)
    if "modality.name" in flat:  # a run from before eval.calibration reported its raw softmax
        flat.setdefault("eval.calibration", "none")
    encoder_target = flat.pop("model.encoder._target_", None)
    if encoder_target is not None:  # models named by import path (before the registries)
        flat.pop("model._target_", None)
        flat.pop("model.encoder._partial_", None)
        flat.setdefault("model.encoder.name", OLD_ENCODERS.get(str(encoder_target), str(encoder_target)))
    if flat.get("model.encoder.name") == "transformer":
        # before attention_dropout was its own key, the encoder's dropout acted on the attention
        # weights too: such a run resumes only with +model.encoder.attention_dropout=<its dropout>
        flat.setdefault("model.encoder.attention_dropout", flat.get("model.encoder.dropout"))
    return flat


# metrics.json's run.precision (torch's dtype name) before checkpoints recorded it
_PRECISION_OF_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def precision_from_metrics(metrics: Mapping[str, Any]) -> str | None:
    """``fp32`` | ``bf16`` | ``fp16`` from an older run's metrics.json, or None."""
    return _PRECISION_OF_DTYPE.get(str(metrics.get("run", {}).get("precision")))

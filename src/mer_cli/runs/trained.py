"""A trained run read back: its model rebuilt from the registry, its fitted preprocessing, and
its predictions on a dataset at the precision it was trained with.

Input: a run directory (checkpoint.pt; late fusion: late.json and its members). Reading it never
imports or calls anything it names: the model is a registry name plus plain parameters
(`models.registry.build`), older formats are upgraded by `runs.upgrade`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from mer_cli.core.errors import ConfigError, DataError, MerError
from mer_cli.data import spec
from mer_cli.data.splits import Split, Splits
from mer_cli.models import modalities, registry
from mer_cli.models.fusion import late as late_fusion
from mer_cli.preprocess import align, sequences, validity
from mer_cli.runs import files, outputs, upgrade
from mer_cli.training import batching, hardware

PRECISION_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def model_inputs(
    split: Split, modality: str, streams: list[str], honoured: Collection[str] = ()
) -> dict[str, Sequence[np.ndarray]]:
    """The input streams (name -> each clip's frames) a ``modality`` model reads from ``split``:
    the split's own ragged clips, or early-fused clip by clip when read (no copy either way).
    ``honoured``: the data streams whose validity masks (`Split.valid`) the model honours
    (`honoured_streams`): their invalid frames left out (`validity.Compacted`), or interpolated
    before early fusion (`validity.Filled`); a stream the split stores no mask for is read whole."""
    available: dict[str, Sequence[np.ndarray]] = dict(split.streams)
    missing = [s for s in streams if s not in available]
    if missing or not streams:
        raise ConfigError(f"modality.streams={streams}: the data has the streams {', '.join(available)}")
    kind = modalities.get(modality).inputs
    masked = [s for s in streams if s in honoured and s in (split.valid or {})]
    if masked:
        view = validity.Filled if kind == "early" else validity.Compacted
        available = {**available, **{s: view(available[s], _checked_masks(split, s)) for s in masked}}
    if kind == "single":
        if len(streams) != 1:
            raise ConfigError(f"modality={modality} reads one stream, not modality.streams={streams}")
        return {streams[0]: available[streams[0]]}
    if kind == "streams":  # each stream at its own frame rate, for its own encoder
        if len(streams) < 2:
            raise ConfigError(
                f"modality={modality} reads two streams or more, not modality.streams={streams}"
            )
        return {s: available[s] for s in streams}
    # early: every stream stretched to the first one's frame count, joined per frame
    return {modality: align.EarlyFused([available[s] for s in streams])}


def _checked_masks(split: Split, stream: str) -> Sequence[np.ndarray]:
    """``split``'s masks of ``stream``; a clip without a single valid frame is one DataError line."""
    masks = (split.valid or {})[stream]
    empty = np.flatnonzero(validity.valid_counts(masks) == 0)
    if empty.size:
        raise DataError(
            f"{split.name}/{split.clip_ids[int(empty[0])]}: no valid {stream} frame ({empty.size} such "
            "clip(s)): its validity mask is all False; leave the clip out or set data.frame_validity=ignore"
        )
    return masks


def honoured_streams(meta: Mapping[str, Any]) -> list[str]:
    """The data streams whose validity masks a trained model honours (its checkpoint's
    ``frame_validity``; none for a run from before masks, or one trained with them ignored)."""
    return list(meta.get("frame_validity") or [])


def stream_contribution(
    model: torch.nn.Module,
    seqs: sequences.SequenceSet,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, float]:
    """Per stream: accuracy on ``seqs`` when every other stream's frames are zeros (their lengths
    kept; zero is the training mean where features are standardized)."""
    out = {}
    for keep in seqs.streams:
        streams = {name: r if name == keep else sequences.Blank(r) for name, r in seqs.streams.items()}
        prob = batching.predict_proba(
            model, sequences.SequenceSet(streams, seqs.y, seqs.clip_ids), batch_size, device, dtype
        )
        out[keep] = float((prob.argmax(1) == seqs.y.numpy()).mean())
    return out


def build_model(
    model_cfg: DictConfig | Mapping[str, Any], n_features: dict[str, int], n_classes: int
) -> torch.nn.Module:
    """The model a config's ``model`` group (or a checkpoint's description) names, from the
    model registry; run-time facts (feature and class counts) come from the data."""
    if isinstance(model_cfg, DictConfig):
        model_cfg = cast(dict[str, Any], OmegaConf.to_container(model_cfg, resolve=True))
    return registry.build(model_cfg, n_features, n_classes)


def load_trained(run_dir: Path) -> tuple[torch.nn.Module, dict[str, sequences.StreamPrep], dict[str, Any]]:
    """Rebuild the model and the fitted preprocessing of a trained run from its checkpoint."""
    path = run_dir / "checkpoint.pt"
    if not path.exists():
        raise MerError(
            f"{run_dir}: no checkpoint.pt (not a mer-train run directory, or it "
            "stopped before its first epoch)"
        )
    try:
        meta = upgrade.checkpoint(files.read_checkpoint(path), path)
        model = build_model(meta["model_config"], meta["n_features"], len(meta["class_names"]))
        model.load_state_dict(meta["model"])
        preps = {name: sequences.StreamPrep.from_state(state) for name, state in meta["prep"].items()}
    except ConfigError as e:  # a description outside the model registry: nothing was built
        raise MerError(f"{path}: {e}") from None
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # a file that is not ours
        raise MerError(f"{path}: not a mer-cli checkpoint ({type(e).__name__}: {e})") from None
    return model, preps, {**meta, "temperature": read_temperature(run_dir)}


# eval.calibration=temperature: the temperature fitted on validation, beside the checkpoint
CALIBRATION_FILE = "calibration.json"


def read_temperature(run_dir: Path) -> float:
    """The run's fitted temperature (calibration.json), 1.0 for a run without calibration."""
    path = run_dir / CALIBRATION_FILE
    if not path.exists():
        return 1.0
    state = files.read_json(path)
    try:
        temperature = float(state["temperature"])
    except (ValueError, KeyError, TypeError) as e:
        raise MerError(f"{path}: not a mer-cli calibration file ({type(e).__name__}: {e})") from None
    if not (math.isfinite(temperature) and temperature > 0):
        raise MerError(f"{path}: temperature {temperature} is not a positive number")
    return temperature


def predict_run(
    run_dir: Path,
    splits: Splits,
    split_names: tuple[str, ...] = ("val", "test"),
    batch_size: int = 512,
) -> dict[str, outputs.Predictions]:
    """Predictions of a trained run on ``splits`` (its own fitted preprocessing), made at the
    precision and batch size it was evaluated with when it was trained."""
    model, preps, meta = load_trained(run_dir)
    if tuple(meta["class_names"]) != splits.class_names:
        raise MerError(
            f"{run_dir}: trained on classes {meta['class_names']}, "
            f"but the data has {list(splits.class_names)}"
        )
    out = {}
    device = hardware.resolve_device("auto")
    dtype = hardware.resolve_precision(trained_precision(run_dir, meta), device)
    batch_size = int(meta.get("eval_batch_size", batch_size))
    model.to(device)
    feature_spec = spec.from_meta(meta)
    for s in split_names:
        split = getattr(splits, s)
        # checked before any preprocessing: a scaler fitted on other features fails on a shape
        counts = {name: split.streams[name].n_features for name in meta["streams"]}
        spec.check_features(feature_spec, counts, f"{splits.source}: {s}")
        inputs = model_inputs(split, meta["modality"], list(meta["streams"]), honoured_streams(meta))
        seqs = sequences.apply(preps, inputs, split.labels, split.clip_ids)
        for name, n in seqs.n_features.items():
            if n != meta["n_features"][name]:
                raise MerError(
                    f"{run_dir}: the model reads {meta['n_features'][name]} {name} features per "
                    f"frame, the data has {n}"
                )
        prob = batching.predict_proba(model, seqs, batch_size, device, dtype, temperature=meta["temperature"])
        out[s] = outputs.Predictions(s, seqs.clip_ids, seqs.y.numpy(), prob, speakers=split.speakers)
    return out


def run_stream_contribution(run_dir: Path, split: Split) -> dict[str, float]:
    """`stream_contribution` of a trained multi-stream run on ``split``, as it was evaluated."""
    model, preps, meta = load_trained(run_dir)
    device = hardware.resolve_device("auto")
    dtype = hardware.resolve_precision(trained_precision(run_dir, meta), device)
    inputs = model_inputs(split, meta["modality"], list(meta["streams"]), honoured_streams(meta))
    seqs = sequences.apply(preps, inputs, split.labels, split.clip_ids)
    model.to(device)
    return stream_contribution(model, seqs, int(meta.get("eval_batch_size", 512)), device, dtype)


def trained_precision(run_dir: Path, meta: dict[str, Any]) -> str:
    """``fp32`` | ``bf16`` | ``fp16``: what the run trained and evaluated with. Checkpoints from
    before it was recorded there: the run's metrics.json says it (``run.precision``)."""
    if "precision" in meta:
        return str(meta["precision"])
    metrics_path = run_dir / "metrics.json"
    if metrics_path.is_file():
        return upgrade.precision_from_metrics(json.loads(metrics_path.read_text())) or "fp32"
    return "fp32"


def member_dir(run_dir: Path, source: str) -> Path:
    """A late fusion member's run directory as late.json names it (relative: inside the run)."""
    p = Path(source)
    return p if p.is_absolute() else run_dir / p


def read_late(run_dir: Path) -> tuple[dict[str, Any], late_fusion.LateFusion, dict[str, Path]] | None:
    """A late fusion run's late.json, its combiner and its members' run directories; None for a
    run that is not late fusion."""
    path = run_dir / "late.json"
    if not path.exists():
        return None
    late = files.read_json(path)
    sources = late.get("members")
    if not isinstance(sources, dict) or not all(isinstance(v, str) for v in sources.values()):
        raise MerError(f"{path}: 'members' must map each member to its run directory")
    members = {m: member_dir(run_dir, src) for m, src in sources.items()}
    return late, upgrade.late_json(late, path), members

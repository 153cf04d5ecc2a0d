"""Late fusion: an acoustic and a visual model (trained here or reused) whose validation
probabilities fit the combiner (never the test split's), then both splits fused and scored.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf, open_dict

from mer_cli.core.artifacts import write_json, write_text
from mer_cli.core.errors import ConfigError, MerError
from mer_cli.data.splits import STREAM_FIELDS, Splits
from mer_cli.evaluation import calibration
from mer_cli.evaluation.metrics import score
from mer_cli.models import layer_mix, modalities
from mer_cli.models.fusion import late as late_fusion
from mer_cli.runs import files, outputs, reuse, trained, upgrade
from mer_cli.runs.train import train_model
from mer_cli.training import tracking

log = logging.getLogger(__name__)


def run_late(
    cfg: DictConfig,
    splits: Splits,
    out_dir: Path,
    resume: bool = False,
    sweep_dir: Path | None = None,
) -> dict[str, Any]:
    """Combine the class probabilities of an acoustic and a visual model (``modality.combiner``).

    Each member is reused from ``modality.<member>_run`` when given, else from a run of this sweep
    with the same settings, else trained into ``out_dir/<member>/`` with this run's data, model,
    trainer and seed.
    """
    combiner, acoustic_weight = cfg.modality.get("combiner", "mean"), cfg.modality.get("acoustic_weight")
    check_combiner(combiner, acoustic_weight)  # before any member is trained
    tracked = tracking.start(cfg, out_dir)  # the members trained here are its children
    members: dict[str, dict[str, outputs.Predictions]] = {}
    sources: dict[str, str] = {}
    layer_weights: dict[str, dict[str, float]] = {}  # the members' learned ones, by stream
    preprocessing: dict[str, Any] = {}  # the members' scaling per stream (run.preprocessing)
    check_layered_member(cfg, splits)
    for member in modalities.get("late").members:
        member_run = cfg.modality.get(f"{member}_run")
        member_cfg = member_config(cfg, member, splits)
        # a parallel job of the sweep training this member: wait for it and reuse its run
        in_sweep = (
            reuse.training_once(sweep_dir, member_cfg)
            if not member_run and sweep_dir is not None
            else contextlib.nullcontext()
        )
        with in_sweep:
            if not member_run and sweep_dir is not None:
                member_run = reuse.find_trained(sweep_dir, member_cfg, out_dir)
            if member_run:
                run_dir = Path(member_run).expanduser().resolve()
                log.info("late fusion: reusing the %s model in %s", member, run_dir)
                members[member] = trained.predict_run(run_dir, splits)
                sources[member] = str(run_dir)
                if (run_dir / "metrics.json").is_file():
                    reused = files.read_json(run_dir / "metrics.json").get("run", {})
                    layer_weights.update(reused.get("layer_weights") or {})
                    preprocessing.update(reused.get("preprocessing") or {})
            else:
                log.info("late fusion: training the %s model", member)
                member_dir = out_dir / member
                write_text(member_dir / "config.yaml", OmegaConf.to_yaml(member_cfg, resolve=True))
                result = train_model(member_cfg, splits, member_dir, resume)
                members[member] = result.predictions
                sources[member] = member
                layer_weights.update(result.metrics["run"].get("layer_weights") or {})
                preprocessing.update(result.metrics["run"].get("preprocessing") or {})
    metrics = fuse_and_report(
        combiner,
        acoustic_weight,
        members,
        sources,
        splits.class_names,
        out_dir,
        seed=int(cfg.seed),
        data_source=splits.source,
        speaker_check=splits.speaker_check,
        save_plots=cfg.runtime.save_plots,
        calibration_method=str(cfg.get("eval", {}).get("calibration", "none")),
        layer_weights=layer_weights or None,
        preprocessing=preprocessing or None,
    )
    tracked.finish()
    return metrics


def member_config(cfg: DictConfig, member: str, splits: Splits) -> DictConfig:
    """A late fusion member's config: this run's, with the single-stream modality ``member``.
    ``model.layer_weights=learned`` stays with the members whose stream stores several layers;
    another member is the plain model of its stream (and is reused as such)."""
    member_cfg = copy.deepcopy(cfg)
    with open_dict(member_cfg):
        member_cfg.modality = {"name": member, "streams": [member]}
        member_cfg.search = None  # a search trial is the fused model: members report no epochs
        if not layer_mix.is_layered((splits.ingest_settings or {}).get(member)):
            member_cfg.model.layer_weights = None
    return member_cfg


def check_layered_member(cfg: DictConfig, splits: Splits) -> None:
    """``model.layer_weights=learned`` needs a member whose stream stores several layers (one
    ConfigError line, before any member is trained)."""
    if cfg.model.get("layer_weights") is None:
        return
    recorded = splits.ingest_settings or {}
    names = modalities.get("late").members
    if not any(layer_mix.is_layered(recorded.get(m)) for m in names):
        streams = {m: {"field": STREAM_FIELDS[m], "ingest": recorded.get(m)} for m in names}
        raise layer_mix.nothing_to_weigh(streams, splits.source)


def check_combiner(combiner: str, acoustic_weight: float | str | None) -> None:
    """``modality.combiner`` is known, and ``modality.acoustic_weight`` goes with it."""
    if combiner not in late_fusion.COMBINERS:
        raise ConfigError(f"modality.combiner={combiner!r}: valid: {', '.join(late_fusion.COMBINERS)}")
    if acoustic_weight == "fit":
        raise ConfigError(
            "modality.acoustic_weight=fit is now modality.combiner=weighted (weights fitted on validation)"
        )
    if acoustic_weight is not None and combiner != "mean":
        raise ConfigError(
            f"modality.acoustic_weight={acoustic_weight}: fixed weights are for modality.combiner=mean; "
            f"{combiner} fits its own on validation"
        )


def late_weights(combiner: str, acoustic_weight: float | str | None) -> dict[str, float] | None:
    """``modality.acoustic_weight`` as the mean combiner's member weights (acoustic, visual);
    None: equal weights. The key predates ``modality.combiner`` and names the data's two streams."""
    check_combiner(combiner, acoustic_weight)
    if acoustic_weight is None:
        return None
    try:
        weight = float(acoustic_weight)
    except ValueError:
        raise ConfigError(
            f"modality.acoustic_weight={acoustic_weight!r}: must be a number in [0, 1]"
        ) from None
    if not 0.0 <= weight <= 1.0:
        raise ConfigError(f"modality.acoustic_weight={weight}: must be in [0, 1]")
    return {"acoustic": weight, "visual": 1.0 - weight}


def late_predictions(
    members: dict[str, dict[str, outputs.Predictions]],
    combined: late_fusion.LateFusion,
    split_names: tuple[str, ...],
) -> list[outputs.Predictions]:
    """The members' class probabilities combined per split (at the fusion's temperature, when
    it has one); all must cover the same clips."""
    check_same_clips(members, split_names)
    first = members[combined.members[0]]
    return [
        outputs.Predictions(
            s,
            first[s].clip_ids,
            first[s].y_true,
            fused_proba(combined, {m: members[m][s].y_prob for m in combined.members}),
            speakers=first[s].speakers,
        )
        for s in split_names
    ]


def fused_proba(combined: late_fusion.LateFusion, probs: Mapping[str, np.ndarray]) -> np.ndarray:
    prob = combined.combine(probs)
    return prob if combined.temperature == 1.0 else calibration.rescale(prob, combined.temperature)


def calibrate_fusion(
    combined: late_fusion.LateFusion, members: Mapping[str, Mapping[str, outputs.Predictions]], method: str
) -> late_fusion.LateFusion:
    """eval.calibration=temperature: the fused model's own temperature, fitted on the fused
    validation probabilities (never the test split's); the combiner unchanged otherwise."""
    if calibration.check(method) == "none":
        return combined
    val = next(iter(members.values()))["val"]
    prob = combined.combine({m: members[m]["val"].y_prob for m in combined.members})
    temperature = calibration.fit_temperature(val.y_true, prob)
    log.info(
        "late fusion: temperature %.4f fitted on the fused validation probabilities: val NLL %.4f -> %.4f",
        temperature,
        calibration.nll(val.y_true, prob),
        calibration.nll(val.y_true, calibration.rescale(prob, temperature)),
    )
    return replace(combined, temperature=temperature)


def check_same_clips(
    members: dict[str, dict[str, outputs.Predictions]], split_names: tuple[str, ...]
) -> None:
    (first, *others) = members
    for s in split_names:
        for m in others:
            if members[m][s].clip_ids != members[first][s].clip_ids:
                raise MerError(f"late fusion: the {first} and {m} {s} predictions are for different clips")


def fuse_and_report(
    combiner: str,
    acoustic_weight: float | str | None,
    members: dict[str, dict[str, outputs.Predictions]],
    sources: dict[str, str],
    class_names: tuple[str, ...],
    out_dir: Path,
    seed: int,
    data_source: str,
    speaker_check: Mapping[str, Any] | None = None,
    save_plots: bool = True,
    calibration_method: str = "none",
    layer_weights: Mapping[str, Mapping[str, float]] | None = None,
    preprocessing: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Fit the combiner on the members' validation predictions, score both splits, write
    late.json, metrics.json (``layer_weights``: the members' learned ones, when they have them;
    ``preprocessing``: the members' scaling per stream, where their runs record it) and the
    figures."""
    weights = late_weights(combiner, acoustic_weight)
    check_same_clips(members, ("val", "test"))  # before anything is fitted on them
    val = next(iter(members.values()))["val"]
    # fitted on validation predictions and labels only: the test split never chooses its own fusion
    combined = late_fusion.fit_late(
        combiner, {m: p["val"].y_prob for m, p in members.items()}, val.y_true, len(class_names), weights
    )
    combined = calibrate_fusion(combined, members, calibration_method)
    fitted = combined.state()
    if combined.weights is not None:
        log.info("late fusion: %s, weights %s", combiner, fitted["weights"])
    else:
        log.info("late fusion: %s, fitted on validation", combiner)
    predictions = late_predictions(members, combined, ("val", "test"))
    metrics = {
        "run": {
            "modality": "late",
            "seed": seed,
            "data": data_source,
            "speakers": speaker_check,
            **{k: v for k, v in fitted.items() if k != "stacker"},  # its coefficients: late.json
            "temperature": fitted.get("temperature"),  # null: uncalibrated, as a single model's run says
            "members": sources,
            **({"layer_weights": {k: dict(v) for k, v in layer_weights.items()}} if layer_weights else {}),
            **({"preprocessing": dict(preprocessing)} if preprocessing else {}),
        },
        **{p.split: score(p.y_true, p.y_prob, class_names) for p in predictions},
    }
    write_json(out_dir / "late.json", {"format": upgrade.LATE_FORMAT, **fitted, "members": sources})
    outputs.write(out_dir, metrics, None, predictions, class_names, save_plots=save_plots)
    return metrics

"""One model trained and evaluated into its run directory (every modality but late fusion):
fit preprocessing on train (and profile the training data) -> build from the registry -> the
training loop -> scores -> files.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mer_cli.core.artifacts import write_json
from mer_cli.core.errors import ConfigError
from mer_cli.data import spec
from mer_cli.data.splits import STREAM_FIELDS, Splits
from mer_cli.evaluation import calibration
from mer_cli.evaluation.metrics import score
from mer_cli.models import layer_mix, modalities
from mer_cli.preprocess import profile, sequences, validity
from mer_cli.runs import outputs, trained, upgrade
from mer_cli.training import batching, hardware, loop, pruning, tracking
from mer_cli.training import options as trainer_options

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class StreamResult:
    metrics: dict[str, Any]
    predictions: dict[str, outputs.Predictions]  # by split


def loop_settings(cfg: DictConfig) -> loop.Settings:
    """The training loop's settings: ``trainer.loop`` and the run-time knobs it needs."""
    runtime = {k: v for k, v in cfg.runtime.items() if k != "save_plots"}
    return loop.Settings(**cfg.trainer.loop, **runtime)


def max_frames_setting(cfg: DictConfig) -> int | str | dict[str, int | str]:
    """``data.max_frames`` as plain values (``auto`` where a config from before it lacks it)."""
    value = cfg.data.get("max_frames", "auto")
    return OmegaConf.to_container(value) if isinstance(value, DictConfig) else value  # type: ignore[return-value]


def check_max_frames(cfg: DictConfig) -> None:
    """A bad ``data.max_frames`` (its value, or a stream it names) as one ConfigError line,
    before any data is read."""
    setting = max_frames_setting(cfg)
    # the input streams a model can read: the data's, and early fusion's joined one
    names = (*STREAM_FIELDS, *(n for n, m in modalities.MODALITIES.items() if m.inputs == "early"))
    unknown = [str(k) for k in setting if k not in names] if isinstance(setting, dict) else []
    if unknown:
        raise ConfigError(
            f"data.max_frames: {', '.join(unknown)} is not an input stream (valid: {', '.join(names)})"
        )
    for name in names:
        sequences.max_frames_of(setting, name)


def fit_preprocessing(
    cfg: DictConfig, splits: Splits, modality: str, streams: list[str], honoured: list[str]
) -> dict[str, sequences.StreamPrep]:
    """Each input stream's target length and scaler, fitted on the train split (each prep's
    profile describes its train clips)."""
    setting = max_frames_setting(cfg)
    # fitted on train only, and on the frames the model reads: a stream's valid frames where its
    # mask is honoured (the target length counts them, the scaler never sees an invalid one)
    return {
        name: sequences.fit(
            frames,
            percentile=cfg.preprocess.length_percentile,
            normalize=cfg.preprocess.normalize,
            scaling=cfg.preprocess.scaling,
            skip_zero_frames=bool(cfg.preprocess.get("skip_zero_frames", False)),
            max_frames=sequences.max_frames_of(setting, name),
        )
        for name, frames in trained.model_inputs(splits.train, modality, streams, honoured).items()
    }


def describe_data(splits: Splits, preps: dict[str, sequences.StreamPrep]) -> profile.DataProfile:
    """The data profile: the fitted streams' own (the train clips) and the dataset's."""
    return profile.describe(splits, {n: p.profile for n, p in preps.items() if p.profile is not None})


def log_profile(described: profile.DataProfile) -> None:
    """The data profile as one block in the log, then a warning line for each problem it shows."""
    log.info("%s", profile.summary(described))
    for line in profile.warnings(described):
        log.warning("%s", line)


def prepare(
    splits: Splits,
    modality: str,
    streams: list[str],
    preps: dict[str, sequences.StreamPrep],
    honoured: list[str] | None = None,
) -> tuple[sequences.SequenceSet, ...]:
    """Train, validation and test as the model reads them, through the fitted ``preps``
    (``honoured``: the streams whose validity masks are honoured, `frame_validity`)."""
    return tuple(
        sequences.apply(
            preps, trained.model_inputs(s, modality, streams, honoured or ()), s.labels, s.clip_ids
        )
        for s in splits.all()
    )


def frame_validity(cfg: DictConfig, splits: Splits, modality: str, streams: list[str]) -> list[str]:
    """The streams the model reads whose validity masks it honours: with ``data.frame_validity=
    honour``, those the training data stores masks for. One log line per masked stream: how many
    training frames are invalid and what becomes of them."""
    rule = validity.check_rule(cfg.data.get("frame_validity", "honour"))
    stored = splits.train.valid or {}
    early = modalities.get(modality).inputs == "early"
    masked = [s for s in streams if s in stored]
    for s in masked:
        total = int(splits.train.streams[s].lengths.sum())
        invalid = total - int(validity.valid_counts(stored[s]).sum())
        share = f"{s}: {invalid} of {total} training frames invalid ({100 * invalid / max(total, 1):.1f} %)"
        if rule == "ignore":
            log.info(
                "%s: read as the back-end filled them, the mask unused (data.frame_validity=ignore)", share
            )
        elif early:
            log.info(
                "%s: interpolated from the nearest valid frames before the streams are joined (early "
                "fusion cannot leave half a frame out; data.frame_validity=honour)",
                share,
            )
        else:
            log.info("%s: left out before the encoder, as padding is (data.frame_validity=honour)", share)
    return [] if rule == "ignore" else masked


def train_model(cfg: DictConfig, splits: Splits, out_dir: Path, resume: bool = False) -> StreamResult:
    """Fit preprocessing, build, train, evaluate and report one model (every modality but late)."""
    settings = loop_settings(cfg)
    loop.configure_threads(settings)
    seed_everything(cfg.seed)
    modality, streams = cfg.modality.name, list(cfg.modality.streams)
    honoured = frame_validity(cfg, splits, modality, streams)
    preps = fit_preprocessing(cfg, splits, modality, streams, honoured)
    described = describe_data(splits, preps)
    log_profile(described)
    outputs.write_profile(out_dir, described)
    train_set, val_set, test_set = prepare(splits, modality, streams, preps, honoured)

    # what the model reads (streams, feature counts and names, frame rates, ingestion settings,
    # label map): mer-predict and exported models check new input against it
    feature_spec = spec.build(splits, modality, streams, train_set.n_features)
    model_cfg = with_layer_layouts(model_config(cfg), feature_spec, modality)
    model = trained.build_model(model_cfg, train_set.n_features, splits.n_classes)
    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        "model: %s classifier, %s encoder, %s parameters",
        model_cfg["classifier"],
        model_cfg["encoder"]["name"],
        f"{n_params:,}",
    )
    optimizer = instantiate(cfg.trainer.optimizer)(model.parameters())
    scheduler = instantiate(cfg.trainer.scheduler)(optimizer)
    device = hardware.resolve_device(settings.device)
    dtype = hardware.resolve_precision(settings.precision, device)
    meta = {
        "format": upgrade.CHECKPOINT_FORMAT,
        "modality": modality,
        "streams": streams,
        # every later prediction of this model (late fusion, mer-evaluate) uses the same precision
        "precision": trained.PRECISION_NAMES[dtype],
        "eval_batch_size": settings.eval_batch_size,
        "model_config": model_cfg,
        "n_features": train_set.n_features,
        "class_names": list(splits.class_names),
        "prep": {name: prep.state() for name, prep in preps.items()},
        "feature_spec": feature_spec,
        # only where a mask is honoured: a run without writes the checkpoint it always did
        **({"frame_validity": honoured} if honoured else {}),
    }
    # trainer.class_weights / sampler / modality_dropout: weights from the train labels only
    options = trainer_options.resolve(
        cfg.trainer, modality, splits.train.labels, splits.class_names, meta["feature_spec"]
    )
    log_options(options)
    tracked = tracking.start(cfg, out_dir)  # logger=tensorboard|mlflow; csv: history.csv alone
    history = loop.fit(
        model,
        optimizer,
        scheduler,
        train_set,
        val_set,
        settings,
        out_dir,
        seed=cfg.seed,
        checkpoint_meta=meta,
        resume=resume,
        on_epoch=pruning.reporting(tracked.log_epoch, cfg.get("search")),  # + a search trial's reports
        options=options,
    )
    # the epochs' own time (training + validation), summed over every session of a resumed run:
    # a finished run that is resumed (resume=auto) re-evaluates in seconds and keeps its time
    train_seconds = sum(float(row["seconds"]) for row in history.rows)

    temperature = calibrate(cfg, model, val_set, settings.eval_batch_size, device, dtype, out_dir)
    predictions = {
        s_name: outputs.Predictions(
            s_name,
            s.clip_ids,
            s.y.numpy(),
            batching.predict_proba(
                model, s, settings.eval_batch_size, device, dtype, temperature=temperature or 1.0
            ),
            speakers=split.speakers,  # the prepared set keeps the split's clip order
        )
        for s_name, s, split in (("val", val_set, splits.val), ("test", test_set, splits.test))
    }
    metrics = {
        "run": {
            "modality": cfg.modality.name,
            "seed": int(cfg.seed),
            "data": splits.source,
            "speakers": splits.speaker_check,
            "n_parameters": n_params,
            "best_epoch": history.best_epoch,
            "epochs_trained": len(history.rows),
            "stopped_early": history.stopped_early,
            "train_seconds": round(train_seconds, 2),
            "device": str(device),
            "precision": str(dtype).removeprefix("torch."),
            "temperature": temperature,
            **options.record(),
            "preprocessing": profile.choices(described),  # the scaling per stream (auto: and why)
        },
        **{s: score(p.y_true, p.y_prob, splits.class_names) for s, p in predictions.items()},
    }
    learned = layer_mix.learned_weights(model)  # the best epoch's (loop.fit restored its weights)
    if learned:  # only then: a run without layer weights writes the metrics.json it always did
        metrics["run"]["layer_weights"] = learned
        for stream, weights in learned.items():
            log.info("%s layer weights: %s", stream, ", ".join(f"{k}: {v:.3f}" for k, v in weights.items()))
    if modality in modalities.jointly_trained():
        metrics["test"]["stream_contribution"] = trained.stream_contribution(
            model, test_set, settings.eval_batch_size, device, dtype
        )
        log.info(
            "test accuracy with only one stream's frames kept: %s", metrics["test"]["stream_contribution"]
        )
    outputs.write(
        out_dir,
        metrics,
        history.rows,
        list(predictions.values()),
        splits.class_names,
        save_plots=cfg.runtime.save_plots,
    )
    tracked.finish()  # the files just written: final metrics, plots, metrics.json
    return StreamResult(metrics, predictions)


def log_options(options: trainer_options.Options) -> None:
    """The training options that change the plain recipe, one log line each."""
    if options.class_weights is not None:
        log.info(
            "class weights (cross-entropy and val/loss): %s", [round(w, 4) for w in options.class_weights]
        )
    if options.sampler == "balanced":
        log.info("sampler: balanced (each epoch's clips drawn with replacement, 1 / count of their class)")
    if options.dropout is not None:
        streams = ", ".join(slot.stream for slot in options.dropout.slots)
        log.info(
            "modality dropout: p=%s, one of %s zeroed per dropped clip", options.modality_dropout, streams
        )


def calibrate(
    cfg: DictConfig,
    model: torch.nn.Module,
    val_set: sequences.SequenceSet,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    out_dir: Path,
) -> float | None:
    """``eval.calibration=temperature``: the temperature fitted on the validation split's
    probabilities, written to calibration.json (mer-evaluate, mer-predict and exports read it
    there); None without calibration."""
    method = calibration.check(str(cfg.get("eval", {}).get("calibration", "none")))
    if method == "none":
        return None
    prob = batching.predict_proba(model, val_set, batch_size, device, dtype)
    y_val = val_set.y.numpy()
    temperature = calibration.fit_temperature(y_val, prob)  # validation only: never the test split
    log.info(
        "temperature %.4f fitted on validation: val NLL %.4f -> %.4f",
        temperature,
        calibration.nll(y_val, prob),
        calibration.nll(y_val, calibration.rescale(prob, temperature)),
    )
    write_json(
        out_dir / trained.CALIBRATION_FILE, {"format": 1, "method": method, "temperature": temperature}
    )
    return temperature


def with_layer_layouts(
    model_cfg: dict[str, Any], feature_spec: dict[str, Any], modality: str
) -> dict[str, Any]:
    """``model.layer_weights=learned`` as the model's description holds it: where each layered
    stream's layers lie in the model's inputs (`layer_mix.layouts`, from the data's ingest records),
    so a checkpoint rebuilds the very model; null stays null. One ConfigError line when no stream
    the model reads stores several layers."""
    value = model_cfg.get("layer_weights")
    layer_mix.check_value(value)
    if value is None:
        return model_cfg
    layouts = layer_mix.layouts(feature_spec, modalities.get(modality).inputs)
    for name, blocks in layouts.items():
        for b in blocks:
            log.info(
                "layer weights: %s layers %s (%d x %d) of input %s, learned",
                b["stream"],
                ", ".join(map(str, b["layers"])),
                len(b["layers"]),
                b["layer_size"],
                name,
            )
    return {**model_cfg, "layer_weights": layouts}


def model_config(cfg: DictConfig) -> dict[str, Any]:
    """The model to build, as the checkpoint stores it: the modality's classifier (registry name),
    the ``model`` group (its encoder, once per stream for a multi-stream modality, and its head
    sizes) and the modality options that classifier takes."""
    modality = modalities.get(cfg.modality.name)
    model_cfg = cast(dict[str, Any], OmegaConf.to_container(cfg.model, resolve=True))
    model_cfg = {"classifier": modality.classifier, **model_cfg}
    model_cfg.update({k: cfg.modality[k] for k in modality.options if k in cfg.modality})
    groups = int(cfg.trainer.loop.get("length_groups", 1))
    if groups != 1:  # only then: every other run's model description is unchanged
        model_cfg["length_groups"] = groups
    return model_cfg

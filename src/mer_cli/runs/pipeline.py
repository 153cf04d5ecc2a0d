"""One run, top to bottom: load -> preprocess -> model -> train -> evaluate -> report.

Every file in a run directory is written by a function called from here:
  config.yaml              resolved config (Hydra's .hydra/ keeps the unresolved one and overrides)
  checkpoint.pt            best weights by val/loss, with what is needed to rebuild the model
  last.pt                  the latest epoch's full state, to resume an interrupted run
  history.csv              one row per epoch (train/*, val/*, lr)
  metrics.json             {"run": {...}, "val": {...}, "test": {...}}
  predictions.csv          per clip: split, clip id, true label, predicted label, probabilities
  plots/*.png              training curves; test split: confusion matrix, ROC, per-class ROC, PR
  acoustic/, visual/       late fusion only: the two member runs (same layout), unless reused
  late.json                late fusion only: members, combiner and what it fitted, for mer-evaluate
  fold<i>/, cv.json        cv.folds=K only: one run per fold (same layout), mean over folds
  failed.json              a failed job of a sweep (written by cli.py): its error, for the report
  tensorboard/             logger=tensorboard only: event files (tracking.py; logger=mlflow writes
                           outside the run directory, by default into outputs/mlflow.db)
"""

from __future__ import annotations

import contextlib
import copy
import logging
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from mer_cli import data, preprocess
from mer_cli.core.artifacts import write_json, write_text
from mer_cli.core.errors import ConfigError, MerError
from mer_cli.data import folds, formats, spec, synthetic
from mer_cli.evaluation.metrics import HEADLINE, score
from mer_cli.models import modalities
from mer_cli.models.fusion import late as late_fusion
from mer_cli.preprocess.scaling import check_kind as check_scaling
from mer_cli.runs import files, identity, outputs, reuse, trained, upgrade
from mer_cli.training import loop, pruning, tracking

log = logging.getLogger(__name__)


def run(
    cfg: DictConfig, out_dir: Path, resume: bool | str = False, sweep_dir: Path | None = None
) -> dict[str, Any]:
    """Train and evaluate the model ``cfg`` describes; write everything into ``out_dir``.

    ``resume``: true, false or "auto" (continue the run in ``out_dir`` if there is one).
    ``sweep_dir``: the multirun's root when this is one job of a sweep; models already trained
    there with the same settings are reused instead of trained again (see `sweep`).
    """
    modality = cfg.modality.name
    modalities.get(modality)  # an unknown name: one line listing the valid ones
    check_scaling(cfg.preprocess.scaling)
    out_dir.mkdir(parents=True, exist_ok=True)
    resume_here = check_resumable(cfg, out_dir, resume)
    write_text(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    if cfg.cv.folds is not None and cfg.cv.fold is None:
        return run_folds(cfg, out_dir, resume, sweep_dir)  # resume=auto: each fold decides for itself
    if sweep_dir is not None and modality != "late":
        # a parallel job may be training this very model (as a late fusion member): wait for it
        with reuse.training_once(sweep_dir, cfg):
            done = reuse.find_trained(sweep_dir, cfg, out_dir)
            if done is not None:  # trained earlier in this sweep, as a late fusion member
                log.info(
                    "%s: this sweep already trained the same model in %s: copied, not retrained",
                    modality,
                    done,
                )
                metrics = reuse.adopt(done, out_dir)
                tracking.start(cfg, out_dir).finish()  # the copy is this job's tracked run
                return metrics
            return train_model(cfg, load_logged(cfg), out_dir, resume_here).metrics
    splits = load_logged(cfg)
    if modality == "late":
        return run_late(cfg, splits, out_dir, resume_here, sweep_dir)
    result = train_model(cfg, splits, out_dir, resume_here)
    return result.metrics


def load_logged(cfg: DictConfig) -> data.Splits:
    """`load_data`, and a log line on what was loaded."""
    splits = load_data(cfg.data, cfg.cv)
    log.info(
        "data: %s: %d train / %d val / %d test clips, %d classes",
        splits.source,
        len(splits.train),
        len(splits.val),
        len(splits.test),
        splits.n_classes,
    )
    return splits


def check_resumable(cfg: DictConfig, out_dir: Path, resume: bool | str) -> bool:
    """Whether to continue the run in ``out_dir``; refuse to overwrite a run by accident, or to
    resume one with other settings. ``resume="auto"``: continue when ``out_dir`` holds a run (a
    requeued or relaunched job), which must then have the same settings; else start fresh."""
    # never train over a finished or interrupted run: its weights would be silently replaced
    started = any(out_dir.rglob("last.pt")) or any(out_dir.rglob("checkpoint.pt"))
    asked = {True: "true", False: "false"}.get(resume) if isinstance(resume, bool) else resume
    if asked not in ("true", "false", "auto"):
        raise ConfigError(f"resume={resume!r}: valid: true, false, auto")
    if asked == "false" or (asked == "auto" and not started):
        if started:
            raise ConfigError(
                f"{out_dir} already holds a run (last.pt): add resume=true to continue it "
                "(resume=auto: continue a run where there is one), or choose another hydra.run.dir"
            )
        return False
    old_path = out_dir / "config.yaml"
    if not old_path.is_file():
        raise ConfigError(f"resume={asked}: {out_dir} holds no run to resume (no config.yaml)")
    # run-time knobs (threads, device, progress bar, ...) may change; nothing that is learned
    old = identity.run_identity(cast(dict, OmegaConf.to_container(OmegaConf.load(old_path))))
    new = identity.run_identity(cast(dict, OmegaConf.to_container(cfg, resolve=True)))
    changed = identity.differences(old, new)
    if changed:
        shown = ", ".join(changed[:3])
        raise ConfigError(
            f"resume={asked}: the settings differ from the run in {out_dir} ({shown}); "
            "resume with the same overrides"
        )
    return True


# data.cache: where the embedded generator's clips live. auto: in memory below CACHE_FROM_CLIPS
# clips (the default 1,200: generated in about a second), on disk from there (generated once into
# the cache, then read clip by clip: memory does not grow with the dataset)
GENERATED_CACHE = ("auto", "memory", "disk")
CACHE_FROM_CLIPS = 10_000


def run_folds(cfg: DictConfig, out_dir: Path, resume: bool | str, sweep_dir: Path | None) -> dict[str, Any]:
    """cv.folds=K: run every fold into ``out_dir/fold<i>/``; cv.json holds the mean over folds."""
    tracked = tracking.start(cfg, out_dir)  # the folds' runs are its children
    per_fold = []
    for i in range(cfg.cv.folds):
        log.info("cross-validation: fold %d of %d", i + 1, cfg.cv.folds)
        fold_cfg = cast(DictConfig, OmegaConf.merge(cfg, {"cv": {"fold": i}}))
        per_fold.append(run(fold_cfg, out_dir / f"fold{i}", resume, sweep_dir))
    summary = {
        "run": {"modality": cfg.modality.name, "seed": int(cfg.seed), "folds": int(cfg.cv.folds)},
        **{s: {k: float(np.mean([m[s][k] for m in per_fold])) for k in HEADLINE} for s in ("val", "test")},
    }
    write_json(
        out_dir / "cv.json", {**summary, "per_fold": [{s: m[s] for s in ("val", "test")} for m in per_fold]}
    )
    tracked.finish()
    return summary


def load_data(data_cfg: DictConfig, cv_cfg: DictConfig | None = None) -> data.Splits:
    """The configured dataset (``data.name``), sliced to ``data.limit_per_split`` if set.

    ``cv_cfg`` with ``folds`` set: the pooled clips re-split by actor into fold ``cv_cfg.fold``.
    """
    name = data_cfg.name
    if name == "synthetic":
        spec = synthetic.spec_from_config(cast(dict, OmegaConf.to_container(data_cfg.generator)))
        where = data_cfg.get("cache", "auto")
        if where not in GENERATED_CACHE:
            raise ConfigError(f"data.cache={where!r}: valid: {', '.join(GENERATED_CACHE)}")
        if where == "disk" or (where == "auto" and spec.n_clips >= CACHE_FROM_CLIPS):
            splits = synthetic.cached(spec, synthetic.cache_root(data_cfg.get("cache_dir")))
        else:
            splits = synthetic.generate(spec)
    elif name in formats.FORMATS:
        fmt = formats.FORMATS.get(name)
        if OmegaConf.is_missing(data_cfg, "path") or data_cfg.path is None:
            raise ConfigError(f"data={name} needs data.path=FILE ({fmt.what})")
        splits = fmt.read(data_cfg.path, class_names=data_cfg.class_names, nan_policy=data_cfg.nan_policy)
    else:
        raise ConfigError(f"data={name!r}: valid: synthetic, {', '.join(formats.FORMATS)}")
    splits = splits.limit(data_cfg.limit_per_split)
    if cv_cfg is not None and cv_cfg.folds is not None:  # speaker-independent CV (configs/cv/)
        splits = folds.split(splits, int(cv_cfg.folds), int(cv_cfg.fold), cv_cfg.actor_pattern)
    return splits


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


def log_profile(name: str, prep: preprocess.StreamPrep) -> None:
    """The stream's data profile and fitted preprocessing in the log; a warning when its feature
    scales differ by orders of magnitude and the scaling does not cope with that."""
    kind = None if prep.scaler is None else prep.scaler.kind
    log.info("%s: target length %d frames, scaling %s", name, prep.target.length, kind or "none")
    if prep.profile is not None:
        log.info("%s", prep.profile.summary(name))
        warning = prep.profile.warning(name, kind)
        if warning:
            log.warning("%s", warning)


def prepare(
    splits: data.Splits, modality: str, streams: list[str], preps: dict[str, preprocess.StreamPrep]
) -> tuple[preprocess.SequenceSet, ...]:
    """Train, validation and test as the model reads them, through the fitted ``preps``."""
    return tuple(
        preprocess.apply(preps, trained.model_inputs(s, modality, streams), s.labels, s.clip_ids)
        for s in splits.all()
    )


def train_model(cfg: DictConfig, splits: data.Splits, out_dir: Path, resume: bool = False) -> StreamResult:
    """Fit preprocessing, build, train, evaluate and report one model (every modality but late)."""
    settings = loop_settings(cfg)
    loop.configure_threads(settings)
    seed_everything(cfg.seed)
    modality, streams = cfg.modality.name, list(cfg.modality.streams)
    preps = {
        name: preprocess.fit(
            frames,
            percentile=cfg.preprocess.length_percentile,
            normalize=cfg.preprocess.normalize,
            scaling=cfg.preprocess.scaling,
            skip_zero_frames=bool(cfg.preprocess.get("skip_zero_frames", False)),
        )
        for name, frames in trained.model_inputs(splits.train, modality, streams).items()
    }
    train_set, val_set, test_set = prepare(splits, modality, streams, preps)
    for name, prep in preps.items():
        log_profile(name, prep)

    model_cfg = model_config(cfg)
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
    device = loop.resolve_device(settings.device)
    dtype = loop.resolve_precision(settings.precision, device)
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
        # what the model reads (streams, feature counts and names, frame rates, ingestion
        # settings, label map): mer-predict and exported models check new input against it
        "feature_spec": spec.build(splits, modality, streams, train_set.n_features),
    }
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
    )
    # the epochs' own time (training + validation), summed over every session of a resumed run:
    # a finished run that is resumed (resume=auto) re-evaluates in seconds and keeps its time
    train_seconds = sum(float(row["seconds"]) for row in history.rows)

    predictions = {
        s_name: outputs.Predictions(
            s_name,
            s.clip_ids,
            s.y.numpy(),
            loop.predict_proba(model, s, settings.eval_batch_size, device, dtype),
        )
        for s_name, s in (("val", val_set), ("test", test_set))
    }
    metrics = {
        "run": {
            "modality": cfg.modality.name,
            "seed": int(cfg.seed),
            "data": splits.source,
            "n_parameters": n_params,
            "best_epoch": history.best_epoch,
            "epochs_trained": len(history.rows),
            "stopped_early": history.stopped_early,
            "train_seconds": round(train_seconds, 2),
            "device": str(device),
            "precision": str(dtype).removeprefix("torch."),
        },
        **{s: score(p.y_true, p.y_prob, splits.class_names) for s, p in predictions.items()},
    }
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


def model_config(cfg: DictConfig) -> dict[str, Any]:
    """The model to build, as the checkpoint stores it: the modality's classifier (registry name),
    the ``model`` group (its encoder, once per stream for a multi-stream modality, and its head
    sizes) and the modality options that classifier takes."""
    modality = modalities.get(cfg.modality.name)
    model_cfg = cast(dict[str, Any], OmegaConf.to_container(cfg.model, resolve=True))
    model_cfg = {"classifier": modality.classifier, **model_cfg}
    model_cfg.update({k: cfg.modality[k] for k in modality.options if k in cfg.modality})
    return model_cfg


# ---------------------------------------------------------------------------------------------
# Late fusion


def run_late(
    cfg: DictConfig,
    splits: data.Splits,
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
    for member in modalities.get("late").members:
        member_run = cfg.modality.get(f"{member}_run")
        member_cfg = member_config(cfg, member)
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
            else:
                log.info("late fusion: training the %s model", member)
                member_dir = out_dir / member
                write_text(member_dir / "config.yaml", OmegaConf.to_yaml(member_cfg, resolve=True))
                result = train_model(member_cfg, splits, member_dir, resume)
                members[member] = result.predictions
                sources[member] = member
    metrics = fuse_and_report(
        combiner,
        acoustic_weight,
        members,
        sources,
        splits.class_names,
        out_dir,
        seed=int(cfg.seed),
        data_source=splits.source,
        save_plots=cfg.runtime.save_plots,
    )
    tracked.finish()
    return metrics


def member_config(cfg: DictConfig, member: str) -> DictConfig:
    """A late fusion member's config: this run's, with the single-stream modality ``member``."""
    member_cfg = copy.deepcopy(cfg)
    with open_dict(member_cfg):
        member_cfg.modality = {"name": member, "streams": [member]}
        member_cfg.search = None  # a search trial is the fused model: members report no epochs
    return member_cfg


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
    """The members' class probabilities combined per split; all must cover the same clips."""
    check_same_clips(members, split_names)
    first = members[combined.members[0]]
    return [
        outputs.Predictions(
            s,
            first[s].clip_ids,
            first[s].y_true,
            combined.combine({m: members[m][s].y_prob for m in combined.members}),
        )
        for s in split_names
    ]


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
    save_plots: bool = True,
) -> dict[str, Any]:
    weights = late_weights(combiner, acoustic_weight)
    check_same_clips(members, ("val", "test"))  # before anything is fitted on them
    val = next(iter(members.values()))["val"]
    # fitted on validation predictions and labels only: the test split never chooses its own fusion
    combined = late_fusion.fit_late(
        combiner, {m: p["val"].y_prob for m, p in members.items()}, val.y_true, len(class_names), weights
    )
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
            **{k: v for k, v in fitted.items() if k != "stacker"},  # its coefficients: late.json
            "members": sources,
        },
        **{p.split: score(p.y_true, p.y_prob, class_names) for p in predictions},
    }
    write_json(out_dir / "late.json", {"format": upgrade.LATE_FORMAT, **fitted, "members": sources})
    outputs.write(out_dir, metrics, None, predictions, class_names, save_plots=save_plots)
    return metrics


# ---------------------------------------------------------------------------------------------
# Reloading a trained run


def evaluate_run(
    run_dir: Path, data_path: Path | None, split_names: tuple[str, ...], save_plots: bool = True
) -> tuple[Path, dict[str, Any]]:
    """Re-evaluate a trained run (single-stream or late fusion) into ``run_dir/evaluations/<time>/``.

    ``data_path``: another feature pickle with the same features; None: the run's own data.
    The training results in ``run_dir`` are never touched.
    """
    run_dir = run_dir.expanduser().resolve()
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise MerError(f"{run_dir}: no config.yaml: not a mer-train run directory")
    cfg = files.read_config(config_path)
    data_cfg = cfg.data
    if data_path is not None:
        data_cfg = OmegaConf.merge(
            data_cfg,
            {
                "name": formats.recognise(data_path).name,
                "path": str(data_path),
                "limit_per_split": None,
            },
        )
    # a cross-validation fold is re-evaluated on its own fold; another file has no folds
    cv_cfg = cfg.cv if data_path is None and "cv" in cfg else None
    splits = load_data(data_cfg, cv_cfg)
    late = trained.read_late(run_dir)
    late_info: dict[str, Any] = {}
    if late is not None:
        _, combined, member_dirs = late
        members = {m: trained.predict_run(d, splits, split_names) for m, d in member_dirs.items()}
        predictions = late_predictions(members, combined, split_names)
        late_info = {"combiner": combined.combiner}
    else:
        predictions = list(trained.predict_run(run_dir, splits, split_names).values())
    metrics = {
        "run": {
            "evaluated_run": str(run_dir),
            "modality": cfg.modality.name,
            **late_info,
            "data": splits.source,
        },
        **{p.split: score(p.y_true, p.y_prob, splits.class_names) for p in predictions},
    }
    if cfg.modality.name in modalities.jointly_trained() and "test" in split_names:
        metrics["test"]["stream_contribution"] = trained.run_stream_contribution(run_dir, splits.test)
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    out_dir = run_dir / "evaluations" / stamp
    n = 1
    while out_dir.exists():
        n += 1
        out_dir = run_dir / "evaluations" / f"{stamp}_{n}"
    # written into a hidden sibling and renamed: a failure leaves no half-written evaluation
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    try:
        outputs.write(
            tmp,
            metrics,
            None,
            predictions,
            splits.class_names,
            save_plots=save_plots,
            plot_splits=split_names,
        )
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir, metrics

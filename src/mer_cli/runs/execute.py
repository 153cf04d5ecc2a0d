"""One mer-train run, top to bottom: the modality decides what is trained (one model, late fusion
of two, or one run per cross-validation fold), a sweep's trained models are reused, and every file
of the run directory is written by a function called from here:
  config.yaml              resolved config (Hydra's .hydra/ keeps the unresolved one and overrides)
  profile.json             the training split's data profile and the preprocessing it chose
                           (preprocess/profile.py; late fusion: in each member's directory)
  checkpoint.pt            best weights by val/loss, with what is needed to rebuild the model
  last.pt                  the latest epoch's full state, to resume an interrupted run
  history.csv              one row per epoch (train/*, val/*, lr)
  metrics.json             {"run": {...}, "val": {...}, "test": {...}}
  predictions.csv          per clip: split, clip id, [speaker,] true label, predicted label, probabilities
  plots/*.png              training curves; test split: confusion matrix, ROC, per-class ROC, PR;
                           layer_weights.png with model.layer_weights=learned
  acoustic/, visual/       late fusion only: the two member runs (same layout), unless reused
  late.json                late fusion only: members, combiner and what it fitted, for mer-evaluate
  fold<i>/, cv.json        cv.folds=K only: one run per fold (same layout), mean over folds
  robustness.json, .csv    eval.robustness=true only: the test split re-scored under corruptions
                           (runs/robustness.py), with plots/robustness.png
  baselines.json           report.baselines=true only: classic baselines on the run's splits
                           (runs/baselines.py; a sweep computes them once per dataset and split)
  failed.json              a failed job of a sweep (written by the CLI): its error, for the report;
                           removed when a later attempt in the same directory finishes
  tensorboard/             logger=tensorboard only: event files (training/tracking.py; logger=mlflow
                           writes outside the run directory, by default into outputs/mlflow.db)
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import numpy as np
from omegaconf import DictConfig, OmegaConf

from mer_cli.core.artifacts import write_json, write_text
from mer_cli.core.errors import DataError
from mer_cli.data import leakage
from mer_cli.data.load import load_data
from mer_cli.data.splits import Splits
from mer_cli.evaluation import calibration
from mer_cli.evaluation.metrics import HEADLINE
from mer_cli.models import layer_mix, modalities
from mer_cli.preprocess import profile
from mer_cli.preprocess.scaling import check_setting as check_scaling
from mer_cli.runs import baselines, reuse, robustness
from mer_cli.runs.late import run_late
from mer_cli.runs.resume import check_resumable
from mer_cli.runs.train import check_max_frames, describe_data, fit_preprocessing, frame_validity, train_model
from mer_cli.training import options as trainer_options
from mer_cli.training import tracking

log = logging.getLogger(__name__)


def run(
    cfg: DictConfig, out_dir: Path, resume: bool | str = False, sweep_dir: Path | None = None
) -> dict[str, Any]:
    """Train and evaluate the model ``cfg`` describes; write everything into ``out_dir``.

    ``resume``: true, false or "auto" (continue the run in ``out_dir`` if there is one).
    ``sweep_dir``: the multirun's root when this is one job of a sweep; models already trained
    there with the same settings are reused instead of trained again (see `sweep`).
    ``eval.robustness=true``: the finished run (each fold of a cross-validation) is then
    re-scored under every corruption, as ``mer-evaluate RUN --perturb`` does.
    ``report.baselines=true``: then the classic baselines on the same splits (baselines.json).
    """
    if baselines.enabled(cfg):
        baselines.check(cfg)  # a bad setting, or numba missing: one line before anything is trained
    metrics = train_or_reuse(cfg, out_dir, resume, sweep_dir)
    one_run = cfg.cv.folds is None or cfg.cv.fold is not None  # not the folds' parent (cv.json)
    if cfg.get("eval", {}).get("robustness", False) and one_run:
        seed = int(cfg.eval.get("robustness_seed", 0))
        recordings = cfg.eval.get("robustness_audio")
        robustness.evaluate_robustness(
            out_dir,
            seed=seed,
            save_plots=cfg.runtime.save_plots,
            audio_dir=None if recordings is None else Path(str(recordings)),
        )
    if baselines.enabled(cfg) and one_run:
        baselines.write(cfg, out_dir, sweep_dir)
    stale = out_dir / "failed.json"  # an earlier attempt's (a rerun with resume=auto): now untrue
    if stale.is_file():
        stale.unlink()
        log.info("%s: removed: this attempt finished", stale)
    return metrics


def train_or_reuse(
    cfg: DictConfig, out_dir: Path, resume: bool | str = False, sweep_dir: Path | None = None
) -> dict[str, Any]:
    """`run` up to its robustness evaluation: the model trained, or copied from this sweep."""
    modality = cfg.modality.name
    modalities.get(modality)  # an unknown name: one line listing the valid ones
    calibration.check(str(cfg.get("eval", {}).get("calibration", "none")))
    check_scaling(cfg.preprocess.scaling)
    check_max_frames(cfg)
    trainer_options.check(cfg.trainer, modality)  # before any data is read or member trained
    layer_mix.check_value(cfg.model.get("layer_weights"))
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


def profile_only(cfg: DictConfig) -> profile.DataProfile:
    """``+profile_only=true`` and mer-profile: the data profile of the training split and the
    preprocessing it leads to, as a run would fit them (the same loading, checks, splits, fold),
    without training or writing anything. Late fusion: its two members' streams."""
    modality = cfg.modality.name
    modalities.get(modality)
    check_scaling(cfg.preprocess.scaling)
    check_max_frames(cfg)
    if cfg.cv.folds is not None and cfg.cv.fold is None:  # every fold's run profiles its own: the first
        cfg = cast(DictConfig, OmegaConf.merge(cfg, {"cv": {"fold": 0}}))
        log.info("cross-validation: the profile of fold 1 of %d", cfg.cv.folds)
    splits = load_logged(cfg)
    if modality == "late":
        members = [(m, [m]) for m in modalities.get("late").members]
    else:
        members = [(modality, list(cfg.modality.streams))]
    preps = {}
    for name, streams in members:
        preps.update(
            fit_preprocessing(cfg, splits, name, streams, frame_validity(cfg, splits, name, streams))
        )
    return describe_data(splits, preps)


def load_logged(cfg: DictConfig) -> Splits:
    """`load_data`, checked for leakage between its splits, and a log line on what was loaded."""
    splits = load_data(cfg.data, cfg.cv)
    empty = [s.name for s in splits.all() if not len(s)]
    if empty:  # a split-less ingest of new clips (mer-ingest --val-fraction 0 --test-fraction 1)
        raise DataError(
            f"{splits.source}: no clips in the {' and '.join(empty)} split: a dataset to evaluate or predict "
            "on (mer-evaluate RUN --data, mer-predict RUN --data), not to train on"
        )
    # before anything is fitted: a test speaker seen in training, or a clip in two splits, makes
    # every number optimistic
    speakers = leakage.check(
        splits,
        str(cfg.data.get("speaker_pattern", leakage.CREMA_D_SPEAKER_PATTERN)),
        bool(cfg.data.get("allow_speaker_overlap", False)),
    )
    if not speakers.checked:
        log.warning(
            "speakers not checked: some clip ids carry no speaker matching data.speaker_pattern=%r; "
            "nothing shows whether the test split shares speakers with training",
            speakers.pattern,
        )
    elif speakers.speaker_dependent:
        log.warning("a speaker-dependent split (data.allow_speaker_overlap=true): %s", speakers.shared)
    if speakers.duplicated_clips:
        log.warning("splits repeat clips (data.allow_speaker_overlap=true): %s", speakers.duplicates)
    record = speakers.as_dict()
    if splits.protocol is not None:  # data.split_file: the result names its protocol (path, sha256)
        record["split_file"] = dict(splits.protocol)
    splits = replace(splits, speaker_check=record)
    log.info(
        "data: %s: %d train / %d val / %d test clips, %d classes",
        splits.source,
        len(splits.train),
        len(splits.val),
        len(splits.test),
        splits.n_classes,
    )
    return splits


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

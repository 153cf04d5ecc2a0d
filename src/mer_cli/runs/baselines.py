"""A run's classic baselines (``report.baselines=true``): baselines.json in its directory.

Input: the run's resolved config (its ``data``, ``cv`` and modality say which clips and streams;
``report`` which baselines; ``compare`` the bootstrap of the intervals). Output: baselines.json,
written atomically:
    {"format": 1, "key", "group", "data": {source, streams, fold, n_clips}, "settings",
     "class_names", "bootstrap": {samples, confidence}, "baselines": [per baseline: name, title,
     chosen, validation_f1_macro, seconds, val, test, test_ci, test_predictions]}
``key`` names the data and settings (a hash): runs with the same key have the same baselines,
so a sweep computes them once (``<sweep>/.baselines/<key>.json``, under a sweep-wide lock as
`reuse.training_once` holds one per model) and every job copies them. ``group``: the same
without the cross-validation fold, so the report gathers a baseline's folds as a model's.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from mer_cli.core.artifacts import write_json
from mer_cli.core.config import plain_dict
from mer_cli.core.errors import ConfigError
from mer_cli.data.folds import CREMA_D_ACTOR_PATTERN
from mer_cli.data.load import load_data
from mer_cli.evaluation.baselines import suite
from mer_cli.models import modalities
from mer_cli.runs import files
from mer_cli.runs.reuse import LOCKS_DIR
from mer_cli.runs.rundir import wait_and_hold

log = logging.getLogger(__name__)

FILE = "baselines.json"
FORMAT = 1
CACHE_DIR = ".baselines"  # at a sweep's root: one file per key

# the data keys that say where generated clips are kept or how speakers are checked, not which
# clips are read: the same baselines whatever they are
_NOT_DATA = ("cache", "cache_dir", "speaker_pattern", "allow_speaker_overlap")


def enabled(cfg: DictConfig) -> bool:
    return bool(cfg.get("report", {}).get("baselines", False))


def settings_of(cfg: DictConfig) -> suite.Settings:
    """``report`` less its switch -> `suite.Settings` (a key it does not know: one line)."""
    node = {k: v for k, v in plain_dict(cfg.report).items() if k != "baselines"}
    try:
        return suite.Settings(**node)
    except TypeError as e:
        raise ConfigError(f"report: {e}") from None


def check(cfg: DictConfig) -> None:
    """The settings, and that what they name can run (1-NN DTW: numba): one line if not."""
    settings = settings_of(cfg)
    streams_of(cfg)
    suite.check(settings)


def streams_of(cfg: DictConfig) -> list[str]:
    """The streams the run's modality reads (late fusion: its members')."""
    streams = cfg.modality.get("streams")
    if streams is None:
        return list(modalities.get(cfg.modality.name).members)
    return [str(s) for s in streams]


def identity(cfg: DictConfig, with_fold: bool = True) -> dict[str, Any]:
    """What decides a run's baselines: its data (less where it is cached), its cross-validation
    fold, the streams, the baselines' settings and the intervals' bootstrap."""
    data = {k: v for k, v in plain_dict(cfg.data).items() if k not in _NOT_DATA}
    cv = plain_dict(cfg.cv)
    if not with_fold:
        cv.pop("fold", None)
    return {
        "data": data,
        "cv": cv,
        "streams": streams_of(cfg),
        "settings": settings_of(cfg).as_dict(),
        "bootstrap": bootstrap_of(cfg),
        "format": FORMAT,
    }


def bootstrap_of(cfg: DictConfig) -> dict[str, Any]:
    compare = cfg.get("compare", {})
    return {
        "samples": int(compare.get("bootstrap_samples", 2000)),
        "confidence": float(compare.get("confidence", 0.95)),
        "actor_pattern": str(cfg.cv.get("actor_pattern") or CREMA_D_ACTOR_PATTERN),
    }


def key_of(identity_: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity_, sort_keys=True, default=str).encode()).hexdigest()[:16]


def compute(cfg: DictConfig) -> dict[str, Any]:
    """baselines.json's content for the run ``cfg`` describes: its data loaded as mer-train
    loads it (`load_data`), every baseline fitted, chosen on validation and scored on test."""
    settings = settings_of(cfg)
    streams = streams_of(cfg)
    boot = bootstrap_of(cfg)
    splits = load_data(cfg.data, cfg.cv)
    threads = cfg.get("runtime", {}).get("num_threads")
    log.info("baselines (%s) on %s: %s", "+".join(streams), splits.source, ", ".join(settings.methods))
    results = suite.compute(
        splits,
        streams,
        settings,
        threads=None if threads is None else int(threads),
        honour_masks=cfg.data.get("frame_validity", "honour") == "honour",
    )
    entries = suite.record(results, splits, boot["actor_pattern"], boot["samples"], boot["confidence"])
    return {
        "format": FORMAT,
        "key": key_of(identity(cfg)),
        "group": key_of(identity(cfg, with_fold=False)),
        "data": {
            "source": splits.source,
            "streams": streams,
            "fold": cfg.cv.get("fold"),
            "n_clips": {s.name: len(s) for s in splits.all()},
        },
        "settings": settings.as_dict(),
        "class_names": list(splits.class_names),
        "bootstrap": boot,
        "baselines": entries,
    }


def write(cfg: DictConfig, out_dir: Path, sweep_dir: Path | None = None) -> dict[str, Any]:
    """baselines.json in ``out_dir``; in a sweep, computed by the first job that needs them and
    copied by every other (the sweep's cache, under its lock)."""
    check(cfg)  # a bad setting: one line before any data is read
    if sweep_dir is None:
        result = compute(cfg)
    else:
        key = key_of(identity(cfg))
        cached = sweep_dir / CACHE_DIR / f"{key}.json"

        def say_waiting() -> None:
            log.info("baselines: another job of this sweep is computing them: waiting for it")

        with wait_and_hold(sweep_dir / LOCKS_DIR / f"baselines-{key}.lock", on_wait=say_waiting):
            if cached.is_file():
                result = files.read_json(cached)
                log.info("baselines: computed earlier in this sweep (%s): copied", cached)
            else:
                result = compute(cfg)
                write_json(cached, result)
    write_json(out_dir / FILE, result)
    log.info("baselines -> %s\n%s", out_dir / FILE, suite.describe(result["baselines"]))
    return result

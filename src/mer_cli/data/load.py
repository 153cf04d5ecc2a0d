"""The dataset a config names (``data``): the embedded generator's clips (in memory or the disk
cache) or a user's file in any format, with each clip's speaker from ``data.speaker_file`` if
given, re-split by a protocol file (``data.split_file``) if given, sliced, optionally re-split into
actor folds (the protocol file's own folds when it has them).
"""

from __future__ import annotations

import logging
from typing import cast

from omegaconf import DictConfig, OmegaConf

from mer_cli.core.errors import ConfigError
from mer_cli.data import folds, formats, protocol, speakers, synthetic
from mer_cli.data.leakage import CREMA_D_SPEAKER_PATTERN
from mer_cli.data.splits import Splits

log = logging.getLogger(__name__)


# data.cache: where the embedded generator's clips live. auto: in memory below CACHE_FROM_CLIPS
# clips (the default 1,200: generated in about a second), on disk from there (generated once into
# the cache, then read clip by clip: memory does not grow with the dataset)
GENERATED_CACHE = ("auto", "memory", "disk")


CACHE_FROM_CLIPS = 10_000


def load_data(data_cfg: DictConfig, cv_cfg: DictConfig | None = None) -> Splits:
    """The configured dataset (``data.name``), sliced to ``data.limit_per_split`` if set.

    ``cv_cfg`` with ``folds`` set: the pooled clips re-split by actor into fold ``cv_cfg.fold``
    (or by ``data.split_file``'s fold column, when it has one).
    """
    splits = read_data(data_cfg)
    if data_cfg.get("speaker_file") is not None:
        splits = speakers.with_speaker_file(splits, data_cfg.speaker_file)
    pattern = str(data_cfg.get("speaker_pattern", CREMA_D_SPEAKER_PATTERN))
    split_file = data_cfg.get("split_file")
    plan = protocol.read(split_file) if split_file is not None else None
    cross_validate = cv_cfg is not None and cv_cfg.folds is not None
    # with cv.folds and a fold column the file's folds decide; else its split column does
    if plan is not None and not (cross_validate and plan.fold_of is not None):
        splits = protocol.apply_splits(splits, plan, pattern)
    splits = splits.limit(data_cfg.limit_per_split)
    if cv_cfg is not None and cross_validate:  # speaker-independent CV (configs/cv/)
        if plan is not None and plan.fold_of is not None:
            return protocol.apply_folds(splits, plan, int(cv_cfg.folds), int(cv_cfg.fold), pattern)
        splits = folds.split(splits, int(cv_cfg.folds), int(cv_cfg.fold), cv_cfg.actor_pattern)
    return splits


def read_data(data_cfg: DictConfig) -> Splits:
    """The clips of ``data.name`` as the data splits them."""
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
    return splits

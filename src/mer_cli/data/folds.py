"""Speaker-independent cross-validation: pool every clip, re-split train/val/test by actor.

Input: `Splits` and the actor id of each clip (parsed from clip ids with a regex; CREMA-D's ids
start with a 4-digit actor). Output: the `Splits` of one fold, where no actor is in two splits.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
from sklearn.model_selection import GroupKFold

from mer_cli.core.errors import ConfigError, DataError
from mer_cli.data.splits import Clips, Split, Splits

CREMA_D_ACTOR_PATTERN = r"^(\d{4})_"  # 1001_DFA_ANG_XX -> actor 1001


def actor_ids(clip_ids: Sequence[str], pattern: str) -> tuple[str, ...]:
    """The actor of each clip: the regex's first group (or whole match); raises on a clip without one."""
    regex = _compile(pattern)
    out = []
    for clip_id in clip_ids:
        m = regex.search(clip_id)
        if m is None:
            raise DataError(f"clip {clip_id!r}: no actor id matching cv.actor_pattern={pattern!r}")
        out.append(m.group(1) if regex.groups else m.group(0))
    return tuple(out)


def maybe_actor_ids(clip_ids: Sequence[str], pattern: str) -> tuple[str, ...] | None:
    """Like `actor_ids`, but None when any clip id carries no actor id."""
    try:
        return actor_ids(clip_ids, pattern)
    except DataError:
        return None


def _compile(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"cv.actor_pattern={pattern!r}: not a regular expression ({e})") from e


def split(splits: Splits, n_folds: int, fold: int, actor_pattern: str) -> Splits:
    """Fold ``fold`` of ``n_folds``: its actors are the test split, the next fold's the val split.

    Actors go to folds with scikit-learn's GroupKFold (deterministic, balances clip counts), so
    across the K folds every clip is tested exactly once and never with its actor in training.
    """
    if n_folds < 3:
        raise ConfigError(f"cv.folds={n_folds}: needs at least 3 (train, val and test folds)")
    if not 0 <= fold < n_folds:
        raise ConfigError(f"cv.fold={fold}: must be in 0..{n_folds - 1}")
    pooled = _concat(splits.all())
    actors = np.array(actor_ids(pooled.clip_ids, actor_pattern))
    n_actors = len(np.unique(actors))
    if n_actors < n_folds:
        raise DataError(f"{splits.source}: {n_actors} actors are too few for cv.folds={n_folds}")
    fold_of_clip = np.empty(len(pooled), dtype=np.int64)
    for k, (_, test_idx) in enumerate(GroupKFold(n_splits=n_folds).split(actors, groups=actors)):
        fold_of_clip[test_idx] = k
    val_fold = (fold + 1) % n_folds
    parts = {
        "train": np.flatnonzero((fold_of_clip != fold) & (fold_of_clip != val_fold)),
        "val": np.flatnonzero(fold_of_clip == val_fold),
        "test": np.flatnonzero(fold_of_clip == fold),
    }
    new = {name: replace(pooled.take(idx), name=name) for name, idx in parts.items()}
    missing = sorted(set(range(splits.n_classes)) - set(new["train"].labels.tolist()))
    if missing:
        raise DataError(
            f"{splits.source}: cv fold {fold}: no training clip of class {splits.class_names[missing[0]]}"
        )
    return replace(
        splits,
        train=new["train"],
        val=new["val"],
        test=new["test"],
        source=f"{splits.source}, cv fold {fold + 1}/{n_folds} by actor",
    )


def _concat(parts: Sequence[Split]) -> Split:
    return Split(
        name="all",
        clip_ids=tuple(c for s in parts for c in s.clip_ids),
        mfcc=Clips.concat([s.mfcc for s in parts]),  # clip numbers only: no frame is copied
        aus=Clips.concat([s.aus for s in parts]),
        labels=np.concatenate([s.labels for s in parts]),
    )

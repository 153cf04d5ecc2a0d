"""Speaker-independent cross-validation: pool every clip, re-split train/val/test by actor.

Input: `Splits` and the actor id of each clip (the clips' own speakers where the data has them,
else parsed from clip ids with a regex; CREMA-D's ids start with a 4-digit actor), or a fold
number per clip (a protocol file's). Output: the `Splits` of one fold, where no actor is in two
splits.
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


def speakers_of(split: Split, pattern: str) -> tuple[str, ...] | None:
    """Each clip's speaker: the split's own (`Split.speakers`) where known, else parsed from the
    clip ids with ``pattern``; None when some clip id carries none."""
    if split.speakers is not None:
        return split.speakers
    return maybe_actor_ids(split.clip_ids, pattern)


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
    check_fold(n_folds, fold)
    pooled = pool(splits)
    known = pooled.speakers
    actors = np.array(known if known is not None else actor_ids(pooled.clip_ids, actor_pattern))
    n_actors = len(np.unique(actors))
    if n_actors < n_folds:
        raise DataError(f"{splits.source}: {n_actors} actors are too few for cv.folds={n_folds}")
    fold_of_clip = np.empty(len(pooled), dtype=np.int64)
    for k, (_, test_idx) in enumerate(GroupKFold(n_splits=n_folds).split(actors, groups=actors)):
        fold_of_clip[test_idx] = k
    return assigned(splits, pooled, fold_of_clip, n_folds, fold, "by actor")


def check_fold(n_folds: int, fold: int) -> None:
    if n_folds < 3:
        raise ConfigError(f"cv.folds={n_folds}: needs at least 3 (train, val and test folds)")
    if not 0 <= fold < n_folds:
        raise ConfigError(f"cv.fold={fold}: must be in 0..{n_folds - 1}")


def assigned(
    splits: Splits, pooled: Split, fold_of_clip: np.ndarray, n_folds: int, fold: int, how: str
) -> Splits:
    """Fold ``fold`` of the clips of ``pooled`` (`pool`), whose folds are ``fold_of_clip`` (one
    number per clip in 0..K-1; -1: in no fold, left out): test = that fold, val = the next."""
    val_fold = (fold + 1) % n_folds
    parts = {
        "train": np.flatnonzero((fold_of_clip >= 0) & (fold_of_clip != fold) & (fold_of_clip != val_fold)),
        "val": np.flatnonzero(fold_of_clip == val_fold),
        "test": np.flatnonzero(fold_of_clip == fold),
    }
    new = {name: replace(pooled.take(idx), name=name) for name, idx in parts.items()}
    empty = [name for name, s in new.items() if not len(s)]
    if empty:
        raise DataError(f"{splits.source}: cv fold {fold} ({how}): no clip in the {empty[0]} split")
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
        source=f"{splits.source}, cv fold {fold + 1}/{n_folds} {how}",
    )


def pool(splits: Splits) -> Split:
    """Every clip of train, val and test, in that order, as one split named "all"."""
    return concat(splits.all())


def concat(parts: Sequence[Split]) -> Split:
    """The clips of ``parts`` one after another (speakers kept only when every part knows them;
    a stream's validity masks where any part has them, all True for a part without)."""
    known = all(s.speakers is not None for s in parts)
    masked = sorted({stream for s in parts for stream in s.valid or {}})
    return Split(
        name="all",
        clip_ids=tuple(c for s in parts for c in s.clip_ids),
        mfcc=Clips.concat([s.mfcc for s in parts]),  # clip numbers only: no frame is copied
        aus=Clips.concat([s.aus for s in parts]),
        labels=np.concatenate([s.labels for s in parts]),
        speakers=tuple(spk for s in parts for spk in s.speakers or ()) if known else None,
        valid={stream: Clips.concat([s.mask(stream) for s in parts]) for stream in masked} or None,
    )

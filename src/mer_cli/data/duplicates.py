"""Repeated clips across splits: the same clip id in two splits, or the same frames under two ids.

Input: `Splits`. Output: per pair of splits (``"train/test"``), the clip ids both hold and the clips
of the second whose frames, in every stream, equal a clip of the first under another id (a copied
file renamed, a clip exported twice). Frames are compared by a hash of each clip (blake2b of its
shape and float32 bytes, stream after stream), computed clip by clip: a dataset on disk is read
once, one clip at a time, never loaded whole.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from mer_cli.data.splits import Split, Splits

# every pair: a clip repeated between train and val makes model selection (early stopping, the
# temperature, late fusion's weights) optimistic, one in test every number
PAIRS = (("train", "val"), ("train", "test"), ("val", "test"))


@dataclass(frozen=True)
class Repeats:
    clip_ids: tuple[str, ...]  # ids in both splits
    identical: tuple[tuple[str, str], ...]  # (id in the second split, the first's id with its frames)

    def __bool__(self) -> bool:
        return bool(self.clip_ids or self.identical)

    def counts(self) -> dict[str, int]:
        return {"clip_ids": len(self.clip_ids), "identical_features": len(self.identical)}


def clip_digest(split: Split, i: int) -> bytes:
    """A 16-byte digest of clip ``i``'s frames in every stream (shape included, so the same values
    in another shape differ)."""
    h = hashlib.blake2b(digest_size=16)
    for clips in (split.mfcc, split.aus):
        x = np.ascontiguousarray(clips[i], dtype=np.float32)
        h.update(np.asarray(x.shape, dtype=np.int64).tobytes())
        h.update(x.data)
    return h.digest()


def digests(split: Split) -> list[bytes]:
    return [clip_digest(split, i) for i in range(len(split))]


def find(splits: Splits) -> dict[str, Repeats]:
    """``"a/b"`` -> what splits a and b repeat, for every pair of `PAIRS`."""
    parts = {s.name: s for s in splits.all()}
    hashed = {name: digests(s) for name, s in parts.items()}
    return {f"{a}/{b}": _repeats(parts[a], hashed[a], parts[b], hashed[b]) for a, b in PAIRS}


def _repeats(a: Split, a_hash: list[bytes], b: Split, b_hash: list[bytes]) -> Repeats:
    ids_a = set(a.clip_ids)
    same_id = tuple(c for c in b.clip_ids if c in ids_a)
    first_with: dict[bytes, str] = {}
    for clip_id, digest in zip(a.clip_ids, a_hash, strict=True):
        first_with.setdefault(digest, clip_id)
    identical = tuple(
        (clip_id, first_with[digest])
        for clip_id, digest in zip(b.clip_ids, b_hash, strict=True)
        if clip_id not in ids_a and digest in first_with
    )
    return Repeats(same_id, identical)

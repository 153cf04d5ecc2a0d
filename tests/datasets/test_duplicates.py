"""Repeated clips across splits (the same id, or the same frames under another id) are refused in one
line like shared speakers, or recorded under data.allow_speaker_overlap=true and marked in the
report; frames are hashed clip by clip."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from conftest import make_split
from mer_cli.core.errors import DataError
from mer_cli.data import duplicates, leakage, native
from mer_cli.data.splits import NOTEBOOK_CLASS_NAMES, Split, Splits
from mer_cli.reporting.document import speaker_dependent_labels

PATTERN = leakage.CREMA_D_SPEAKER_PATTERN
NONE = {"clip_ids": 0, "identical_features": 0}


def distinct() -> Splits:
    rng = np.random.default_rng(0)
    parts = [make_split(name, 12, rng) for name in ("train", "val", "test")]
    return Splits(*parts, class_names=NOTEBOOK_CLASS_NAMES, source="feats.pkl")


def with_clip(split: Split, clip_id: str, mfcc: np.ndarray, aus: np.ndarray) -> Split:
    """``split`` with its last clip replaced by (``clip_id``, ``mfcc``, ``aus``)."""
    return replace(
        split,
        clip_ids=(*split.clip_ids[:-1], clip_id),
        mfcc=(*list(split.mfcc)[:-1], mfcc),
        aus=(*list(split.aus)[:-1], aus),
    )


def test_distinct_splits_record_no_repeats():
    got = leakage.check(distinct(), PATTERN, False)
    assert got.duplicates == {"train/val": NONE, "train/test": NONE, "val/test": NONE}
    assert not got.duplicated_clips


def test_a_clip_id_in_two_splits_is_one_line_unless_allowed_then_recorded():
    splits = distinct()
    # the test split's last clip renamed to a training clip's id (its frames stay its own)
    test = replace(splits.test, clip_ids=(*splits.test.clip_ids[:-1], "train_3"))
    splits = replace(splits, test=test)
    with pytest.raises(DataError) as e:
        leakage.check(splits, PATTERN, False)
    assert str(e.value) == (
        "feats.pkl: the train and test splits repeat clips: 1 clip id(s) in both (train_3); remove the "
        "repeats, or set data.allow_speaker_overlap=true to run it anyway (recorded with every result)"
    )
    got = leakage.check(splits, PATTERN, True).as_dict()
    assert got["duplicates"]["train/test"] == {"clip_ids": 1, "identical_features": 0}
    assert got["duplicates"]["train/val"] == NONE and got["duplicated_clips"] is True


def test_the_same_frames_under_another_id_are_found_in_every_stream_only():
    splits = distinct()
    source = splits.train
    # val's last clip: train_4's frames in both streams; test's: train_5's mfcc with other aus
    val = with_clip(splits.val, "val_copy", source.mfcc[4], source.aus[4])
    other_aus = source.aus[5] + 1.0
    test = with_clip(splits.test, "test_half", source.mfcc[5], other_aus)
    splits = replace(splits, val=val, test=test)
    with pytest.raises(DataError) as e:
        leakage.check(splits, PATTERN, False)
    assert str(e.value).startswith(
        "feats.pkl: the train and val splits repeat clips: 1 val clip(s) with the same frames as a "
        "train clip under another id (val_copy = train_4); remove the repeats"
    )
    got = leakage.check(splits, PATTERN, True)
    assert got.duplicates == {
        "train/val": {"clip_ids": 0, "identical_features": 1},
        "train/test": NONE,  # one stream the same is not the same clip
        "val/test": NONE,
    }


def test_counts_agree_with_comparing_every_pair_of_clips():
    rng = np.random.default_rng(7)
    splits = distinct()
    parts = {s.name: s for s in splits.all()}
    # plant copies at random: a clip of split a given to split b under a new id
    for n, (a, b) in enumerate([("train", "test"), ("train", "test"), ("val", "test"), ("train", "val")]):
        src, dst = parts[a], parts[b]
        i, j = int(rng.integers(len(src))), int(rng.integers(len(dst) - 1))
        ids, mfcc, aus = list(dst.clip_ids), list(dst.mfcc), list(dst.aus)
        ids[j], mfcc[j], aus[j] = f"copy_{n}", src.mfcc[i].copy(), src.aus[i].copy()
        parts[b] = replace(dst, clip_ids=tuple(ids), mfcc=tuple(mfcc), aus=tuple(aus))
    splits = Splits(parts["train"], parts["val"], parts["test"], NOTEBOOK_CLASS_NAMES, "x")
    found = duplicates.find(splits)
    for pair, rep in found.items():
        a, b = (parts[n] for n in pair.split("/"))
        reference = sum(
            any(
                np.array_equal(b.mfcc[j], a.mfcc[i]) and np.array_equal(b.aus[j], a.aus[i])
                for i in range(len(a))
            )
            for j in range(len(b))
        )
        assert len(rep.identical) == reference, pair
    assert {p: len(r.identical) for p, r in found.items()} == {"train/val": 1, "train/test": 2, "val/test": 1}


def test_a_dataset_on_disk_is_hashed_one_clip_at_a_time(tmp_path, monkeypatch):
    splits = distinct()
    copy = with_clip(splits.test, "test_copy", splits.train.mfcc[0], splits.train.aus[0])
    directory = native.save_dir(replace(splits, test=copy), tmp_path / "d")
    on_disk = native.load_dir(directory)
    rows_read: list[int] = []
    read = native.NpyRows.__getitem__

    def counting(self: native.NpyRows, rows: slice) -> np.ndarray:
        out = read(self, rows)
        rows_read.append(len(out))
        return out

    monkeypatch.setattr(native.NpyRows, "__getitem__", counting)
    found = duplicates.find(on_disk)
    assert found["train/test"].identical == (("test_copy", "train_0"),)
    longest = max(int(c.lengths.max()) for s in on_disk.all() for c in (s.mfcc, s.aus))
    assert rows_read and max(rows_read) <= longest  # never more than one clip per read
    assert len(rows_read) == 2 * sum(len(s) for s in on_disk.all())  # each clip's two streams, once


def test_the_report_marks_a_model_whose_splits_repeat_clips():
    class FakeRun:
        def __init__(self, path: str, speakers: dict) -> None:
            self.path = Path(path)
            self.metrics = {"run": {"speakers": speakers}}

    runs = [
        FakeRun("a", {"speaker_dependent": False, "duplicated_clips": True}),
        FakeRun("b", {"speaker_dependent": False, "duplicated_clips": False}),
        FakeRun("c", {"speaker_dependent": True}),  # a run written before the duplicate check
    ]
    labels = {Path("a"): "early", Path("b"): "late", Path("c"): "visual"}
    assert speaker_dependent_labels(runs, labels) == {"early", "visual"}

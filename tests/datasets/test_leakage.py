"""The speaker check counts what the test split shares with train and val, refuses it in one line,
and records it when the user allows it."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from conftest import make_split
from mer_cli.core.errors import ConfigError, DataError
from mer_cli.data import leakage
from mer_cli.data.splits import NOTEBOOK_CLASS_NAMES, Splits

PATTERN = leakage.CREMA_D_SPEAKER_PATTERN


def _splits(speakers: dict[str, list[int]]) -> Splits:
    rng = np.random.default_rng(0)
    parts = {}
    for name, spk in speakers.items():
        split = make_split(name, len(spk), rng)
        parts[name] = replace(split, clip_ids=tuple(f"{s}_DFA_ANG_{i}" for i, s in enumerate(spk)))
    return Splits(parts["train"], parts["val"], parts["test"], NOTEBOOK_CLASS_NAMES, "feats.pkl")


def test_disjoint_speakers_pass_with_their_counts():
    got = leakage.check(
        _splits({"train": [1001, 1002, 1001], "val": [1003], "test": [1004, 1005]}), PATTERN, False
    )
    assert got.checked and not got.speaker_dependent
    assert got.speakers == {"train": 2, "val": 1, "test": 2}
    assert got.shared == {"train/test": {"speakers": 0, "clips": 0}, "val/test": {"speakers": 0, "clips": 0}}


def test_a_test_speaker_in_training_is_one_line_naming_speakers_and_clips():
    splits = _splits({"train": [1001, 1002, 1002], "val": [1003], "test": [1002, 1004]})
    with pytest.raises(DataError) as e:
        leakage.check(splits, PATTERN, False)
    assert str(e.value).startswith(
        "feats.pkl: 1 speaker(s) (1002) are in both the train and test splits, 3 clips: "
        "a speaker-dependent split"
    )


def test_allowed_overlap_is_recorded_per_pair_of_splits():
    splits = _splits({"train": [1001, 1002], "val": [1004], "test": [1002, 1004, 1005]})
    got = leakage.check(splits, PATTERN, True).as_dict()
    assert got["speaker_dependent"] is True and got["allow_speaker_overlap"] is True
    assert got["shared"] == {
        "train/test": {"speakers": 1, "clips": 2},
        "val/test": {"speakers": 1, "clips": 2},
    }


def test_clip_ids_without_a_speaker_are_reported_as_not_checked():
    splits = _splits({"train": [1001], "val": [1002], "test": [1003]})
    splits = replace(splits, test=replace(splits.test, clip_ids=("clip_without_speaker",)))
    got = leakage.check(splits, PATTERN, False)
    assert got.checked is False and got.as_dict()["speaker_dependent"] is False


def test_a_bad_pattern_is_one_config_error():
    with pytest.raises(ConfigError, match=r"data.speaker_pattern='\(': not a regular expression"):
        leakage.check(_splits({"train": [1001], "val": [1002], "test": [1003]}), "(", False)

"""Protocol files (data.split_file): a clip- or speaker-level CSV re-splits any dataset exactly as
it lists, its folds drive cv.folds, a bad file is one line naming the file, the line and the id,
and the shipped CREMA-D files work on the embedded data."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, compose_train, make_split, run_main, write_pickle
from mer_cli.core.errors import ConfigError, DataError
from mer_cli.data import folds, leakage, protocol
from mer_cli.data.load import load_data
from mer_cli.data.splits import NOTEBOOK_CLASS_NAMES, SPLIT_NAMES, Splits
from mer_cli.runs.execute import load_logged

PATTERN = leakage.CREMA_D_SPEAKER_PATTERN
CREMA_D = REPO / "protocols" / "crema-d"
EMOTIONS = ("NEU", "ANG", "HAP", "FEA", "DIS", "SAD")
# the data's own split: speakers per split
DATA = {"train": [1001, 1002, 1003], "val": [1004], "test": [1005]}


def crema_like(speakers_per_split: dict[str, list[int]]) -> Splits:
    """Clips named like CREMA-D's: every speaker has one clip of each of the 6 classes."""
    rng = np.random.default_rng(0)
    parts = {}
    for name, spk in speakers_per_split.items():
        split = make_split(name, 6 * len(spk), rng)  # labels 0..5 repeating: clip k has class k % 6
        ids = tuple(f"{s}_DFA_{EMOTIONS[k]}_XX" for s in spk for k in range(6))
        parts[name] = replace(split, clip_ids=ids)
    return Splits(parts["train"], parts["val"], parts["test"], NOTEBOOK_CLASS_NAMES, "feats.pkl")


def write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def split_of_clip(splits: Splits) -> dict[str, str]:
    return {c: s.name for s in splits.all() for c in s.clip_ids}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Re-splitting


def test_a_clip_level_file_reproduces_its_partition_and_moves_each_clips_frames(tmp_path):
    splits = crema_like(DATA)
    pooled = folds.pool(splits)
    # unrelated to the data's own split: of every 5 clips 3 train, 1 val, 1 test; 2 not listed
    wanted = {
        c: ("train", "train", "train", "val", "test")[i % 5] for i, c in enumerate(pooled.clip_ids[:-2])
    }
    path = write_csv(tmp_path / "p.csv", "clip,split", [f"{c},{s}" for c, s in wanted.items()])
    got = protocol.apply_splits(splits, protocol.read(path), PATTERN)
    assert split_of_clip(got) == wanted
    for s in got.all():  # in the pooled order, each clip with its own frames and label
        where = [pooled.clip_ids.index(c) for c in s.clip_ids]
        assert where == sorted(where)
        for j, i in enumerate(where):
            np.testing.assert_array_equal(s.mfcc[j], pooled.mfcc[i])
            np.testing.assert_array_equal(s.aus[j], pooled.aus[i])
            assert s.labels[j] == pooled.labels[i]
    assert got.protocol == {
        "path": str(path),
        "sha256": sha256(path),
        "by": "clip",
        "ids": 28,
        "folds": None,
        "clips": {"train": 18, "val": 5, "test": 5},  # i % 5 over the 28 listed
        "left_out": 2,
        "not_in_data": 0,
    }
    assert got.source == f"feats.pkl, split by {path} (sha256 {sha256(path)[:12]})"


def test_a_speaker_level_file_sends_every_clip_where_its_speaker_goes(tmp_path):
    plan = {1001: "test", 1002: "train", 1003: "val", 1004: "train", 1005: "train", 1999: "val"}
    path = write_csv(tmp_path / "p.csv", "speaker,split", [f"{k},{v}" for k, v in plan.items()])
    got = protocol.apply_splits(crema_like(DATA), protocol.read(path), PATTERN)
    for s in got.all():
        assert {int(c[:4]) for c in s.clip_ids} == {k for k, v in plan.items() if v == s.name and k != 1999}
    assert [len(s) for s in got.all()] == [18, 6, 6]
    assert got.protocol is not None
    assert (got.protocol["not_in_data"], got.protocol["left_out"]) == (1, 0)  # speaker 1999
    assert not leakage.check(got, PATTERN, False).speaker_dependent


def test_a_split_file_with_a_speaker_on_both_sides_is_refused_unless_allowed_then_recorded(tmp_path):
    pkl = write_pickle(tmp_path / "feats.pkl", crema_like(DATA))
    split = {1001: "train", 1002: "train", 1003: "train", 1004: "val", 1005: "test"}
    ids = [f"{s}_DFA_{e}_XX" for s in sorted(split) for e in EMOTIONS]
    # speaker 1001's neutral clip in test, its 5 others in train: one speaker on both sides
    rows = [f"{c},{'test' if c == '1001_DFA_NEU_XX' else split[int(c[:4])]}" for c in ids]
    path = write_csv(tmp_path / "p.csv", "clip,split", rows)
    given = ("data=pickle", f"data.path={pkl}", f"data.split_file={path}")
    with pytest.raises(
        DataError, match=r": 1 speaker\(s\) \(1001\) are in both the train and test splits, 6 clips"
    ):
        load_logged(compose_train(*given))
    record = load_logged(compose_train(*given, "data.allow_speaker_overlap=true")).speaker_check
    assert record is not None and record["speaker_dependent"] is True
    assert record["shared"]["train/test"] == {"speakers": 1, "clips": 6}  # 5 in train + 1 in test
    assert record["split_file"]["sha256"] == sha256(path)
    assert record["split_file"]["path"] == str(path)


def test_a_fold_column_drives_cv_folds_and_the_data_outside_the_file_is_left_out(tmp_path):
    data = {"train": [1001, 1002, 1003, 1004], "val": [1005], "test": [1006]}
    pkl = write_pickle(tmp_path / "feats.pkl", crema_like(data))
    fold = {1001: 0, 1002: 1, 1003: 2, 1004: 0, 1005: 1, 1006: 2}
    path = write_csv(tmp_path / "f.csv", "speaker,fold", [f"{k},{v}" for k, v in fold.items() if k != 1003])
    for k in range(3):
        got = load_data(
            compose_train(
                "data=pickle", f"data.path={pkl}", f"data.split_file={path}", "cv.folds=3", f"cv.fold={k}"
            ).data,
            compose_train("cv.folds=3", f"cv.fold={k}").cv,
        )
        speakers = {s.name: {int(c[:4]) for c in s.clip_ids} for s in got.all()}
        expected = {spk for spk, f in fold.items() if spk != 1003}
        assert speakers["test"] == {s for s in expected if fold[s] == k}
        assert speakers["val"] == {s for s in expected if fold[s] == (k + 1) % 3}
        assert speakers["train"] == expected - speakers["test"] - speakers["val"]
        assert got.protocol is not None and got.protocol["left_out"] == 6  # speaker 1003's clips
        assert got.source.endswith(f"cv fold {k + 1}/3 from the split file")


def test_folds_need_cv_folds_and_cv_folds_must_match_the_file(tmp_path):
    pkl = write_pickle(tmp_path / "feats.pkl", crema_like(DATA))
    path = write_csv(tmp_path / "f.csv", "speaker,fold", [f"{k},{k % 3}" for k in range(1001, 1006)])
    given = ("data=pickle", f"data.path={pkl}", f"data.split_file={path}")
    with pytest.raises(
        ConfigError, match=r"has a fold column only; use it with cv.folds=3, or add a split column"
    ):
        load_data(compose_train(*given).data, compose_train(*given).cv)
    cfg = compose_train(*given, "cv.folds=4", "cv.fold=0")
    with pytest.raises(
        ConfigError, match=r"cv.folds=4: data.split_file=.* has folds 0, 1, 2; cv.folds must match"
    ):
        load_data(cfg.data, cfg.cv)


def test_ids_the_data_lacks_are_ignored_but_a_file_matching_nothing_is_refused(tmp_path):
    path = write_csv(tmp_path / "p.csv", "speaker,split", ["2001,train", "2002,val", "2003,test"])
    with pytest.raises(DataError) as e:
        protocol.apply_splits(crema_like(DATA), protocol.read(path), PATTERN)
    assert str(e.value) == (
        f"{path}: none of its 3 speaker ids is in feats.pkl "
        "(the file's first: '2001'; the data's first: '1001')"
    )


def test_a_split_left_empty_by_the_file_is_refused(tmp_path):
    path = write_csv(tmp_path / "p.csv", "speaker,split", ["1001,train", "1002,train", "1003,test"])
    with pytest.raises(DataError, match=r"p.csv: puts no clip of feats.pkl in the val split$"):
        protocol.apply_splits(crema_like(DATA), protocol.read(path), PATTERN)


def test_clip_ids_repeated_across_the_datas_splits_cannot_be_re_split_by_id(tmp_path):
    splits = crema_like(DATA)
    splits = replace(
        splits, test=replace(splits.test, clip_ids=("1001_DFA_NEU_XX", *splits.test.clip_ids[1:]))
    )
    path = write_csv(tmp_path / "p.csv", "speaker,split", ["1001,train"])
    with pytest.raises(DataError, match=r"clip id '1001_DFA_NEU_XX' is in more than one split"):
        protocol.apply_splits(splits, protocol.read(path), PATTERN)


# ---------------------------------------------------------------------------------------------
# Malformed files: one line naming the file, the line and the id


BAD_FILES = {
    "unknown_split": (
        "clip,split",
        ["a,train", "b,dev"],
        r"p.csv:3: clip 'b': split 'dev' is not one of train, val, test",
    ),
    "repeated_id": (
        "speaker,split",
        ["1001,train", "1002,val", "1001,test"],
        r"p.csv:4: speaker '1001' is listed twice \(first on line 2\)",
    ),
    "short_row": ("clip,split", ["a,train", "b"], r"p.csv:3: 1 field\(s\), the header has 2 \(clip,split\)"),
    "bad_fold": ("clip,fold", ["a,0", "b,one"], r"p.csv:3: clip 'b': fold 'one' is not a whole number"),
    "negative_fold": ("clip,fold", ["a,-1"], r"p.csv:2: clip 'a': fold '-1' is not a whole number"),
    "empty_id": ("clip,split", [",train"], r"p.csv:2: empty clip"),
    "unknown_column": ("clip,split,notes", ["a,train,x"], r"p.csv:1: unknown column 'notes' in the header"),
    "no_key": ("split,fold", ["train,0"], r"p.csv: the header names neither 'clip' nor 'speaker'"),
    "both_keys": ("clip,speaker,split", ["a,1,train"], r"p.csv: the header names both 'clip' and 'speaker'"),
    "no_assignment": ("clip", ["a"], r"p.csv: the header has no 'split' or 'fold' column"),
    "header_only": ("clip,split", [], r"p.csv: a header and no rows"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_a_malformed_split_file_is_one_line_naming_file_line_and_id(tmp_path, case):
    header, rows, pattern = BAD_FILES[case]
    path = write_csv(tmp_path / "p.csv", header, rows)
    with pytest.raises(DataError) as e:
        protocol.read(path)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)
    assert re.search(pattern, str(e.value)), str(e.value)


def test_an_empty_or_missing_split_file_is_one_line(tmp_path):
    (tmp_path / "empty.csv").write_text("\n\n")
    with pytest.raises(DataError, match=r"empty.csv: empty \(data.split_file needs a header"):
        protocol.read(tmp_path / "empty.csv")
    with pytest.raises(DataError, match=r"nope.csv: file not found \(data.split_file\)"):
        protocol.read(tmp_path / "nope.csv")


def test_blank_lines_spaces_case_and_a_byte_order_mark_are_accepted(tmp_path):
    path = tmp_path / "p.csv"
    path.write_bytes("\ufeffSpeaker , Split\n\n1001 , Train\n1002,val\n".encode())
    got = protocol.read(path)
    assert got.by == "speaker" and got.split_of == {"1001": "train", "1002": "val"}


# ---------------------------------------------------------------------------------------------
# The shipped CREMA-D protocol files


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_the_shipped_files_are_what_the_script_writes(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "crema_d_protocols.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    for name in ("speaker_split.csv", "speaker_5folds.csv"):
        assert (tmp_path / name).read_bytes() == (CREMA_D / name).read_bytes(), name
    split = read_rows(CREMA_D / "speaker_split.csv")
    assert [int(r["speaker"]) for r in split] == list(range(1001, 1092))  # CREMA-D's 91 actors
    assert [sum(r["split"] == s for r in split) for s in SPLIT_NAMES] == [63, 14, 14]


# the embedded generator with one clip per actor and class (240 clips, actors 1001-1040): quick
SMALL = "data.generator.clips_per_actor_per_class=1"


def test_the_speaker_split_file_splits_the_embedded_data_by_speaker():
    cfg = compose_train(SMALL, f"data.split_file={CREMA_D / 'speaker_split.csv'}")
    got = load_data(cfg.data, cfg.cv)
    split_of = {int(r["speaker"]): r["split"] for r in read_rows(CREMA_D / "speaker_split.csv")}
    for s in got.all():
        assert {int(c[:4]) for c in s.clip_ids} == {a for a in range(1001, 1041) if split_of[a] == s.name}
    assert sum(len(s) for s in got.all()) == 240  # every clip has its actor in the file
    assert got.protocol is not None and got.protocol["not_in_data"] == 51  # actors 1041-1091
    check = leakage.check(got, PATTERN, False)
    assert check.speakers == {"train": 28, "val": 6, "test": 6} and not check.speaker_dependent


def test_the_five_fold_file_tests_every_embedded_clip_once_with_its_speaker_never_in_training():
    path = CREMA_D / "speaker_5folds.csv"
    fold_of = {int(r["speaker"]): int(r["fold"]) for r in read_rows(path)}
    tested: list[str] = []
    for k in range(5):
        cfg = compose_train(SMALL, f"data.split_file={path}", "cv.folds=5", f"cv.fold={k}")
        got = load_data(cfg.data, cfg.cv)
        assert {int(c[:4]) for c in got.test.clip_ids} == {a for a in range(1001, 1041) if fold_of[a] == k}
        assert {int(c[:4]) for c in got.val.clip_ids} == {
            a for a in range(1001, 1041) if fold_of[a] == (k + 1) % 5
        }
        assert not leakage.check(got, PATTERN, False).speaker_dependent
        tested += got.test.clip_ids
    assert len(tested) == len(set(tested)) == 240


# ---------------------------------------------------------------------------------------------
# As a user sees it


@pytest.mark.slow
def test_mer_train_with_a_split_file_records_it_and_a_bad_one_is_one_line(tmp_path):
    bad = write_csv(tmp_path / "bad.csv", "speaker,split", ["1001,train", "1002,holdout"])
    run_dir = tmp_path / "run"
    args = ("train", "experiment=smoke", SMALL, "modality=visual", "runtime.save_plots=false")
    proc = run_main(*args, f"data.split_file={bad}", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"mer-train: error: {bad}:3: speaker '1002': split 'holdout' is not one of train, val, test"
    ]
    assert not run_dir.exists()
    good = CREMA_D / "speaker_split.csv"
    proc = run_main(*args, f"data.split_file={good}", "runtime.num_threads=1", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr
    run = json.loads((run_dir / "metrics.json").read_text())["run"]
    assert run["speakers"]["split_file"]["sha256"] == sha256(good)
    assert run["speakers"]["split_file"]["clips"] == {"train": 168, "val": 36, "test": 36}  # 28/6/6 actors
    assert run["data"].endswith(f"split by {good} (sha256 {sha256(good)[:12]})")
    # then experiment=smoke keeps 48 clips per split (stratified): 8 of the 28 training actors
    assert run["speakers"]["speakers"] == {"train": 8, "val": 6, "test": 6}
    assert not run["speakers"]["speaker_dependent"]

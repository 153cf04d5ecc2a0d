"""Bring your own data: every bad or hostile file is refused with one line naming where and what.

Function-level tests check the error text of `load_pickle` / `load_npz`; the CLI tests run
mer-train / mer-convert as a user would and check the exit code, the one stderr line and that no
run directory is left behind.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import run_main
from mer_cli.core.errors import DataError
from mer_cli.data import synthetic
from mer_cli.data.notebook_pickle import load as load_pickle
from mer_cli.data.npz import NPZ_FORMAT_VERSION, load_npz, save_npz
from mer_cli.data.splits import NOTEBOOK_CLASS_NAMES, SPLIT_NAMES

N_CLASSES = 6


def make_raw(clips_per_class: int = 2, seed: int = 0) -> dict[str, dict[str, Any]]:
    """A valid notebook-style mapping: 6 classes in every split, 52-dim mfcc, 17-dim aus."""
    rng = np.random.default_rng(seed)
    raw: dict[str, dict[str, Any]] = {}
    for split in SPLIT_NAMES:
        raw[split] = {}
        for label in range(N_CLASSES):
            for k in range(clips_per_class):
                clip_id = f"{split}_{label}_{k}"
                mfcc = rng.normal(size=(int(rng.integers(20, 40)), 52)).astype(np.float32)
                aus = rng.normal(size=(int(rng.integers(5, 12)), 17)).astype(np.float32)
                raw[split][clip_id] = (mfcc, aus, label)
    return raw


def write_pickle(path: Path, obj: Any, protocol: int = pickle.HIGHEST_PROTOCOL) -> Path:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


def set_clip(raw: dict, split: str, clip_id: str, index: int, value: Any) -> dict:
    item = list(raw[split][clip_id])
    item[index] = value
    raw[split][clip_id] = tuple(item)
    return raw


# ---------------------------------------------------------------------------------------------
# Safe loading


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_numpy_pickles_of_every_protocol_load_with_their_values(tmp_path, protocol):
    raw = make_raw(clips_per_class=1)
    raw["train"]["train_0_0"] = (
        raw["train"]["train_0_0"][0].astype(np.float64),  # float64 arrays are read as float32
        raw["train"]["train_0_0"][1],
        np.int64(0),  # numpy scalars as labels, as a notebook would store them
    )
    raw["meta"] = {"sets": {1, 2}, "frozen": frozenset({"a"}), "z": complex(1, 2)}  # ignored, but readable
    path = write_pickle(tmp_path / "f.pkl", raw, protocol)
    splits = load_pickle(path)
    assert splits.class_names == NOTEBOOK_CLASS_NAMES
    assert [len(s) for s in splits.all()] == [6, 6, 6]
    i = splits.train.clip_ids.index("train_0_0")
    np.testing.assert_array_equal(splits.train.mfcc[i], raw["train"]["train_0_0"][0].astype(np.float32))
    np.testing.assert_array_equal(splits.test.aus[5], raw["test"]["test_5_0"][1])
    assert splits.train.labels.tolist() == [0, 1, 2, 3, 4, 5]


def test_pickles_written_by_numpy_1_load(tmp_path):
    # numpy 1.x (the notebook's era) names numpy.core.multiarray where numpy 2 names numpy._core
    raw = make_raw(clips_per_class=1)
    old = pickle.dumps(raw, protocol=2).replace(b"numpy._core.", b"numpy.core.")
    assert b"numpy.core.multiarray" in old
    path = tmp_path / "numpy1.pkl"
    path.write_bytes(old)
    splits = load_pickle(path)
    np.testing.assert_array_equal(splits.val.mfcc[2], raw["val"]["val_2_0"][0])


class _CreatesFile:
    """Unpickling this calls os.system: a file appears if the loader ever runs it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


class _Evals:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize("payload", [_CreatesFile, _Evals])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, protocol, payload):
    marker = tmp_path / "pwned"
    raw = make_raw(clips_per_class=1)
    raw["train"]["train_0_0"] = (payload(marker), raw["train"]["train_0_0"][1], 0)
    path = write_pickle(tmp_path / "evil.pkl", raw, protocol)
    with pytest.raises(
        DataError,
        match=r"evil\.pkl: not a usable pickle: refused to load (posix\.system|builtins\.eval)",
    ):
        load_pickle(path)
    assert not marker.exists()


def test_codecs_encode_in_a_pickle_only_decodes_latin1_text(tmp_path):
    # protocols 0-2 spell bytes as _codecs.encode(text, "latin1"); any other codec is refused
    evil = b"c_codecs\nencode\n(Vabc\nVrot13\ntR."
    path = tmp_path / "x.pkl"
    path.write_bytes(evil)
    with pytest.raises(DataError, match="only latin1 text is allowed"):
        load_pickle(path)


# ---------------------------------------------------------------------------------------------
# One test per bad input: the file, the split, the clip and the problem in one line


def _file_cases(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    good = pickle.dumps(make_raw())
    cases: dict[str, tuple[Path, str]] = {}
    cases["missing"] = (tmp_path / "nope.pkl", r"nope\.pkl: file not found")
    (tmp_path / "text.pkl").write_text("clip,label\n1001_DFA_ANG_XX,1\n")
    cases["not_a_pickle"] = (tmp_path / "text.pkl", r"text\.pkl: not a (usable )?pickle")
    (tmp_path / "cut.pkl").write_bytes(good[: len(good) // 2])
    cases["truncated"] = (tmp_path / "cut.pkl", r"cut\.pkl: not a (usable )?pickle.*truncated")
    (tmp_path / "empty.pkl").write_bytes(b"")
    cases["empty_file"] = (tmp_path / "empty.pkl", r"empty\.pkl: not a pickle or truncated")
    (tmp_path / "adir.pkl").mkdir()
    cases["directory"] = (tmp_path / "adir.pkl", r"adir\.pkl: not a file")
    cases["not_a_dict"] = (write_pickle(tmp_path / "list.pkl", [1, 2]), r"list\.pkl: expected a dict")
    return cases


@pytest.mark.parametrize(
    "case", ["missing", "not_a_pickle", "truncated", "empty_file", "directory", "not_a_dict"]
)
def test_unreadable_file_is_one_error_naming_it(tmp_path, case):
    path, pattern = _file_cases(tmp_path)[case]
    with pytest.raises(DataError, match=pattern) as e:
        load_pickle(path)
    assert "\n" not in str(e.value)


def _bad_raw(case: str) -> tuple[dict, str]:
    raw = make_raw()
    if case == "missing_split":
        del raw["val"]
        return raw, r"split 'val' is missing \(found: \['test', 'train'\]\)"
    if case == "empty_split":
        raw["test"] = {}
        return raw, r"split 'test' is empty"
    if case == "wrong_arity":
        raw["val"]["val_3_1"] = raw["val"]["val_3_1"][:2]
        return raw, r"val/val_3_1: expected a tuple \(mfcc, action_units, label\), found 2 items"
    if case == "not_numeric":
        return set_clip(
            raw, "train", "train_2_0", 0, np.array([["a", "b"]])
        ), r"train/train_2_0: mfcc is not numeric"
    if case == "ragged":
        return set_clip(
            raw, "train", "train_2_0", 1, [[1.0, 2.0], [3.0]]
        ), r"train/train_2_0: action_units is not a numeric"
    if case == "not_2d":
        return set_clip(
            raw, "test", "test_1_0", 0, np.zeros(52)
        ), r"test/test_1_0: mfcc must be 2-D .*found shape \(52,\)"
    if case == "feature_size":
        return (
            set_clip(raw, "val", "val_4_0", 1, np.zeros((8, 16))),
            r"val/val_4_0: action_units has 16 features per frame, but train/train_0_0 has 17",
        )
    if case == "zero_length":
        return set_clip(
            raw, "train", "train_5_1", 0, np.zeros((0, 52))
        ), r"train/train_5_1: mfcc has 0 frames"
    if case == "nan":
        bad = raw["train"]["train_1_0"][0].copy()
        bad[3, 7] = np.nan
        return set_clip(raw, "train", "train_1_0", 0, bad), (
            r"train/train_1_0: NaN or infinite values in 1 clip\(s\) \(train_1_0\); set data.nan_policy"
        )
    if case == "inf":
        bad = raw["test"]["test_0_1"][1].copy()
        bad[0, 0] = np.inf
        return set_clip(raw, "test", "test_0_1", 1, bad), r"test/test_0_1: NaN or infinite values"
    if case == "label_float":
        return set_clip(raw, "train", "train_3_0", 2, 2.5), r"train/train_3_0: label 2.5 is not an integer"
    if case == "label_string":
        return set_clip(
            raw, "train", "train_3_0", 2, "anger"
        ), r"train/train_3_0: label 'anger' is not an integer"
    if case == "label_outside":
        return (
            set_clip(raw, "val", "val_0_0", 2, 7),
            r"val/val_0_0: label 7 is outside the 6 classes \(0\.\.5: neutral, anger",
        )
    if case == "label_negative":
        return set_clip(raw, "test", "test_2_0", 2, -1), r"test/test_2_0: label -1 is outside"
    if case == "class_absent_from_train":
        for k in range(2):
            set_clip(raw, "train", f"train_4_{k}", 2, 3)
        return raw, r"train: no clip of class 4 \(disgust\); every class needs training clips"
    if case == "clip_in_two_splits":
        raw["test"]["train_2_1"] = raw["train"]["train_2_1"]
        # not a reader's error: mer-train's leakage check refuses it (tests/datasets/test_duplicates.py)
        return raw, r"the train and test splits repeat clips: 1 clip id\(s\) in both \(train_2_1\)"
    raise AssertionError(case)


BAD_RAW = [
    "missing_split",
    "empty_split",
    "wrong_arity",
    "not_numeric",
    "ragged",
    "not_2d",
    "feature_size",
    "zero_length",
    "nan",
    "inf",
    "label_float",
    "label_string",
    "label_outside",
    "label_negative",
    "class_absent_from_train",
]


@pytest.mark.parametrize("case", BAD_RAW)
def test_bad_content_is_one_error_naming_file_split_clip_and_problem(tmp_path, case):
    raw, pattern = _bad_raw(case)
    path = write_pickle(tmp_path / "features.pkl", raw)
    with pytest.raises(DataError) as e:
        load_pickle(path)
    message = str(e.value)
    assert message.startswith(f"{path}: ")
    assert "\n" not in message
    assert re.search(pattern, message), message


def test_each_format_given_to_the_other_reader_says_which_to_use(tmp_path):
    pkl = write_pickle(tmp_path / "f.pkl", make_raw())
    npz = save_npz(load_pickle(pkl), tmp_path / "f.npz")
    with pytest.raises(DataError, match=r"f\.npz: a zip \(\.npz\) file, not a pickle: use data=npz"):
        load_pickle(npz)
    with pytest.raises(
        DataError, match=r"f\.pkl: not an \.npz file \(no zip header\): it looks like a pickle"
    ):
        load_npz(pkl)


def test_configured_class_names_bound_the_labels(tmp_path):
    path = write_pickle(tmp_path / "f.pkl", make_raw())
    with pytest.raises(
        DataError, match=r"label 4 is outside the 4 classes \(0\.\.3: a, b, c, d; see data\.class_names\)"
    ):
        load_pickle(path, class_names=["a", "b", "c", "d"])
    assert load_pickle(path, class_names=list("abcdef")).class_names == tuple("abcdef")


def test_nan_policy_zero_keeps_the_clip_and_warns_with_a_count(tmp_path, caplog):
    raw, _ = _bad_raw("nan")
    path = write_pickle(tmp_path / "f.pkl", raw)
    with caplog.at_level(logging.WARNING):
        splits = load_pickle(path, nan_policy="zero")
    i = splits.train.clip_ids.index("train_1_0")
    assert splits.train.mfcc[i][3, 7] == 0.0
    assert len(splits.train) == 12
    assert "zeroed NaN/inf values in 1 clip(s): train_1_0" in caplog.text


def test_nan_policy_drop_removes_the_clip_and_warns_with_a_count(tmp_path, caplog):
    raw, _ = _bad_raw("nan")
    path = write_pickle(tmp_path / "f.pkl", raw)
    with caplog.at_level(logging.WARNING):
        splits = load_pickle(path, nan_policy="drop")
    assert "train_1_0" not in splits.train.clip_ids
    assert len(splits.train) == 11
    assert "dropped 1 clip(s) with NaN/inf values: train_1_0" in caplog.text


def test_unknown_nan_policy_lists_the_valid_ones(tmp_path):
    with pytest.raises(DataError, match=r"data\.nan_policy='skip': must be one of error, zero, drop"):
        load_pickle(write_pickle(tmp_path / "f.pkl", make_raw()), nan_policy="skip")


# ---------------------------------------------------------------------------------------------
# The native .npz format


def test_npz_round_trip_keeps_every_clip_label_and_name(tmp_path):
    splits = load_pickle(write_pickle(tmp_path / "f.pkl", make_raw()), class_names=list("abcdef"))
    path = save_npz(splits, tmp_path / "f.npz")
    back = load_npz(path)
    assert back.class_names == tuple("abcdef")
    for a, b in zip(splits.all(), back.all(), strict=True):
        assert a.clip_ids == b.clip_ids
        assert a.labels.tolist() == b.labels.tolist()
        for x, y in zip([*a.mfcc, *a.aus], [*b.mfcc, *b.aus], strict=True):
            np.testing.assert_array_equal(x, y)
    with np.load(path, allow_pickle=False) as npz:  # plain arrays only: readable without pickle
        assert int(npz["format_version"]) == NPZ_FORMAT_VERSION
        assert npz["train.mfcc_offsets"][-1] == npz["train.mfcc"].shape[0]


def _npz_arrays(tmp_path: Path) -> dict[str, np.ndarray]:
    splits = load_pickle(write_pickle(tmp_path / "f.pkl", make_raw()))
    with np.load(save_npz(splits, tmp_path / "good.npz")) as npz:
        return {k: npz[k] for k in npz.files}


@pytest.mark.parametrize(
    ("case", "pattern"),
    [
        ("pickled_objects", r"bad\.npz: holds pickled objects"),
        ("not_zip", r"bad\.npz: not an \.npz file \(no zip header\)"),
        ("truncated", r"bad\.npz: not an \.npz file or truncated"),
        ("version", r"bad\.npz: format_version 99 is not supported"),
        ("no_version", r"bad\.npz: missing array 'format_version'"),
        ("missing_split", r"bad\.npz: split 'val' is missing"),
        ("bad_offsets", r"bad\.npz: train: mfcc_offsets must rise from 0"),
        ("nan", r"bad\.npz: test/test_0_0: NaN or infinite values"),
        ("duplicate_clip", r"bad\.npz: val/val_0_0: clip id appears twice"),
    ],
)
def test_bad_npz_is_one_error_naming_it(tmp_path, case, pattern):
    arrays = _npz_arrays(tmp_path)
    path = tmp_path / "bad.npz"
    if case == "pickled_objects":
        arrays["class_names"] = np.array([{"x": 1}] * 6, dtype=object)
    elif case == "version":
        arrays["format_version"] = np.array(99)
    elif case == "no_version":
        del arrays["format_version"]
    elif case == "missing_split":
        arrays = {k: v for k, v in arrays.items() if not k.startswith("val.")}
    elif case == "bad_offsets":
        arrays["train.mfcc_offsets"] = arrays["train.mfcc_offsets"][::-1].copy()
    elif case == "nan":
        arrays["test.mfcc"][0, 0] = np.nan
    elif case == "duplicate_clip":
        arrays["val.clip_ids"][1] = arrays["val.clip_ids"][0]
    if case == "not_zip":
        path.write_text("not a zip")
    elif case == "truncated":
        np.savez(path, **arrays)
        path.write_bytes(path.read_bytes()[:500])
    else:
        np.savez(path, **arrays)
    with pytest.raises(DataError, match=pattern) as e:
        load_npz(path)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# As a user sees it: mer-train / mer-convert


def synthetic_pickle(path: Path) -> Path:
    """The embedded dataset as the notebook's pickle (learnable, so metrics mean something)."""
    splits = synthetic.generate(synthetic.Spec(n_actors=12, clips_per_actor_per_class=2))
    raw = {
        s.name: {c: (m, a, int(y)) for c, m, a, y in zip(s.clip_ids, s.mfcc, s.aus, s.labels, strict=True)}
        for s in splits.all()
    }
    return write_pickle(path, raw)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing", "truncated", "nan", "clip_in_two_splits", "malicious"])
def test_mer_train_refuses_bad_data_with_one_line_and_leaves_no_run_dir(tmp_path, case):
    marker = tmp_path / "pwned"
    if case == "missing":
        path, pattern = tmp_path / "nope.pkl", "file not found"
    elif case == "truncated":
        path, pattern = _file_cases(tmp_path)["truncated"][0], "truncated"
    elif case == "malicious":
        raw = make_raw()
        raw["val"]["val_0_0"] = (_CreatesFile(marker), raw["val"]["val_0_0"][1], 0)
        path, pattern = write_pickle(tmp_path / "evil.pkl", raw), "refused to load posix.system"
    else:
        raw, pattern = _bad_raw(case)
        path = write_pickle(tmp_path / "features.pkl", raw)
        pattern = pattern.split(": ")[0].replace("\\", "")  # the split/clip it names
    run_dir = tmp_path / "run"
    result = run_main(
        "train", "experiment=smoke", "data=pickle", f"data.path={path}", f"hydra.run.dir={run_dir}"
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"mer-train: error: {path}: ")
    assert pattern in lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    assert not run_dir.exists()
    assert not marker.exists()


@pytest.mark.slow
def test_mer_debug_shows_the_traceback(tmp_path):
    run_dir = tmp_path / "run"
    result = run_main(
        "train",
        "data=pickle",
        f"data.path={tmp_path / 'nope.pkl'}",
        f"hydra.run.dir={run_dir}",
        env={"MER_DEBUG": "1"},
    )
    assert result.returncode != 0
    assert "Traceback" in result.stderr
    assert "DataError" in result.stderr
    assert not run_dir.exists()


@pytest.mark.slow
def test_data_pickle_without_a_path_is_one_line(tmp_path):
    result = run_main("train", "data=npz", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "mer-train: error: data=npz needs data.path=FILE "
        "(a native dataset written by mer-convert or mer-ingest)"
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_pickle_to_npz_to_training_gives_the_same_metrics(tmp_path):
    pkl = synthetic_pickle(tmp_path / "features.pkl")
    npz = tmp_path / "features.npz"
    converted = run_main("convert", str(pkl), str(npz))
    assert converted.returncode == 0, converted.stderr
    assert f"wrote {npz}: " in converted.stdout
    metrics = {}
    for name, path in (("pickle", pkl), ("npz", npz)):
        run_dir = tmp_path / name
        result = run_main(
            "train",
            "experiment=smoke",
            "runtime.num_threads=1",  # tiny model: one thread is fastest, even on a busy machine
            "modality=visual",  # the shortest sequences: the fastest model to train
            "runtime.save_plots=false",
            f"data={name}",
            f"data.path={path}",
            f"hydra.run.dir={run_dir}",
        )
        assert result.returncode == 0, result.stderr
        metrics[name] = json.loads((run_dir / "metrics.json").read_text())
    for split in ("val", "test"):
        assert metrics["npz"][split] == metrics["pickle"][split]
    assert metrics["npz"]["run"]["data"] == str(npz)


@pytest.mark.slow
def test_mer_convert_refuses_a_bad_pickle_and_writes_nothing(tmp_path):
    raw, _ = _bad_raw("zero_length")
    pkl = write_pickle(tmp_path / "features.pkl", raw)
    result = run_main("convert", str(pkl), str(tmp_path / "out.npz"))
    assert result.returncode == 2
    assert result.stderr.strip() == f"mer-convert: error: {pkl}: train/train_5_1: mfcc has 0 frames"
    assert list(tmp_path.iterdir()) == [pkl]

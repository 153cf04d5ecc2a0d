"""Speaker identity per clip: the native formats' speaker field (written by mer-ingest and
mer-convert, read back, optional so older files load), and data.speaker_file; the speaker check
and cross-validation by actor use them instead of parsing clip ids."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from conftest import compose_train, ingest_folder, make_folder, make_split, write_pickle
from mer_cli.core.errors import DataError
from mer_cli.data import folds, leakage, native, speakers
from mer_cli.data.npz import load_npz, save_npz
from mer_cli.data.splits import NOTEBOOK_CLASS_NAMES, Splits
from mer_cli.reporting.collect import collect
from mer_cli.runs import execute, outputs
from mer_cli.runs.execute import load_logged

PATTERN = leakage.CREMA_D_SPEAKER_PATTERN


def with_speakers() -> Splits:
    """Clip ids that name no speaker (``train_0``) and speakers stored per clip: s1-s4 in train,
    s5 in val, s6 in test."""
    rng = np.random.default_rng(0)
    parts = {}
    for name, spk in (("train", ["s1", "s2", "s3", "s4"]), ("val", ["s5"]), ("test", ["s6"])):
        split = make_split(name, 6 * len(spk), rng)
        parts[name] = replace(split, speakers=tuple(s for s in spk for _ in range(6)))
    return Splits(parts["train"], parts["val"], parts["test"], NOTEBOOK_CLASS_NAMES, "feats")


def test_take_limit_and_pooling_carry_each_clips_speaker():
    splits = with_speakers()
    taken = splits.train.take([23, 0, 7])
    assert taken.speakers == ("s4", "s1", "s2")
    speaker_of = dict(zip(splits.train.clip_ids, splits.train.speakers or (), strict=True))
    limited = splits.limit(5)
    assert limited.train.speakers == tuple(speaker_of[c] for c in limited.train.clip_ids)
    pooled = folds.pool(splits)
    assert (
        pooled.speakers == ("s1",) * 6 + ("s2",) * 6 + ("s3",) * 6 + ("s4",) * 6 + ("s5",) * 6 + ("s6",) * 6
    )
    unknown = replace(splits, val=replace(splits.val, speakers=None))
    assert folds.pool(unknown).speakers is None  # known only when every split knows them


@pytest.mark.parametrize("fmt", ["npz", "native"])
def test_the_native_formats_round_trip_the_speaker_field(tmp_path, fmt):
    splits = with_speakers()
    if fmt == "npz":
        back = load_npz(save_npz(splits, tmp_path / "d.npz"))
    else:
        back = native.load_dir(native.save_dir(splits, tmp_path / "d"))
    for a, b in zip(splits.all(), back.all(), strict=True):
        assert b.clip_ids == a.clip_ids and b.speakers == a.speakers


def test_speakers_follow_their_clips_when_nan_policy_drops_some(tmp_path):
    splits = with_speakers()
    bad = [np.array(x) for x in splits.train.mfcc]
    bad[2][0, 0] = np.nan  # train_2, speaker s1
    train = replace(splits.train, mfcc=tuple(bad))
    back = load_npz(save_npz(replace(splits, train=train), tmp_path / "d.npz"), nan_policy="drop")
    assert "train_2" not in back.train.clip_ids
    assert back.train.speakers == tuple(s for i, s in enumerate(splits.train.speakers or ()) if i != 2)


def test_datasets_without_the_field_still_load_and_the_check_parses_the_ids(tmp_path):
    rng = np.random.default_rng(1)
    parts = [
        replace(make_split(n, 6, rng), clip_ids=tuple(f"{1001 + k}_DFA_NEU_{i}" for i in range(6)))
        for k, n in enumerate(("train", "val", "test"))
    ]
    old = Splits(*parts, class_names=NOTEBOOK_CLASS_NAMES, source="old")
    directory = native.save_dir(old, tmp_path / "d")
    assert not any(directory.glob("*/speakers.npy"))  # nothing known, nothing written
    for back in (native.load_dir(directory), load_npz(save_npz(old, tmp_path / "d.npz"))):
        assert all(s.speakers is None for s in back.all())
        got = leakage.check(back, PATTERN, False)
        assert got.checked and got.speakers_from == "pattern"
        assert got.speakers == {"train": 1, "val": 1, "test": 1}


def test_a_stored_speaker_on_both_sides_is_refused_though_the_ids_name_none(tmp_path):
    splits = with_speakers()
    test = replace(splits.test, speakers=("s6",) * 5 + ("s1",))
    with pytest.raises(DataError) as e:
        leakage.check(replace(splits, test=test), PATTERN, False)
    assert "1 speaker(s) (s1) are in both the train and test splits, 7 clips" in str(e.value)
    assert "(the data's speaker per clip)" in str(e.value)
    got = leakage.check(splits, PATTERN, False)
    assert got.checked and got.speakers_from == "data" and got.speakers == {"train": 4, "val": 1, "test": 1}


def test_a_bad_speaker_field_is_one_line(tmp_path):
    directory = native.save_dir(with_speakers(), tmp_path / "d")
    np.save(directory / "val" / "speakers.npy", np.array(["s5"] * 3))
    with pytest.raises(DataError, match=r"d: val: speakers.npy: expected 6 speaker names \(strings\)"):
        native.load_dir(directory)


def test_cross_validation_by_actor_uses_the_stored_speakers():
    splits = with_speakers()  # ids name no actor: only the stored speakers can group the clips
    for k in range(3):
        fold = folds.split(splits, 3, k, PATTERN)
        by_split = {s.name: set(s.speakers or ()) for s in fold.all()}
        assert not by_split["train"] & by_split["test"] and not by_split["val"] & by_split["test"]
        assert sum(len(s) for s in fold.all()) == 36


# ---------------------------------------------------------------------------------------------
# data.speaker_file


def pickle_and_speaker_file(tmp_path, splits: Splits, extra: str = ""):
    """``splits`` as a notebook pickle (its ids name no speaker) and a data.speaker_file of their
    stored speakers (``extra``: more lines at its end); returns both paths and the file's rows."""
    pkl = write_pickle(tmp_path / "feats.pkl", splits)
    rows = [f"{c},{s}" for x in splits.all() for c, s in zip(x.clip_ids, x.speakers or (), strict=True)]
    mapping = tmp_path / "speakers.csv"
    mapping.write_text("clip,speaker\n" + "\n".join(rows) + "\n" + extra)
    return pkl, mapping, rows


def test_a_speaker_file_gives_every_clip_its_speaker_and_the_check_uses_them(tmp_path):
    splits = with_speakers()
    pkl, mapping, rows = pickle_and_speaker_file(tmp_path, splits, extra="unused_clip,s9\n")
    cfg = compose_train("data=pickle", f"data.path={pkl}", f"data.speaker_file={mapping}")
    loaded = load_logged(cfg)
    assert loaded.train.speakers == splits.train.speakers and loaded.test.speakers == splits.test.speakers
    record = loaded.speaker_check
    assert record is not None and record["checked"] and record["speakers_from"] == "data"
    # the same file with test's last clip spoken by s1: one speaker on both sides
    mapping.write_text("clip,speaker\n" + "\n".join(rows).replace("test_5,s6", "test_5,s1") + "\n")
    with pytest.raises(
        DataError, match=r"1 speaker\(s\) \(s1\) are in both the train and test splits, 7 clips"
    ):
        load_logged(cfg)


@pytest.mark.slow
def test_a_run_on_stored_speakers_writes_them_beside_its_predictions_and_the_report_groups_by_them(tmp_path):
    splits = with_speakers()
    pkl, mapping, _ = pickle_and_speaker_file(tmp_path, splits)
    out = tmp_path / "run"
    cfg = compose_train(
        "experiment=smoke",
        "modality=acoustic",
        "data=pickle",
        f"data.path={pkl}",
        f"data.speaker_file={mapping}",
        "trainer.loop.max_epochs=1",
        "runtime.save_plots=false",
    )
    execute.run(cfg, out)
    for split in (splits.val, splits.test):
        written = outputs.read_predictions(out / "predictions.csv", split.name)
        assert dict(zip(written.clip_ids, written.speakers or (), strict=True)) == dict(
            zip(split.clip_ids, split.speakers or (), strict=True)
        )
    (run,), _ = collect([out])
    assert set(run.groups) == {"s6"}  # the ids (test_0, ...) name no actor: the stored speaker


def test_a_clip_missing_from_the_speaker_file_is_one_line(tmp_path):
    mapping = tmp_path / "speakers.csv"
    mapping.write_text("clip,speaker\ntrain_0,s1\n")
    with pytest.raises(DataError) as e:
        speakers.with_speaker_file(with_speakers(), mapping)
    assert str(e.value) == (
        f"{mapping}: no speaker for 23 clip(s) of feats (train: train_1, train_2, train_3, ...); "
        "every clip needs one"
    )


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("clip,speaker\na,s1\na,s2\n", r"speakers.csv:3: clip 'a' is listed twice \(first on line 2\)"),
        ("clip,speaker\na,\n", r"speakers.csv:2: clip 'a' has an empty speaker"),
        ("clip,who\na,s1\n", r"speakers.csv:1: unknown column 'who'"),
        ("clip\na\n", r"speakers.csv: the header has no 'speaker' column"),
    ],
)
def test_a_malformed_speaker_file_is_one_line(tmp_path, text, pattern):
    (tmp_path / "speakers.csv").write_text(text)
    with pytest.raises(DataError, match=pattern):
        speakers.read_speaker_file(tmp_path / "speakers.csv")


# ---------------------------------------------------------------------------------------------
# mer-ingest


@pytest.mark.slow
def test_mer_ingest_stores_each_clips_actor_as_its_speaker(tmp_path):
    pytest.importorskip("librosa")
    audio, video = make_folder(tmp_path, n_actors=4)
    back, _ = ingest_folder(audio, video, tmp_path / "d.npz")
    for s in back.all():
        assert s.speakers == tuple(c.split("_")[0] for c in s.clip_ids)
    assert leakage.check(back, PATTERN, False).speakers_from == "data"

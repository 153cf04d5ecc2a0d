"""Per-frame validity masks in a dataset: mer-ingest stores what the face back-end measured
(a table's confidence column), the native directory and the .npz keep it frame for frame, every
slice of the data (limit, folds, protocol files, dropped NaN clips) keeps each clip's own mask,
and datasets without masks read and write as before."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from conftest import EMOTIONS, make_split, write_openface_csv, write_wav
from mer_cli.core.errors import DataError
from mer_cli.data import folds, formats, ingest, native, npz, protocol
from mer_cli.data.features import mfcc, openface, table
from mer_cli.data.splits import NOTEBOOK_CLASS_NAMES, SPLIT_NAMES, Split, Splits

THRESHOLD = 0.5


def masked_split(name: str, n: int, rng: np.random.Generator, prefix: str = "") -> Split:
    """``make_split``'s clips with a random visual mask each (at least one valid frame)."""
    split = make_split(name, n, rng, prefix=prefix)
    masks = []
    for length in split.aus.lengths:
        m = rng.random(int(length)) < 0.6
        m[int(rng.integers(length))] = True
        masks.append(m)
    return replace(split, valid={"visual": masks})


def masked_splits(seed: int = 0) -> Splits:
    rng = np.random.default_rng(seed)
    parts = [
        masked_split(s, n, rng, prefix=f"{1001 + k}_")
        for k, (s, n) in enumerate(zip(SPLIT_NAMES, (12, 6, 6), strict=True))
    ]
    return Splits(*parts, class_names=NOTEBOOK_CLASS_NAMES, source="masked")


def masks_by_clip(splits: Splits) -> dict[str, np.ndarray]:
    return {
        c: np.asarray(m) for s in splits.all() for c, m in zip(s.clip_ids, s.valid["visual"], strict=True)
    }


def assert_same_clips(a: Splits, b: Splits) -> None:
    for x, y in zip(a.all(), b.all(), strict=True):
        assert x.clip_ids == y.clip_ids
        for i in range(len(x)):
            np.testing.assert_array_equal(x.aus[i], y.aus[i])
            np.testing.assert_array_equal(x.valid["visual"][i], y.valid["visual"][i])


def test_a_native_directory_keeps_each_frames_validity(tmp_path):
    splits = masked_splits()
    back = native.load_dir(native.save_dir(splits, tmp_path / "d"))
    assert_same_clips(splits, back)
    stored = np.load(tmp_path / "d" / "train" / "aus_valid.npy")
    assert stored.dtype == np.uint8 and stored.shape == (int(splits.train.aus.lengths.sum()),)
    assert not (tmp_path / "d" / "train" / "mfcc_valid.npy").exists()  # no acoustic mask given
    assert set(back.train.valid) == {"visual"}


def test_an_npz_keeps_each_frames_validity(tmp_path):
    splits = masked_splits()
    back = npz.load_npz(npz.save_npz(splits, tmp_path / "d.npz"))
    assert_same_clips(splits, back)
    # and through mer-convert's other direction
    assert_same_clips(splits, native.load_dir(native.save_dir(back, tmp_path / "d")))


def test_a_dataset_without_masks_reads_and_writes_as_before(tiny_splits, tmp_path):
    folder = native.save_dir(tiny_splits, tmp_path / "d")
    assert sorted(p.name for p in (folder / "train").iterdir()) == [
        "aus.npy",
        "aus_offsets.npy",
        "clip_ids.npy",
        "labels.npy",
        "mfcc.npy",
        "mfcc_offsets.npy",
    ]
    assert native.load_dir(folder).train.valid is None
    assert npz.load_npz(npz.save_npz(tiny_splits, tmp_path / "d.npz")).test.valid is None
    assert "train.aus_valid" not in npz.read_npz_arrays(tmp_path / "d.npz")


def test_clips_written_before_the_first_mask_are_all_valid(tmp_path):
    rng = np.random.default_rng(1)
    writer = native.DatasetWriter(tmp_path / "d", ("a", "b"))
    clips = [(rng.standard_normal((4, 2)), rng.standard_normal((n, 3))) for n in (3, 4, 5, 6)]
    given = [None, None, np.array([1, 0, 1, 1, 0], bool), None]
    for k, ((a, v), m) in enumerate(zip(clips, given, strict=True)):
        writer.add("train" if k < 3 else "val", f"c{k}", a, v, k % 2, valid={"visual": m})
    assert writer.masked_streams == ["visual"] and writer.finish()
    back = native.load_dir(tmp_path / "d")
    got = [np.asarray(m) for s in (back.train, back.val) for m in s.valid["visual"]]
    want = [np.ones(3, bool), np.ones(4, bool), given[2], np.ones(6, bool)]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)
    assert np.load(tmp_path / "d" / "test" / "aus_valid.npy").shape == (0,)  # the empty split too


def test_a_mask_of_the_wrong_length_is_one_line_at_writing_and_at_reading(tmp_path):
    writer = native.DatasetWriter(tmp_path / "d", NOTEBOOK_CLASS_NAMES)
    with pytest.raises(
        DataError, match=r"train/c0: visual validity mask of bool \(4,\); expected 5 booleans"
    ):
        writer.add("train", "c0", np.zeros((3, 2)), np.zeros((5, 3)), 0, valid={"visual": np.ones(4, bool)})
    writer.abort()
    folder = native.save_dir(masked_splits(), tmp_path / "ok")
    path = folder / "val" / "aus_valid.npy"
    np.save(path, np.load(path)[:-1])
    with pytest.raises(DataError, match=r"val/aus_valid.npy: expected \d+ entries of 0 or 1"):
        native.load_dir(folder)


def test_every_slice_of_the_data_keeps_each_clips_own_mask(tmp_path):
    splits = masked_splits()
    want = masks_by_clip(splits)
    limited = splits.limit(4)
    refolded = folds.split(splits, 3, 1, folds.CREMA_D_ACTOR_PATTERN)
    swapped = {"train": "train", "val": "test", "test": "val"}  # val and test change places
    rows = [f"{c},{swapped[s.name]}" for s in splits.all() for c in s.clip_ids]
    (tmp_path / "p.csv").write_text("clip,split\n" + "\n".join(rows) + "\n")
    resplit = protocol.apply_splits(splits, protocol.read(tmp_path / "p.csv"), r"^(\d{4})_")
    for sliced in (limited, refolded, resplit):
        got = masks_by_clip(sliced)
        assert got and set(got) <= set(want)
        for clip, m in got.items():
            np.testing.assert_array_equal(m, want[clip])


def test_clips_dropped_for_nan_values_take_their_masks_with_them(tmp_path):
    splits = masked_splits()
    frames = [np.asarray(x).copy() for x in splits.train.aus]
    frames[3][0, 0] = np.nan
    path = npz.save_npz(replace(splits, train=replace(splits.train, aus=frames)), tmp_path / "d.npz")
    back = npz.load_npz(path, nan_policy="drop")
    assert len(back.train) == len(splits.train) - 1
    want = masks_by_clip(splits)
    for clip, m in masks_by_clip(back).items():
        np.testing.assert_array_equal(m, want[clip])


# ---------------------------------------------------------------------------------------------
# mer-ingest


def write_face_table(path: Path, n_frames: int, level: float, lost: tuple[int, ...]) -> np.ndarray:
    """A face toolkit's CSV: timestamp, confidence, three AU columns; the ``lost`` frames have
    confidence 0.1 and garbage values. Returns the (n_frames,) validity the table means."""
    valid = np.ones(n_frames, bool)
    valid[list(lost)] = False
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["timestamp", "confidence", "AU01_r", "AU02_r", "AU12_r"])
        for i in range(n_frames):
            aus = [level + j + 0.01 * i for j in range(3)] if valid[i] else [9e5, -9e5, 9e5]
            w.writerow([round(i / 30, 4), 0.95 if valid[i] else 0.1, *aus])
    return valid


def face_table_extractor(policy: str = "keep") -> table.Extractor:
    return table.Extractor(
        table.Settings(
            columns=("AU*_r",),
            timestamp_column="timestamp",
            confidence_column="confidence",
            confidence_threshold=THRESHOLD,
            invalid_frames=policy,
        )
    )


def make_table_folder(root: Path, n_actors: int = 5) -> tuple[Path, Path, dict[str, np.ndarray]]:
    audio, video = root / "wav", root / "faces"
    audio.mkdir(parents=True)
    video.mkdir(parents=True)
    valid = {}
    for a in range(n_actors):
        for label, code in enumerate(EMOTIONS):
            stem = f"{1001 + a}_DFA_{code}_XX"
            write_wav(audio / f"{stem}.wav", 0.5, 16000, 150.0 + 60 * label, seed=a * 10 + label)
            lost = tuple(int(i) for i in np.unique([(a + label) % 12, 3 + label, 14]))
            valid[stem] = write_face_table(video / f"{stem}.csv", 15, float(label), lost)
    return audio, video, valid


@pytest.mark.slow
@pytest.mark.parametrize("out", ["d", "d.npz"])
def test_mer_ingest_stores_the_confidence_columns_validity(tmp_path, out):
    pytest.importorskip("librosa")
    audio, video, valid = make_table_folder(tmp_path)
    extractors = {"acoustic": mfcc.Extractor(mfcc.Settings()), "visual": face_table_extractor()}
    done = ingest.write(tmp_path / out, audio, video, extractors, ingest.Names(), progress=False)
    assert done.record["visual"]["validity_mask"] is True and "validity_mask" not in done.record["acoustic"]
    splits = formats.read(tmp_path / out)
    assert splits.ingest_settings["visual"]["validity_mask"] is True
    got = masks_by_clip(splits)
    assert sorted(got) == sorted(valid)
    for clip, m in got.items():
        np.testing.assert_array_equal(m, valid[clip])
    # invalid_frames=keep: the stored values of a lost frame are the toolkit's garbage
    clip = splits.train.clip_ids[0]
    assert np.abs(splits.train.aus[0][~valid[clip]]).min() == 9e5


def test_mer_ingest_of_a_back_end_without_masks_stores_none(tmp_path):
    pytest.importorskip("librosa")
    audio, video, _ = make_table_folder(tmp_path)
    for p in video.glob("*.csv"):  # the same clips as OpenFace CSVs: openface gives no mask
        n = sum(1 for _ in p.open()) - 1
        write_openface_csv(p, n, level=1.0, failed=(2,))
    extractors = {
        "acoustic": mfcc.Extractor(mfcc.Settings()),
        "visual": openface.Extractor(openface.Settings()),
    }
    done = ingest.write(tmp_path / "d", audio, video, extractors, ingest.Names(), progress=False)
    assert "validity_mask" not in done.record["visual"]
    assert native.load_dir(tmp_path / "d").train.valid is None
    assert not list((tmp_path / "d").glob("*/*_valid.npy"))

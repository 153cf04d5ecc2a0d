"""mer-ingest: WAV files and OpenFace CSVs the tests generate -> a native dataset -> training."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from conftest import ingest_folder, make_folder, run_main, write_openface_csv, write_wav
from mer_cli.core.errors import ConfigError, DataError
from mer_cli.data import ingest
from mer_cli.data.features import mfcc, openface
from mer_cli.data.splits import NOTEBOOK_CLASS_NAMES

# ---------------------------------------------------------------------------------------------
# OpenFace CSVs (no audio library needed)


def test_au_frames_reads_spaced_headers_and_the_17_default_columns(tmp_path):
    path = tmp_path / "c.csv"
    write_openface_csv(path, 10, level=2.0)
    x = openface.read(path, openface.AU_COLUMNS, "drop")[0]
    assert x.shape == (10, 17)
    assert x[0, 0] == pytest.approx(2.0)
    assert x[5, 16] == pytest.approx(2.0 + 1.6 + 0.05)  # AU45_r, frame 5


@pytest.mark.parametrize(
    ("policy", "frames", "frame_3_au01"),
    [("drop", 8, 2.05), ("zero", 10, 0.0), ("interpolate", 10, 2.03)],
)
def test_failed_frames_follow_the_policy(tmp_path, policy, frames, frame_3_au01):
    path = tmp_path / "c.csv"
    write_openface_csv(path, 10, level=2.0, failed=(3, 4))  # AU01_r is 2 + 0.01 * frame when tracked
    x = openface.read(path, openface.AU_COLUMNS, policy)[0]
    assert x.shape == (frames, 17)
    assert x[3, 0] == pytest.approx(frame_3_au01)  # interpolate: as np.interp between frames 2 and 5


def test_configurable_au_columns_and_a_missing_one_is_named(tmp_path):
    path = tmp_path / "c.csv"
    write_openface_csv(path, 5, level=1.0)
    assert openface.read(path, ["AU12_r", "AU01_c"], "drop")[0].shape == (5, 2)
    with pytest.raises(ValueError, match="no column AU99_r"):
        openface.read(path, ["AU01_r", "AU99_r"], "drop")[0]


def test_a_face_never_tracked_is_refused(tmp_path):
    path = tmp_path / "c.csv"
    write_openface_csv(path, 4, level=1.0, failed=(0, 1, 2, 3))
    with pytest.raises(ValueError, match="tracked in no frame"):
        openface.read(path, openface.AU_COLUMNS, "interpolate")[0]


def test_names_give_actor_and_label_in_the_notebook_order():
    names = ingest.Names()
    assert names.class_names == NOTEBOOK_CLASS_NAMES
    assert names.parse("1091_TSI_DIS_HI") == ("1091", 4)
    assert names.parse("1091_TSI_XYZ_HI") == "emotion code 'XYZ' is not one of NEU, ANG, HAP, FEA, DIS, SAD"
    assert names.parse("readme") == "name does not match the pattern"
    custom = ingest.Names(r"(?P<actor>s\d+)-(?P<emotion>\w+)", {"calm": "calm", "angry": "anger"})
    assert custom.parse("s07-angry") == ("s07", 1)
    with pytest.raises(ConfigError, match="needs named groups"):
        ingest.Names(r"(\d+)_(\w+)")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_splits_are_actor_disjoint_seeded_and_sized_by_fraction(seed):
    actors = [str(1001 + a) for a in range(20) for _ in range(6)]
    split_of = ingest.split_actors(actors, val_fraction=0.15, test_fraction=0.25, seed=seed)
    assert sorted(split_of) == sorted(set(actors))  # one split per actor: none in two
    assert split_sizes(split_of) == {"train": 12, "val": 3, "test": 5}
    assert ingest.split_actors(actors, 0.15, 0.25, seed) == split_of  # same seed, same split
    with pytest.raises(DataError, match="need at least 3"):
        ingest.split_actors(["1", "2", "1"], 0.15, 0.15, seed)


def split_sizes(split_of: dict[str, str]) -> dict[str, int]:
    return {s: sum(v == s for v in split_of.values()) for s in ("train", "val", "test")}


# ---------------------------------------------------------------------------------------------
# WAV files (librosa, the ingest extra; part of the dev environment)


@pytest.mark.slow
def test_mfcc_frames_default_to_52_features_at_100_frames_per_second(tmp_path):
    pytest.importorskip("librosa")
    write_wav(tmp_path / "a.wav", 1.0, 16000, 220.0)
    write_wav(tmp_path / "b.wav", 1.0, 8000, 220.0)  # resampled to 16 kHz
    for name in ("a.wav", "b.wav"):
        x = mfcc.frames(tmp_path / name, mfcc.Settings())
        assert x.shape == (101, 52)  # 1 s every 10 ms, centred windows: 100 + 1 frames
        assert x.dtype == np.float32 and np.isfinite(x).all()
    x = mfcc.frames(tmp_path / "a.wav", mfcc.Settings(n_mfcc=13, delta_orders=2, hop_ms=20))
    assert x.shape == (51, 39)


@pytest.mark.slow
def test_build_pairs_splits_by_actor_and_reports_what_it_left_out(tmp_path):
    pytest.importorskip("librosa")
    audio, video = make_folder(tmp_path)
    write_wav(audio / "1001_DFA_ANG_HI.wav", 1.0, 16000, 200.0)  # no csv
    write_openface_csv(video / "1002_DFA_ANG_HI.csv", 30, level=1.0)  # no wav
    (audio / "1003_DFA_HAP_HI.wav").write_bytes(b"RIFF....not audio")
    write_openface_csv(video / "1003_DFA_HAP_HI.csv", 30, level=1.0)
    write_wav(audio / "notes.wav", 1.0, 16000, 200.0)
    write_openface_csv(video / "notes.csv", 30, level=1.0)

    splits, report = ingest_folder(audio, video, tmp_path / "d")

    assert [len(s) for s in splits.all()] == [24, 6, 6]  # 6 actors: 4 train, 1 val, 1 test
    actors = [{c.split("_")[0] for c in s.clip_ids} for s in splits.all()]
    assert not (actors[0] & actors[1] or actors[0] & actors[2] or actors[1] & actors[2])
    assert splits.class_names == NOTEBOOK_CLASS_NAMES
    assert {s.mfcc[0].shape[1] for s in splits.all()} == {52}
    assert {a.shape for a in splits.train.aus} == {(30, 17)}  # failed frames interpolated
    i = splits.train.clip_ids.index(next(c for c in splits.train.clip_ids if "_SAD_" in c))
    assert splits.train.labels[i] == 5
    assert report.unpaired == [
        "1001_DFA_ANG_HI.wav: no 1001_DFA_ANG_HI.* among the video files",
        "1002_DFA_ANG_HI.csv: no 1002_DFA_ANG_HI.* among the audio files",
    ]
    assert report.unlabelled == ["notes: name does not match the pattern"]
    assert len(report.unreadable) == 1 and report.unreadable[0].startswith("1003_DFA_HAP_HI.wav: ")
    table = ingest.summary(splits)
    assert table.splitlines()[-1].split() == ["total", "24", "6", "6"]


@pytest.mark.slow
def test_mer_ingest_then_mer_train_runs_end_to_end(tmp_path):
    pytest.importorskip("librosa")
    audio, video = make_folder(tmp_path, n_actors=5)
    out = tmp_path / "cremad.npz"
    result = run_main("ingest", str(out), "--audio", str(audio), "--video", str(video), "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-2].split() == ["total", "18", "6", "6"]
    assert (
        f"wrote {out}: 18 train, 6 val, 6 test clips; 52 acoustic (mfcc) and 17 visual (openface) "
        "features per frame" in result.stdout
    )

    run_dir = tmp_path / "run"
    trained = run_main(
        "train",
        "experiment=smoke",
        "runtime.num_threads=1",  # tiny model: one thread is fastest, even on a busy machine
        "modality=early",
        "runtime.save_plots=false",
        "data=npz",
        f"data.path={out}",
        f"hydra.run.dir={run_dir}",
    )
    assert trained.returncode == 0, trained.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["run"]["data"] == str(out)
    with (run_dir / "predictions.csv").open(newline="") as f:
        test = [(r["y_true"], r["y_pred"]) for r in csv.DictReader(f) if r["split"] == "test"]
    assert len(test) == metrics["test"]["n_clips"] > 0
    assert metrics["test"]["accuracy"] == pytest.approx(np.mean([t == p for t, p in test]))


@pytest.mark.slow
def test_mer_ingest_with_nothing_usable_is_one_error_line(tmp_path):
    (tmp_path / "wav").mkdir()
    (tmp_path / "csv").mkdir()
    write_openface_csv(tmp_path / "csv" / "1001_DFA_ANG_XX.csv", 5, level=1.0)
    result = run_main(
        "ingest",
        str(tmp_path / "o.npz"),
        "--audio",
        str(tmp_path / "wav"),
        "--video",
        str(tmp_path / "csv"),
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mer-ingest: error: ")
    assert "no clip with both an audio and a video file" in lines[0]
    assert not (tmp_path / "o.npz").exists()

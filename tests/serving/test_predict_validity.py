"""mer-predict on a run trained with validity masks: raw face tables with a confidence column
(lost frames holding garbage) give mer-evaluate's probabilities on the ingested copy, and the
probabilities of the same tables with those rows deleted; so does --data with a stored mask."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from conftest import EMOTIONS, compose_train, write_wav
from mer_cli.cli import predict as predict_cli
from mer_cli.data import ingest
from mer_cli.data.features import mfcc, table
from mer_cli.data.splits import NOTEBOOK_CLASS_NAMES
from mer_cli.runs import execute, outputs, trained
from mer_cli.runs.evaluate import evaluate_run

pytest.importorskip("librosa")  # the ingest extra: part of the dev environment

FACE_TABLE = table.Settings(
    columns=("AU*_r",),
    timestamp_column="timestamp",
    confidence_column="confidence",
    confidence_threshold=0.5,
    invalid_frames="keep",  # the toolkit's values stay: only the mask says they are garbage
)


def write_face_table(path: Path, n_frames: int, level: float, lost: set[int], keep_lost: bool = True) -> None:
    """Timestamp, confidence and three AU columns; the ``lost`` frames have confidence 0.1 and
    garbage values (``keep_lost=False``: those rows are not written at all)."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["timestamp", "confidence", "AU01_r", "AU02_r", "AU12_r"])
        for i in range(n_frames):
            if i in lost and not keep_lost:
                continue
            aus = [9e5, -9e5, 9e5] if i in lost else [level + 0.3 * j + 0.02 * i for j in range(3)]
            w.writerow([round(i / 30, 4), 0.1 if i in lost else 0.95, *aus])


def write_clips(root: Path, actors: range, keep_lost: bool = True) -> tuple[Path, Path]:
    audio, video = root / "wav", root / "faces"
    audio.mkdir(parents=True)
    video.mkdir(parents=True)
    for a in actors:
        for label, code in enumerate(EMOTIONS):
            stem = f"{a}_DFA_{code}_XX"
            n = 14 + (a + label) % 5
            write_wav(audio / f"{stem}.wav", n / 30, 16000, 150.0 + 60 * label, seed=a * 10 + label)
            lost = {(a + label) % n, 5, n - 1}
            write_face_table(video / f"{stem}.csv", n, 0.7 * label, lost, keep_lost)
    return audio, video


def ingested(audio: Path, video: Path, out: Path, **fractions: float) -> Path:
    extractors = {"acoustic": mfcc.Extractor(mfcc.Settings()), "visual": table.Extractor(FACE_TABLE)}
    ingest.write(out, audio, video, extractors, ingest.Names(), progress=False, **fractions)
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("predict_validity")
    train_audio, train_video = write_clips(root / "train", range(1001, 1006))
    audio, video = write_clips(root / "new", range(2001, 2004))
    _, clean_video = write_clips(root / "new_without_lost_rows", range(2001, 2004), keep_lost=False)
    return {
        "root": root,
        "train": ingested(train_audio, train_video, root / "train.npz"),
        "new": ingested(audio, video, root / "new.npz"),
        "new_dir": ingested(audio, video, root / "new_dir", val_fraction=0.0, test_fraction=1.0),
        "audio": audio,
        "video": video,
        "clean_video": clean_video,
    }


@pytest.fixture(scope="module")
def runs(files: dict[str, Path]) -> dict[str, Path]:
    out = {}
    for modality in ("visual", "joint"):
        cfg = compose_train(
            "experiment=smoke",
            f"modality={modality}",
            "data=npz",
            f"data.path={files['train']}",
            "runtime.save_plots=false",
        )
        execute.run(cfg, files["root"] / modality)
        out[modality] = files["root"] / modality
    return out


def predicted(capsys: pytest.CaptureFixture[str], *args: object) -> dict[str, np.ndarray]:
    with pytest.raises(SystemExit) as exit_info:
        predict_cli.main([str(a) for a in args])
    _, err = capsys.readouterr()
    assert exit_info.value.code == 0, err
    out = Path(str(args[args.index("--out") + 1]))
    with out.open(newline="") as f:
        return {
            r["clip_id"]: np.array([float(r[f"prob_{c}"]) for c in NOTEBOOK_CLASS_NAMES])
            for r in csv.DictReader(f)
        }


def evaluated(run_dir: Path, data: Path) -> dict[str, np.ndarray]:
    out_dir, _ = evaluate_run(run_dir, data, ("train", "val", "test"), save_plots=False)
    probs = {}
    for split in ("train", "val", "test"):
        p = outputs.read_predictions(out_dir / "predictions.csv", split)
        probs.update(zip(p.clip_ids, p.y_prob, strict=True))
    return probs


def assert_close(got: dict[str, np.ndarray], expected: dict[str, np.ndarray], atol: float) -> None:
    assert sorted(got) == sorted(expected) and len(got) == 18
    for clip, p in got.items():
        np.testing.assert_allclose(p, expected[clip], rtol=0, atol=atol, err_msg=clip)


@pytest.mark.slow
@pytest.mark.parametrize("modality", ["visual", "joint"])
def test_predictions_from_face_tables_with_lost_frames_equal_mer_evaluate(
    files, runs, capsys, tmp_path, modality
):
    run = runs[modality]
    assert trained.honoured_streams(trained.load_trained(run)[2]) == ["visual"]
    out = tmp_path / "p.csv"
    got = predicted(capsys, run, "--audio", files["audio"], "--video", files["video"], "--out", out)
    assert_close(got, evaluated(run, files["new"]), atol=2e-6)
    # the lost rows do not exist for the model: the tables without them predict the same
    without = predicted(
        capsys, run, "--audio", files["audio"], "--video", files["clean_video"], "--out", tmp_path / "c.csv"
    )
    assert_close(without, got, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("data", ["new", "new_dir"])
def test_predictions_from_a_feature_file_with_masks_equal_mer_evaluate(files, runs, capsys, tmp_path, data):
    run = runs["visual"]
    got = predicted(capsys, run, "--data", files[data], "--out", tmp_path / "p.csv")
    assert_close(got, evaluated(run, files["new"]), atol=2e-6)

"""mer-predict: a trained run on new WAV + OpenFace CSV clips and on feature files without labels.

The runs are trained on clips mer-ingest made from generated files; predictions on new generated
clips must be exactly what mer-evaluate computes for the same clips ingested into an .npz.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import (
    EMOTIONS,
    FORMAT_1_RUN,
    compose_train,
    ingest_folder,
    make_folder,
    run_cli,
    write_openface_csv,
    write_wav,
)
from mer_cli.cli import commands
from mer_cli.cli import predict as predict_cli
from mer_cli.core.artifacts import load_checkpoint
from mer_cli.data import spec, synthetic
from mer_cli.data.features import mfcc, openface
from mer_cli.data.load import load_data
from mer_cli.data.npz import load_npz, save_npz
from mer_cli.data.splits import NOTEBOOK_CLASS_NAMES, Clips, Split, Splits
from mer_cli.runs import execute, outputs, trained
from mer_cli.runs.evaluate import evaluate_run
from mer_cli.serving import predict

pytest.importorskip("librosa")  # the ingest extra: part of the dev environment


def make_new_clips(root: Path, actors: tuple[int, ...] = (2001, 2002, 2003)) -> tuple[Path, Path]:
    """Clips the runs never saw: other actors, other pitches and faces, other lengths."""
    audio, video = root / "wav", root / "openface"
    audio.mkdir(parents=True)
    video.mkdir(parents=True)
    for a in actors:
        for label, code in enumerate(EMOTIONS):
            stem = f"{a}_IEO_{code}_HI"
            seconds = 0.8 + 0.1 * ((a + label) % 4)
            write_wav(audio / f"{stem}.wav", seconds, 16000, 170.0 + 55 * label, seed=a + label)
            write_openface_csv(video / f"{stem}.csv", int(30 * seconds), level=0.8 * label, failed=(2,))
    return audio, video


def train(run_dir: Path, modality: str, npz: Path, *extra: str) -> Path:
    cfg = compose_train(
        "experiment=smoke",
        f"modality={modality}",
        "data=npz",
        f"data.path={npz}",
        "runtime.save_plots=false",
        *extra,
    )
    execute.run(cfg, run_dir)
    return run_dir


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Training clips ingested into train.npz; new clips as files and ingested into new.npz."""
    root = tmp_path_factory.mktemp("predict")
    train_audio, train_video = make_folder(root / "train", n_actors=5)
    ingest_folder(train_audio, train_video, root / "train.npz")
    audio, video = make_new_clips(root / "new")
    ingest_folder(audio, video, root / "new.npz")
    return {
        "root": root,
        "train": root / "train.npz",
        "new": root / "new.npz",
        "audio": audio,
        "video": video,
    }


@pytest.fixture(scope="module")
def runs(files: dict[str, Path]) -> dict[str, Path]:
    # late fusion calibrated (its members and the fused model): predict applies every temperature
    extra = {"late": ("eval.calibration=temperature",)}
    return {
        m: train(files["root"] / m, m, files["train"], *extra.get(m, ())) for m in ("early", "late", "xattn")
    }


def run_predict(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, list[str]]:
    """mer-predict in this process: exit status, stdout, stderr lines."""
    with pytest.raises(SystemExit) as exit_info:
        predict_cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return int(exit_info.value.code or 0), out, err.strip().splitlines()


def read_rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as f:
        return {r["clip_id"]: r for r in csv.DictReader(f)}


def probabilities(rows: dict[str, dict[str, str]], class_names: tuple[str, ...]) -> dict[str, np.ndarray]:
    return {c: np.array([float(r[f"prob_{k}"]) for k in class_names]) for c, r in rows.items()}


def evaluated(run_dir: Path, npz: Path) -> dict[str, np.ndarray]:
    """mer-evaluate's probabilities for every clip of ``npz`` (all three splits)."""
    out_dir, _ = evaluate_run(run_dir, npz, ("train", "val", "test"), save_plots=False)
    probs = {}
    for split in ("train", "val", "test"):
        p = outputs.read_predictions(out_dir / "predictions.csv", split)
        probs.update(zip(p.clip_ids, p.y_prob, strict=True))
    return probs


def write_unlabelled_npz(path: Path, splits: Splits, mfcc_features: int | None = None) -> list[str]:
    """Every clip of ``splits`` in one un-split group, no labels, no class names."""
    clips = [c for s in splits.all() for c in zip(s.clip_ids, s.mfcc, s.aus, strict=True)]
    arrays = {"clip_ids": np.array([c[0] for c in clips])}
    for i, key in ((1, "mfcc"), (2, "aus")):
        frames = [c[i][:, :mfcc_features] if key == "mfcc" and mfcc_features else c[i] for c in clips]
        arrays[key] = np.concatenate(frames)
        arrays[f"{key}_offsets"] = np.concatenate([[0], np.cumsum([len(f) for f in frames])])
    np.savez(path, **arrays)
    return [c[0] for c in clips]


# ---------------------------------------------------------------------------------------------
# The run describes itself


@pytest.mark.slow
def test_ingest_records_its_settings_and_training_keeps_them_in_the_feature_spec(files, runs):
    splits = load_npz(files["train"])
    recorded = splits.ingest_settings
    assert recorded is not None
    assert {k: recorded["acoustic"][k] for k in ("sample_rate", "window_ms", "hop_ms", "n_mfcc")} == {
        "sample_rate": 16000,
        "window_ms": 25.0,
        "hop_ms": 10.0,
        "n_mfcc": 26,
    }
    assert recorded["acoustic"]["delta_orders"] == 1
    assert recorded["visual"]["au_columns"] == list(openface.AU_COLUMNS)
    assert recorded["visual"]["failed_frames"] == "interpolate"
    assert recorded["visual"]["frame_rate_hz"] == pytest.approx(30.0, rel=1e-3)  # timestamps i / 30

    feature_spec = load_checkpoint(runs["early"] / "checkpoint.pt")["feature_spec"]
    acoustic, visual = feature_spec["streams"]["acoustic"], feature_spec["streams"]["visual"]
    assert acoustic["n_features"] == 52 and acoustic["frame_rate_hz"] == 100.0
    assert acoustic["feature_names"][:2] == ["mfcc_0", "mfcc_1"]
    assert acoustic["feature_names"][26] == "delta_0"
    assert visual["n_features"] == 17 and visual["feature_names"] == list(openface.AU_COLUMNS)
    assert acoustic["ingest"] == recorded["acoustic"]
    assert feature_spec["inputs"] == {"early": 69}
    assert feature_spec["class_names"] == list(NOTEBOOK_CLASS_NAMES)
    assert spec.describe(acoustic) == "52 (26 MFCC + 26 deltas)"
    assert spec.describe(visual) == "17 (action units AU01_r ... AU45_r)"
    # another back-end's features are named as that back-end's, never as action units
    smile = {**acoustic, "feature_names": ["Loudness_sma3", "F0_sma3"], "ingest": {"backend": "opensmile"}}
    assert spec.describe(smile) == "52 (opensmile: Loudness_sma3, F0_sma3)"
    assert spec.describe({**visual, "feature_names": None, "ingest": {"backend": "hf"}}) == "17 (hf)"
    member = load_checkpoint(runs["late"] / "visual" / "checkpoint.pt")["feature_spec"]
    assert list(member["streams"]) == ["visual"]


def test_data_without_a_record_of_its_ingestion_cannot_be_predicted_from_raw_files():
    splits = synthetic.generate(synthetic.Spec(n_actors=4, clips_per_actor_per_class=1))
    built = spec.build(splits, "acoustic", ["acoustic"], {"acoustic": 52})
    assert built["streams"]["acoustic"]["frame_rate_hz"] == 100.0  # known for the embedded data
    with pytest.raises(predict.DataError, match="does not record how its acoustic features were computed"):
        spec.ingest_settings(built, "acoustic", "run")


# ---------------------------------------------------------------------------------------------
# Predictions: raw files and feature files, every one equal to mer-evaluate's


@pytest.mark.parametrize("modality", ["early", "late", "xattn"])
@pytest.mark.slow
def test_predictions_from_wav_and_csv_files_equal_mer_evaluate_on_the_same_clips(
    files, runs, capsys, tmp_path, modality
):
    out = tmp_path / "p.csv"
    code, stdout, stderr = run_predict(
        capsys, runs[modality], "--audio", files["audio"], "--video", files["video"], "--out", out
    )
    assert (code, stderr) == (0, [])
    if modality == "late":
        assert json.loads((runs[modality] / "late.json").read_text())["temperature"] != 1.0
    rows = read_rows(out)
    assert len(rows) == 18 and f"wrote {out}: 18 clips" in stdout
    names = NOTEBOOK_CLASS_NAMES
    got, expected = probabilities(rows, names), evaluated(runs[modality], files["new"])
    assert sorted(got) == sorted(expected)
    for clip_id, p in got.items():
        np.testing.assert_allclose(p, expected[clip_id], atol=2e-6, err_msg=clip_id)
        assert rows[clip_id]["y_pred"] == names[int(expected[clip_id].argmax())]
    assert list(next(iter(rows.values()))) == ["clip_id", "y_pred", *(f"prob_{c}" for c in names)]
    first = stdout.splitlines()[1].split()
    assert first[0] in rows and first[1] == rows[first[0]]["y_pred"]


@pytest.mark.slow
def test_a_one_stream_model_needs_only_its_own_files(files, runs, capsys, tmp_path):
    member = runs["late"] / "acoustic"  # late fusion's acoustic member: a run of its own
    out = tmp_path / "p.csv"
    code, _, stderr = run_predict(capsys, member, "--audio", files["audio"], "--out", out)
    assert (code, stderr) == (0, [])
    expected = evaluated(member, files["new"])
    for clip_id, p in probabilities(read_rows(out), NOTEBOOK_CLASS_NAMES).items():
        np.testing.assert_allclose(p, expected[clip_id], atol=2e-6, err_msg=clip_id)
    code, _, stderr = run_predict(capsys, member, "--video", files["video"], "--out", out)
    assert code == 2 and stderr == [
        f"mer-predict: error: {member}: the model reads the acoustic stream: give --audio"
    ]


@pytest.mark.slow
def test_a_video_at_another_frame_rate_is_predicted_with_a_warning(files, runs, capsys, tmp_path):
    wav = files["audio"] / "2001_IEO_HAP_HI.wav"
    fast = tmp_path / "2001_IEO_HAP_HI.csv"
    write_openface_csv(fast, 60, level=1.0)
    lines = fast.read_text().splitlines()  # timestamps i / 30 -> i / 60: a 60 frames/s video
    rows = [line.split(", ") for line in lines[1:]]
    fast.write_text(
        "\n".join([lines[0], *(", ".join([r[0], r[1], f"{i / 60:.3f}", *r[3:]]) for i, r in enumerate(rows))])
        + "\n"
    )
    code, _, stderr = run_predict(
        capsys, runs["early"], "--audio", wav, "--video", fast, "--out", tmp_path / "p.csv"
    )
    assert code == 0
    assert stderr == [
        f"mer-predict: warning: {fast}: video at 60 frames/s, the model was trained on 30 frames/s "
        "(predicted anyway: its faces move faster or slower than in training)"
    ]


@pytest.mark.slow
def test_one_clip_from_two_files(files, runs, capsys, tmp_path):
    out = tmp_path / "one.csv"
    wav, csv_file = files["audio"] / "2002_IEO_SAD_HI.wav", files["video"] / "2002_IEO_SAD_HI.csv"
    code, _, stderr = run_predict(capsys, runs["early"], "--audio", wav, "--video", csv_file, "--out", out)
    assert (code, stderr) == (0, [])
    (clip_id,) = read_rows(out)
    assert clip_id == "2002_IEO_SAD_HI"


@pytest.mark.slow
def test_an_npz_without_labels_predicts_as_mer_evaluate(files, runs, capsys, tmp_path):
    new = load_npz(files["new"])
    path = tmp_path / "unlabelled.npz"
    ids = write_unlabelled_npz(path, new)
    out = tmp_path / "p.csv"
    code, _, stderr = run_predict(capsys, runs["late"], "--data", path, "--out", out)
    assert (code, stderr) == (0, [])
    rows = read_rows(out)
    assert list(rows) == ids and "y_true" not in rows[ids[0]]
    expected = evaluated(runs["late"], files["new"])
    for clip_id, p in probabilities(rows, new.class_names).items():
        np.testing.assert_allclose(p, expected[clip_id], atol=2e-6, err_msg=clip_id)


@pytest.mark.slow
def test_a_clip_with_nan_values_in_a_feature_file_is_one_line_and_the_others_are_predicted(
    files, runs, capsys, tmp_path
):
    new = load_npz(files["new"])
    bad = new.test.mfcc[0].copy()
    bad[3, 5] = np.nan
    broken = dataclasses.replace(new, test=dataclasses.replace(new.test, mfcc=(bad, *new.test.mfcc[1:])))
    path = tmp_path / "nan.npz"
    write_unlabelled_npz(path, broken)
    out = tmp_path / "p.csv"
    code, _, stderr = run_predict(capsys, runs["early"], "--data", path, "--out", out)
    assert code == 1
    assert stderr == [f"mer-predict: error: {path}: {new.test.clip_ids[0]}: acoustic: NaN or infinite values"]
    assert len(read_rows(out)) == 17 and new.test.clip_ids[0] not in read_rows(out)


@pytest.mark.slow
def test_a_labelled_npz_keeps_splits_and_labels_and_the_default_output_spares_the_runs_own(
    files, runs, capsys
):
    run = runs["early"]
    own = (run / "predictions.csv").read_bytes()
    code, stdout, _ = run_predict(capsys, run, "--data", files["new"])
    assert code == 0
    (out,) = (run / "predictions").glob("*/predictions.csv")
    assert (run / "predictions.csv").read_bytes() == own
    rows = read_rows(out)
    new = load_npz(files["new"])
    truth = {c: new.class_names[y] for s in new.all() for c, y in zip(s.clip_ids, s.labels, strict=True)}
    assert {c: r["y_true"] for c, r in rows.items()} == truth
    assert {r["split"] for r in rows.values()} == {"train", "val", "test"}
    accuracy = np.mean([r["y_true"] == r["y_pred"] for r in rows.values()])
    assert f"accuracy: {accuracy:.3f} on 18 clips" in stdout
    code, _, stderr = run_predict(capsys, run, "--data", files["new"], "--out", run / "predictions.csv")
    assert code == 2 and "a run's own predictions.csv" in stderr[0]


# ---------------------------------------------------------------------------------------------
# Input that does not fit


@pytest.mark.slow
def test_features_of_another_size_are_one_line_naming_the_mismatch(files, runs, capsys, tmp_path):
    path = tmp_path / "forty.npz"
    write_unlabelled_npz(path, load_npz(files["new"]), mfcc_features=40)
    out = tmp_path / "p.csv"
    code, stdout, stderr = run_predict(capsys, runs["early"], "--data", path, "--out", out)
    assert code == 2 and stdout == ""
    assert stderr == [
        f"mer-predict: error: {path}: acoustic (mfcc): 40 features per frame, the model was trained "
        "on 52 (26 MFCC + 26 deltas)"
    ]
    assert not out.exists()


@pytest.mark.slow
def test_mer_evaluate_names_a_feature_mismatch_in_one_line_too(files, runs, capsys, tmp_path):
    """The same check guards mer-evaluate --data: before it, the scaler failed on a shape."""
    new = load_npz(files["new"])

    def forty(split: Split) -> Split:
        return dataclasses.replace(split, mfcc=Clips.pack([m[:, :40] for m in split.mfcc]))

    path = tmp_path / "forty.npz"
    save_npz(Splits(*(forty(s) for s in new.all()), new.class_names, source="forty"), path)
    before = sorted(runs["early"].rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        commands.evaluate_main([str(runs["early"]), "--data", str(path)])
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"mer-evaluate: error: {path}: ") and line.endswith(
        ": acoustic (mfcc): 40 features per frame, the model was trained on 52 (26 MFCC + 26 deltas)"
    )
    assert sorted(runs["early"].rglob("*")) == before  # no evaluation directory, not even empty


@pytest.mark.slow
def test_a_feature_file_ingested_with_other_settings_is_refused_naming_them(files, runs, capsys, tmp_path):
    coarse = mfcc.Settings(hop_ms=20.0)  # still 52 features per frame, but 50 frames/s
    path = tmp_path / "hop20.npz"
    ingest_folder(files["audio"], files["video"], path, coarse)
    code, _, stderr = run_predict(capsys, runs["early"], "--data", path, "--out", tmp_path / "p.csv")
    assert code == 2
    assert stderr == [
        f"mer-predict: error: {path}: acoustic computed with hop_ms=20.0; the model's training data with "
        "hop_ms=10.0"
    ]


@pytest.mark.slow
def test_bad_clips_are_one_line_each_and_the_others_are_still_predicted(files, runs, capsys, tmp_path):
    audio, video = tmp_path / "wav", tmp_path / "csv"
    shutil.copytree(files["audio"], audio)
    shutil.copytree(files["video"], video)
    (audio / "2009_IEO_ANG_HI.wav").write_bytes(b"RIFF....not audio")  # unreadable WAV
    write_openface_csv(video / "2009_IEO_ANG_HI.csv", 20, level=1.0)
    write_wav(audio / "2009_IEO_HAP_HI.wav", 1.0, 16000, 200.0)
    (video / "2009_IEO_HAP_HI.csv").write_text("frame, success, AU01_c\n1, 1, 0\n")  # no AU intensities
    write_wav(audio / "2009_IEO_SAD_HI.wav", 0.01, 16000, 200.0)  # 10 ms: shorter than one window
    write_openface_csv(video / "2009_IEO_SAD_HI.csv", 20, level=1.0)
    write_wav(audio / "2009_IEO_FEA_HI.wav", 1.0, 16000, 200.0)  # no CSV
    out = tmp_path / "p.csv"

    code, stdout, stderr = run_predict(capsys, runs["late"], "--audio", audio, "--video", video, "--out", out)

    assert code == 1
    assert len(stderr) == 4 and all(line.startswith("mer-predict: error: ") for line in stderr)
    by_clip = {c: next(line for line in stderr if c in line) for c in ("ANG", "HAP", "SAD", "FEA")}
    assert f"{audio / '2009_IEO_ANG_HI.wav'}: " in by_clip["ANG"]
    assert f"{video / '2009_IEO_HAP_HI.csv'}: no column AU01_r" in by_clip["HAP"]
    assert "too short: 10.0 ms of audio, less than one 25 ms window" in by_clip["SAD"]
    assert by_clip["FEA"].endswith("2009_IEO_FEA_HI.wav: no 2009_IEO_FEA_HI.* among the video files")
    assert len(read_rows(out)) == 18  # every good clip
    assert "18 clips; 4 failed" in stdout


@pytest.mark.slow
def test_a_run_without_a_feature_spec_predicts_from_features_and_refuses_raw_files(files, capsys, tmp_path):
    run = tmp_path / "old"
    shutil.copytree(FORMAT_1_RUN, run)  # trained before specs were recorded, on the embedded data
    assert "feature_spec" not in load_checkpoint(run / "checkpoint.pt")
    splits = load_data(OmegaConf.load(run / "config.yaml").data)
    path = tmp_path / "clips.npz"
    write_unlabelled_npz(path, splits)
    out = tmp_path / "p.csv"
    code, _, stderr = run_predict(capsys, run, "--data", path, "--out", out)
    assert (code, stderr) == (0, [])
    expected = trained.predict_run(run, splits, ("test",))["test"]
    got = probabilities(read_rows(out), splits.class_names)
    for clip_id, p in zip(expected.clip_ids, expected.y_prob, strict=True):
        np.testing.assert_allclose(got[clip_id], p, atol=2e-6)

    pickled = tmp_path / "clips.pkl"  # the notebook's format: every split, with labels
    raw = {
        s.name: dict(zip(s.clip_ids, zip(s.mfcc, s.aus, s.labels.tolist(), strict=True), strict=True))
        for s in splits.all()
    }
    pickled.write_bytes(pickle.dumps(raw))
    code, _, stderr = run_predict(capsys, run, "--data", pickled, "--out", out)
    assert (code, stderr) == (0, [])
    rows = read_rows(out)
    assert len(rows) == sum(len(s) for s in splits.all())
    for clip_id, p in zip(expected.clip_ids, expected.y_prob, strict=True):
        np.testing.assert_allclose(probabilities(rows, splits.class_names)[clip_id], p, atol=2e-6)
        assert rows[clip_id]["split"] == "test"

    write_unlabelled_npz(path, splits, mfcc_features=40)
    code, _, stderr = run_predict(capsys, run, "--data", path, "--out", out)
    assert code == 2
    assert stderr == [
        f"mer-predict: error: {path}: acoustic + visual: 57 features per frame in all, the model was "
        "trained on 69"
    ]
    code, _, stderr = run_predict(capsys, run, "--audio", files["audio"], "--video", files["video"])
    assert code == 2 and len(stderr) == 1
    assert "does not record how its acoustic features were computed" in stderr[0]
    assert "--data" in stderr[0]


# ---------------------------------------------------------------------------------------------
# From a fresh clone: the console scripts


@pytest.mark.slow
def test_predict_on_wav_and_csv_pairs_and_on_an_npz_without_labels_from_the_console(files, runs, tmp_path):
    out = tmp_path / "raw.csv"
    audio, video = str(files["audio"]), str(files["video"])
    proc = run_cli("predict", str(runs["early"]), "--audio", audio, "--video", video, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert len(read_rows(out)) == 18
    unlabelled = tmp_path / "unlabelled.npz"
    write_unlabelled_npz(unlabelled, load_npz(files["new"]))
    proc = run_cli(
        "predict", str(runs["early"]), "--data", str(unlabelled), "--out", str(tmp_path / "npz.csv")
    )
    assert proc.returncode == 0, proc.stderr
    names = NOTEBOOK_CLASS_NAMES
    from_npz, from_files = (probabilities(read_rows(p), names) for p in (tmp_path / "npz.csv", out))
    assert sorted(from_npz) == sorted(from_files)
    for clip_id, p in from_npz.items():
        np.testing.assert_allclose(p, from_files[clip_id], atol=2e-6)

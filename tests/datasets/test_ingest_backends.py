"""mer-ingest through the feature back-ends, end to end: a transformers encoder's layers into a
native dataset, training on it, mer-predict on raw clips equal to mer-evaluate on their ingested
copy; the feature cache (re-ingest, new clips, an interrupted extraction); the split-less ingest."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import (
    compose_train,
    ingest_folder,
    make_folder,
    save_tiny_emotion2vec,
    save_tiny_speech_encoder,
    save_vision_model,
    write_video,
)
from mer_cli.cli import ingest as ingest_cli
from mer_cli.core.errors import DataError
from mer_cli.data import ingest, native
from mer_cli.data.features import catalog, mfcc, openface
from mer_cli.runs import execute, outputs
from mer_cli.runs.evaluate import evaluate_run
from mer_cli.serving import predict

pytest.importorskip("librosa")
transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing may be fetched: the model is a local folder


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("backends")
    audio, video = make_folder(root / "train", n_actors=5)
    new_audio, new_video = make_folder(root / "new", n_actors=3)
    return {
        "root": root,
        "audio": audio,
        "video": video,
        "new_audio": new_audio,
        "new_video": new_video,
        "model": save_tiny_speech_encoder(root / "wavlm"),
    }


def train_early(data: Path, run_dir: Path) -> None:
    """A smoke early-fusion run (both streams in one model) on the native dataset ``data``."""
    execute.run(
        compose_train(
            "experiment=smoke",
            "modality=early",
            "data=native",
            f"data.path={data}",
            "runtime.save_plots=false",
        ),
        run_dir,
    )


def mer_ingest(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        ingest_cli.main([str(a) for a in args])
        raise SystemExit(0)
    captured = capsys.readouterr()
    return int(exit_info.value.code or 0), captured.out, captured.err


@pytest.mark.slow
def test_encoder_layers_ingested_trained_and_predicted_on_raw_clips_as_evaluated(clips, capsys, tmp_path):
    data, new = tmp_path / "wavlm-data", tmp_path / "new-clips"
    common = ("--audio-features", "hf", "--audio-model", clips["model"], "--audio-layers", "1-2")
    code, out, err = mer_ingest(
        capsys, data, "--audio", clips["audio"], "--video", clips["video"], *common, "--cache", tmp_path / "c"
    )
    assert code == 0, err
    splits = native.load_dir(data)
    record = splits.ingest_settings["acoustic"]
    assert (record["backend"], record["layers"], record["layer_size"]) == ("hf", [1, 2], 32)
    assert record["frame_rate_hz"] == pytest.approx(50.0) and record["weights"]
    assert splits.train.mfcc[0].shape == (49, 64)  # 1 s at 50 frames/s, 2 layers of 32 side by side
    assert "64 acoustic (hf) and 17 visual (openface) features per frame" in out

    run_dir = tmp_path / "run"
    train_early(data, run_dir)
    # a split-less ingest of the new clips (every clip in test), to evaluate on
    code, _, err = mer_ingest(
        capsys,
        new,
        "--audio",
        clips["new_audio"],
        "--video",
        clips["new_video"],
        *common,
        "--val-fraction",
        "0",
        "--test-fraction",
        "1",
        "--no-cache",
    )
    assert code == 0, err
    assert [len(s) for s in native.load_dir(new).all()] == [0, 0, 18]
    out_dir, _ = evaluate_run(run_dir, new, ("test",), save_plots=False)
    evaluated = outputs.read_predictions(out_dir / "predictions.csv", "test")
    expected = dict(zip(evaluated.clip_ids, evaluated.y_prob, strict=True))

    run = predict.load_run(run_dir)
    raw = predict.read_files(run, clips["new_audio"], clips["new_video"], str(run_dir))
    assert raw.failed == []
    got = predict.predict(run, raw)
    assert sorted(got.clip_ids) == sorted(expected)
    for clip_id, p in zip(got.clip_ids, got.y_prob, strict=True):
        np.testing.assert_allclose(p, expected[clip_id], atol=2e-6, err_msg=clip_id)


@pytest.mark.slow
def test_a_split_less_dataset_is_refused_for_training_in_one_line(clips, tmp_path):
    data = tmp_path / "new"
    ingest_folder(clips["new_audio"], clips["new_video"], data, val_fraction=0, test_fraction=1)
    with pytest.raises(DataError, match=r"no clips in the train and val split: a dataset to evaluate"):
        execute.run(compose_train("experiment=smoke", "data=native", f"data.path={data}"), tmp_path / "run")


class Interrupting:
    """The MFCC back-end, interrupted (Ctrl-C) after ``after`` clips."""

    def __init__(self, after: int) -> None:
        self.inner, self.after, self.batch_size = mfcc.Extractor(mfcc.Settings()), after, 1

    def extract(self, paths):  # type: ignore[no-untyped-def]
        if self.after == 0:
            raise KeyboardInterrupt
        self.after -= 1
        return self.inner.extract(paths)

    def record(self):  # type: ignore[no-untyped-def]
        return self.inner.record()


def write(out: Path, audio: Path, video: Path, cache: Path, acoustic=None) -> ingest.Ingested:  # type: ignore[no-untyped-def]
    extractors = {
        "acoustic": acoustic or mfcc.Extractor(mfcc.Settings()),
        "visual": openface.Extractor(openface.Settings()),
    }
    return ingest.write(out, audio, video, extractors, ingest.Names(), cache_root=cache, progress=False)


@pytest.mark.slow
def test_the_cache_extracts_only_what_is_new_and_an_interrupted_ingest_resumes(clips, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        write(tmp_path / "a", clips["audio"], clips["video"], cache, Interrupting(after=7))
    assert not (tmp_path / "a").exists()  # never half-written
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".a")]
    first = write(tmp_path / "a", clips["audio"], clips["video"], cache)
    # entries are keyed by file content: the generated faces repeat per emotion, and the first 7
    # clips held all six, so every face table is a hit
    assert first.cache_line == "feature cache: acoustic 7 cached / 23 new, visual 30 cached / 0 new"
    again = write(tmp_path / "b", clips["audio"], clips["video"], cache)
    assert again.cache_line == "feature cache: acoustic 30 cached / 0 new, visual 30 cached / 0 new"
    a, b = native.load_dir(tmp_path / "a"), native.load_dir(tmp_path / "b")
    for sa, sb in zip(a.all(), b.all(), strict=True):
        assert sa.clip_ids == sb.clip_ids
        for x, y in zip(sa.mfcc, sb.mfcc, strict=True):
            np.testing.assert_array_equal(x, y)  # a hit gives exactly the frames extracted
    # another back-end's settings: a recipe of its own, nothing shared
    coarse = write(
        tmp_path / "c", clips["audio"], clips["video"], cache, mfcc.Extractor(mfcc.Settings(hop_ms=20))
    )
    assert coarse.cache_line == "feature cache: acoustic 0 cached / 30 new, visual 30 cached / 0 new"


def test_every_preset_names_a_back_end_and_only_its_options():
    for stream in ("acoustic", "visual"):
        names = ingest_cli.preset_names(stream)
        assert names[0] in names and {"acoustic": "mfcc", "visual": "openface"}[stream] in names
        for name in names:
            backend, options = ingest_cli.read_preset(stream, name)
            # settings only: a preset naming a model not on this machine is still a valid preset
            catalog.get(stream, backend).make_settings(options, name)


def test_an_unknown_preset_or_option_is_one_line(clips, capsys, tmp_path):
    code, _, err = mer_ingest(
        capsys,
        tmp_path / "x",
        "--audio",
        clips["audio"],
        "--video",
        clips["video"],
        "--audio-features",
        "nope",
    )
    assert code == 2 and err.strip().startswith("mer-ingest: error: --audio-features nope: valid: ")
    code, _, err = mer_ingest(
        capsys,
        tmp_path / "x",
        "--audio",
        clips["audio"],
        "--video",
        clips["video"],
        "--audio-option",
        "n_mfc=3",
    )
    assert code == 2 and "mfcc has no option n_mfc: valid: " in err
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def media(clips, tmp_path_factory):  # type: ignore[no-untyped-def]
    """The training clips' faces as 1 s videos, a tiny CLIP and a tiny emotion2vec."""
    pytest.importorskip("av")
    root = tmp_path_factory.mktemp("media")
    videos = root / "videos"
    videos.mkdir()
    for csv_path in sorted(clips["video"].glob("*.csv")):
        write_video(videos / f"{csv_path.stem}.mp4", seconds=1.0, rate=25)
    out = {"videos": videos, "clip": save_vision_model(root / "clip", "clip")}
    if importlib.util.find_spec("funasr") is not None:
        out["emotion2vec"] = save_tiny_emotion2vec(root / "e2v")
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    ("audio_args", "video_args", "names"),
    [
        (
            ("--audio-features", "egemaps"),
            ("--video-features", "table", "--video-columns", "AU*_r"),
            ("opensmile", "table"),
        ),
        (
            ("--audio-features", "compare"),
            ("--video-features", "hf", "--video-model", "{clip}"),
            ("opensmile", "hf"),
        ),
        (
            ("--audio-features", "emotion2vec", "--audio-model", "{emotion2vec}"),
            (),
            ("emotion2vec", "openface"),
        ),
    ],
)
def test_each_back_end_writes_a_dataset_that_trains(
    clips, media, capsys, tmp_path, audio_args, video_args, names
):
    if "{emotion2vec}" in audio_args and "emotion2vec" not in media:
        pytest.skip("funasr not installed")
    fill = {k: str(v) for k, v in media.items()}
    args = [a.format(**fill) for a in (*audio_args, *video_args)]
    video = media["videos"] if "hf" in video_args else clips["video"]
    data = tmp_path / "data"
    code, _, err = mer_ingest(capsys, data, "--audio", clips["audio"], "--video", video, *args, "--no-cache")
    assert code == 0, err
    splits = native.load_dir(data)
    assert (
        splits.ingest_settings["acoustic"]["backend"],
        splits.ingest_settings["visual"]["backend"],
    ) == names
    run_dir = tmp_path / "run"
    train_early(data, run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test"]["n_clips"] == len(splits.test) > 0

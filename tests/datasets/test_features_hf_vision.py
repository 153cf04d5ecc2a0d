"""The hf video back-end: videos written here with PyAV -> frame embeddings of tiny random CLIP,
DINOv2 and ViT models, checked against the same models applied through the transformers API to
the frames PyAV decodes, picked here by their timestamps."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av")
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from conftest import save_vision_model as save_model  # noqa: E402
from conftest import write_video  # noqa: E402
from mer_cli.core.errors import ConfigError  # noqa: E402
from mer_cli.data.features import catalog, hf_audio, hf_vision  # noqa: E402
from mer_cli.data.features.base import Frames  # noqa: E402
from mer_cli.data.features.extraction import Extraction  # noqa: E402

# pretrained encoders and their libraries (seconds to import and load): with the end-to-end tests
pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def decoded(path: Path) -> tuple[np.ndarray, list[np.ndarray]]:
    """Every frame's time (from the first) and RGB pixels, as PyAV decodes them."""
    with av.open(str(path)) as container:
        frames = list(container.decode(video=0))
    times = np.array([f.time for f in frames]) - frames[0].time
    return times, [f.to_ndarray(format="rgb24") for f in frames]


def nearest(times: np.ndarray, n: int, fps: float) -> list[int]:
    return [int(np.argmin(np.abs(times - k / fps))) for k in range(n)]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {k: save_model(root / k, k) for k in ("clip", "clip_full", "dinov2", "vit")}


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("videos") / "clip.mp4")


def reference(folder: Path, images: list[np.ndarray], pooling: str = "cls") -> np.ndarray:
    """The embeddings through the transformers API alone: the saved processor and model."""
    from transformers import AutoImageProcessor, AutoModel, CLIPVisionModel, CLIPVisionModelWithProjection

    processor = AutoImageProcessor.from_pretrained(folder, backend="pil")
    kind = transformers.AutoConfig.from_pretrained(folder).model_type
    if pooling == "projection":
        model = CLIPVisionModelWithProjection.from_pretrained(folder)
    else:
        model = (CLIPVisionModel if kind.startswith("clip") else AutoModel).from_pretrained(folder)
    with torch.no_grad():
        out = model(**processor(images=images, return_tensors="pt"))
    if pooling == "projection":
        return out.image_embeds.numpy()
    if pooling == "mean":
        return out.last_hidden_state[:, 1:].mean(dim=1).numpy()
    if kind.startswith("clip"):
        return out.pooler_output.numpy()
    return out.last_hidden_state[:, 0].numpy()


def embeddings(settings: hf_vision.Settings, *paths: Path) -> list[Frames | str]:
    return hf_vision.Extractor(settings).extract(list(paths))


def one(settings: hf_vision.Settings, path: Path) -> Frames:
    (got,) = embeddings(settings, path)
    assert isinstance(got, Frames), got
    return got


# ---------------------------------------------------------------------------------------------
# Frames at the set rate, embeddings as the model gives them


@pytest.mark.parametrize(("rate", "codec", "suffix"), [(25, "libx264", "mp4"), (30, "mpeg4", "avi")])
@pytest.mark.parametrize("fps", [5.0, 7.0, 2.5])
def test_frames_come_at_the_set_rate_whatever_the_containers(models, tmp_path, rate, codec, suffix, fps):
    path = write_video(tmp_path / f"v.{suffix}", 2.0, rate, codec)
    got = one(hf_vision.Settings(model=str(models["clip"]), fps=fps), path)
    assert abs(len(got.values) - round(2.0 * fps)) <= 1
    times, rgb = decoded(path)
    picks = nearest(times, len(got.values), fps)
    np.testing.assert_allclose(got.values, reference(models["clip"], [rgb[i] for i in picks]), atol=1e-5)


@pytest.mark.parametrize("kind", ["clip", "dinov2", "vit"])
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_each_family_gives_the_transformers_apis_embedding(models, video, kind, pooling):
    got = one(hf_vision.Settings(model=str(models[kind]), pooling=pooling), video)
    times, rgb = decoded(video)
    want = reference(models[kind], [rgb[i] for i in nearest(times, 10, 5.0)], pooling)
    assert got.values.shape == (10, 32) and got.valid is None
    np.testing.assert_allclose(got.values, want, atol=1e-5)


def test_clip_projection_and_a_whole_clip_checkpoint(models, video):
    times, rgb = decoded(video)
    frames = [rgb[i] for i in nearest(times, 10, 5.0)]
    got = one(hf_vision.Settings(model=str(models["clip"]), pooling="projection"), video)
    assert got.values.shape == (10, 16)
    np.testing.assert_allclose(got.values, reference(models["clip"], frames, "projection"), atol=1e-5)
    full = one(hf_vision.Settings(model=str(models["clip_full"])), video)
    np.testing.assert_allclose(full.values, reference(models["clip_full"], frames), atol=1e-5)


def test_batches_of_frames_across_clips_change_nothing(models, tmp_path, video):
    other = write_video(tmp_path / "o.mkv", 1.2, 30, "mpeg4")
    big = embeddings(hf_vision.Settings(model=str(models["dinov2"]), batch_size=64), video, other)
    small = embeddings(hf_vision.Settings(model=str(models["dinov2"]), batch_size=3), video, other)
    assert [len(f.values) for f in big] == [10, 6]  # type: ignore[union-attr]
    for a, b in zip(big, small, strict=True):
        np.testing.assert_allclose(a.values, b.values, atol=1e-5)  # type: ignore[union-attr]


# ---------------------------------------------------------------------------------------------
# Face boxes: the crop and the validity mask


def write_boxes(folder: Path, stem: str, rows: list[str], header: str = "frame,x,y,w,h") -> Path:
    folder.mkdir(exist_ok=True)
    (folder / f"{stem}.csv").write_text("\n".join([header, *rows]) + "\n")
    return folder


def test_a_box_crops_the_frame_before_the_model(models, video, tmp_path):
    times, rgb = decoded(video)
    picks = nearest(times, 10, 5.0)
    boxes = write_boxes(tmp_path / "boxes", "clip", [f"{i},8,4,40,30" for i in range(len(rgb))])
    settings = hf_vision.Settings(model=str(models["clip"]), boxes_dir=str(boxes), box_margin=0.0)
    got = one(settings, video)
    np.testing.assert_allclose(
        got.values, reference(models["clip"], [rgb[i][4:34, 8:48] for i in picks]), atol=1e-5
    )
    whole = one(hf_vision.Settings(model=str(models["clip"])), video)
    assert not np.allclose(got.values, whole.values, atol=1e-3)
    assert got.valid is not None and got.valid.all()


def test_the_margin_widens_the_box_within_the_frame(models, video, tmp_path):
    times, rgb = decoded(video)
    picks = nearest(times, 10, 5.0)
    # 20 x 10 box at (40, 2): 25 % margin is 5 px left/right, 2.5 -> 3 px up/down, clipped at the top
    boxes = write_boxes(tmp_path / "boxes", "clip", [f"{i},40,2,20,10" for i in range(len(rgb))])
    settings = hf_vision.Settings(model=str(models["vit"]), boxes_dir=str(boxes), box_margin=0.25)
    want = reference(models["vit"], [rgb[i][0:15, 35:64] for i in picks])
    np.testing.assert_allclose(one(settings, video).values, want, atol=1e-5)


@pytest.mark.parametrize("policy", ["interpolate", "zero", "keep", "drop"])
def test_frames_without_a_box_are_invalid_and_follow_the_policy(models, video, tmp_path, policy):
    times, rgb = decoded(video)
    picks = nearest(times, 10, 5.0)
    missing = {picks[3], picks[4]}  # output frames 3 and 4 have no box; others 8,4,40,30
    rows = [f"{i},8,4,40,30" if i not in missing else f"{i},,,," for i in range(len(rgb)) if i != picks[4]]
    boxes = write_boxes(tmp_path / "boxes", "clip", rows)
    settings = hf_vision.Settings(
        model=str(models["clip"]), boxes_dir=str(boxes), box_margin=0.0, invalid_frames=policy
    )
    got = one(settings, video)
    faces = reference(models["clip"], [rgb[i][4:34, 8:48] for i in picks])
    valid = [k not in (3, 4) for k in range(10)]
    if policy == "drop":
        assert got.valid is not None and got.valid.all()
        np.testing.assert_allclose(got.values, faces[valid], atol=1e-5)
        return
    assert got.valid is not None and got.valid.tolist() == valid
    np.testing.assert_allclose(got.values[valid], faces[valid], atol=1e-5)
    if policy == "zero":
        np.testing.assert_array_equal(got.values[3:5], 0)
    elif policy == "keep":  # the whole frame, uncropped
        np.testing.assert_allclose(
            got.values[3:5], reference(models["clip"], [rgb[picks[3]], rgb[picks[4]]]), atol=1e-5
        )
    else:  # a straight line from frame 2 to frame 5
        np.testing.assert_allclose(got.values[3], faces[2] + (faces[5] - faces[2]) / 3, atol=1e-5)


def test_boxes_by_timestamp_match_the_nearest_frame(models, video, tmp_path):
    times, rgb = decoded(video)
    picks = nearest(times, 10, 5.0)
    rows = [f"{t + 0.01:.3f},8,4,40,30" for t in times[: picks[6] + 1]]  # none after output frame 6
    boxes = write_boxes(tmp_path / "boxes", "clip", rows, header="timestamp,x,y,w,h")
    settings = hf_vision.Settings(
        model=str(models["clip"]), boxes_dir=str(boxes), box_margin=0.0, invalid_frames="zero"
    )
    got = one(settings, video)
    assert got.valid.tolist() == [k <= 6 for k in range(10)]  # type: ignore[union-attr]
    want = reference(models["clip"], [rgb[i][4:34, 8:48] for i in picks[:7]])
    np.testing.assert_allclose(got.values[:7], want, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Per-file problems and fatal ones


def test_a_files_problem_is_its_own_line_and_the_others_go_on(models, video, tmp_path):
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x01" * 500)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(video.read_bytes()[: video.stat().st_size // 2])
    audio = tmp_path / "audio.mkv"
    with av.open(str(audio), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    paths = [corrupt, video, audio, tmp_path / "gone.mp4", truncated, video]
    got = embeddings(hf_vision.Settings(model=str(models["clip"]), batch_size=4), *paths)
    assert got[0] == got[4] == "cannot read the video: Invalid data found when processing input"
    assert got[2] == "no video stream"
    assert got[3] == "cannot read the video: No such file or directory"
    assert isinstance(got[1], Frames) and isinstance(got[5], Frames)
    np.testing.assert_array_equal(got[1].values, got[5].values)


def test_box_file_problems_name_the_box_file(models, video, tmp_path):
    settings = hf_vision.Settings(model=str(models["clip"]), boxes_dir=str(tmp_path / "boxes"))
    assert embeddings(settings, video)[0] == f"no face boxes {tmp_path / 'boxes' / 'clip.csv'}"
    write_boxes(tmp_path / "boxes", "clip", ["0,1,2,3"], header="frame,x,y,w")
    assert embeddings(settings, video)[0] == "face boxes clip.csv: no box column h"
    write_boxes(tmp_path / "boxes", "clip", ["0,1,2,3,a"])
    assert embeddings(settings, video)[0] == "face boxes clip.csv: line 2, column h: 'a' is not a number"
    write_boxes(tmp_path / "boxes", "clip", ["999,1,2,3,4"])
    assert embeddings(settings, video)[0] == "no frame has a face box"


def test_extraction_gives_the_video_file_and_its_problem(models, video, tmp_path):
    bad = tmp_path / "bad.webm"
    bad.write_text("not a video")
    ex = hf_vision.Extractor(hf_vision.Settings(model=str(models["clip"])))
    out = list(Extraction({"a": {"visual": video}, "b": {"visual": bad}}, {"visual": ex}, progress=False))
    assert out[0].frames is not None and out[0].frames["visual"].values.shape == (10, 32)
    assert out[1].file == bad
    assert out[1].problem == "cannot read the video: Invalid data found when processing input"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"model": "/nowhere/model"}, "model /nowhere/model is not a directory and not in the local"),
        ({"model": "{dinov2}", "pooling": "projection"}, "pooling projection: dinov2 has no projection"),
        ({"model": "{clip}", "device": "nodevice"}, "device nodevice"),
        ({"pooling": "max"}, "pooling 'max': valid: cls, mean, projection"),
        ({"fps": 0}, "fps 0: must be above 0"),
        ({"dtype": "int8"}, "dtype 'int8'"),
        ({"dtype": "bfloat16"}, "dtype bfloat16 needs an accelerator"),
        ({"invalid_frames": "skip"}, "invalid_frames 'skip'"),
    ],
)
def test_fatal_problems_are_one_config_error_line(models, options, message):
    options = {
        k: v.format(**{k: str(p) for k, p in models.items()}) if isinstance(v, str) else v
        for k, v in options.items()
    }
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as e:
        hf_vision.BACKEND.open(hf_vision.BACKEND.make_settings(options, "hf"))
    assert "\n" not in str(e.value)


def test_the_preset_spells_out_the_defaults():
    import yaml

    from conftest import REPO

    options = yaml.safe_load((REPO / "configs" / "features" / "video" / "hf.yaml").read_text())
    assert options.pop("backend") == "hf"
    assert hf_vision.BACKEND.make_settings(options, "hf.yaml") == hf_vision.Settings()


def test_a_model_not_in_the_local_cache_is_refused_without_downloading(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ConfigError, match="model org/none is not a directory and not in the local Hugging"):
        hf_vision.Extractor(hf_vision.Settings(model="org/none"))


# ---------------------------------------------------------------------------------------------
# The record


def test_the_record_rebuilds_an_extractor_giving_the_same_frames(models, video):
    ex = hf_vision.Extractor(hf_vision.Settings(model=str(models["dinov2"]), fps=4.0, pooling="mean"))
    (first,) = ex.extract([video])
    record = ex.record()
    assert record["backend"] == "hf" and record["frame_rate_hz"] == 4.0 and record["feature_names"] is None
    assert record["weights"] == hf_audio.weights_hash(models["dinov2"]) and record["revision"] is None
    assert record["pyav_version"] == av.__version__
    assert record["model"] == str(models["dinov2"])
    assert record["model_path"] == str(models["dinov2"].resolve())
    (again,) = catalog.from_record("visual", record, batch_size=2).extract([video])
    assert isinstance(first, Frames) and isinstance(again, Frames)
    np.testing.assert_allclose(first.values, again.values, atol=1e-6)


def test_a_cached_model_is_found_by_id_and_its_commit_is_the_revision(models, video, monkeypatch, tmp_path):
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--tiny-clip"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in models["clip"].iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    ex = hf_vision.Extractor(hf_vision.Settings(model="org/tiny-clip"))
    record = ex.record()
    assert (record["revision"], record["model_id"]) == (commit, "org/tiny-clip")
    assert record["model_path"] == str(snapshot)
    (got,) = ex.extract([video])
    (want,) = embeddings(hf_vision.Settings(model=str(models["clip"])), video)
    np.testing.assert_allclose(got.values, want.values, atol=1e-6)  # type: ignore[union-attr]
    assert catalog.from_record("visual", record).record()["revision"] == commit
    by_branch = hf_vision.Extractor(hf_vision.Settings(model="org/tiny-clip", revision="main"))
    assert by_branch.revision == commit


def test_without_transformers_the_error_names_the_pip_extra(models, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'mer-cli\[video\]'"):
        hf_vision.Extractor(hf_vision.Settings(model=str(models["clip"])))

"""The hf audio back-end: tiny randomly initialised WavLM, HuBERT, wav2vec 2.0, data2vec-audio and
Whisper encoders saved into a temporary folder, checked against transformers' own forward pass."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from conftest import write_wav
from mer_cli.core.errors import ConfigError
from mer_cli.data.features import catalog, hf_audio
from mer_cli.data.features.base import Frames, recipe_mismatch

transformers = pytest.importorskip("transformers")
soundfile = pytest.importorskip("soundfile")

# pretrained encoders and their libraries (seconds to import and load): with the end-to-end tests
pytestmark = pytest.mark.slow

SR = 16000
# the standard 7-layer CNN (strides 5*2^6 = 320 samples: 50 Hz, a 400-sample receptive field), thin
CONV = {"conv_dim": (16,) * 7, "conv_stride": (5, 2, 2, 2, 2, 2, 2), "conv_kernel": (10, 3, 3, 3, 3, 2, 2)}
TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 2,
    **CONV,
}
NAMES = ("wavlm", "hubert", "wav2vec2", "data2vec", "whisper")


def tiny_config(name: str):  # type: ignore[no-untyped-def]
    if name == "wavlm":
        return transformers.WavLMConfig(feat_extract_norm="layer", **TINY)
    if name == "hubert":
        return transformers.HubertConfig(feat_extract_norm="layer", **TINY)
    if name == "wav2vec2":  # wav2vec2-base style: group norm, no attention mask
        return transformers.Wav2Vec2Config(feat_extract_norm="group", **TINY)
    if name == "data2vec":
        return transformers.Data2VecAudioConfig(**{**TINY, "num_conv_pos_embeddings": 4})
    # a 5 s window (250 positions) instead of 30 s keeps the test fast; the code reads it from the files
    return transformers.WhisperConfig(
        d_model=32,
        encoder_layers=2,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_mel_bins=80,
        max_source_positions=250,
        max_target_positions=16,
        vocab_size=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )


@pytest.fixture(autouse=True)
def _offline(monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def models(tmp_path_factory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("models")
    for name in NAMES:
        torch.manual_seed(0)
        transformers.AutoModel.from_config(tiny_config(name)).save_pretrained(root / name)
        if name == "whisper":
            fe = transformers.WhisperFeatureExtractor(feature_size=80, chunk_length=5)
        else:
            fe = transformers.Wav2Vec2FeatureExtractor(return_attention_mask=name != "wav2vec2")
        fe.save_pretrained(root / name)
    return {name: root / name for name in NAMES}


@pytest.fixture(scope="module")
def wavs(tmp_path_factory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("wav")
    paths = {
        "2s": (2.0, SR, 220.0),
        "1.3s": (1.3, SR, 330.0),
        "0.7s": (0.7, SR, 440.0),
        "2s_8k": (2.0, 8000, 220.0),
        "6.5s": (6.5, SR, 150.0),
        "10ms": (0.01, SR, 220.0),
        "empty": (0.0, SR, 220.0),
    }
    out = {}
    for name, (seconds, rate, freq) in paths.items():
        out[name] = root / f"{name}.wav"
        write_wav(out[name], seconds, rate, freq, seed=len(out))
    out["corrupt"] = root / "corrupt.wav"
    out["corrupt"].write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk-that-is-no-audio")
    return out


@pytest.fixture(scope="module")
def opened(models):  # type: ignore[no-untyped-def]
    """``opened(name, **settings)``: the extractor, loaded once per module for each setting
    (the tiny Whisper's windows: 5 s)."""
    cache: dict[tuple, hf_audio.Extractor] = {}

    def get(name: str, **kw):  # type: ignore[no-untyped-def]
        if name == "whisper":
            kw.setdefault("chunk_seconds", 5.0)
        key = (name, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = hf_audio.Extractor(hf_audio.Settings(model=str(models[name]), **kw))
        return cache[key]

    return get


def values(extractor, paths) -> list[np.ndarray]:  # type: ignore[no-untyped-def]
    got = extractor.extract(list(paths))
    assert all(isinstance(g, Frames) for g in got), got
    return [g.values for g in got]


def reference_hidden(folder, y: np.ndarray, whisper: bool):  # type: ignore[no-untyped-def]
    """transformers' own hidden states of one clip (the independent reference)."""
    fe = transformers.AutoFeatureExtractor.from_pretrained(folder)
    model = transformers.AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        inputs = fe(y, sampling_rate=SR, return_tensors="pt")
        if whisper:
            return model.encoder(inputs["input_features"], output_hidden_states=True).hidden_states
        return model(**inputs, output_hidden_states=True).hidden_states


def read(path) -> np.ndarray:  # type: ignore[no-untyped-def]
    y, rate = soundfile.read(path, dtype="float32")
    assert rate == SR
    return y


# ---------------------------------------------------------------------------------------------
# Shapes, rates and values against transformers


@pytest.mark.parametrize("name", NAMES)
def test_frames_equal_transformers_hidden_states_at_50_hz(opened, models, wavs, name):
    every = opened(name)  # layers "all": 0 (CNN/embedding) .. 2
    some = opened(name, layers=(1, 2))
    (x_all,) = values(every, [wavs["2s"]])
    (x,) = values(some, [wavs["2s"]])
    assert abs(len(x_all) - 2.0 * 50) <= 1
    assert x_all.shape == (len(x_all), 3 * 32) and x_all.dtype == np.float32
    np.testing.assert_array_equal(x, x_all[:, 32:96])  # layer-major: columns [l*D:(l+1)*D] = layers[l]
    reference = reference_hidden(models[name], read(wavs["2s"]), name == "whisper")
    assert len(reference) == 3
    for col, k in enumerate((1, 2)):
        # Whisper's reference covers its whole padded window: its first frames are the real audio's
        np.testing.assert_allclose(
            x[:, 32 * col : 32 * (col + 1)], reference[k][0, : len(x)].numpy(), atol=1e-5
        )
    np.testing.assert_allclose(x_all[:, :32], reference[0][0, : len(x)].numpy(), atol=1e-5)
    if name != "whisper":
        assert len(x) == reference[0].shape[1]  # every frame the model gives for the unpadded clip
    assert every.record()["frame_rate_hz"] == 50.0
    assert torch.is_grad_enabled()  # no global torch state left behind


@pytest.mark.parametrize(
    ("spec", "kept"), [("all", (0, 1, 2)), (2, (2,)), ("1-2", (1, 2)), ([2, 0], (2, 0)), ("0,2", (0, 2))]
)
def test_layers_accept_one_a_range_a_list_or_all(spec, kept):
    assert hf_audio.select_layers(spec, 2) == kept


@pytest.mark.parametrize("spec", [3, "2-1", "x", (1, 1), (), -1, "0-3", 1.5])
def test_layers_out_of_range_or_malformed_are_one_config_error(spec):
    with pytest.raises(ConfigError, match="layers"):
        hf_audio.select_layers(spec, 2)


def test_batched_extraction_equals_one_clip_at_a_time(opened, wavs):
    clips = [wavs["2s"], wavs["0.7s"], wavs["1.3s"]]
    batched, single = opened("wavlm", batch_size=4), opened("wavlm", batch_size=1)
    assert batched.batch_size == 4
    together = values(batched, clips)  # padded to 2 s, with the attention mask
    for path, x in zip(clips, together, strict=True):
        (alone,) = values(single, [path])
        assert x.shape == alone.shape
        np.testing.assert_allclose(x, alone, atol=1e-5)


def test_group_normed_cnn_without_attention_mask_goes_clip_by_clip(opened, wavs):
    extractor = opened("wav2vec2", batch_size=4)
    assert extractor.batch_size == 1  # padding would change its group-normed CNN's statistics
    assert opened("whisper", batch_size=4).batch_size == 4  # Whisper pads every input anyway


# ---------------------------------------------------------------------------------------------
# Long recordings: overlapping windows


def test_long_clip_in_windows_keeps_the_whole_file_frame_count_and_the_windows_frames(opened, models, wavs):
    whole = opened("wavlm", layers=(2,))  # 20 s windows: one
    windowed = opened("wavlm", layers=(2,), chunk_seconds=2.0, chunk_overlap_seconds=0.5)
    (x_whole,) = values(whole, [wavs["6.5s"]])
    (x,) = values(windowed, [wavs["6.5s"]])
    y = read(wavs["6.5s"])
    assert x.shape == x_whole.shape == (reference_hidden(models["wavlm"], y, False)[2].shape[1], 32)
    # the second window spans samples 24000-56000 (frames 75-175); the overlaps with its
    # neighbours split at their middles, frames 87.5 and 162.5: its frames there are that window
    # encoded alone
    window = reference_hidden(models["wavlm"], y[24000:56000], False)[2][0].numpy()
    np.testing.assert_allclose(x[87:162], window[87 - 75 : 162 - 75], atol=1e-5)
    assert not np.allclose(x[162:170], window[162 - 75 : 170 - 75], atol=1e-3)  # the third window's


def test_whisper_windows_are_cut_to_the_real_audio_and_at_most_its_padded_length(opened, models, wavs):
    (x,) = values(opened("whisper", chunk_overlap_seconds=1.0), [wavs["6.5s"]])
    assert len(x) == int(np.ceil(6.5 * SR / 320))  # 50 Hz over the real 6.5 s, not the padded windows
    (short,) = values(opened("whisper"), [wavs["0.7s"]])
    assert len(short) == 35
    with pytest.raises(ConfigError, match="Whisper encodes at most 5 s"):
        hf_audio.Extractor(hf_audio.Settings(model=str(models["whisper"]), chunk_seconds=10.0))


@pytest.mark.parametrize(
    ("n", "starts"), [(1000, [0]), (3200, [0]), (5000, [0, 1920]), (9000, [0, 2560, 5120, 6080])]
)
def test_windows_start_on_frames_and_the_last_one_ends_the_clip(n, starts):
    got = hf_audio.plan_chunks(n, chunk=3200, step=2560, stride=320)
    assert got == starts
    assert all(s % 320 == 0 for s in got) and n - 3200 <= got[-1] < n


# ---------------------------------------------------------------------------------------------
# The record


def test_record_names_the_model_and_rebuilds_the_same_features(opened, models, wavs, tmp_path):
    extractor = opened("wavlm", layers="1-2")
    record = extractor.record()
    weights = hashlib.sha256((models["wavlm"] / "model.safetensors").read_bytes()).hexdigest()[:16]
    assert json.loads(json.dumps(record)) == record  # plain JSON values
    assert record["backend"] == "hf" and record["layers"] == [1, 2] and record["layer_size"] == 32
    assert record["model_type"] == "wavlm" and record["model_id"] == "wavlm"
    assert record["weights"] == weights and record["revision"] is None  # a directory: no hub commit
    assert record["model_path"] == str(models["wavlm"].resolve())
    assert record["sample_rate"] == SR and record["frame_rate_hz"] == 50.0 and record["feature_names"] is None
    (x,) = values(extractor, [wavs["1.3s"]])
    again = catalog.from_record("acoustic", record)
    assert again.record() == record
    np.testing.assert_array_equal(values(again, [wavs["1.3s"]])[0], x)
    # the same weights elsewhere (another machine): the same recipe, the same frames
    moved = shutil.copytree(models["wavlm"], tmp_path / "elsewhere")
    np.testing.assert_array_equal(
        values(catalog.from_record("acoustic", record, model=str(moved)), [wavs["1.3s"]])[0], x
    )


def test_other_weights_than_the_records_are_another_recipe(opened, models):
    record = opened("wavlm", layers="1-2").record()
    other = catalog.from_record("acoustic", record, model=str(models["hubert"]))
    assert "weights=" in (recipe_mismatch(record, other.record()) or "")


def test_a_hub_id_loads_from_the_local_cache_with_its_snapshot_commit(models, wavs, tmp_path, monkeypatch):
    import huggingface_hub

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny--wavlm"
    shutil.copytree(models["wavlm"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    extractor = hf_audio.Extractor(hf_audio.Settings(model="tiny/wavlm", layers=2))
    record = extractor.record()
    assert record["model_id"] == "tiny/wavlm" and record["revision"] == commit
    assert record["model_path"] == str(repo / "snapshots" / commit)
    assert catalog.from_record("acoustic", record).record() == record
    # trained from the cache, predicted with the same weights in a plain folder: the same recipe
    in_folder = catalog.from_record("acoustic", record, model=str(models["wavlm"]))
    assert recipe_mismatch(record, in_folder.record()) is None
    with pytest.raises(
        ConfigError, match=r"tiny/absent is not a directory and not in the local .*hf download tiny/absent"
    ):
        hf_audio.Extractor(hf_audio.Settings(model="tiny/absent"))


# ---------------------------------------------------------------------------------------------
# Files and settings that cannot be used


def test_bad_files_are_one_line_each_and_the_others_go_on(opened, wavs):
    got = opened("wavlm").extract([wavs["corrupt"], wavs["empty"], wavs["10ms"], wavs["2s"]])
    assert all(isinstance(g, str) and "\n" not in g for g in got[:3])
    assert "no audio samples" in got[1]
    assert got[2] == "too short: 10.0 ms of audio, less than the 25 ms the encoder needs for one frame"
    assert isinstance(got[3], Frames)


def test_an_8_khz_file_is_resampled_to_the_models_rate(opened, wavs):
    x16, x8 = values(opened("hubert"), [wavs["2s"], wavs["2s_8k"]])
    assert abs(len(x8) - len(x16)) <= 1


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"dtype": "bfloat16"}, "needs an accelerator"),
        ({"dtype": "int8"}, "valid: float32, bfloat16, float16"),
        ({"chunk_seconds": 2.0, "chunk_overlap_seconds": 2.0}, "need 0 <= overlap < chunk"),
        ({"batch_size": 0}, "batch_size"),
        ({"model": " "}, "model"),
    ],
)
def test_settings_that_cannot_work_are_one_config_error(settings, match):
    with pytest.raises(ConfigError, match=match):
        hf_audio.Settings(**settings)


def test_a_missing_layer_a_too_short_overlap_or_a_missing_gpu_is_one_config_error(models):
    with pytest.raises(ConfigError, match=r"has hidden states 0\.\.2"):
        hf_audio.Extractor(hf_audio.Settings(model=str(models["wavlm"]), layers=3))
    with pytest.raises(ConfigError, match="must cover the 25 ms"):
        hf_audio.Extractor(hf_audio.Settings(model=str(models["wavlm"]), chunk_overlap_seconds=0.01))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            hf_audio.Extractor(hf_audio.Settings(model=str(models["wavlm"]), device="cuda"))


def test_a_model_that_is_no_speech_encoder_is_one_config_error(tmp_path):
    transformers.BertModel(
        transformers.BertConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        )
    ).save_pretrained(tmp_path / "bert")
    with pytest.raises(ConfigError, match="is a bert model: the hf back-end encodes wav2vec2"):
        hf_audio.Extractor(hf_audio.Settings(model=str(tmp_path / "bert")))


def test_the_preset_names_only_real_settings_and_their_defaults():
    import yaml

    from conftest import REPO

    preset = yaml.safe_load((REPO / "configs" / "features" / "audio" / "hf.yaml").read_text())
    assert preset.pop("backend") == "hf"
    assert hf_audio.BACKEND.make_settings(preset, "hf.yaml") == hf_audio.Settings()
    assert catalog.get("acoustic", "hf") is hf_audio.BACKEND

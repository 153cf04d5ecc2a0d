"""What make bench-features extracts from: generated clips and tiny randomly initialised models.

Clips (`write_clips`): N recordings of a few seconds (16-bit mono WAV at 16 kHz: a tone with
vibrato plus noise), the same clips as OpenFace 2 ``FeatureExtraction`` CSVs (its full 714-column
layout at 30 rows/s: gaze, eye and face landmarks, pose, shape parameters, 17 AU intensities and
18 presences, about 5 % of the frames lost: ``success`` 0) and as H.264 videos (PyAV, 96x96 at
25 frames/s), named like CREMA-D (``1001_SA_ANG_XX``: 8 actors, 6 emotions) so mer-ingest can
split them by actor. Models (`save_tiny`): each model back-end's smallest honest stand-in (2
layers, 32 wide, the real front ends), saved into a folder and loaded from there by path; nothing
is downloaded. `cached_models` says which base-size models the local Hugging Face cache holds.
"""

from __future__ import annotations

import wave
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mer_cli.data.features import openface

SAMPLE_RATE = 16000  # Hz: the WAVs' rate (the speech encoders' own)
FACE_FPS = 30  # OpenFace rows per second (a 30 frames/s video)
VIDEO_FPS, VIDEO_SIZE = 25, 96  # the videos' frames per second and side in pixels
ACTORS = 8  # enough for mer-ingest's actor split (train, val and test each get one)
EMOTIONS = ("NEU", "ANG", "HAP", "FEA", "DIS", "SAD")
AU_PRESENCE = (*(c.replace("_r", "_c") for c in openface.AU_COLUMNS[:-1]), "AU28_c", "AU45_c")
# OpenFace 2's FeatureExtraction columns in its order (714)
OPENFACE_HEADER = (
    ["frame", "face_id", "timestamp", "confidence", "success"]
    + [f"gaze_{e}_{a}" for e in (0, 1) for a in "xyz"]
    + ["gaze_angle_x", "gaze_angle_y"]
    + [f"eye_lmk_{a}_{i}" for a in ("x", "y", "X", "Y", "Z") for i in range(56)]
    + [f"pose_{k}" for k in ("Tx", "Ty", "Tz", "Rx", "Ry", "Rz")]
    + [f"{a}_{i}" for a in ("x", "y", "X", "Y", "Z") for i in range(68)]
    + ["p_scale", "p_rx", "p_ry", "p_rz", "p_tx", "p_ty"]
    + [f"p_{i}" for i in range(34)]
    + list(openface.AU_COLUMNS)
    + list(AU_PRESENCE)
)
# the base-size models each model back-end is also timed with where the local HF cache holds them
BASE_MODELS = {
    ("acoustic", "hf"): (
        "microsoft/wavlm-base-plus",
        "facebook/hubert-base-ls960",
        "facebook/wav2vec2-base",
        "openai/whisper-base",
    ),
    ("acoustic", "emotion2vec"): ("iic/emotion2vec_plus_base", "emotion2vec/emotion2vec_plus_base"),
    ("visual", "hf"): (
        "openai/clip-vit-base-patch32",
        "facebook/dinov2-small",
        "google/vit-base-patch16-224",
    ),
}


def clip_name(i: int) -> str:
    """Clip ``i``'s CREMA-D-style name: actor ``1001 + i % 8``, then every emotion, then sentences."""
    actor, rest = 1001 + i % ACTORS, i // ACTORS
    k = rest // len(EMOTIONS)
    return f"{actor}_S{chr(65 + k // 26)}{chr(65 + k % 26)}_{EMOTIONS[rest % len(EMOTIONS)]}_XX"


def clip_seconds(n: int, low: float, high: float, seed: int = 0) -> np.ndarray:
    """``n`` clip lengths in seconds, uniform in [low, high] (to the 10 ms)."""
    return np.round(np.random.default_rng(seed).uniform(low, high, n), 2)


def write_wav(path: Path, seconds: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    f0 = rng.uniform(110, 260)
    y = 0.4 * np.sin(2 * np.pi * f0 * t + 3 * np.sin(2 * np.pi * 5 * t)) + 0.05 * rng.normal(size=t.size)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes((np.clip(y, -1, 1) * 32767).astype("<i2").tobytes())


def write_openface_csv(path: Path, seconds: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = max(2, round(seconds * FACE_FPS))
    x = rng.normal(size=(n, len(OPENFACE_HEADER))).cumsum(axis=0) * 0.05 + 1.0
    success = rng.random(n) > 0.05
    x[:, 0], x[:, 1], x[:, 2] = np.arange(1, n + 1), 0, np.arange(n) / FACE_FPS
    x[:, 3], x[:, 4] = np.where(success, 0.98, 0.0), success
    au = OPENFACE_HEADER.index(openface.AU_COLUMNS[0])
    x[:, au : au + len(openface.AU_COLUMNS)] = np.clip(x[:, au : au + len(openface.AU_COLUMNS)], 0, 5)
    x[:, au + len(openface.AU_COLUMNS) :] = x[:, au + len(openface.AU_COLUMNS) :] > 1.0
    fmt = ["%d", "%d", "%.3f", "%.2f", "%d"] + ["%.3f"] * (len(OPENFACE_HEADER) - 5)
    np.savetxt(path, x, fmt=fmt, delimiter=", ", header=", ".join(OPENFACE_HEADER), comments="")


def write_video(path: Path, seconds: float, seed: int) -> None:
    """Two coloured squares crossing a grey frame, H.264 in an mp4."""
    import av

    n = max(2, round(seconds * VIDEO_FPS))
    shade = 60 + 8 * (seed % 20)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=VIDEO_FPS)
        stream.width = stream.height = VIDEO_SIZE
        stream.pix_fmt = "yuv420p"
        for i in range(n):
            img = np.full((VIDEO_SIZE, VIDEO_SIZE, 3), shade, dtype=np.uint8)
            x = round(i * (VIDEO_SIZE - 24) / (n - 1))
            img[12:36, x : x + 24] = (230, 40, 40)
            img[60:84, VIDEO_SIZE - 24 - x : VIDEO_SIZE - x] = (40, 200, 60)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


WRITERS: dict[str, tuple[str, Callable[[Path, float, int], None]]] = {
    "wav": (".wav", write_wav),
    "csv": (".csv", write_openface_csv),
    "video": (".mp4", write_video),
}


def input_kind(patterns: tuple[str, ...]) -> str | None:
    """Which generated files a back-end reads, from its file patterns (None: none of them)."""
    lowered = {p.lower() for p in patterns}
    for kind, (suffix, _) in WRITERS.items():
        if f"*{suffix}" in lowered:
            return kind
    return None


def write_clips(folder: Path, kind: str, seconds: np.ndarray) -> Path:
    """``len(seconds)`` clips of ``kind`` (wav | csv | video) in ``folder``; the folder."""
    suffix, write = WRITERS[kind]
    folder.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(seconds):
        write(folder / f"{clip_name(i)}{suffix}", float(s), i)
    return folder


# ---------------------------------------------------------------------------------------------
# Tiny random models

# emotion2vec's front end at 1/16 of its width (7 convolutions, 320 samples per frame), one
# pre-net block and one transformer block of 4 heads, 32 wide; funasr's config has no defaults
_ZERO = ("layerdrop", "dropout_input", "encoder_dropout", "post_mlp_drop", "attention_dropout")
E2V_AUDIO = {
    "type": "AUDIO",
    "feature_encoder_spec": "[(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2",
    "extractor_mode": "layer_norm",
    **{"conv_pos_width": 8, "conv_pos_groups": 4, "conv_pos_depth": 2, "conv_pos_pre_ln": False},
    **{"prenet_depth": 1, "prenet_layerdrop": 0.0, "prenet_dropout": 0.0, "model_depth": 1},
    **{"start_drop_path_rate": 0.0, "end_drop_path_rate": 0.0, "decoder": None},
    **{"num_extra_tokens": 2, "init_extra_token_zero": False, "mask_noise_std": 0.01},
    **{"use_alibi_encoder": True, "alibi_scale": 1.0, "learned_alibi": False, "alibi_max_pos": None},
    **{"learned_alibi_scale": True, "learned_alibi_scale_per_head": True, "num_alibi_heads": 4},
    **{"learned_alibi_scale_per_layer": False, "local_grad_mult": 1.0, "ema_local_encoder": False},
}
E2V_CONF = {
    **{"depth": 1, "embed_dim": 32, "num_heads": 4, "mlp_ratio": 2.0, "norm_eps": 1e-5},
    **{"norm_affine": True, "layer_norm_first": False, "end_of_block_targets": False, "normalize": True},
    **dict.fromkeys((*_ZERO, "activation_dropout", "start_drop_path_rate", "end_drop_path_rate"), 0.0),
    "modalities": {"audio": E2V_AUDIO},
}


def _tiny_speech_encoder(folder: Path) -> dict[str, Any]:
    import torch
    import transformers

    config = transformers.WavLMConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        feat_extract_norm="layer",  # with an attention mask: batched as a base WavLM is
        conv_dim=(16,) * 7,
        conv_stride=(5, 2, 2, 2, 2, 2, 2),  # the standard CNN: 320 samples a frame, 50 Hz
        conv_kernel=(10, 3, 3, 3, 3, 2, 2),
    )
    torch.manual_seed(0)
    transformers.WavLMModel(config).save_pretrained(folder)
    transformers.Wav2Vec2FeatureExtractor(return_attention_mask=True).save_pretrained(folder)
    return {"model": str(folder)}


def _tiny_emotion2vec(folder: Path) -> dict[str, Any]:
    import torch
    import yaml

    from mer_cli.data.features import emotion2vec

    cls, _ = emotion2vec.emotion2vec_class()
    torch.manual_seed(0)
    model = cls(model_conf=E2V_CONF)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": "Emotion2vec", "model_conf": E2V_CONF}))
    torch.save(model.state_dict(), folder / "model.pt")
    return {"model_path": str(folder)}


def _tiny_clip(folder: Path) -> dict[str, Any]:
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    CLIPVisionModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder
    )
    return {"model": str(folder)}


# (stream, back-end) -> what saves its tiny model into a folder and the options that load it
TINY = {
    ("acoustic", "hf"): _tiny_speech_encoder,
    ("acoustic", "emotion2vec"): _tiny_emotion2vec,
    ("visual", "hf"): _tiny_clip,
}


def save_tiny(stream: str, backend: str, folder: Path) -> dict[str, Any] | None:
    """The options that load the back-end's tiny model saved into ``folder`` (None: the
    back-end has no model). Raises ImportError where its library is missing."""
    make = TINY.get((stream, backend))
    return None if make is None else make(folder)


def cached_models() -> tuple[set[str], str]:
    """The model ids in the local Hugging Face cache (huggingface_hub's scan, no network) and
    the cache's path."""
    try:
        from huggingface_hub import constants, scan_cache_dir
    except ImportError:
        return set(), "(huggingface_hub not installed)"
    try:
        info = scan_cache_dir()
    except Exception:  # CacheNotFound: no cache folder at all
        return set(), str(constants.HF_HUB_CACHE)
    return {r.repo_id for r in info.repos if r.repo_type == "model"}, str(constants.HF_HUB_CACHE)


def base_options(stream: str, backend: str, model_id: str, hf_cache: set[str]) -> dict[str, Any] | None:
    """The options that load ``model_id`` from this machine's caches only, or None where it is
    not there (emotion2vec: the ModelScope cache, or the HF one; the others: the HF cache)."""
    if backend == "emotion2vec":
        from mer_cli.core.errors import ConfigError
        from mer_cli.data.features import emotion2vec

        hub = "huggingface" if model_id.startswith("emotion2vec/") else "modelscope"
        try:
            emotion2vec.find_model_dir(emotion2vec.Settings(model_id=model_id, hub=hub))
        except ConfigError:
            return None
        return {"model_id": model_id, "hub": hub}
    return {"model": model_id} if model_id in hf_cache else None

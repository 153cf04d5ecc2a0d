"""The tests' one harness: the checkout's paths, the console scripts in a subprocess, composed
configs, hand-built Splits and models, and generated WAV + OpenFace files.

A test module imports what it needs (``from conftest import REPO, run_cli``): pytest puts this
folder on sys.path, so the tests in every subfolder share these helpers.
"""

from __future__ import annotations

import collections
import contextlib
import os
import pickle
import signal
import subprocess
import sys
import wave
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from mer_cli.data import formats, ingest
from mer_cli.data.features import mfcc, openface
from mer_cli.data.splits import NOTEBOOK_CLASS_NAMES, Split, Splits
from mer_cli.evaluation.metrics import score
from mer_cli.models.encoders.rnn import BiLSTMEncoder
from mer_cli.models.heads import Classifier
from mer_cli.preprocess.sequences import Ragged, SequenceSet
from mer_cli.reporting import options
from mer_cli.reporting.collect import Run
from mer_cli.reporting.document import document
from mer_cli.reporting.render import to_markdown
from mer_cli.runs import outputs
from mer_cli.sweeps.launchers import PARALLEL_JOBS_ENV

# tiny tensors: one thread avoids OpenMP spin-waiting on a busy 2-core machine
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]  # the checkout: tests/ sits at its top
SRC = REPO / "src"
# a run directory written by mer-cli 0.1 (checkpoint format 1): early fusion on the embedded data
FORMAT_1_RUN = REPO / "tests" / "data" / "format1_early"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--integration",
        action="store_true",
        help="run the tests marked integration (real Slurm, PostgreSQL, MLflow): make test-integration",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The integration tests start real services (minutes, system packages): only on request."""
    if config.getoption("--integration"):
        return
    skip = pytest.mark.skip(reason="needs real services: make test-integration")
    for item in items:
        if "integration" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _ctrl_c_raises_keyboard_interrupt():  # type: ignore[no-untyped-def]
    """Every test sees Python's own Ctrl-C handler, as a terminal's mer-train does. A test run
    started in the background (`cmd &`, nohup, some CI runners) inherits SIGINT ignored, and Python
    then installs no handler: the tests that signal themselves would see nothing happen."""
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(autouse=True, scope="session")
def _feature_cache_in_a_temporary_folder(tmp_path_factory):  # type: ignore[no-untyped-def]
    """mer-ingest's default feature cache (``$XDG_CACHE_HOME/mer-cli/features``) under the test
    run's temporary folder, for this process and every command it starts: tests never write to
    the user's cache, nor hit features an earlier run left there."""
    previous = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if previous is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = previous


# ---------------------------------------------------------------------------------------------
# The console scripts in a subprocess


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a command a test runs: this one, with the checkout's src/ first on
    PYTHONPATH and neither MER_DEBUG nor a sweep's job count from the shell that runs pytest;
    ``extra`` on top."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    for key in ("MER_DEBUG", PARALLEL_JOBS_ENV):
        env.pop(key, None)
    return {**env, **(extra or {})}


def cli_command(*args: str) -> list[str]:
    """``python -m mer_cli <args>``: a console script as a user runs it (``train ...``)."""
    return [sys.executable, "-m", "mer_cli", *args]


def main_command(command: str, *args: str, guarded: bool = False) -> list[str]:
    """``mer-<command> <args>`` run by its function in this interpreter: the command alone,
    ``mer_cli.cli.commands.<command>_main`` (``mer_cli.cli.<command>.main`` where the command has
    its own module), or with ``guarded`` the console script's own
    ``mer_cli.cli.entry.<command>`` (Ctrl-C guarded from its first line); sys.argv[0] is the
    console script's name either way."""
    if guarded:
        module, function = "mer_cli.cli.entry", command
    elif (REPO / "src" / "mer_cli" / "cli" / f"{command}.py").is_file():  # a command with its own module
        module, function = f"mer_cli.cli.{command}", "main"
    else:
        module, function = "mer_cli.cli.commands", f"{command}_main"
    code = f"import sys; sys.argv[0] = 'mer-{command}'; from {module} import {function}; {function}()"
    return [sys.executable, "-c", code, *args]


def run(
    argv: Sequence[str], cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """``argv`` to its end in ``cli_env(env)``, stdout and stderr captured as text."""
    return subprocess.run(
        list(argv), cwd=cwd, env=cli_env(env), capture_output=True, text=True, timeout=timeout
    )


def start(
    argv: Sequence[str],
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    stderr: int = subprocess.PIPE,
) -> subprocess.Popen[str]:
    """``argv`` started in the background in ``cli_env(env)`` as a foreground console script
    runs: stdout discarded, stderr piped (or ``stderr``), SIGINT at its default (a background job
    inherits it ignored), for tests that signal a run."""
    return subprocess.Popen(
        list(argv),
        cwd=cwd,
        env=cli_env(env),
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def run_cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m mer_cli <args>`` as a user would run the console script (from the
    checkout unless ``cwd``)."""
    return run(
        cli_command(*args), cwd=cwd or REPO, env={"PYTHONUNBUFFERED": "1", **(env or {})}, timeout=timeout
    )


def start_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start ``python -m mer_cli <args>`` in the background (see ``start``)."""
    return start(cli_command(*args), cwd=cwd, env=env)


def run_main(
    command: str,
    *args: str,
    guarded: bool = False,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    """Run ``mer-<command> <args>`` by its function (see ``main_command``)."""
    return run(main_command(command, *args, guarded=guarded), cwd=cwd, env=env, timeout=timeout)


def wait_for(proc: subprocess.Popen[str], path: Path) -> None:
    """Until ``path`` exists (a run's first ``last.pt``, say) or ``proc`` has ended: polling the
    file, not timing."""
    while not path.exists() and proc.poll() is None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.05)


# ---------------------------------------------------------------------------------------------
# Configs, as mer-train composes them


def compose_train(*overrides: str, with_hydra: bool = False) -> DictConfig:
    """The ``train`` config with ``overrides`` (and with ``with_hydra``, Hydra's own node)."""
    from mer_cli.cli.commands import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=with_hydra)


def smoke_config(*overrides: str) -> dict[str, Any]:
    """``experiment=smoke`` plus ``overrides``, resolved to the plain dict a run's config.yaml holds."""
    return OmegaConf.to_container(compose_train("experiment=smoke", *overrides), resolve=True)  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# Hand-built data and models


class SignalWhenPickled:
    """Sends ``signum`` to this process while torch.save is pickling it: the signal then
    arrives inside the zip writer, the moment a real Ctrl-C hits by bad luck."""

    def __init__(self, signum: int) -> None:
        self.signum = signum

    def __reduce__(self):  # type: ignore[no-untyped-def]
        os.kill(os.getpid(), self.signum)
        return (collections.OrderedDict, ())


def make_split(
    name: str,
    n: int,
    rng: np.random.Generator,
    n_classes: int = 6,
    d_a: int = 5,
    d_v: int = 3,
    prefix: str = "",
) -> Split:
    labels = np.arange(n) % n_classes
    return Split(
        name=name,
        clip_ids=tuple(f"{prefix}{name}_{i}" for i in range(n)),
        mfcc=tuple(rng.standard_normal((int(rng.integers(5, 30)), d_a)).astype(np.float32) for _ in range(n)),
        aus=tuple(rng.standard_normal((int(rng.integers(2, 10)), d_v)).astype(np.float32) for _ in range(n)),
        labels=labels.astype(np.int64),
    )


@pytest.fixture
def tiny_splits() -> Splits:
    rng = np.random.default_rng(0)
    return Splits(
        make_split("train", 24, rng),
        make_split("val", 12, rng),
        make_split("test", 12, rng),
        class_names=NOTEBOOK_CLASS_NAMES,
        source="tiny",
    )


STREAM = "x"  # the input stream of the hand-built sets and models below


def bilstm(
    n_features: int,
    n_classes: int,
    hidden_sizes: tuple[int, ...] = (512, 256),
    dense_size: int = 512,
    dropout: float = 0.8,
    masking: str = "reverse",
) -> Classifier:
    """A BiLSTM classifier reading the stream ``STREAM`` (the notebook's sizes by default)."""
    return Classifier(
        {STREAM: n_features},
        n_classes,
        lambda f: BiLSTMEncoder(f, hidden_sizes, dropout, masking),
        dense_size=dense_size,
        dropout=dropout,
    )


def padded_set(x: torch.Tensor, lengths: torch.Tensor, y: torch.Tensor) -> SequenceSet:
    """A one-stream ``SequenceSet`` from padded frames (B, T, F): clip i keeps ``x[i, :lengths[i]]``."""
    clips = [x[i, : int(n)].numpy() for i, n in enumerate(lengths)]
    offsets = np.concatenate([[0], np.cumsum([len(c) for c in clips])]).astype(np.int64)
    frames = np.concatenate(clips).astype(np.float32)
    ids = tuple(f"c{i}" for i in range(len(clips)))
    return SequenceSet({STREAM: Ragged(frames, offsets, int(x.shape[1]))}, y, ids)


def inputs(x: torch.Tensor, lengths: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A batch of one stream as a model's input."""
    return {STREAM: (x, lengths)}


# ---------------------------------------------------------------------------------------------
# Generated WAV files and OpenFace CSVs (mer-ingest's and mer-predict's inputs)

EMOTIONS = list(ingest.CREMA_D_EMOTIONS)  # NEU ANG HAP FEA DIS SAD, label order


def write_wav(path: Path, seconds: float, sample_rate: int, freq: float, seed: int = 0) -> None:
    """A 16-bit mono tone plus noise (stdlib wave: no audio library needed to make test data)."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    y = 0.5 * np.sin(2 * np.pi * freq * t) + 0.05 * np.random.default_rng(seed).normal(size=t.size)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes((np.clip(y, -1, 1) * 32767).astype("<i2").tobytes())


def write_openface_csv(path: Path, n_frames: int, level: float, failed: tuple[int, ...] = ()) -> None:
    """An OpenFace FeatureExtraction-like CSV: ', '-separated header, AU intensities and presences."""
    extra = ["AU01_c", "AU12_c"]
    header = ["frame", "face_id", "timestamp", "confidence", "success", *openface.AU_COLUMNS, *extra]
    lines = [", ".join(header)]
    for i in range(n_frames):
        ok = i not in failed
        aus = [level + 0.1 * j + 0.01 * i if ok else 0.0 for j in range(len(openface.AU_COLUMNS))]
        row = [i + 1, 0, round(i / 30, 3), 0.98 if ok else 0.0, int(ok), *aus, 1, 0]
        lines.append(", ".join(str(v) for v in row))
    path.write_text("\n".join(lines) + "\n")


def ingest_folder(
    audio: Path,
    video: Path,
    out: Path,
    audio_settings: mfcc.Settings | None = None,
    **kwargs: Any,
) -> tuple[Splits, ingest.IngestReport]:
    """mer-ingest's MFCC + OpenFace back-ends over two folders into ``out`` (a directory or an
    .npz), read back, and what was left out."""
    extractors = {
        "acoustic": mfcc.Extractor(audio_settings or mfcc.Settings()),
        "visual": openface.Extractor(openface.Settings()),
    }
    done = ingest.write(out, audio, video, extractors, ingest.Names(), progress=False, **kwargs)
    return formats.read(out), done.report


def save_tiny_speech_encoder(folder: Path) -> Path:
    """A randomly initialised WavLM (2 layers of 32, the standard 7-layer CNN at 50 frames/s,
    thin) and its feature extractor, saved as a local model directory: what a user's
    downloaded encoder looks like to mer-ingest, with no download."""
    import transformers

    conv = {
        "conv_dim": (16,) * 7,
        "conv_stride": (5, 2, 2, 2, 2, 2, 2),
        "conv_kernel": (10, 3, 3, 3, 3, 2, 2),
    }
    config = transformers.WavLMConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        feat_extract_norm="layer",
        **conv,
    )
    torch.manual_seed(0)
    transformers.WavLMModel(config).save_pretrained(folder)
    transformers.Wav2Vec2FeatureExtractor(return_attention_mask=True).save_pretrained(folder)
    return folder


# tiny randomly initialised pretrained models, saved as local model directories (no download)
VISION_TINY = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
}
VIDEO_SIZE = 64  # video frames are SIZE x SIZE pixels


def save_vision_model(folder: Path, kind: str) -> Path:
    from transformers import (
        BitImageProcessor,
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
        Dinov2Config,
        Dinov2Model,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    torch.manual_seed(0)
    square = {"height": 32, "width": 32}
    if kind == "clip":
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION_TINY, projection_dim=16))
        processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=square)
    elif kind == "clip_full":  # a whole CLIP checkpoint (text tower too), as the hub has them
        text = {k: v for k, v in VISION_TINY.items() if "image" not in k and "patch" not in k}
        text["vocab_size"] = 99
        model = CLIPModel(CLIPConfig(vision_config=VISION_TINY, text_config=text, projection_dim=16))
        processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=square)
    elif kind == "dinov2":
        model = Dinov2Model(Dinov2Config(**VISION_TINY))
        processor = BitImageProcessor(size={"shortest_edge": 36}, crop_size=square)
    else:
        model = ViTModel(ViTConfig(**VISION_TINY), add_pooling_layer=False)
        processor = ViTImageProcessor(size=square)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


EMOTION2VEC_WIDTH = 32
# emotion2vec's front end at 1/16 of its width (7 convolutions, 320 samples per frame, 400 seen
# by one), one pre-net block and one transformer block of 4 heads
EMOTION2VEC_TINY = {
    "depth": 1,
    "embed_dim": EMOTION2VEC_WIDTH,
    "num_heads": 4,
    "mlp_ratio": 2.0,
    "norm_eps": 1e-5,
    "norm_affine": True,
    "layer_norm_first": False,
    "end_of_block_targets": False,
    "normalize": True,
    "layerdrop": 0.0,
    "dropout_input": 0.0,
    "encoder_dropout": 0.0,
    "post_mlp_drop": 0.0,
    "attention_dropout": 0.0,
    "activation_dropout": 0.0,
    "start_drop_path_rate": 0.0,
    "end_drop_path_rate": 0.0,
    "modalities": {
        "audio": {
            "type": "AUDIO",
            "feature_encoder_spec": "[(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2",
            "extractor_mode": "layer_norm",
            "conv_pos_width": 8,
            "conv_pos_groups": 4,
            "conv_pos_depth": 2,
            "conv_pos_pre_ln": False,
            "prenet_depth": 1,
            "prenet_layerdrop": 0.0,
            "prenet_dropout": 0.0,
            "start_drop_path_rate": 0.0,
            "end_drop_path_rate": 0.0,
            "num_extra_tokens": 2,
            "init_extra_token_zero": False,
            "use_alibi_encoder": True,
            "alibi_scale": 1.0,
            "learned_alibi": False,
            "alibi_max_pos": None,
            "learned_alibi_scale": True,
            "learned_alibi_scale_per_head": True,
            "learned_alibi_scale_per_layer": False,
            "num_alibi_heads": 4,
            "model_depth": 1,
            "mask_noise_std": 0.01,
            "local_grad_mult": 1.0,
            "ema_local_encoder": False,
            "decoder": None,
        }
    },
}


def save_tiny_emotion2vec(folder: Path, seed: int = 0, conf: dict | None = None) -> Path:
    """A random emotion2vec in funasr's model-directory layout: config.yaml + model.pt."""
    from funasr.register import tables

    conf = conf or EMOTION2VEC_TINY
    torch.manual_seed(seed)
    model = tables.model_classes.get("Emotion2vec")(model_conf=conf)
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": "Emotion2vec", "model_conf": conf}))
    torch.save(model.state_dict(), folder / "model.pt")
    return folder


def write_video(path: Path, seconds: float = 2.0, rate: int = 25, codec: str = "libx264") -> Path:
    """Two coloured squares crossing a grey frame, ``rate`` frames per second."""
    import av

    n = round(seconds * rate)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width = stream.height = VIDEO_SIZE
        stream.pix_fmt = "yuv420p"
        for i in range(n):
            img = np.full((VIDEO_SIZE, VIDEO_SIZE, 3), 90, dtype=np.uint8)
            x = round(i * (VIDEO_SIZE - 16) / max(1, n - 1))
            img[8:24, x : x + 16] = (230, 40, 40)
            img[40:56, VIDEO_SIZE - 16 - x : VIDEO_SIZE - x] = (40, 200, 60)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def make_folder(root: Path, n_actors: int = 6) -> tuple[Path, Path]:
    """One ~1 s clip per actor and emotion: a WAV whose pitch and a face whose AUs follow the emotion."""
    audio, video = root / "wav", root / "openface"
    audio.mkdir(parents=True)
    video.mkdir(parents=True)
    for a in range(n_actors):
        for label, code in enumerate(EMOTIONS):
            stem = f"{1001 + a}_DFA_{code}_XX"
            write_wav(audio / f"{stem}.wav", 1.0, 16000, 150.0 + 60 * label, seed=a * 10 + label)
            write_openface_csv(video / f"{stem}.csv", 30, level=float(label), failed=(3, 4))
    return audio, video


# ---------------------------------------------------------------------------------------------
# Comparison reports: run directories as mer-train leaves them, made up

CLASSES = ("a", "b", "c", "d")


def fake_run(root: Path, modality: str, seed: int, y_true: np.ndarray, y_pred: np.ndarray) -> Path:
    """A run directory as mer-train leaves it, predicting ``y_pred`` with confidence 0.7."""
    run = root / f"{modality}_seed{seed}"
    run.mkdir(parents=True)
    prob = np.full((len(y_true), len(CLASSES)), 0.1)
    prob[np.arange(len(y_true)), y_pred] = 0.7
    clip_ids = tuple(f"{actor:04d}_clip{i}" for i, actor in enumerate(1001 + np.arange(len(y_true)) // 4))
    test = outputs.Predictions("test", clip_ids, y_true, prob)
    metrics = {"run": {"seed": seed, "modality": modality}, "test": score(y_true, prob, CLASSES)}
    outputs.write(run, metrics, None, [test], CLASSES, save_plots=False)
    (run / "config.yaml").write_text(f"seed: {seed}\nmodality:\n  name: {modality}\n")
    return run


def markdown(result: dict, runs: list[Run]) -> str:
    figures = {k: ["x.png"] for k in (*options.BAR_METRICS, *options.GRIDS)}
    return to_markdown("t", document(result, runs, figures, Path("/")))


def write_pickle(path: Path, splits: Splits) -> Path:
    """``splits`` as the notebook's feature pickle: {split: {clip id: (mfcc, aus, label)}}."""
    raw = {
        s.name: {c: (m, a, int(y)) for c, m, a, y in zip(s.clip_ids, s.mfcc, s.aus, s.labels, strict=True)}
        for s in splits.all()
    }
    path.write_bytes(pickle.dumps(raw))
    return path


@pytest.fixture
def one_thread():
    """Toy models train fastest on one thread (and a loaded CI machine is not oversubscribed)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

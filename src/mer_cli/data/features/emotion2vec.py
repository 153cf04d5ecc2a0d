"""emotion2vec frame features of a recording, through funasr, from a model on this machine only.

Input: a WAV/FLAC/OGG file, read through `audio.load` at 16 kHz (emotion2vec's only rate).
Output: (T, embed_dim) float32 frames, funasr's ``granularity="frame"`` output (the last
transformer block's, extra tokens removed): with emotion2vec's convolutional front end (7 layers,
strides 5 * 2^6) T = floor((n - 400) / 320) + 1 for n samples (50 frames/s; 149 for 3 s),
frame k covering samples [320 k, 320 k + 400); the record's rate comes from the config's strides.
The MFCC back-end gives 301 frames for 3 s: early fusion stretches one stream to the other's
count (about x2).

The model is never downloaded: ``model_path`` (a directory holding funasr's layout, config.yaml
+ model.pt) or ``model_id`` looked up in the local ModelScope or Hugging Face cache with
local_files_only (no hub call). funasr's own loader (AutoModel) is not used: it keeps random
weights where model.pt lacks a tensor or has another shape, and it seeds every RNG, sets
torch's thread count and the root logger; here funasr's Emotion2vec class is built from
config.yaml and every weight it uses must come from model.pt. config.yaml is trusted: funasr
evaluates its ``feature_encoder_spec``. The record's ``weights`` is a hash of model.pt and
config.yaml, ``funasr_version`` the code that ran them.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mer_cli.core.errors import ConfigError, DataError, one_line
from mer_cli.data.features import audio
from mer_cli.data.features.base import Backend, Frames, each_file, settings_record
from mer_cli.data.features.cache import content_hash

SAMPLE_RATE = 16000  # Hz: what emotion2vec was trained on
HUBS = ("modelscope", "huggingface")
MODEL_FILES = ("config.yaml", "model.pt")
# the pre-training decoder: built from config.yaml but never run for features, so model.pt need
# not hold its weights
UNUSED_PREFIXES = ("modality_encoders.AUDIO.decoder.",)
INSTALL = "the emotion2vec back-end needs funasr: pip install 'mer-cli[emotion2vec]'"


@dataclass(frozen=True)
class Settings:
    """Defaults: emotion2vec+ base from the local ModelScope cache, on the CPU."""

    model_id: str = "iic/emotion2vec_plus_base"  # the model's name on its hub (the record's)
    model_path: str | None = None  # a local directory with config.yaml + model.pt; None: the hub's cache
    hub: str = "modelscope"  # modelscope | huggingface: whose local cache holds model_id
    device: str = "cpu"  # cpu | cuda | cuda:N

    def __post_init__(self) -> None:
        if self.hub not in HUBS:
            raise ConfigError(f"hub {self.hub!r}: valid: {', '.join(HUBS)}")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ConfigError(f"device {self.device!r}: valid: cpu, cuda, cuda:N")


@contextlib.contextmanager
def contained() -> Iterator[None]:
    """Keeps what importing funasr changes for the whole process to funasr: it prints a notice on
    stdout (mer-predict's output), adds an ignore-every-warning filter and a root log handler at
    INFO, and sets HYDRA_FULL_ERROR."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    hydra_env = os.environ.get("HYDRA_FULL_ERROR")
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        root.handlers[:], root.level = handlers, level
        if hydra_env is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = hydra_env


def emotion2vec_class() -> tuple[type, str]:
    """funasr's Emotion2vec model class and funasr's version; `ConfigError` without funasr."""
    try:
        with contained():
            import funasr
            from funasr.register import tables
    except ImportError as e:
        raise ConfigError(INSTALL) from e
    cls = tables.model_classes.get("Emotion2vec")
    if cls is None:  # funasr imports its models one by one and keeps going past a failure
        why = funasr.get_import_errors().get("funasr.models.emotion2vec.model", "not registered")
        raise ConfigError(f"funasr {funasr.__version__} has no Emotion2vec model: {one_line(why)}")
    return cls, str(funasr.__version__)


def find_model_dir(settings: Settings) -> Path:
    """The directory holding the model's files: ``model_path``, or ``model_id`` in the hub's
    local cache. `ConfigError` (one line naming the path or id) where it is not on this machine."""
    if settings.model_path is not None:
        where = Path(settings.model_path).expanduser()
        if not where.is_dir():
            raise ConfigError(f"emotion2vec model {where}: no such directory")
    else:
        try:
            if settings.hub == "modelscope":
                from modelscope.hub.snapshot_download import snapshot_download as ms_snapshot

                # MODELSCOPE_CACHE read here: modelscope keeps the first root it saw for the process
                cache = os.environ.get("MODELSCOPE_CACHE")
                where = Path(ms_snapshot(settings.model_id, cache_dir=cache, local_files_only=True))
            else:
                from huggingface_hub import snapshot_download as hf_snapshot

                where = Path(hf_snapshot(settings.model_id, local_files_only=True))
        except ImportError as e:
            raise ConfigError(INSTALL) from e
        except Exception as e:  # each hub has its own not-cached error
            raise ConfigError(
                f"emotion2vec model {settings.model_id} is not in the local {settings.hub} cache "
                "(nothing is downloaded): fetch it once, or set model_path to its directory "
                f"({one_line(e, 120)})"
            ) from e
    missing = [f for f in MODEL_FILES if not (where / f).is_file()]
    if missing:
        raise ConfigError(f"emotion2vec model {where}: no {', '.join(missing)} (funasr's layout)")
    return where


def revision_of(model_dir: Path) -> str:
    """A hash of the weights and the config that shapes them (what makes the frames)."""
    h = hashlib.blake2b(digest_size=16)
    for name in MODEL_FILES:
        h.update(content_hash(model_dir / name).encode())
    return h.hexdigest()


def load_model(cls: type, model_dir: Path, device: str) -> Any:
    """``cls`` (funasr's Emotion2vec) built from ``model_dir``/config.yaml with every weight it
    uses from model.pt, in eval mode on ``device``. `DataError` (one line naming the file) otherwise."""
    import torch
    from omegaconf import OmegaConf

    config_file, weights_file = (model_dir / f for f in MODEL_FILES)
    try:
        config = OmegaConf.to_container(OmegaConf.load(config_file), resolve=True)
    except Exception as e:
        raise DataError(f"{config_file}: not a funasr config ({one_line(e, 120)})") from e
    if not isinstance(config, dict) or config.get("model") != "Emotion2vec" or "model_conf" not in config:
        raise DataError(f"{config_file}: not an emotion2vec config (model: Emotion2vec, model_conf: ...)")
    model = cls(model_conf=config["model_conf"])  # no vocab_size: no emotion head, frames only
    try:
        state = torch.load(weights_file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DataError(f"{weights_file}: cannot be read as torch weights ({one_line(e, 120)})") from e
    for key in ("state_dict", "model_state_dict", "model"):  # the wrappers funasr's checkpoints use
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise DataError(f"{weights_file}: holds no state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from a DataParallel wrapper
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.startswith(UNUSED_PREFIXES)]
    reshaped = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or reshaped:
        what, keys = ("lacks", missing) if missing else ("has other shapes for", reshaped)
        raise DataError(
            f"{weights_file}: not the weights of its config.yaml: it {what} {', '.join(keys[:3])}"
        )
    model.load_state_dict({k: state[k] for k in own if k in state}, strict=False)
    return model.to(device).eval()


def conv_geometry(model: Any) -> tuple[int, int]:
    """(samples per frame, samples one frame sees) of emotion2vec's convolutional front end."""
    hop, field = 1, 1
    for _dim, kernel, stride in model.modality_encoders["AUDIO"].feature_enc_layers:
        field += (kernel - 1) * hop
        hop *= stride
    return hop, field


class Extractor:
    batch_size = 1  # funasr's emotion2vec inference runs one unpadded clip at a time

    def __init__(self, settings: Settings) -> None:
        import torch

        self.settings = settings
        self.model_dir = find_model_dir(settings)
        cls, self.funasr_version = emotion2vec_class()
        if settings.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device {settings.device}: torch sees no CUDA GPU")
        self.model = load_model(cls, self.model_dir, settings.device)
        self.revision = revision_of(self.model_dir)
        self.hop, self.field = conv_geometry(self.model)
        self.n_features = int(self.model.cfg.get("embed_dim"))

    def frames(self, path: Path) -> np.ndarray:
        """(T, embed_dim) float32 emotion2vec frames of the recording at ``path``."""
        import torch

        y = audio.load(path, SAMPLE_RATE)
        if y.size < self.field:
            raise ValueError(
                f"too short: {1000 * y.size / SAMPLE_RATE:.1f} ms of audio, less than the "
                f"{1000 * self.field / SAMPLE_RATE:g} ms one emotion2vec frame sees"
            )
        with torch.no_grad():
            results, _ = self.model.inference(
                [y], key=[path.stem], granularity="frame", device=self.settings.device
            )
        return np.ascontiguousarray(results[0]["feats"], dtype=np.float32)

    def extract(self, paths: Sequence[Path]) -> list[Frames | str]:
        return each_file(paths, self.frames)

    def record(self) -> dict[str, Any]:
        return {
            **settings_record("emotion2vec", self.settings),
            "model_path": str(self.model_dir),
            "weights": self.revision,  # which weights, wherever they lie
            "funasr_version": self.funasr_version,
            "sample_rate": SAMPLE_RATE,
            "frame_rate_hz": SAMPLE_RATE / self.hop,
            "feature_names": None,
            "n_features": self.n_features,
        }


BACKEND = Backend(
    name="emotion2vec",
    stream="acoustic",
    what="emotion2vec frame features (funasr), from a local model directory or cache",
    file_patterns=audio.PATTERNS,
    settings=Settings,
    open=Extractor,
    extra="emotion2vec",
    model_setting="model_path",
)

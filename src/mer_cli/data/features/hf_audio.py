"""Self-supervised speech encoders through Hugging Face transformers: WavLM, HuBERT, wav2vec 2.0,
data2vec-audio and the Whisper encoder, as per-frame features of a recording.

Input: a WAV/FLAC/OGG file, resampled through `audio.load` to the feature extractor's rate
(16 kHz for the standard checkpoints). Output: (T, L * D) float32 frames at the encoder's rate
(sample rate / product of the CNN strides: 50 Hz for the standard configs and for Whisper), the
selected hidden states stacked layer-major: columns ``[l*D:(l+1)*D]`` are layer ``layers[l]``.

Hidden-state indices follow transformers' ``output_hidden_states``: 0 is the CNN/embedding output
(for wav2vec 2.0-style models the projected CNN features with the convolutional positions, for
Whisper the conv stem plus positions), 1..N are the outputs of the N transformer layers.

Long recordings are encoded in overlapping windows (``chunk_seconds``, ``chunk_overlap_seconds``)
that start on frame boundaries; each frame is taken from the window where it lies farthest from
an edge, so the frame count and rate equal a whole-file encoding's. Whisper pads every input to
its 30 s window: its frames past the real audio are cut off.

Models are never downloaded: ``model`` is a local directory, or a hub id already in the local
Hugging Face cache (``local_files_only``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mer_cli.core.errors import ConfigError, one_line
from mer_cli.data.features import audio
from mer_cli.data.features.base import Backend, Frames, settings_record

MODEL_TYPES = ("wav2vec2", "hubert", "wavlm", "data2vec-audio", "whisper")
DTYPES = ("float32", "bfloat16", "float16")
_MISSING = "the hf back-end needs transformers: pip install 'mer-cli[hf]'"


@dataclass(frozen=True)
class Settings:
    """Defaults: WavLM Base+ from the local Hugging Face cache, every hidden state, 20 s windows
    overlapping by 2 s, eight files per batch, float32 on the CPU.

    ``layers``: one index N, a range "A-B" (inclusive), a list, or "all" (0..N; 0 = the CNN /
    embedding output, 1..N the transformer layers). ``revision``: a hub revision (branch, tag or
    commit) for a hub id (a directory is one revision: not looked at); the record pins the weights
    by their hash (``weights``). bfloat16 and float16 run only
    on an accelerator (``device`` cuda...): on the CPU they are slow and change the features."""

    model: str = "microsoft/wavlm-base-plus"  # a local directory, or a hub id in the local HF cache
    revision: str | None = None
    layers: int | str | tuple[int, ...] = "all"
    chunk_seconds: float = 20.0
    chunk_overlap_seconds: float = 2.0
    batch_size: int = 8
    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))
        if not str(self.model).strip():
            raise ConfigError("hf: model: name a local directory or a hub id in the local HF cache")
        select_layers(self.layers, None)  # the syntax; the range needs the model
        if not self.chunk_seconds > 0 or not 0 <= self.chunk_overlap_seconds < self.chunk_seconds:
            raise ConfigError(
                f"hf: chunk_seconds {self.chunk_seconds}, chunk_overlap_seconds "
                f"{self.chunk_overlap_seconds}: need 0 <= overlap < chunk"
            )
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"hf: batch_size {self.batch_size!r}: need a whole number >= 1")
        if self.dtype not in DTYPES:
            raise ConfigError(f"hf: dtype {self.dtype!r}: valid: {', '.join(DTYPES)}")
        if self.dtype != "float32" and str(self.device).startswith("cpu"):
            raise ConfigError(
                f"hf: dtype {self.dtype} needs an accelerator (device: cuda); on the cpu use float32"
            )


def select_layers(spec: int | str | Sequence[int], n_layers: int | None) -> tuple[int, ...]:
    """The hidden-state indices ``spec`` names, in its order (0..``n_layers``; None: check only
    the syntax, "all" is then empty)."""
    where = f"hf: layers {spec!r}"
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text == "all":
            return tuple(range(n_layers + 1)) if n_layers is not None else ()
        try:
            if "-" in text.lstrip("-"):
                a, b = (int(v) for v in text.split("-", 1))
                if b < a:
                    raise ConfigError(f"{where}: the range runs backwards")
                picked: tuple[int, ...] = tuple(range(a, b + 1))
            else:
                picked = tuple(int(v) for v in text.replace(",", " ").split())
        except ValueError as e:
            raise ConfigError(f"{where}: use one N, a range A-B, a list, or all") from e
    elif isinstance(spec, int) and not isinstance(spec, bool):
        picked = (spec,)
    elif isinstance(spec, Sequence) and all(isinstance(v, int) and not isinstance(v, bool) for v in spec):
        picked = tuple(int(v) for v in spec)
    else:
        raise ConfigError(f"{where}: use one N, a range A-B, a list, or all")
    if not picked or len(set(picked)) != len(picked):
        raise ConfigError(f"{where}: name each layer once, at least one")
    top = n_layers if n_layers is not None else max(max(picked), 0)
    if min(picked) < 0 or max(picked) > top:
        raise ConfigError(f"{where}: the model has hidden states 0..{top}")
    return picked


def weights_hash(folder: Path) -> str:
    """The first 16 hex of sha256 over the bytes of the folder's *.safetensors and *.bin files
    in sorted name order: which weights a model directory or snapshot holds."""
    h = hashlib.sha256()
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    if not files:
        raise ConfigError(f"hf: model {folder}: no *.safetensors or *.bin weights in the directory")
    for p in files:
        with p.open("rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()[:16]


def locate(model: str, revision: str | None) -> tuple[Path, str, str | None, str]:
    """Where ``model`` lies on this machine, its id, its hub revision and its weights' hash: a
    directory (its id from its config or its name; no hub revision: ``revision`` is not looked at),
    or a hub id's snapshot in the local Hugging Face cache at ``revision`` (the snapshot's commit).
    The weights' hash (`weights_hash`) says which weights they are wherever they lie: it is what
    two records compare."""
    folder = Path(model).expanduser()
    if folder.is_dir():
        return folder.resolve(), directory_model_id(folder), None, weights_hash(folder)
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError as e:
        raise ConfigError(_MISSING) from e
    try:  # never the network: only what is already in the cache
        snapshot = Path(snapshot_download(repo_id=model, revision=revision, local_files_only=True))
    except Exception as e:  # not cached (LocalEntryNotFoundError) or not a valid id (HFValidationError)
        at = f"@{revision}" if revision else ""
        raise ConfigError(
            f"hf: model {model}{at} is not a directory and not in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}): download it once (hf download {model}, or huggingface-cli "
            f"download {model}) and set model to its directory or its id ({one_line(e, 80)})"
        ) from e
    return snapshot, model, snapshot.name, weights_hash(snapshot)


def directory_model_id(folder: Path) -> str:
    """The hub id a saved config names (``_name_or_path`` that is not a path), else the
    directory's name."""
    try:
        name = json.loads((folder / "config.json").read_text()).get("_name_or_path") or ""
    except (OSError, ValueError, AttributeError):
        name = ""
    return name if name and not name.startswith(("/", ".", "~")) and ":" not in name else folder.name


def import_transformers() -> tuple[Any, Any]:
    try:
        import torch
        import transformers
    except ImportError as e:
        raise ConfigError(_MISSING) from e
    return torch, transformers


def plan_chunks(n: int, chunk: int, step: int, stride: int) -> list[int]:
    """Start samples of the windows that cover ``n`` samples: ``chunk`` long, ``step`` apart
    (both multiples of ``stride``, the samples per frame); the last one ends at ``n``, moved
    back to the first frame boundary that leaves it at most a full window."""
    starts = [0]
    while starts[-1] + chunk < n:
        starts.append(starts[-1] + step)
    if len(starts) > 1:
        starts[-1] = max(starts[-2] + stride, -(-(n - chunk) // stride) * stride)
    return starts


def stitch(starts: Sequence[int], parts: Sequence[np.ndarray], chunk: int, stride: int) -> np.ndarray:
    """One recording's frames from its windows' (``starts``, ``parts`` (T_i, F)): each frame
    from the window where it lies farthest from an edge (overlaps split at their middle)."""
    offsets = [s // stride for s in starts]
    cuts = [0]
    for i in range(1, len(starts)):
        middle = (starts[i] + starts[i - 1] + chunk) // 2 // stride
        cuts.append(min(max(middle, offsets[i]), offsets[i - 1] + len(parts[i - 1])))
    cuts.append(offsets[-1] + len(parts[-1]))
    return np.concatenate(
        [x[cuts[i] - o : cuts[i + 1] - o] for i, (x, o) in enumerate(zip(parts, offsets, strict=True))]
    )


class Extractor:
    """An encoder and its feature extractor, loaded once (on ``device``, in ``dtype``, eval mode)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = s = settings
        torch, transformers = import_transformers()
        self.torch = torch
        self.folder, self.model_id, self.revision, self.weights = locate(s.model, s.revision)
        try:
            config = transformers.AutoConfig.from_pretrained(self.folder, local_files_only=True)
        except Exception as e:
            raise ConfigError(f"hf: model {self.folder}: no readable config.json ({one_line(e, 100)})") from e
        self.model_type = str(config.model_type)
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(
                f"hf: model {self.folder} is a {self.model_type} model: the hf back-end encodes "
                f"{', '.join(MODEL_TYPES)}"
            )
        if getattr(config, "add_adapter", False):
            raise ConfigError(
                f"hf: model {self.folder}: models with an adapter (add_adapter) are not supported"
            )
        self.whisper = self.model_type == "whisper"
        self.n_layers = int(config.encoder_layers if self.whisper else config.num_hidden_layers)
        self.layer_size = int(config.hidden_size)
        self.layers = select_layers(s.layers, self.n_layers)  # before the weights are read
        self.device = self.check_device(s.device)
        try:
            fe = transformers.AutoFeatureExtractor.from_pretrained(self.folder, local_files_only=True)
            model = transformers.AutoModel.from_pretrained(self.folder, local_files_only=True)
        except Exception as e:
            raise ConfigError(f"hf: model {self.folder}: cannot load it ({one_line(e, 120)})") from e
        self.model = model.get_encoder() if self.whisper else model  # Whisper: the encoder only
        self.model.to(device=self.device, dtype=getattr(torch, s.dtype)).eval()
        self.fe = fe
        self.sample_rate = int(fe.sampling_rate)
        self.frames_of, self.stride, self.min_samples = self.geometry(config)
        self.chunk = round(s.chunk_seconds * self.sample_rate) // self.stride * self.stride
        self.step = (
            (self.chunk - round(s.chunk_overlap_seconds * self.sample_rate)) // self.stride * self.stride
        )
        self.check_chunks()
        # padding changes a group-normed CNN's output (its statistics span the whole input) and
        # a model without an attention mask attends to the padding: such models go clip by clip
        self.batched = self.whisper or (
            bool(getattr(fe, "return_attention_mask", False))
            and getattr(config, "feat_extract_norm", "layer") != "group"
        )
        self.batch_size = s.batch_size if self.batched else 1

    def check_device(self, device: str) -> Any:
        torch = self.torch
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ConfigError(f"hf: device {device!r}: not a torch device (cpu, cuda, cuda:1, ...)") from e
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"hf: device {device}: torch sees no CUDA device here; use cpu")
        return dev

    def geometry(self, config: Any) -> tuple[Callable[[int], int], int, int]:
        """The frames of n samples, the samples per frame and the fewest samples giving a frame."""
        if self.whisper:
            fe, enc = self.fe, self.model
            conv = int(enc.conv1.stride[0]) * int(enc.conv2.stride[0])
            if (
                fe.nb_max_frames != conv * config.max_source_positions
                or fe.feature_size != config.num_mel_bins
            ):
                raise ConfigError(
                    f"hf: model {self.folder}: its feature extractor gives {fe.feature_size} mel bins x "
                    f"{fe.nb_max_frames} frames, the encoder expects {config.num_mel_bins} x "
                    f"{conv * config.max_source_positions}"
                )
            hop = int(fe.hop_length)
            # mel frames of the real audio (n // hop), then the stride-2 conv's ceil(m / 2)
            return (lambda n: -(-(n // hop) // conv)), hop * conv, hop
        kernels, strides = list(config.conv_kernel), list(config.conv_stride)

        def frames_of(n: int) -> int:
            for k, st in zip(kernels, strides, strict=True):
                n = (n - k) // st + 1 if n >= k else 0
            return n

        field = 1
        for k, st in zip(reversed(kernels), reversed(strides), strict=True):
            field = (field - 1) * st + k
        return frames_of, int(np.prod(strides)), field

    def check_chunks(self) -> None:
        s, ms = self.settings, 1000 / self.sample_rate
        if self.whisper and self.chunk > self.fe.n_samples:
            raise ConfigError(
                f"hf: chunk_seconds {s.chunk_seconds}: Whisper encodes at most "
                f"{self.fe.n_samples / self.sample_rate:g} s at a time"
            )
        if self.chunk - self.step < self.min_samples or self.step < self.stride:
            raise ConfigError(
                f"hf: chunk_seconds {s.chunk_seconds}, chunk_overlap_seconds {s.chunk_overlap_seconds}: "
                f"the overlap must cover the {self.min_samples * ms:g} ms the encoder needs for one "
                f"frame and leave windows at least {self.stride * ms:g} ms apart"
            )

    def extract(self, paths: Sequence[Path]) -> list[Frames | str]:
        out: list[Frames | str] = [""] * len(paths)
        segments: list[tuple[int, int, np.ndarray]] = []  # (file index, start sample, samples)
        for i, p in enumerate(paths):
            try:
                y = audio.load(p, self.sample_rate)
            except ConfigError:
                raise
            except Exception as e:  # soundfile raises many types for a bad file
                out[i] = one_line(e)
                continue
            if y.size < self.min_samples:
                out[i] = (
                    f"too short: {1000 * y.size / self.sample_rate:.1f} ms of audio, less than the "
                    f"{1000 * self.min_samples / self.sample_rate:g} ms the encoder needs for one frame"
                )
                continue
            segments += [
                (i, a, y[a : a + self.chunk]) for a in plan_chunks(y.size, self.chunk, self.step, self.stride)
            ]
        encoded: list[np.ndarray] = []
        size = self.batch_size
        for b in range(0, len(segments), size):
            encoded += self.encode([y for _, _, y in segments[b : b + size]])
        for i in sorted({seg[0] for seg in segments}):
            mine = [k for k, seg in enumerate(segments) if seg[0] == i]
            values = stitch(
                [segments[k][1] for k in mine], [encoded[k] for k in mine], self.chunk, self.stride
            )
            out[i] = Frames(np.ascontiguousarray(values, dtype=np.float32))
        return out

    def encode(self, batch: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Each window's (frames_of(n), L * D) float32 selected hidden states, layer-major."""
        torch = self.torch
        dtype = getattr(torch, self.settings.dtype)
        with torch.inference_mode():
            if self.whisper:  # log-mel, padded to the encoder's window
                inputs = self.fe(list(batch), sampling_rate=self.sample_rate, return_tensors="pt")
                hidden = self.model(
                    inputs["input_features"].to(self.device, dtype), output_hidden_states=True
                ).hidden_states
            else:  # padded to the longest; the attention mask where the feature extractor gives one
                inputs = self.fe(
                    list(batch), sampling_rate=self.sample_rate, padding=True, return_tensors="pt"
                )
                mask = inputs.get("attention_mask")
                hidden = self.model(
                    inputs["input_values"].to(self.device, dtype),
                    attention_mask=None if mask is None else mask.to(self.device),
                    output_hidden_states=True,
                ).hidden_states
            stacked = torch.cat([hidden[k] for k in self.layers], dim=-1).float().cpu().numpy()
        return [stacked[j, : self.frames_of(len(y))] for j, y in enumerate(batch)]

    def record(self) -> dict[str, Any]:
        return {
            **settings_record("hf", self.settings),
            "revision": self.revision,  # the snapshot's commit (None: a directory)
            "weights": self.weights,  # which weights, wherever they lie
            "layers": list(self.layers),
            "sample_rate": self.sample_rate,
            "model_type": self.model_type,
            "model_id": self.model_id,
            "model_path": str(self.folder),
            "layer_size": self.layer_size,
            "frame_rate_hz": self.sample_rate / self.stride,
            "feature_names": None,
        }


BACKEND = Backend(
    name="hf",
    stream="acoustic",
    what="self-supervised speech encoders (WavLM, HuBERT, wav2vec 2.0, data2vec, Whisper) via transformers",
    file_patterns=audio.PATTERNS,
    settings=Settings,
    open=Extractor,
    extra="hf",
    model_setting="model",
)

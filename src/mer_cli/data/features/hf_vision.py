"""Frame embeddings of a video from a pretrained vision encoder through transformers: CLIP's
vision tower, DINOv2 or ViT, loaded from a local directory or the local Hugging Face cache only.

Input: a video file (mp4, avi, mov, mkv, webm), decoded with PyAV. Output: (T, D) float32, one
embedding per output frame at exactly ``fps`` frames per second whatever the container's rate:
output frame k is the decoded frame whose time (from the first frame) is nearest k / fps, for every
k / fps before the end of the video: T = ceil(duration * fps). Each frame, RGB, optionally
cropped to its face box, goes through the model's image processor (the PIL one, the same with or
without torchvision) and the model, ``batch_size`` frames per forward; the embedding is the
final CLS token (CLIP's pooler output), the mean of the patch tokens, or CLIP's projected image
embedding.

Face boxes (``boxes_dir``): ``<boxes_dir>/<video stem>.csv``, one row per decoded frame that has a
face, columns ``frame`` (0-based index of the decoded frame) or ``timestamp`` (seconds from the
first frame), and ``x``, ``y``, ``w``, ``h``: the box's top-left corner and size in pixels of the
decoded frame. A frame whose row is missing or has empty cells has no face: invalid
(`Frames.valid`), and interpolated, dropped, zeroed, or kept as the whole frame's embedding, per
``invalid_frames``. Preset: configs/features/video/hf.yaml.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mer_cli.core.errors import ConfigError, one_line
from mer_cli.data.features.base import Backend, Frames, settings_record
from mer_cli.data.features.hf_audio import locate
from mer_cli.data.features.openface import fill_failed
from mer_cli.data.features.table import INVALID_FRAME_POLICIES, Table

POOLINGS = ("cls", "mean", "projection")  # projection: CLIP only
DTYPES = ("float32", "float16", "bfloat16")
MODEL_TYPES = ("clip", "clip_vision_model", "dinov2", "vit")  # config.model_type values it loads
FILES_PER_CALL = 8  # clips per extract call: short clips share forward batches
PATTERNS = ("*.mp4", "*.avi", "*.mov", "*.mkv", "*.webm")
NEEDS = "the hf video back-end needs PyAV and transformers: pip install 'mer-cli[video]'"


@dataclass(frozen=True)
class Settings:
    """Defaults: CLIP ViT-B/32 from the local Hugging Face cache, 5 frames/s, CPU float32. 5 frames/s: a
    facial expression's onset and apex last a few hundred ms (200 ms apart catches them), while
    frames 33-40 ms apart are near-duplicates to an image encoder; 10 forwards per 2 s clip."""

    model: str = "openai/clip-vit-base-patch32"  # a local directory, or a hub id in the local HF cache
    # a hub branch, tag or commit for a hub id (a directory is one revision); the record pins the
    # weights by their hash (hf_audio.weights_hash)
    revision: str | None = None
    fps: float = 5.0
    pooling: str = "cls"  # cls | mean | projection
    batch_size: int = 32  # frames per forward
    device: str = "cpu"
    dtype: str = "float32"  # float32; float16 | bfloat16 on an accelerator (embeddings are float32 anyway)
    boxes_dir: str | None = None
    box_margin: float = 0.1  # added to each side of a box, as a fraction of its width / height
    invalid_frames: str = "interpolate"  # interpolate | drop | zero | keep (keep: the whole frame)

    def __post_init__(self) -> None:
        for name, value, valid in (
            ("pooling", self.pooling, POOLINGS),
            ("dtype", self.dtype, DTYPES),
            ("invalid_frames", self.invalid_frames, INVALID_FRAME_POLICIES),
        ):
            if value not in valid:
                raise ConfigError(f"{name} {value!r}: valid: {', '.join(valid)}")
        if self.dtype != "float32" and str(self.device).startswith("cpu"):
            # half precision on the CPU is slow and changes the features: an accelerator's option
            raise ConfigError(
                f"dtype {self.dtype} needs an accelerator (device: cuda); on the cpu use float32"
            )
        if not self.fps > 0:
            raise ConfigError(f"fps {self.fps}: must be above 0")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size {self.batch_size}: at least 1")
        if self.box_margin < 0:
            raise ConfigError(f"box_margin {self.box_margin}: at least 0")


def picked_frames(path: Path, fps: float) -> Iterator[tuple[int, float, float, Any]]:
    """(decoded frame index, its time from the first frame in s, its duration in s, the
    `av.VideoFrame`) of output frames k = 0, 1, ...: the decoded frame nearest k / fps (ties: the
    earlier one), while k / fps is before the end of the last frame. Raises ValueError (one line)
    for no video stream or no frame."""
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame and slice threads: same frames, faster
        rate = float(stream.average_rate) if stream.average_rate else None
        prev: tuple[int, float, float, Any] | None = None
        origin, k = 0.0, 0
        for i, frame in enumerate(container.decode(stream)):
            t = frame.time if frame.time is not None else i / (rate or fps)
            if prev is None:
                origin = t
            t -= origin
            if prev is not None:
                while k / fps <= (prev[1] + t) / 2:
                    yield prev
                    k += 1
            ticks = getattr(frame, "duration", None)  # PyAV >= 13, in the stream's time base
            period = float(ticks * stream.time_base) if ticks else (1 / rate if rate else 0.0)
            prev = (i, t, period, frame)
        if prev is None:
            raise ValueError("no video frames")
        while k / fps < prev[1] + prev[2] - 1e-9:
            yield prev
            k += 1


class Boxes:
    """A clip's face boxes (see the module's docstring), read from ``path``. Raises ValueError
    (one line naming the file) for a missing or malformed one."""

    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise ValueError(f"no face boxes {path}")
        try:
            t = Table.read(path, ())
            assert t.header is not None  # a CSV always has one
            self.by_frame = "frame" in t.header
            keys = t.values(t.index("frame" if self.by_frame else "timestamp", "frame or"))
            xywh = np.stack([t.values(t.index(c, "box")) for c in "xywh"], axis=1)
        except (ValueError, OSError, UnicodeDecodeError) as e:
            raise ValueError(f"face boxes {path.name}: {e}") from e
        order = np.argsort(keys)
        order = order[np.isfinite(keys[order])]
        self.keys, self.xywh = keys[order], xywh[order]

    def get(self, index: int, time: float, period: float) -> tuple[float, float, float, float] | None:
        """The box (x, y, w, h) of decoded frame ``index`` at ``time`` s (a timestamp row
        matches within half the frame ``period``), or None."""
        if len(self.keys) == 0:
            return None
        target = float(index) if self.by_frame else time
        j = min(int(np.searchsorted(self.keys, target)), len(self.keys) - 1)
        if j > 0 and abs(self.keys[j - 1] - target) <= abs(self.keys[j] - target):
            j -= 1
        if abs(self.keys[j] - target) > (1e-6 if self.by_frame else period / 2 + 1e-6):
            return None
        x, y, w, h = (float(v) for v in self.xywh[j])
        return (x, y, w, h) if np.isfinite([x, y, w, h]).all() and w > 0 and h > 0 else None


def crop(rgb: np.ndarray, box: tuple[float, float, float, float], margin: float) -> np.ndarray | None:
    """``rgb`` (H, W, 3) cut to ``box`` (x, y, w, h) plus ``margin`` * w (h) on each side,
    clipped to the frame; None where nothing of it is inside."""
    x, y, w, h = box
    x0, x1 = max(0, math.floor(x - margin * w)), min(rgb.shape[1], math.ceil(x + w + margin * w))
    y0, y1 = max(0, math.floor(y - margin * h)), min(rgb.shape[0], math.ceil(y + h + margin * h))
    return rgb[y0:y1, x0:x1] if x1 > x0 and y1 > y0 else None


def load(settings: Settings) -> tuple[Any, Any, Path, str, str | None, str]:
    """(model in eval mode on the device, image processor, its directory, its id, hub revision,
    weights' hash)."""
    try:
        import av  # noqa: F401  (checked here: decoding needs it)
        import torch
        import transformers
    except ImportError as e:
        raise ConfigError(NEEDS) from e
    folder, model_id, revision, weights = locate(settings.model, settings.revision)
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        CLIPVisionModel,
        CLIPVisionModelWithProjection,
        Dinov2Model,
        ViTModel,
    )

    kind = AutoConfig.from_pretrained(folder, local_files_only=True).model_type
    if kind not in MODEL_TYPES:
        raise ConfigError(f"model {folder}: model_type {kind!r}: valid: {', '.join(MODEL_TYPES)}")
    if settings.pooling == "projection" and not kind.startswith("clip"):
        raise ConfigError(f"pooling projection: {kind} has no projection (CLIP only): use cls or mean")
    kwargs: dict[str, Any] = {"local_files_only": True}
    if kind.startswith("clip"):
        cls: Any = CLIPVisionModelWithProjection if settings.pooling == "projection" else CLIPVisionModel
    elif kind == "dinov2":
        cls = Dinov2Model
    else:
        cls, kwargs["add_pooling_layer"] = ViTModel, False  # its pooler is a classifier's, not the CLS
    # transformers 5 picks torchvision's processor where installed: pin the PIL one everywhere
    pil = {"backend": "pil"} if int(transformers.__version__.split(".")[0]) >= 5 else {"use_fast": False}
    verbosity, bars = (
        transformers.logging.get_verbosity(),
        transformers.utils.logging.is_progress_bar_enabled(),
    )
    transformers.logging.set_verbosity_error()  # a full CLIP's text tower is "unexpected": expected
    transformers.utils.logging.disable_progress_bar()
    try:
        model = cls.from_pretrained(folder, **kwargs)
        processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True, **pil)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model {folder}: {one_line(e)}") from e
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()
    try:
        model = model.to(device=settings.device, dtype=getattr(torch, settings.dtype)).eval()
    except (RuntimeError, AssertionError, ValueError) as e:
        raise ConfigError(f"device {settings.device}: {one_line(e)}") from e
    return model, processor, folder, model_id, revision, weights


@dataclass
class _Clip:
    n: int = 0  # output frames so far
    valid: list[bool] | None = None  # None: no boxes, every frame valid
    done: dict[int, np.ndarray] = field(default_factory=dict)  # output frame -> embedding


class Extractor:
    batch_size = FILES_PER_CALL

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.model, self.processor, self.folder, self.model_id, self.revision, self.weights = load(settings)
        self.dim: int | None = None

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(len(images), D) float32 embeddings of RGB ``images`` (H, W, 3) uint8."""
        import torch

        s = self.settings
        pixels = self.processor(images=list(images), return_tensors="pt", input_data_format="channels_last")
        x = pixels["pixel_values"].to(device=s.device, dtype=getattr(torch, s.dtype))
        with torch.inference_mode():
            out = self.model(pixel_values=x)
            if s.pooling == "projection":
                e = out.image_embeds
            elif s.pooling == "mean":
                e = out.last_hidden_state[:, 1:].mean(dim=1)  # the patch tokens (0 is CLS)
            elif self.model.config.model_type.startswith("clip"):
                e = out.pooler_output  # CLS after CLIP's post-layernorm
            else:
                e = out.last_hidden_state[:, 0]  # DINOv2's and ViT's last layer is layernormed
        self.dim = e.shape[1]
        return e.float().cpu().numpy()

    def images(self, path: Path, clip: _Clip) -> Iterator[tuple[int, np.ndarray]]:
        """(output frame, RGB image (H, W, 3) uint8 for the model) of ``path``'s frames, counting
        them and their validity in ``clip``; frames left without an image (no box) are skipped."""
        s = self.settings
        boxes = Boxes(Path(s.boxes_dir).expanduser() / f"{path.stem}.csv") if s.boxes_dir else None
        for index, time, period, frame in picked_frames(path, s.fps):
            k, clip.n = clip.n, clip.n + 1
            rgb = frame.to_ndarray(format="rgb24")
            if boxes is None or clip.valid is None:
                yield k, rgb
                continue
            box = boxes.get(index, time, period)
            face = crop(rgb, box, s.box_margin) if box is not None else None
            clip.valid.append(face is not None)
            if face is not None:
                yield k, np.ascontiguousarray(face)
            elif s.invalid_frames == "keep":
                yield k, rgb  # no face: the whole frame, the mask says so

    def extract(self, paths: Sequence[Path]) -> list[Frames | str]:
        import av

        size = self.settings.batch_size
        out: list[Frames | str | None] = [None] * len(paths)
        clips: dict[int, _Clip] = {}
        queue: list[tuple[int, int, np.ndarray]] = []  # (path index, output frame, image)

        def run(batch: list[tuple[int, int, np.ndarray]]) -> None:
            for (i, k, _), e in zip(batch, self.embed([b[2] for b in batch]), strict=True):
                if i in clips:
                    clips[i].done[k] = e

        for i, path in enumerate(paths):
            clip = clips[i] = _Clip(valid=[] if self.settings.boxes_dir else None)
            frames = self.images(path, clip)
            while True:
                try:
                    item = next(frames, None)
                except (av.FFmpegError, OSError, ValueError, EOFError) as e:  # this file's problem
                    del clips[i]
                    queue = [q for q in queue if q[0] != i]
                    out[i] = _message(e)
                    break
                if item is None:
                    break
                queue.append((i, *item))
                if len(queue) >= size:  # the model's errors stop every file: outside the try
                    run(queue[:size])
                    del queue[:size]
        if queue:
            run(queue)
        for i, clip in clips.items():
            out[i] = self._frames(clip)
        return out  # type: ignore[return-value]

    def _frames(self, clip: _Clip) -> Frames | str:
        if clip.n == 0:
            return "no frames at this rate"
        if clip.valid is not None and not any(clip.valid):
            return "no frame has a face box"
        assert self.dim is not None  # a valid frame has gone through the model
        x = np.zeros((clip.n, self.dim), dtype=np.float32)
        for k, e in clip.done.items():
            x[k] = e
        if clip.valid is None:
            return Frames(x)
        ok = np.array(clip.valid, dtype=bool)
        if self.settings.invalid_frames == "keep":
            return Frames(x, ok)
        x = fill_failed(x, ok, self.settings.invalid_frames)
        return Frames(x.astype(np.float32), ok[ok] if self.settings.invalid_frames == "drop" else ok)

    def record(self) -> dict[str, Any]:
        import av

        return {
            **settings_record("hf", self.settings),
            "revision": self.revision,  # the snapshot's commit (None: a directory)
            "weights": self.weights,  # which weights, wherever they lie
            "model_id": self.model_id,
            "model_path": str(self.folder),
            "frame_rate_hz": self.settings.fps,
            "feature_names": None,
            "pyav_version": av.__version__,
        }


def _message(e: Exception) -> str:
    # PyAV's errors read "[Errno 1094995529] Invalid data found when processing input: 'x.mp4'"
    strerror = getattr(e, "strerror", None)
    return one_line(f"cannot read the video: {strerror}" if strerror else e)


BACKEND = Backend(
    name="hf",
    stream="visual",
    what="frame embeddings from a vision encoder (CLIP, DINOv2, ViT) through transformers",
    file_patterns=PATTERNS,
    settings=Settings,
    open=Extractor,
    extra="video",
    model_setting="model",
)

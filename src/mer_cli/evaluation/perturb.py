"""Named corruptions of a split's clips, for robustness evaluation (`runs.robustness`).

Input: one data stream's clips (a sequence of (T_i, F) arrays: the data's own features, before
any preprocessing), an amount, the stream's training statistics (`Reference`) and a numpy
Generator. Output: new float32 clips (the input is never modified). Every corruption is pure:
the same clips, amount and generator state give the same output; `Condition.rng` makes that
generator from a seed and the condition alone, so a condition's corrupted data do not depend
on which other corruptions were asked for, or in which order.

Corruptions (`CORRUPTIONS`, one entry each; a new one is one entry):
  noise       Gaussian noise per feature, strength x the feature's training std (each stream)
  frame_drop  that fraction of each clip's visual frames lost at random positions (a face tracker
              losing the face): they become the training mean, the clip keeps its length and timing
  gap         one contiguous gap of that fraction of each visual clip, at a random position,
              filled with the training mean
  missing     a whole stream missing: "zeros" (every frame the training mean, i.e. zero after
              standardization, lengths kept) or "masked" (the model leaves the stream out; done
              where models are combined, `runs.robustness`: no clip is changed here)
  shift       the visual stream delayed against the acoustic one (seconds at the stream's frame
              rate, or frames where no rate is known): its first frames the training mean, its
              last ones cut (length kept)
  snr         white noise added to the recording itself at a signal-to-noise ratio (20, 10, 5,
              0 dB), the features then computed again by the run's own back-end: a waveform
              corruption (``on="waveform"``, `mix_at_snr`), done where the recordings are
              (`runs.robustness`, given the raw audio), never on features
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np

from mer_cli.core.errors import ConfigError, DataError
from mer_cli.core.registry import Registry
from mer_cli.preprocess import scaling


@dataclass(frozen=True)
class Reference:
    """One stream's training statistics per feature: what noise is scaled by, what a lost frame
    becomes. ``source`` says where they came from (the checkpoint's scaler, the train split)."""

    mean: np.ndarray  # (F,) float64
    std: np.ndarray  # (F,) float64; a constant feature's is 1, as the standard scaler stores it
    source: str


def reference_from_scaler(scaler: scaling.Scaler | None, source: str) -> Reference | None:
    """The statistics a fitted ``standard`` scaler holds (fitted on the training frames), or
    None: another kind's center and scale are not the features' mean and std."""
    if scaler is None or scaler.kind != "standard" or scaler.center is None or scaler.scale is None:
        return None
    return Reference(np.asarray(scaler.center, np.float64), np.asarray(scaler.scale, np.float64), source)


def reference_from_clips(train_clips: Sequence[np.ndarray], source: str) -> Reference:
    """Per-feature mean and std over every frame of the training clips (the standard scaler's
    own streamed fit, so both sources mean the same)."""
    scaler = scaling.fit("standard", train_clips)
    ref = reference_from_scaler(scaler, source)
    assert ref is not None  # a standard scaler always has a center and a scale
    return ref


# ---------------------------------------------------------------------------------------------
# The clip transforms: (clips, amount, reference, rng) -> new clips

ClipTransform = Callable[[Sequence[np.ndarray], float, Reference, np.random.Generator], list[np.ndarray]]


def lost_frames(n_frames: int, fraction: float) -> int:
    """How many of a clip's ``n_frames`` a ``fraction`` loses: rounded half up, so a stated
    fraction is kept as closely as whole frames allow."""
    return min(n_frames, math.floor(fraction * n_frames + 0.5))


def seconds_to_frames(seconds: float, frame_rate_hz: float) -> int:
    """A duration as whole frames at ``frame_rate_hz``, rounded half up (0.25 s at 30 fps: 8)."""
    return math.floor(seconds * frame_rate_hz + 0.5)


def add_noise(
    clips: Sequence[np.ndarray], strength: float, ref: Reference, rng: np.random.Generator
) -> list[np.ndarray]:
    """Every value plus N(0, (strength x its feature's training std)^2)."""
    scale = strength * ref.std
    return [
        (np.asarray(x, np.float64) + rng.standard_normal(x.shape) * scale).astype(np.float32) for x in clips
    ]


def drop_frames(
    clips: Sequence[np.ndarray], fraction: float, ref: Reference, rng: np.random.Generator
) -> list[np.ndarray]:
    """`lost_frames` of each clip's frames, drawn without replacement, set to the training mean."""
    out = []
    for x in clips:
        y = np.array(x, dtype=np.float32)
        y[rng.choice(len(y), size=lost_frames(len(y), fraction), replace=False)] = ref.mean
        out.append(y)
    return out


def drop_gap(
    clips: Sequence[np.ndarray], fraction: float, ref: Reference, rng: np.random.Generator
) -> list[np.ndarray]:
    """One run of `lost_frames` consecutive frames per clip, starting anywhere it fits, set to
    the training mean."""
    out = []
    for x in clips:
        y = np.array(x, dtype=np.float32)
        k = lost_frames(len(y), fraction)
        start = int(rng.integers(0, len(y) - k + 1))
        y[start : start + k] = ref.mean
        out.append(y)
    return out


def blank(
    clips: Sequence[np.ndarray], amount: float, ref: Reference, rng: np.random.Generator
) -> list[np.ndarray]:
    """Every frame the training mean, each clip's length kept (``amount`` and ``rng`` unused:
    a stream is missing or not)."""
    return [np.broadcast_to(ref.mean, np.shape(x)).astype(np.float32) for x in clips]


def delay(
    clips: Sequence[np.ndarray], frames: float, ref: Reference, rng: np.random.Generator
) -> list[np.ndarray]:
    """Each clip ``frames`` frames late: frame t shows what frame t - ``frames`` showed, the
    first ``frames`` are the training mean (nothing seen yet), the clip keeps its length."""
    k = int(frames)
    out = []
    for x in clips:
        y = np.empty(np.shape(x), dtype=np.float32)
        k_here = min(k, len(y))
        y[:k_here] = ref.mean
        y[k_here:] = x[: len(y) - k_here]
        out.append(y)
    return out


def mix_at_snr(signal: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """``signal`` (n,) plus white Gaussian noise scaled so that the ratio of the two's energies
    is exactly ``snr_db`` dB (10 log10 of sum(signal^2) / sum(noise^2)); float32. A silent
    signal stays silent (no energy to be relative to)."""
    x = np.asarray(signal, dtype=np.float64)
    noise = rng.standard_normal(x.shape)
    energy, noise_energy = float(np.sum(x * x)), float(np.sum(noise * noise))
    if energy == 0.0 or noise_energy == 0.0:
        return x.astype(np.float32)
    noise *= math.sqrt(energy / (noise_energy * 10.0 ** (snr_db / 10.0)))
    return (x + noise).astype(np.float32)


WaveTransform = Callable[[np.ndarray, float, np.random.Generator], np.ndarray]


# ---------------------------------------------------------------------------------------------
# The registry: what each corruption does, to which streams, at which strengths


@dataclass(frozen=True)
class Corruption:
    """One named corruption. ``variants``: how (its name -> clip transform; None: the model
    leaves the stream out, nothing is changed in the clips). ``streams``: the data streams it is
    applied to, one at a time. ``strengths`` in ``unit``; a ``timed`` corruption's are seconds,
    turned into frames at the stream's frame rate, or ``frame_strengths`` (frames) where no rate
    is known. ``needs_streams``: the streams a model must read for it to mean anything;
    ``whole_stream``: it takes the whole stream away (meaningless for the model's only one);
    ``on``: ``features`` (a clip transform of the data's frames) or ``waveform`` (a
    `WaveTransform` of each recording, whose features are then computed again)."""

    variants: Mapping[str, ClipTransform | WaveTransform | None]
    streams: tuple[str, ...]
    strengths: tuple[float, ...]
    unit: str
    timed: bool = False
    frame_strengths: tuple[float, ...] = ()
    needs_streams: int = 1
    whole_stream: bool = False
    on: str = "features"


CORRUPTIONS: Registry[Corruption] = Registry("corruption")
CORRUPTIONS.add(
    "noise",
    Corruption({"gaussian": add_noise}, ("acoustic", "visual"), (0.1, 0.25, 0.5, 1.0), "x train std"),
)
CORRUPTIONS.add(
    "frame_drop", Corruption({"random": drop_frames}, ("visual",), (0.1, 0.25, 0.5), "fraction of frames")
)
CORRUPTIONS.add(
    "gap", Corruption({"contiguous": drop_gap}, ("visual",), (0.1, 0.25, 0.5), "fraction of clip")
)
CORRUPTIONS.add(
    "missing",
    Corruption({"zeros": blank, "masked": None}, ("acoustic", "visual"), (1.0,), "stream", whole_stream=True),
)
CORRUPTIONS.add(
    "shift",
    Corruption(
        {"delay": delay},
        ("visual",),
        (0.1, 0.25, 0.5),
        "s",
        timed=True,
        frame_strengths=(3.0, 8.0, 15.0),  # about the seconds above at 30 frames/s (OpenFace video)
        needs_streams=2,  # out of step with the other stream: meaningless for a one-stream model
    ),
)
CORRUPTIONS.add(
    "snr", Corruption({"white": mix_at_snr}, ("acoustic",), (20.0, 10.0, 5.0, 0.0), "dB SNR", on="waveform")
)


@dataclass(frozen=True)
class Condition:
    """One corruption of one stream at one strength: a row of the robustness table.
    ``amount`` is what the clip transform takes (the strength, or a shift in frames)."""

    corruption: str
    variant: str
    stream: str
    strength: float
    unit: str
    amount: float

    @property
    def key(self) -> str:
        return f"{self.corruption}/{self.variant}/{self.stream}@{self.strength:g}"

    @property
    def on_waveform(self) -> bool:
        """It corrupts the recordings: their features are computed again."""
        return CORRUPTIONS.get(self.corruption).on == "waveform"

    @property
    def masked(self) -> bool:
        """The model leaves ``stream`` out: no clip transform."""
        return CORRUPTIONS.get(self.corruption).variants[self.variant] is None

    def rng(self, seed: int) -> np.random.Generator:
        """The generator this condition draws from: ``seed`` and the condition alone decide it."""
        return np.random.default_rng([int(seed), zlib.crc32(self.key.encode())])


def names(requested: Sequence[str] | None, where: str = "--perturb") -> tuple[str, ...]:
    """The corruptions asked for (None or empty: all, in registry order); an unknown name is
    one `ConfigError` line listing the valid ones."""
    if not requested:
        return CORRUPTIONS.names()
    for name in requested:
        CORRUPTIONS.get(name, where=where)
    return tuple(dict.fromkeys(requested))


def conditions(requested: Sequence[str], frame_rates: Mapping[str, float | None]) -> list[Condition]:
    """Every (corruption, variant, stream, strength) of the ``requested`` corruptions; a timed
    corruption's seconds become frames at ``frame_rates[stream]`` (frames per second, None:
    unknown, and its strengths are then frames)."""
    out = []
    for name in requested:
        c = CORRUPTIONS.get(name)
        for variant in c.variants:
            for stream in c.streams:
                rate = frame_rates.get(stream)
                if c.timed and rate is None:
                    out += [Condition(name, variant, stream, s, "frames", s) for s in c.frame_strengths]
                elif c.timed:
                    assert rate is not None
                    out += [
                        Condition(name, variant, stream, s, c.unit, float(seconds_to_frames(s, rate)))
                        for s in c.strengths
                    ]
                else:
                    out += [Condition(name, variant, stream, s, c.unit, s) for s in c.strengths]
    return out


def apply(condition: Condition, clips: Sequence[np.ndarray], ref: Reference, seed: int) -> list[np.ndarray]:
    """``clips`` of ``condition.stream`` under ``condition``, drawn from ``condition.rng(seed)``."""
    corruption = CORRUPTIONS.get(condition.corruption)
    transform = corruption.variants[condition.variant]
    if transform is None:
        raise ConfigError(f"{condition.key}: the model leaves the stream out; no clip is changed")
    if corruption.on == "waveform":
        raise ConfigError(f"{condition.key}: corrupts the recordings, not their features")
    if len(clips) and clips[0].shape[1] != len(ref.mean):  # statistics of other features
        raise DataError(
            f"{condition.stream}: the clips have {clips[0].shape[1]} features per frame, its training "
            f"statistics ({ref.source}) {len(ref.mean)}"
        )
    return cast(ClipTransform, transform)(clips, condition.amount, ref, condition.rng(seed))


def apply_to_waveforms(
    condition: Condition, waveforms: Iterable[np.ndarray], seed: int
) -> Iterator[np.ndarray]:
    """Each recording (n_i,) under a waveform ``condition``, lazily and in order (one recording
    in memory at a time), all drawn from one ``condition.rng(seed)``: the same recordings in the
    same order give the same output."""
    corruption = CORRUPTIONS.get(condition.corruption)
    if corruption.on != "waveform":
        raise ConfigError(f"{condition.key}: corrupts features, not recordings")
    transform = cast(WaveTransform, corruption.variants[condition.variant])
    rng = condition.rng(seed)
    return (transform(w, condition.amount, rng) for w in waveforms)

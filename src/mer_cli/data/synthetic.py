"""The embedded default dataset: synthetic CREMA-D-like features, generated from a seed.

Output: `Splits` shaped like the notebook's pickle (52-dim "MFCC" frames at 100 frames/s, 17-dim
"action unit" frames at 30 frames/s, six emotions, clip ids ``1001_DFA_ANG_XX``), generated clip
by clip: into memory (`generate`) or, for large settings, once into an on-disk cache in the native
directory format that later runs read clip by clip (`cached`). NOT real data: it exists so
mer-cli runs out of the box and its tests mean something.

How the classes are hidden (so the notebook's findings can be reproduced qualitatively):
- each clip carries its emotion as bursts of evidence at a few random moments, the same moments in
  both streams (a face and a voice express together), on top of per-actor offsets and smooth noise;
  in the voice, arousal also shifts the whole utterance a little (energy and pitch stay raised);
- the acoustic stream mostly encodes arousal (high: anger, happy, fear; mid: disgust; low:
  neutral, sad), so within an arousal level it is weak, like voice alone in CREMA-D;
- the visual stream encodes facial configurations that confuse anger with disgust and fear with
  sad, but tell happy and neutral apart: more informative than the voice;
- the two are complementary: arousal separates exactly the pairs the face confuses, so a model
  that uses both streams beats either alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from mer_cli.core.errors import ConfigError
from mer_cli.data.native import DIR_FORMAT_VERSION, DatasetWriter, is_dataset_dir, load_dir
from mer_cli.data.splits import NOTEBOOK_CLASS_NAMES, Clips, Split, Splits

log = logging.getLogger(__name__)

EMOTION_CODES = ("NEU", "ANG", "HAP", "FEA", "DIS", "SAD")  # CREMA-D codes, notebook label order
SENTENCES = ("IEO", "TIE", "IOM", "IWW", "TAI", "MTI", "IWL", "ITH", "DFA", "ITS", "TSI", "WSI")
INTENSITIES = ("LO", "MD", "HI", "XX")
INTENSITY_GAIN = {"LO": 0.7, "MD": 0.85, "HI": 1.15, "XX": 1.0}

AUDIO_FPS = 100.0  # MFCC frames per second (10 ms hop)
VIDEO_FPS = 30.0  # OpenFace frames per second
N_MFCC = 52
N_AUS = 17

AROUSAL = np.array([-1.0, 1.0, 1.0, 1.0, 0.0, -1.0])  # per class, notebook order
# facial configuration group per class: neutral, {anger, disgust}, happy, {fear, sad}
FACE_GROUP = np.array([0, 1, 2, 3, 1, 3])


@dataclass(frozen=True)
class Spec:
    """Size and difficulty of the generated dataset (configs/data/synthetic.yaml)."""

    seed: int = 1234
    n_actors: int = 40
    clips_per_actor_per_class: int = 5
    val_fraction: float = 0.15  # of actors; splits never share an actor
    test_fraction: float = 0.15
    min_duration_s: float = 1.2
    max_duration_s: float = 3.8
    acoustic_snr: float = 0.9  # evidence amplitude relative to the noise, per stream
    visual_snr: float = 0.22
    acoustic_noise: float = 0.3  # scale of the frame-to-frame MFCC noise
    acoustic_noise_rank: int = 8  # the MFCC noise lives in this many directions (plus a little white)

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"data.generator.{key}={getattr(self, key)}: {why}")

        if not 1 <= self.clips_per_actor_per_class <= len(SENTENCES):
            raise bad(
                "clips_per_actor_per_class",
                f"must be 1..{len(SENTENCES)} (one clip per sentence; there are {len(SENTENCES)} sentences)",
            )
        for key in ("val_fraction", "test_fraction"):
            if not 0.0 < getattr(self, key) < 1.0:
                raise bad(key, "must be between 0 and 1")
        if self.n_actors < 3 or self.n_actors > 8999:
            raise bad("n_actors", "must be 3..8999 (actor ids 1001..9999; train, val and test need one each)")
        n_val = max(1, round(self.val_fraction * self.n_actors))
        n_test = max(1, round(self.test_fraction * self.n_actors))
        if n_val + n_test >= self.n_actors:
            raise bad("n_actors", f"too few for three splits with {n_val} val and {n_test} test actors")
        if not self.min_duration_s > 0:
            raise bad("min_duration_s", "must be above 0")
        if self.max_duration_s < self.min_duration_s:
            raise bad("max_duration_s", f"must be at least min_duration_s={self.min_duration_s}")
        for key in ("acoustic_snr", "visual_snr", "acoustic_noise"):
            if not getattr(self, key) >= 0:
                raise bad(key, "must be 0 or more")
        if self.acoustic_noise_rank < 1:
            raise bad("acoustic_noise_rank", "must be at least 1")

    @property
    def n_clips(self) -> int:
        return self.n_actors * len(EMOTION_CODES) * self.clips_per_actor_per_class

    def describe(self) -> str:
        return f"synthetic(seed={self.seed}, actors={self.n_actors})"


def spec_from_config(generator: Mapping[str, Any]) -> Spec:
    """``data.generator`` as a `Spec`; an unknown key is one line listing the known ones."""
    known = [f.name for f in fields(Spec)]
    unknown = sorted(set(generator) - set(known))
    if unknown:
        raise ConfigError(f"data.generator.{unknown[0]}: unknown setting; valid: {', '.join(known)}")
    return Spec(**generator)


def generate_clips(spec: Spec) -> Iterator[tuple[str, str, np.ndarray, np.ndarray, int]]:
    """The dataset's clips one at a time, as ``(split, clip_id, mfcc, aus, label)``."""
    rng = np.random.default_rng(spec.seed)
    world = _World.draw(rng, spec.acoustic_noise_rank)
    actors = [1001 + i for i in range(spec.n_actors)]
    order = rng.permutation(spec.n_actors)
    n_val = max(1, round(spec.val_fraction * spec.n_actors))
    n_test = max(1, round(spec.test_fraction * spec.n_actors))
    split_of_actor = {}
    for rank, i in enumerate(order):
        split_of_actor[actors[i]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    for actor in actors:
        style = world.actor_style(rng)
        for label in range(len(EMOTION_CODES)):
            sentences = rng.choice(len(SENTENCES), size=spec.clips_per_actor_per_class, replace=False)
            for s in sentences:
                intensity = INTENSITIES[rng.integers(len(INTENSITIES))]
                clip_id = f"{actor}_{SENTENCES[s]}_{EMOTION_CODES[label]}_{intensity}"
                mfcc, aus = world.clip(rng, spec, style, label, INTENSITY_GAIN[intensity])
                yield split_of_actor[actor], clip_id, mfcc, aus, label


def generate(spec: Spec) -> Splits:
    """Generate the dataset described by ``spec`` in memory; same spec, same arrays, bit for bit."""
    clips: dict[str, list[tuple[str, np.ndarray, np.ndarray, int]]] = {"train": [], "val": [], "test": []}
    for split, clip_id, mfcc, aus, label in generate_clips(spec):
        clips[split].append((clip_id, mfcc, aus, label))

    def to_split(name: str) -> Split:
        rows = clips[name]
        return Split(
            name=name,
            clip_ids=tuple(r[0] for r in rows),
            mfcc=Clips.pack([r[1] for r in rows]),  # one ragged store per stream
            aus=Clips.pack([r[2] for r in rows]),
            labels=np.array([r[3] for r in rows], dtype=np.int64),
        )

    return Splits(
        train=to_split("train"),
        val=to_split("val"),
        test=to_split("test"),
        class_names=NOTEBOOK_CLASS_NAMES,
        source=spec.describe(),
    )


# bump when the generator's output for a given Spec changes: old caches are then never reused
GENERATOR_VERSION = 1
CACHE_ENV = "MER_CACHE_DIR"


def cache_root(configured: str | None = None) -> Path:
    """Where generated datasets are kept: ``configured`` (data.cache_dir), else $MER_CACHE_DIR,
    else $XDG_CACHE_HOME/mer-cli (default ~/.cache/mer-cli)."""
    if configured:
        return Path(configured).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "mer-cli"


def cache_key(spec: Spec) -> str:
    """A hash of everything that decides the generated arrays (the settings and the generator)."""
    record = {"generator_version": GENERATOR_VERSION, "dir_format": DIR_FORMAT_VERSION, **asdict(spec)}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def cached(spec: Spec, root: Path) -> Splits:
    """The dataset ``spec`` from the on-disk cache under ``root`` (generated into it clip by clip
    on first use, then read clip by clip: memory does not grow with the number of clips)."""
    path = root / f"synthetic-{cache_key(spec)}"
    if not is_dataset_dir(path):
        log.info("generating %d clips into %s (once; later runs reuse it)", spec.n_clips, path)
        try:
            root.mkdir(parents=True, exist_ok=True)
            writer = DatasetWriter(path, NOTEBOOK_CLASS_NAMES)
        except OSError as e:
            raise ConfigError(
                f"data.cache_dir: cannot write the generated data under {root}: {e.strerror or e}"
            ) from e
        try:
            for split, clip_id, mfcc, aus, label in generate_clips(spec):
                writer.add(split, clip_id, mfcc, aus, label)
        except BaseException:
            writer.abort()
            raise
        if not writer.finish():
            log.info("%s: another process wrote the same data first: using theirs", path)
    else:
        log.info("reusing the generated data in %s", path)
    # written by this generator, whose frames are finite by construction: no NaN scan
    splits = load_dir(path, check_values=False)
    return replace(splits, source=spec.describe())


@dataclass(frozen=True)
class _World:
    """Fixed directions in feature space that carry each class, drawn once per seed."""

    mfcc_scale: np.ndarray  # (52,) MFCC coefficients have very different ranges
    mfcc_offset: np.ndarray  # (52,)
    noise_mixing: np.ndarray  # (rank, 52): MFCC noise is correlated across coefficients
    arousal_dir: np.ndarray  # (52,) unit vector
    mfcc_class_dirs: np.ndarray  # (6, 52) weak class-specific acoustic cues
    face_groups: np.ndarray  # (4, 17) non-negative AU activation patterns
    aus_class_dirs: np.ndarray  # (6, 17) weak class-specific facial cues

    @staticmethod
    def draw(rng: np.random.Generator, noise_rank: int) -> _World:
        def unit(n: int, d: int) -> np.ndarray:
            v = rng.standard_normal((n, d))
            return v / np.linalg.norm(v, axis=1, keepdims=True)

        groups = np.zeros((4, N_AUS))
        for g in range(1, 4):  # group 0 (neutral) activates nothing
            active = rng.choice(N_AUS, size=5, replace=False)
            groups[g, active] = rng.uniform(0.6, 1.0, size=5)
        return _World(
            mfcc_scale=10 ** rng.uniform(-0.3, 1.3, size=N_MFCC),
            mfcc_offset=rng.normal(0, 5, size=N_MFCC),
            noise_mixing=rng.standard_normal((noise_rank, N_MFCC)) / np.sqrt(noise_rank),
            arousal_dir=unit(1, N_MFCC)[0],
            mfcc_class_dirs=unit(len(EMOTION_CODES), N_MFCC),
            face_groups=groups,
            aus_class_dirs=np.abs(unit(len(EMOTION_CODES), N_AUS)),
        )

    def actor_style(self, rng: np.random.Generator) -> dict[str, np.ndarray | float]:
        return {
            "voice": rng.normal(0, 0.5, size=N_MFCC),  # speaker timbre
            "face": rng.uniform(0, 0.6, size=N_AUS),  # resting face
            "expressive": float(rng.uniform(0.7, 1.3)),  # how strongly this actor emotes
        }

    def clip(
        self,
        rng: np.random.Generator,
        spec: Spec,
        style: dict[str, np.ndarray | float],
        label: int,
        gain: float,
    ) -> tuple[np.ndarray, np.ndarray]:
        duration = rng.uniform(spec.min_duration_s, spec.max_duration_s)
        t_a = max(2, round(duration * AUDIO_FPS))
        t_v = max(2, round(duration * VIDEO_FPS) + int(rng.integers(-1, 2)))
        strength = gain * float(style["expressive"])

        # evidence arrives in a few bursts, at the same moments (in seconds) in both streams
        n_bursts = int(rng.integers(2, 5))
        centers = rng.uniform(0.1, 0.9, size=n_bursts) * duration
        widths = rng.uniform(0.15, 0.4, size=n_bursts)

        def envelope(n: int, fps: float) -> np.ndarray:
            t = np.arange(n) / fps
            bumps = np.exp(-0.5 * ((t[:, None] - centers) / widths) ** 2)
            return np.clip(bumps.sum(axis=1), 0.0, 1.0)  # (n,)

        acoustic_cue = AROUSAL[label] * self.arousal_dir + 0.15 * self.mfcc_class_dirs[label]
        mfcc = (
            np.asarray(style["voice"])
            + spec.acoustic_noise
            * (
                _smooth_noise(rng, t_a, self.noise_mixing.shape[0], width=5) @ self.noise_mixing
                + 0.3 * _smooth_noise(rng, t_a, N_MFCC, width=5)
            )
            + spec.acoustic_snr * strength * (1.0 + 2.0 * envelope(t_a, AUDIO_FPS))[:, None] * acoustic_cue
        )
        mfcc = mfcc * self.mfcc_scale + self.mfcc_offset

        visual_cue = self.face_groups[FACE_GROUP[label]] + 0.3 * self.aus_class_dirs[label]
        aus = (
            np.asarray(style["face"])
            + 0.35 * _smooth_noise(rng, t_v, N_AUS, width=3)
            + spec.visual_snr * strength * (1.0 + 2.0 * envelope(t_v, VIDEO_FPS))[:, None] * visual_cue
        )
        aus = np.clip(aus, 0.0, 5.0)  # OpenFace intensities live in [0, 5]
        return mfcc.astype(np.float32), aus.astype(np.float32)


def _smooth_noise(rng: np.random.Generator, n: int, d: int, width: int) -> np.ndarray:
    """Unit-variance noise correlated over ``width`` frames (moving sum of white noise)."""
    white = rng.standard_normal((n + width, d))
    c = np.cumsum(white, axis=0)
    return (c[width:] - c[:-width]) / np.sqrt(width)

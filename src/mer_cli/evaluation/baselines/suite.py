"""The classic baselines by name, run on a run's loaded splits, and what baselines.json records.

Input: the `Splits` a run trained on, the streams its modality reads, `Settings` (``report`` in
the config). Output: `compute`: per baseline its class probabilities on the validation and test
splits, what validation chose and the time taken; `record`: those as plain values, with the
test split scored as a model's (`metrics.score`) and the bootstrap intervals of the comparison
report (`stats.bootstrap`, over actors where the clip ids carry them).

Every baseline is fitted on the training split alone and its one setting (C, the DTW window)
chosen by macro F1 on the validation split; the test split is only predicted.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from mer_cli.core.errors import ConfigError, DataError
from mer_cli.core.registry import Registry
from mer_cli.data.folds import speakers_of
from mer_cli.data.splits import Split, Splits
from mer_cli.evaluation import stats
from mer_cli.evaluation.baselines import dtw, pooled
from mer_cli.evaluation.metrics import HEADLINE, f1_macro, score
from mer_cli.preprocess import validity

SEED = 0  # the classifiers' random_state and DTW's scale pairs: fixed, so every job of a sweep agrees


@dataclass(frozen=True)
class Settings:
    """``report`` in the config, less its ``baselines`` switch."""

    methods: tuple[str, ...] = ("logreg", "svm", "dtw")
    c_grid: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0)  # logreg and svm, chosen on val
    dtw_windows: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2)  # fractions of the longer clip, chosen on val

    def __post_init__(self) -> None:
        object.__setattr__(self, "methods", tuple(str(m) for m in self.methods))
        object.__setattr__(self, "c_grid", tuple(float(c) for c in self.c_grid))
        object.__setattr__(self, "dtw_windows", tuple(float(w) for w in self.dtw_windows))
        if not self.methods:
            raise ConfigError(f"report.methods=[]: name at least one of {', '.join(BASELINES.names())}")
        for name in self.methods:
            BASELINES.get(name)
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"report.methods={list(self.methods)}: a baseline named twice")
        if not self.c_grid or any(not c > 0 for c in self.c_grid):
            raise ConfigError(f"report.c_grid={list(self.c_grid)}: one or more values above 0")
        if not self.dtw_windows or any(not 0 <= w <= 1 for w in self.dtw_windows):
            raise ConfigError(f"report.dtw_windows={list(self.dtw_windows)}: one or more fractions in [0, 1]")

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) for k, v in asdict(self).items()}


@dataclass
class Inputs:
    """What the baselines read: the splits, the streams, and features made once for all."""

    splits: Splits
    streams: tuple[str, ...]
    threads: int | None = None  # DTW's threads (None: one per CPU)
    honour_masks: bool = True  # data.frame_validity=honour: frames a face back-end lost left out
    made: dict[tuple[str, str], Any] = field(default_factory=dict)

    def frames(self, split: Split) -> list[Sequence[np.ndarray]]:
        """Per stream, the split's clips; with ``honour_masks`` each clip's valid frames only
        (`validity.Compacted`, as the models read a stream with its own encoder)."""
        out: list[Sequence[np.ndarray]] = []
        for stream in self.streams:
            clips: Sequence[np.ndarray] = split.streams[stream]
            if self.honour_masks and split.valid is not None and stream in split.valid:
                masks = split.valid[stream]
                empty = np.flatnonzero(validity.valid_counts(masks) == 0)
                if empty.size:
                    raise DataError(
                        f"{split.name}/{split.clip_ids[int(empty[0])]}: no valid {stream} frame "
                        f"({empty.size} such clip(s)): nothing for the baselines to read; leave the "
                        "clip out or set data.frame_validity=ignore"
                    )
                clips = validity.Compacted(clips, masks)
            out.append(clips)
        return out

    def pooled(self, split: Split) -> np.ndarray:
        """`pooled.pool` of the split's clips, computed once (logreg and svm share it)."""
        if ("pooled", split.name) not in self.made:
            self.made["pooled", split.name] = pooled.pool(self.frames(split))
        return self.made["pooled", split.name]

    def packed(self, split: Split) -> list[dtw.Packed]:
        """Per stream, the split's clips z-normalised and packed for DTW, once."""
        if ("packed", split.name) not in self.made:
            self.made["packed", split.name] = [dtw.pack(c) for c in self.frames(split)]
        return self.made["packed", split.name]


@dataclass(frozen=True)
class Outcome:
    """A baseline's result: (N, C) probabilities on val and test, what validation chose, and
    the validation macro F1 of every candidate (by its value as text)."""

    val_prob: np.ndarray
    test_prob: np.ndarray
    chosen: dict[str, float]
    validation: dict[str, float]


def _pooled(kind: str) -> Callable[[Inputs, Settings], Outcome]:
    def run(inputs: Inputs, settings: Settings) -> Outcome:
        s = inputs.splits
        x = {split.name: inputs.pooled(split) for split in s.all()}
        fitted = pooled.fit_predict(
            kind,
            (x["train"], s.train.labels),
            (x["val"], s.val.labels),
            x["test"],
            s.n_classes,
            settings.c_grid,
            seed=SEED,
        )
        return Outcome(fitted.val_prob, fitted.test_prob, {"C": fitted.c}, fitted.validation)

    return run


def _nearest_dtw(inputs: Inputs, settings: Settings) -> Outcome:
    dtw.kernels()  # numba missing: one line naming the extra, before any work
    if inputs.threads is not None:
        dtw.use_threads(inputs.threads)
    s = inputs.splits
    packed = {split.name: inputs.packed(split) for split in s.all()}
    onehot = np.eye(s.n_classes)
    validation: dict[str, float] = {}
    best: tuple[float, float, np.ndarray] | None = None
    for window in sorted(settings.dtw_windows):  # among equals the narrowest (and cheapest) wins
        scales = dtw.stream_scales(packed["train"], window, seed=SEED)
        index, _ = dtw.nearest(packed["val"], packed["train"], window, scales)
        val_prob = onehot[s.train.labels[index]]
        validation[f"{window:g}"] = f1 = f1_macro(s.val.labels, val_prob)
        if best is None or f1 > best[1]:
            best = (window, f1, val_prob)
    assert best is not None  # Settings refuses an empty list
    window, _, val_prob = best
    index, _ = dtw.nearest(
        packed["test"], packed["train"], window, dtw.stream_scales(packed["train"], window, seed=SEED)
    )
    return Outcome(val_prob, onehot[s.train.labels[index]], {"window": window}, validation)


@dataclass(frozen=True)
class Baseline:
    title: str  # as the report names it
    run: Callable[[Inputs, Settings], Outcome]
    # its probabilities are one-hot (a nearest neighbour's label): ROC-AUC, loss and ECE are those
    # of hard labels
    hard: bool = False


BASELINES: Registry[Baseline] = Registry("report.methods")
BASELINES.add("logreg", Baseline("pooled statistics + logistic regression", _pooled("logreg")))
BASELINES.add("svm", Baseline("pooled statistics + RBF SVM", _pooled("svm")))
BASELINES.add("dtw", Baseline("1-NN DTW", _nearest_dtw, hard=True))


def check(settings: Settings) -> None:
    """What the chosen baselines need is installed (1-NN DTW: numba): one ConfigError line if not."""
    if "dtw" in settings.methods:
        dtw.kernels()


@dataclass(frozen=True)
class Result:
    name: str
    outcome: Outcome
    seconds: float


def compute(
    splits: Splits,
    streams: Sequence[str],
    settings: Settings,
    threads: int | None = None,
    honour_masks: bool = True,
) -> list[Result]:
    """Every baseline of ``settings.methods`` on ``splits``' streams ``streams``, in that order;
    ``honour_masks``: the frames the splits' validity masks mark invalid left out."""
    missing = [s for s in streams if s not in splits.train.streams]
    if missing or not streams:
        raise ConfigError(
            f"baselines: streams {list(streams)}: the data has {', '.join(splits.train.streams)}"
        )
    inputs = Inputs(splits, tuple(streams), threads, honour_masks)
    out = []
    for name in settings.methods:
        start = time.perf_counter()
        outcome = BASELINES.get(name).run(inputs, settings)
        out.append(Result(name, outcome, time.perf_counter() - start))
    return out


def record(
    results: Sequence[Result],
    splits: Splits,
    actor_pattern: str,
    bootstrap_samples: int,
    confidence: float,
) -> list[dict[str, Any]]:
    """Per baseline, what baselines.json holds: its name and title, what validation chose (and
    every candidate's validation macro F1), seconds, the headline validation metrics, the test
    split's metrics as metrics.json has them, their bootstrap intervals, and the test
    predictions (clip ids, labels, probabilities) from which the comparison report recomputes
    them with its own settings."""
    test = splits.test
    actors = speakers_of(test, actor_pattern)  # stored speakers first, else from the clip ids
    groups = np.array(actors) if actors is not None else None
    out = []
    for r in results:
        y_prob = r.outcome.test_prob
        sample = stats.Sample(test.labels, y_prob.argmax(axis=1), groups, "test")
        draws = stats.bootstrap(
            [sample], splits.n_classes, stats.BOOTSTRAP_METRICS, bootstrap_samples, seed=0
        )
        val = score(splits.val.labels, r.outcome.val_prob, splits.class_names)
        out.append(
            {
                "name": r.name,
                "title": BASELINES.get(r.name).title,
                "hard_labels": BASELINES.get(r.name).hard,
                "chosen": r.outcome.chosen,
                "validation_f1_macro": r.outcome.validation,
                "seconds": round(r.seconds, 3),
                "val": {k: val[k] for k in HEADLINE},
                "test": score(test.labels, y_prob, splits.class_names),
                "test_ci": {
                    "confidence": confidence,
                    "unit": "actors" if groups is not None else "clips",
                    **{k: list(stats.interval(v, confidence)) for k, v in draws.items()},
                },
                "test_predictions": predictions(test, y_prob),
            }
        )
    return out


def predictions(split: Split, y_prob: np.ndarray) -> dict[str, Any]:
    """A split's predictions as plain lists: clip ids, true labels, probabilities (as computed)."""
    return {
        "clip_ids": list(split.clip_ids),
        "y_true": [int(y) for y in split.labels],
        "y_prob": y_prob.tolist(),
    }


def describe(entries: Sequence[Mapping[str, Any]]) -> str:
    """One log line per baseline: its test macro F1 with interval, what it chose, its time."""
    lines = []
    for e in entries:
        ci = e["test_ci"]["f1_macro"]
        chosen = ", ".join(f"{k}={v:g}" for k, v in e["chosen"].items())
        lines.append(
            f"{e['title']}: test macro F1 {100 * e['test']['f1_macro']:.1f} % [{100 * ci[0]:.1f}, "
            f"{100 * ci[1]:.1f}] ({chosen}, chosen on val; {e['seconds']:.1f} s)"
        )
    return "\n".join(lines)

"""mer-predict: a trained run's class probabilities for new clips, from raw files or a feature file.

Input: a run directory of any modality (late fusion: its two members and the combiner in
late.json) and either raw files, one WAV and one OpenFace CSV per clip (one clip, or two folders
paired by name as mer-ingest pairs them), turned into features with the ingestion settings the
run's training data recorded, or a feature file (``--data``: a native .npz, labels and splits
optional, or any dataset mer-train reads). Every input is checked against the run's feature
spec (`spec`); the frames a face back-end lost (its validity mask, from the raw files or the
feature file) are honoured as the run's checkpoint says, as mer-evaluate does. Output:
``predictions.csv`` (``clip_id``, ``y_pred`` as a class name, ``y_true`` where labels are known,
``prob_<class>``...), written atomically, and a short table. A clip that cannot be predicted is
one line on stderr; the others are still predicted, and the exit status is 1.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mer_cli.core.artifacts import write_text
from mer_cli.core.errors import DataError, MerError
from mer_cli.data import formats, ingest, npz, spec
from mer_cli.data.features import catalog
from mer_cli.data.features.extraction import Extraction
from mer_cli.data.splits import STREAM_FIELDS, Split, Splits
from mer_cli.data.splits import Clips as RaggedClips
from mer_cli.models.fusion import late as late_fusion
from mer_cli.runs import outputs, trained
from mer_cli.runs.late import late_predictions

PROG = "mer-predict"
TABLE_ROWS = 20  # clips shown on screen; the file holds them all
# a clip's video this far (relative) from the training data's frame rate gets a warning: the
# visual model would see its faces move faster or slower than in training
FRAME_RATE_TOLERANCE = 0.1
NOT_READ = np.zeros((1, 0), dtype=np.float32)  # frames of a stream no model reads (never used)
NPZ_GROUPS = ("", "train.", "val.", "test.")  # clips of an .npz: un-split, or mer-cli's splits


@dataclass(frozen=True)
class Run:
    """What predicts: one model, or late fusion's members and their fitted combiner."""

    run_dir: Path
    models: dict[str, Path]  # member name ("model" for a single model) -> run dir with checkpoint.pt
    specs: dict[str, dict[str, Any]]  # the same keys -> its feature spec
    combiner: late_fusion.LateFusion | None
    class_names: tuple[str, ...]
    honoured: frozenset[str] = frozenset()  # data streams whose validity masks a model honours

    @property
    def streams(self) -> list[str]:
        """The data streams any of its models reads, in the data's order."""
        read = {s for sp in self.specs.values() for s in sp["streams"]}
        return [s for s in STREAM_FIELDS if s in read]


@dataclass
class Clips:
    """The clips to predict: each one's frames per data stream, and what is known about them."""

    source: str
    clip_ids: list[str] = field(default_factory=list)
    frames: dict[str, list[np.ndarray]] = field(default_factory=dict)  # stream -> per clip
    # stream -> per clip (T,) bool validity mask (None: every frame valid), for streams with one
    valid: dict[str, list[np.ndarray | None]] = field(default_factory=dict)
    labels: list[int] | None = None  # None: not known
    splits: list[str] | None = None  # each clip's split, when read from a split dataset
    failed: list[str] = field(default_factory=list)  # one line per clip that cannot be predicted
    warnings: list[str] = field(default_factory=list)

    def add(
        self,
        clip_id: str,
        frames: dict[str, np.ndarray],
        label: int | None = None,
        split: str | None = None,
        valid: Mapping[str, np.ndarray | None] | None = None,
    ) -> None:
        for stream, mask in (valid or {}).items():
            if mask is not None and stream in frames:  # the clips before it: every frame valid
                self.valid.setdefault(stream, [None] * len(self.clip_ids))
        for stream, masks in self.valid.items():
            masks.append((valid or {}).get(stream))
        self.clip_ids.append(clip_id)
        for stream, x in frames.items():
            self.frames.setdefault(stream, []).append(x)
        if self.labels is not None and label is not None:
            self.labels.append(label)
        if self.splits is not None and split is not None:
            self.splits.append(split)


def load_run(run_dir: Path) -> Run:
    """The run's model(s) with their feature specs and, for late fusion, its fitted combiner."""
    run_dir = run_dir.expanduser().resolve()
    if not run_dir.is_dir():
        raise MerError(f"{run_dir}: not a folder (expected a mer-train run directory)")
    if (run_dir / "cv.json").exists() and not (run_dir / "checkpoint.pt").exists():
        raise MerError(
            f"{run_dir}: a cross-validation run: give one fold's directory, e.g. {run_dir / 'fold0'}"
        )
    late = trained.read_late(run_dir)
    combiner = None
    if late is not None:
        _, combiner, models = late
    else:
        models = {"model": run_dir}
    specs, names, honoured = {}, set(), set()
    for name, model_dir in models.items():
        _, _, meta = trained.load_trained(model_dir)
        specs[name] = spec.from_meta(meta)
        names.add(tuple(meta["class_names"]))
        honoured.update(trained.honoured_streams(meta))
    if len(names) != 1:
        raise MerError(f"{run_dir}: its late fusion members were trained on different classes")
    return Run(run_dir, models, specs, combiner, names.pop(), frozenset(honoured))


def count_mismatch(run: Run, counts: dict[str, int]) -> str | None:
    """Features per frame of each data stream (``counts``) against every model's spec."""
    for sp in run.specs.values():
        problem = spec.mismatch(sp, {s: n for s, n in counts.items() if s in sp["streams"]})
        if problem is not None:
            return problem
    return None


def clip_problem(
    run: Run, frames: dict[str, np.ndarray], valid: Mapping[str, np.ndarray | None] | None = None
) -> str | None:
    """Why one clip's frames (stream -> (T, F)) cannot be predicted, or None; ``valid``: its
    validity masks (a stream whose mask the run honours needs one valid frame)."""
    for stream, x in frames.items():
        if x.shape[0] == 0:
            return f"{stream}: 0 frames"
        if not np.isfinite(x).all():
            return f"{stream}: NaN or infinite values"
        mask = (valid or {}).get(stream)
        if stream in run.honoured and mask is not None and not np.any(mask):
            return f"{stream}: no valid frame (its validity mask is all False)"
    return count_mismatch(run, {s: x.shape[1] for s, x in frames.items()})


# ---------------------------------------------------------------------------------------------
# Raw files: WAV + OpenFace CSV, turned into features as the training data's were


def ingest_settings(run: Run, stream: str, where: str) -> dict[str, Any]:
    """How the run's training data computed ``stream`` from raw files (all members agree)."""
    found = [spec.ingest_settings(sp, stream, where) for sp in run.specs.values() if stream in sp["streams"]]
    if any(f != found[0] for f in found[1:]):
        raise MerError(f"{where}: the late fusion members computed their {stream} features differently")
    return found[0]


def read_files(
    run: Run,
    audio: Path | None,
    video: Path | None,
    where: str,
    models: Mapping[str, Path | None] | None = None,
) -> Clips:
    """The features of the clips at ``audio`` / ``video`` (two files: one clip; two folders:
    clips paired by name) for the streams ``run`` reads, computed with its recorded back-end and
    settings; ``models``: stream -> where its pretrained model lies here (None: as recorded)."""
    given = {"acoustic": audio, "visual": video}
    paths: dict[str, Path] = {}
    for stream in run.streams:
        p = given[stream]
        if p is None:
            flag = "--audio" if stream == "acoustic" else "--video"
            raise MerError(f"{where}: the model reads the {stream} stream: give {flag}")
        paths[stream] = p.expanduser()
    settings = {s: ingest_settings(run, s, where) for s in paths}  # before any file is read
    clips = Clips(source=", ".join(str(p) for p in paths.values()))
    clips.warnings += [
        f"{p}: ignored: the model does not read the {s} stream"
        for s, p in given.items()
        if p is not None and s not in paths
    ]
    for p in paths.values():
        if not p.exists():
            raise DataError(f"{p}: not found")

    located = {s: str(p) for s, p in (models or {}).items() if p is not None}  # where models lie here
    extractors = {s: catalog.open_recorded(s, settings[s], located.get(s), where) for s in paths}
    files: dict[str, dict[str, Path]]  # clip -> stream -> file
    patterns = {s: catalog.backend_of(s, settings[s]).file_patterns for s in paths}
    if all(p.is_dir() for p in paths.values()):
        if len(paths) == 2:  # paired by name, as mer-ingest pairs them
            files, clips.failed = ingest.pair_files(
                paths["acoustic"], paths["visual"], patterns["acoustic"], patterns["visual"]
            )
        else:
            ((stream, folder),) = paths.items()
            files = {c: {stream: f} for c, f in ingest.files_by_stem(folder, patterns[stream]).items()}
        if not files and not clips.failed:
            shown = ", ".join(p for s in paths for p in patterns[s])
            raise DataError(f"{clips.source}: no {shown} files")
    elif all(p.is_file() for p in paths.values()):
        files = {next(iter(paths.values())).stem: paths}  # one clip, named after its (first) file
    else:
        raise MerError("--audio and --video: give two files (one clip) or two folders (clips paired by name)")

    for clip in Extraction(files, extractors):  # the path mer-ingest took: the same frames
        if clip.frames is None:
            clips.failed.append(f"{clip.file}: {clip.problem}")
            continue
        for stream, f in clip.frames.items():
            clips.warnings += frame_rate_warning(
                files[clip.clip_id][stream], f.frame_rate_hz, settings[stream].get("frame_rate_hz")
            )
        frames = {s: f.values for s, f in clip.frames.items()}
        valid = {s: f.valid for s, f in clip.frames.items()}  # as mer-ingest stores them
        problem = clip_problem(run, frames, valid)
        if problem is None:
            clips.add(clip.clip_id, frames, valid=valid)
        else:
            clips.failed.append(f"{', '.join(map(str, files[clip.clip_id].values()))}: {problem}")
    return clips


def frame_rate_warning(path: Path, fps: float | None, trained_fps: float | None) -> list[str]:
    if fps is None or not trained_fps or abs(fps - trained_fps) <= FRAME_RATE_TOLERANCE * trained_fps:
        return []
    return [
        f"{path}: video at {fps:.3g} frames/s, the model was trained on {trained_fps:.3g} frames/s "
        "(predicted anyway: its faces move faster or slower than in training)"
    ]


# ---------------------------------------------------------------------------------------------
# Feature files


def read_data(run: Run, path: Path) -> Clips:
    """The clips of a dataset: a native .npz (labels and splits optional) or any other format
    mer-train reads (a native directory, the notebook's pickle: every split's clips, with labels)."""
    path = path.expanduser()
    fmt = formats.recognise(path)  # the same choice mer-train and mer-evaluate make
    if fmt.name == "npz":
        return read_npz(run, path)
    splits = fmt.read(path, class_names=run.class_names)
    # from the stores' shapes: a split-less dataset's train split has no clip to look at
    problem = count_mismatch(run, {s: splits.train.streams[s].n_features for s in run.streams})
    if problem is not None:
        raise DataError(f"{path}: {problem}")
    clips = Clips(source=str(path), labels=[], splits=[])
    for split in splits.all():
        for i, clip_id in enumerate(split.clip_ids):
            frames = {s: split.streams[s][i] for s in run.streams}
            valid = {s: m[i] for s, m in (split.valid or {}).items() if s in run.streams}
            problem = clip_problem(run, frames, valid)
            if problem is not None:
                clips.failed.append(f"{path}: {split.name}/{clip_id}: {problem}")
                continue
            clips.add(clip_id, frames, int(split.labels[i]), split.name, valid)
    return clips


def read_npz(run: Run, path: Path) -> Clips:
    """An .npz of clips: mer-cli's native layout (``<split>.clip_ids``, ``<split>.mfcc`` with
    ``<split>.mfcc_offsets``, ...) or the same arrays without the split prefix; any split may be
    absent, and so may the labels (``[<split>.]labels``) and the streams the model does not read."""
    arrays = npz.read_npz_arrays(path)
    groups = [g for g in NPZ_GROUPS if f"{g}clip_ids" in arrays]
    if not groups:
        raise DataError(
            f"{path}: no clip_ids array (expected clip_ids, mfcc, mfcc_offsets, aus, aus_offsets, "
            "or the same per split as mer-ingest writes them)"
        )
    recorded = npz.read_ingest_settings(arrays, path)
    if recorded is not None:  # written by mer-ingest: were its features computed as the model's?
        for sp in run.specs.values():
            problem = spec.settings_mismatch(sp, recorded)
            if problem is not None:
                raise DataError(f"{path}: {problem}")
    labelled = all(f"{g}labels" in arrays for g in groups)
    if labelled and "class_names" in arrays:
        stored = tuple(str(c) for c in np.atleast_1d(arrays["class_names"]).tolist())
        if stored != run.class_names:
            raise DataError(
                f"{path}: labels of the classes {', '.join(stored)}; the model was trained on "
                f"{', '.join(run.class_names)}"
            )
    clips = Clips(
        source=str(path),
        labels=[] if labelled else None,
        splits=[] if any(groups) else None,
    )
    seen: set[str] = set()
    for g in groups:
        ids = arrays[f"{g}clip_ids"]
        if ids.ndim != 1 or ids.dtype.kind != "U":
            raise DataError(f"{path}: {g}clip_ids must be a 1-D array of strings")
        frames = {s: npz.stream_clips(arrays, g, STREAM_FIELDS[s], len(ids), path) for s in run.streams}
        masks = {s: npz.stream_masks(arrays, g, STREAM_FIELDS[s], len(ids), path) for s in run.streams}
        problem = count_mismatch(run, {s: arrays[f"{g}{STREAM_FIELDS[s]}"].shape[1] for s in run.streams})
        if problem is not None:  # one feature size per array: every clip in it has the problem
            raise DataError(f"{path}: {g.rstrip('.') + ': ' if g else ''}{problem}")
        labels = arrays.get(f"{g}labels") if labelled else None
        if labels is not None and (
            labels.shape != ids.shape
            or not np.issubdtype(labels.dtype, np.integer)
            or ((labels < 0) | (labels >= len(run.class_names))).any()
        ):
            raise DataError(
                f"{path}: {g}labels must be one integer per clip in 0..{len(run.class_names) - 1} "
                f"({', '.join(run.class_names)})"
            )
        for i, clip_id in enumerate(ids.tolist()):
            where = f"{path}: {g.replace('.', '/')}{clip_id}"
            if clip_id in seen:
                raise DataError(f"{where}: clip id appears twice")
            seen.add(clip_id)
            clip = {s: np.ascontiguousarray(frames[s][i], dtype=np.float32) for s in run.streams}
            valid = {s: m[i] for s, m in masks.items() if m is not None}
            problem = clip_problem(run, clip, valid)
            if problem is not None:
                clips.failed.append(f"{where}: {problem}")
                continue
            clips.add(clip_id, clip, None if labels is None else int(labels[i]), g.rstrip("."), valid)
    return clips


# ---------------------------------------------------------------------------------------------
# Predict and write


def predict(run: Run, clips: Clips) -> outputs.Predictions:
    """The run's class probabilities for ``clips``, as `trained.predict_run` makes them for a
    run's own data (same preprocessing, precision and batching); late fusion combines its
    members' with the combiner it fitted."""
    n = len(clips.clip_ids)
    y = np.asarray(clips.labels if clips.labels is not None else np.zeros(n), dtype=np.int64)
    split = Split(
        "test",  # predict_run reads the splits it is asked for: this one
        tuple(clips.clip_ids),
        mfcc=RaggedClips.pack(clips.frames.get("acoustic", [NOT_READ] * n)),
        aus=RaggedClips.pack(clips.frames.get("visual", [NOT_READ] * n)),
        labels=y,
        valid={
            s: RaggedClips.pack_masks(
                [
                    np.ones(len(x), bool) if m is None else m
                    for x, m in zip(clips.frames[s], masks, strict=True)
                ]
            )
            for s, masks in clips.valid.items()
        }
        or None,
    )
    splits = Splits(split, split, split, class_names=run.class_names, source=clips.source)
    members = {m: trained.predict_run(d, splits, ("test",)) for m, d in run.models.items()}
    if run.combiner is None:
        return members["model"]["test"]
    return late_predictions(members, run.combiner, ("test",))[0]


def write_predictions(
    path: Path, clips: Clips, pred: outputs.Predictions, class_names: tuple[str, ...]
) -> None:
    """predictions.csv: [split,] clip_id, [y_true,] y_pred (class names), prob_<class>..."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(
        [
            *(["split"] if clips.splits is not None else []),
            "clip_id",
            *(["y_true"] if clips.labels is not None else []),
            "y_pred",
            *(f"prob_{c}" for c in class_names),
        ]
    )
    for i, (clip_id, prob) in enumerate(zip(pred.clip_ids, pred.y_prob, strict=True)):
        writer.writerow(
            [
                *([clips.splits[i]] if clips.splits is not None else []),
                clip_id,
                *([class_names[clips.labels[i]]] if clips.labels is not None else []),
                class_names[int(prob.argmax())],
                *(f"{v:.6g}" for v in prob),
            ]
        )
    write_text(path, buf.getvalue())


def table(
    clips: Clips, pred: outputs.Predictions, class_names: tuple[str, ...], rows: int = TABLE_ROWS
) -> str:
    """The first ``rows`` clips: predicted class and its probability (and the true class)."""
    labelled = clips.labels is not None
    head = ["clip_id", *(["y_true"] if labelled else []), "y_pred", "prob"]
    body = [
        [
            clip_id,
            *([class_names[clips.labels[i]]] if clips.labels is not None else []),
            class_names[int(p.argmax())],
            f"{p.max():.3f}",
        ]
        for i, (clip_id, p) in enumerate(zip(pred.clip_ids[:rows], pred.y_prob[:rows], strict=True))
    ]
    widths = [max(len(r[j]) for r in [head, *body]) for j in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [head, *body]]
    if len(pred.clip_ids) > rows:
        lines.append(f"... and {len(pred.clip_ids) - rows} more")
    if clips.labels is not None:
        y_pred = pred.y_prob.argmax(axis=1)
        lines.append(f"accuracy: {np.mean(y_pred == np.asarray(clips.labels)):.3f} on {len(y_pred)} clips")
    return "\n".join(lines)


def default_out(run_dir: Path) -> Path:
    """``RUN_DIR/predictions/<time>/predictions.csv``, a new folder each time: the run's own
    predictions.csv (its validation and test predictions) is never touched."""
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    out, n = run_dir / "predictions" / stamp, 1
    while out.exists():
        n += 1
        out = run_dir / "predictions" / f"{stamp}_{n}"
    return out / "predictions.csv"


def check_out(out: Path, run: Run) -> None:
    """``out`` may be written: neither the run's (or a member's) own predictions.csv nor a folder."""
    own = {(d / "predictions.csv").resolve() for d in (run.run_dir, *run.models.values())}
    if out.resolve() in own:
        raise MerError(f"--out {out}: that is a run's own predictions.csv (its val/test predictions)")
    if out.is_dir():
        raise MerError(f"--out {out}: a folder; give the .csv file to write")

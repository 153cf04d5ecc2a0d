"""Robustness evaluation (``mer-evaluate RUN --perturb``, ``eval.robustness=true``): a trained
run's test split re-scored under the named corruptions of `evaluation.perturb`, at each strength.

Input: a run directory of any modality (late fusion through its members, each with its own
temperature as `trained.predict_run` applies it) and its own data, read from its config.yaml as
mer-evaluate reads it (a cross-validation fold: its own test fold). Noise and lost frames are
relative to each stream's training statistics: the checkpoint's fitted standard scaler where the
model reads that stream as it is, else the train split's frames; never the test split. The
waveform corruption (``snr``) needs the test clips' recordings (``audio_dir``: files named by clip
id, as mer-ingest read them): each is mixed with noise into a temporary float WAV and its features
computed again by the back-end the run's data recorded; first the clean recordings' features are
checked against the data's own (other recordings would not measure this model), and without
``audio_dir`` its rows are skipped, saying so.
Output, in the run directory, each file written atomically once every row is computed:
  robustness.json       {"format": 1, "split": "test", "seed": S, "corruptions": [names],
                         "reference": {stream: where its training mean and std came from},
                         "ci": {"confidence", "samples", "unit": actors | clips},
                         "clean": {f1_macro, f1_macro_ci, accuracy, balanced_accuracy, ece},
                         "rows": [{corruption, variant, stream, strength, unit, frames,
                                   f1_macro, f1_macro_ci, accuracy, balanced_accuracy, ece,
                                   skipped}, ...]}
                        ``frames``: a shift's frames (else null); a ``skipped`` row (a
                        corruption that means nothing for this model) has null metrics and
                        says why (null otherwise)
  robustness.csv        the clean scores (corruption "none"), then the rows; the interval as
                        f1_macro_ci_low, f1_macro_ci_high
  plots/robustness.png  macro F1 vs strength: one panel per corruption, one line per stream and
                        variant starting from the clean score at strength 0
"""

from __future__ import annotations

import csv
import io
import logging
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from mer_cli.core.artifacts import write_json, write_text
from mer_cli.core.errors import DataError
from mer_cli.data import ingest, spec
from mer_cli.data.features import audio, catalog
from mer_cli.data.features.base import Extractor
from mer_cli.data.features.extraction import Extraction
from mer_cli.data.folds import CREMA_D_ACTOR_PATTERN, speakers_of
from mer_cli.data.load import load_data
from mer_cli.data.splits import STREAM_FIELDS, Clips, Split, Splits
from mer_cli.evaluation import metrics, perturb, stats
from mer_cli.models.fusion import late as late_fusion
from mer_cli.runs import files, outputs, trained
from mer_cli.runs.late import fused_proba

log = logging.getLogger(__name__)

FORMAT = 1
JSON_FILE, CSV_FILE, PLOT_FILE = "robustness.json", "robustness.csv", "plots/robustness.png"
# the interval of each row's macro F1: the comparison report's bootstrap (actors resampled where
# clip ids carry them), the same draws for every row
CI_SAMPLES, CI_CONFIDENCE, CI_SEED = 1000, 0.95, 0
METRIC_KEYS = ("f1_macro", "accuracy", "balanced_accuracy", "ece")


@dataclass(frozen=True)
class Target:
    """What is re-scored: one trained model, or late fusion's members (name -> run directory)
    and their combiner. ``streams``: the data streams it reads, in order."""

    run_dir: Path
    modality: str
    streams: tuple[str, ...]
    frame_rates: dict[str, float | None]
    references: dict[str, perturb.Reference]  # from the checkpoints' fitted standard scalers
    members: dict[str, Path]  # empty unless late fusion
    member_streams: dict[str, tuple[str, ...]]
    combined: late_fusion.LateFusion | None
    audio_record: dict[str, Any] | None = None  # how the acoustic features were computed (mer-ingest)


def read_target(run_dir: Path) -> Target:
    """The run's model(s), the streams they read, their frame rates and fitted statistics."""
    late = trained.read_late(run_dir)
    dirs = {"": run_dir} if late is None else late[2]
    streams: dict[str, None] = {}
    rates: dict[str, float | None] = {}
    references: dict[str, perturb.Reference] = {}
    member_streams = {}
    audio_record: dict[str, Any] | None = None
    for member, d in dirs.items():
        _, preps, meta = trained.load_trained(d)
        member_streams[member] = tuple(meta["streams"])
        streams.update(dict.fromkeys(meta["streams"]))
        model_spec = spec.from_meta(meta)
        for name, stream_spec in model_spec["streams"].items():
            rates.setdefault(name, stream_spec.get("frame_rate_hz"))
        if audio_record is None and model_spec["streams"].get("acoustic", {}).get("ingest"):
            audio_record = spec.ingest_settings(model_spec, "acoustic", str(d))
        for name, prep in preps.items():  # keyed by the model's input: a data stream, or "early"
            where = d / "checkpoint.pt"  # named inside the run where it lies there (a member trained here)
            shown = where.relative_to(run_dir) if where.is_relative_to(run_dir) else where
            ref = perturb.reference_from_scaler(prep.scaler, f"{shown} (fitted scaler)")
            if name in STREAM_FIELDS and ref is not None:
                references.setdefault(name, ref)
    modality = "late" if late is not None else str(meta["modality"])
    return Target(
        run_dir,
        modality,
        tuple(streams),
        rates,
        references,
        {} if late is None else dict(dirs),
        member_streams,
        None if late is None else late[1],
        audio_record,
    )


def reference(target: Target, splits: Splits, stream: str) -> perturb.Reference:
    """``stream``'s training mean and std: the checkpoint's, else the train split's frames."""
    found = target.references.get(stream)
    if found is not None:
        return found
    return perturb.reference_from_clips(splits.train.streams[stream], f"{splits.source}: train split")


def member_probabilities(target: Target, splits: Splits, test: Split) -> dict[str, np.ndarray]:
    """Each model's test probabilities (key "" for a single model) on ``test``."""
    data = replace(splits, test=test)
    dirs = target.members or {"": target.run_dir}
    return {m: trained.predict_run(d, data, ("test",))["test"].y_prob for m, d in dirs.items()}


def combine(target: Target, probs: dict[str, np.ndarray]) -> np.ndarray:
    """The run's own probabilities from its models': late fusion's combination, or the one model's."""
    if target.combined is None:
        return probs[""]
    return fused_proba(target.combined, probs)


def masked(
    target: Target, stream: str, clean: dict[str, np.ndarray], clean_prob: np.ndarray
) -> np.ndarray | None:
    """The run's probabilities with ``stream`` left out: late fusion without the member reading
    it is the remaining member's own prediction; a model that does not read it is unchanged
    (``clean_prob``); None where the model cannot leave it out."""
    if stream not in target.streams:
        return clean_prob
    remaining = [m for m, s in target.member_streams.items() if stream not in s]
    return clean[remaining[0]] if target.members and len(remaining) == 1 else None


def skip_reason(condition: perturb.Condition, target: Target, audio_dir: Path | None = None) -> str | None:
    """Why ``condition`` means nothing for this model (or cannot be done here), or None."""
    c = perturb.CORRUPTIONS.get(condition.corruption)
    if condition.on_waveform and condition.stream not in target.streams:
        return f"{target.modality} does not read the {condition.stream} stream"
    if condition.on_waveform and target.audio_record is None:
        return "its acoustic features were not computed by mer-ingest: no back-end to compute them again"
    if condition.on_waveform and audio_dir is None:
        return "needs the test clips' recordings: mer-evaluate RUN --perturb --audio DIR"
    if len(target.streams) < c.needs_streams:
        return f"{target.modality} reads one stream: nothing to be out of step with"
    if c.whole_stream and target.streams == (condition.stream,):
        return f"{condition.stream} is the only stream {target.modality} reads"
    if condition.masked and condition.stream in target.streams and not target.members:
        return f"{target.modality} reads its streams in one model and cannot leave one out"
    return None


def scores(y_true: np.ndarray, prob: np.ndarray, groups: np.ndarray | None) -> dict[str, Any]:
    """The row's metrics, with the bootstrap interval of macro F1."""
    out: dict[str, Any] = {k: float(metrics.METRICS.get(k).compute(y_true, prob)) for k in METRIC_KEYS}
    sample = stats.Sample(y_true, prob.argmax(axis=1), groups, "test")
    draws = stats.bootstrap([sample], prob.shape[1], ["f1_macro"], CI_SAMPLES, CI_SEED)["f1_macro"]
    out["f1_macro_ci"] = list(stats.interval(draws, CI_CONFIDENCE))
    return {k: out[k] for k in ("f1_macro", "f1_macro_ci", "accuracy", "balanced_accuracy", "ece")}


def corrupted_test(test: Split, condition: perturb.Condition, ref: perturb.Reference, seed: int) -> Split:
    """The test split with ``condition.stream``'s clips corrupted (the others as they are)."""
    field = STREAM_FIELDS[condition.stream]
    clips = Clips.pack(perturb.apply(condition, getattr(test, field), ref, seed))
    return replace(test, mfcc=clips) if field == "mfcc" else replace(test, aus=clips)


@dataclass(frozen=True)
class Recordings:
    """The test clips' recordings (clip id -> file, in the split's order) and the back-end that
    computes their features as the run's data were computed."""

    files: dict[str, Path]
    extractor: Extractor


def open_recordings(target: Target, test: Split, audio_dir: Path, audio_model: Path | None) -> Recordings:
    """Every test clip's recording in ``audio_dir`` (a file named by its clip id), checked: their
    features, computed now, must be the test split's own (else they are other recordings, or
    another back-end, and would not measure this model). Raises `DataError` in one line."""
    assert target.audio_record is not None  # skip_reason has said why not otherwise
    where = str(target.run_dir)
    extractor = catalog.open_recorded(
        "acoustic", target.audio_record, None if audio_model is None else str(audio_model), where
    )
    folder = audio_dir.expanduser()
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder (--audio: the test clips' recordings, named by clip id)")
    found = ingest.files_by_stem(folder, catalog.backend_of("acoustic", target.audio_record).file_patterns)
    missing = [c for c in test.clip_ids if c not in found]
    if missing:
        raise DataError(
            f"{folder}: no recording of {len(missing)} of the {len(test.clip_ids)} test clips "
            f"(e.g. {missing[0]}); give the folder mer-ingest read"
        )
    files = {c: found[c] for c in test.clip_ids}
    for i, got in enumerate(extract_acoustic(files, extractor)):
        stored = test.mfcc[i]
        if got.shape != stored.shape or not np.allclose(got, stored, rtol=1e-3, atol=1e-4):
            shown = (
                got.shape
                if got.shape != stored.shape
                else f"max |difference| {np.abs(got - stored).max():.3g}"
            )
            raise DataError(
                f"{files[test.clip_ids[i]]}: its features now are not the test split's own for clip "
                f"{test.clip_ids[i]} ({shown}): not the recording the data came from"
            )
    return Recordings(files, extractor)


def extract_acoustic(files: Mapping[str, Path], extractor: Extractor) -> list[np.ndarray]:
    """Each file's features, in ``files``' order, by mer-ingest's own path (no cache: corrupted
    recordings must not fill the user's feature cache); a file that fails is one `DataError`."""
    out = []
    for clip in Extraction(
        {c: {"acoustic": f} for c, f in files.items()}, {"acoustic": extractor}, progress=False
    ):
        if clip.frames is None:
            raise DataError(f"{clip.file}: {clip.problem}")
        out.append(clip.frames["acoustic"].values)
    return out


def noisy_test(test: Split, condition: perturb.Condition, recordings: Recordings, seed: int) -> Split:
    """The test split with its acoustic features computed again from the recordings under the
    waveform ``condition``: each mixed into a temporary float WAV, one at a time."""
    with tempfile.TemporaryDirectory(prefix="mer-robustness-") as tmp:
        read = (audio.read(recordings.files[c]) for c in test.clip_ids)
        rates: list[int] = []

        def waves() -> Iterator[np.ndarray]:
            for y, sr in read:
                rates.append(sr)
                yield y

        noisy = {}
        for k, y in enumerate(perturb.apply_to_waveforms(condition, waves(), seed)):
            path = Path(tmp) / f"{k}.wav"  # by position: clip ids need not be file names here
            audio.write(path, y, rates[k])
            noisy[test.clip_ids[k]] = path
        clips = Clips.pack(extract_acoustic(noisy, recordings.extractor))
    return replace(test, mfcc=clips)


def evaluate_robustness(
    run_dir: Path,
    requested: list[str] | None = None,
    seed: int = 0,
    save_plots: bool = True,
    audio_dir: Path | None = None,
    audio_model: Path | None = None,
) -> tuple[dict[str, Any], list[Path]]:
    """Re-score ``run_dir``'s test split under ``requested`` corruptions (None: all) drawn from
    ``seed``; write robustness.json, robustness.csv and plots/robustness.png into it.
    ``audio_dir``: the test clips' recordings, for the waveform corruptions; ``audio_model``:
    where the acoustic back-end's pretrained model lies here (None: as recorded)."""
    chosen = perturb.names(requested)  # an unknown name stops before anything is loaded
    run_dir, cfg = files.read_run_config(run_dir)
    threads = cfg.get("runtime", {}).get("num_threads")
    if threads:  # as the run was evaluated (a tiny model on a busy CPU: one thread is far faster)
        torch.set_num_threads(int(threads))
    splits = load_data(cfg.data, cfg.cv if "cv" in cfg else None)
    target = read_target(run_dir)
    # the streams the model does not read: their rates from the data (a one-stream model's spec
    # knows only its own)
    data_rates = {
        n: s["frame_rate_hz"]
        for n, s in spec.build(splits, "data", list(STREAM_FIELDS), {})["streams"].items()
    }
    target = replace(target, frame_rates={**data_rates, **{k: v for k, v in target.frame_rates.items() if v}})
    test = splits.test
    pattern = str(cfg.get("cv", {}).get("actor_pattern") or CREMA_D_ACTOR_PATTERN)
    actors = speakers_of(test, pattern)  # the data's stored speakers, else parsed from the clip ids
    groups = np.array(actors) if actors is not None else None
    clean_probs = member_probabilities(target, splits, test)
    clean_prob = combine(target, clean_probs)
    result: dict[str, Any] = {
        "format": FORMAT,
        "split": "test",
        "seed": int(seed),
        "corruptions": list(chosen),
        "reference": {},
        "ci": {
            "confidence": CI_CONFIDENCE,
            "samples": CI_SAMPLES,
            "unit": "clips" if groups is None else "actors",
        },
        "clean": scores(test.labels, clean_prob, groups),
        "rows": [],
    }
    recordings: Recordings | None = None
    for name in chosen:
        todo = perturb.conditions([name], target.frame_rates)
        log.info("robustness: %s, %d condition(s)", name, len(todo))
        for condition in todo:
            reason = skip_reason(condition, target, audio_dir)
            if reason is None and condition.on_waveform and recordings is None:
                assert audio_dir is not None  # skip_reason says so otherwise
                recordings = open_recordings(target, test, audio_dir, audio_model)
                result["recordings"] = str(audio_dir.expanduser().resolve())
            result["rows"].append(
                row(
                    condition,
                    target,
                    splits,
                    (clean_probs, clean_prob),
                    groups,
                    seed,
                    result["reference"],
                    reason,
                    recordings,
                )
            )
    return result, write(run_dir, result, save_plots)


def row(
    condition: perturb.Condition,
    target: Target,
    splits: Splits,
    clean: tuple[dict[str, np.ndarray], np.ndarray],
    groups: np.ndarray | None,
    seed: int,
    references: dict[str, str],
    reason: str | None = None,
    recordings: Recordings | None = None,
) -> dict[str, Any]:
    """One condition's row; ``clean``: each model's and the run's clean test probabilities;
    ``references`` records where each stream's training statistics came from; ``reason``: why
    it is skipped (`skip_reason`); ``recordings``: the test clips' own, for a waveform one."""
    out: dict[str, Any] = {
        "corruption": condition.corruption,
        "variant": condition.variant,
        "stream": condition.stream,
        "strength": condition.strength,
        "unit": condition.unit,
        "frames": int(condition.amount)
        if condition.corruption == "shift" and condition.unit == "s"
        else None,
    }
    test = splits.test
    prob: np.ndarray | None = None
    if reason is None and condition.masked:
        prob = masked(target, condition.stream, *clean)
    elif reason is None and condition.on_waveform:
        assert recordings is not None
        prob = combine(
            target, member_probabilities(target, splits, noisy_test(test, condition, recordings, seed))
        )
    elif reason is None:
        ref = reference(target, splits, condition.stream)
        references.setdefault(condition.stream, ref.source)
        corrupted = corrupted_test(test, condition, ref, seed)
        prob = combine(target, member_probabilities(target, splits, corrupted))
    if prob is None:
        return {**out, **dict.fromkeys(("f1_macro", "f1_macro_ci", *METRIC_KEYS[1:])), "skipped": reason}
    return {**out, **scores(test.labels, prob, groups), "skipped": None}


# ---------------------------------------------------------------------------------------------
# The files

CSV_COLUMNS = (
    "corruption",
    "variant",
    "stream",
    "strength",
    "unit",
    "frames",
    "f1_macro",
    "f1_macro_ci_low",
    "f1_macro_ci_high",
    "accuracy",
    "balanced_accuracy",
    "ece",
    "skipped",
)


def to_csv(result: dict[str, Any]) -> str:
    clean = {"corruption": "none", "strength": 0, **result["clean"]}
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in (clean, *result["rows"]):
        ci = r.get("f1_macro_ci") or (None, None)
        w.writerow({**r, "f1_macro_ci_low": ci[0], "f1_macro_ci_high": ci[1]})
    return buf.getvalue()


def write(run_dir: Path, result: dict[str, Any], save_plots: bool = True) -> list[Path]:
    """The three files, each atomically; robustness.json, what reports read, last."""
    written = []
    if save_plots:
        written.append(outputs.save_figure(figure(result), run_dir / PLOT_FILE))
    else:  # an earlier evaluation's figure would not show these numbers
        (run_dir / PLOT_FILE).unlink(missing_ok=True)
    write_text(run_dir / CSV_FILE, to_csv(result))
    write_json(run_dir / JSON_FILE, result)
    return [*written, run_dir / CSV_FILE, run_dir / JSON_FILE]


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The table as mer-evaluate prints it: one line per row, macro F1 and its interval."""

    def pct(r: dict[str, Any]) -> str:
        lo, hi = r["f1_macro_ci"]
        return f"{100 * r['f1_macro']:5.1f} % [{100 * lo:.1f}, {100 * hi:.1f}]"

    named = [
        (f"{r['corruption']} {r['variant']} {r['stream']} {r['strength']:g} {r['unit']}", r)
        for r in result["rows"]
    ]
    width = max([len("clean"), *(len(name) for name, _ in named)])
    lines = [f"{'clean':<{width}}  macro F1 {pct(result['clean'])}"]
    for name, r in named:
        lines.append(
            f"{name:<{width}}  " + (f"skipped: {r['skipped']}" if r["skipped"] else f"macro F1 {pct(r)}")
        )
    return lines


def series(result: dict[str, Any]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """The scored rows by corruption, then by line (``stream variant``), in row order."""
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in result["rows"]:
        if not r["skipped"]:
            out.setdefault(r["corruption"], {}).setdefault(f"{r['stream']} {r['variant']}", []).append(r)
    return out


def figure(result: dict[str, Any]) -> Figure:
    """Macro F1 vs strength, one panel per corruption, one line per stream and variant from the
    clean score (strength 0); bars: each row's bootstrap interval; dashed: clean."""
    lines = series(result)
    cols = max(1, min(3, len(lines)))
    n_rows = max(1, -(-len(lines) // cols))
    fig, axes = plt.subplots(n_rows, cols, figsize=(4.4 * cols, 3.6 * n_rows), squeeze=False, sharey=True)
    clean = result["clean"]["f1_macro"]
    for ax, (name, by_line) in zip(axes.flat, lines.items(), strict=False):
        for label, rows in by_line.items():
            x = [clean_strength(rows[0]["unit"]), *(r["strength"] for r in rows)]
            y = np.array([clean, *(r["f1_macro"] for r in rows)])
            lo = np.array([clean, *(r["f1_macro_ci"][0] for r in rows)])
            hi = np.array([clean, *(r["f1_macro_ci"][1] for r in rows)])
            ax.errorbar(x, y, yerr=[y - lo, hi - y], marker="o", capsize=3, label=label)
        ax.axhline(clean, color="gray", ls="--", lw=1, label="clean")
        finish_panel(ax, name, next(iter(by_line.values()))[0]["unit"])
    return finish_figure(
        fig, axes, len(lines), f"robustness: test macro F1 under corruption (seed {result['seed']})"
    )


def finish_panel(ax: Axes, title: str, unit: str) -> None:
    ax.set_title(title)
    label_strength_axis(ax, unit)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def finish_figure(fig: Figure, axes: np.ndarray, n_panels: int, title: str) -> Figure:
    """The panels past ``n_panels`` hidden, macro F1 on the left column, the title, laid out."""
    for ax in list(axes.flat)[n_panels:]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("test macro F1")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


SNR_CLEAN_DB = 30.0  # where a plot draws the clean recordings on an SNR axis (beyond its 20 dB)


def clean_strength(unit: str) -> float:
    """Where the clean score sits on a corruption's strength axis: 0, but on an SNR axis (the
    stronger the noise, the lower the dB) at `SNR_CLEAN_DB`, labelled "clean"."""
    return SNR_CLEAN_DB if unit == "dB SNR" else 0.0


def label_strength_axis(ax: Axes, unit: str) -> None:
    """The x axis in the corruption's unit; a whole stream reads present (0) or missing (1); an
    SNR axis runs from clean down to 0 dB, so that stronger corruption is to the right again."""
    if unit == "stream":
        ax.set_xticks([0.0, 1.0], ["present", "missing"])
    elif unit == "dB SNR":
        ticks = [SNR_CLEAN_DB, 20.0, 10.0, 5.0, 0.0]
        ax.set_xticks(ticks, ["clean", *(f"{t:g}" for t in ticks[1:])])
        ax.set_xlim(SNR_CLEAN_DB + 2.0, -2.0)
        ax.set_xlabel(unit)
    else:
        ax.set_xlabel(unit)

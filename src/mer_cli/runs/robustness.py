"""Robustness evaluation (``mer-evaluate RUN --perturb``, ``eval.robustness=true``): a trained
run's test split re-scored under the named corruptions of `evaluation.perturb`, at each strength.

Input: a run directory of any modality (late fusion through its members, each with its own
temperature as `trained.predict_run` applies it) and its own data, read from its config.yaml as
mer-evaluate reads it (a cross-validation fold: its own test fold). Noise and lost frames are
relative to each stream's training statistics: the checkpoint's fitted standard scaler where the
model reads that stream as it is, else the train split's frames; never the test split.
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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from mer_cli.core.artifacts import write_json, write_text
from mer_cli.data import spec
from mer_cli.data.folds import CREMA_D_ACTOR_PATTERN, maybe_actor_ids
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


def read_target(run_dir: Path) -> Target:
    """The run's model(s), the streams they read, their frame rates and fitted statistics."""
    late = trained.read_late(run_dir)
    dirs = {"": run_dir} if late is None else late[2]
    streams: dict[str, None] = {}
    rates: dict[str, float | None] = {}
    references: dict[str, perturb.Reference] = {}
    member_streams = {}
    for member, d in dirs.items():
        _, preps, meta = trained.load_trained(d)
        member_streams[member] = tuple(meta["streams"])
        streams.update(dict.fromkeys(meta["streams"]))
        for name, stream_spec in spec.from_meta(meta)["streams"].items():
            rates.setdefault(name, stream_spec.get("frame_rate_hz"))
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


def skip_reason(condition: perturb.Condition, target: Target) -> str | None:
    """Why ``condition`` means nothing for this model, or None."""
    c = perturb.CORRUPTIONS.get(condition.corruption)
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


def evaluate_robustness(
    run_dir: Path, requested: list[str] | None = None, seed: int = 0, save_plots: bool = True
) -> tuple[dict[str, Any], list[Path]]:
    """Re-score ``run_dir``'s test split under ``requested`` corruptions (None: all) drawn from
    ``seed``; write robustness.json, robustness.csv and plots/robustness.png into it."""
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
    actors = maybe_actor_ids(test.clip_ids, pattern)
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
    for name in chosen:
        todo = perturb.conditions([name], target.frame_rates)
        log.info("robustness: %s, %d condition(s)", name, len(todo))
        for condition in todo:
            result["rows"].append(
                row(condition, target, splits, (clean_probs, clean_prob), groups, seed, result["reference"])
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
) -> dict[str, Any]:
    """One condition's row; ``clean``: each model's and the run's clean test probabilities;
    ``references`` records where each stream's training statistics came from."""
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
    reason = skip_reason(condition, target)
    test = splits.test
    prob: np.ndarray | None = None
    if reason is None and condition.masked:
        prob = masked(target, condition.stream, *clean)
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
            x = [0.0, *(r["strength"] for r in rows)]
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


def label_strength_axis(ax: Axes, unit: str) -> None:
    """The x axis in the corruption's unit; a whole stream reads present (0) or missing (1)."""
    if unit == "stream":
        ax.set_xticks([0.0, 1.0], ["present", "missing"])
    else:
        ax.set_xlabel(unit)

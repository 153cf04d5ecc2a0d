"""Write a run's results: metrics.json, history.csv, predictions.csv, the figures, and the
training data's profile.json.

Input: metrics per split (from `score`), the training history, the predictions, the data profile
(`preprocess.profile`). Output: files in the run directory, each written atomically. Figures use
matplotlib's Agg backend (no screen needed); the per-axes plotters are reused by the comparison
report.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from sklearn.metrics import ConfusionMatrixDisplay

from mer_cli.core.artifacts import atomic_open, write_json, write_text
from mer_cli.evaluation.metrics import HEADLINE, ece, pr_curves, reliability, roc_curves
from mer_cli.preprocess import profile

PROFILE_FILE = "profile.json"  # the training data's profile, written before training starts


@dataclass(frozen=True)
class Predictions:
    """One split's predictions, in clip order."""

    split: str
    clip_ids: tuple[str, ...]
    y_true: np.ndarray  # (N,)
    y_prob: np.ndarray  # (N, C)
    # each clip's speaker where the data stores them (native speaker field, data.speaker_file):
    # predictions.csv's speaker column, the comparison report's bootstrap groups
    speakers: tuple[str, ...] | None = None


def write(
    out_dir: Path,
    metrics: dict[str, Any],
    history_rows: Sequence[dict[str, float]] | None,
    predictions: Sequence[Predictions],
    class_names: Sequence[str],
    save_plots: bool = True,
    plot_splits: Sequence[str] = ("test",),
) -> list[Path]:
    """Write every result file into ``out_dir``; returns the paths written.

    Figures are drawn for the splits in ``plot_splits`` (metrics are written for every split).
    """
    written = [out_dir / "metrics.json"]
    write_json(written[0], metrics)
    written.append(write_predictions(out_dir / "predictions.csv", predictions, class_names))
    if history_rows:
        written.append(write_history(out_dir / "history.csv", history_rows))
    if save_plots:
        plots = out_dir / "plots"
        if history_rows:
            written.append(save_figure(training_curves(history_rows), plots / "training_curves.png"))
        for p in predictions:
            if p.split in plot_splits:
                written += write_split_figures(plots, p, class_names)
        layer_weights = metrics.get("run", {}).get("layer_weights")
        if layer_weights:  # model.layer_weights=learned
            written.append(save_figure(layer_weights_figure(layer_weights), plots / "layer_weights.png"))
    return written


def write_profile(out_dir: Path, described: profile.DataProfile) -> Path:
    """profile.json: the training split's data profile and the preprocessing it led to."""
    path = out_dir / PROFILE_FILE
    write_json(path, profile.as_dict(described))
    return path


def write_history(path: Path, rows: Sequence[dict[str, float]]) -> Path:
    buf = io.StringIO()
    # every key of any row: a run resumed from an older last.pt lacks columns added since
    columns = list(dict.fromkeys(k for row in rows for k in row))
    writer = csv.DictWriter(buf, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())
    return path


def write_predictions(path: Path, predictions: Sequence[Predictions], class_names: Sequence[str]) -> Path:
    """One row per clip: split, clip id, [speaker,] true and predicted label, probabilities; the
    speaker column only where the data stores speakers (without, the file is as it always was)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    with_speakers = any(p.speakers is not None for p in predictions)
    speaker = ["speaker"] if with_speakers else []
    writer.writerow(["split", "clip_id", *speaker, "y_true", "y_pred", *(f"prob_{c}" for c in class_names)])
    for p in predictions:
        speakers = p.speakers if p.speakers is not None else ("",) * len(p.clip_ids)
        for clip_id, who, y, prob in zip(p.clip_ids, speakers, p.y_true, p.y_prob, strict=True):
            row = [p.split, clip_id, *([who] if with_speakers else []), int(y), int(prob.argmax())]
            writer.writerow([*row, *(f"{v:.6g}" for v in prob)])
    write_text(path, buf.getvalue())
    return path


def read_predictions(path: Path, split: str) -> Predictions:
    """Read one split back from a ``predictions.csv`` written by `write_predictions`."""
    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == split]
    prob_cols = [k for k in (rows[0] if rows else {}) if k.startswith("prob_")]
    speakers = tuple(r.get("speaker") or "" for r in rows)
    return Predictions(
        split=split,
        clip_ids=tuple(r["clip_id"] for r in rows),
        y_true=np.array([int(r["y_true"]) for r in rows], dtype=np.int64),
        y_prob=np.array([[float(r[c]) for c in prob_cols] for r in rows]).reshape(len(rows), -1),
        # a file written before the column (or a split without speakers): None
        speakers=speakers if rows and all(speakers) else None,
    )


# ---------------------------------------------------------------------------------------------
# Figures


def save_figure(fig: Figure, path: Path, crop: bool = True) -> Path:
    """``fig`` as a PNG; ``crop``: trim to what is drawn (one more rendering pass; a figure laid
    out with ``tight_layout`` and nothing outside its axes can skip it)."""
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight" if crop else None)
    plt.close(fig)
    return path


def write_split_figures(plots: Path, p: Predictions, class_names: Sequence[str]) -> list[Path]:
    prefix = f"{p.split}_"
    paths = []
    fig, ax = plt.subplots(figsize=(5.5, 5))
    plot_confusion(ax, p.y_true, p.y_prob, class_names, f"{p.split}: confusion matrix")
    paths.append(save_figure(fig, plots / f"{prefix}confusion_matrix.png"))
    fig, ax = plt.subplots(figsize=(5, 5))
    plot_roc_micro(ax, p.y_true, p.y_prob, f"{p.split}: ROC (micro-average)")
    paths.append(save_figure(fig, plots / f"{prefix}roc.png"))
    fig, ax = plt.subplots(figsize=(5.5, 5))
    plot_roc_per_class(ax, p.y_true, p.y_prob, class_names, f"{p.split}: ROC per class")
    paths.append(save_figure(fig, plots / f"{prefix}roc_per_class.png"))
    fig, ax = plt.subplots(figsize=(5.5, 5))
    plot_pr_per_class(ax, p.y_true, p.y_prob, class_names, f"{p.split}: precision-recall per class")
    paths.append(save_figure(fig, plots / f"{prefix}pr_per_class.png"))
    fig, ax = plt.subplots(figsize=(5, 5))
    plot_reliability(ax, p.y_true, p.y_prob, f"{p.split}: reliability diagram")
    paths.append(save_figure(fig, plots / f"{prefix}reliability.png"))
    return paths


def training_curves(rows: Sequence[dict[str, float]]) -> Figure:
    """The notebook's four panels over epochs: loss, accuracy, ROC-AUC (train vs val), lr."""
    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for ax, name in zip(axes[:3], ("loss", "accuracy", "roc_auc"), strict=True):
        ax.plot(epochs, [r[f"train/{name}"] for r in rows], label=f"train/{name}")
        ax.plot(epochs, [r[f"val/{name}"] for r in rows], label=f"val/{name}")
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.legend()
        ax.grid(alpha=0.3)
    axes[3].plot(epochs, [r["lr"] for r in rows])
    axes[3].set_yscale("log")
    axes[3].set_title("learning rate")
    axes[3].set_xlabel("epoch")
    axes[3].grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig


def layer_weights_figure(weights: Mapping[str, Mapping[str, float]]) -> Figure:
    """One panel per stream: a bar per stored encoder layer, its learned softmax weight (the
    equal weight 1 / L dashed, the largest bar darker)."""
    width = 2.0 + 0.45 * max(len(w) for w in weights.values())  # inches per panel
    fig, axes = plt.subplots(1, len(weights), figsize=(width * len(weights), 3.2), squeeze=False)
    for ax, (stream, per_layer) in zip(axes[0], weights.items(), strict=True):
        layers, values = list(per_layer), [float(v) for v in per_layer.values()]
        top = int(np.argmax(values))
        colors = ["tab:blue" if i == top else "lightsteelblue" for i in range(len(values))]
        ax.bar(layers, values, color=colors, edgecolor="black", lw=0.5)
        ax.axhline(1.0 / len(values), color="k", ls="--", lw=0.8, label=f"equal (1/{len(values)})")
        ax.set_xlabel("encoder layer")
        ax.set_ylabel("weight")
        ax.set_title(f"{stream}: learned layer weights (largest: layer {layers[top]})", fontsize=9)
        ax.legend(loc="best", fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


def plot_confusion(
    ax: Axes, y_true: np.ndarray, y_prob: np.ndarray, class_names: Sequence[str], title: str
) -> None:
    ConfusionMatrixDisplay.from_predictions(
        y_true,
        y_prob.argmax(axis=1),
        labels=list(range(len(class_names))),
        display_labels=list(class_names),
        ax=ax,
        colorbar=False,
        xticks_rotation=45,
    )
    ax.set_title(title)


def plot_roc_micro(ax: Axes, y_true: np.ndarray, y_prob: np.ndarray, title: str, label: str = "") -> None:
    curve = roc_curves(y_true, y_prob)["micro"]
    ax.plot(curve.x, curve.y, label=f"{label + ' ' if label else ''}AUC = {curve.area:.3f}")
    _finish_roc(ax, title)


def plot_roc_per_class(
    ax: Axes, y_true: np.ndarray, y_prob: np.ndarray, class_names: Sequence[str], title: str
) -> None:
    for key, curve in roc_curves(y_true, y_prob).items():
        if key != "micro":
            ax.plot(curve.x, curve.y, label=f"{class_names[int(key)]} (AUC {curve.area:.2f})")
    _finish_roc(ax, title)


def _finish_roc(ax: Axes, title: str) -> None:
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="chance")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)


def plot_pr_per_class(
    ax: Axes, y_true: np.ndarray, y_prob: np.ndarray, class_names: Sequence[str], title: str
) -> None:
    for key, curve in pr_curves(y_true, y_prob).items():
        ax.plot(curve.x, curve.y, label=f"{class_names[int(key)]} (AP {curve.area:.2f})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)


def plot_reliability(ax: Axes, y_true: np.ndarray, y_prob: np.ndarray, title: str) -> None:
    """Accuracy against confidence (the top class's probability) per equal-width bin, the bins of
    ECE: a bar below the diagonal is an overconfident bin. A grey outline along the bottom shows
    how the clips spread over the bins (its tallest bin scaled to 0.25), inside the panel."""
    r = reliability(y_true, y_prob)
    width = float(r.edges[1] - r.edges[0])
    filled = r.counts > 0
    left = r.edges[:-1]
    ax.bar(
        left[filled],
        r.accuracy[filled],
        width=width,
        align="edge",
        alpha=0.7,
        edgecolor="black",
        lw=0.5,
        label="accuracy per bin",
    )
    ax.plot(
        r.confidence[filled],
        r.accuracy[filled],
        "o",
        color="tab:red",
        ms=3,
        label="(mean confidence, accuracy)",
    )
    share = r.counts / max(1, len(y_true))
    ax.stairs(
        0.25 * share / max(1e-12, float(share.max())),
        r.edges,
        color="dimgray",
        lw=1.2,
        label=f"clips per bin (tallest: {100 * share.max():.0f} %)",
    )
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfectly calibrated")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-class probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}\nECE {100 * ece(y_true, y_prob):.1f} % ({len(r.counts)} bins)")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)


def summary_line(metrics: dict[str, Any], run_dir: Path) -> str:
    """The console summary: headline test (and val) metrics and where the run lives."""
    parts = []
    for split in ("val", "test"):
        m = metrics.get(split)
        if isinstance(m, dict):
            parts.append(
                "  ".join(f"{split}/{k} {m[k]:.3f}" for k in HEADLINE if isinstance(m.get(k), float))
            )
    return "\n".join([*parts, f"run directory: {run_dir}"])

"""The report's charts (matplotlib): a bar chart per headline metric, and side-by-side grids of
confusion matrices and curves, one panel per model; `draw` saves them all under figures/.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from mer_cli.reporting.analysis import Model
from mer_cli.reporting.options import BAR_METRICS, GRIDS, MODALITY_ORDER, Comparison
from mer_cli.runs import outputs

# more models than this: bars run across (one row per model, labels readable at any count)
COLUMN_BARS_UP_TO = 8


def draw(
    result: Comparison, models: Sequence[Model], class_names: Sequence[str], grid_panels: int, out_dir: Path
) -> dict[str, list[str]]:
    """Every figure of the report saved under ``out_dir``/figures: figure kind (bar metric or grid
    kind) -> its files, relative to ``out_dir``, in order."""
    figures: dict[str, list[str]] = {}
    for key in BAR_METRICS:
        figures[key] = [f"figures/bars_{key}.png"]
        outputs.save_figure(bar_chart(result, key), out_dir / figures[key][0])
    # at most compare.grid_panels models per figure: grid_<kind>.png, or grid_<kind>_1.png, _2, ...
    per_figure = math.ceil(len(models) / math.ceil(len(models) / grid_panels))  # even parts
    chunks = [models[i : i + per_figure] for i in range(0, len(models), per_figure)]
    for kind in GRIDS:
        figures[kind] = []
        for i, chunk in enumerate(chunks, 1):
            name = f"figures/grid_{kind}_{i}.png" if len(chunks) > 1 else f"figures/grid_{kind}.png"
            part = f"{i} of {len(chunks)}" if len(chunks) > 1 else ""
            # laid out by tight_layout, nothing outside the panels: no cropping pass (the slow part)
            outputs.save_figure(grid(chunk, kind, class_names, part), out_dir / name, crop=False)
            figures[kind].append(name)
    return figures


def bar_chart(result: Comparison, metric: str) -> plt.Figure:
    """Models side by side: mean (value beside the bar), CI as error bar, chance and human lines.
    Up to COLUMN_BARS_UP_TO models as columns, more as rows (a 30-model sweep stays readable)."""
    models = result["models"]
    labels = [m["label"] for m in models]
    means = np.array([m["test"][metric]["mean"] for m in models], dtype=float)
    cis = [m["test"][metric]["ci"] or [mu, mu] for m, mu in zip(models, means, strict=True)]
    lo = np.array([c[0] for c in cis], dtype=float)
    hi = np.array([c[1] for c in cis], dtype=float)
    rows = len(models) > COLUMN_BARS_UP_TO
    if rows:
        fig, ax = plt.subplots(figsize=(8.0, 0.32 * len(models) + 1.6))
    else:
        fig, ax = plt.subplots(figsize=(max(5.0, 1.5 * len(models) + 2.5), 4.8))
    x = np.arange(len(models))
    colors = [
        f"C{MODALITY_ORDER.index(m['modality']) if m['modality'] in MODALITY_ORDER else 4}" for m in models
    ]
    err = [means - lo, hi - means]
    if rows:
        ax.barh(x, means, color=colors, alpha=0.85, height=0.6)
        ax.errorbar(means, x, xerr=err, fmt="none", ecolor="black", capsize=3, lw=1.0)
        for xi, mu, top in zip(x, means, hi, strict=True):
            ax.text(top + 0.01, float(xi), f"{100 * mu:.1f} %", ha="left", va="center", fontsize=8)
    else:
        ax.bar(x, means, color=colors, alpha=0.85, width=0.6)
        ax.errorbar(x, means, yerr=err, fmt="none", ecolor="black", capsize=5, lw=1.2)
        for xi, mu, top in zip(x, means, hi, strict=True):
            ax.text(float(xi), top + 0.01, f"{100 * mu:.1f} %", ha="center", va="bottom", fontsize=9)
    line = ax.axvline if rows else ax.axhline
    chance = result["chance"][metric]
    line(chance, color="gray", ls="--", lw=1, label=f"chance: majority class ({100 * chance:.1f} %)")
    if result["human_rates"]:
        for (name, rate), style in zip(result["human_rates"].items(), (":", "-.", (0, (5, 1))), strict=True):
            line(
                rate,
                color="darkred",
                ls=style,
                lw=1,
                label=f"human raters, {name} ({100 * rate:.1f} % accuracy)",
            )
    conf = round(100 * result["settings"]["confidence"])
    top = min(1.0, max(float(np.nanmax(hi)), chance, 0.65 if result["human_rates"] else 0) + 0.15)
    ax.set_title(f"test/{metric}: mean, {conf} % CI")
    if rows:
        ax.set_yticks(x, labels, fontsize=8)
        ax.invert_yaxis()  # the report's model order, top to bottom
        ax.set_xlabel(f"test/{metric}")
        ax.set_xlim(0, top)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0.0, -0.6 / (0.32 * len(models) + 1.6)))
        ax.grid(axis="x", alpha=0.3)
    else:
        ax.set_xticks(
            x,
            labels,
            rotation=15 if max(map(len, labels)) > 10 else 0,
            ha="right" if max(map(len, labels)) > 10 else "center",
        )
        ax.set_ylabel(f"test/{metric}")
        ax.set_ylim(0, top)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never on them
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def grid(models: Sequence[Model], kind: str, class_names: Sequence[str], part: str = "") -> plt.Figure:
    """One panel per model, test predictions pooled over its runs; ``part``: "2 of 3" when the
    models are spread over several figures."""
    n = len(models)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.8 * cols, 4.6 * rows), squeeze=False)
    for ax, m in zip(axes.flat, models, strict=False):
        y_true = np.concatenate([r.test.y_true for r in m.runs])
        y_prob = np.concatenate([r.test.y_prob for r in m.runs])
        pooled = f" ({len(m.runs)} runs pooled)" if len(m.runs) > 1 else ""
        title = f"{m.label}{pooled}"
        if kind == "confusion_matrices":
            outputs.plot_confusion(ax, y_true, y_prob, class_names, title)
        elif kind == "roc_micro":
            outputs.plot_roc_micro(ax, y_true, y_prob, title)
        elif kind == "roc_per_class":
            outputs.plot_roc_per_class(ax, y_true, y_prob, class_names, title)
        elif kind == "reliability":
            outputs.plot_reliability(ax, y_true, y_prob, title)
        else:
            outputs.plot_pr_per_class(ax, y_true, y_prob, class_names, title)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.suptitle(f"test: {GRIDS[kind]}" + (f" ({part})" if part else ""))
    fig.tight_layout()
    return fig

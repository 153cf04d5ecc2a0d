"""The report as a document: `Block`s (headings, paragraphs, lists, tables, figures) made from a
`Comparison`, its runs and its figure files, in the order the report shows them; `render` writes
them as Markdown and HTML.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mer_cli.evaluation import stats
from mer_cli.evaluation.metrics import METRICS
from mer_cli.reporting.collect import Run, relative_path
from mer_cli.reporting.options import (
    ALL_PAIRS_UP_TO,
    BAR_METRICS,
    GRIDS,
    METRIC_TITLES,
    TABLE_METRICS,
    Comparison,
)
from mer_cli.reporting.prose import order_text, pct, unreachable_alpha


@dataclass(frozen=True)
class Block:
    kind: str  # h2 | p | ul | table | img
    text: str = ""
    items: tuple[str, ...] = ()
    rows: tuple[tuple[str, ...], ...] = ()  # table: first row is the header
    path: str = ""  # img: relative to the report


def _cell(entry: dict[str, Any], percent: bool = True) -> str:
    def f(x: float | None) -> str:
        if x is None or not math.isfinite(x):
            return "n/a"
        return f"{100 * x:.1f}" if percent else f"{x:.3f}"

    text = f(entry["mean"]) + (" %" if percent else "")
    if entry.get("std") is not None:
        text += f" ± {f(entry['std'])}"
    if entry.get("ci"):
        text += f" [{f(entry['ci'][0])}, {f(entry['ci'][1])}]"
    return text


def metric_cell(entry: dict[str, Any], metric: str) -> str:
    """A table cell of ``metric``'s summary (mean ± std [interval]), as the main table writes it."""
    return _cell(entry, percent=METRICS.get(metric).percent)


SPEAKER_DEPENDENT = "speaker-dependent split"


def speaker_dependent_labels(runs: Sequence[Run], labels: dict[Path, str]) -> set[str]:
    """The models with a run whose metrics.json says its test split shares speakers with training
    (``run.speakers.speaker_dependent``), or its splits repeat clips (``duplicated_clips``): both
    allowed only with data.allow_speaker_overlap=true."""
    out = set()
    for r in runs:
        speakers = r.metrics.get("run", {}).get("speakers") or {}
        leaky = speakers.get("speaker_dependent") or speakers.get("duplicated_clips")
        if leaky and r.path in labels:
            out.add(labels[r.path])
    return out


def balance_blocks(result: Comparison) -> list[Block]:
    """A paragraph when the test classes are imbalanced: accuracy then mostly counts the large
    classes, so the table leads with balanced accuracy and macro F1."""
    balance = result.get("test_balance") or {}
    if not balance.get("imbalanced"):
        return []
    (big, n_big), (small, n_small) = balance["largest"], balance["smallest"]
    ratio = "∞" if not math.isfinite(balance["ratio"]) else f"{balance['ratio']:.1f}"
    return [
        Block(
            "p",
            f"Imbalanced test classes: {big} has {n_big} clips, {small} {n_small} ({ratio}:1, above "
            f"{balance['threshold']}:1). Accuracy mostly counts the large classes here, so the table "
            "shows balanced accuracy (mean recall per class) and macro F1 first; compare models by those.",
        )
    ]


def document(
    result: Comparison, runs: Sequence[Run], figures: dict[str, list[str]], root: Path
) -> list[Block]:
    """The report's blocks; ``figures``: figure kind (bar metric or grid) -> its files, in order."""
    conf = round(100 * result["settings"]["confidence"])
    labels = {Path(p): m["label"] for m in result["models"] for p in m["runs"]}
    blocks = [Block("h2", "Summary"), Block("ul", items=tuple(result["summary"]))]
    blocks.append(Block("h2", "Test metrics per model"))
    blocks.append(
        Block(
            "p",
            f"Mean ± standard deviation across runs (seeds, folds) [{conf} % confidence interval]. "
            "Intervals of macro F1, accuracy and balanced accuracy come from the bootstrap described "
            "in the summary; the others are t-intervals across runs (none for a single run).",
        )
    )
    dependent = speaker_dependent_labels(runs, labels)
    if dependent:
        blocks.append(
            Block(
                "p",
                f"{SPEAKER_DEPENDENT}: {', '.join(sorted(dependent))} trained with "
                "data.allow_speaker_overlap=true, on a test split that shares speakers with training "
                "or validation, or on splits that repeat clips (metrics.json run.speakers); their "
                "numbers overstate what the model does for new speakers.",
            )
        )
    blocks += balance_blocks(result)
    shown = result.get("table_metrics", TABLE_METRICS)
    header = ("model", "runs", *(METRIC_TITLES[k] for k in shown))
    rows = [
        (
            m["label"] + (f" ({SPEAKER_DEPENDENT})" if m["label"] in dependent else ""),
            str(m["n_runs"]),
            *(_cell(m["test"][k], percent=METRICS.get(k).percent) for k in shown),
        )
        for m in result["models"]
    ]
    blocks.append(Block("table", rows=(header, *rows)))
    blocks += contribution_blocks(result)
    blocks += scaling_blocks(runs, labels)
    blocks.append(Block("h2", "Ranking"))
    blocks.append(
        Block(
            "p",
            "By the mean over runs, best first; models whose means are equal as the table shows "
            "them (to 0.1 percentage point) are tied, written with =.",
        )
    )
    blocks.append(
        Block(
            "ul",
            items=tuple(
                f"by {METRIC_TITLES[k]}: {order_text(order)}"
                for k, order in result["ranking_by_metric"].items()
            ),
        )
    )
    for key in BAR_METRICS:
        blocks += [Block("img", text=f"test/{key}", path=f) for f in figures[key]]
    if result["pairwise"]:
        blocks.append(Block("h2", "Pairwise tests"))
        pairs = result["pairwise"]
        n_boot = result["settings"]["bootstrap_samples"]
        alpha = result["settings"]["alpha"]
        blocks.append(
            Block(
                "p",
                _tested_text(result)
                + "Δ = macro F1 of A minus B (mean over matched runs) with its paired-bootstrap "
                f"{conf} % interval; p: paired bootstrap, Holm-adjusted over all {len(pairs)} pair(s) "
                f"tested; significant: Holm-adjusted p < α = {alpha}.",
            )
        )
        blocks.append(
            Block(
                "p",
                f"With B = {n_boot} bootstrap samples the smallest p the paired bootstrap can show is "
                f"2/(B+1) ≈ {stats.round_up(pairs[0]['p_bootstrap_floor'])}, and after Holm's "
                f"adjustment over {len(pairs)} pair(s) {len(pairs)} × 2/(B+1) ≈ "
                f"{stats.round_up(pairs[0]['p_holm_floor'])}. A p at that floor is written as a bound, "
                '"≤": no resample reversed the difference, and the true p may be smaller; '
                "compare.bootstrap_samples (mer-compare --bootstrap-samples) lowers the floor."
                + unreachable_alpha(result),
            )
        )
        blocks.append(
            Block(
                "p",
                "McNemar's test on per-clip correctness (b: clips only A gets right, c: only B) is "
                "shown for each matched run (seed, fold) separately, not combined: runs of different "
                "seeds are tested on the same clips, so their tests are not independent and pooling "
                "their counts would count every clip once per seed. The last column counts the runs "
                f"with McNemar p < α = {alpha} (not adjusted for the number of pairs).",
            )
        )
        header = (
            "A",
            "B",
            "Δ macro F1",
            "p (bootstrap)",
            "p (Holm)",
            "significant",
            "McNemar per run: b/c, p",
            "McNemar p < α",
        )
        rows = [
            (
                p["a"],
                p["b"],
                f"{100 * p['f1_macro_diff']:+.1f} [{100 * p['f1_macro_diff_ci'][0]:+.1f}, "
                f"{100 * p['f1_macro_diff_ci'][1]:+.1f}]",
                stats.format_p(p["p_bootstrap"], p["p_bootstrap_floor"]),
                stats.format_p(p["p_holm"], p["p_holm_floor"]),
                "yes" if p["significant"] else "no",
                "; ".join(
                    f"{t['run']}: {t['b']}/{t['c']}, {stats.format_p(t['p_value'])} ({t['method']})"
                    for t in p["mcnemar"]
                ),
                f"{p['mcnemar_significant_runs']} of {len(p['mcnemar'])}",
            )
            for p in pairs
        ]
        blocks.append(Block("table", rows=(header, *rows)))
    blocks.append(Block("h2", "Per class (mean over runs)"))
    classes = result["class_names"]
    for key, title in (
        ("f1_per_class", "F1"),
        ("roc_auc_per_class", "ROC-AUC"),
        ("pr_auc_per_class", "PR-AUC"),
    ):
        rows = [(m["label"], *(pct(m["test"][key].get(c)) for c in classes)) for m in result["models"]]
        blocks.append(Block("p", f"{title} per class:"))
        blocks.append(Block("table", rows=(("model", *classes), *rows)))
    blocks.append(Block("h2", "Side by side"))
    for kind, title in GRIDS.items():
        parts = figures[kind]
        blocks += [
            Block(
                "img", text=f"test: {title}" + (f" ({i} of {len(parts)})" if len(parts) > 1 else ""), path=f
            )
            for i, f in enumerate(parts, 1)
        ]
    blocks.append(Block("h2", "Runs"))
    header = ("model", "seed", "fold", *(METRIC_TITLES[k] for k in BAR_METRICS), "run directory")
    rows = [_run_row(r, labels, root, *(pct(r.metrics["test"].get(k)) for k in BAR_METRICS)) for r in runs]
    blocks.append(Block("table", rows=(header, *rows)))
    return (
        blocks
        + late_fusion_blocks(runs, labels, root)
        + layer_weight_blocks(runs, labels, root)
        + failure_blocks(result["failures"], root)
    )


def nothing_to_compare_document(result: Comparison, root: Path) -> list[Block]:
    """The report's blocks when every job failed (`analysis.nothing_to_compare`)."""
    return [
        Block("h2", "Summary"),
        Block("ul", items=tuple(result["summary"])),
        *failure_blocks(result["failures"], root),
    ]


def _run_row(run: Run, labels: dict[Path, str], root: Path, *cells: str) -> tuple[str, ...]:
    """One run's table row: its model, seed and fold, ``cells``, then its directory."""
    seed = "" if run.seed is None else str(run.seed)
    fold = "" if run.fold is None else str(run.fold)
    return (labels[run.path], seed, fold, *cells, relative_path(run.path, root))


def _tested_text(result: Comparison) -> str:
    """Which pairs the table holds, when not every pair (compare.pairwise), else ""."""
    if result["settings"]["pairwise"] != "best":
        return ""
    named = sum(p["tested_because"] == "named" for p in result["pairwise"])
    return (
        f"With {len(result['models'])} models (more than {ALL_PAIRS_UP_TO}, or compare.pairwise=best) "
        "each model is tested against the best by macro F1, not every pair against every other"
        + (f", plus {named} pair(s) named in compare.pairs" if named else "")
        + " (compare.pairwise=all tests every pair). "
    )


def late_fusion_of(run: Run) -> tuple[str, str]:
    """A late run's combiner and what it weighed its members with (metrics.json's run section;
    runs from before ``modality.combiner`` held one ``acoustic_weight``)."""
    info = run.metrics.get("run", {})
    weights = info.get("weights")
    if weights is None and "acoustic_weight" in info:
        w = float(info["acoustic_weight"])
        weights = {"acoustic": w, "visual": 1.0 - w}
    combiner = str(info.get("combiner", "mean"))
    if weights is None:
        return combiner, "logistic regression on the members' probabilities (late.json)"
    return combiner, ", ".join(f"{m} {float(w):.2f}" for m, w in weights.items())


def late_fusion_blocks(runs: Sequence[Run], labels: dict[Path, str], root: Path) -> list[Block]:
    late = [r for r in runs if r.modality == "late"]
    if not late:
        return []
    header = ("model", "seed", "fold", "combiner", "weights", "run directory")
    rows = [_run_row(r, labels, root, *late_fusion_of(r)) for r in late]
    return [
        Block("h2", "Late fusion"),
        Block(
            "p",
            "How each late fusion run combined its members' class probabilities (modality.combiner): "
            "mean averages them, weighted uses weights fitted on validation, stacking a classifier "
            "fitted on validation; the test split chose none of them.",
        ),
        Block("table", rows=(header, *rows)),
    ]


def layer_weight_blocks(runs: Sequence[Run], labels: dict[Path, str], root: Path) -> list[Block]:
    """Each run's learned layer weights (model.layer_weights=learned: metrics.json's
    ``run.layer_weights``), a row per run and stream; empty when no run learned any."""
    rows = []
    for r in runs:
        for stream, weights in (r.metrics.get("run", {}).get("layer_weights") or {}).items():
            top = max(weights, key=lambda layer: float(weights[layer]))
            shown = ", ".join(f"{layer}: {float(w):.2f}" for layer, w in weights.items())
            rows.append(_run_row(r, labels, root, stream, top, shown))
    if not rows:
        return []
    header = ("model", "seed", "fold", "stream", "largest", "weight per layer", "run directory")
    text = (
        "The softmax weight each model learned for every encoder layer its features store "
        "(model.layer_weights=learned; equal weights are 1 / layers): the layers the model drew on."
    )
    return [Block("h2", "Layer weights"), Block("p", text), Block("table", rows=(header, *rows))]


def contribution_blocks(result: Comparison) -> list[Block]:
    """Each stream's contribution to the multi-stream models that recorded it (empty if none)."""
    models = [m for m in result["models"] if m.get("stream_contribution")]
    if not models:
        return []
    streams = list(dict.fromkeys(s for m in models for s in m["stream_contribution"]))
    header = ("model", METRIC_TITLES["accuracy"], *(f"{s} only" for s in streams))
    rows = [
        (
            m["label"],
            pct(m["test"]["accuracy"]["mean"]),
            *(pct(m["stream_contribution"].get(s)) for s in streams),
        )
        for m in models
    ]
    text = (
        "Test accuracy of each jointly trained model with all its streams, and with one stream "
        "kept and the others' frames zeroed (mean over runs): how much the model relies on each."
    )
    return [Block("h2", "Stream contribution"), Block("p", text), Block("table", rows=(header, *rows))]


def scaling_blocks(runs: Sequence[Run], labels: dict[Path, str]) -> list[Block]:
    """One line per model: the scaling of each of its input streams and why (metrics.json's
    ``run.preprocessing``: preprocess.scaling=auto's choice from the training data's profile, or
    the setting); empty when no run records it (runs from before it)."""
    per_model: dict[str, dict[str, str]] = {}
    for r in runs:
        recorded = r.metrics.get("run", {}).get("preprocessing") or {}
        for stream, choice in recorded.items():
            text = f"{choice.get('scaling') or 'none'} ({choice.get('scaling_reason', '')})"
            per_model.setdefault(labels.get(r.path, r.modality), {}).setdefault(stream, text)
    if not per_model:
        return []
    items = tuple(
        f"{label}: " + "; ".join(f"{stream} {text}" for stream, text in streams.items())
        for label, streams in sorted(per_model.items())
    )
    text = (
        "Feature scaling per input stream (the first run of each model; preprocess.scaling=auto chooses "
        "it from the training split's profile, each run's profile.json):"
    )
    return [Block("p", text), Block("ul", items=items)]


def failure_blocks(failures: Sequence[dict[str, Any]], root: Path) -> list[Block]:
    if not failures:
        return []
    rows = [
        (relative_path(Path(f["path"]), root), str(f["modality"]), str(f["seed"]), f["error"])
        for f in failures
    ]
    return [Block("h2", "Failed jobs"), Block("table", rows=(("job", "modality", "seed", "error"), *rows))]

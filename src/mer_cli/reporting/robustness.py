"""The comparison report's robustness section, for runs that carry a robustness.json
(`runs.robustness`: ``eval.robustness=true`` or ``mer-evaluate RUN --perturb``).

Input: the report's models (`analysis.Model`: label and runs). Output: `summarize`, plain values
for comparison.json's ``robustness`` (None when no run has a robustness.json):
    {"seeds": [perturbation seeds], "conditions": [{key, corruption, variant, stream, strength,
     unit}], "models": [{label, runs, clean, f1_macro: {key: mean or null}, skipped: {key: why}}]}
(macro F1 on the test split, the mean over the model's runs that scored the condition);
`figure` draws macro F1 against strength, one panel per corruption and stream, one line per
model; `blocks` lays out the table and the figure, `insert` puts them before the report's runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from mer_cli.core.errors import MerError
from mer_cli.reporting.analysis import Model
from mer_cli.reporting.document import Block
from mer_cli.reporting.prose import pct
from mer_cli.runs import files
from mer_cli.runs.robustness import clean_strength, finish_figure, finish_panel

FILE = "robustness.json"
FIGURE = "figures/robustness.png"


def condition_key(row: dict[str, Any]) -> str:
    """One condition across runs: corruption, variant, stream, strength and its unit."""
    return f"{row['corruption']} {row['variant']} {row['stream']} @ {row['strength']:g} {row['unit']}"


def read(path: Path) -> dict[str, Any]:
    """A run's robustness.json, checked for what the section reads: one `MerError` line if not."""
    result = files.read_json(path)
    try:
        int(result["seed"]), float(result["clean"]["f1_macro"])
        for row in result["rows"]:
            missing = [k for k in (*_CONDITION_FIELDS, "f1_macro") if k not in row]
            if missing:
                raise KeyError(", ".join(missing))
            float(row["strength"])
    except (KeyError, TypeError, ValueError) as e:
        raise MerError(f"{path}: not a mer-cli robustness file ({type(e).__name__}: {e})") from None
    return result


def summarize(models: Sequence[Model]) -> dict[str, Any] | None:
    """Macro F1 per model and condition, the mean over the model's runs with a robustness.json."""
    conditions: dict[str, dict[str, Any]] = {}
    seeds: set[int] = set()
    out = []
    for m in models:
        results = [read(r.path / FILE) for r in m.runs if (r.path / FILE).is_file()]
        if not results:
            continue
        values: dict[str, list[float]] = {}
        skipped: dict[str, str] = {}
        for res in results:
            seeds.add(int(res["seed"]))
            for row in res["rows"]:
                key = condition_key(row)
                conditions.setdefault(key, {"key": key, **{k: row[k] for k in _CONDITION_FIELDS}})
                if row.get("skipped"):
                    skipped[key] = str(row["skipped"])
                else:
                    values.setdefault(key, []).append(float(row["f1_macro"]))
        out.append(
            {
                "label": m.label,
                "runs": len(results),
                "clean": float(np.mean([res["clean"]["f1_macro"] for res in results])),
                "f1_macro": {k: float(np.mean(v)) for k, v in values.items()},
                "skipped": {k: why for k, why in skipped.items() if k not in values},
            }
        )
    if not out:
        return None
    return {"seeds": sorted(seeds), "conditions": list(conditions.values()), "models": out}


_CONDITION_FIELDS = ("corruption", "variant", "stream", "strength", "unit")


def table_rows(summary: dict[str, Any]) -> tuple[tuple[str, ...], ...]:
    """Header (condition, then one column per model) and one row per condition, clean first."""
    models = summary["models"]
    header = ("condition", *(f"{m['label']} ({m['runs']} run{'s' * (m['runs'] > 1)})" for m in models))
    rows = [("clean", *(pct(m["clean"]) for m in models))]
    for c in summary["conditions"]:
        cells = []
        for m in models:
            value = m["f1_macro"].get(c["key"])
            cells.append(
                pct(value) if value is not None else ("skipped" if c["key"] in m["skipped"] else "n/a")
            )
        rows.append((c["key"], *cells))
    return (header, *rows)


def panels(summary: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The conditions by panel (``corruption · stream``), in order."""
    out: dict[str, list[dict[str, Any]]] = {}
    for c in summary["conditions"]:
        out.setdefault(f"{c['corruption']} · {c['stream']}", []).append(c)
    return out


def figure(summary: dict[str, Any]) -> Figure:
    """Macro F1 vs strength, one panel per corruption and stream, one line per model (and
    variant: dashed for the second) starting from its clean score at strength 0."""
    by_panel = panels(summary)
    cols = min(4, len(by_panel))
    rows = -(-len(by_panel) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False, sharey=True)
    for ax, (title, conds) in zip(axes.flat, by_panel.items(), strict=False):
        variants = list(dict.fromkeys(c["variant"] for c in conds))
        for i, m in enumerate(summary["models"]):
            for v, style in zip(variants, ("-", "--", ":"), strict=False):
                points = [
                    (c["strength"], m["f1_macro"][c["key"]])
                    for c in conds
                    if c["variant"] == v and c["key"] in m["f1_macro"]
                ]
                if not points:
                    continue
                x, y = zip(*[(clean_strength(conds[0]["unit"]), m["clean"]), *points], strict=True)
                label = m["label"] + (f" ({v})" if len(variants) > 1 else "")
                ax.plot(x, y, marker="o", ls=style, color=f"C{i % 10}", label=label)
        finish_panel(ax, title, conds[0]["unit"])
    return finish_figure(
        fig, axes, len(by_panel), "robustness: test macro F1 under corruption (mean over runs)"
    )


def blocks(summary: dict[str, Any] | None, figure_path: str) -> list[Block]:
    """The section: what was measured, the table, the figure (empty without a summary)."""
    if summary is None:
        return []
    seeds = ", ".join(str(s) for s in summary["seeds"])
    text = (
        "Test macro F1 of each model with its test split corrupted (mean over the runs with a "
        "robustness.json; eval.robustness=true or mer-evaluate RUN --perturb): Gaussian noise "
        "relative to each feature's training std, visual frames lost at random or in one gap "
        "(replaced by the training mean), a stream missing (zeros: every frame the training mean; "
        "masked: late fusion without that member), the visual stream delayed, white noise added "
        "to the recordings at an SNR (features computed again; needs the recordings). Skipped: "
        "the corruption means nothing for that model (its only stream missing, a shift of one "
        f"stream against nothing) or cannot be done (no recordings). Corruptions drawn with seed {seeds}."
    )
    return [
        Block("h2", "Robustness"),
        Block("p", text),
        Block("table", rows=table_rows(summary)),
        Block("img", text="test macro F1 vs corruption strength", path=figure_path),
    ]


def insert(document_blocks: list[Block], section: list[Block]) -> list[Block]:
    """``section`` placed before the report's "Runs" heading (at the end if it has none)."""
    at = next(
        (i for i, b in enumerate(document_blocks) if b.kind == "h2" and b.text == "Runs"),
        len(document_blocks),
    )
    return [*document_blocks[:at], *section, *document_blocks[at:]]

"""The model-zoo tables of docs/results.md from a comparison report: encoder x modality.

    python benchmarks/zoo_table.py outputs/sweeps/zoo          # after `make zoo` (report.md there)
    python benchmarks/zoo_table.py outputs/comparisons/<time>  # or any mer-compare output

Reads the report's ``comparison.json`` (test macro F1 per model: mean, std over its runs and the
report's bootstrap interval) and each run's ``metrics.json`` (training seconds, epochs), and prints
two Markdown tables: macro F1 as ``mean ± std [CI low, high]`` in %, and the median training time
per run with the median number of epochs trained. Models are labelled ``<modality>/<encoder>`` by
the report (a sweep over ``model=...``); a combination without runs prints as "-".
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

MODALITIES = ("acoustic", "visual", "early", "late", "joint", "xattn")
ENCODERS = ("bilstm", "bilstm_notebook", "gru", "transformer", "tcn")


def _cell_f1(model: dict[str, Any]) -> str:
    f1 = model["test"]["f1_macro"]
    text = f"{100 * f1['mean']:.1f}"
    if f1.get("std") is not None:
        text += f" ± {100 * f1['std']:.1f}"
    if f1.get("ci"):
        low, high = f1["ci"]
        text += f" [{100 * low:.1f}, {100 * high:.1f}]"
    return text


def _run_metrics(report_dir: Path, run: str) -> dict[str, Any]:
    path = Path(run)
    if not path.is_absolute():
        path = report_dir / path
    return json.loads((path / "metrics.json").read_text())["run"]


def _cell_time(report_dir: Path, model: dict[str, Any]) -> str:
    if model["modality"] == "late":
        return "reuses its members"
    runs = [_run_metrics(report_dir, r) for r in model["runs"]]
    seconds = statistics.median(r["train_seconds"] for r in runs)
    epochs = statistics.median(r["epochs_trained"] for r in runs)
    return f"{seconds:.0f} s ({epochs:.0f} ep.)"


def tables(report_dir: Path) -> str:
    comparison = json.loads((report_dir / "comparison.json").read_text())
    models = {m["label"]: m for m in comparison["models"]}
    encoders = [e for e in ENCODERS if any(label.endswith(f"/{e}") for label in models)]
    missing = sorted(label for label in models if "/" not in label)
    if missing:
        raise SystemExit(f"{report_dir}: models without an encoder in their label: {', '.join(missing)}")
    out = []
    columns = (
        ("test macro F1, %", _cell_f1),
        ("training time per run (median)", lambda model: _cell_time(report_dir, model)),
    )
    for title, cell in columns:
        out.append(f"| {title} | " + " | ".join(f"`{e}`" for e in encoders) + " |")
        out.append("|---" * (len(encoders) + 1) + "|")
        for modality in MODALITIES:
            cells = []
            for encoder in encoders:
                model = models.get(f"{modality}/{encoder}")
                cells.append("-" if model is None else cell(model))
            out.append(f"| {modality} | " + " | ".join(cells) + " |")
        out.append("")
    runs = sorted({len(m["runs"]) for m in models.values()})
    out.append(f"({len(models)} models, {'/'.join(map(str, runs))} runs each.)")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report_dir", type=Path, help="a directory holding comparison.json")
    args = parser.parse_args(argv)
    if not (args.report_dir / "comparison.json").is_file():
        sys.exit(f"{args.report_dir}: no comparison.json (run mer-compare on the sweep first)")
    print(tables(args.report_dir))


if __name__ == "__main__":
    main()

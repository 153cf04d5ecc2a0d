"""The comparison report's entry points: runs collected, analysed, drawn, laid out and written.

`write` makes one report from collected runs; `into_new_dir` (mer-compare) collects the runs of any
directories into a new report directory, `into_sweep` (the sweep callback) into the sweep's root.
Output, in one directory: report.md, report.html (figures embedded), comparison.json,
comparison.csv, runs.csv, pairwise.csv and figures/*.png (figures/robustness.png and a robustness
section when runs carry a robustness.json: `robustness`; baseline rows, sentences and a section
when they carry a baselines.json: `baselines`).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from mer_cli.core.artifacts import write_json, write_text
from mer_cli.core.errors import MerError
from mer_cli.reporting import analysis, baselines, charts, document, render, robustness
from mer_cli.reporting.collect import Failure, Run, collect, label_runs
from mer_cli.reporting.options import Comparison, Settings
from mer_cli.runs import outputs

TITLE = "mer-cli model comparison"


def write(out_dir: Path, runs: Sequence[Run], failures: Sequence[Failure], settings: Settings) -> Comparison:
    """Build the comparison of ``runs`` and write every report file into ``out_dir``."""
    if not runs and failures:  # every job failed: the report still says why
        result = analysis.nothing_to_compare(failures)
        blocks = document.nothing_to_compare_document(result, out_dir)
        write_json(out_dir / "comparison.json", result)
        write_text(out_dir / "report.md", render.to_markdown(TITLE, blocks))
        write_text(out_dir / "report.html", render.to_html(TITLE, blocks, out_dir))
        return result
    result = analysis.build(runs, failures, settings)
    models = analysis.group_models(runs)
    classic = baselines.summarize(runs, models, result, settings)  # None: no run has a baselines.json
    if classic is not None:
        result["baselines"] = classic
        result["summary"] = baselines.add_sentences(result["summary"], result)
    robust = robustness.summarize(models)  # None: no run has a robustness.json
    if robust is not None:
        result["robustness"] = robust
        outputs.save_figure(robustness.figure(robust), out_dir / robustness.FIGURE)
    figure_files = charts.draw(result, models, runs[0].class_names, settings.grid_panels, out_dir)
    write_json(out_dir / "comparison.json", result)
    # the baselines' rows (modality "baseline") after the models'
    write_text(
        out_dir / "comparison.csv",
        render.models_csv({**result, "models": result["models"] + (classic or [])}),
    )
    write_text(out_dir / "runs.csv", render.runs_csv(runs, label_runs(runs), out_dir))
    write_text(out_dir / "pairwise.csv", render.pairwise_csv(result))
    blocks = document.document(result, [r for m in models for r in m.runs], figure_files, out_dir)
    blocks = baselines.add_rows(blocks, result)
    blocks = robustness.insert(blocks, robustness.blocks(robust, robustness.FIGURE))
    blocks = baselines.insert(blocks, baselines.blocks(result, out_dir))
    write_text(out_dir / "report.md", render.to_markdown(TITLE, blocks))
    write_text(out_dir / "report.html", render.to_html(TITLE, blocks, out_dir))
    return result


def into_new_dir(dirs: Sequence[Path], out_root: Path, settings: Settings, out: Path | None = None) -> Path:
    """mer-compare: the report of ``dirs`` in a new directory (``out``, else out_root/<time>)."""
    if out is None:
        stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
        out, n = out_root / stamp, 1
        while out.exists():
            n += 1
            out = out_root / f"{stamp}_{n}"
    elif out.exists() and any(out.iterdir()):
        raise MerError(f"{out}: exists and is not empty; choose a new --out directory")
    runs, failures = collect(dirs, settings.actor_pattern)
    # written into a hidden sibling and renamed: a failure leaves no half-written report
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp, runs, failures, settings)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def into_sweep(sweep_dir: Path, settings: Settings) -> Comparison:
    """The report of a finished sweep, written at its root directory."""
    runs, failures = collect([sweep_dir], settings.actor_pattern)
    return write(sweep_dir, runs, failures, settings)

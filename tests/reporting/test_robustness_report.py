"""The report's robustness section from made-up run directories: macro F1 per model and
condition is the mean over the model's runs, skipped conditions say so, a run without a
robustness.json changes nothing, a damaged one is one error line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import fake_run
from mer_cli.core.errors import MerError
from mer_cli.reporting import analysis, robustness
from mer_cli.reporting.collect import collect
from mer_cli.reporting.document import Block


def row(
    corruption: str, variant: str, stream: str, strength: float, f1: float | None, unit: str = "u"
) -> dict:
    return {
        "corruption": corruption,
        "variant": variant,
        "stream": stream,
        "strength": strength,
        "unit": unit,
        "frames": None,
        "f1_macro": f1,
        "f1_macro_ci": None if f1 is None else [f1 - 0.05, f1 + 0.05],
        "accuracy": f1,
        "balanced_accuracy": f1,
        "ece": None if f1 is None else 0.1,
        "skipped": None if f1 is not None else "visual is the only stream visual reads",
    }


def write_robustness(run: Path, clean: float, noise: float, missing: float | None) -> None:
    result = {
        "format": 1,
        "split": "test",
        "seed": 0,
        "clean": {"f1_macro": clean},
        "rows": [
            row("noise", "gaussian", "visual", 0.5, noise),
            row("missing", "zeros", "visual", 1.0, missing),
        ],
    }
    (run / "robustness.json").write_text(json.dumps(result))


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    y = np.arange(24) % 4
    for seed, (clean, noise) in enumerate([(0.60, 0.40), (0.70, 0.30)]):
        write_robustness(fake_run(tmp_path, "early", seed, y, y), clean, noise, 0.25 + seed * 0.1)
        write_robustness(fake_run(tmp_path, "visual", seed, y, y), clean - 0.1, noise - 0.1, None)
    fake_run(tmp_path, "acoustic", 0, y, y)  # no robustness.json: not in the section
    return tmp_path


def models(root: Path) -> list[analysis.Model]:
    return analysis.group_models(collect([root])[0])


def test_each_cell_is_the_mean_over_the_models_runs(runs):
    summary = robustness.summarize(models(runs))
    assert summary is not None
    by_label = {m["label"]: m for m in summary["models"]}
    assert set(by_label) == {"early", "visual"}  # acoustic has no robustness.json
    assert by_label["early"]["clean"] == pytest.approx((0.60 + 0.70) / 2)
    noise = "noise gaussian visual @ 0.5 u"
    missing = "missing zeros visual @ 1 u"
    assert by_label["early"]["f1_macro"] == pytest.approx({noise: 0.35, missing: 0.30})
    assert by_label["visual"]["f1_macro"] == pytest.approx({noise: 0.25})
    assert by_label["visual"]["skipped"] == {missing: "visual is the only stream visual reads"}
    header, *rows = robustness.table_rows(summary)
    assert header == ("condition", "visual (2 runs)", "early (2 runs)")  # the report's model order
    assert rows == [
        ("clean", "55.0 %", "65.0 %"),
        (noise, "25.0 %", "35.0 %"),
        (missing, "skipped", "30.0 %"),
    ]


def test_the_section_goes_before_the_runs_and_draws_one_panel_per_corruption_and_stream(runs):
    summary = robustness.summarize(models(runs))
    section = robustness.blocks(summary, robustness.FIGURE)
    doc = [Block("h2", "Summary"), Block("h2", "Runs"), Block("table")]
    placed = robustness.insert(doc, section)
    assert [b.text for b in placed if b.kind == "h2"] == ["Summary", "Robustness", "Runs"]
    assert placed[-1] == doc[-1] and section[-1].path == "figures/robustness.png"
    fig = robustness.figure(summary)
    assert [ax.get_title() for ax in fig.axes if ax.get_visible()] == ["noise · visual", "missing · visual"]


def test_runs_without_robustness_files_leave_the_report_as_it_was(tmp_path):
    y = np.arange(24) % 4
    fake_run(tmp_path, "early", 0, y, y)
    assert robustness.summarize(models(tmp_path)) is None
    assert robustness.blocks(None, robustness.FIGURE) == []


def test_a_damaged_robustness_file_is_one_error_naming_it(runs):
    path = runs / "early_seed0" / "robustness.json"
    path.write_text(
        json.dumps({"format": 1, "seed": 0, "clean": {"f1_macro": 0.5}, "rows": [{"corruption": "noise"}]})
    )
    with pytest.raises(MerError, match=r"early_seed0/robustness.json: not a mer-cli robustness file"):
        robustness.summarize(models(runs))

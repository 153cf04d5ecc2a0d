"""The comparison report's line per model on its feature scaling (metrics.json run.preprocessing)."""

from __future__ import annotations

from pathlib import Path

from mer_cli.reporting.collect import Run
from mer_cli.reporting.document import scaling_blocks


def run(path: Path, preprocessing: dict | None) -> Run:
    metrics = {"run": {"preprocessing": preprocessing}} if preprocessing is not None else {"run": {}}
    return Run(path, "joint", 0, None, {}, None, metrics, ("a",), None, None)  # type: ignore[arg-type]


def test_the_report_names_each_models_scaling_and_why(tmp_path):
    chosen = {
        "acoustic": {
            "scaling": "per_clip",
            "scaling_reason": "clip-level scale spread up to 10^3.2 across clips",
        },
        "visual": {"scaling": None, "scaling_reason": "preprocess.normalize=false"},
    }
    runs = [run(tmp_path / "a", chosen), run(tmp_path / "b", chosen), run(tmp_path / "old", None)]
    labels = {tmp_path / "a": "joint", tmp_path / "b": "joint", tmp_path / "old": "joint (older)"}
    (intro, listed) = scaling_blocks(runs, labels)
    assert intro.kind == "p" and "preprocess.scaling=auto" in intro.text
    assert listed.items == (
        "joint: acoustic per_clip (clip-level scale spread up to 10^3.2 across clips); "
        "visual none (preprocess.normalize=false)",
    )
    assert scaling_blocks([run(tmp_path / "old", None)], labels) == []  # runs from before it: nothing

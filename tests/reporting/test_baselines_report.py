"""The report's classic baselines from made-up run directories: a baseline is scored exactly as
a model with the same predictions, a sweep's copies of one baselines.json make one row, and the
summary says when a baseline beats every deep model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import CLASSES, fake_run
from mer_cli.core.errors import MerError
from mer_cli.data.splits import Split, Splits
from mer_cli.evaluation.baselines import suite
from mer_cli.reporting import analysis, baselines, options
from mer_cli.reporting.collect import collect
from mer_cli.reporting.document import document
from mer_cli.reporting.options import Settings
from mer_cli.reporting.render import to_markdown

SETTINGS = Settings(bootstrap_samples=200)
N = 24


def fake_probabilities(y_pred: np.ndarray) -> np.ndarray:
    """As `conftest.fake_run` predicts: 0.7 on the predicted class, 0.1 on the others."""
    prob = np.full((len(y_pred), len(CLASSES)), 0.1)
    prob[np.arange(len(y_pred)), y_pred] = 0.7
    return prob


def write_baselines(run: Path, y_true: np.ndarray, y_pred: np.ndarray, key: str = "k1") -> None:
    """A baselines.json as runs.baselines writes it: one 1-NN DTW baseline predicting ``y_pred``
    on the fake runs' test clips (the fake runs' ids and actors)."""
    ids = tuple(f"{actor:04d}_clip{i}" for i, actor in enumerate(1001 + np.arange(N) // 4))

    def split(name: str) -> Split:
        clips = tuple(np.zeros((1, 1), np.float32) for _ in ids)
        return Split(name, ids, clips, clips, y_true.astype(np.int64))

    splits = Splits(split("train"), split("val"), split("test"), class_names=CLASSES, source="fake")
    prob = fake_probabilities(y_pred)
    outcome = suite.Outcome(prob, prob, {"window": 0.1}, {"0": 0.5, "0.1": 0.6})
    entries = suite.record([suite.Result("dtw", outcome, 1.5)], splits, r"^(\d{4})_", 200, 0.95)
    content = {
        "format": 1,
        "key": key,
        "group": "g1",
        "data": {"source": "fake", "streams": ["acoustic", "visual"], "fold": None, "n_clips": {}},
        "settings": suite.Settings().as_dict(),
        "class_names": list(CLASSES),
        "bootstrap": {"samples": 200, "confidence": 0.95, "actor_pattern": r"^(\d{4})_"},
        "baselines": entries,
    }
    (run / "baselines.json").write_text(json.dumps(content))


def report(root: Path) -> tuple[dict, str]:
    """The comparison and its Markdown, with the baselines as `report.write` adds them (no figures)."""
    runs, failures = collect([root])
    result = analysis.build(runs, failures, SETTINGS)
    models = analysis.group_models(runs)
    result["baselines"] = baselines.summarize(runs, models, result, SETTINGS)
    result["summary"] = baselines.add_sentences(result["summary"], result)
    figures = {k: ["x.png"] for k in (*options.BAR_METRICS, *options.GRIDS)}
    blocks = baselines.add_rows(document(result, [r for m in models for r in m.runs], figures, root), result)
    blocks = baselines.insert(blocks, baselines.blocks(result, root))
    return result, to_markdown("t", blocks)


def table_rows(md: str) -> dict[str, list[str]]:
    table = md.split("## Test metrics per model")[1].split("\n## ")[0]
    rows = [line.strip("|").split(" | ") for line in table.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}


def test_a_baseline_gets_the_metrics_and_intervals_of_a_model_with_its_predictions(tmp_path):
    y = np.arange(N) % 4
    wrong = np.where(np.arange(N) % 3 == 0, (y + 1) % 4, y)
    fake_run(tmp_path, "early", 0, y, (y + 1) % 4)
    visual = fake_run(tmp_path, "visual", 0, y, wrong)
    write_baselines(visual, y, wrong)
    result, md = report(tmp_path)
    rows = table_rows(md)
    assert rows["baseline: 1-NN DTW (acoustic+visual)"] == rows["visual"]  # every cell, intervals too
    assert "[" in rows["visual"][1]  # macro F1 with its bootstrap interval
    (entry,) = result["baselines"]
    models = {m["label"]: m for m in result["models"]}
    assert entry["test"]["f1_macro"] == models["visual"]["test"]["f1_macro"]
    assert entry["vs_best"]["model"] == "visual" and entry["vs_best"]["f1_macro_diff"] == 0.0
    sentence = next(s for s in result["summary"] if "classic baseline" in s)
    assert sentence.startswith("The best deep model, visual (")
    assert "ties with the best classic baseline, 1-NN DTW (acoustic+visual)" in sentence
    assert "| 1-NN DTW (acoustic+visual) |  | window=0.1 | 66.7 % | 66.7 % | 1.5 | visual_seed0 |" in md


def test_the_summary_says_when_a_baseline_beats_every_deep_model(tmp_path):
    y = np.arange(N) % 4
    runs = [
        fake_run(tmp_path, "early", 0, y, np.where(np.arange(N) % 2 == 0, (y + 1) % 4, y)),
        fake_run(tmp_path, "visual", 0, y, (y + 2) % 4),
    ]
    for run in runs:  # two jobs of a sweep with the same data: one baseline, one row
        write_baselines(run, y, y)
    result, md = report(tmp_path)
    assert len(result["baselines"]) == 1
    assert [label for label in table_rows(md) if label.startswith("baseline:")] == [
        "baseline: 1-NN DTW (acoustic+visual)"
    ]
    early = next(m for m in result["models"] if m["label"] == "early")["test"]["f1_macro"]
    lo, hi = early["ci"]
    sentence = next(s for s in result["summary"] if "beats every deep model" in s)
    assert sentence.startswith(
        "1-NN DTW (acoustic+visual) beats every deep model on test macro F1: 100.0 % [100.0, 100.0] "
        f"against the best of the 2, early, {100 * early['mean']:.1f} % [{100 * lo:.1f}, {100 * hi:.1f}] (Δ +"
    )
    assert "paired bootstrap p" in sentence


def test_a_damaged_baselines_file_is_one_error_line(tmp_path):
    y = np.arange(N) % 4
    run = fake_run(tmp_path, "early", 0, y, y)
    (run / "baselines.json").write_text(json.dumps({"format": 1, "baselines": [{}]}))
    with pytest.raises(MerError, match=r"baselines.json: not a mer-cli baselines file"):
        report(tmp_path)

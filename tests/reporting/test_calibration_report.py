"""The report's calibration and class-balance parts: ECE beside macro F1 (also for runs written
before metrics.json had it), a reliability grid, and an imbalanced test split said in words."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import CLASSES, fake_run
from mer_cli.evaluation import metrics
from mer_cli.reporting import options, report
from mer_cli.reporting.collect import collect


def _report(tmp_path, runs_root):
    runs, failures = collect([runs_root])
    result = report.write(tmp_path / "report", runs, failures, options.Settings(bootstrap_samples=200))
    return result, (tmp_path / "report" / "report.md").read_text()


def test_the_table_shows_ece_beside_macro_f1_also_for_a_run_whose_metrics_json_lacks_it(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, len(CLASSES), 120)
    runs = tmp_path / "runs"
    for seed in (0, 1):
        pred = np.where(rng.random(120) < 0.6, y, (y + 1) % len(CLASSES))
        fake_run(runs, "visual", seed, y, pred)
    # a run from before ECE existed: its metrics.json has no "ece"; the report computes it
    old = runs / "visual_seed1" / "metrics.json"
    m = json.loads(old.read_text())
    del m["test"]["ece"]
    old.write_text(json.dumps(m))
    result, md = _report(tmp_path, runs)
    expected = []
    for seed in (0, 1):
        pred_csv = np.genfromtxt(
            runs / f"visual_seed{seed}" / "predictions.csv",
            delimiter=",",
            names=True,
            dtype=None,
            encoding=None,
        )
        prob = np.stack([pred_csv[f"prob_{c}"] for c in CLASSES], axis=1)
        # confidence 0.7 on every clip: ECE is |accuracy - 0.7| (one bin holds every clip)
        acc = float((pred_csv["y_pred"] == pred_csv["y_true"]).mean())
        assert metrics.ece(pred_csv["y_true"], prob) == pytest.approx(abs(acc - 0.7))
        expected.append(abs(acc - 0.7))
    entry = result["models"][0]["test"]["ece"]
    assert entry["mean"] == pytest.approx(np.mean(expected))
    header = next(line for line in md.splitlines() if line.startswith("| model | runs"))
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert cells[2:4] == ["macro F1", "ECE"]
    assert (
        "figures/grid_reliability.png" in md
        and (tmp_path / "report" / "figures" / "grid_reliability.png").is_file()
    )


def test_an_imbalanced_test_split_is_said_and_the_table_leads_with_balanced_accuracy(tmp_path):
    y = np.array([0] * 60 + [1] * 20 + [2] * 10 + [3] * 10)
    fake_run(tmp_path / "runs", "acoustic", 0, y, np.zeros_like(y))  # always the large class
    result, md = _report(tmp_path, tmp_path / "runs")
    assert result["test_balance"]["imbalanced"] and result["test_balance"]["ratio"] == pytest.approx(6.0)
    assert result["table_metrics"][:2] == ["balanced_accuracy", "f1_macro"]
    assert f"Imbalanced test classes: {CLASSES[0]} has 60 clips" in md
    header = next(line for line in md.splitlines() if line.startswith("| model | runs"))
    assert [c.strip() for c in header.strip("|").split("|")][2:4] == ["balanced accuracy", "macro F1"]


def test_a_balanced_test_split_keeps_the_usual_table(tmp_path):
    y = np.repeat(np.arange(len(CLASSES)), 25)
    fake_run(tmp_path / "runs", "acoustic", 0, y, y)
    result, md = _report(tmp_path, tmp_path / "runs")
    assert not result["test_balance"]["imbalanced"]
    assert result["table_metrics"] == list(options.TABLE_METRICS)
    assert "Imbalanced" not in md

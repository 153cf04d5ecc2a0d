"""report.baselines=true end to end: a sweep's jobs on one dataset write the same baselines.json,
computed once, scored as the models are, and the sweep's report shows them beside the models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import run_main
from mer_cli.evaluation.metrics import score


@pytest.mark.slow
def test_a_sweep_computes_the_baselines_once_and_reports_them(tmp_path: Path):
    sweep = tmp_path / "sweep"
    proc = run_main(
        "train",
        "-m",
        "experiment=smoke",
        "runtime.save_plots=false",
        "compare.bootstrap_samples=200",
        "seed=0,1",
        "report.baselines=true",
        "report.c_grid=[0.1,1.0]",
        "report.dtw_windows=[0.0,0.1]",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p.parent for p in sweep.glob("*/config.yaml"))
    assert len(jobs) == 2
    files = [json.loads((j / "baselines.json").read_text()) for j in jobs]
    assert files[0] == files[1]  # the second job copied the first one's
    assert len(list((sweep / ".baselines").iterdir())) == 1
    logs = [(j / "train.log").read_text() for j in jobs]
    assert sum("baselines: computed earlier in this sweep" in log for log in logs) == 1

    result = files[0]
    assert result["data"]["n_clips"] == {"train": 48, "val": 48, "test": 48}  # experiment=smoke's slice
    assert result["data"]["streams"] == ["acoustic", "visual"]  # early fusion reads both
    assert [b["name"] for b in result["baselines"]] == ["logreg", "svm", "dtw"]
    for b in result["baselines"]:
        p = b["test_predictions"]
        y_true, y_prob = np.array(p["y_true"]), np.array(p["y_prob"])
        expected = score(y_true, y_prob, result["class_names"])
        assert b["test"]["f1_macro"] == pytest.approx(expected["f1_macro"])
        assert b["test"]["confusion_matrix"] == expected["confusion_matrix"]
        lo, hi = b["test_ci"]["f1_macro"]
        assert lo <= b["test"]["f1_macro"] <= hi
        assert set(b["chosen"].values()) <= {0.0, 0.1, 1.0}
        assert set(b["validation_f1_macro"]) == ({"0", "0.1"} if b["name"] == "dtw" else {"0.1", "1"})

    report = (sweep / "report.md").read_text()
    table = report.split("## Test metrics per model")[1].split("##")[0]
    row = next(
        line for line in table.splitlines() if line.startswith("| baseline: 1-NN DTW (acoustic+visual) |")
    )
    f1 = result["baselines"][2]["test"]["f1_macro"]
    assert f"| {100 * f1:.1f} % [" in row  # macro F1 with its interval, as the models' rows
    comparison = json.loads((sweep / "comparison.json").read_text())
    assert [b["label"] for b in comparison["baselines"]] == [
        "baseline: pooled statistics + logistic regression (acoustic+visual)",
        "baseline: pooled statistics + RBF SVM (acoustic+visual)",
        "baseline: 1-NN DTW (acoustic+visual)",
    ]
    assert any("deep model" in sentence for sentence in comparison["summary"])

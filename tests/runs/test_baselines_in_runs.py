"""report.baselines=true end to end: a sweep's jobs on one dataset write the same baselines.json,
computed once, scored as the models are, and the sweep's report shows them beside the models."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import DictConfig, OmegaConf

from conftest import compose_train, run_main
from mer_cli.evaluation.metrics import score
from mer_cli.runs import baselines


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


def test_the_baselines_key_names_the_data_streams_and_settings_not_the_model():
    base, late = compose_train(), compose_train("modality=late")

    def key(cfg: DictConfig = base, fold: bool = True, **changes: object) -> str:
        cfg = copy.deepcopy(cfg)
        for dotted, value in changes.items():
            OmegaConf.update(cfg, dotted.replace("__", "."), value)
        return baselines.key_of(baselines.identity(cfg, with_fold=fold))

    same = key()
    assert key(seed=1, model__dropout=0.1, logger__name="tensorboard", data__cache="memory") == same
    assert key(late) == same  # late fusion's members read both streams, as early fusion does
    assert baselines.streams_of(late) == ["acoustic", "visual"]
    assert key(modality__streams=["acoustic"]) != same
    assert key(data__limit_per_split=48) != same
    assert key(report__dtw_windows=[0.1]) != same
    assert key(compare__bootstrap_samples=500) != same  # the intervals it stores
    assert key(cv__folds=3, cv__fold=0) != key(cv__folds=3, cv__fold=1)
    assert key(fold=False, cv__folds=3, cv__fold=0) == key(fold=False, cv__folds=3, cv__fold=1)

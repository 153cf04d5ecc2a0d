"""End to end: the console scripts as a user runs them, on the embedded data with tiny configs."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, run_cli
from mer_cli.train import cpu_has_native_bf16

RUN_FILES = [
    "config.yaml",
    ".hydra/overrides.yaml",
    "train.log",
    "history.csv",
    "checkpoint.pt",
    "metrics.json",
    "predictions.csv",
    "plots/training_curves.png",
    "plots/test_confusion_matrix.png",
    "plots/test_roc.png",
    "plots/test_roc_per_class.png",
    "plots/test_pr_per_class.png",
]
HEADLINE = ["f1_macro", "accuracy", "balanced_accuracy", "roc_auc_micro", "confusion_matrix"]


def _train(run_dir: Path, *overrides: str, cwd: Path | None = None):
    return run_cli("train", "experiment=smoke", f"hydra.run.dir={run_dir}", *overrides, cwd=cwd)


@pytest.mark.parametrize("modality", ["acoustic", "visual", "early"])
def test_smoke_run_writes_a_complete_run_directory(tmp_path, modality):
    run = tmp_path / "run"
    proc = _train(run, f"modality={modality}", cwd=tmp_path)  # any working directory
    assert proc.returncode == 0, proc.stderr
    for name in RUN_FILES:
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    for split in ("val", "test"):
        for key in HEADLINE:
            assert key in metrics[split]
        assert 0.0 <= metrics[split]["f1_macro"] <= 1.0
        assert np.array(metrics[split]["confusion_matrix"]).sum() == metrics[split]["n_clips"]
    assert metrics["run"]["modality"] == modality
    preds = (run / "predictions.csv").read_text().splitlines()
    assert len(preds) == 1 + metrics["val"]["n_clips"] + metrics["test"]["n_clips"]
    assert f"modality: {modality}" not in (run / "config.yaml").read_text()  # resolved, not the choice
    assert f"name: {modality}" in (run / "config.yaml").read_text()
    assert "run directory" in proc.stderr + proc.stdout


def test_a_training_split_of_one_clip_more_than_a_batch_trains(tmp_path):
    # 17 training clips, batches of 16 (experiment=smoke): the 17th clip once made a batch of its
    # own, on which BatchNorm raised
    proc = _train(tmp_path / "run", "modality=visual", "data.limit_per_split=17", "save_plots=false")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["run"]["epochs_trained"] == 2
    assert metrics["val"]["n_clips"] == 17


def test_late_fusion_trains_both_members_then_reuses_them(tmp_path):
    run = tmp_path / "late"
    proc = _train(run, "modality=late")
    assert proc.returncode == 0, proc.stderr
    for member in ("acoustic", "visual"):
        assert (run / member / "checkpoint.pt").is_file()
    late = json.loads((run / "metrics.json").read_text())
    assert late["run"]["acoustic_weight"] == 0.5

    # the fused probabilities are the average of the members' probabilities
    def probs(path):
        rows = [line.split(",") for line in path.read_text().splitlines()[1:]]
        return np.array([[float(v) for v in r[4:]] for r in rows if r[0] == "test"])

    fused, a, v = (probs(p / "predictions.csv") for p in (run, run / "acoustic", run / "visual"))
    np.testing.assert_allclose(fused, (a + v) / 2, atol=1e-5)

    reuse = tmp_path / "reuse"
    proc = _train(
        reuse,
        "modality=late",
        f"modality.acoustic_run={run / 'acoustic'}",
        f"modality.visual_run={run / 'visual'}",
    )
    assert proc.returncode == 0, proc.stderr
    assert not (reuse / "acoustic").exists()  # nothing trained again
    again = json.loads((reuse / "metrics.json").read_text())
    assert again["test"]["f1_macro"] == pytest.approx(late["test"]["f1_macro"], abs=1e-6)


def test_same_seed_gives_identical_metrics(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _train(a, "modality=visual", "seed=3").returncode == 0
    assert _train(b, "modality=visual", "seed=3").returncode == 0
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    for split in ("val", "test"):
        assert ma[split] == mb[split]


def test_mer_evaluate_reloads_the_checkpoint_into_a_new_directory(tmp_path):
    run = tmp_path / "run"
    assert _train(run, "modality=visual").returncode == 0
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    proc = run_cli("evaluate", str(run), "--split", "all")
    assert proc.returncode == 0, proc.stderr
    (out,) = (run / "evaluations").iterdir()
    metrics = json.loads((out / "metrics.json").read_text())
    trained = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["f1_macro"] == pytest.approx(trained["test"]["f1_macro"], abs=1e-9)
    assert (out / "plots" / "test_confusion_matrix.png").is_file()
    assert {p: p.stat().st_mtime_ns for p in before} == before  # training results untouched


@pytest.mark.skipif(
    not cpu_has_native_bf16(),
    reason="this CPU has no native bf16 (AVX512-BF16 or AMX): precision=auto trains in fp32 here",
)
def test_a_bf16_run_is_reproduced_exactly_by_mer_evaluate_members_and_late_fusion(tmp_path):
    run = tmp_path / "late"
    proc = _train(run, "modality=late", "trainer.loop.precision=bf16", "save_plots=false")
    assert proc.returncode == 0, proc.stderr
    for target in (run / "visual", run):  # a single-stream run, and late fusion re-predicting both
        proc = run_cli("evaluate", str(target), "--split", "all", "--no-plots")
        assert proc.returncode == 0, proc.stderr
        (out,) = (target / "evaluations").iterdir()
        trained = json.loads((target / "metrics.json").read_text())
        again = json.loads((out / "metrics.json").read_text())
        assert trained["run"].get("precision", "bfloat16") == "bfloat16"
        for split in ("val", "test"):
            assert again[split] == trained[split], (target.name, split)  # exactly, loss included


def _write_pickle(path: Path, n_classes: int = 6, bad_clip: str | None = None) -> None:
    rng = np.random.default_rng(0)
    data = {}
    for split, n in (("train", 24), ("val", 12), ("test", 12)):
        data[split] = {
            f"{1001 + i % 4}_DFA_{split}_{i}": (
                rng.standard_normal((int(rng.integers(20, 40)), 7)),
                rng.random((int(rng.integers(6, 12)), 4)),
                i % n_classes,
            )
            for i in range(n)
        }
    if bad_clip:
        mfcc, aus, label = data["val"][bad_clip]
        data["val"][bad_clip] = (mfcc[:0], aus, label)  # zero frames
    path.write_bytes(pickle.dumps(data))


def test_a_users_pickle_trains_with_feature_sizes_and_classes_from_the_data(tmp_path):
    pkl = tmp_path / "feats.pkl"
    _write_pickle(pkl, n_classes=4)
    run = tmp_path / "run"
    proc = _train(run, "data=pickle", f"data.path={pkl}", "modality=early")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert list(metrics["test"]["per_class"]) == ["class_0", "class_1", "class_2", "class_3"]
    log = proc.stdout + proc.stderr
    assert "early: target length" in log and "11 features" in log  # 7 MFCC + 4 AUs, fused


def test_bad_input_is_one_error_line_nonzero_exit_and_no_run_directory(tmp_path):
    pkl = tmp_path / "feats.pkl"
    _write_pickle(pkl, bad_clip="1002_DFA_val_1")
    run = tmp_path / "run"
    proc = _train(run, "data=pickle", f"data.path={pkl}")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == f"mer-train: error: {pkl}: val/1002_DFA_val_1: mfcc has 0 frames"
    assert "Traceback" not in proc.stderr
    assert not run.exists()

    proc = _train(run, "data=pickle", f"data.path={tmp_path / 'missing.pkl'}")
    assert proc.returncode == 2 and "missing.pkl: file not found" in proc.stderr
    assert not run.exists()


def test_readme_documents_the_two_setup_commands():
    readme = (REPO / "README.md").read_text()
    makefile = (REPO / "Makefile").read_text()
    for target in ("run", "test"):
        assert f"make {target}" in readme
        assert f"\n{target}: " in makefile


def test_a_finished_run_is_never_trained_over(tmp_path):
    run = tmp_path / "run"
    assert _train(run, "modality=visual").returncode == 0
    weights = (run / "checkpoint.pt").read_bytes()
    proc = _train(run, "modality=visual", "seed=1")
    assert proc.returncode == 2
    assert "already holds a run" in proc.stderr.strip().splitlines()[-1]
    assert (run / "checkpoint.pt").read_bytes() == weights

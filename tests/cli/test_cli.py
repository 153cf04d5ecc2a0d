"""End to end: the console scripts as a user runs them, on the embedded data with tiny configs."""

from __future__ import annotations

import csv
import importlib
import json
import pickle
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, run_cli
from mer_cli.training.hardware import cpu_has_native_bf16

RUN_FILES = [
    "config.yaml",
    "profile.json",
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
    "plots/test_reliability.png",
]
HEADLINE = ["f1_macro", "accuracy", "balanced_accuracy", "roc_auc_micro", "confusion_matrix"]


def scores_from_predictions(path: Path, split: str) -> tuple[float, float]:
    """Accuracy and macro F1 (over every class column) counted from predictions.csv's labels."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    n_classes = sum(k.startswith("prob_") for k in rows[0])
    y = np.array([[int(r["y_true"]), int(r["y_pred"])] for r in rows if r["split"] == split])
    f1 = []
    for c in range(n_classes):
        tp = np.sum((y[:, 0] == c) & (y[:, 1] == c))
        denom = np.sum(y[:, 0] == c) + np.sum(y[:, 1] == c)  # 2 tp + fp + fn
        f1.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(y[:, 0] == y[:, 1])), float(np.mean(f1))


def _train(run_dir: Path, *overrides: str, cwd: Path | None = None):
    return run_cli("train", "experiment=smoke", f"hydra.run.dir={run_dir}", *overrides, cwd=cwd)


@pytest.mark.parametrize("modality", ["acoustic", "visual", "early"])
@pytest.mark.slow
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
        accuracy, f1_macro = scores_from_predictions(run / "predictions.csv", split)
        assert metrics[split]["accuracy"] == pytest.approx(accuracy)
        assert metrics[split]["f1_macro"] == pytest.approx(f1_macro)
        assert np.array(metrics[split]["confusion_matrix"]).sum() == metrics[split]["n_clips"]
    assert metrics["run"]["modality"] == modality
    preds = (run / "predictions.csv").read_text().splitlines()
    assert len(preds) == 1 + metrics["val"]["n_clips"] + metrics["test"]["n_clips"]
    assert f"modality: {modality}" not in (run / "config.yaml").read_text()  # resolved, not the choice
    assert f"name: {modality}" in (run / "config.yaml").read_text()
    assert "run directory" in proc.stderr + proc.stdout


@pytest.mark.slow
def test_a_training_split_of_one_clip_more_than_a_batch_trains(tmp_path):
    # 17 training clips, batches of 16 (experiment=smoke): the 17th clip once made a batch of its
    # own, on which BatchNorm raised
    proc = _train(tmp_path / "run", "modality=visual", "data.limit_per_split=17", "runtime.save_plots=false")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["run"]["epochs_trained"] == 2
    assert metrics["val"]["n_clips"] == 17


@pytest.mark.slow
def test_late_fusion_trains_both_members_then_reuses_them(tmp_path):
    run = tmp_path / "late"
    proc = _train(run, "modality=late")
    assert proc.returncode == 0, proc.stderr
    for member in ("acoustic", "visual"):
        assert (run / member / "checkpoint.pt").is_file()
    late = json.loads((run / "metrics.json").read_text())
    assert late["run"]["combiner"] == "mean"
    assert late["run"]["weights"] == {"acoustic": 0.5, "visual": 0.5}

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


@pytest.mark.slow
def test_fitted_late_fusion_is_reproduced_exactly_by_mer_evaluate(tmp_path):
    run = tmp_path / "stacking"
    proc = _train(run, "modality=late", "modality.combiner=stacking", "runtime.save_plots=false")
    assert proc.returncode == 0, proc.stderr
    late = json.loads((run / "late.json").read_text())
    assert late["format"] == 2 and late["combiner"] == "stacking"
    assert (
        len(late["stacker"]["coef"]) == 6 and len(late["stacker"]["coef"][0]) == 12
    )  # 6 classes x 2 members
    # the same members, their weights fitted instead: nothing trained again
    weighted = tmp_path / "weighted"
    members = [f"modality.{m}_run={run / m}" for m in ("acoustic", "visual")]
    proc = _train(
        weighted, "modality=late", "modality.combiner=weighted", *members, "runtime.save_plots=false"
    )
    assert proc.returncode == 0, proc.stderr
    fitted = json.loads((weighted / "metrics.json").read_text())["run"]
    assert fitted["combiner"] == "weighted" and sum(fitted["weights"].values()) == pytest.approx(1.0)
    for target in (run, weighted):
        proc = run_cli("evaluate", str(target), "--split", "all", "--no-plots")
        assert proc.returncode == 0, proc.stderr
        (out,) = (target / "evaluations").iterdir()
        trained = json.loads((target / "metrics.json").read_text())
        again = json.loads((out / "metrics.json").read_text())
        assert again["run"]["combiner"] == trained["run"]["combiner"]
        for split in ("val", "test"):
            assert again[split] == trained[split], (target.name, split)  # exactly, loss included

    # the key the weighted combiner replaced: one line, before anything is trained
    proc = _train(tmp_path / "old", "modality=late", "modality.acoustic_weight=fit")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "mer-train: error: modality.acoustic_weight=fit is now modality.combiner=weighted "
        "(weights fitted on validation)"
    )
    assert not (tmp_path / "old").exists()


@pytest.mark.slow
def test_same_seed_gives_identical_metrics(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _train(a, "modality=visual", "seed=3").returncode == 0
    assert _train(b, "modality=visual", "seed=3").returncode == 0
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    for split in ("val", "test"):
        assert ma[split] == mb[split]


@pytest.mark.slow
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
@pytest.mark.slow
def test_a_bf16_run_is_reproduced_exactly_by_mer_evaluate_members_and_late_fusion(tmp_path):
    run = tmp_path / "late"
    proc = _train(run, "modality=late", "trainer.loop.precision=bf16", "runtime.save_plots=false")
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


def _write_pickle(
    path: Path, n_classes: int = 6, bad_clip: str | None = None, shared_speakers: bool = False
) -> None:
    """Four speakers per split, none in two splits (``shared_speakers``: all splits the same four)."""
    rng = np.random.default_rng(0)
    data = {}
    for k, (split, n) in enumerate((("train", 24), ("val", 12), ("test", 12))):
        first = 1001 if shared_speakers else 1001 + 10 * k
        data[split] = {
            f"{first + i % 4}_DFA_{split}_{i}": (
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_test_split_sharing_speakers_with_training_is_refused_unless_allowed_and_then_recorded(tmp_path):
    pkl = tmp_path / "feats.pkl"
    _write_pickle(pkl, n_classes=4, shared_speakers=True)  # speakers 1001-1004 in every split
    run = tmp_path / "run"
    proc = _train(run, "data=pickle", f"data.path={pkl}", "modality=acoustic")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"mer-train: error: {pkl}: 4 speaker(s) (1001, 1002, 1003, ...) are in both the train and "
        "test splits, 36 clips: a speaker-dependent split (data.speaker_pattern='^(\\d{4})_'); split by "
        "speaker, or set data.allow_speaker_overlap=true to run it anyway (recorded with every result)"
    )
    assert not run.exists()  # refused before anything was trained or written
    proc = _train(
        run, "data=pickle", f"data.path={pkl}", "modality=acoustic", "data.allow_speaker_overlap=true"
    )
    assert proc.returncode == 0, proc.stderr
    speakers = json.loads((run / "metrics.json").read_text())["run"]["speakers"]
    assert speakers["speaker_dependent"] is True and speakers["allow_speaker_overlap"] is True
    assert speakers["shared"] == {
        "train/test": {"speakers": 4, "clips": 36},
        "val/test": {"speakers": 4, "clips": 24},
    }
    assert "a speaker-dependent split" in proc.stdout + proc.stderr
    # and the comparison report prints it next to the model's numbers
    proc = run_cli("compare", str(run), "--out", str(tmp_path / "report"), "--bootstrap-samples", "100")
    assert proc.returncode == 0, proc.stderr
    assert "| acoustic (speaker-dependent split) |" in (tmp_path / "report" / "report.md").read_text()


@pytest.mark.slow
def test_bad_input_is_one_error_line_nonzero_exit_and_no_run_directory(tmp_path):
    pkl = tmp_path / "feats.pkl"
    _write_pickle(pkl, bad_clip="1012_DFA_val_1")
    run = tmp_path / "run"
    proc = _train(run, "data=pickle", f"data.path={pkl}")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == f"mer-train: error: {pkl}: val/1012_DFA_val_1: mfcc has 0 frames"
    assert "Traceback" not in proc.stderr
    assert not run.exists()

    proc = _train(run, "data=pickle", f"data.path={tmp_path / 'missing.pkl'}")
    assert proc.returncode == 2 and "missing.pkl: file not found" in proc.stderr
    assert not run.exists()


def _make_dry_run(tmp_path: Path, *words: str) -> subprocess.CompletedProcess[str]:
    """``make -n`` in the repository (nothing executed) with a stand-in environment that make
    takes as installed, so it plans no (re)install."""
    venv = tmp_path / "venv"
    venv.mkdir(exist_ok=True)
    (venv / ".installed").touch()  # newer than pyproject.toml
    cmd = ["make", "-n", "-C", str(REPO), f"VENV={venv}", *words]
    return subprocess.run(cmd, capture_output=True, text=True)


def test_readme_make_commands_run_the_projects_entry_points(tmp_path):
    """Every ``make ...`` line of the README names Makefile targets that exist (make -n: a dry run,
    nothing is executed or installed) and whose recipes call a console script this package
    declares (with a function behind it), or a tool of its dev environment."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    section = (REPO / "pyproject.toml").read_text().split("[project.scripts]")[1].split("\n[")[0]
    scripts = dict(re.findall(r'^([\w-]+) = "([\w.:]+)"$', section, re.MULTILINE))
    assert "mer-train" in scripts
    venv = tmp_path / "venv"
    lines = [line.split("#")[0] for line in (REPO / "README.md").read_text().splitlines()]
    commands = [shlex.split(line)[1:] for line in lines if line.startswith("make ")]
    assert commands
    called = set()
    for words in commands:
        proc = _make_dry_run(tmp_path, *words)
        assert proc.returncode == 0, (words, proc.stderr)
        for line in proc.stdout.splitlines():
            if line.startswith(f"{venv}/bin/"):
                called.add(line.split()[0].removeprefix(f"{venv}/bin/"))
    for exe in called:
        if exe in scripts:
            module, function = scripts[exe].split(":")
            assert callable(getattr(importlib.import_module(module), function)), exe
        else:
            assert exe in ("python", "ruff", "mypy", "lint-imports"), exe
    assert "mer-train" in called  # the README's first command trains a model


@pytest.mark.slow
def test_a_finished_run_is_never_trained_over(tmp_path):
    run = tmp_path / "run"
    assert _train(run, "modality=visual").returncode == 0
    weights = (run / "checkpoint.pt").read_bytes()
    proc = _train(run, "modality=visual", "seed=1")
    assert proc.returncode == 2
    assert "already holds a run" in proc.stderr.strip().splitlines()[-1]
    assert (run / "checkpoint.pt").read_bytes() == weights


def test_make_zoo_tests_each_encoders_fusions_against_its_early_fusion(tmp_path):
    """`make zoo` names, for every swept encoder, its late/joint/xattn vs early pair in the labels
    the report gives a sweep over several encoders (<modality>/<encoder>), as one Hydra override;
    with one encoder (plain labels) or without early fusion there is nothing to name."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    from hydra.core.override_parser.overrides_parser import OverridesParser

    def pairs(*words: str) -> list[list[str]] | None:
        proc = _make_dry_run(tmp_path, "zoo", *words)
        assert proc.returncode == 0, proc.stderr
        (recipe,) = [ln for ln in proc.stdout.replace("\\\n", " ").splitlines() if "mer-train" in ln]
        args = shlex.split(recipe)
        found = [a for a in args if a.startswith("compare.pairs=")]
        if not found:
            return None
        (override,) = OverridesParser.create().parse_overrides(found)
        return override.value()

    assert pairs("ZOO_MODELS=tcn,gru", "ZOO_MODALITIES=early,visual,late,xattn") == [
        ["late/tcn", "early/tcn"],
        ["xattn/tcn", "early/tcn"],
        ["late/gru", "early/gru"],
        ["xattn/gru", "early/gru"],
    ]
    default = pairs()
    assert default is not None and len(default) == 15  # 5 encoders x (late, joint, xattn)
    assert pairs("ZOO_MODELS=tcn") is None
    assert pairs("ZOO_MODELS=tcn,gru", "ZOO_MODALITIES=late,visual") is None
    assert pairs("ZOO_PAIRS=") is None

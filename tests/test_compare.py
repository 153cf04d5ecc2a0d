"""The comparison report end to end: smoke sweeps, the sweep-end report, mer-compare, CV folds."""

from __future__ import annotations

import base64
import csv
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from mer_cli import compare, folds, report, sweep
from mer_cli.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
# tiny models, no per-run figures (the report draws its own), a quick bootstrap
SMOKE = ["experiment=smoke", "save_plots=false", "compare.bootstrap_samples=200"]


def cli(entry: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-c", f"from mer_cli.cli import {entry}; {entry}()", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=900,
    )


def run_sweep(tmp: Path, *overrides: str) -> Path:
    proc = cli("train_main", "-m", *SMOKE, *overrides, f"hydra.sweep.dir={tmp}", cwd=tmp.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp


@pytest.fixture(scope="module")
def sweep_a(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The issue's sweep: four modalities x two seeds."""
    return run_sweep(
        tmp_path_factory.mktemp("a") / "sweep", "modality=acoustic,visual,late,early", "seed=0,1"
    )


@pytest.fixture(scope="module")
def sweep_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Late listed first, and late fails (a fusion weight outside [0, 1]) after training its members."""
    return run_sweep(
        tmp_path_factory.mktemp("b") / "sweep",
        "modality=late,acoustic,visual",
        "seed=3",
        "++modality.acoustic_weight=1.5",
    )


def job_dirs(root: Path, modality: str) -> list[Path]:
    return sorted(p for p in root.iterdir() if re.fullmatch(rf"\d+_{modality}_seed\d+", p.name))


def trainings(root: Path) -> int:
    """Training runs started in a sweep: the loop logs one 'training on' line per model."""
    return sum(p.read_text().count("] - training on ") for p in root.glob("*/train.log"))


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.slow
def test_sweep_ends_with_a_report_whose_numbers_are_the_runs_own(sweep_a):
    for name in ("report.md", "report.html", "comparison.json", "comparison.csv", "runs.csv", "pairwise.csv"):
        assert (sweep_a / name).is_file(), name
    result = json.loads((sweep_a / "comparison.json").read_text())
    assert [m["label"] for m in result["models"]] == ["acoustic", "visual", "late", "early"]
    assert result["settings"]["bootstrap_samples"] == 200  # compare.* from the sweep's command line
    for model in result["models"]:
        runs = job_dirs(sweep_a, model["modality"])
        assert (model["n_runs"], model["seeds"], model["ci_unit"]) == (2, [0, 1], "actors")
        for key in ("f1_macro", "accuracy", "balanced_accuracy", "roc_auc_micro"):
            values = [metrics(r)["test"][key] for r in runs]
            entry = model["test"][key]
            assert entry["mean"] == pytest.approx(np.mean(values))
            assert entry["std"] == pytest.approx(np.std(values, ddof=1))
            assert entry["ci"][0] <= entry["ci"][1]
    with (sweep_a / "runs.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8
    for row in rows:
        assert float(row["test/f1_macro"]) == pytest.approx(
            metrics(sweep_a / row["path"])["test"]["f1_macro"], abs=1e-6
        )
    # six pairs, each tested on both seeds' matched runs
    assert len(result["pairwise"]) == 6
    assert all(len(p["mcnemar"]) == 2 and 0 < p["p_holm"] <= 1 for p in result["pairwise"])
    assert set(result["ranking"]) == {"acoustic", "visual", "late", "early"}
    assert result["chance"]["accuracy"] == pytest.approx(1 / 6)  # the smoke test split is balanced
    assert result["human_rates"] is None  # embedded data is not CREMA-D

    md = (sweep_a / "report.md").read_text()
    assert "By macro F1 the ranking is " + " > ".join(result["ranking"]) in md
    assert "Paired bootstrap on macro F1, Holm-adjusted" in md
    assert "resample actors" in md
    # self-contained HTML: every figure embedded as a PNG, nothing fetched from elsewhere
    page = (sweep_a / "report.html").read_text()
    images = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([^"]+)">', page)
    assert len(images) == 7  # 3 bar charts + 4 grids
    assert all(base64.b64decode(b)[:8] == b"\x89PNG\r\n\x1a\n" for b in images)
    assert 'src="http' not in page and "figures/" not in page
    assert unclosed_tags(page) == []


def unclosed_tags(page: str) -> list[str]:
    """Tags opened and never closed (or closed out of order): a browser would guess the layout."""
    stack: list[str] = []

    class Parser(HTMLParser):
        def handle_starttag(self, tag: str, attrs: object) -> None:
            if tag not in ("meta", "img", "br"):
                stack.append(tag)

        def handle_endtag(self, tag: str) -> None:
            assert stack and stack[-1] == tag, f"</{tag}> closes {stack[-1:]}"
            stack.pop()

    Parser().feed(page)
    return stack


@pytest.mark.slow
def test_late_fusion_in_a_sweep_trains_nothing(sweep_a):
    assert trainings(sweep_a) == 6  # acoustic, visual, early x 2 seeds
    trained = sorted(p.parent.name for p in sweep_a.glob("**/checkpoint.pt"))
    assert [re.sub(r"^\d+_", "", n) for n in trained] == [
        f"{m}_seed{s}" for m in ("acoustic", "visual", "early") for s in (0, 1)
    ]
    for late_dir in job_dirs(sweep_a, "late"):
        seed = metrics(late_dir)["run"]["seed"]
        members = json.loads((late_dir / "late.json").read_text())["members"]
        assert members == {m: str(job_dirs(sweep_a, m)[seed]) for m in ("acoustic", "visual")}
        # and the fused probabilities are the average of those runs' own predictions
        a, v, fused = (
            report.read_predictions(Path(d) / "predictions.csv", "test")
            for d in (*members.values(), late_dir)
        )
        np.testing.assert_allclose(fused.y_prob, (a.y_prob + v.y_prob) / 2, atol=2e-5)


@pytest.mark.slow
def test_failed_job_is_listed_and_no_model_is_trained_twice_when_late_comes_first(sweep_b):
    (late_dir,) = job_dirs(sweep_b, "late")
    failed = json.loads((late_dir / "failed.json").read_text())
    assert failed["modality"] == "late" and failed["seed"] == 3
    assert "modality.acoustic_weight=1.5: must be in [0, 1]" in failed["error"]
    # late trained its two members before failing; the acoustic and visual jobs copied them
    assert trainings(sweep_b) == 2
    for m in ("acoustic", "visual"):
        (job,) = job_dirs(sweep_b, m)
        assert metrics(job)["run"]["copied_from"] == str(late_dir / m)
    md = (sweep_b / "report.md").read_text()
    assert "## Failed jobs" in md
    assert f"| {late_dir.name} | late | 3 | modality.acoustic_weight=1.5: must be in [0, 1]" in md
    result = json.loads((sweep_b / "comparison.json").read_text())
    assert [m["label"] for m in result["models"]] == ["acoustic", "visual"]


@pytest.mark.slow
def test_mer_compare_on_two_sweeps(sweep_a, sweep_b, tmp_path):
    out = tmp_path / "cmp"
    proc = cli(
        "compare_main",
        str(sweep_a),
        str(sweep_b),
        "--out",
        str(out),
        "--bootstrap-samples",
        "200",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == f"report: {out / 'report.html'}"
    result = json.loads((out / "comparison.json").read_text())
    n_runs = {m["label"]: (m["n_runs"], m["seeds"]) for m in result["models"]}
    assert n_runs == {
        "acoustic": (3, [0, 1, 3]),
        "visual": (3, [0, 1, 3]),
        "late": (2, [0, 1]),
        "early": (2, [0, 1]),
    }
    assert [f["modality"] for f in result["failures"]] == ["late"]
    assert (out / "figures" / "grid_pr_per_class.png").is_file()
    # a new directory every time: an existing report is never overwritten
    again = cli("compare_main", str(sweep_a), "--out", str(out), cwd=tmp_path)
    assert again.returncode == 2
    assert (
        again.stderr.strip()
        == f"mer-compare: error: {out}: exists and is not empty; choose a new --out directory"
    )


def test_mer_compare_rejects_a_directory_without_runs(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = cli("compare_main", str(tmp_path / "empty"), str(tmp_path / "missing"), cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"mer-compare: error: {tmp_path / 'empty'}: no mer-train run (metrics.json) or failed job "
        "(failed.json) in it"
    ]
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_cross_validation_folds_are_speaker_independent(tmp_path):
    run_dir = tmp_path / "cv"
    proc = cli(
        "train_main", *SMOKE, "modality=visual", "cv.folds=3", f"hydra.run.dir={run_dir}", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    tested: list[set[str]] = []
    for i in range(3):
        val = report.read_predictions(run_dir / f"fold{i}" / "predictions.csv", "val")
        test = report.read_predictions(run_dir / f"fold{i}" / "predictions.csv", "test")
        val_actors, test_actors = (
            set(folds.actor_ids(p.clip_ids, folds.CREMA_D_ACTOR_PATTERN)) for p in (val, test)
        )
        assert test_actors and not (val_actors & test_actors)
        tested.append(test_actors)
    assert not (tested[0] & tested[1]) and not (tested[0] & tested[2]) and not (tested[1] & tested[2])
    cv = json.loads((run_dir / "cv.json").read_text())
    assert cv["test"]["f1_macro"] == pytest.approx(
        np.mean([metrics(run_dir / f"fold{i}")["test"]["f1_macro"] for i in range(3)])
    )
    out = tmp_path / "cmp"
    proc = cli("compare_main", str(run_dir), "--out", str(out), "--bootstrap-samples", "200", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (model,) = json.loads((out / "comparison.json").read_text())["models"]
    assert (model["label"], model["folds"], model["n_runs"]) == ("visual", [0, 1, 2], 3)
    assert "3 speaker-independent cross-validation folds" in (out / "report.md").read_text()


def test_a_sweep_where_every_job_failed_still_gets_a_report_of_why(tmp_path):
    for num, modality in enumerate(("acoustic", "late")):
        job = tmp_path / f"{num}_{modality}_seed0"
        job.mkdir()
        sweep.record_failure(job, ConfigError(f"{modality}: broken on purpose"), modality, 0)
    result = compare.into_sweep(tmp_path, compare.Settings())
    assert result["summary"] == ["Every job failed (2): nothing to compare."]
    md = (tmp_path / "report.md").read_text()
    assert "| 0_acoustic_seed0 | acoustic | 0 | acoustic: broken on purpose |" in md
    assert "| 1_late_seed0 | late | 0 | late: broken on purpose |" in md
    assert "late: broken on purpose" in (tmp_path / "report.html").read_text()


@pytest.mark.slow
def test_a_broken_run_directory_is_listed_not_fatal(sweep_a, tmp_path):
    shutil.copytree(job_dirs(sweep_a, "acoustic")[0], tmp_path / "ok")
    shutil.copytree(job_dirs(sweep_a, "visual")[0], tmp_path / "broken")
    (tmp_path / "broken" / "predictions.csv").unlink()
    runs, failures = compare.collect([tmp_path])
    assert [r.path.name for r in runs] == ["ok"]
    broken = (tmp_path / "broken").resolve()
    assert [(f.path, f.error) for f in failures] == [
        (broken, f"unreadable run: {broken}: no predictions.csv (not a finished mer-train run)")
    ]


@pytest.mark.slow
def test_compare_enabled_false_writes_no_report_and_a_failing_sweep_still_exits_0(tmp_path):
    root = run_sweep(
        tmp_path / "sweep",
        "modality=late",
        f"modality.acoustic_run={tmp_path / 'nowhere'}",
        "compare.enabled=false",
    )
    (job,) = job_dirs(root, "late")
    error = json.loads((job / "failed.json").read_text())["error"]
    assert error.startswith(f"{tmp_path / 'nowhere'}: no checkpoint.pt")
    assert not (root / "report.md").exists() and not (root / "comparison.json").exists()

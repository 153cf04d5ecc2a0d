"""The comparison report end to end: smoke sweeps, the sweep-end report, mer-compare, CV folds."""

from __future__ import annotations

import base64
import csv
import importlib.util
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
from omegaconf import OmegaConf
from scipy import stats as sps

from conftest import REPO, fake_run, markdown
from mer_cli.cli import commands as cli_module
from mer_cli.core.errors import ConfigError, MerError
from mer_cli.data import folds
from mer_cli.reporting import analysis, charts, options, report
from mer_cli.reporting.collect import collect
from mer_cli.reporting.prose import order_text
from mer_cli.runs import outputs
from mer_cli.sweeps import callback

# tiny models, no per-run figures (the report draws its own), a quick bootstrap
SMOKE = ["experiment=smoke", "runtime.save_plots=false", "compare.bootstrap_samples=200"]


def cli(entry: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-c", f"from mer_cli.cli.commands import {entry}; {entry}()", *args],
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
    mean_f1 = {}
    t_975 = sps.t.ppf(0.975, df=1)  # two runs: the t-interval across seeds has 1 degree of freedom
    for model in result["models"]:
        runs = job_dirs(sweep_a, model["modality"])
        assert (model["n_runs"], model["seeds"], model["ci_unit"]) == (2, [0, 1], "actors")
        for key in ("f1_macro", "accuracy", "balanced_accuracy", "roc_auc_micro"):
            values = [metrics(r)["test"][key] for r in runs]
            entry = model["test"][key]
            assert entry["mean"] == pytest.approx(np.mean(values))
            assert entry["std"] == pytest.approx(np.std(values, ddof=1))
            half = t_975 * np.std(values, ddof=1) / np.sqrt(2)
            seed_ci = [max(0.0, np.mean(values) - half), min(1.0, np.mean(values) + half)]
            if key == "roc_auc_micro":  # no bootstrap for a probability-based metric: the t-interval
                assert (entry["ci"], entry["ci_method"]) == (pytest.approx(seed_ci), "t across runs")
            else:
                assert entry["ci_method"] == "bootstrap over actors and runs"
                assert entry["seed_ci"] == pytest.approx(seed_ci)
        mean_f1[model["label"]] = np.mean([metrics(r)["test"]["f1_macro"] for r in runs])
    with (sweep_a / "runs.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8
    for row in rows:
        assert float(row["test/f1_macro"]) == pytest.approx(
            metrics(sweep_a / row["path"])["test"]["f1_macro"], abs=1e-6
        )
    # six pairs, each with one McNemar per seed on that seed's clips (counted here from predictions)
    assert len(result["pairwise"]) == 6
    right = {}  # (model, seed) -> per-clip correctness
    for m in mean_f1:
        for s, run in enumerate(job_dirs(sweep_a, m)):
            pred = outputs.read_predictions(run / "predictions.csv", "test")
            order = np.argsort(pred.clip_ids)  # line the two models' clips up
            right[m, s] = (pred.y_prob.argmax(1) == pred.y_true)[order]
    for p in result["pairwise"]:
        assert [(t["run"], t["b"], t["c"]) for t in p["mcnemar"]] == [
            (
                f"seed{s}",
                int(np.sum(right[p["a"], s] & ~right[p["b"], s])),
                int(np.sum(~right[p["a"], s] & right[p["b"], s])),
            )
            for s in (0, 1)
        ]
        # Holm never lowers a p, never goes below 6 x 2/(B+1), and decides significance
        assert p["p_holm_floor"] == pytest.approx(6 * 2 / 201)
        assert p["p_holm"] >= max(p["p_bootstrap"], p["p_holm_floor"] * (1 - 1e-9))
        assert p["significant"] == (p["p_holm"] < 0.05)
    # ranking: the models by their runs' mean macro F1, ties (equal as printed) grouped
    tiers: list[list[str]] = []
    for label in sorted(mean_f1, key=lambda k: -mean_f1[k]):
        if tiers and f"{100 * mean_f1[label]:.1f}" == f"{100 * mean_f1[tiers[-1][0]]:.1f}":
            tiers[-1].append(label)
        else:
            tiers.append([label])
    assert result["ranking"] == tiers
    assert result["chance"]["accuracy"] == pytest.approx(1 / 6)  # the smoke test split is balanced
    assert result["human_rates"] is None  # embedded data is not CREMA-D

    md = (sweep_a / "report.md").read_text()
    head = "By macro F1 the ranking is " if len(tiers) > 1 else "By macro F1 the models tie: "
    assert head + order_text(tiers) in md
    assert "Paired bootstrap on macro F1, Holm-adjusted" in md
    assert "resample actors" in md
    # self-contained HTML: every figure embedded as a PNG, nothing fetched from elsewhere
    page = (sweep_a / "report.html").read_text()
    images = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([^"]+)">', page)
    assert len(images) == 3 + len(options.GRIDS)  # 3 bar charts + one grid per kind
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
            outputs.read_predictions(Path(d) / "predictions.csv", "test")
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


@pytest.mark.slow
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
        val = outputs.read_predictions(run_dir / f"fold{i}" / "predictions.csv", "val")
        test = outputs.read_predictions(run_dir / f"fold{i}" / "predictions.csv", "test")
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
        callback.record_failure(job, ConfigError(f"{modality}: broken on purpose"), modality, 0)
    result = report.into_sweep(tmp_path, options.Settings())
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
    runs, failures = collect([tmp_path])
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


# ---------------------------------------------------------------------------------------------
# Reports of hand-made runs (no training): known answers for ties, p-value floors and McNemar


def test_models_tied_at_the_precision_shown_are_ranked_as_ties(tmp_path):
    y = np.arange(48) % 4
    worse = np.where(np.arange(48) % 3 == 0, (y + 1) % 4, y)
    for modality, pred in (("acoustic", y), ("visual", y), ("early", worse)):
        fake_run(tmp_path, modality, 0, y, pred)
    runs, _ = collect([tmp_path])
    result = analysis.build(runs, [], options.Settings(bootstrap_samples=100))
    assert result["ranking"] == [["acoustic", "visual"], ["early"]]
    assert result["ranking_by_metric"]["accuracy"] == [["acoustic", "visual"], ["early"]]
    text = markdown(result, runs)
    assert "- by macro F1: acoustic = visual > early" in text
    assert "By macro F1 the ranking is acoustic = visual > early; best: acoustic (100.0 %" in text
    assert ") and visual (100.0 %, 95 % CI 100.0 % to 100.0 %), tied; last: early (" in text

    # every model at 100 %: no order at all
    shutil.rmtree(tmp_path / "early_seed0")
    runs, _ = collect([tmp_path])
    result = analysis.build(runs, [], options.Settings(bootstrap_samples=100))
    assert result["ranking"] == [["acoustic", "visual"]]
    assert "By macro F1 the models tie: acoustic = visual, each 100.0 %." in result["summary"]


def test_a_tie_is_equality_as_printed_not_closeness():
    def model(label: str, f1: float) -> analysis.Model:
        return analysis.Model(label, "acoustic", [], summary={"f1_macro": {"mean": f1}})

    # 80.04 % and 79.96 % both print as 80.0 %; 80.06 % and 79.94 % print as 80.1 % and 79.9 %
    tied = [model("x", 0.7996), model("y", 0.8004), model("z", float("nan"))]
    assert analysis.ranking_tiers(tied, "f1_macro") == [["y", "x"], ["z"]]
    apart = [model("x", 0.7994), model("y", 0.8006)]
    assert analysis.ranking_tiers(apart, "f1_macro") == [["y"], ["x"]]
    assert order_text([["y", "x"], ["z"]]) == "y = x > z"


@pytest.mark.slow
def test_pairwise_report_shows_the_p_floor_as_a_bound_and_mcnemar_for_each_seed(tmp_path):
    rng = np.random.default_rng(0)
    y = np.arange(80) % 4
    flips = {}
    for seed in (0, 1):
        fake_run(tmp_path, "acoustic", seed, y, y)  # always right
        for modality in ("visual", "early"):  # wrong on about half the clips, differently per seed
            flips[modality, seed] = rng.random(80) < 0.5
            fake_run(tmp_path, modality, seed, y, np.where(flips[modality, seed], (y + 1) % 4, y))
    out = tmp_path / "report"
    runs, _ = collect([tmp_path])
    result = report.write(out, runs, [], options.Settings(bootstrap_samples=100))
    floor = 2 / 101
    by_pair = {(p["a"], p["b"]): p for p in result["pairwise"]}
    for other in ("visual", "early"):
        p = by_pair["acoustic", other]
        # acoustic is right everywhere: no resample reverses the difference, p sits at the floor
        assert p["p_bootstrap"] == pytest.approx(floor)
        assert p["p_holm"] == pytest.approx(3 * floor)  # Holm's factor: three pairs
        # 3 x 2/101 = 0.059 > alpha: with B = 100 no pair of three can be significant
        assert p["p_holm_at_floor"] and not p["significant"]
        # one McNemar per seed, on that seed's clips: b = only acoustic right, c = only other right
        assert [(t["run"], t["b"], t["c"]) for t in p["mcnemar"]] == [
            (f"seed{s}", int(flips[other, s].sum()), 0) for s in (0, 1)
        ]
        assert p["mcnemar_significant_runs"] == 2
    assert not by_pair["visual", "early"]["p_holm_at_floor"]

    with (out / "pairwise.csv").open() as f:
        rows = {(r["a"], r["b"]): r for r in csv.DictReader(f)}
    row = rows["acoustic", "visual"]
    assert float(row["p_holm"]) == pytest.approx(3 * floor, rel=1e-5)
    assert float(row["p_holm_floor"]) == pytest.approx(3 * floor, rel=1e-5)
    assert row["p_holm_at_floor"] == "True"
    assert row["mcnemar_runs"] == "seed0;seed1"
    assert row["mcnemar_b"] == ";".join(str(int(flips["visual", s].sum())) for s in (0, 1))
    assert row["mcnemar_c"] == "0;0"
    assert rows["visual", "early"]["p_holm_at_floor"] == "False"

    md = (out / "report.md").read_text()
    # 3 x 2/101 = 0.0594: shown as a bound, rounded up; explained once
    assert md.count("2/(B+1)") == 2
    assert "smallest p the paired bootstrap can show is 2/(B+1) ≈ 0.02, " in md
    assert "over 3 pair(s) 3 × 2/(B+1) ≈ 0.06." in md
    assert "| acoustic | visual | +" in md and "| ≤ 0.02 | ≤ 0.06 | no | seed0: " in md
    assert "acoustic vs visual (p ≤ 0.06); acoustic vs early (p ≤ 0.06); visual vs early (p = 0." in md
    assert "≤ marks a p at the smallest value the bootstrap can show (see Pairwise tests)." in md
    assert f"seed1: {int(flips['visual', 1].sum())}/0, < 0.001 (chi2) | 2 of 2 |" in md
    assert "shown for each matched run (seed, fold) separately, not combined" in md
    warning = "With 100 bootstrap samples and 3 pair(s) no pair can be significant at α = 0.05: "
    assert warning + "use compare.bootstrap_samples ≥ 120." in md  # 3 x 2/121 = 0.0496 < 0.05
    assert any(warning in line for line in result["summary"])
    assert "≤ 0.06" in (out / "report.html").read_text()


def test_the_report_says_how_each_late_run_combined_its_members(tmp_path):
    y = np.arange(48) % 4
    fake_run(tmp_path, "acoustic", 0, y, y)
    fitted = {
        "weighted": {"weights": {"acoustic": 0.35, "visual": 0.65}},
        "stacking": {},
        "mean": {"acoustic_weight": 0.5},  # a run from before modality.combiner
    }
    for seed, (combiner, run_info) in enumerate(fitted.items()):
        run = fake_run(tmp_path, "late", seed, y, y)
        metrics = json.loads((run / "metrics.json").read_text())
        if combiner != "mean":
            metrics["run"]["combiner"] = combiner
        metrics["run"].update(run_info)
        (run / "metrics.json").write_text(json.dumps(metrics))
    runs, _ = collect([tmp_path])
    text = markdown(analysis.build(runs, [], options.Settings(bootstrap_samples=100)), runs)
    assert "## Late fusion" in text
    assert "| late | 0 |  | weighted | acoustic 0.35, visual 0.65 | " in text
    assert (
        "| late | 1 |  | stacking | logistic regression on the members' probabilities (late.json) |" in text
    )
    assert "| late | 2 |  | mean | acoustic 0.50, visual 0.50 | " in text
    assert "## Late fusion" not in markdown(
        analysis.build(runs[:1], [], options.Settings(bootstrap_samples=100)), runs[:1]
    )


# ---------------------------------------------------------------------------------------------
# The comparison at sweep size (issue 11: 5 encoders x 6 modalities = 30 models), from fake runs

_spec = importlib.util.spec_from_file_location("compare_report", REPO / "benchmarks" / "compare_report.py")
assert _spec and _spec.loader
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.mark.slow
def test_a_30_model_comparison_tests_each_model_against_the_best_plus_the_named_pairs(tmp_path, monkeypatch):
    sweep_dir = bench.fake_sweep(tmp_path / "sweep", seeds=(0,), n_clips=120)
    runs, _ = collect([sweep_dir])
    labels = [f"{m}/{e}" for m in options.MODALITY_ORDER for e in sorted(bench.ENCODERS)]
    # named: one pair the best-vs-rest tests miss, one they already make (tested once), in any order
    named = [["visual/gru", "early/gru"], ["xattn/tcn", "acoustic/tcn"]]
    settings = options.Settings(bootstrap_samples=200, pairs=named)
    # no drawing (seconds of matplotlib per figure): record what each figure would show
    drawn: list[tuple[str, list[str], str]] = []

    def fake_grid(models, kind, class_names, part=""):
        drawn.append((kind, [m.label for m in models], part))
        return charts.plt.figure(figsize=(1, 1))

    monkeypatch.setattr(charts, "grid", fake_grid)
    monkeypatch.setattr(charts, "bar_chart", lambda result, metric: charts.plt.figure(figsize=(1, 1)))
    result = report.write(tmp_path / "report", runs, [], settings)

    assert [m["label"] for m in result["models"]] == labels
    best = result["ranking"][0][0]
    mean_f1 = {m["label"]: m["test"]["f1_macro"]["mean"] for m in result["models"]}
    assert mean_f1[best] == max(mean_f1.values())
    pairs = result["pairwise"]
    assert result["settings"]["pairwise"] == "best"  # auto, with more than 6 models
    assert [(p["a"], p["b"], p["tested_because"]) for p in pairs] == [
        *((best, label, "best") for label in labels if label != best),
        ("visual/gru", "early/gru", "named"),
    ]
    assert {(p["a"], p["b"]) for p in pairs if p["named"]} == {
        ("visual/gru", "early/gru"),
        (best, "acoustic/tcn"),
    }
    # Holm over the 30 tests made (29 + 1), not the 435 pairs of 30 models
    p_values = [p["p_bootstrap"] for p in pairs]
    for p, p_raw in zip(pairs, p_values, strict=True):
        rank = sorted(p_values).index(p_raw)
        assert p["p_holm"] >= min(1.0, (30 - rank) * p_raw) - 1e-12
        assert p["p_holm_floor"] == pytest.approx(30 * 2 / 201)
        assert p["significant"] == (p["p_holm"] < 0.05)

    # 30 models, at most 12 per figure: 3 figures of 10 per kind, in the report's order
    for kind in options.GRIDS:
        parts = [(models, part) for k, models, part in drawn if k == kind]
        assert parts == [(labels[i : i + 10], f"{n} of 3") for n, i in enumerate((0, 10, 20), 1)]
    figures = sorted(p.name for p in (tmp_path / "report" / "figures").iterdir())
    assert len(figures) == 3 + len(options.GRIDS) * 3
    assert "grid_roc_micro_3.png" in figures and "grid_roc_micro.png" not in figures
    page = (tmp_path / "report" / "report.html").read_text()
    assert (
        len(re.findall(r'<img alt="[^"]*" src="data:image/png;base64,', page)) == 3 + len(options.GRIDS) * 3
    )
    md = (tmp_path / "report" / "report.md").read_text()
    assert "![test: confusion matrix (2 of 3)](figures/grid_confusion_matrices_2.png)" in md

    # the summary says in words which differences from the best are real and which are not
    summary = result["summary"]
    assert f"Each model was tested against the best by macro F1, {best} (paired bootstrap, " in "".join(
        summary
    )
    real = [p["b"] for p in pairs if p["tested_because"] == "best" and p["significant"]]
    chance = [p["b"] for p in pairs if p["tested_because"] == "best" and not p["significant"]]
    # B = 200 cannot reach alpha over 30 tests (30 x 2/201 > 0.05): the summary says so
    assert (
        not real
        and f"No difference from {best} can be significant with this few bootstrap samples." in summary
    )
    assert summary[-1].startswith("With 200 bootstrap samples and 30 pair(s) no pair can be significant")
    # with enough resamples the clear best beats the near-chance models for real
    result = analysis.build(runs, [], options.Settings(bootstrap_samples=2000, pairs=named))
    summary = result["summary"]
    pairs = result["pairwise"]
    real = [p["b"] for p in pairs if p["tested_because"] == "best" and p["significant"]]
    chance = [p["b"] for p in pairs if p["tested_because"] == "best" and not p["significant"]]
    assert {"acoustic/bilstm", "visual/bilstm"} <= set(real)
    line = next(s for s in summary if s.startswith("Real differences"))
    assert line.startswith(f"Real differences: {best} is better than {len(real)} of the 29 others: ")
    assert all(label in line for label in real) and not any(f"{label} (" in line for label in chance)
    if chance:
        line = next(s for s in summary if s.startswith(f"Not told apart from {best}"))
        assert all(f"{label} (Δ" in line for label in chance)
    assert any(s.startswith("Pairs named in compare.pairs: ") for s in summary)
    assert "25 more (see Ranking)" in "".join(summary)  # the summary's ranking names five tiers
    with (tmp_path / "report" / "pairwise.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["tested_because"] for r in rows].count("best") == 29 and len(rows) == 30


@pytest.mark.slow
def test_a_30_model_smoke_sweep_writes_its_report(tmp_path):
    """Issue 11: every encoder in every modality, one sweep, one report; as small as it goes (120
    generated clips, one epoch; the report's time is benchmarks/compare_report.py's business)."""
    root = run_sweep(
        tmp_path / "sweep",
        "trainer.loop.max_epochs=1",
        "data.generator.n_actors=20",
        "data.generator.clips_per_actor_per_class=1",
        f"model={','.join(bench.ENCODERS)}",
        f"modality={','.join(options.MODALITY_ORDER)}",
        "compare.pairs=[[early/bilstm,visual/bilstm]]",
    )
    result = json.loads((root / "comparison.json").read_text())
    labels = [f"{m}/{e}" for m in options.MODALITY_ORDER for e in sorted(bench.ENCODERS)]
    assert [m["label"] for m in result["models"]] == labels and result["failures"] == []
    assert trainings(root) == 25  # late fusion reuses each encoder's acoustic and visual runs
    # experiment=smoke shrinks every encoder through the size key they all take
    for config in root.glob("*/config.yaml"):
        assert list(OmegaConf.load(config).model.encoder.hidden_sizes) == [8, 8], config
    best = result["ranking"][0][0]
    pairs = result["pairwise"]
    assert [(p["a"], p["b"]) for p in pairs if p["tested_because"] == "best"] == [
        (best, label) for label in labels if label != best
    ]
    named = {"early/bilstm", "visual/bilstm"}
    assert [{p["a"], p["b"]} for p in pairs if p["named"]] == [named]
    assert len(pairs) == 29 + (best not in named)
    figures = sorted(p.name for p in (root / "figures").iterdir())
    assert len(figures) == 3 + len(options.GRIDS) * 3 and "grid_pr_per_class_3.png" in figures
    assert (root / "report.md").read_text().count("](figures/grid_") == len(options.GRIDS) * 3


def test_every_pair_is_tested_up_to_six_models_or_on_request(tmp_path):
    small = bench.fake_sweep(
        tmp_path / "six",
        encoders=("gru", "tcn"),
        modalities=("acoustic", "visual", "early"),
        seeds=(0,),
        n_clips=60,
    )
    runs, _ = collect([small])
    result = analysis.build(runs, [], options.Settings(bootstrap_samples=100))
    assert result["settings"]["pairwise"] == "all" and len(result["pairwise"]) == 15
    assert {p["tested_because"] for p in result["pairwise"]} == {"all"}
    result = analysis.build(runs, [], options.Settings(bootstrap_samples=100, pairwise="best"))
    assert len(result["pairwise"]) == 5
    # a seventh model: against the best unless every pair is asked for (21 pairs)
    seventh = bench.fake_sweep(
        tmp_path / "seven", encoders=("transformer",), modalities=("late",), seeds=(0,), n_clips=60
    )
    runs, _ = collect([small, seventh])
    assert len(analysis.build(runs, [], options.Settings(bootstrap_samples=100))["pairwise"]) == 6
    all_pairs = analysis.build(runs, [], options.Settings(bootstrap_samples=100, pairwise="all"))
    assert len(all_pairs["pairwise"]) == 21
    # when the whole comparison has one model per modality, labels stay the modality's name
    runs, _ = collect([seventh])
    assert [m.label for m in analysis.group_models(runs)] == ["late"]


def test_a_named_pair_must_name_two_models_of_the_comparison(tmp_path):
    sweep_dir = bench.fake_sweep(
        tmp_path / "s", encoders=("gru", "tcn"), modalities=("visual",), seeds=(0,), n_clips=60
    )
    runs, _ = collect([sweep_dir])
    with pytest.raises(MerError) as e:
        analysis.build(
            runs, [], options.Settings(bootstrap_samples=100, pairs=[["visual/gru", "visual/lstm"]])
        )
    assert (
        str(e.value)
        == "compare.pairs: no model 'visual/lstm' in this comparison; models: visual/gru, visual/tcn"
    )
    with pytest.raises(
        MerError, match=r"^compare.pairs: \['visual/gru'\] is not a pair of two different model labels"
    ):
        options.Settings(pairs=[["visual/gru"]])
    with pytest.raises(MerError, match=r"compare.pairwise='some': valid: auto, all, best"):
        options.Settings(pairwise="some")


def test_mer_compare_options_reach_the_report_settings(tmp_path, monkeypatch, capsys):
    seen = []

    def into_new_dir(dirs, out_root, settings, out=None):
        seen.append(settings)
        return out

    monkeypatch.setattr(report, "into_new_dir", into_new_dir)
    cli_module.compare_main(
        [
            *(str(tmp_path), "--out", str(tmp_path / "cmp"), "--pairwise", "best", "--grid-panels", "3"),
            *("--pair", "acoustic/gru", "visual/gru", "--pair", "early (model.dropout=0.2)", "early"),
        ]
    )
    assert capsys.readouterr().out.strip() == f"report: {tmp_path / 'cmp' / 'report.html'}"
    (settings,) = seen
    assert (settings.pairwise, settings.grid_panels) == ("best", 3)
    assert settings.pairs == (("acoustic/gru", "visual/gru"), ("early (model.dropout=0.2)", "early"))
    # and the sweep's config node (lists from compare.pairs=[[a,b]]) gives the same settings
    cfg = OmegaConf.create(
        {
            "compare": {
                "enabled": True,
                "pairwise": "best",
                "grid_panels": 3,
                "pairs": [["acoustic/gru", "visual/gru"]],
            }
        }
    )
    assert callback.settings_of(cfg).pairs == (("acoustic/gru", "visual/gru"),)


def test_models_are_labelled_by_their_model_config_also_for_cross_validation_folds(tmp_path):
    y = np.arange(48) % 4
    for encoder in ("gru", "tcn"):
        run_dir = tmp_path / f"visual_{encoder}"
        for fold in (0, 1):
            run = fake_run(run_dir, "visual", 0, y, y)  # the fold's files, as mer-train writes them
            run.rename(run_dir / f"fold{fold}")
            cfg = f"seed: 0\nmodality:\n  name: visual\ncv:\n  fold: {fold}\nmodel:\n  tag: {encoder}\n"
            (run_dir / f"fold{fold}" / "config.yaml").write_text(cfg)
        (run_dir / ".hydra").mkdir()  # the CV run's, one level above its folds
        (run_dir / ".hydra" / "hydra.yaml").write_text(
            f"hydra:\n  runtime:\n    choices:\n      model: {encoder}\n"
        )
    runs, _ = collect([tmp_path])
    assert {m.label: len(m.runs) for m in analysis.group_models(runs)} == {"visual/gru": 2, "visual/tcn": 2}
    # without the record of the choice: the values that differ, as before
    for encoder in ("gru", "tcn"):
        shutil.rmtree(tmp_path / f"visual_{encoder}" / ".hydra")
    runs, _ = collect([tmp_path])
    assert sorted(m.label for m in analysis.group_models(runs)) == [
        "visual (model.tag=gru)",
        "visual (model.tag=tcn)",
    ]


_zoo_spec = importlib.util.spec_from_file_location("zoo_table", REPO / "benchmarks" / "zoo_table.py")
assert _zoo_spec is not None and _zoo_spec.loader is not None
zoo_table = importlib.util.module_from_spec(_zoo_spec)
_zoo_spec.loader.exec_module(zoo_table)


@pytest.mark.slow
def test_zoo_table_shows_each_models_runs_as_the_run_files_hold_them(tmp_path):
    sweep = bench.fake_sweep(
        tmp_path / "sweep", encoders=("gru", "tcn"), modalities=("visual", "late"), seeds=(0, 1), n_clips=60
    )
    report.write(tmp_path / "report", *collect([sweep]), options.Settings(bootstrap_samples=200))
    text = zoo_table.tables(tmp_path / "report")
    assert "`bilstm`" not in text and "| test macro F1, % | `gru` | `tcn` |" in text
    with (tmp_path / "report" / "runs.csv").open() as f:
        runs = list(csv.DictReader(f))
    f1 = {(r["model"], int(r["seed"])): 100 * float(r["test/f1_macro"]) for r in runs}
    visual_gru = [f1[("visual/gru", 0)], f1[("visual/gru", 1)]]
    mean, std = sum(visual_gru) / 2, abs(visual_gru[0] - visual_gru[1]) / 2**0.5
    first_visual = next(line for line in text.splitlines() if line.startswith("| visual |"))
    assert first_visual.split(" | ")[1].startswith(f"{mean:.1f} ± {std:.1f} [")
    # training time: the median of the runs' metrics.json (model 0 = visual/gru: 10 s and 11 s)
    times = [line for line in text.splitlines() if line.startswith("| visual |")][1]
    assert times.split(" | ")[1] == "10 s (20 ep.)"  # median of 10, 11 -> 10.5, shown as 10
    late_f1, late_time = [line for line in text.splitlines() if line.startswith("| late |")]
    assert "reuses" not in late_f1 and late_time.count("reuses its members") == 2
    assert text.endswith("(4 models, 2 runs each.)")

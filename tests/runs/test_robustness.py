"""Robustness evaluation end to end: a smoke sweep of every modality with eval.robustness=true
(the hook in runs.execute), mer-evaluate RUN --perturb on its runs, and the sweep's report."""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from conftest import compose_train, run_main
from mer_cli.cli import commands
from mer_cli.data.load import load_data
from mer_cli.evaluation import perturb
from mer_cli.runs import execute, files, robustness, trained

MODALITIES = ("acoustic", "visual", "late", "early", "joint", "xattn")
# noise 2 streams x 4, frame_drop 3, gap 3, missing 2 x 2, shift 3, snr 4
N_CONDITIONS = 8 + 3 + 3 + 4 + 3 + 4
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny models on a shared CPU: one thread is fastest


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("robust") / "sweep"
    proc = run_main(
        "train",
        "-m",
        "experiment=smoke",
        f"modality={','.join(MODALITIES)}",
        "eval.robustness=true",
        "trainer.loop.max_epochs=1",  # what is tested is the re-scoring, not what was learned
        "data.limit_per_split=24",
        "compare.bootstrap_samples=200",
        f"hydra.sweep.dir={root}",
        cwd=root.parent,
        env=ONE_THREAD,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def run_of(sweep: Path, modality: str) -> Path:
    (path,) = sweep.glob(f"*_{modality}_seed0")
    return path


def rows_by_key(result: dict) -> dict[str, dict]:
    return {f"{r['corruption']}/{r['variant']}/{r['stream']}@{r['strength']:g}": r for r in result["rows"]}


@pytest.mark.slow
@pytest.mark.parametrize("modality", MODALITIES)
def test_every_modality_gets_the_table_the_csv_and_the_plot(sweep, modality):
    run = run_of(sweep, modality)
    result = json.loads((run / "robustness.json").read_text())
    assert (result["format"], result["split"], result["seed"]) == (1, "test", 0)
    assert len(result["rows"]) == N_CONDITIONS
    assert (run / "plots" / "robustness.png").stat().st_size > 0
    # the clean scores are the run's own test metrics (the same model on the same clips)
    test = json.loads((run / "metrics.json").read_text())["test"]
    for k in ("f1_macro", "accuracy", "balanced_accuracy", "ece"):
        assert result["clean"][k] == pytest.approx(test[k], abs=1e-6), k
    with (run / "robustness.csv").open(newline="") as f:
        table = list(csv.DictReader(f))
    assert table[0]["corruption"] == "none" and len(table) == 1 + N_CONDITIONS
    for line, row in zip(table[1:], result["rows"], strict=True):
        assert line["corruption"] == row["corruption"] and line["skipped"] == (row["skipped"] or "")
        if not row["skipped"]:
            assert float(line["f1_macro"]) == pytest.approx(row["f1_macro"])
            lo, hi = row["f1_macro_ci"]
            assert lo <= row["f1_macro"] <= hi
    skipped = {k for k, r in rows_by_key(result).items() if r["skipped"]}
    masked = {"missing/masked/acoustic@1", "missing/masked/visual@1"}
    shift = {f"shift/delay/visual@{s:g}" for s in (0.1, 0.25, 0.5)}
    # the embedded data were never recordings: no back-end computes their features again
    snr = {f"snr/white/acoustic@{db:g}" for db in (20, 10, 5, 0)}
    expected = {
        "acoustic": {"missing/zeros/acoustic@1", "missing/masked/acoustic@1", *shift},
        "visual": {"missing/zeros/visual@1", "missing/masked/visual@1", *shift},
        "late": set(),
        "early": masked,
        "joint": masked,
        "xattn": masked,
    }[modality]
    assert skipped == expected | snr
    # shifts are in seconds at the embedded data's 30 video frames/s
    assert [r["frames"] for r in result["rows"] if r["corruption"] == "shift"] == [3, 8, 15]


@pytest.mark.slow
def test_missing_visual_masked_on_late_fusion_is_the_acoustic_members_own_prediction(sweep):
    late, acoustic = run_of(sweep, "late"), run_of(sweep, "acoustic")
    target = robustness.read_target(late)
    member = target.members["acoustic"]
    assert member == acoustic  # reused from the sweep: the very run scored on its own
    cfg = files.read_config(late / "config.yaml")
    splits = load_data(cfg.data, cfg.cv)
    clean = robustness.member_probabilities(target, splits, splits.test)
    fused = robustness.combine(target, clean)
    without_visual = robustness.masked(target, "visual", clean, fused)
    own = trained.predict_run(member, splits, ("test",))["test"].y_prob
    assert without_visual is not None and np.array_equal(without_visual, own)
    # and in the files: late's row is the acoustic run's clean row, bit for bit
    row = rows_by_key(json.loads((late / "robustness.json").read_text()))["missing/masked/visual@1"]
    alone = json.loads((acoustic / "robustness.json").read_text())["clean"]
    assert {k: row[k] for k in alone} == alone


@pytest.mark.slow
def test_strength_zero_scores_exactly_the_clean_test_split(sweep):
    run = run_of(sweep, "early")
    target = robustness.read_target(run)
    cfg = files.read_config(run / "config.yaml")
    splits = load_data(cfg.data, cfg.cv)
    clean = robustness.member_probabilities(target, splits, splits.test)
    fused = robustness.combine(target, clean)
    groups = np.array([c[:4] for c in splits.test.clip_ids])
    for stream in ("acoustic", "visual"):
        zero = perturb.Condition("noise", "gaussian", stream, 0.0, "x train std", 0.0)
        row = robustness.row(zero, target, splits, (clean, fused), groups, seed=0, references={})
        assert {k: row[k] for k in robustness.METRIC_KEYS} == {
            k: v
            for k, v in robustness.scores(splits.test.labels, fused, groups).items()
            if k in robustness.METRIC_KEYS
        }


@pytest.mark.slow
def test_mer_evaluate_perturb_gives_the_hooks_numbers_and_another_seed_other_ones(sweep, tmp_path):
    run = tmp_path / "late"
    shutil.copytree(run_of(sweep, "late"), run)  # its members are named by absolute path
    from_sweep = json.loads((run / "robustness.json").read_text())
    (run / "robustness.json").unlink()
    proc = run_main("evaluate", str(run), "--perturb", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((run / "robustness.json").read_text()) == from_sweep  # same seed, same numbers
    for name in ("noise", "frame_drop", "gap", "missing", "shift"):
        assert f"robustness: {name}," in proc.stderr  # a progress line per corruption
    assert "missing masked visual 1 stream" in proc.stdout
    proc = run_main("evaluate", str(run), "--perturb", "noise,missing", "--perturb-seed", "1", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-2000:]
    other = json.loads((run / "robustness.json").read_text())
    assert other["corruptions"] == ["noise", "missing"] and other["seed"] == 1
    before, after = rows_by_key(from_sweep), rows_by_key(other)
    assert set(after) == {k for k in before if k.startswith(("noise/", "missing/"))}
    assert after["missing/masked/visual@1"] == before["missing/masked/visual@1"]  # nothing drawn
    noise = [k for k in after if k.startswith("noise/")]
    assert any(after[k]["ece"] != before[k]["ece"] for k in noise)  # other noise, other scores


@pytest.mark.slow
def test_the_sweeps_report_has_a_robustness_section(sweep):
    report = (sweep / "report.md").read_text()
    section = report.split("## Robustness", 1)[1].split("\n## ", 1)[0]
    assert "figures/robustness.png" in section and (sweep / "figures" / "robustness.png").is_file()
    early = json.loads((run_of(sweep, "early") / "robustness.json").read_text())
    summary = json.loads((sweep / "comparison.json").read_text())["robustness"]
    assert {m["label"] for m in summary["models"]} == set(MODALITIES)
    (model,) = [m for m in summary["models"] if m["label"] == "early"]
    # one run: the mean over runs is that run's own number
    assert model["clean"] == early["clean"]["f1_macro"]
    assert "| clean |" in section and f"{100 * early['clean']['f1_macro']:.1f} %" in section
    assert "| missing masked acoustic @ 1 stream |" in section and "skipped" in section
    # late fusion reused the sweep's members: the hook trained nothing twice
    trainings = sum(p.read_text().count("] - training on ") for p in sweep.glob("*/train.log"))
    assert trainings == 5


def test_an_unknown_corruption_stops_mer_evaluate_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        commands.evaluate_main([str(tmp_path), "--perturb", "noise,blur"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert (
        err == "mer-evaluate: error: --perturb: corruption='blur': "
        "valid: noise, frame_drop, gap, missing, shift, snr"
    )


@pytest.mark.slow
def test_intervals_group_by_the_datas_stored_speakers_when_clip_ids_name_none(sweep, tmp_path, monkeypatch):
    run = tmp_path / "acoustic"
    shutil.copytree(run_of(sweep, "acoustic"), run)
    by_ids, _ = robustness.evaluate_robustness(run, ["noise"], save_plots=False)
    assert by_ids["ci"]["unit"] == "actors"  # CREMA-D ids: the actor parsed from each
    real_load = robustness.load_data

    def renamed(*args):  # the same clips under ids that carry no actor, their speakers stored
        splits = real_load(*args)
        test = splits.test
        ids = tuple(f"clip{i:04d}" for i in range(len(test.clip_ids)))
        actors = tuple(c[:4] for c in test.clip_ids)
        return replace(splits, test=replace(test, clip_ids=ids, speakers=actors))

    monkeypatch.setattr(robustness, "load_data", renamed)
    stored, _ = robustness.evaluate_robustness(run, ["noise"], save_plots=False)
    assert stored["ci"]["unit"] == "actors"
    assert stored["clean"] == by_ids["clean"]  # the same groups: the same bootstrap intervals
    assert stored["rows"] == by_ids["rows"]


@pytest.mark.slow
def test_each_fold_of_a_cross_validation_is_re_scored_on_its_own_test_split(tmp_path):
    out = tmp_path / "cv"
    execute.run(
        compose_train(
            "experiment=smoke",
            "modality=acoustic",
            "cv.folds=3",
            "eval.robustness=true",
            "trainer.loop.max_epochs=1",
            "runtime.save_plots=false",
        ),
        out,
    )
    assert not (out / "robustness.json").exists()  # the folds' parent holds only cv.json
    tests = []
    for fold in ("fold0", "fold1", "fold2"):
        result = json.loads((out / fold / "robustness.json").read_text())
        test = json.loads((out / fold / "metrics.json").read_text())["test"]
        assert result["clean"]["f1_macro"] == pytest.approx(test["f1_macro"], abs=1e-6)
        assert len(result["rows"]) == N_CONDITIONS
        tests.append(result["clean"]["f1_macro"])
    cv = json.loads((out / "cv.json").read_text())
    assert cv["test"]["f1_macro"] == pytest.approx(np.mean(tests), abs=1e-6)

"""The comparison report's intervals group by the speakers the data stored (predictions.csv's
speaker column) before any actor parsed from clip ids, as robustness.json and baselines.json do."""

from __future__ import annotations

import csv

import numpy as np

from conftest import CLASSES
from mer_cli.evaluation.metrics import score
from mer_cli.reporting import analysis, options
from mer_cli.reporting.collect import collect
from mer_cli.runs import outputs


def write_run(root, clip_ids, speakers, y_true, prob):
    root.mkdir(parents=True)
    test = outputs.Predictions("test", clip_ids, y_true, prob, speakers=speakers)
    metrics = {"run": {"seed": 0, "modality": "early"}, "test": score(y_true, prob, CLASSES)}
    outputs.write(root, metrics, None, [test], CLASSES, save_plots=False)
    (root / "config.yaml").write_text("seed: 0\nmodality:\n  name: early\n")
    return root


def summary(run_dir):
    runs, _ = collect([run_dir])
    model = analysis.Model("m", "early", runs)
    analysis.summarize(model, len(CLASSES), options.Settings(bootstrap_samples=200))
    return model.ci_unit, model.summary, runs[0].groups


def test_stored_speakers_give_the_intervals_their_actors_give(tmp_path):
    rng = np.random.default_rng(0)
    n = 48
    y_true = rng.integers(0, len(CLASSES), n)
    prob = rng.dirichlet(np.ones(len(CLASSES)), n)
    actors = tuple(str(1001 + i // 6) for i in range(n))  # 8 actors, 6 clips each
    crema = tuple(f"{a}_clip{i:02d}" for i, a in enumerate(actors))
    plain = tuple(f"clip{i:02d}" for i in range(n))  # the same clips, ids naming no actor
    by_ids = summary(write_run(tmp_path / "ids", crema, None, y_true, prob))
    stored = summary(write_run(tmp_path / "stored", plain, actors, y_true, prob))
    unknown = summary(write_run(tmp_path / "none", plain, None, y_true, prob))
    assert by_ids[0] == stored[0] == "actors" and unknown[0] == "clips"
    assert list(stored[2]) == list(actors)
    assert stored[1] == by_ids[1]  # the same groups: the same bootstrap intervals
    assert unknown[1]["f1_macro"]["ci"] != by_ids[1]["f1_macro"]["ci"]


def test_predictions_csv_has_a_speaker_column_only_where_speakers_are_stored(tmp_path):
    prob = np.array([[0.7, 0.1, 0.15, 0.05]] * 2)
    y = np.array([0, 1])
    with_ = outputs.Predictions("test", ("a", "b"), y, prob, speakers=("s1", "s2"))
    without = outputs.Predictions("test", ("a", "b"), y, prob)
    outputs.write_predictions(tmp_path / "with.csv", [with_], CLASSES)
    outputs.write_predictions(tmp_path / "without.csv", [without], CLASSES)
    header = next(csv.reader((tmp_path / "with.csv").open()))
    assert header[:5] == ["split", "clip_id", "speaker", "y_true", "y_pred"]
    assert next(csv.reader((tmp_path / "without.csv").open()))[:4] == ["split", "clip_id", "y_true", "y_pred"]
    assert outputs.read_predictions(tmp_path / "with.csv", "test").speakers == ("s1", "s2")
    back = outputs.read_predictions(tmp_path / "without.csv", "test")
    assert back.speakers is None and back.clip_ids == ("a", "b")
    np.testing.assert_allclose(back.y_prob, prob, rtol=1e-5)

"""data.frame_validity in a run: a visual stream whose invalid frames hold huge garbage values,
stored with its validity mask, trains (honour) exactly the model of the same clips with those
frames deleted, for a one-stream visual model, joint, xattn and late fusion; early fusion reads them
interpolated from their valid neighbours; ignore reads the garbage. mer-evaluate and mer-export
apply the same rule; the key is part of a model's identity, and runs from before it are today's
default model."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import compose_train, smoke_config
from mer_cli.core.errors import DataError
from mer_cli.data import synthetic
from mer_cli.data.features.openface import fill_failed
from mer_cli.data.native import load_dir, save_dir
from mer_cli.data.splits import Split, Splits
from mer_cli.runs import execute, identity, outputs, trained
from mer_cli.runs.evaluate import evaluate_run
from mer_cli.serving import export

GARBAGE = 1e6  # what a face toolkit's lost frames may hold: nothing like a face's action units


def with_garbage_frames(split: Split, rng: np.random.Generator) -> Split:
    """``split`` with 1 to 3 extra visual frames per clip at random places (the first and the last
    frame included), holding values of order ``GARBAGE``, and the mask saying they are invalid."""
    clips, masks = [], []
    for x in split.aus:
        n = len(x) + int(rng.integers(1, 4))
        bad = rng.choice(n, size=n - len(x), replace=False)
        valid = np.ones(n, bool)
        valid[bad] = False
        frames = np.empty((n, x.shape[1]), np.float32)
        frames[valid] = x
        frames[~valid] = GARBAGE * rng.standard_normal((n - len(x), x.shape[1]))
        clips.append(frames)
        masks.append(valid)
    return replace(split, aus=clips, valid={"visual": masks})


def interpolated(split: Split) -> Split:
    """``split`` with its invalid visual frames replaced by np.interp of the valid ones (the
    table back-end's own interpolation), and no mask."""
    clips = [
        fill_failed(x.astype(np.float64), m, "interpolate").astype(np.float32)
        for x, m in zip(split.aus, split.valid["visual"], strict=True)
    ]
    return replace(split, aus=clips, valid=None)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Native datasets: ``clean`` (short clips of the embedded data), ``garbage`` (the same clips
    with invalid visual frames added, masked), ``interpolated`` (those frames interpolated)."""
    spec = synthetic.Spec(n_actors=10, clips_per_actor_per_class=2, min_duration_s=0.3, max_duration_s=0.6)
    clean = synthetic.generate(spec)
    rng = np.random.default_rng(0)
    garbage = replace(clean, **{s.name: with_garbage_frames(s, rng) for s in clean.all()})
    filled = replace(garbage, **{s.name: interpolated(s) for s in garbage.all()})
    root = tmp_path_factory.mktemp("validity")
    sets: dict[str, Splits] = {"clean": clean, "garbage": garbage, "interpolated": filled}
    return {name: save_dir(s, root / name) for name, s in sets.items()}


def train(data: Path, out: Path, modality: str, *overrides: str) -> Path:
    cfg = compose_train(
        "experiment=smoke",
        "data=native",
        f"data.path={data}",
        f"modality={modality}",
        "runtime.save_plots=false",
        *overrides,
    )
    execute.run(cfg, out)
    return out


def probabilities(run: Path, path: str = "predictions.csv") -> dict[str, np.ndarray]:
    out = {}
    for split in ("val", "test"):
        p = outputs.read_predictions(run / path, split)
        out.update({f"{split}/{c}": prob for c, prob in zip(p.clip_ids, p.y_prob, strict=True)})
    return out


def max_difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert sorted(a) == sorted(b)
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


@pytest.fixture(scope="module")
def runs(data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for modality in ("visual", "joint", "xattn", "late"):
        out[f"{modality}/clean"] = train(data["clean"], root / f"{modality}_clean", modality)
        out[f"{modality}/garbage"] = train(data["garbage"], root / f"{modality}_garbage", modality)
    return out


def test_the_datasets_are_what_the_tests_say(data):
    garbage, clean = load_dir(data["garbage"]), load_dir(data["clean"])
    assert clean.train.valid is None and set(garbage.train.valid) == {"visual"}
    for g, c in zip(garbage.all(), clean.all(), strict=True):
        masks = g.valid["visual"]
        assert (g.aus.lengths > c.aus.lengths).all()
        for i in range(len(g)):
            np.testing.assert_array_equal(g.aus[i][masks[i]], c.aus[i])
            assert np.abs(g.aus[i][~masks[i]]).max() > 1e3


@pytest.mark.slow
@pytest.mark.parametrize("modality", ["visual", "joint", "xattn", "late"])
def test_honoured_masks_give_the_probabilities_of_the_clips_without_those_frames(runs, modality):
    honoured, deleted = runs[f"{modality}/garbage"], runs[f"{modality}/clean"]
    assert max_difference(probabilities(honoured), probabilities(deleted)) < 1e-6
    run = honoured / "visual" if modality == "late" else honoured
    meta = trained.load_trained(run)[2]
    assert trained.honoured_streams(meta) == ["visual"]
    member = deleted / "visual" if modality == "late" else deleted
    # fitted on the valid training frames only: the same target length and scaler as without them
    assert meta["prep"] == trained.load_trained(member)[2]["prep"]


@pytest.mark.slow
def test_ignoring_the_masks_reads_the_garbage_and_changes_the_probabilities(data, runs, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="mer_cli"):
        ignored = train(data["garbage"], tmp_path / "ignored", "visual", "data.frame_validity=ignore")
    assert max_difference(probabilities(ignored), probabilities(runs["visual/clean"])) > 1e-3
    assert "frame_validity" not in trained.load_trained(ignored)[2]
    assert "the mask unused (data.frame_validity=ignore)" in caplog.text


@pytest.mark.slow
def test_mer_evaluate_honours_the_masks_as_the_run_did(data, runs):
    run = runs["visual/garbage"]
    out_dir, _ = evaluate_run(run, None, ("val", "test"), save_plots=False)
    assert max_difference(probabilities(out_dir), probabilities(run)) < 1e-6
    # the clips with those frames deleted are, to this model, the very same clips
    out_dir, _ = evaluate_run(run, data["clean"], ("val", "test"), save_plots=False)
    assert max_difference(probabilities(out_dir), probabilities(run)) < 1e-6


@pytest.mark.slow
def test_early_fusion_reads_invalid_frames_interpolated_from_their_valid_neighbours(data, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="mer_cli"):
        honoured = train(data["garbage"], tmp_path / "honoured", "early")
    reference = train(data["interpolated"], tmp_path / "reference", "early")
    assert max_difference(probabilities(honoured), probabilities(reference)) < 1e-6
    assert "interpolated from the nearest valid frames before the streams are joined" in caplog.text


@pytest.mark.slow
def test_an_exported_run_takes_the_clips_compacted_before_the_graph(data, runs, tmp_path):
    run = runs["visual/garbage"]
    sidecar = export.export(run, "torchscript", tmp_path / "visual.pt")
    assert sidecar["frame_validity"]["streams"] == ["visual"]
    assert "left out before the graph" in sidecar["frame_validity"]["before_the_graph"]
    test = load_dir(data["garbage"]).test
    compacted = [x[m] for x, m in zip(test.aus, test.valid["visual"], strict=True)]
    lengths = torch.tensor([len(c) for c in compacted])
    x = torch.zeros(len(compacted), int(lengths.max()), compacted[0].shape[1])
    for i, c in enumerate(compacted):
        x[i, : len(c)] = torch.from_numpy(c)
    with torch.no_grad():
        got = torch.jit.load(str(tmp_path / "visual.pt"))(x, lengths).numpy()
    expected = outputs.read_predictions(run / "predictions.csv", "test")
    by_id = dict(zip(expected.clip_ids, expected.y_prob, strict=True))
    np.testing.assert_allclose(got, np.stack([by_id[c] for c in test.clip_ids]), atol=1e-5)


def test_a_clip_without_one_valid_frame_is_one_line_naming_it(data):
    split = load_dir(data["garbage"]).test
    masks = [np.asarray(m) for m in split.valid["visual"]]
    masks[2] = np.zeros_like(masks[2])
    broken = replace(split, valid={"visual": masks})
    with pytest.raises(DataError, match=rf"^test/{split.clip_ids[2]}: no valid visual frame \(1 such clip"):
        trained.model_inputs(broken, "visual", ["visual"], honoured=["visual"])
    # ignored, the clip is read as it is
    assert len(trained.model_inputs(broken, "visual", ["visual"])["visual"]) == len(split)


def test_frame_validity_is_part_of_the_identity_and_runs_from_before_it_are_the_default():
    default = smoke_config()
    assert default["data"]["frame_validity"] == "honour"
    before = json.loads(json.dumps(default))
    del before["data"]["frame_validity"]
    assert identity.model_identity(before) == identity.model_identity(default)
    ignored = smoke_config("data.frame_validity=ignore")
    assert identity.differences(identity.model_identity(default), identity.model_identity(ignored)) == [
        "data.frame_validity: 'honour' -> 'ignore'"
    ]


def test_an_unknown_rule_is_one_line(data, tmp_path):
    from mer_cli.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^data.frame_validity='drop': valid: honour, ignore$"):
        train(data["garbage"], tmp_path / "x", "visual", "data.frame_validity=drop")

"""Scalers fitted by streaming (each against numpy on all frames at once) and smoke runs of every
scaling option on awkward features (the data profile and auto's choice: test_profile.py)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_train, run_cli
from mer_cli.core.errors import ConfigError
from mer_cli.data.npz import save_npz
from mer_cli.data.splits import NOTEBOOK_CLASS_NAMES, Split, Splits
from mer_cli.preprocess import graph, scaling, sequences
from mer_cli.runs import execute, identity
from mer_cli.runs.evaluate import evaluate_run

SPAN = np.array([1e-3, 1.0, 1e3, 1e6])  # feature scales as in raw energies next to MFCCs


def clips_spanning(rng: np.random.Generator, n: int, min_frames: int = 2, max_frames: int = 40) -> list:
    """Heavy-tailed clips whose features differ by nine orders of magnitude, plus a constant."""
    out = []
    for _ in range(n):
        t = int(rng.integers(min_frames, max_frames + 1))
        x = rng.standard_t(3, (t, len(SPAN))) * SPAN + SPAN * 5
        out.append(np.hstack([x, np.full((t, 1), 7.0)]).astype(np.float32))
    return out


def todays_fit_scaler(train):  # sequences.fit_scaler before streaming: the reference
    frames = np.concatenate(train, axis=0).astype(np.float64)
    std = frames.std(axis=0)
    std[std < 1e-8] = 1.0
    return frames.mean(axis=0), std


def test_standard_streams_to_todays_numbers(monkeypatch):
    rng = np.random.default_rng(0)
    train = [x + np.float32(1e4) for x in clips_spanning(rng, 200)]  # a large offset: Chan's formula
    monkeypatch.setattr(scaling, "CHUNK_VALUES", 64)  # many chunks combined, not one
    scaler = scaling.fit("standard", train)
    mean, std = todays_fit_scaler(train)
    np.testing.assert_allclose(scaler.center, mean, rtol=1e-6)
    np.testing.assert_allclose(scaler.scale, std, rtol=1e-6)
    assert scaler.scale[-1] == 1.0  # the constant feature is centred, never divided by zero
    out = scaler.transform(train[3])
    assert out.dtype == np.float32 and np.isfinite(out).all()
    np.testing.assert_allclose(out, (train[3] - mean) / std, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("exact_max_values", [scaling.EXACT_MAX_VALUES, 0], ids=["exact", "streamed"])
def test_robust_matches_numpy_percentiles(exact_max_values):
    rng = np.random.default_rng(1)
    train = clips_spanning(rng, 150)
    train = [np.hstack([x, rng.integers(0, 3, (len(x), 1))]).astype(np.float32) for x in train]  # ties
    scaler = scaling.fit("robust", train, exact_max_values=exact_max_values)
    q25, median, q75 = np.percentile(np.concatenate(train).astype(np.float64), [25, 50, 75], axis=0)
    iqr = q75 - q25
    iqr_or_one = np.where(iqr > 0, iqr, 1.0)
    tol = 0 if exact_max_values else 2 * scaling.ROBUST_TOLERANCE  # the documented bound
    assert np.all(np.abs(scaler.center - median) <= tol * iqr_or_one + 1e-12)
    varying = iqr > 0
    assert np.all(np.abs(scaler.scale - iqr)[varying] <= 2 * tol * iqr[varying] + 1e-12)
    assert scaler.scale[4] == 1.0  # constant feature (IQR and std zero): centred only
    out = scaler.transform(train[0])
    assert np.isfinite(out).all()


def test_robust_streamed_needs_clips_it_can_read_again():
    train = clips_spanning(np.random.default_rng(2), 20)
    with pytest.raises(ValueError, match="not an iterator"):
        scaling.fit("robust", iter(train), exact_max_values=0)


def test_per_clip_standardizes_each_clip_by_its_own_frames():
    rng = np.random.default_rng(3)
    train = clips_spanning(rng, 10)
    scaler = scaling.fit("per_clip", train)
    assert scaler.state() == {"kind": "per_clip", "center": None, "scale": None}  # nothing fitted
    x = train[0].astype(np.float64)
    out = scaler.transform(train[0])
    np.testing.assert_allclose(
        out[:, :4], (x[:, :4] - x[:, :4].mean(0)) / x[:, :4].std(0), rtol=1e-5, atol=1e-6
    )
    assert (out[:, 4] == 0).all()  # constant within the clip: centred, no NaN
    two = np.array([[1.0, 5.0], [3.0, 5.0]], dtype=np.float32)
    assert scaler.transform(two).tolist() == [[-1.0, 0.0], [1.0, 0.0]]  # two frames: +-1
    assert scaler.transform(two[:1]).tolist() == [[0.0, 0.0]]  # one frame: nothing left but zero


def test_signed_log_per_clip_compresses_then_standardizes_each_clip_by_its_own_frames():
    train = clips_spanning(np.random.default_rng(10), 10)
    scaler = scaling.fit("signed_log_per_clip", train)
    assert scaler.state() == {"kind": "signed_log_per_clip", "center": None, "scale": None}
    z = scaling.signed_log(train[0][:, :4])
    out = scaler.transform(train[0])
    np.testing.assert_allclose(out[:, :4], (z - z.mean(0)) / z.std(0), rtol=1e-5, atol=1e-6)
    assert np.abs(out[:, 4]).max() < 1e-6  # constant within the clip: centred (to rounding), no NaN
    # a clip's scale becomes an offset of its logarithms, which its own mean takes away
    big = np.abs(train[1][:, :4].astype(np.float64)) + 100.0
    np.testing.assert_allclose(scaler.transform(big * 1000.0), scaler.transform(big), atol=2e-3)


def test_signed_log_compresses_then_standardizes():
    rng = np.random.default_rng(4)
    train = clips_spanning(rng, 60)
    scaler = scaling.fit("signed_log", train)
    z = [np.sign(x.astype(np.float64)) * np.log1p(np.abs(x.astype(np.float64))) for x in train]
    mean, std = todays_fit_scaler(z)
    np.testing.assert_allclose(scaler.center, mean, rtol=1e-6)
    np.testing.assert_allclose(scaler.scale, std, rtol=1e-6)
    np.testing.assert_allclose(scaler.transform(train[1]), (z[1] - mean) / std, rtol=1e-5, atol=1e-6)
    assert scaling.signed_log(np.array([-(math.e - 1), 0.0, math.e - 1])).tolist() == pytest.approx(
        [-1, 0, 1]
    )


@pytest.mark.parametrize("kind", scaling.KINDS)
def test_state_round_trips_to_the_same_numbers(kind):
    train = clips_spanning(np.random.default_rng(5), 30)
    prep = sequences.fit(train, percentile=95, normalize=True, scaling=kind)
    again = sequences.StreamPrep.from_state(json.loads(json.dumps(prep.state())))  # plain numbers
    assert again.scaler.kind == kind
    np.testing.assert_array_equal(again.apply(train).frames, prep.apply(train).frames)
    in_place = train[2][: prep.target.length].copy()
    prep.scaler.transform(in_place, out=in_place)
    np.testing.assert_array_equal(in_place, prep.scaler.transform(train[2][: prep.target.length]))


def test_a_checkpoint_from_before_scaling_options_loads_as_standardization():
    old = {"length": 3, "mean": [1.0, 2.0], "std": [2.0, 1.0]}
    prep = sequences.StreamPrep.from_state(old)
    assert prep.scaler.kind == "standard"
    assert prep.scaler.transform(np.array([[3.0, 2.0]])).tolist() == [[1.0, 0.0]]
    assert sequences.StreamPrep.from_state({"length": 3, "mean": None, "std": None}).scaler is None


def test_an_unknown_scaling_is_one_config_error_before_anything_is_written(tmp_path):
    cfg = compose_train("experiment=smoke", "preprocess.scaling=minmax")
    with pytest.raises(ConfigError, match=r"^preprocess\.scaling=minmax is not one of: standard, robust"):
        execute.run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # no half-written run directory


def _awkward_npz(path):
    """30 training clips, some of two frames, features spanning 1e-3..1e6 and a constant one."""
    rng = np.random.default_rng(8)

    def split(name, n):
        return Split(
            name,
            tuple(f"{name}{i}" for i in range(n)),
            tuple(clips_spanning(rng, n, min_frames=2, max_frames=12)),
            tuple(clips_spanning(rng, n, min_frames=2, max_frames=4)),
            (np.arange(n) % 6).astype(np.int64),
        )

    splits = Splits(split("train", 30), split("val", 12), split("test", 12), NOTEBOOK_CLASS_NAMES, "x")
    return save_npz(splits, path)


@pytest.mark.slow
def test_every_scaling_trains_on_awkward_features_and_mer_evaluate_reproduces_it(tmp_path):
    path = _awkward_npz(tmp_path / "awkward.npz")
    sweep = tmp_path / "sweep"
    proc = run_cli(
        "train",
        "-m",
        "experiment=smoke",
        "data=npz",
        f"data.path={path}",
        f"preprocess.scaling={','.join(scaling.KINDS)}",
        "runtime.save_plots=false",
        f"hydra.sweep.dir={sweep}",
    )
    assert proc.returncode == 0, proc.stderr
    runs = {_scaling_of(d): d for d in sweep.iterdir() if (d / "metrics.json").is_file()}
    assert set(runs) == set(scaling.KINDS)
    for kind, run in runs.items():
        log = (run / "train.log").read_text()
        assert "early: target length" in log and "30 train clips of 2.." in log
        auto = json.loads((run / "profile.json").read_text())["streams"]["early"]["scaling"]["auto"]
        # the profile warns when the scaling differs from what auto would act on
        assert ("does not cope with that" in log) == (auto not in ("standard", kind)), (kind, auto)
        with (run / "history.csv").open(newline="") as f:
            losses = [float(row[k]) for row in csv.DictReader(f) for k in ("train/loss", "val/loss")]
        assert losses and all(math.isfinite(v) for v in losses), kind  # no NaN on the way
        trained = json.loads((run / "metrics.json").read_text())
        assert math.isfinite(trained["test"]["loss"]), kind
        _, again = evaluate_run(run, None, ("val", "test"), save_plots=False)
        for split in ("val", "test"):
            assert again[split] == trained[split], (kind, split)


def _scaling_of(run_dir):
    return OmegaConf.load(run_dir / "config.yaml").preprocess.scaling


def test_the_scaling_option_is_part_of_a_models_identity():
    base = {"preprocess": {"length_percentile": 95, "normalize": True, "scaling": "standard"}, "seed": 1}
    robust = {**base, "preprocess": {**base["preprocess"], "scaling": "robust"}}
    before_options = {**base, "preprocess": {"length_percentile": 95, "normalize": True}}
    assert identity.model_identity(robust) != identity.model_identity(base)  # it changes results
    assert identity.model_identity(before_options) == identity.model_identity(base)  # old runs: standard
    unscaled = [{**c, "preprocess": {**c["preprocess"], "normalize": False}} for c in (base, robust)]
    assert identity.model_identity(unscaled[0]) == identity.model_identity(unscaled[1])  # nothing scaled


@pytest.mark.parametrize("kind", scaling.KINDS)
def test_the_exported_graphs_preprocessing_gives_the_pipelines_numbers(kind):

    train = clips_spanning(np.random.default_rng(9), 30, min_frames=1, max_frames=20)
    prep = sequences.fit(train, percentile=80, normalize=True, scaling=kind)
    ragged = prep.apply(train)
    idx = torch.arange(len(train))
    raw = sequences.Ragged(
        np.concatenate(train), np.cumsum([0] + [len(x) for x in train]), max(len(x) for x in train)
    )
    x, lengths = graph.StreamPreprocess(prep)(raw.pad(idx, raw.max_length), raw.lengths)
    assert lengths.tolist() == ragged.lengths.tolist()
    np.testing.assert_allclose(x.numpy(), ragged.pad(idx, prep.target.length).numpy(), rtol=1e-6, atol=1e-6)

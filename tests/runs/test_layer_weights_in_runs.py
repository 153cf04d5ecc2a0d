"""model.layer_weights=learned in a run: trained on a dataset whose acoustic stream stores four
encoder layers, written to metrics.json and plots/layer_weights.png, part of the model's identity,
rebuilt from the checkpoint for mer-evaluate, resume, mer-predict and mer-export, shown in the
comparison report; refused in one line on data that stores one layer."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_train, smoke_config
from mer_cli.core.errors import ConfigError
from mer_cli.data import synthetic
from mer_cli.data.load import load_data
from mer_cli.data.native import save_dir
from mer_cli.data.splits import Split
from mer_cli.models import layer_mix
from mer_cli.reporting import report
from mer_cli.reporting.options import Settings
from mer_cli.runs import execute, identity, trained
from mer_cli.runs.evaluate import evaluate_run
from mer_cli.serving import export, predict

LAYERS, D = [6, 7, 8, 9], 16
CARRIER = "8"  # the one stored layer whose frames say the emotion; the other three are noise
# enough steps for a smoke-sized model to learn the data: 9 batches of 8 clips, 8 epochs
LEARNS = ("trainer.loop.max_epochs=8", "trainer.loop.batch_size=8", "trainer.loop.patience_epochs=8")


def layered(split: Split, rng: np.random.Generator) -> Split:
    """``split`` with its acoustic frames replaced by four stored layers (T, 4 * D), layer-major:
    layer 8 holds a per-emotion mean plus unit noise, layers 6, 7 and 9 unit noise alone."""
    means = np.random.default_rng(5).standard_normal((6, D)).astype(np.float32)
    clips = []
    for frames, y in zip(split.mfcc, split.labels, strict=True):
        stored = [rng.standard_normal((len(frames), D)).astype(np.float32) for _ in LAYERS]
        stored[LAYERS.index(int(CARRIER))] += means[y]
        clips.append(np.concatenate(stored, axis=1))
    return replace(split, mfcc=clips)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A native dataset as mer-ingest with a speech encoder writes it: 72 / 24 / 24 short clips of
    the embedded data, the acoustic stream's ingest record naming its layers."""
    spec = synthetic.Spec(n_actors=10, clips_per_actor_per_class=2, min_duration_s=0.3, max_duration_s=0.6)
    splits = synthetic.generate(spec)
    rng = np.random.default_rng(0)
    record = {
        "backend": "hf",
        "model_id": "tiny-speech-encoder",
        "layers": LAYERS,
        "layer_size": D,
        "frame_rate_hz": 100.0,
        "feature_names": [f"layer{layer}_{i}" for layer in LAYERS for i in range(D)],
    }
    splits = replace(
        splits,
        train=layered(splits.train, rng),
        val=layered(splits.val, rng),
        test=layered(splits.test, rng),
        ingest_settings={"acoustic": record},
    )
    return save_dir(splits, tmp_path_factory.mktemp("data") / "layered")


def train(data: Path, out: Path, *overrides: str) -> Path:
    cfg = compose_train(
        "experiment=smoke",
        "data=native",
        f"data.path={data}",
        "model.layer_weights=learned",
        "trainer.optimizer.lr=0.01",
        *overrides,
    )
    execute.run(cfg, out)
    return out


@pytest.fixture(scope="module")
def acoustic_run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(data, tmp_path_factory.mktemp("runs") / "acoustic", "modality=acoustic", *LEARNS)


@pytest.fixture(scope="module")
def early_run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(
        data, tmp_path_factory.mktemp("runs") / "early", "modality=early", "trainer.loop.max_epochs=1"
    )


def metrics_of(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


@pytest.mark.slow
def test_the_layer_that_carries_the_emotion_gets_the_largest_weight(acoustic_run):
    metrics = metrics_of(acoustic_run)
    weights = metrics["run"]["layer_weights"]["acoustic"]
    assert list(weights) == ["6", "7", "8", "9"]  # by the real layer numbers, in stored order
    assert sum(weights.values()) == pytest.approx(1.0, abs=1e-5)
    assert max(weights, key=weights.__getitem__) == CARRIER
    assert weights[CARRIER] > 0.3 > max(w for k, w in weights.items() if k != CARRIER)
    assert metrics["test"]["f1_macro"] > 0.4  # it learned the emotions (chance: about 0.17)
    assert (acoustic_run / "plots" / "layer_weights.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the checkpoint rebuilds the model with the very weights metrics.json reports
    model, _, meta = trained.load_trained(acoustic_run)
    assert layer_mix.learned_weights(model) == metrics["run"]["layer_weights"]
    assert meta["model_config"]["layer_weights"] == {
        "acoustic": [{"stream": "acoustic", "offset": 0, "layers": LAYERS, "layer_size": D}]
    }


@pytest.mark.slow
def test_mer_evaluate_and_resume_of_a_finished_run_give_its_metrics(acoustic_run, tmp_path):
    trained_metrics = metrics_of(acoustic_run)
    _, evaluated = evaluate_run(acoustic_run, None, ("val", "test"), save_plots=False)
    for split in ("val", "test"):
        assert {k: evaluated[split][k] for k in trained_metrics[split]} == trained_metrics[split]
    copy = tmp_path / "copy"
    shutil.copytree(acoustic_run, copy)
    cfg = OmegaConf.load(copy / "config.yaml")
    resumed = execute.run(cfg, copy, resume=True)
    assert resumed["test"] == trained_metrics["test"]
    assert resumed["run"]["layer_weights"] == trained_metrics["run"]["layer_weights"]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_early_fusion_exports_and_predicts_as_mer_evaluate(early_run, data, fmt, tmp_path):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime", reason="the export extra is not installed")
    metrics = metrics_of(early_run)
    assert set(metrics["run"]["layer_weights"]) == {"acoustic"}  # the visual stream stores one layer
    splits = load_data(OmegaConf.load(early_run / "config.yaml").data)
    expected = trained.predict_run(early_run, splits, ("test",))["test"]
    # mer-predict --data on the dataset's directory: every split's clips, the test ones among them
    run = predict.load_run(early_run)
    clips = predict.read_data(run, data)
    got = predict.predict(run, clips)
    index = {c: i for i, c in enumerate(got.clip_ids)}
    rows = [index[c] for c in expected.clip_ids]
    np.testing.assert_allclose(got.y_prob[rows], expected.y_prob, rtol=0, atol=1e-6)
    # the exported graph, fed the raw test clips of both streams padded into one batch
    out = tmp_path / f"model{export.FORMATS[fmt]}"
    sidecar = export.export(early_run, fmt, out)
    assert sidecar["n_features"] == {"acoustic": 4 * D, "visual": 17}
    feeds = {}
    for stream in ("acoustic", "visual"):
        test_clips = list(splits.test.streams[stream])
        lengths = np.array([len(c) for c in test_clips], dtype=np.int64)
        x = np.zeros((len(test_clips), int(lengths.max()), test_clips[0].shape[1]), dtype=np.float32)
        for i, c in enumerate(test_clips):
            x[i, : len(c)] = c
        feeds[stream], feeds[f"{stream}_lengths"] = x, lengths
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        prob = session.run(["probabilities"], feeds)[0]
    else:
        with torch.no_grad():
            prob = torch.jit.load(str(out))(*(torch.from_numpy(v) for v in feeds.values())).numpy()
    np.testing.assert_allclose(prob, expected.y_prob, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_the_comparison_report_shows_each_runs_layer_weights(acoustic_run, early_run, tmp_path):
    out = report.into_new_dir([acoustic_run, early_run], tmp_path, Settings(), tmp_path / "report")
    text = (out / "report.md").read_text()
    section = text.split("## Layer weights", 1)[1].split("\n## ", 1)[0]
    weights = metrics_of(acoustic_run)["run"]["layer_weights"]["acoustic"]
    shown = ", ".join(f"{k}: {v:.2f}" for k, v in weights.items())
    assert f"| acoustic | 0 | | acoustic | {CARRIER} | {shown} |" in section.replace("  ", " ")
    rows = [line.split("|")[1:-1] for line in section.splitlines() if line.startswith("| ")][1:]
    assert [(r[0].strip(), r[3].strip()) for r in rows] == [("acoustic", "acoustic"), ("early", "acoustic")]


@pytest.mark.slow
def test_late_fusion_learns_layer_weights_for_the_layered_member_only(data, tmp_path):
    run = train(
        data, tmp_path / "late", "modality=late", "trainer.loop.max_epochs=1", "runtime.save_plots=true"
    )
    members = {m: OmegaConf.load(run / m / "config.yaml").model.layer_weights for m in ("acoustic", "visual")}
    assert members == {"acoustic": "learned", "visual": None}  # the visual member is the plain model
    metrics = metrics_of(run)
    assert metrics["run"]["layer_weights"] == metrics_of(run / "acoustic")["run"]["layer_weights"]
    assert "layer_weights" not in metrics_of(run / "visual")["run"]
    assert (run / "plots" / "layer_weights.png").is_file()


def test_learned_layer_weights_are_another_model_and_runs_from_before_them_are_todays_default():
    default = smoke_config()
    learned = smoke_config("model.layer_weights=learned")
    assert identity.differences(identity.model_identity(default), identity.model_identity(learned)) == [
        "model.layer_weights: None -> 'learned'"
    ]
    before = smoke_config()
    del before["model"]["layer_weights"]
    assert identity.run_identity(before) == identity.run_identity(default)


@pytest.mark.parametrize(
    ("modality", "why"),
    [
        ("acoustic", "the acoustic features of {} store one layer (mfcc)"),
        ("late", "the acoustic and visual features of {} store one layer each (mfcc; aus)"),
    ],
)
def test_data_storing_one_layer_is_refused_in_one_line_before_training(modality, why, tmp_path):
    cfg = compose_train("experiment=smoke", f"modality={modality}", "model.layer_weights=learned")
    with pytest.raises(ConfigError) as e:
        execute.run(cfg, tmp_path / "run")
    hint = "--audio-features hf --audio-layers A-B" + (
        " or a video back-end that stores several layers" if modality == "late" else ""
    )
    source = load_data(cfg.data, cfg.cv).source
    assert str(e.value) == (
        f"model.layer_weights=learned: {why.format(source)}: nothing to weigh; ingest with {hint}"
    )
    assert not list((tmp_path / "run").rglob("*.pt"))

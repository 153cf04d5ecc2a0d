"""mer-export: the exported file gives mer-cli's own predictions, from raw clips, with exact masking."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_train, run_main
from mer_cli.cli import export as export_cli
from mer_cli.core.artifacts import load_checkpoint
from mer_cli.data.load import load_data
from mer_cli.preprocess import align, scaling, sequences
from mer_cli.preprocess import graph as preprocess_graph
from mer_cli.runs import execute, trained
from mer_cli.runs.late import late_predictions
from mer_cli.serving import export

# one smoke run per modality; the encoders vary so the exporter meets every kind of layer:
# packed masking (exported as the reverse path), GRU cells, attention, convolutions, stacking
RUNS = {
    "acoustic": ["model.encoder.masking=packed"],
    "early": ["eval.calibration=temperature"],  # the exported graph applies the temperature
    "joint": ["model=gru"],
    "xattn": ["model=transformer"],
    # members and the fused model calibrated: three temperatures in one graph
    "late": ["modality.combiner=stacking", "model=tcn", "eval.calibration=temperature"],
}
FORMATS = ["onnx", "torchscript"]


def needs(fmt: str) -> None:
    if fmt == "onnx":
        pytest.importorskip("onnxruntime", reason="the export extra is not installed")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for modality, overrides in RUNS.items():
        cfg = compose_train(
            "experiment=smoke",
            f"modality={modality}",
            *overrides,
            "data.limit_per_split=24",
            "data.generator.n_actors=10",  # 300 clips generated, 24 per split kept
            "trainer.loop.max_epochs=1",
            "runtime.save_plots=false",
        )
        execute.run(cfg, root / modality)
        out[modality] = root / modality
    return out


def mer_cli_test_predictions(run_dir: Path) -> tuple[np.ndarray, dict[str, list[np.ndarray]], int]:
    """mer-cli's own probabilities on the run's test clips (as mer-evaluate makes them), the raw
    test clips per stream, and the longest target length the run cuts to."""
    cfg = OmegaConf.load(run_dir / "config.yaml")
    splits = load_data(cfg.data)
    late_path = run_dir / "late.json"
    if late_path.is_file():
        late, combined, member_dirs = trained.read_late(run_dir)
        members = {m: trained.predict_run(d, splits, ("test",)) for m, d in member_dirs.items()}
        (pred,) = late_predictions(members, combined, ("test",))
        metas = [load_checkpoint(run_dir / src / "checkpoint.pt") for src in late["members"].values()]
    else:
        pred = trained.predict_run(run_dir, splits, ("test",))["test"]
        metas = [load_checkpoint(run_dir / "checkpoint.pt")]
    target = min(p["length"] for m in metas for p in m["prep"].values())
    return pred.y_prob, {s: list(c) for s, c in splits.test.streams.items()}, target


def padded(clips: list[np.ndarray], fill: float) -> tuple[np.ndarray, np.ndarray]:
    """One batch (N, longest, F), ``fill`` past each clip's end, and the lengths."""
    lengths = np.array([len(c) for c in clips], dtype=np.int64)
    x = np.full((len(clips), int(lengths.max()) + 5, clips[0].shape[1]), fill, dtype=np.float32)
    for i, c in enumerate(clips):
        x[i, : len(c)] = c
    return x, lengths


def run_exported(path: Path, fmt: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Probabilities of an exported file, run as a user runs it (onnxruntime or torch.jit.load)."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(["probabilities"], feeds)[0]
    module = torch.jit.load(str(path))
    with torch.no_grad():
        return module(*(torch.from_numpy(v) for v in feeds.values())).numpy()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("modality", list(RUNS))
@pytest.mark.slow
def test_exported_file_gives_mer_clis_test_predictions_from_raw_clips(runs, modality, fmt, tmp_path):
    needs(fmt)
    run_dir = runs[modality]
    out = tmp_path / f"model{export.FORMATS[fmt]}"
    sidecar = export.export(run_dir, fmt, out)
    expected, clips, target = mer_cli_test_predictions(run_dir)
    inputs = [i["stream"] for i in sidecar["inputs"] if i["dtype"] == "float32"]
    assert inputs == (["acoustic", "visual"] if modality != "acoustic" else ["acoustic"])
    # some test clips are longer than the target length: the cut inside the graph is exercised
    assert max(len(c) for c in clips[inputs[0]]) > target
    # the whole test split in one batch of clips of different lengths, garbage in the padding
    feeds = {}
    for s in inputs:
        x, lengths = padded(clips[s], fill=np.nan)
        feeds[s], feeds[f"{s}_lengths"] = x, lengths
    got = run_exported(out, fmt, feeds)
    if "eval.calibration=temperature" in RUNS[modality]:  # the expected numbers are calibrated
        t = json.loads((run_dir / "metrics.json").read_text())["run"]["temperature"]
        assert t is not None and abs(t - 1.0) > 1e-3
    assert got.shape == expected.shape == (len(clips[inputs[0]]), 6)
    assert np.abs(got - expected).max() < 1e-5
    # exact masking: each clip run alone (no padding at all) gives its row of the batch
    for i in (0, len(got) // 2, len(got) - 1):
        alone = {}
        for s in inputs:
            x, lengths = padded([clips[s][i]], fill=0.0)
            alone[s], alone[f"{s}_lengths"] = x[:, : lengths[0]], lengths
        np.testing.assert_allclose(run_exported(out, fmt, alone)[0], got[i], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_sidecar_holds_the_preprocessing_classes_and_inputs_as_plain_numbers(runs, tmp_path):
    run_dir = runs["early"]
    out = tmp_path / "early.pt"
    export.export(run_dir, "torchscript", out)
    sidecar = json.loads((tmp_path / "early.pt.json").read_text())
    meta = load_checkpoint(run_dir / "checkpoint.pt")
    assert sidecar["file"] == "early.pt" and sidecar["file_format"] == "torchscript"
    assert sidecar["class_names"] == meta["class_names"] and sidecar["precision"] == "fp32"
    assert sidecar["n_features"] == {"acoustic": 52, "visual": 17}  # 69 fused features, split
    assert [(i["name"], i["shape"]) for i in sidecar["inputs"]] == [
        ("acoustic", ["batch", "acoustic_time", 52]),
        ("acoustic_lengths", ["batch"]),
        ("visual", ["batch", "visual_time", 17]),
        ("visual_lengths", ["batch"]),
    ]
    prep = sidecar["preprocessing"]["early"]
    assert prep["target_length"] == meta["prep"]["early"]["length"]
    assert prep["scaling"] == meta["prep"]["early"]["scaling"] and len(prep["scaling"]["scale"]) == 69
    assert "visual frames to its acoustic frame count" in sidecar["early_input"]
    assert "feature_spec" in sidecar and sidecar["feature_spec"] == meta.get("feature_spec")
    assert sidecar["check"]["max_abs_diff"] < 1e-5


@pytest.mark.slow
def test_late_sidecar_holds_both_members_and_the_fitted_stacker(runs, tmp_path):
    run_dir = runs["late"]
    sidecar = export.export(run_dir, "torchscript", tmp_path / "late.pt")
    late = json.loads((run_dir / "late.json").read_text())
    assert sidecar["late"]["combiner"] == "stacking"
    assert sidecar["late"]["stacker"]["coef"] == late["stacker"]["coef"]
    assert set(sidecar["late"]["members"]) == {"acoustic", "visual"}
    member = sidecar["late"]["members"]["visual"]
    meta = load_checkpoint(run_dir / "visual" / "checkpoint.pt")
    assert member["preprocessing"]["visual"]["scaling"] == meta["prep"]["visual"]["scaling"]


@pytest.mark.parametrize(("t_a", "t_v"), [(80, 16), (26, 8), (7, 1), (1, 5), (1, 1), (12, 12), (5, 9)])
def test_in_graph_early_fusion_gives_the_very_numbers_of_fusion_early_fuse(t_a, t_v):
    rng = np.random.default_rng(t_a * 100 + t_v)
    a = rng.standard_normal((t_a, 3)).astype(np.float32)
    v = rng.standard_normal((t_v, 2)).astype(np.float32)
    expected = align.early_fuse(a, v)
    # padded to more frames than either clip, with another (longer) clip in the batch
    xa = torch.zeros(2, 90, 3)
    xv = torch.full((2, 20, 2), 1e6)
    xa[0, :t_a], xv[0, :t_v] = torch.from_numpy(a), torch.from_numpy(v)
    xa[1, :90], xv[1, :20] = torch.randn(90, 3), torch.randn(20, 2)
    fused, lengths = preprocess_graph.EarlyFuse()(xa, torch.tensor([t_a, 90]), xv, torch.tensor([t_v, 20]))
    assert lengths.tolist() == [t_a, 90]
    assert np.array_equal(fused[0, :t_a].numpy(), expected)


@pytest.mark.parametrize("kind", ["none", "standard", "per_clip"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_in_graph_zero_frame_skipping_gives_the_frames_preprocess_gives(kind, fmt, tmp_path):
    needs(fmt)
    rng = np.random.default_rng(0)
    clips = [rng.standard_normal((n, 3)).astype(np.float32) for n in (9, 14, 4, 6)]
    clips[0][[0, 3, 4, 8]] = 0.0  # zero frames at the start, inside and at the end
    clips[1][[2, 11, 12]] = 0.0  # 11 and 12 lie past the cut: dropped by the cut, not the skip
    clips[2][:] = 0.0  # nothing but zero frames: keeps its first
    clips[3][1, 0] = 0.0  # a zero feature is not a zero frame
    scaler = None if kind == "none" else scaling.fit(kind, clips)
    prep = sequences.StreamPrep(sequences.TargetLength(10), scaler, skip_zero_frames=True)
    expected = prep.apply(clips)
    assert expected.lengths.tolist() == [5, 9, 1, 6]
    x, lengths = padded(clips, fill=7.0)  # garbage (not zeros) in the padding
    graph = preprocess_graph.StreamPreprocess(prep).eval()
    example = (torch.from_numpy(x), torch.from_numpy(lengths))
    if fmt == "onnx":
        import onnxruntime

        path = tmp_path / "prep.onnx"
        with torch.no_grad():
            torch.onnx.export(
                graph,
                example,
                str(path),
                dynamo=False,
                input_names=["x", "lengths"],
                output_names=["frames", "out_lengths"],
                dynamic_axes={"x": {0: "batch", 1: "time"}, "lengths": {0: "batch"}},
                opset_version=export.OPSET,
            )
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        frames, out_lengths = session.run(None, {"x": x, "lengths": lengths})
    else:
        with torch.no_grad():
            frames, out_lengths = (t.numpy() for t in torch.jit.trace(graph, example)(*example))
    assert out_lengths.tolist() == [5, 9, 1, 6]
    for i, n in enumerate(out_lengths.tolist()):
        np.testing.assert_allclose(frames[i, :n], expected.clip(i), atol=1e-6)
        assert not frames[i, n:].any(), "zeros past each clip's new length"


@pytest.mark.slow
def test_missing_export_extra_is_one_line_naming_it(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    with pytest.raises(SystemExit) as exit_info:
        export_cli.main([str(runs["acoustic"]), "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    hint = "pip install 'mer-cli[export]'"
    assert line == f"mer-export: error: --format onnx needs onnx and onnxruntime: {hint}"
    assert list(tmp_path.iterdir()) == []


def test_a_directory_without_a_run_is_one_line_and_writes_nothing(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export_cli.main([str(tmp_path), "--format", "torchscript", "--out", str(tmp_path / "m.pt")])
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("mer-export: error: ") and "no checkpoint.pt" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_mer_export_console_script_writes_the_file_and_says_what_it_takes(runs, tmp_path):
    # as the console script runs: entry.export() -> export_cli.main(), arguments from sys.argv
    out = tmp_path / "acoustic.pt"
    argv = [str(runs["acoustic"]), "--format", "torchscript", "--out", str(out)]
    proc = run_main("export", *argv, guarded=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"wrote {out} (torchscript) and {out}.json: acoustic, inputs acoustic")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acoustic.pt", "acoustic.pt.json"]
    with torch.no_grad():
        prob = torch.jit.load(str(out))(torch.zeros(2, 30, 52), torch.tensor([30, 11]))
    assert prob.shape == (2, 6) and torch.allclose(prob.sum(dim=1), torch.ones(2))

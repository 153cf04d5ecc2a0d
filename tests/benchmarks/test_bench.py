"""mer-bench (make bench-train), quick: the real training path, every documented field written."""

import json
import math
import subprocess
import sys

import bench  # benchmarks/bench.py (pytest's pythonpath)
import pytest
import torch

from conftest import REPO


@pytest.mark.slow
def test_quick_bench_writes_one_complete_json_row_per_configuration(tmp_path, capsys):
    out = tmp_path / "bench.jsonl"
    bench.main(["--quick", "--precision", "fp32", "bf16", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["shape"], r["model"], r["precision"]) for r in rows] == [
        ("visual", "bilstm", "fp32"),
        ("visual", "bilstm", "bf16"),
    ]
    for row in rows:
        assert set(bench.FIELDS) <= set(row)
        assert (row["T"], row["D"], row["hidden"], row["device"]) == (105, 17, [64, 32], "cpu")
        assert row["train_clips_per_s"] > 0 and row["infer_clips_per_s"] > 0
        assert math.isclose(row["epoch_s_est"], 5000 / row["train_clips_per_s"], rel_tol=0.01)
        assert math.isfinite(row["loss_last"]) and row["peak_rss_mib"] > 0
        assert 0.4 <= row["mean_len_frac"] <= row["computed_len_frac"] <= 1.0
    assert "train/s" in capsys.readouterr().out  # the table


def test_flops_match_the_peer_formula():
    # peer_keras.model_flops(356, 52, 512, 256, 6): 2*T*2*(d+h)*4h per layer + the dense head
    layer1 = 2 * 356 * 2 * (52 + 512) * 4 * 512
    layer2 = 2 * 356 * 2 * (1024 + 256) * 4 * 256
    head = 2 * (2 * 256 * 512 + 512 * 512 + 512 * 6)
    assert bench.forward_flops(356, 52, [512, 256], 512, 6) == layer1 + layer2 + head


def test_generated_clips_are_zero_after_their_length():
    data = bench.make_set(50, 100, 3, seed=0)
    assert data.lengths.min() >= 40 and data.lengths.max() <= 100
    padded = data.streams[bench.STREAM].pad(torch.arange(50), 100)
    for x, n in zip(padded, data.lengths, strict=True):
        assert x[n:].abs().sum() == 0 and x[n - 1].abs().sum() > 0


FAKE_PEER = """
import json, sys
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
print("some log line")
print(json.dumps({"shape": args["--shape"], "hidden": args["--hidden"], "train_samples_per_s": 10.0,
                  "infer_samples_per_s": 40.0, "epoch_s_est": 500.0, "versions": {"tensorflow": "fake"}}))
"""


@pytest.mark.slow
def test_side_by_side_divides_our_speed_by_the_peers_within_each_round(tmp_path):
    peer = tmp_path / "peer.py"
    peer.write_text(FAKE_PEER)
    out = tmp_path / "peer.jsonl"
    argv = ["--quick", "--peer-python", sys.executable, "--peer-script", str(peer), "--shape", "visual"]
    bench.main([*argv, "--model", "bilstm", "--precision", "fp32", "--rounds", "2", "--out", str(out)])
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert (row["shape"], row["model"], row["precision"], row["rounds"]) == ("visual", "bilstm", "fp32", 2)
    assert row["peer_train_clips_per_s"] == 10.0 and row["peer_versions"] == {"tensorflow": "fake"}
    assert len(row["train_ratios"]) == 2
    # the median of two rounds; both it and the per-round ratios are rounded to 0.01
    assert math.isclose(row["train_ratio"], sum(row["train_ratios"]) / 2, abs_tol=0.011)
    assert math.isclose(row["infer_ratio"], row["infer_clips_per_s"] / 40.0, rel_tol=0.05)


# the in-repo Keras peer (benchmarks/peer_keras.py) and the arguments/JSON that mer-bench exchanges with it

FAKE_PYTHON = """#!{python}
# stands in for the TensorFlow venv's python: parses the real peer's command line with the peer's
# own parser (an unknown argument exits 2), then prints the row the peer's own summarize builds
import importlib.util, json, sys
script, argv = sys.argv[1], sys.argv[2:]
spec = importlib.util.spec_from_file_location("peer_keras", script)
peer = importlib.util.module_from_spec(spec)
spec.loader.exec_module(peer)
args = peer.parse_args(argv)
with open({log!r}, "a") as log:
    log.write(json.dumps({{"script": script, "argv": argv, "hidden": args.hidden}}) + "\\n")
versions = {{"versions": {{"tensorflow": "none"}}}}
print(json.dumps(peer.summarize(args, [0.5, 0.25, 0.5], [0.25], 50.0, versions)))
"""


def test_peer_help_needs_no_tensorflow():
    code = (
        "import runpy, sys\n"
        f"sys.argv = [{str(bench.PEER_SCRIPT)!r}, '--help']\n"
        "try:\n"
        f"    runpy.run_path({str(bench.PEER_SCRIPT)!r}, run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "print('imported:', sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "--train-batches" in proc.stdout and "--hidden" in proc.stdout
    assert "imported: []" in proc.stdout


@pytest.mark.slow
def test_mer_bench_runs_the_in_repo_peer_with_arguments_it_accepts(tmp_path):
    assert bench.PEER_SCRIPT == REPO / "benchmarks" / "peer_keras.py" and bench.PEER_SCRIPT.is_file()
    log = tmp_path / "peer_calls.jsonl"
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON.format(python=sys.executable, log=str(log)))
    python.chmod(0o755)
    out = tmp_path / "peer.jsonl"
    # no --peer-script: the default must be the repository's script, wherever the cwd is
    argv = ["--quick", "--peer-python", str(python), "--shape", "visual", "--model", "bilstm"]
    bench.main([*argv, "--precision", "fp32", "--rounds", "1", "--no-table", "--out", str(out)])
    (call,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert call["script"] == str(REPO / "benchmarks" / "peer_keras.py")
    assert call["hidden"] == [64, 32]  # configs/model/bilstm.yaml, passed as --hidden 64,32
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    # batch 128 over the median step of 0.5 s; inference 128 / 0.25 s
    assert (row["peer_train_clips_per_s"], row["peer_infer_clips_per_s"]) == (256.0, 512.0)
    assert row["peer_versions"] == {"tensorflow": "none"}


def test_mer_bench_names_a_missing_peer_script(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(["--peer-python", sys.executable, "--peer-script", "no/such/peer.py"])
    assert exit_info.value.code == 2
    assert "no/such/peer.py: no such file" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_bench_runs_the_other_encoders_with_their_own_flop_counts(tmp_path):
    out = tmp_path / "bench.jsonl"
    bench.main(["--quick", "--model", "gru", "transformer", "tcn", "--precision", "fp32", "--out", str(out)])
    rows = {r["model"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert list(rows) == ["gru", "transformer", "tcn"]
    for row in rows.values():
        assert set(bench.FIELDS) <= set(row) and row["train_clips_per_s"] > 0
        assert row["train_gflop_per_clip_padded"] > row["train_gflop_per_clip_useful"] > 0
        assert row["frac_of_peak"] > 0 and math.isfinite(row["loss_last"])
    assert rows["gru"]["masking"] == "reverse" and rows["tcn"]["masking"] is None
    # a GRU: 3 gates where the LSTM has 4 (the padded clip's FLOPs, per training step = 3 forwards)
    assert rows["gru"]["train_gflop_per_clip_padded"] == round(
        3 * bench.forward_flops(105, 17, [64, 32], 128, 6, 3) / 1e9, 4
    )


def test_counted_flops_agree_with_the_formula_and_include_attention():
    from mer_cli.runs.trained import build_model

    def model(name):
        cfg = bench.model_config(name)
        return build_model(cfg, {bench.STREAM: 17}, 6), cfg

    gru, cfg = model("gru")  # the counter sees the GRU's matmuls: it must agree with the formula
    assert bench.counted_forward_flops(gru, 50, 17) == bench.forward_flops(50, 17, [64, 32], 128, 6, gates=3)
    assert bench.flops_function(gru, cfg, 17)(50) == bench.forward_flops(50, 17, [64, 32], 128, 6, gates=3)
    transformer, _ = model("transformer")
    # attention is quadratic in frames: the rest is linear, so doubling adds more than twice
    f50, f100 = (bench.counted_forward_flops(transformer, t, 17) for t in (50, 100))
    head = 2 * (64 * 128 + 128 * 128 + 128 * 6)
    attention = 2 * 2 * 2 * 64 * (100**2 - 2 * 50**2)  # 2 layers x (QK^T, AV) x 2 FLOPs/MAC x width
    assert f100 - 2 * f50 == attention - head


@pytest.mark.slow
def test_quick_inference_bench_times_the_exported_graph_in_torch_and_onnxruntime(tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason="the export extra is not installed")
    out = tmp_path / "inference.jsonl"
    bench.main(["--inference", "--quick", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["shape"], r["model"], r["runtime"]) for r in rows] == [
        ("visual", "bilstm", "torch"),
        ("visual", "bilstm", "onnxruntime"),
    ]
    for row in rows:
        assert set(bench.INFER_FIELDS) <= set(row) and row["mode"] == "inference"
        assert (row["T"], row["D"], row["batch"], row["latency_frames"]) == (105, 17, 4, 74)
        assert 0 < row["latency_p50_ms"] <= row["latency_p99_ms"] and row["throughput_clips_per_s"] > 0
        assert row["max_abs_diff"] < 1e-5  # both runtimes compute the same probabilities
    assert (
        rows[0]["params"]
        == rows[1]["params"]
        == sum(p.numel() for p in bench.build("bilstm", 17, "config")[0].parameters())
    )
    assert "clips/s" in capsys.readouterr().out  # the table


def test_inference_bench_defaults_to_the_default_and_notebook_models_at_batch_64():
    args = bench.parse_args(["--inference"])
    assert (args.model, args.shape, args.infer_batch) == (["bilstm", "bilstm_notebook"], ["early"], 64)


def test_inference_bench_without_the_export_extra_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--inference", "--quick", "--out", str(tmp_path / "x.jsonl")])
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == "mer-bench: error: --inference needs onnx and onnxruntime: pip install 'mer-cli[export]'"
    assert not (tmp_path / "x.jsonl").exists()

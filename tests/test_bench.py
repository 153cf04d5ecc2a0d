"""make bench's quick mode runs the real training path and writes every documented field."""

import json
import math
import sys

from mer_cli import bench


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
    for x, n in zip(data.x, data.lengths, strict=True):
        assert x[n:].abs().sum() == 0 and x[n - 1].abs().sum() > 0


FAKE_PEER = """
import json, sys
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
print("some log line")
print(json.dumps({"shape": args["--shape"], "hidden": args["--hidden"], "train_samples_per_s": 10.0,
                  "infer_samples_per_s": 40.0, "epoch_s_est": 500.0, "versions": {"tensorflow": "fake"}}))
"""


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

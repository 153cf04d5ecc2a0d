"""make bench's quick mode runs the real training path and writes every documented field."""

import json
import math

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

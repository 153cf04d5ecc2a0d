"""mer-bench --reference: one row per encoder x fusion, mer-cli's speed over its reference's."""

import json

import bench  # benchmarks/bench.py (pytest's pythonpath)
import bench_reference
import pytest
import torch


@pytest.mark.slow
def test_quick_reference_rows_compare_the_same_function(tmp_path, capsys):
    out = tmp_path / "ref.jsonl"
    threads = torch.get_num_threads()
    try:  # one thread: two spinning OpenMP threads on a busy 2-core machine run many times slower
        argv = [
            "--reference",
            "--quick",
            "--precision",
            "fp32",
            "--fusion",
            "early",
            "xattn",
            "--threads",
            "1",
        ]
        bench.main([*argv, "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["fusion"], r["model"], r["precision"]) for r in rows] == [
        ("early", "bilstm", "fp32"),
        ("xattn", "bilstm", "fp32"),
    ]
    for row in rows:
        assert set(bench_reference.FIELDS) <= set(row)
        assert row["max_abs_diff"] < 1e-4  # the same weights give the same logits
        for side in ("train", "infer"):
            ratios = row[f"{side}_ratios"]
            assert len(ratios) == row["rounds"] == 2
            assert row[f"{side}_ratio"] == pytest.approx(
                sorted(ratios)[0] / 2 + sorted(ratios)[1] / 2, abs=1e-3
            )
        assert row["padding_waste"] >= 0
    assert rows[0]["frac_of_peak"] > 0 and rows[1]["frac_of_peak"] is None  # one stream only
    assert "x train" in capsys.readouterr().out  # the table


def test_streams_of_one_clip_share_its_duration():
    data = bench_reference.make_streams(200, "joint", seed=0)
    acoustic, visual = (data.streams[s].lengths.float() for s in ("acoustic", "visual"))
    assert acoustic.max() <= 356 and visual.max() <= 105
    assert ((visual - acoustic * 105 / 356).abs() <= 0.5).all()

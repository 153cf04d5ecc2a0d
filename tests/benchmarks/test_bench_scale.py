"""make bench-scale's script at toy size: it generates, trains one epoch and reports real numbers."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import REPO, run


@pytest.mark.slow
def test_bench_scale_quick_reports_memory_first_batch_and_epoch_time(tmp_path):
    out = tmp_path / "bench-scale.jsonl"
    script = REPO / "benchmarks" / "bench_scale.py"
    argv = [sys.executable, str(script), "--quick", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    result = run(argv, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr + result.stdout
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["clips"] == 216 and row["actors"] == 3
    assert 100 < row["peak_rss_mib"] < 4096  # a python + torch process, far below the 4 GiB target
    assert 0 < row["first_batch_s"] < row["wall_s"]
    assert 0 < row["epoch_s"] < row["wall_s"]
    assert 0 <= row["test_f1_macro"] <= 1
    assert "| 216 |" in result.stdout
    # the dataset was generated into the given cache, in the native format
    (cached,) = (tmp_path / "cache").iterdir()
    assert (cached / "dataset.json").is_file() and (cached / "train" / "mfcc.npy").is_file()

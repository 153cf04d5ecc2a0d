"""make bench's one table: each figure against its target, and the default run's padding."""

import argparse

import bench_summary  # benchmarks/bench_summary.py (pytest's pythonpath)
import pytest
import torch

from mer_cli.training import batching

INFO = {
    "cpu": "Test CPU",
    "cores": 2,
    "memory": "24.0 GiB",
    "python": "3.11",
    "torch": "2.13",
    "numpy": "2.4",
    "torch_threads": 2,
    "OMP_NUM_THREADS": None,
    "OMP_WAIT_POLICY": "PASSIVE",
    "malloc": "tuned",
    "load_average": 0.5,
    "load_average_end": 0.7,
    "time_utc": "2026-12-07T00:00:00Z",
    "wall_s": 12.0,
}


def row_of(text: str, start: str) -> list[str]:
    (line,) = [line for line in text.splitlines() if line.startswith(f"| {start}")]
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_each_figure_is_judged_against_its_target():
    rows = [
        {"part": "peaks", "fp32": 190.0, "bf16": 410.0},
        {
            "part": "train",
            "model": "bilstm_notebook",
            "precision": "bf16",
            "frac_of_peak": 0.51,
            "train_clips_per_s": 23.0,
            "infer_clips_per_s": 108.0,
            "padding_waste": 0.181,
        },
        {"part": "padding", "length_groups": 5, "padding_waste": 0.046},
        {
            "part": "reference",
            "model": "tcn",
            "train_ratio": 1.3,
            "train_clips_per_s": 650.0,
            "ref_train_clips_per_s": 500.0,
            "infer_ratio": 0.97,
            "infer_clips_per_s": 2900.0,
            "ref_infer_clips_per_s": 3000.0,
        },
        {"part": "sweep", "sweep_speedup": 1.52, "sequential_s": 152.0, "joblib_s": 100.0, "epochs": 10},
        {
            "part": "features",
            "kind": "backend",
            "backend": "audio/mfcc",
            "model": "-",
            "clips_per_s": 110.3,
            "peak_rss_mib": 242.0,
        },
        {
            "part": "features",
            "kind": "ingest",
            "backends": "mfcc + openface",
            "clips": [8, 32],
            "peak_rss_mib": [427.0, 480.0],
            "ratio": 1.124,
            "target": 1.1,
        },
    ]
    text = bench_summary.table(rows, INFO)
    assert text.splitlines()[0] == "machine: Test CPU, 2 cores, 24.0 GiB; python 3.11, torch 2.13, numpy 2.4"
    assert "OMP_WAIT_POLICY=PASSIVE" in text.splitlines()[1]
    assert row_of(text, "bf16 training, notebook")[1:] == [
        "51.0% (23.0 train, 108.0 infer clips/s)",
        ">= 85%",
        "NOT met",
    ]
    assert row_of(text, "padding waste, the bench's")[1:] == ["18.1%", "<= 5%", "NOT met"]
    assert row_of(text, "padding waste, the default run's batches, length_groups=5")[2:] == ["<= 5%", "met"]
    assert row_of(text, "tcn train")[1:] == ["1.300x (650.0 vs 500.0 clips/s)", ">= 1x", "met"]
    assert row_of(text, "tcn infer")[3] == "NOT met"
    assert row_of(text, "2-job joblib sweep")[1:] == ["1.52x (152 s vs 100 s, 10 epochs)", ">= 1.4x", "met"]
    assert row_of(text, "extraction, audio/mfcc")[1] == "110.3 clips/s, peak RSS 242 MiB"
    assert row_of(text, "mer-ingest peak RSS, mfcc + openface: 8 vs 32 clips")[1:] == [
        "427 -> 480 MiB (1.124x)",
        "<= 1.1x",
        "NOT met",
    ]


@pytest.mark.slow
def test_padding_part_measures_the_default_runs_own_batches():
    # --quick: the smoke run's data through mer-train's loading; groups cut the waste it reports
    args = argparse.Namespace(quick=True)
    one, five = bench_summary.padding_rows(args)
    assert (one["length_groups"], five["length_groups"]) == (1, 5)
    assert 0 < five["padding_waste"] < one["padding_waste"] < 1
    # independently: 20 epochs of the same settings' batches, counted frame by frame
    lengths = torch.randint(50, 300, (one["clips"],))
    settings = bench_summary.loop.Settings(batch_size=one["batch"])
    waste = batching.epoch_padding_waste(lengths, settings, 300, seed=0, epochs=2)
    generator = torch.Generator().manual_seed(0)
    computed = real = 0
    for _ in range(2):
        for b in batching.batch_indices(lengths, settings.batch_size, generator, True, 8, 0.15):
            longest = int(lengths[b].max())
            computed += len(b) * min(300, -(-longest // 8) * 8)
            real += int(lengths[b].sum())
    assert waste == pytest.approx(computed / real - 1)

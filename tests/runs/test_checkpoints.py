"""Checkpoints written by earlier versions still load and predict exactly as when they were written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import FORMAT_1_RUN
from mer_cli.core.artifacts import load_checkpoint, save_checkpoint
from mer_cli.core.errors import MerError
from mer_cli.runs import trained, upgrade
from mer_cli.runs.evaluate import evaluate_run

# an early-fusion smoke run (data=synthetic, limit 48 clips per split, fp32) trained by mer-cli
# 0.1.0, before encoders and heads were separate: checkpoint format 1, streams "mfcc"/"aus"/"early"


@pytest.mark.slow
def test_a_format_1_checkpoint_reevaluates_to_the_metrics_it_was_trained_with(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FORMAT_1_RUN, run)
    assert load_checkpoint(run / "checkpoint.pt")["format"] == 1
    _, metrics = evaluate_run(run, None, ("val", "test"), save_plots=False)
    trained = json.loads((run / "metrics.json").read_text())
    for split in ("val", "test"):  # every metric it recorded; metrics added since come on top
        assert {k: metrics[split][k] for k in trained[split]} == trained[split], split
        assert {"ece", "brier", "nll"} <= set(metrics[split])


def test_an_unknown_checkpoint_format_is_refused_with_one_line(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FORMAT_1_RUN, run)
    state = load_checkpoint(run / "checkpoint.pt")
    save_checkpoint(run / "checkpoint.pt", {**state, "format": 99})
    try:
        trained.load_trained(run)
    except MerError as e:
        assert str(e) == (
            f"{run / 'checkpoint.pt'}: checkpoint format 99 is not supported (this mer-cli reads "
            f"formats 1 to {upgrade.CHECKPOINT_FORMAT})"
        )
    else:
        raise AssertionError("format 99 was accepted")


def test_upgrading_format_1_keeps_every_weight():
    old = load_checkpoint(FORMAT_1_RUN / "checkpoint.pt")
    new = upgrade.checkpoint(old, FORMAT_1_RUN / "checkpoint.pt")
    assert (new["modality"], new["streams"]) == ("early", ["acoustic", "visual"])
    assert sorted(new["model"]) == sorted(
        f"encoder.{k}" if k.startswith("lstms.") else k for k in old["model"]
    )
    for k, v in old["model"].items():
        assert torch.equal(new["model"].get(k, new["model"].get(f"encoder.{k}")), v), k

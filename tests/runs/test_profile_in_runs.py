"""The data profile in a run: profile.json, the log block and its warnings, data.max_frames in
the checkpoint, the choice in metrics.json, +profile_only=true (nothing trained), identity."""

from __future__ import annotations

import json
import logging

import pytest

from conftest import compose_train, run_cli, smoke_config
from mer_cli.core.artifacts import load_checkpoint
from mer_cli.runs import execute, identity


@pytest.mark.slow
def test_a_run_cuts_at_data_max_frames_and_records_the_profile_of_its_training_data(tmp_path, caplog):
    run = tmp_path / "run"
    cfg = compose_train(
        "experiment=smoke", "modality=acoustic", "data.max_frames=7", "runtime.save_plots=false"
    )
    with caplog.at_level(logging.INFO, logger="mer_cli"):
        metrics = execute.run(cfg, run)
    written = json.loads((run / "profile.json").read_text())
    acoustic = written["streams"]["acoustic"]
    assert (acoustic["target_length"], acoustic["length_rule"]) == (7, "data.max_frames=7")
    assert acoustic["n_clips"] == 48 and acoustic["n_features"] == 52
    assert acoustic["scaling"] == {
        "setting": "auto",
        "kind": "standard",
        "reason": acoustic["scaling"]["auto_reason"],
        "auto": "standard",
        "auto_reason": acoustic["scaling"]["auto_reason"],
    }
    assert written["classes"]["counts"]["train"] == [8] * 6
    assert load_checkpoint(run / "checkpoint.pt")["prep"]["acoustic"]["length"] == 7
    assert metrics["run"]["preprocessing"]["acoustic"]["scaling"] == "standard"
    assert metrics["run"]["preprocessing"]["acoustic"]["frames_cut"] == pytest.approx(acoustic["frames_cut"])
    blocks = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data profile")]
    assert len(blocks) == 1 and "acoustic: target length 7 frames (data.max_frames=7)" in blocks[0]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        w.startswith("acoustic: the target length of 7 frames (data.max_frames=7) cuts 9") for w in warnings
    )


@pytest.mark.slow
def test_profile_only_prints_the_profile_and_writes_no_run(tmp_path):
    run = tmp_path / "run"
    proc = run_cli("train", "experiment=smoke", "modality=late", "+profile_only=true", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr
    assert "data profile of the training split (synthetic" in proc.stdout
    for stream in ("acoustic", "visual"):  # late fusion: both members' streams
        assert f"{stream}: scaling standard: auto: neither" in proc.stdout
    assert not run.exists()  # no checkpoint, no run directory left behind


def test_data_max_frames_is_part_of_a_models_identity_and_older_runs_used_auto():
    default = smoke_config()
    before = json.loads(json.dumps(default))
    del before["data"]["max_frames"]
    assert identity.model_identity(before) == identity.model_identity(default)
    assert identity.differences(
        identity.model_identity(default), identity.model_identity(smoke_config("data.max_frames=7"))
    ) == ["data.max_frames: 'auto' -> 7"]
    assert identity.model_identity(smoke_config("+profile_only=false")) == identity.model_identity(default)
    # auto is a setting of its own: a run recorded with standard stays the model it was
    assert identity.differences(
        identity.model_identity(default), identity.model_identity(smoke_config("preprocess.scaling=standard"))
    ) == ["preprocess.scaling: 'auto' -> 'standard'"]

"""The requeue path without a cluster: a submitit_local job sent SIGUSR2 (what Slurm sends
signal_delay_s before a time limit) is requeued by submitit and continues from last.pt to the
metrics of an uninterrupted run. In the integration suite beside its real-Slurm twin
(test_slurm_sweeps.py), and like it run by `make test-integration`; it needs no service, so it also
runs where Slurm cannot be installed."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from conftest import main_command, run_main, start, wait_for

pytestmark = pytest.mark.integration

SMOKE = ("experiment=smoke", "data.limit_per_split=24", "runtime.save_plots=false", "compare.enabled=false")


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the job's process in /proc")
def test_a_submitit_local_job_signalled_before_its_time_limit_is_requeued_and_continues(tmp_path):
    args = (
        *SMOKE,
        "modality=visual",
        "runtime.num_threads=1",
        "trainer.loop.max_epochs=20",
        "trainer.loop.patience_epochs=20",
    )
    whole = run_main("train", *args, f"hydra.run.dir={tmp_path / 'whole'}", guarded=True)
    assert whole.returncode == 0, whole.stderr

    sweep_dir = tmp_path / "sweep"
    job_dir = sweep_dir / "0_visual_seed0"
    proc = start(
        main_command(
            "train",
            "-m",
            "hydra/launcher=submitit_local",
            *args,
            f"hydra.sweep.dir={sweep_dir}",
            guarded=True,
        )
    )
    try:
        wait_for(proc, job_dir / "last.pt")
        # the job's process: the child of submitit's controller, whose pid is the job id
        (controller,) = (int(p.name) for p in (sweep_dir / ".submitit").iterdir() if p.name.isdigit())
        (task,) = _children(controller)
        os.kill(task, signal.SIGUSR2)  # what SLURM sends signal_delay_s before the time limit
        _, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr

    log = (job_dir / "train.log").read_text()
    assert "resuming from" in log  # continued, not started over
    assert "resume=auto" in (job_dir / ".hydra" / "overrides.yaml").read_text()
    resumed = json.loads((job_dir / "metrics.json").read_text())
    reference = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert resumed["run"]["epochs_trained"] == 20
    assert resumed["val"] == reference["val"]
    assert resumed["test"] == reference["test"]

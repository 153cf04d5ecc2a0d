"""A sweep's SLURM jobs as squeue shows them, and a job lost without a result in the report."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from conftest import compose_train
from mer_cli.reporting.collect import collect
from mer_cli.runs import execute
from mer_cli.sweeps import cluster


def squeue_answering(stdout: str, returncode: int = 0, stderr: str = ""):  # type: ignore[no-untyped-def]
    asked: list[list[str]] = []

    def run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        asked.append(list(argv))
        return subprocess.CompletedProcess(list(argv), returncode, stdout, stderr)

    return run, asked


def test_job_states_reads_one_line_per_array_task_and_marks_forgotten_jobs():
    run, asked = squeue_answering("7_0 COMPLETED\n7_1 RUNNING\n")
    states = cluster.job_states(["7_0", "7_1", "7_2"], run)
    assert states == {"7_0": "COMPLETED", "7_1": "RUNNING", "7_2": cluster.FORGOTTEN}
    assert "--jobs=7_0,7_1,7_2" in asked[0] and "--array" in asked[0]  # one line per task


def test_a_failing_squeue_is_asked_again_but_an_invalid_job_id_means_forgotten():
    busy, _ = squeue_answering("", 1, "slurm_load_jobs error: Socket timed out")
    assert cluster.job_states(["7_0"], busy) is None
    gone, _ = squeue_answering("", 1, "slurm_load_jobs error: Invalid job id specified")
    assert cluster.job_states(["7_0"], gone) == {"7_0": cluster.FORGOTTEN}


def test_only_states_that_never_run_again_have_ended():
    assert [cluster.has_ended(s) for s in ("CANCELLED", "CANCELLED+", "TIMEOUT", cluster.FORGOTTEN)] == [
        True
    ] * 4
    assert not any(cluster.has_ended(s) for s in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING", None))


def test_a_lost_job_is_a_failed_run_of_the_report(tmp_path: Path):
    log_file = tmp_path / ".submitit" / "7_1" / "7_1_0_log.err"
    cluster.record_lost_job(tmp_path / "1_visual_seed0", "7_1", "CANCELLED", log_file, "visual", 0)
    runs, failures = collect([tmp_path])
    assert runs == []
    (failure,) = failures
    assert (failure.modality, failure.seed) == ("visual", 0)
    assert failure.error == f"SLURM job 7_1 ended CANCELLED without finishing its run (its log: {log_file})"


@pytest.mark.slow
def test_a_lost_job_rerun_to_its_end_is_a_run_of_the_report_no_longer_a_failure(tmp_path: Path):
    job_dir = tmp_path / "0_visual_seed0"
    log_file = tmp_path / ".submitit" / "7_0" / "7_0_0_log.err"
    cluster.record_lost_job(job_dir, "7_0", "TIMEOUT", log_file, "visual", 0)
    # the rerun of the sweep (resume=auto) trains the job in the same directory
    execute.run(compose_train("experiment=smoke", "modality=visual", "runtime.save_plots=false"), job_dir)
    assert not (job_dir / "failed.json").exists()
    runs, failures = collect([tmp_path])
    assert failures == [] and [r.path for r in runs] == [job_dir.resolve()]

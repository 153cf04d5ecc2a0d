"""What became of a sweep's SLURM jobs, asked of ``squeue`` (which every cluster has: ``sacct``
needs an accounting database), and the job that ended without a result recorded for the report.

Input: a job id (``1234`` or an array task ``1234_5``), the job's result file. Output: its state
(`job_state`), whether it is over (`has_ended`), and ``failed.json`` in the job's run directory
(`record_lost_job`) naming the job, its state and its log, so the comparison report lists the
run as missing and compares the others.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

from mer_cli.core.artifacts import write_json

# squeue's states of a job that will not run again (a requeued job is PENDING, then RUNNING)
ENDED_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "REVOKED",
        "SPECIAL_EXIT",
        "TIMEOUT",
    }
)
# the state of a job squeue no longer lists: slurmctld forgets ended jobs after MinJobAge
FORGOTTEN = "FORGOTTEN (no longer in squeue)"

Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


def run_squeue(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=60)


def job_states(job_ids: Sequence[str], run: Runner = run_squeue) -> dict[str, str] | None:
    """Each job's SLURM state (``RUNNING``, ``CANCELLED``, ...), `FORGOTTEN` for one slurmctld
    no longer knows; None when squeue itself failed (the controller busy: ask again later)."""
    done = run(
        ["squeue", "--noheader", "--array", "--states=all", f"--jobs={','.join(job_ids)}", "--format=%i %T"]
    )
    if done.returncode != 0 and "invalid job id" not in done.stderr.lower():  # (all forgotten)
        return None
    listed = dict(line.split()[:2] for line in done.stdout.splitlines() if len(line.split()) >= 2)
    return {j: listed.get(j, FORGOTTEN) for j in job_ids}


def has_ended(state: str | None) -> bool:
    """Whether a job in ``state`` (from `job_state`) is over for good."""
    return state == FORGOTTEN or (state is not None and state.split()[0].rstrip("+") in ENDED_STATES)


def record_lost_job(
    job_dir: Path, job_id: str, state: str, log_file: Path, modality: str | None, seed: int | None
) -> Path:
    """``failed.json`` in ``job_dir`` for a job that ended without a result (cancelled, killed
    by the node, out of time and not requeued): the report lists it among the failed runs."""
    error = f"SLURM job {job_id} ended {state} without finishing its run (its log: {log_file})"
    info = {"modality": modality, "seed": seed, "error": error, "traceback": None, "slurm_job_id": job_id}
    job_dir.mkdir(parents=True, exist_ok=True)
    path = job_dir / "failed.json"
    write_json(path, info)
    return path

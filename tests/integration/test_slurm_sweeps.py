"""mer-train sweeps through a real one-node Slurm cluster (hydra/launcher=submitit_slurm): a
sweep end to end with its report, a job signalled before its time limit that is requeued and
continues from last.pt to the numbers of an uninterrupted run, a cancelled job the report names."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from slurm_cluster import VENV_PYTHON, Cluster, slurm_fixture  # noqa: F401  (the fixture `slurm`)

from conftest import cli_env, main_command, run_main

pytestmark = pytest.mark.integration

# tiny runs: seconds each on one core
SMOKE = ("experiment=smoke", "data.limit_per_split=24", "runtime.save_plots=false")


def slurm_args(cluster: Cluster, sweep_dir: Path, timeout_min: int = 5) -> tuple[str, ...]:
    """The launcher preset, sized for this node: no GPU, one core and 1 GB per job."""
    return (
        "hydra/launcher=submitit_slurm",
        "hydra.launcher.gpus_per_node=0",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=1",
        f"hydra.launcher.timeout_min={timeout_min}",
        f"hydra.launcher.partition={cluster.partition}",
        f"hydra.sweep.dir={sweep_dir}",
    )


def sweep_command(*args: str) -> list[str]:
    """mer-train as its console script, on the interpreter the jobs run (it submits them with
    its own sys.executable)."""
    return [str(VENV_PYTHON), *main_command("train", "-m", *args, guarded=True)[1:]]


def start_sweep(cluster: Cluster, log: Path, *args: str) -> subprocess.Popen[str]:
    """The sweep in the background, its output (Hydra logs to stdout, errors to stderr) in ``log``."""
    with log.open("w") as out:
        return subprocess.Popen(
            sweep_command(*args),
            env=cli_env({"SLURM_CONF": cluster.env["SLURM_CONF"]}),
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )


def job_ids(sweep_dir: Path) -> list[str]:
    """The jobs submitit submitted: its folder holds one folder each, named by the job id
    (``<array job>_<task>``; a sweep of one job is a plain job)."""
    folder = sweep_dir / ".submitit"
    named = (
        [p.name for p in folder.iterdir() if p.is_dir() and p.name[:1].isdigit()] if folder.is_dir() else []
    )
    tasks = [n for n in named if "_" in n]
    return sorted(tasks or named)


def metrics_of(job_dir: Path) -> dict:
    return json.loads((job_dir / "metrics.json").read_text())


def test_a_sweep_runs_through_slurm_and_reports_the_three_models(slurm: Cluster, tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    proc = start_sweep(
        slurm,
        tmp_path / "sweep.log",
        *SMOKE,
        *slurm_args(slurm, sweep_dir),
        "modality=acoustic,visual,early",
        "seed=0",
    )
    seen: set[str] = set()

    def running_jobs() -> bool:
        out = slurm.command("squeue", "-h", "-o", "%i %T", check=False)
        seen.update(line.split()[0] for line in out.splitlines() if line.strip())
        return proc.poll() is not None

    try:
        slurm.wait_for(running_jobs, "the sweep to end", timeout=300, every=0.5)
        proc.wait(timeout=60)
        output = (tmp_path / "sweep.log").read_text()
    finally:
        proc.kill()
    assert proc.returncode == 0, output[-3000:]
    tasks = job_ids(sweep_dir)
    assert len(tasks) == 3 and len({t.split("_")[0] for t in tasks}) == 1  # one array job, three tasks
    assert seen & set(tasks), f"squeue never listed the sweep's jobs {tasks} (saw {sorted(seen)})"

    report = json.loads((sweep_dir / "comparison.json").read_text())
    assert report["failures"] == []
    by_label = {m["label"]: m for m in report["models"]}
    assert set(by_label) == {"acoustic", "visual", "early"}
    for job_dir in sorted(p for p in sweep_dir.iterdir() if (p / "metrics.json").is_file()):
        m = metrics_of(job_dir)
        model = by_label[m["run"]["modality"]]
        for metric in ("f1_macro", "accuracy", "balanced_accuracy"):
            assert model["test"][metric]["values"] == [m["test"][metric]], (job_dir, metric)
    assert "early" in (sweep_dir / "report.md").read_text()


def test_a_job_signalled_before_its_time_limit_is_requeued_and_ends_as_an_uninterrupted_run(
    slurm: Cluster, tmp_path: Path
) -> None:
    args = (
        *SMOKE,
        "modality=visual",
        "seed=0",
        "compare.enabled=false",
        "trainer.loop.max_epochs=12",
        "trainer.loop.patience_epochs=12",
    )
    whole = run_main("train", *args, f"hydra.run.dir={tmp_path / 'whole'}", guarded=True)
    assert whole.returncode == 0, whole.stderr

    sweep_dir = tmp_path / "sweep"
    job_dir = sweep_dir / "0_visual_seed0"
    proc = start_sweep(slurm, tmp_path / "sweep.log", *args, *slurm_args(slurm, sweep_dir))
    try:
        slurm.wait_for(lambda: (job_dir / "last.pt").exists() or proc.poll() is not None, "the first epoch")
        assert proc.poll() is None, (tmp_path / "sweep.log").read_text()[-3000:]
        (task,) = job_ids(sweep_dir)
        # what Slurm sends signal_delay_s before the time limit (submitit's USR2), to the job's steps
        slurm.command("scancel", "--signal=USR2", task)
        # submitit requeues it; Slurm holds a requeued job back two minutes (its begin time):
        # let it start at once, the test has no use for the wait
        slurm.wait_for(lambda: slurm.job_state(task) == "PENDING", f"job {task} requeued")
        slurm.command("scontrol", "update", f"JobId={task}", "StartTime=now")
        slurm.wait_for(lambda: proc.poll() is not None, "the requeued job to finish", timeout=300)
        proc.wait(timeout=60)
        output = (tmp_path / "sweep.log").read_text()
    finally:
        proc.kill()
    assert proc.returncode == 0, output[-3000:]
    first_log = (sweep_dir / ".submitit" / task / f"{task}_0_log.err").read_text()
    assert "Caught signal SIGUSR2" in first_log and "requeu" in first_log.lower()
    train_log = (job_dir / "train.log").read_text()
    assert "resuming from" in train_log  # continued from last.pt, not started over
    assert "resume=auto" in (job_dir / ".hydra" / "overrides.yaml").read_text()
    resumed, reference = metrics_of(job_dir), metrics_of(tmp_path / "whole")
    assert resumed["run"]["epochs_trained"] == reference["run"]["epochs_trained"]
    assert resumed["val"] == reference["val"]
    assert resumed["test"] == reference["test"]


def test_a_cancelled_job_is_named_missing_and_the_others_are_reported(slurm: Cluster, tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    proc = start_sweep(
        slurm,
        tmp_path / "sweep.log",
        *SMOKE,
        *slurm_args(slurm, sweep_dir),
        "modality=acoustic,visual",
        "seed=0",
    )

    def submitted() -> bool:
        return len(job_ids(sweep_dir)) == 2

    try:
        # cancel the visual job (array task 1) while it trains
        slurm.wait_for(submitted, "the sweep's submission")
        task = next(t for t in job_ids(sweep_dir) if t.endswith("_1"))
        slurm.wait_for(lambda: slurm.job_state(task) == "RUNNING", f"job {task} to start")
        slurm.command("scancel", task)
        slurm.wait_for(lambda: proc.poll() is not None, "the sweep to end", timeout=300)
        proc.wait(timeout=60)
        output = (tmp_path / "sweep.log").read_text()
    finally:
        proc.kill()
    assert proc.returncode == 0, output[-3000:]
    assert f"SLURM job {task}) ended CANCELLED without a result" in output
    report = json.loads((sweep_dir / "comparison.json").read_text())
    assert [m["label"] for m in report["models"]] == ["acoustic"]
    (failure,) = report["failures"]
    assert (failure["modality"], failure["seed"]) == ("visual", 0)
    assert f"SLURM job {task} ended CANCELLED" in failure["error"]
    assert "visual" in (sweep_dir / "report.md").read_text()

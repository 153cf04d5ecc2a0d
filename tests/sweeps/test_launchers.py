"""Parallel and cluster sweeps: Hydra's joblib and submitit launchers through mer-cli's presets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from conftest import REPO, compose_train, run_main
from mer_cli.runs import reuse
from mer_cli.sweeps import launchers
from mer_cli.training import hardware

# a sweep of seconds: tiny model and data, no figures, no report unless a test wants one
SMOKE = ("experiment=smoke", "data.limit_per_split=24", "runtime.save_plots=false", "compare.enabled=false")


def _metrics(sweep_dir: Path) -> dict[tuple[str, int], dict]:
    """Each job's val and test metrics, by (modality, seed)."""
    out = {}
    for path in sweep_dir.glob("*/metrics.json"):
        m = json.loads(path.read_text())
        out[(m["run"]["modality"], m["run"]["seed"])] = {s: m[s] for s in ("val", "test")}
    return out


def _trainings(sweep_dir: Path) -> int:
    """How many models the sweep's jobs trained (each training logs one "training on" line)."""
    return sum(p.read_text().count("loop][INFO] - training on ") for p in sweep_dir.glob("*/train.log"))


# ---------------------------------------------------------------------------------------------
# Unit: what the presets need, how many threads a job gets, what a requeued job runs


def test_a_missing_launcher_plugin_is_one_line_naming_the_extra():
    def nothing_installed(module: str) -> None:
        return None

    argv = ["-m", "hydra/launcher=submitit_slurm", "modality=late"]
    assert launchers.missing_launcher(argv, nothing_installed) == (
        "hydra/launcher=submitit_slurm needs hydra_plugins.hydra_submitit_launcher: "
        "pip install 'mer-cli[sweep]'"
    )
    assert launchers.missing_launcher(["-m", "modality=late"], nothing_installed) is None
    assert launchers.missing_launcher(argv) is None  # installed here (the dev extra)


def test_parallel_jobs_share_the_physical_cores():
    assert launchers.parallel_jobs({"n_jobs": 2}) == 2
    assert launchers.parallel_jobs({"n_jobs": -1}) == os.cpu_count()  # joblib: one per CPU
    assert launchers.parallel_jobs({"timeout_min": 60}, environ={}) == 1  # SLURM: its own cores
    assert launchers.parallel_jobs({"timeout_min": 60}, environ={launchers.PARALLEL_JOBS_ENV: "12"}) == 12
    cores = hardware.physical_cores()
    assert hardware.cpu_threads(1) == cores
    assert hardware.cpu_threads(2) == max(1, cores // 2)
    assert hardware.cpu_threads(4 * cores) == 1  # never zero


def test_a_requeued_job_runs_with_resume_auto():
    assert launchers.resuming(["modality=late", "seed=1"]) == ["modality=late", "seed=1", "resume=auto"]
    assert launchers.resuming(["resume=false", "seed=1"]) == ["seed=1", "resume=auto"]
    pytest.importorskip("submitit")
    from hydra_plugins.mer_cli_launcher import SubmititSlurmLauncher

    launcher = SubmititSlurmLauncher(submitit_folder="unused")
    again = launcher.checkpoint(["modality=visual", "seed=2"], "hydra.sweep.dir", 3, "job_id_for_3", {})
    assert again.function is launcher  # the same job (same sweep dir, same job number) ...
    assert again.args == (
        ["modality=visual", "seed=2", "resume=auto"],
        "hydra.sweep.dir",
        3,
        "job_id_for_3",
        {},
    )


def _launcher(*overrides: str):
    return compose_train(*overrides, with_hydra=True).hydra.launcher


@pytest.mark.filterwarnings("ignore:(?s).*validated against ConfigStore schema:UserWarning")  # as cli.py
def test_the_presets_are_ours_and_checked_against_the_plugins_schemas():
    """configs/hydra/launcher/<name>.yaml takes the place of the plugin's entry of that name."""
    joblib = _launcher("hydra/launcher=joblib", "hydra.launcher.n_jobs=3")
    assert joblib._target_ == "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    assert joblib.n_jobs == 3
    assert str(joblib.batch_size) == "1"  # ours (the plugin's default: auto)
    slurm = _launcher("hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu")
    assert slurm._target_ == "hydra_plugins.mer_cli_launcher.SubmititSlurmLauncher"
    assert (slurm.partition, slurm.gpus_per_node, slurm.tasks_per_node) == ("gpu", 1, 1)  # one GPU per job
    assert slurm.max_num_timeout == 3  # submitit's default 0 would never requeue a timed-out job
    local = _launcher("hydra/launcher=submitit_local")
    assert local._target_ == "hydra_plugins.mer_cli_launcher.SubmititLocalLauncher"
    with pytest.raises(ConfigCompositionException):  # checked against the plugin's schema
        _launcher("hydra/launcher=joblib", "hydra.launcher.n_job=3")


def test_a_model_being_trained_by_one_job_is_waited_for_by_another(tmp_path):
    """The sweep-wide lock that keeps two parallel jobs from training the same model."""
    cfg = OmegaConf.create({"modality": {"name": "visual", "streams": ["visual"]}, "seed": 0})
    other_seed = OmegaConf.merge(cfg, {"seed": 1})
    events: list[str] = []
    holding = threading.Event()

    def first_job() -> None:
        with reuse.training_once(tmp_path, cfg):
            holding.set()
            time.sleep(0.3)  # "training"
            events.append("first done")

    t = threading.Thread(target=first_job)
    t.start()
    holding.wait()
    with reuse.training_once(tmp_path, other_seed):  # another model: no wait
        events.append("other model")
    with reuse.training_once(tmp_path, cfg):
        events.append("second starts")
    t.join()
    assert events == ["other model", "first done", "second starts"]


def test_the_same_metrics_script_pairs_runs_by_name_and_flags_any_difference(tmp_path):
    def job(sweep_dir: str, name: str, f1: float) -> None:
        d = tmp_path / sweep_dir / name
        d.mkdir(parents=True)
        metrics = {"run": {"train_seconds": f1}, "val": {"f1_macro": 0.5}, "test": {"f1_macro": f1}}
        (d / "metrics.json").write_text(json.dumps(metrics))

    job("a", "0_acoustic_seed0", 0.25)
    job("a", "1_late_seed0", 0.75)
    job("b", "0_late_seed0", 0.75)  # another job order: paired by name
    job("b", "1_acoustic_seed0", 0.25)
    job("c", "0_acoustic_seed0", 0.25)
    job("c", "1_late_seed0", 0.7)
    script = [sys.executable, str(REPO / "benchmarks" / "same_metrics.py")]

    same = subprocess.run([*script, tmp_path / "a", tmp_path / "b"], capture_output=True, text=True)
    assert same.returncode == 0, same.stdout
    assert same.stdout.splitlines()[-1] == "2 runs paired: same metrics run for run"
    other = subprocess.run([*script, tmp_path / "a", tmp_path / "c"], capture_output=True, text=True)
    assert other.returncode == 1
    assert "late_seed0: DIFFERENT (largest difference 0.05)" in other.stdout


# ---------------------------------------------------------------------------------------------
# End to end


@pytest.mark.slow
def test_a_joblib_sweep_gives_the_sequential_metrics_and_trains_no_model_twice(tmp_path):
    threads = hardware.cpu_threads(2)
    sequential = run_main(
        "train",
        "-m",
        *SMOKE,
        "modality=acoustic,visual,late",
        f"runtime.num_threads={threads}",
        f"hydra.sweep.dir={tmp_path / 'sequential'}",
        guarded=True,
    )
    assert sequential.returncode == 0, sequential.stderr
    # late first: it starts with its acoustic member's own job, so one of them waits for the other
    parallel = run_main(
        "train",
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        *SMOKE,
        "modality=late,acoustic,visual",
        "runtime.num_threads=null",
        f"hydra.sweep.dir={tmp_path / 'parallel'}",
        guarded=True,
    )
    assert parallel.returncode == 0, parallel.stderr

    expected = _metrics(tmp_path / "sequential")
    assert set(expected) == {("acoustic", 0), ("visual", 0), ("late", 0)}
    assert _metrics(tmp_path / "parallel") == expected  # run for run, every number
    assert _trainings(tmp_path / "sequential") == 2
    assert _trainings(tmp_path / "parallel") == 2  # late fusion's members were trained once each
    logs = "".join(p.read_text() for p in (tmp_path / "parallel").glob("*/train.log"))
    assert f"2 jobs run at once: {threads} torch threads each" in logs
    assert logs.count(f"training on cpu (float32), {threads} threads") == 2

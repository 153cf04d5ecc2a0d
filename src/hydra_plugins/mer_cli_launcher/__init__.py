"""Hydra's submitit launchers, with one change: a requeued job continues its run.

SLURM (or submitit's local executor) signals a job before its time limit and on preemption;
submitit then calls the launcher's ``checkpoint`` and requeues what it returns. Hydra's returns
the same job with the same overrides: it lands in the same run directory (the sweep directory is
fixed when the sweep starts, the job number stays), where ``resume=false`` would refuse to train
over the run it finds. Here the requeued job also gets ``resume=auto``, so it continues from
``last.pt`` (written after every epoch) and ends as an uninterrupted job would.

On SLURM the launcher also waits on its jobs through ``squeue`` (``sacct``, which submitit asks,
needs an accounting database many clusters lack: without it a cancelled job would be waited for
forever), and a job that ends without a result (``scancel``, a node failure, out of requeues) is
recorded as a failed run of the sweep (mer_cli.sweeps.cluster): the report compares the others
and names it, where Hydra's launcher would end the whole sweep with the job's error.

Hydra accepts launchers only from the ``hydra_plugins`` namespace and imports every module there
at start-up: without the ``sweep`` extra this defines nothing (mer_cli.sweeps.launchers.missing_launcher
names what to install when a preset needs it).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mer_cli.sweeps.launchers import PARALLEL_JOBS_ENV, resuming

log = logging.getLogger(__name__)
# seconds between two looks at the queue while a sweep's jobs run
POLL_S = 2.0

try:
    from hydra_plugins.hydra_submitit_launcher import submitit_launcher
except ImportError:  # no sweep extra: no submitit presets either
    submitit_launcher = None

if submitit_launcher is not None:

    class _ContinueWhenRequeued:
        def checkpoint(self, sweep_overrides: Sequence[str], *args: Any, **kwargs: Any) -> Any:
            """What submitit requeues: this job again, told to continue its run."""
            return super().checkpoint(resuming(sweep_overrides), *args, **kwargs)  # type: ignore[misc]

    class SubmititSlurmLauncher(_ContinueWhenRequeued, submitit_launcher.SlurmLauncher):
        """``hydra/launcher=submitit_slurm``: each job in its own SLURM allocation (its own cores)."""

        def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Any:
            """Submit the jobs as one array job, wait for each (squeue), and return what each
            returned; a job lost without a result returns NaN and leaves ``failed.json``."""
            import submitit
            from hydra.core.singleton import Singleton
            from hydra.core.utils import filter_overrides
            from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
            from omegaconf import OmegaConf

            assert self.config is not None
            executor = submitit.AutoExecutor(
                cluster="slurm",
                folder=self.params["submitit_folder"],
                slurm_max_num_timeout=self.params["max_num_timeout"],
            )
            shared = set(OmegaConf.structured(BaseQueueConf).keys())  # the rest are slurm_*
            executor.update_parameters(
                **{
                    key if key in shared else f"slurm_{key}": value
                    for key, value in self.params.items()
                    if key not in ("submitit_folder", "max_num_timeout")
                }
            )
            sweep_dir = Path(str(self.config.hydra.sweep.dir))
            sweep_dir.mkdir(parents=True, exist_ok=True)
            log.info("Submitit 'slurm' sweep output dir : %s", sweep_dir)
            numbers = [initial_job_idx + i for i in range(len(job_overrides))]
            for num, overrides in zip(numbers, job_overrides, strict=True):
                log.info("\t#%d : %s", num, " ".join(filter_overrides(overrides)))
            state = Singleton.get_state()
            jobs = executor.map_array(
                self,
                [list(o) for o in job_overrides],
                ["hydra.sweep.dir"] * len(numbers),
                numbers,
                [f"job_id_for_{n}" for n in numbers],
                [state] * len(numbers),
            )
            log.info("SLURM jobs: %s", ", ".join(j.job_id for j in jobs))
            ended = self.wait_for(jobs)
            return [
                self.outcome(j, list(o), n, ended[j.job_id])
                for j, o, n in zip(jobs, job_overrides, numbers, strict=True)
            ]

        def wait_for(self, jobs: Sequence[Any]) -> dict[str, str | None]:
            """Until every job wrote its result or ended for good, all asked of squeue at once;
            job id -> its final state (None: it ended with its result)."""
            from mer_cli.sweeps import cluster

            ended: dict[str, str | None] = {}
            while len(ended) < len(jobs):
                running = [j for j in jobs if j.job_id not in ended]
                for j in running:
                    if j.paths.result_pickle.exists():
                        ended[j.job_id] = None
                states = cluster.job_states([j.job_id for j in running if j.job_id not in ended])
                for job_id, state in (states or {}).items():
                    if cluster.has_ended(state):
                        ended[job_id] = state
                if len(ended) < len(jobs):
                    time.sleep(POLL_S)
            return ended

        def outcome(self, job: Any, overrides: list[str], num: int, ended: str | None) -> Any:
            """The job's JobReturn; a job lost without a result recorded in its run directory."""
            if ended is not None:
                time.sleep(POLL_S)  # its result file may land just after the job ends
                if not job.paths.result_pickle.exists():
                    return self.lost(job, overrides, num, ended)
            try:
                return job.results()[0]
            except Exception as e:  # the job's process failed outside mer-train's own guard
                last_line = (str(e).strip().splitlines() or [type(e).__name__])[-1]
                return self.lost(job, overrides, num, f"FAILED ({last_line})")

        def lost(self, job: Any, overrides: list[str], num: int, state: str) -> Any:
            from hydra.core.utils import JobReturn, JobStatus
            from omegaconf import open_dict

            from mer_cli.sweeps import cluster

            assert self.config is not None and self.hydra_context is not None
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
            with open_dict(cfg.hydra.job):
                cfg.hydra.job.num = num
            job_dir = Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
            modality = cfg.modality.get("name") if "modality" in cfg else None
            path = cluster.record_lost_job(
                job_dir, job.job_id, state, job.paths.stderr, modality, cfg.get("seed")
            )
            log.error(
                "job #%d (SLURM job %s) ended %s without a result: the sweep goes on (%s)",
                num,
                job.job_id,
                state,
                path,
            )
            return JobReturn(
                overrides=overrides,
                working_dir=str(job_dir),
                status=JobStatus.COMPLETED,
                _return_value=math.nan,
            )

    class SubmititLocalLauncher(_ContinueWhenRequeued, submitit_launcher.LocalLauncher):
        """``hydra/launcher=submitit_local``: every job of the sweep starts at once as a local
        process, so each is told how many share the machine (its torch threads: cores / jobs)."""

        def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Any:
            before = os.environ.get(PARALLEL_JOBS_ENV)
            os.environ[PARALLEL_JOBS_ENV] = str(len(job_overrides))  # the job processes inherit it
            try:
                return super().launch(job_overrides, initial_job_idx)
            finally:
                if before is None:
                    os.environ.pop(PARALLEL_JOBS_ENV, None)
                else:
                    os.environ[PARALLEL_JOBS_ENV] = before

"""Hydra's submitit launchers, with one change: a requeued job continues its run.

SLURM (or submitit's local executor) signals a job before its time limit and on preemption;
submitit then calls the launcher's ``checkpoint`` and requeues what it returns. Hydra's returns
the same job with the same overrides: it lands in the same run directory (the sweep directory is
fixed when the sweep starts, the job number stays), where ``resume=false`` would refuse to train
over the run it finds. Here the requeued job also gets ``resume=auto``, so it continues from
``last.pt`` (written after every epoch) and ends as an uninterrupted job would.

Hydra accepts launchers only from the ``hydra_plugins`` namespace and imports every module there
at start-up: without the ``sweep`` extra this defines nothing (mer_cli.sweeps.launchers.missing_launcher
names what to install when a preset needs it).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from mer_cli.sweeps.launchers import PARALLEL_JOBS_ENV, resuming

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

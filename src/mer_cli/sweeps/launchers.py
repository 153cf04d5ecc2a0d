"""Parallel and cluster sweeps on Hydra's launcher plugins (the ``sweep`` extra): the presets'
needs (`missing_launcher`), how many jobs share this machine (`parallel_jobs`), and the
overrides of a requeued job (`resuming`). Light on purpose: the console entry imports it.

The presets are ``configs/hydra/launcher/{joblib,submitit_local,submitit_slurm}.yaml``; the two
submitit ones name the launchers of ``hydra_plugins.mer_cli_launcher`` (Hydra's submitit
launchers whose requeued jobs continue their runs).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

# hydra/launcher presets -> the modules they need: Hydra's plugin and the engine under it
LAUNCHER_MODULES = {
    "joblib": ("hydra_plugins.hydra_joblib_launcher", "joblib"),
    "submitit_local": ("hydra_plugins.hydra_submitit_launcher", "submitit"),
    "submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "submitit"),
}
# how many jobs of a sweep run at once on this machine, where the launcher's config cannot say
# (set by the submitit_local launcher for its job processes)
PARALLEL_JOBS_ENV = "MER_PARALLEL_JOBS"


def missing_launcher(
    argv: Sequence[str], find_spec: Callable[[str], object] = importlib.util.find_spec
) -> str | None:
    """What to install for the ``hydra/launcher=NAME`` in ``argv``, if its plugin is missing:
    one line, instead of Hydra's error when it fails to import the launcher."""
    for arg in argv:
        key, _, name = arg.partition("=")
        if key.lstrip("+") != "hydra/launcher" or name not in LAUNCHER_MODULES:
            continue
        for module in LAUNCHER_MODULES[name]:
            try:
                found = find_spec(module)
            except ImportError:  # its parent package is missing
                found = None
            if found is None:
                return f"hydra/launcher={name} needs {module}: pip install 'mer-cli[sweep]'"
    return None


def parallel_jobs(launcher: Mapping[str, Any], environ: Mapping[str, str] = os.environ) -> int:
    """How many jobs of this sweep run at once on this machine (``hydra.launcher``'s config):
    joblib's ``n_jobs`` (negative: counted back from one per CPU, as joblib does), every job of a
    ``submitit_local`` sweep (its launcher says how many), else one: Hydra's basic launcher runs
    them in turn, and a SLURM job has its allocation's cores to itself."""
    if "n_jobs" in launcher:
        n = int(launcher["n_jobs"])
        return max(1, n if n > 0 else (os.cpu_count() or 1) + 1 + n)
    return max(1, int(environ.get(PARALLEL_JOBS_ENV, "1")))


def register_submitit_launchers() -> None:
    """Tell Hydra about the presets' submitit launchers (``hydra_plugins.mer_cli_launcher``)
    itself: its plugin scan lists the ``hydra_plugins`` folders on disk, and misses them in an
    editable install (``pip install -e``), which serves the package through an import hook."""
    try:
        from hydra_plugins import mer_cli_launcher
    except ImportError:
        return
    from hydra.core.plugins import Plugins

    plugins = Plugins.instance()  # first: its scan may re-run the module, making new classes
    for name in ("SubmititSlurmLauncher", "SubmititLocalLauncher"):
        launcher = getattr(mer_cli_launcher, name, None)  # absent without the sweep extra
        if launcher is not None:
            plugins.register(launcher)


def resuming(overrides: Sequence[str]) -> list[str]:
    """A job's overrides for its requeued copy: any ``resume=...`` replaced by ``resume=auto``."""
    kept = [o for o in overrides if o.partition("=")[0].lstrip("+~") != "resume"]
    return [*kept, "resume=auto"]

"""Multirun support: find models already trained in the sweep, record failed jobs, report at the end.

No model is trained twice in a sweep. Every job writes its resolved config.yaml first; a job about
to train a single-stream model (acoustic, visual, early, or a late fusion member) first looks in
the sweep directory for a finished run of the same model and run (`rundir.run_identity`: the
config less run-time knobs):
  - late fusion reuses such acoustic and visual runs as its members (by reference, in late.json);
  - a single-stream job that finds one (trained earlier as a late fusion member, when the sweep
    lists late first) copies it instead of training again.
Jobs run in override order with Hydra's basic launcher (one after another), so with
``modality=acoustic,visual,late,early`` late trains nothing. Under a parallel launcher (joblib,
submitit) the same model may be wanted by two jobs at once (late fusion and its member's own job):
a job holds the model's sweep-wide lock (`training_once`) while it looks for a trained copy and,
finding none, trains it, so the other job waits for it and then reuses what it trained. A job
holds one such lock at a time, so jobs cannot wait on each other in a circle.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mer_cli.core.artifacts import write_json
from mer_cli.core.config import plain_dict
from mer_cli.runs.identity import run_identity
from mer_cli.runs.rundir import LOCK_NAME, wait_and_hold

log = logging.getLogger(__name__)


# files of a finished single-stream run: a run counts as reusable only when all are there
FINISHED_RUN_FILES = ("checkpoint.pt", "metrics.json", "predictions.csv")


# at the sweep's root: one lock file per model being trained (named by a hash of its run identity)
LOCKS_DIR = ".locks"


@contextlib.contextmanager
def training_once(sweep_dir: Path, cfg: DictConfig) -> Iterator[None]:
    """Hold the sweep-wide lock of the model and run ``cfg`` describes while the block looks for a
    trained copy (`find_trained`) and, finding none, trains it. Another job of the sweep that is
    training the same model holds the lock: this waits until that job has finished it."""
    identity = json.dumps(run_identity(plain_dict(cfg)), sort_keys=True, default=str)
    path = sweep_dir / LOCKS_DIR / f"{hashlib.sha256(identity.encode()).hexdigest()[:16]}.lock"
    name = cfg.modality.name

    def say_waiting() -> None:
        log.info("%s: another job of this sweep is training the same model: waiting for it", name)

    with wait_and_hold(path, on_wait=say_waiting):
        yield


def find_trained(sweep_dir: Path, cfg: DictConfig, exclude: Path) -> Path | None:
    """A finished run in ``sweep_dir`` of the model and run ``cfg`` describes (a late fusion
    member's config, or this job's). ``exclude``: this job's own directory."""
    want = run_identity(plain_dict(cfg))
    exclude = exclude.resolve()
    for config_path in sorted(sweep_dir.glob("**/config.yaml")):
        run_dir = config_path.parent.resolve()
        if run_dir == exclude or exclude in run_dir.parents or (run_dir / "failed.json").exists():
            continue
        if not all((run_dir / f).is_file() for f in FINISHED_RUN_FILES):
            continue
        if run_identity(plain_dict(OmegaConf.load(config_path))) == want:
            return run_dir
    return None


def adopt(source: Path, out_dir: Path) -> dict[str, Any]:
    """Make ``out_dir`` a copy of the finished run ``source`` (its config.yaml is kept); no training."""
    for item in source.iterdir():
        if item.name in ("config.yaml", "metrics.json", ".hydra", LOCK_NAME) or item.name.endswith(".log"):
            continue
        target = out_dir / item.name
        if item.is_dir():
            shutil.copytree(item, target, dirs_exist_ok=True)
        else:
            shutil.copy2(item, target)
    metrics = json.loads((source / "metrics.json").read_text())
    metrics["run"]["copied_from"] = str(source)
    write_json(out_dir / "metrics.json", metrics)
    return metrics

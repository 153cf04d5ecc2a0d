"""Run directories in, `Run` and `Failure` records out: the first step of the comparison report.

Input: run directories (or sweep directories holding them), each with config.yaml, metrics.json and
predictions.csv as `runs.execute.run` writes them; job directories holding ``failed.json`` are failed
jobs. Runs are labelled by model (`label_runs`): modality plus whatever else in their configs
differs (e.g. ``early (model.dropout=0.2)``); the seeds and cross-validation folds of a model are its
runs.
"""

from __future__ import annotations

import csv
import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from mer_cli.core.config import flatten
from mer_cli.core.errors import MerError
from mer_cli.data.folds import CREMA_D_ACTOR_PATTERN, maybe_actor_ids
from mer_cli.evaluation.metrics import METRICS
from mer_cli.runs import files, outputs
from mer_cli.runs.identity import model_identity


@dataclass(frozen=True)
class Run:
    path: Path
    modality: str
    seed: int | None
    fold: int | None
    config: dict[str, Any]  # flattened resolved config ("model.dropout": 0.5); empty if unknown
    model_choice: str | None  # the config file it picked (``model=gru``: "gru"); None if unknown
    metrics: dict[str, Any]  # the run's own metrics.json
    class_names: tuple[str, ...]
    test: outputs.Predictions  # sorted by clip id, so runs on the same clips line up
    groups: np.ndarray | None  # actor per test clip; None when the clip ids carry none

    def test_metric(self, name: str) -> float | None:
        """A scalar test metric from metrics.json; one that an older run's metrics.json lacks
        (ECE before it existed) is computed from its predictions, with the same definition."""
        value = self.metrics.get("test", {}).get(name)
        if value is None and name in METRICS.names():
            return METRICS.get(name).compute(self.test.y_true, self.test.y_prob)
        return value

    @property
    def test_key(self) -> str:
        return hashlib.sha1("\n".join(self.test.clip_ids).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Failure:
    path: Path
    modality: str | None
    seed: int | None
    error: str

    def as_dict(self) -> dict[str, Any]:
        """The failure as comparison.json lists it."""
        return {"path": str(self.path), "modality": self.modality, "seed": self.seed, "error": self.error}


def collect(dirs: Sequence[Path], actor_pattern: str | None = None) -> tuple[list[Run], list[Failure]]:
    """Every finished run and every failed job under ``dirs`` (a run dir is not searched further)."""
    runs: dict[Path, Run] = {}
    failures: dict[Path, Failure] = {}
    for d in dirs:
        d = Path(d).expanduser().resolve()
        if not d.is_dir():
            raise MerError(f"{d}: not a directory")
        found = 0
        for path in _job_dirs(d):
            found += 1
            if (path / "failed.json").is_file():
                failures[path] = _load_failure(path)
            else:
                try:
                    runs[path] = load_run(path, actor_pattern)
                except MerError as e:  # e.g. a job killed while writing: list it, compare the rest
                    failures[path] = Failure(path, None, None, f"unreadable run: {e}")
        if not found:
            raise MerError(f"{d}: no mer-train run (metrics.json) or failed job (failed.json) in it")
    return list(runs.values()), list(failures.values())


def _job_dirs(root: Path) -> Iterable[Path]:
    if (root / "failed.json").is_file() or (root / "metrics.json").is_file():
        yield root
        return
    for child in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        yield from _job_dirs(child)


def load_run(path: Path, actor_pattern: str | None = None) -> Run:
    metrics = files.read_json(path / "metrics.json")
    cfg: dict[str, Any] = {}
    if (path / "config.yaml").is_file():
        cfg = flatten(OmegaConf.to_container(OmegaConf.load(path / "config.yaml"), resolve=False))
    pred_path = path / "predictions.csv"
    if not pred_path.is_file():
        raise MerError(f"{path}: no predictions.csv (not a finished mer-train run)")
    with pred_path.open(newline="") as f:
        header = next(csv.reader(f), [])
    class_names = tuple(c.removeprefix("prob_") for c in header if c.startswith("prob_"))
    test = outputs.read_predictions(pred_path, "test")
    if not test.clip_ids:
        raise MerError(f"{pred_path}: no test predictions")
    order = np.argsort(np.array(test.clip_ids), kind="stable")
    test = outputs.Predictions(
        "test",
        tuple(test.clip_ids[i] for i in order),
        test.y_true[order],
        test.y_prob[order],
        speakers=None if test.speakers is None else tuple(test.speakers[i] for i in order),
    )
    pattern = actor_pattern or cfg.get("cv.actor_pattern") or CREMA_D_ACTOR_PATTERN
    # the speakers the data stored (predictions.csv's speaker column) first, as robustness.json
    # and baselines.json group; else each clip id's actor
    actors = test.speakers or maybe_actor_ids(test.clip_ids, str(pattern))
    run_info = metrics.get("run", {})
    seed = run_info.get("seed", cfg.get("seed"))
    choices = _hydra_choices(path)
    fold = cfg.get("cv.fold")
    return Run(
        path=path,
        modality=str(run_info.get("modality") or cfg.get("modality.name") or "unknown"),
        seed=int(seed) if seed is not None else None,
        fold=int(fold) if fold is not None else None,
        config=cfg,
        model_choice=choices.get("model"),
        metrics=metrics,
        class_names=class_names,
        test=test,
        groups=np.array(actors) if actors is not None else None,
    )


def _hydra_choices(path: Path) -> dict[str, str]:
    """The config group options a run picked (``hydra.runtime.choices`` in the .hydra/hydra.yaml
    Hydra writes in each job's directory, the CV run's for a fold); empty for a run without one."""
    hydra_yaml = path / ".hydra" / "hydra.yaml"
    if not hydra_yaml.is_file() and re.fullmatch(r"fold\d+", path.name):
        hydra_yaml = path.parent / ".hydra" / "hydra.yaml"
    if not hydra_yaml.is_file():
        return {}
    try:  # plain YAML: Hydra's record keeps its interpolations unresolved, and they stay so
        record = files.read_yaml(hydra_yaml)
    except MerError:  # a damaged Hydra record only costs the short label
        return {}
    choices = ((record or {}).get("hydra") or {}).get("runtime", {}).get("choices")
    return {str(k): str(v) for k, v in choices.items()} if isinstance(choices, dict) else {}


def _load_failure(path: Path) -> Failure:
    info = files.read_json(path / "failed.json")
    seed = info.get("seed")
    return Failure(
        path, info.get("modality"), int(seed) if seed is not None else None, str(info.get("error"))
    )


def label_runs(runs: Sequence[Run]) -> dict[Path, str]:
    """Model label per run: its modality, plus the config values that differ within that modality.

    When runs of a modality picked different ``model`` configs (a sweep over ``model=bilstm,gru``)
    and every one of them says which, the model config's name stands for its values:
    "early/gru", then any other value that differs among that modality's runs of that model
    ("early/gru (model.dropout=0.2)").
    """
    labels = {}
    for modality in {r.modality for r in runs}:
        group = [r for r in runs if r.modality == modality]
        choices = {r.model_choice for r in group}
        by_choice = len(choices) > 1 and None not in choices
        for choice in sorted(choices, key=str) if by_choice else [None]:
            members = [r for r in group if r.model_choice == choice] if by_choice else group
            name = f"{modality}/{choice}" if by_choice else modality
            identities = [model_identity(r.config) for r in members]
            keys = sorted({k for i in identities for k in i} - {"modality.name"})
            differing = [k for k in keys if len({repr(i.get(k)) for i in identities}) > 1]
            for r in members:
                extra = ", ".join(f"{k}={r.config.get(k)}" for k in differing)
                labels[r.path] = f"{name} ({extra})" if extra else name
    return labels


def relative_path(path: Path, root: Path) -> str:
    """``path`` as the report shows it: relative to the report's directory where it lies inside."""
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)

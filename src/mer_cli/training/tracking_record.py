"""What a tracked run holds, whatever the logger: the run directory's files it keeps, each
epoch's values, the final numbers and texts of metrics.json, the config as flat parameters
(training/tracking.py's module docstring has the whole list). Shared by the TensorBoard and MLflow
back-ends (tracking_tensorboard.py, tracking_mlflow.py) and the `Tracker` (tracking.py).
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mer_cli.core.config import flatten

# the run directory's files a tracked run keeps (those that exist), and its figures
RUN_FILES = ("config.yaml", "metrics.json", "history.csv", "late.json", "cv.json", "profile.json")
PLOTS_DIR = "plots"
# MLflow refuses longer parameter values
MAX_PARAM_CHARS = 6000


def epoch_values(row: Mapping[str, Any]) -> dict[str, float]:
    """A history row's metrics (every column but the step, ``epoch``)."""
    return {k: float(v) for k, v in row.items() if k != "epoch" and v not in (None, "")}


def read_history(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]


def final_values(
    metrics: Mapping[str, Any], prefix: str = "final"
) -> tuple[dict[str, float], dict[str, str]]:
    """metrics.json's numbers and strings under their path in it (``final/test/f1_macro``); lists
    (the confusion matrix, cv.json's per-fold copies) and nulls (undefined metrics) are left out."""
    numbers: dict[str, float] = {}
    texts: dict[str, str] = {}
    for key, value in metrics.items():
        name = f"{prefix}/{key}"
        if isinstance(value, Mapping):
            more_numbers, more_texts = final_values(value, name)
            numbers.update(more_numbers)
            texts.update(more_texts)
        elif isinstance(value, bool | int | float):
            numbers[name] = float(value)
        elif isinstance(value, str):
            texts[name] = value
    return numbers, texts


def parameters(cfg: Mapping[str, Any]) -> dict[str, bool | int | float | str]:
    """The resolved config as flat parameters: numbers, booleans and strings as they are, anything
    else as it is typed in an override (``[64, 32]``, ``null``)."""
    return {
        k: v if isinstance(v, bool | int | float | str) else json.dumps(v) for k, v in flatten(cfg).items()
    }


def as_text(value: bool | int | float | str) -> str:
    """A parameter as MLflow keeps it (text), written as in an override (``true``, not ``True``)."""
    return (value if isinstance(value, str) else json.dumps(value))[:MAX_PARAM_CHARS]


@contextlib.contextmanager
def quiet_retries() -> Iterator[None]:
    """An unreachable server is one warning line (ours), not one more per retry from urllib3."""
    urllib3_log = logging.getLogger("urllib3.connectionpool")
    level = urllib3_log.level
    urllib3_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        urllib3_log.setLevel(level)


def one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def run_files(out_dir: Path) -> list[Path]:
    return [out_dir / f for f in RUN_FILES if (out_dir / f).is_file()]


def plots(out_dir: Path) -> list[Path]:
    return sorted((out_dir / PLOTS_DIR).glob("*.png"))

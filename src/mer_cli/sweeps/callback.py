"""The end of a multirun: failed jobs recorded for the report, the comparison report written
at the sweep's root (a Hydra callback).
"""

from __future__ import annotations

import logging
import traceback
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from mer_cli.core.artifacts import write_json
from mer_cli.core.config import plain_dict
from mer_cli.core.errors import MerError
from mer_cli.reporting import report
from mer_cli.reporting.options import Settings

log = logging.getLogger(__name__)


def record_failure(job_dir: Path, error: BaseException, modality: str | None, seed: int | None) -> Path:
    """``failed.json`` in the job's directory: the comparison report lists it with its error."""
    message = str(error) if isinstance(error, MerError) else f"{type(error).__name__}: {error}"
    info = {
        "modality": modality,
        "seed": seed,
        "error": message,
        "traceback": None if isinstance(error, MerError) else traceback.format_exc(),
    }
    path = job_dir / "failed.json"
    write_json(path, info)
    return path


def settings_of(cfg: DictConfig) -> Settings:
    """``compare`` config node -> `Settings` (``enabled`` is the callback's own switch)."""
    node = {k: v for k, v in plain_dict(cfg.compare).items() if k != "enabled"}
    node.setdefault("actor_pattern", cfg.get("cv", {}).get("actor_pattern"))
    try:
        return Settings(**node)
    except TypeError as e:  # a key Settings does not know (a typo): one line, not a traceback
        raise MerError(f"compare: {e}") from e


class ReportCallback(Callback):
    """Writes the comparison report at the sweep's root when a multirun ends (configs/train.yaml)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not config.compare.enabled:
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            result = report.into_sweep(sweep_dir, settings_of(config))
        except MerError as e:
            log.error("comparison report not written: %s", e)
            return
        log.info("comparison report: %s", sweep_dir / "report.html")
        for line in result["summary"]:
            log.info("  %s", line)

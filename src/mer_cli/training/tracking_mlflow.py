"""logger=mlflow: one MLflow run per run directory, in one experiment per sweep (by default in the
SQLite database ``outputs/mlflow.db``; any tracking URI, a server's included). Its requests are
made on the tracker's background thread (training/background.py), never in the training loop.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import re
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mer_cli.training.tracking_record import MAX_PARAM_CHARS, PLOTS_DIR, as_text, plots, run_files

log = logging.getLogger(__name__)

RUN_DIR_TAG = "mer.run_dir"  # ties a tracked run to its run directory: resume=true continues it
PROBE_SECONDS = 3  # a tracking server's /health, asked once before the end of a run retries


def tracking_uri(uri: str) -> str:
    """``sqlite:///relative/path`` made absolute (from the working directory, as run directories
    are); any other URI as it is."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


def _sqlite_file(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:////") else None


@contextlib.contextmanager
def _exclusive(db: Path | None) -> Iterator[None]:
    """Jobs of a parallel sweep creating one SQLite database (or one experiment) take turns."""
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield  # the lock ends with the file's closing


def _mlflow_environment() -> None:
    """Before MLflow is imported: no usage reports from a training tool, and an unreachable server
    costs seconds, not MLflow's minutes of retries. A user's own setting of either is kept."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


_METRIC_NAME = re.compile(r"[^\w\-. :/]")


def _key(name: str) -> str:
    """MLflow's allowed characters in metric, parameter and tag names."""
    return _METRIC_NAME.sub("_", name)


class MLflow:
    def __init__(
        self,
        settings: Mapping[str, Any],
        out_dir: Path,
        run_name: str,
        params: dict[str, bool | int | float | str],
        parent: MLflow | None,
        experiment: str,
    ) -> None:
        _mlflow_environment()
        import mlflow.tracking  # noqa: F401  (here: a missing package is found before training starts)

        self.uri = tracking_uri(str(settings["tracking_uri"]))
        # named when the run starts: the sweep it belongs to is this job's
        self.experiment_name = experiment
        self.out_dir, self.run_name, self.params, self.parent = out_dir, run_name, params, parent
        self.client: Any = None
        self.experiment_id = ""
        self.run_id = ""

    def open(self) -> None:
        """The tracked run, created (or, resumed, found) on the server: the requests start here."""
        if self.run_id:
            return
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        db = _sqlite_file(self.uri)
        parent = self.parent
        if parent is not None:
            parent.open()
        self.client = MlflowClient(tracking_uri=self.uri)
        with _exclusive(db):
            if parent is not None:
                self.experiment_id = parent.experiment_id
            else:
                self.experiment_id = self._experiment(self.experiment_name, db)
            run = self._unfinished_run(self.out_dir)
            if run is None:
                tags = {RUN_DIR_TAG: str(self.out_dir)}
                if parent is not None:
                    tags["mlflow.parentRunId"] = parent.run_id
                run = self.client.create_run(self.experiment_id, run_name=self.run_name, tags=tags)
                have: dict[str, str] = {}
            else:  # resume=true: continue the run this directory's earlier process started
                self.client.update_run(run.info.run_id, status="RUNNING")
                have = run.data.params
        # a resumed run may change run-time knobs; MLflow keeps a parameter's first value
        new = [Param(_key(k), as_text(v)) for k, v in self.params.items() if _key(k) not in have]
        self.client.log_batch(str(run.info.run_id), params=new)
        self.run_id = str(run.info.run_id)
        log.info("logger=mlflow: run %r in experiment %s at %s", self.run_name, self.experiment_id, self.uri)

    def probe(self) -> None:
        """A tracking server's /health, once, in seconds (no retries): raises if it is still away."""
        if not self.uri.startswith(("http://", "https://")):
            return
        import urllib.request

        with urllib.request.urlopen(self.uri.rstrip("/") + "/health", timeout=PROBE_SECONDS):
            pass

    def _experiment(self, name: str, db: Path | None) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return str(found.experiment_id)
        # next to a SQLite database (MLflow's default would be ./mlruns in the working directory)
        location = (db.parent / "mlartifacts").as_uri() if db is not None else None
        try:
            return str(self.client.create_experiment(name, artifact_location=location))
        except Exception:
            found = self.client.get_experiment_by_name(name)  # another job of the sweep made it first
            if found is None:
                raise
            return str(found.experiment_id)

    def _unfinished_run(self, out_dir: Path) -> Any:
        path = str(out_dir)
        quote = '"' if '"' not in path else "'" if "'" not in path else None
        if quote is None:
            return None
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{RUN_DIR_TAG}` = {quote}{path}{quote}"
        )
        return next((r for r in runs if r.info.status != "FINISHED"), None)

    def log_epoch(self, epoch: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        self.open()
        now = int(time.time() * 1000)
        metrics = [Metric(_key(k), v, now, epoch) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def logged_epochs(self) -> set[int]:
        self.open()
        return {m.step for m in self.client.get_metric_history(self.run_id, "val/loss")}

    def log_results(self, out_dir: Path, final: dict[str, float], texts: dict[str, str]) -> None:
        from mlflow.entities import Metric, RunTag

        self.open()
        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id,
            metrics=[Metric(_key(k), v, now, 0) for k, v in final.items() if not math.isnan(v)],
            tags=[RunTag(_key(k), v[:MAX_PARAM_CHARS]) for k, v in texts.items()],
        )
        for path in run_files(out_dir):
            self.client.log_artifact(self.run_id, str(path))
        if plots(out_dir):
            self.client.log_artifacts(self.run_id, str(out_dir / PLOTS_DIR), PLOTS_DIR)

    def close(self, status: str) -> None:
        self.open()
        self.client.set_terminated(self.run_id, status)

"""Experiment tracking: what a run directory holds, also sent to TensorBoard or MLflow (``logger``).

Input: the resolved config, the run directory, each epoch's row (train.fit's ``on_epoch``), and at
the end the run's own files (history.csv, metrics.json or cv.json, config.yaml, plots/). Output:
TensorBoard event files in ``<run dir>/tensorboard/``, or an MLflow run (by default in the SQLite
database ``outputs/mlflow.db``). ``logger=csv`` (the default) sends nothing: the run directory's
history.csv and metrics.json are the record, as they are with every logger.

What a tracked run holds, under the names the run directory uses:
  per epoch      every column of history.csv but ``epoch`` (the step): train/loss, val/loss, lr, ...
  parameters     the resolved config, flattened (``trainer.loop.max_epochs``), values as typed on
                 the command line (``[64, 32]``, ``null``)
  final/...      every number in metrics.json under its path there (``final/test/f1_macro``,
                 ``final/run/best_epoch``); its strings as MLflow tags (``final/run/modality``)
  files          MLflow: config.yaml, metrics.json, history.csv, late.json, cv.json, profile.json
                 and plots/ as artifacts; TensorBoard: the YAML and JSON files as text, plots as
                 images

A run directory inside another tracked one is that run's child: late fusion's members (trained
into ``<late run>/acoustic/``) and cross-validation folds (``fold<i>/``) are MLflow child runs of
the late or CV run; a member reused from elsewhere is named by the late run's
``final/run/members/*`` tags, not logged again. A sweep's runs share one MLflow experiment, named
by the sweep's directory. A tracker never breaks or loses a run: the first error it meets (an
unreachable server, a missing package) is one warning line, after which the run goes on without it.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import logging
import math
import os
import re
import struct
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol, cast

from omegaconf import DictConfig, OmegaConf

from mer_cli.core.artifacts import deferred_interrupts
from mer_cli.core.config import flatten
from mer_cli.core.errors import ConfigError

log = logging.getLogger(__name__)

LOGGERS = ("csv", "tensorboard", "mlflow")
EXTRA_HINT = "pip install 'mer-cli[tracking]'"
TENSORBOARD_DIR = "tensorboard"
# the run directory's files a tracked run keeps (those that exist), and its figures
RUN_FILES = ("config.yaml", "metrics.json", "history.csv", "late.json", "cv.json", "profile.json")
PLOTS_DIR = "plots"
# the MLflow tag that ties a tracked run to its run directory: resume=true continues that run
RUN_DIR_TAG = "mer.run_dir"
SINGLE_RUN_EXPERIMENT = "mer-train"
# MLflow refuses longer parameter values
MAX_PARAM_CHARS = 6000


class Backend(Protocol):
    def log_epoch(self, epoch: int, values: dict[str, float]) -> None: ...
    def logged_epochs(self) -> set[int]: ...
    def log_results(self, out_dir: Path, final: dict[str, float], texts: dict[str, str]) -> None: ...
    def close(self, status: str) -> None: ...


class Tracker:
    """One run directory's tracked run. Every method is safe to call: after the first failure
    (one warning line) the tracker does nothing more and the run goes on."""

    def __init__(self, logger: str, out_dir: Path, run_name: str, backend: Backend | None) -> None:
        self.logger, self.out_dir, self.run_name, self.backend = logger, out_dir, run_name, backend
        self.epochs_sent: set[int] = set()
        self.finished = False

    def log_epoch(self, row: Mapping[str, float]) -> None:
        """train.fit's ``on_epoch``: one history row, stepped by its epoch."""
        epoch = int(row["epoch"])
        if self._call("an epoch", lambda b: b.log_epoch(epoch, epoch_values(row))):
            self.epochs_sent.add(epoch)

    def finish(self) -> None:
        """The run's files are written: send what is missing of history.csv (epochs a resumed or
        copied run did not log here), the final metrics and the files; close as finished."""

        def send(b: Backend) -> None:
            rows = read_history(self.out_dir / "history.csv")
            done = self.epochs_sent | (b.logged_epochs() if rows else set())
            for row in rows:
                if int(row["epoch"]) not in done:
                    b.log_epoch(int(row["epoch"]), epoch_values(row))
            metrics_path = next(
                (self.out_dir / f for f in ("metrics.json", "cv.json") if (self.out_dir / f).is_file()), None
            )
            numbers, texts = final_values(json.loads(metrics_path.read_text()) if metrics_path else {})
            b.log_results(self.out_dir, numbers, texts)

        self._call("the results", send)
        self.close("FINISHED")

    def close(self, status: str) -> None:
        """End the tracked run: FINISHED, FAILED or KILLED (MLflow's run statuses)."""
        if self.finished:
            return
        self.finished = True
        with contextlib.suppress(ValueError):
            _open.remove(self)
        self._call("closing the run", lambda b: b.close(status))

    def _call(self, what: str, action: Any) -> bool:
        if self.backend is None:
            return False
        # Ctrl-C or kill during a tracker call (an SQLite write, a request) takes effect when the
        # call returns: raised inside the client, it would leave its database session broken, and
        # the interrupted run could no longer be marked KILLED
        with quiet_retries(), deferred_interrupts():
            try:
                action(self.backend)
                return True
            except Exception as e:
                log.warning(
                    "logger=%s: sending %s of %s failed, the run goes on without it: %s",
                    self.logger,
                    what,
                    self.run_name,
                    one_line(e),
                )
                _failed.add(self.logger)
                backend, self.backend = self.backend, None
                with contextlib.suppress(Exception):
                    backend.close("FAILED")
                return False


# the trackers started and not yet closed in this process: a run directory inside one of theirs
# is its child (late fusion members, CV folds)
_open: list[Tracker] = []
_sweep_dir: Path | None = None
# loggers that failed in this job: its later runs (late fusion members, folds) are not tracked
# either, rather than each paying for a dead server and repeating the warning
_failed: set[str] = set()


@contextlib.contextmanager
def session(sweep_dir: Path | None = None) -> Iterator[None]:
    """One mer-train job: runs it started and did not finish end FAILED, or KILLED when it was
    interrupted. ``sweep_dir``: the multirun's root; its runs share one experiment."""
    global _sweep_dir
    _sweep_dir, status = sweep_dir, "FAILED"
    try:
        yield
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        for tracker in reversed(list(_open)):
            tracker.close(status)
        _sweep_dir = None
        _failed.clear()


def start(cfg: DictConfig, out_dir: Path) -> Tracker:
    """Start tracking the run that writes into ``out_dir`` with ``cfg``'s ``logger``."""
    settings = cfg.get("logger") or {"name": "csv"}
    logger = str(settings["name"])
    if logger not in LOGGERS:
        raise ConfigError(f"logger={logger!r}: valid: {', '.join(LOGGERS)}")
    out_dir = out_dir.resolve()
    parent = _parent_of(out_dir)
    run_name = _run_name(out_dir, parent)
    if logger == "csv" or logger in _failed:
        return Tracker(logger, out_dir, run_name, None)
    params = parameters(cast(dict, OmegaConf.to_container(cfg, resolve=True)))
    backend: Backend | None = None
    try:
        with quiet_retries():
            if logger == "tensorboard":
                backend = TensorBoard(out_dir / TENSORBOARD_DIR, params)
            else:
                parent_backend = parent.backend if parent is not None else None
                member_of = parent_backend if isinstance(parent_backend, MLflow) else None
                backend = MLflow(settings, out_dir, run_name, params, member_of)
    except ImportError as e:
        log.warning("logger=%s needs %s (%s): this run is not tracked", logger, EXTRA_HINT, one_line(e))
        _failed.add(logger)
    except Exception as e:
        log.warning("logger=%s: this run is not tracked: %s", logger, one_line(e))
        _failed.add(logger)
    tracker = Tracker(logger, out_dir, run_name, backend)
    if backend is not None:
        _open.append(tracker)
    return tracker


def _parent_of(out_dir: Path) -> Tracker | None:
    enclosing = [t for t in _open if t.out_dir in out_dir.parents]
    return max(enclosing, key=lambda t: len(t.out_dir.parts), default=None)


def _run_name(out_dir: Path, parent: Tracker | None) -> str:
    """``<parent's name>/acoustic``, the job's directory in a sweep, else ``<modality>/<time>``."""
    if parent is not None:
        return f"{parent.run_name}/{out_dir.relative_to(parent.out_dir).as_posix()}"
    if _sweep_dir is not None and _sweep_dir.resolve() in out_dir.parents:
        return out_dir.relative_to(_sweep_dir.resolve()).as_posix()
    return "/".join(out_dir.parts[-2:])


def experiment_name(settings: Mapping[str, Any]) -> str:
    """``logger.experiment``, else the sweep's directory (one experiment per sweep), else mer-train."""
    if settings.get("experiment"):
        return str(settings["experiment"])
    return str(_sweep_dir) if _sweep_dir is not None else SINGLE_RUN_EXPERIMENT


# ---------------------------------------------------------------------------------------------
# What is sent


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


def _run_files(out_dir: Path) -> list[Path]:
    return [out_dir / f for f in RUN_FILES if (out_dir / f).is_file()]


def _plots(out_dir: Path) -> list[Path]:
    return sorted((out_dir / PLOTS_DIR).glob("*.png"))


# ---------------------------------------------------------------------------------------------
# TensorBoard: event files in the run directory; `tensorboard --logdir` names each run by its path


class TensorBoard:
    def __init__(self, log_dir: Path, params: dict[str, bool | int | float | str]) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.log_dir, self.params = log_dir, params
        # a resumed or copied run: its earlier epochs may be in these files already
        self.earlier_files = any(log_dir.glob("events.out.tfevents.*"))
        self._writer_class = SummaryWriter
        self._writer: Any = None
        self.last_step = 0

    @property
    def writer(self) -> Any:
        if self._writer is None:  # created on first use: a run that fails before training leaves none
            self._writer = self._writer_class(log_dir=str(self.log_dir))
        return self._writer

    def log_epoch(self, epoch: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, global_step=epoch)
        self.writer.flush()
        self.last_step = max(self.last_step, epoch)

    def earlier_steps(self, tag: str) -> set[int]:
        """The steps of ``tag`` in the event files this run directory held before this process."""
        if not self.earlier_files:
            return set()
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        self.writer.flush()
        events = EventAccumulator(str(self.log_dir), size_guidance={"scalars": 0})
        events.Reload()
        if tag not in events.Tags()["scalars"]:
            return set()
        return {e.step for e in events.Scalars(tag)}

    def logged_epochs(self) -> set[int]:
        return self.earlier_steps("val/loss")

    def log_results(self, out_dir: Path, final: dict[str, float], texts: dict[str, str]) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary
        from torch.utils.tensorboard.summary import hparams

        if self.earlier_steps("final/run/seed"):
            return  # a run copied from another job of the sweep: its results came with its files
        step = self.last_step
        # the HPARAMS tab: one row per run, the config beside its final metrics
        for summary in hparams(self.params, final):
            self.writer.file_writer.add_summary(summary, step)
        for key, value in final.items():
            self.writer.add_scalar(key, value, global_step=step)
        for path in _run_files(out_dir):
            if path.suffix in (".yaml", ".json"):  # indented: markdown shows it as it is
                self.writer.add_text(path.name, "    " + path.read_text().replace("\n", "\n    "), step)
        for path in _plots(out_dir):
            png = path.read_bytes()
            width, height = struct.unpack(">II", png[16:24])  # the PNG header (IHDR)
            image = Summary.Image(height=height, width=width, colorspace=4, encoded_image_string=png)
            tag = f"{PLOTS_DIR}/{path.stem}"
            self.writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)
        self.writer.flush()

    def close(self, status: str) -> None:
        if self._writer is not None:
            self._writer.close()


# ---------------------------------------------------------------------------------------------
# MLflow: one run per run directory, in an experiment per sweep


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
    ) -> None:
        _mlflow_environment()
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = tracking_uri(str(settings["tracking_uri"]))
        db = _sqlite_file(uri)
        self.client = MlflowClient(tracking_uri=uri)
        self.experiment_id: str
        self.run_id: str
        with _exclusive(db):
            if parent is not None:
                self.experiment_id = parent.experiment_id
            else:
                self.experiment_id = self._experiment(experiment_name(settings), db)
            run = self._unfinished_run(out_dir)
            if run is None:
                tags = {RUN_DIR_TAG: str(out_dir)}
                if parent is not None:
                    tags["mlflow.parentRunId"] = parent.run_id
                run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
                have: dict[str, str] = {}
            else:  # resume=true: continue the run this directory's earlier process started
                self.client.update_run(run.info.run_id, status="RUNNING")
                have = run.data.params
        self.run_id = str(run.info.run_id)
        # a resumed run may change run-time knobs; MLflow keeps a parameter's first value
        new = [Param(_key(k), as_text(v)) for k, v in params.items() if _key(k) not in have]
        self.client.log_batch(self.run_id, params=new)
        log.info("logger=mlflow: run %r in experiment %s at %s", run_name, self.experiment_id, uri)

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

        now = int(time.time() * 1000)
        metrics = [Metric(_key(k), v, now, epoch) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def logged_epochs(self) -> set[int]:
        return {m.step for m in self.client.get_metric_history(self.run_id, "val/loss")}

    def log_results(self, out_dir: Path, final: dict[str, float], texts: dict[str, str]) -> None:
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id,
            metrics=[Metric(_key(k), v, now, 0) for k, v in final.items() if not math.isnan(v)],
            tags=[RunTag(_key(k), v[:MAX_PARAM_CHARS]) for k, v in texts.items()],
        )
        for path in _run_files(out_dir):
            self.client.log_artifact(self.run_id, str(path))
        if _plots(out_dir):
            self.client.log_artifacts(self.run_id, str(out_dir / PLOTS_DIR), PLOTS_DIR)

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)

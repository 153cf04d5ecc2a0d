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
by the sweep's directory. A tracker never breaks, stalls or loses a run: MLflow's requests are
made by a background thread (`background.Sender`), so a slow or dead server costs training
nothing; the first error (an unreachable server, a missing package) is one warning line, the
run's end sends what was held back if the server is back (``logger.flush_timeout`` seconds at
most) and otherwise says in one line what the tracked run lacks; the run directory has it all.
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
from mer_cli.training import background

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
PROBE_SECONDS = 3  # a tracking server's /health, asked once before the end of a run retries


class Backend(Protocol):
    def open(self) -> None: ...
    def probe(self) -> None: ...
    def log_epoch(self, epoch: int, values: dict[str, float]) -> None: ...
    def logged_epochs(self) -> set[int]: ...
    def log_results(self, out_dir: Path, final: dict[str, float], texts: dict[str, str]) -> None: ...
    def close(self, status: str) -> None: ...


class Tracker:
    """One run directory's tracked run. Every method is safe to call, and returns at once with a
    ``sender`` (MLflow: the requests are made by a background thread). After the first failure
    (one warning line) nothing more is sent until the run's end, which tries once more: what the
    server lacks of history.csv, the results, the closing; what it still cannot send is one line
    (`not_sent`). Without a sender (TensorBoard's local files) the calls run here, and the first
    failure ends the tracking."""

    def __init__(
        self,
        logger: str,
        out_dir: Path,
        run_name: str,
        backend: Backend | None,
        sender: background.Sender | None = None,
        flush_timeout: float = 0.0,
    ) -> None:
        self.logger, self.out_dir, self.run_name, self.backend = logger, out_dir, run_name, backend
        self.sender, self.flush_timeout = sender, flush_timeout
        self.epochs_sent: set[int] = set()
        self.finished = False
        self.offline = False  # a call failed: the rest waits for the run's end
        self.not_sent: list[str] = []  # what the tracked run lacks, once the tracker gave up on it
        if sender is not None:
            self._call("the run's start", lambda b: b.open())

    def log_epoch(self, row: Mapping[str, float]) -> None:
        """train.fit's ``on_epoch``: one history row, stepped by its epoch."""
        epoch, values = int(row["epoch"]), epoch_values(row)

        def send(b: Backend) -> None:
            b.log_epoch(epoch, values)
            self.epochs_sent.add(epoch)

        self._call(f"epoch {epoch}", send)

    def finish(self) -> None:
        """The run's files are written: send what is missing of history.csv (epochs a resumed or
        copied run did not log here, or that a failure held back), the final metrics and the
        files; close as finished."""

        def send(b: Backend) -> None:
            rows = read_history(self.out_dir / "history.csv")
            done = self.epochs_sent | (b.logged_epochs() if rows else set())
            for row in rows:
                if int(row["epoch"]) not in done:
                    b.log_epoch(int(row["epoch"]), epoch_values(row))
                self.epochs_sent.add(int(row["epoch"]))
            metrics_path = next(
                (self.out_dir / f for f in ("metrics.json", "cv.json") if (self.out_dir / f).is_file()), None
            )
            numbers, texts = final_values(json.loads(metrics_path.read_text()) if metrics_path else {})
            b.log_results(self.out_dir, numbers, texts)

        self._call("the results", send, final=True)
        self.close("FINISHED")

    def close(self, status: str) -> None:
        """End the tracked run: FINISHED, FAILED or KILLED (MLflow's run statuses); with a sender,
        wait for what is queued (``flush_timeout`` seconds at most)."""
        if self.finished:
            return
        self.finished = True
        with contextlib.suppress(ValueError):
            _open.remove(self)
        self._call("closing the run", lambda b: b.close(status), final=True)
        if self.sender is not None and not self.sender.drain(self.flush_timeout):
            self._give_up(f"still sending after {self.flush_timeout:g} s")

    def _call(self, what: str, action: Any, final: bool = False) -> None:
        if self.backend is None:
            return
        if self.sender is not None:
            # a full queue refuses an epoch: it is in history.csv, and sent with the results
            self.sender.submit(lambda: self._run(what, action, final))
            return
        # Ctrl-C or kill during a call (an event file's write) takes effect when the call
        # returns, as for every write of the run directory
        with deferred_interrupts():
            self._run(what, action, final)

    def _run(self, what: str, action: Any, final: bool) -> None:
        backend = self.backend
        if backend is None or (self.offline and not final):
            return  # after a failure: the run's end sends it from the run directory
        with quiet_retries():
            try:
                if self.offline:  # one quick request first: a server still away costs no retries
                    backend.probe()
                action(backend)
                self.offline = False
                return
            except Exception as e:
                error = one_line(e)
        if not self.offline:
            then = "tries again at its end" if self.sender is not None and not final else "goes on without it"
            text = f"logger={self.logger}: sending {what} of {self.run_name} failed, the run {then}: {error}"
            log.warning("%s", text)
        _failed.add(self.logger)  # the job's later runs are not tracked: one warning, not one per run
        self.offline = True
        if self.sender is None or final:
            self._give_up(error)

    def _give_up(self, reason: str) -> None:
        """Nothing more is sent; one line says what the tracked run lacks (the run directory has it)."""
        backend, self.backend = self.backend, None
        if backend is None:
            return
        if self.sender is None:  # local files: closed; a server is most likely away
            with contextlib.suppress(Exception):
                backend.close("FAILED")
            return
        history = {int(r["epoch"]) for r in read_history(self.out_dir / "history.csv")}
        epochs = sorted(history - self.epochs_sent)
        self.not_sent = [*(["epochs " + _ranges(epochs)] if epochs else []), "the results"]
        log.info(
            "logger=%s: %s: not sent (%s): %s; its run directory has them",
            self.logger,
            self.run_name,
            reason,
            ", ".join(self.not_sent),
        )


def _ranges(numbers: list[int]) -> str:
    """[1, 2, 3, 5] -> "1-3, 5"."""
    spans: list[list[int]] = []
    for n in numbers:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in spans)


# the trackers started and not yet closed in this process: a run directory inside one of theirs
# is its child (late fusion members, CV folds)
_open: list[Tracker] = []
_sweep_dir: Path | None = None
# every MLflow request of this process, made in order (a parent run's before its members')
_sender = background.Sender()
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
    sender: background.Sender | None = None
    try:
        if logger == "tensorboard":
            backend = TensorBoard(out_dir / TENSORBOARD_DIR, params)
        else:  # no request here: the sender's thread makes them
            parent_backend = parent.backend if parent is not None else None
            member_of = parent_backend if isinstance(parent_backend, MLflow) else None
            backend, sender = MLflow(settings, out_dir, run_name, params, member_of), _sender
    except ImportError as e:
        log.warning("logger=%s needs %s (%s): this run is not tracked", logger, EXTRA_HINT, one_line(e))
        _failed.add(logger)
    except Exception as e:
        log.warning("logger=%s: this run is not tracked: %s", logger, one_line(e))
        _failed.add(logger)
    flush_timeout = float(settings.get("flush_timeout") or 0)
    sender = sender if backend is not None else None
    tracker = Tracker(logger, out_dir, run_name, backend, sender, flush_timeout)
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

    def open(self) -> None:
        pass  # the writer is made on first use

    def probe(self) -> None:
        pass  # local files

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
        import mlflow.tracking  # noqa: F401  (here: a missing package is found before training starts)

        self.uri = tracking_uri(str(settings["tracking_uri"]))
        # the experiment's name now: the sweep it belongs to is this job's
        self.experiment_name = experiment_name(settings)
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
        for path in _run_files(out_dir):
            self.client.log_artifact(self.run_id, str(path))
        if _plots(out_dir):
            self.client.log_artifacts(self.run_id, str(out_dir / PLOTS_DIR), PLOTS_DIR)

    def close(self, status: str) -> None:
        self.open()
        self.client.set_terminated(self.run_id, status)

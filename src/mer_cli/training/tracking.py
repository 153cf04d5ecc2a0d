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
by the sweep's directory. The back-ends are their own modules (tracking_tensorboard.py,
tracking_mlflow.py); what they send is tracking_record.py's. A tracker never breaks, stalls or
loses a run: MLflow's requests are made by a background thread (`background.Sender`), so a
slow or dead server costs training nothing; the first error (an unreachable server, a missing
package) is one warning line, the run's end sends what was held back if the server is back
(``logger.flush_timeout`` seconds at most) and otherwise says in one line what the tracked run
lacks; the run directory has it all.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol, cast

from omegaconf import DictConfig, OmegaConf

from mer_cli.core.artifacts import deferred_interrupts
from mer_cli.core.errors import ConfigError
from mer_cli.training import background
from mer_cli.training.tracking_mlflow import MLflow
from mer_cli.training.tracking_record import (
    epoch_values,
    final_values,
    one_line,
    parameters,
    quiet_retries,
    read_history,
)
from mer_cli.training.tracking_tensorboard import TensorBoard

log = logging.getLogger(__name__)

LOGGERS = ("csv", "tensorboard", "mlflow")
EXTRA_HINT = "pip install 'mer-cli[tracking]'"
TENSORBOARD_DIR = "tensorboard"
SINGLE_RUN_EXPERIMENT = "mer-train"


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
            experiment = experiment_name(settings)
            backend = MLflow(settings, out_dir, run_name, params, member_of, experiment)
            sender = _sender
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

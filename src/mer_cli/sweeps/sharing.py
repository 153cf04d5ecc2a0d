"""Several sweepers on one Optuna study: ``mer-train -m hparams_search=...`` started more than once
(on one machine or several) with the same ``hydra.sweeper.storage`` (a database server every
worker reaches: ``postgresql+psycopg2://user@host:port/db``) and ``hydra.sweeper.study_name``.

Input: the storage URL, the study name, the trials one sweeper is running. Output: the Optuna
storage the sweeper opens (with heartbeats: a running trial whose sweeper has died is failed and
asked again), the lock the sweepers ask for trials under (so together they ask exactly
``n_trials``, and each draws from its own sampler seed), and the trials that count towards
``n_trials``. Optuna is imported inside the functions: the core install has none.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from mer_cli.sweeps import search
from mer_cli.training.pruning import require_optuna

log = logging.getLogger(__name__)

ERROR = "error"  # trial user attribute: the job failed (the sweeper told Optuna so); it counts
RETRY_OF = "retry_of"  # trial user attribute: the trial a dead sweeper left running, asked again


def storage_of(url: str, heartbeat_interval: int | None) -> Any:
    """The Optuna storage at ``url`` (an SQLAlchemy URL); with ``heartbeat_interval`` (seconds)
    the sweeper records a heartbeat for each trial it runs, and a trial silent for twice that
    (its sweeper was killed, its machine lost) is failed by the next sweeper that asks, and its
    parameters enqueued to be tried again."""
    optuna = require_optuna()
    if heartbeat_interval is None:
        return optuna.storages.RDBStorage(url)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks heartbeats experimental
        return optuna.storages.RDBStorage(
            url,
            heartbeat_interval=int(heartbeat_interval),
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(),
        )


def shown(url: str) -> str:
    """``url`` for a log line: a password in it is masked."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


# ---------------------------------------------------------------------------------------------
# The lock sweepers take turns under: reclaim dead trials, count, ask (seconds at most)


def _lock_key(study_name: str) -> int:
    """A signed 64-bit number per study: PostgreSQL's advisory locks are named by one."""
    digest = hashlib.sha256(f"mer-cli optuna study {study_name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class AskLock:
    """Held while a sweeper reclaims, counts and asks trials: sweepers of one study take turns
    across processes (SQLite: an ``flock`` beside the database file; PostgreSQL: an advisory lock
    on one connection, released by the server if the sweeper dies). Other databases: no lock, one
    warning line (several sweepers may then ask a few trials more than ``n_trials``)."""

    def __init__(self, url: str, study_name: str) -> None:
        from sqlalchemy.engine import make_url

        self.url, self.study_name = url, study_name
        dialect = make_url(url).get_backend_name()
        kinds: dict[str, Callable[[], contextlib.AbstractContextManager[None]]] = {
            "sqlite": self._file_lock,
            "postgresql": self._advisory_lock,
        }
        if dialect not in kinds:
            log.warning(
                "hydra.sweeper.storage: no lock between sweepers on %s (only %s): one sweeper per study",
                dialect,
                ", ".join(kinds),
            )
        self._take = kinds.get(dialect, contextlib.nullcontext)
        self._connection: Any = None

    def __enter__(self) -> None:
        self._held = self._take()
        self._held.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self._held.__exit__(*exc)

    def close(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                self._connection.close()
            self._connection = None

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        from sqlalchemy.engine import make_url

        database = make_url(self.url).database
        if not database or database == ":memory:":  # one process
            yield
            return
        path = Path(database + ".lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield  # the lock ends with the file's closing

    @contextlib.contextmanager
    def _advisory_lock(self) -> Iterator[None]:
        import sqlalchemy

        if self._connection is None:  # one connection for the sweeper's life: the lock is the session's
            engine = sqlalchemy.create_engine(self.url, poolclass=sqlalchemy.pool.NullPool)
            self._connection = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        key = {"key": _lock_key(self.study_name)}
        self._connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), key)
        try:
            yield
        finally:
            self._connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), key)


# ---------------------------------------------------------------------------------------------
# Trials: alive (heartbeats), dead (reclaimed), and those that count


@contextlib.contextmanager
def heartbeats(storage: Any, trial_ids: Sequence[int]) -> Iterator[None]:
    """While the sweeper runs ``trial_ids``: a heartbeat for each every ``heartbeat_interval``
    seconds from a background thread (none without heartbeats). A heartbeat that fails (the
    database briefly away) is tried again at the next beat."""
    interval = storage.get_heartbeat_interval()
    if not interval:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            for trial_id in trial_ids:
                try:
                    storage.record_heartbeat(trial_id)
                except Exception as e:  # the next beat tries again; the trial is failed only after grace
                    log.debug("heartbeat of trial %d not recorded: %s", trial_id, e)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name="optuna-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def ask(study: Any, space: dict[str, Any]) -> Any:
    """``study.ask(space)``: a new trial, or an enqueued one (a retry) first."""
    with warnings.catch_warnings():
        # Optuna expects heartbeats with Study.optimize; the sweeper records them itself (`heartbeats`)
        warnings.filterwarnings("ignore", message="Heartbeat of storage")
        return study.ask(space)


def reclaim(study: Any) -> None:
    """Under the lock, before asking: trials left running by a sweeper on this machine that is
    gone (a crash, a kill) are failed and enqueued again at once; so are trials whose heartbeat
    stopped (their sweeper anywhere: Optuna's stale-trial callback enqueues them)."""
    optuna = require_optuna()
    states = optuna.trial.TrialState
    running = study.get_trials(deepcopy=False, states=(states.RUNNING,))
    for t in running:
        if search.sweeper_is_gone(t.user_attrs.get(search.SWEEPER)):
            study.tell(t.number, state=states.FAIL)
            study.enqueue_trial(t.params, user_attrs={RETRY_OF: t.number})
            log.warning("trial %d was left running by a sweeper that is gone: asked again", t.number)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks stale-trial failing experimental
        optuna.storages.fail_stale_trials(study)
    now = {t.number: t for t in study.get_trials(deepcopy=False)}
    for t in running:
        stale = now[t.number]
        owner = t.user_attrs.get(search.SWEEPER)
        if stale.state == states.FAIL and ERROR not in stale.user_attrs and not search.sweeper_is_gone(owner):
            log.warning("trial %d: its heartbeat stopped (sweeper %s): failed, asked again", t.number, owner)


def n_counted(study: Any) -> int:
    """Trials that count towards n_trials: completed, pruned, failed while they ran, and those
    running now (in this sweeper or another); not the ones a dead sweeper abandoned (failed
    without an error: asked again) nor enqueued ones waiting to be asked."""
    states = require_optuna().trial.TrialState
    return sum(
        t.state in (states.COMPLETE, states.PRUNED, states.RUNNING)
        or (t.state == states.FAIL and ERROR in t.user_attrs)
        for t in study.get_trials(deepcopy=False)
    )

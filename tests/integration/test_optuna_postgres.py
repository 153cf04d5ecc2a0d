"""Optuna on a real PostgreSQL server: several ``mer-train -m hparams_search=default`` workers on
one study (the same storage URL and study name), pruning on, tiny trials. Together they run
exactly the trials asked, each once; a worker killed mid-trial leaves a failed trial that is run
again, never a completed one; a new worker resumes the study; best.sh reproduces the best trial."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from omegaconf import OmegaConf
from postgres_server import PostgresServer, running_postgres

from conftest import REPO, cli_command, cli_env, run
from mer_cli.sweeps import search, sharing
from mer_cli.training import pruning

pytestmark = pytest.mark.integration

S = optuna.trial.TrialState
TINY = (
    "experiment=smoke",
    "modality=visual",
    "data.limit_per_split=24",
    "runtime.save_plots=false",
    "trainer.loop.max_epochs=3",
    "trainer.loop.patience_epochs=3",
    # pruning on from the second trial: below the median of earlier trials at epoch 2 or 3 stops
    "hydra.sweeper.pruner.n_startup_trials=1",
    "hydra.sweeper.pruner.n_warmup_steps=1",
    "hydra.sweeper.heartbeat_interval=1",  # a silent trial is stale after 2 s
)


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    with running_postgres() as server:
        yield server


def _worker(sweep_dir: Path, url: str, study: str, n_trials: int, log: Path) -> subprocess.Popen[str]:
    """One sweeper of the shared study, its output in ``log``."""
    cmd = cli_command(
        "train",
        "-m",
        "hparams_search=default",
        *TINY,
        f"hydra.sweeper.n_trials={n_trials}",
        f"hydra.sweeper.storage={url}",
        f"hydra.sweeper.study_name={study}",
        f"hydra.sweep.dir={sweep_dir}",
    )
    with log.open("w") as f:  # the child keeps its own descriptor; the sweeper logs to stdout
        env = cli_env({"PYTHONUNBUFFERED": "1"})
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen[str], log: Path, timeout: float = 300) -> None:
    try:
        proc.wait(timeout=timeout)
    finally:
        proc.kill()
    assert proc.returncode == 0, log.read_text()[-4000:]


def _trials(url: str, study: str) -> list[optuna.trial.FrozenTrial]:
    try:
        return optuna.load_study(study_name=study, storage=url).get_trials()
    except KeyError:  # no worker has created it yet
        return []


def _connections(server: PostgresServer, database: str) -> int:
    import sqlalchemy

    engine = sqlalchemy.create_engine(server.url("postgres"), poolclass=sqlalchemy.pool.NullPool)
    query = sqlalchemy.text("SELECT count(*) FROM pg_stat_activity WHERE datname = :db")
    with engine.connect() as c:
        return int(c.execute(query, {"db": database}).scalar_one())


def _owner(proc: subprocess.Popen[str]) -> str:
    return f"{socket.gethostname()}:{proc.pid}"


def _kill_mid_trial(proc: subprocess.Popen[str], url: str, study: str, sweep_dir: Path, log: Path) -> int:
    """SIGKILL ``proc`` once a trial it runs has trained an epoch (its last.pt exists): that trial."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the worker ended before it could be killed:\n" + log.read_text()[-3000:]
        mine = [
            t.number
            for t in _trials(url, study)
            if t.state == S.RUNNING and t.user_attrs.get(search.SWEEPER) == _owner(proc)
        ]
        if mine and (sweep_dir / f"trial{mine[0]}" / "last.pt").exists():
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            return mine[0]
        time.sleep(0.2)
    raise AssertionError("no trial of the worker reached its first epoch:\n" + log.read_text()[-3000:])


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def _check_trials(trials: list[optuna.trial.FrozenTrial], sweep_dir: Path, n_trials: int) -> None:
    """Unique numbers, n_trials that count (completed or pruned: none left running or waiting),
    each with its run directory, every completed one valued at its run's val/f1_macro."""
    assert sorted(t.number for t in trials) == list(range(len(trials)))  # none twice, none missing
    counted = [t for t in trials if t.state in (S.COMPLETE, S.PRUNED)]
    assert len(counted) == n_trials, [(t.number, t.state.name) for t in trials]
    assert {t.state for t in trials} <= {S.COMPLETE, S.PRUNED, S.FAIL}
    for t in counted:
        run_dir = Path(t.user_attrs[search.RUN_DIR])
        assert run_dir == sweep_dir / f"trial{t.number}"
        metrics = _metrics(run_dir)
        if t.state == S.COMPLETE:
            assert t.value == metrics["val"]["f1_macro"]
        else:  # pruned: stopped at the epoch the pruner named, like an early stop
            assert metrics["run"]["epochs_trained"] == t.user_attrs[pruning.PRUNED_AT]
            assert metrics["run"]["stopped_early"] is True


def _retried_as(trials: dict[int, optuna.trial.FrozenTrial], number: int) -> optuna.trial.FrozenTrial:
    """The trial that ran ``number``'s parameters again (following retries of retries): asked
    again by a sweeper that found its process gone (user attribute), or by Optuna's stale-trial
    callback (its retry history)."""

    def retry_of(t: optuna.trial.FrozenTrial) -> int | None:
        history = t.system_attrs.get("retry_history")
        return history[-1] if history else t.user_attrs.get(sharing.RETRY_OF)

    (again,) = [t for t in trials.values() if retry_of(t) == number]
    assert again.params == trials[number].params
    return _retried_as(trials, again.number) if again.state == S.FAIL else again


def _rerun_best(sweep_dir: Path, tmp_path: Path) -> None:
    """best.sh trains the best trial again: the same validation scores, no study touched."""
    best = OmegaConf.load(sweep_dir / "best.yaml")
    path = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # its mer-train
    rerun = tmp_path / "rerun"
    script = ["sh", str(sweep_dir / "best.sh"), f"hydra.run.dir={rerun}"]
    proc = run(script, cwd=tmp_path, env=path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _metrics(rerun)["val"] == _metrics(Path(best.run_dir))["val"]
    assert _metrics(rerun)["val"]["f1_macro"] == best.value


def test_two_workers_share_one_study_each_trial_once_and_best_sh_reproduces_the_best(postgres, tmp_path):
    url = postgres.create_database("shared")
    sweep_dir, n_trials = tmp_path / "search", 4
    logs = [tmp_path / "worker0.log", tmp_path / "worker1.log"]
    workers = [_worker(sweep_dir, url, "shared", n_trials, log) for log in logs]
    connections = []  # the study database's, while they run: a few per worker, not more per trial
    while any(p.poll() is None for p in workers):
        connections.append(_connections(postgres, "shared"))
        time.sleep(0.5)
    for proc, log in zip(workers, logs, strict=True):
        _finish(proc, log)
    assert max(connections) <= 5 * len(workers), connections

    trials = _trials(url, "shared")
    assert len(trials) == n_trials  # together they asked exactly n_trials, no more
    _check_trials(trials, sweep_dir, n_trials)
    by_owner = {_owner(p): [t for t in trials if t.user_attrs[search.SWEEPER] == _owner(p)] for p in workers}
    assert all(by_owner.values()), by_owner.keys()  # both workers ran trials
    # each worker draws from its own sampler seed: their first trials differ
    first = [min(mine, key=lambda t: t.number).params for mine in by_owner.values()]
    assert first[0] != first[1]

    study = optuna.load_study(study_name="shared", storage=url)
    best = OmegaConf.load(sweep_dir / "best.yaml")
    assert (best.trial, best.value) == (study.best_trial.number, study.best_value)
    _rerun_best(sweep_dir, tmp_path)
    assert len(_trials(url, "shared")) == n_trials


def test_killed_workers_trials_fail_and_run_again_and_a_new_worker_finishes_the_study(postgres, tmp_path):
    url = postgres.create_database("killed")
    sweep_dir, n_trials = tmp_path / "search", 4
    logs = [tmp_path / f"worker{i}.log" for i in range(3)]
    a, b = (_worker(sweep_dir, url, "killed", n_trials, log) for log in logs[:2])
    try:
        killed_a = _kill_mid_trial(a, url, "killed", sweep_dir, logs[0])
        killed_b = _kill_mid_trial(b, url, "killed", sweep_dir, logs[1])  # every worker is stopped
    finally:
        a.kill()
        b.kill()
    trials = {t.number: t for t in _trials(url, "killed")}
    assert trials[killed_b].state == S.RUNNING  # nobody left to tell it

    # worker b's trial as if its sweeper ran on another machine: only its heartbeat tells it died
    storage = optuna.storages.RDBStorage(url)
    storage.set_trial_user_attr(trials[killed_b]._trial_id, search.SWEEPER, "elsewhere:1")
    time.sleep(2.5)  # past the grace period (2 heartbeats) of its last heartbeat

    c = _worker(sweep_dir, url, "killed", n_trials, logs[2])
    _finish(c, logs[2])
    trials = {t.number: t for t in _trials(url, "killed")}
    for killed in (killed_a, killed_b):
        assert trials[killed].state == S.FAIL, killed  # never counted complete
        assert sharing.ERROR not in trials[killed].user_attrs  # failed by its death, not by training
        assert _retried_as(trials, killed).state in (S.COMPLETE, S.PRUNED)
    # a's trial was found by its dead process (this machine), b's by its heartbeat's silence
    # (Optuna's stale-trial retry); one warning line each
    assert any(killed_b in t.system_attrs.get("retry_history", ()) for t in trials.values())
    said = "".join(log.read_text() for log in logs[1:])
    assert f"trial {killed_a} was left running by a sweeper that is gone: asked again" in said
    assert f"trial {killed_b}: its heartbeat stopped (sweeper elsewhere:1): failed, asked again" in said
    _check_trials(list(trials.values()), sweep_dir, n_trials)
    _rerun_best(sweep_dir, tmp_path)

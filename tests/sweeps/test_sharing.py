"""Several sweepers on one study (mer_cli.sweeps.sharing) on SQLite: they take turns asking, so
together they ask n_trials; which trials count; a trial whose heartbeat stopped is failed and
asked again while a beating one is left alone. (PostgreSQL: tests/integration.)"""

from __future__ import annotations

import logging
import threading
import time

import optuna
import pytest

from mer_cli.sweeps import search, sharing

S = optuna.trial.TrialState
SPACE = {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}


@pytest.mark.slow  # SQLite sessions of three threads: seconds
def test_sweepers_asking_in_turns_ask_n_trials_together(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="s", storage=url)
    n_trials, asked = 6, []

    def sweeper() -> None:  # the sweeper's loop, its jobs finishing at once
        study = optuna.load_study(study_name="s", storage=sharing.storage_of(url, None))
        lock = sharing.AskLock(url, "s")
        while True:
            with lock:
                if n_trials - sharing.n_counted(study) <= 0:
                    return
                trial = sharing.ask(study, SPACE)
                asked.append(trial.number)
            time.sleep(0.005)  # running: the others count it
            study.tell(trial, trial.params["x"])

    threads = [threading.Thread(target=sweeper) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    trials = optuna.load_study(study_name="s", storage=url).trials
    assert sorted(asked) == [t.number for t in trials] == list(range(n_trials))
    assert {t.state for t in trials} == {S.COMPLETE}


def test_what_counts_towards_n_trials():
    study = optuna.create_study()
    done, pruned, failed, abandoned = (study.ask(SPACE) for _ in range(4))
    study.tell(done, 0.5)
    study.tell(pruned, state=S.PRUNED)
    failed.set_user_attr(sharing.ERROR, "the job failed")
    study.tell(failed, state=S.FAIL)  # failed while it trained: it counts
    study.tell(abandoned, state=S.FAIL)  # its sweeper died: asked again, it does not count
    study.ask(SPACE)  # running in some sweeper: counts
    study.enqueue_trial({"x": 0.1})  # waiting to be asked: not yet
    assert sharing.n_counted(study) == 4


def test_a_trial_left_running_by_a_dead_sweeper_on_this_machine_is_failed_and_asked_again():
    study = optuna.create_study()
    dead, alive = study.ask(SPACE), study.ask(SPACE)
    gone = search.sweeper_id().rpartition(":")[0] + ":999999999"  # no such process
    dead.set_user_attr(search.SWEEPER, gone)
    alive.set_user_attr(search.SWEEPER, search.sweeper_id())
    sharing.reclaim(study)
    trials = study.get_trials()
    assert [t.state for t in trials] == [S.FAIL, S.RUNNING, S.WAITING]
    assert trials[2].system_attrs["fixed_params"] == trials[0].params  # what its ask will give
    assert trials[2].user_attrs == {sharing.RETRY_OF: 0}


@pytest.mark.slow  # waits out a heartbeat's grace period (2 s)
def test_a_trial_whose_heartbeat_stopped_is_failed_and_asked_again_a_beating_one_is_not(tmp_path, caplog):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    storage = sharing.storage_of(url, heartbeat_interval=1)
    storage.grace_period = 1
    study = optuna.create_study(storage=storage)
    stopped, beating = sharing.ask(study, SPACE), sharing.ask(study, SPACE)
    stopped.set_user_attr(search.SWEEPER, "elsewhere:1")  # a sweeper on another machine
    with sharing.heartbeats(storage, [stopped._trial_id]):
        pass  # one heartbeat, then silence (its sweeper on another machine was lost)
    with sharing.heartbeats(storage, [beating._trial_id]):
        time.sleep(2.2)  # SQLite's clock has whole seconds
        with caplog.at_level(logging.WARNING, logger="mer_cli.sweeps.sharing"):
            sharing.reclaim(study)
    trials = study.get_trials()
    assert [t.state for t in trials] == [S.FAIL, S.RUNNING, S.WAITING]
    assert trials[2].params == trials[0].params
    assert trials[2].system_attrs["retry_history"] == [0]  # Optuna's stale-trial retry
    assert sharing.n_counted(study) == 1  # the beating one; the retry waits to be asked
    assert [r.getMessage() for r in caplog.records] == [
        "trial 0: its heartbeat stopped (sweeper elsewhere:1): failed, asked again"
    ]


def test_a_storage_url_in_a_log_line_hides_its_password():
    assert (
        sharing.shown("postgresql+psycopg2://mer:secret@db:5432/s")
        == "postgresql+psycopg2://mer:***@db:5432/s"
    )
    assert sharing.shown("sqlite:////tmp/optuna.db") == "sqlite:////tmp/optuna.db"

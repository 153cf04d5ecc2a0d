"""Hyperparameter search (mer_cli.search, the mer_optuna sweeper): search spaces, the study in its
SQLite file, objective = validation macro F1, pruning, best.yaml/best.sh, resume after a crash."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from omegaconf import OmegaConf

from conftest import REPO, cli_command, cli_env, compose_train, run, run_cli
from mer_cli.sweeps import search
from mer_cli.training import loop, pruning

# seconds per trial: one small stream, few clips, no figures
TINY = (
    "experiment=smoke",
    "modality=visual",
    "data.limit_per_split=24",
    "runtime.save_plots=false",
)


def _study(sweep_dir: Path) -> optuna.Study:
    return optuna.load_study(study_name=sweep_dir.name, storage=f"sqlite:///{sweep_dir / 'optuna.db'}")


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def _history(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "history.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_search_space_syntax_becomes_optuna_distributions_and_overrides():
    space, fixed = search.space_of(
        {
            "model": "choice(bilstm, gru)",
            "trainer.optimizer.lr": "tag(log, interval(1e-4, 1e-2))",
            "model.dropout": "interval(0.1, 0.5)",
            "trainer.loop.max_epochs": "tag(int, interval(2, 9))",
            "trainer.loop.batch_size": "range(16, 80, 16)",
            "model.encoder.hidden_sizes": "choice([8,8],[16,16])",
            "seed": "3",
        }
    )
    d = optuna.distributions
    assert space["model"] == d.CategoricalDistribution(["bilstm", "gru"])
    assert space["trainer.optimizer.lr"] == d.FloatDistribution(1e-4, 1e-2, log=True)
    assert space["model.dropout"] == d.FloatDistribution(0.1, 0.5)
    assert space["trainer.loop.max_epochs"] == d.IntDistribution(2, 9)
    assert space["trainer.loop.batch_size"] == d.IntDistribution(16, 64, step=16)  # Hydra's stop is exclusive
    assert space["model.encoder.hidden_sizes"] == d.CategoricalDistribution(["[8,8]", "[16,16]"])
    assert fixed == ["seed=3"]
    # layer sizes picked one scalar per layer are joined into the list the encoder reads
    assert search.overrides_of(
        {"model.encoder.hidden_sizes.1": 8, "model.dropout": 0.25, "model.encoder.hidden_sizes.0": 32}
    ) == ["model.dropout=0.25", "model.encoder.hidden_sizes=[32,8]"]


def test_search_presets_compose_and_name_existing_keys():
    from mer_cli.cli.commands import config_dir

    presets = sorted(p.stem for p in (Path(config_dir()) / "hparams_search").glob("*.yaml"))
    assert "default" in presets
    for preset in presets:
        cfg = compose_train(f"hparams_search={preset}", with_hydra=True)
        assert cfg.hydra.sweeper._target_ == "hydra_plugins.mer_optuna_sweeper.sweeper.OptunaSweeper"
        assert cfg.compare.enabled is False
        space, _ = search.space_of(dict(cfg.hydra.sweeper.params))
        # every trial's overrides compose (a misspelt key would not): the lowest choice of each
        low = {
            k: v.choices[0] if isinstance(v, optuna.distributions.CategoricalDistribution) else v.low
            for k, v in space.items()
        }
        trial_cfg = compose_train(f"hparams_search={preset}", *search.overrides_of(low))
        assert trial_cfg.trainer.optimizer.lr == low["trainer.optimizer.lr"]
        assert len(trial_cfg.model.encoder.hidden_sizes) >= 1


@pytest.mark.parametrize("pruner", ["median", "hyperband", "threshold", "none"])
def test_pruner_presets_build_optuna_pruners(pruner):
    from hydra.utils import instantiate

    cfg = compose_train("hparams_search=default", f"hydra/sweeper/pruner={pruner}", with_hydra=True)
    built = instantiate(cfg.hydra.sweeper.pruner)
    assert type(built).__name__.lower().startswith({"none": "nop"}.get(pruner, pruner))


@pytest.mark.slow
def test_a_job_reports_each_epoch_and_stops_when_the_median_pruner_says_so(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    # what the sweeper stores: the pruner every job rebuilds in its own process
    study.set_user_attr("pruner", {"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": 1})
    done = study.ask()
    for epoch, value in ((1, 0.4), (2, 0.5)):
        done.report(value, epoch)
    study.tell(done, 0.5)

    good, bad = study.ask(), study.ask()
    report_good = pruning.epoch_reporter({"storage": storage, "study": "s", "trial": good.number})
    report_bad = pruning.epoch_reporter({"storage": storage, "study": "s", "trial": bad.number})
    assert report_good is not None and report_bad is not None
    report_good({"epoch": 1, "val/f1_macro": 0.45})  # above the median at epoch 1: trains on
    with pytest.raises(loop.StopTraining):
        report_bad({"epoch": 1, "val/f1_macro": 0.1})
    trials = {t.number: t for t in optuna.load_study(study_name="s", storage=storage).trials}
    assert trials[good.number].intermediate_values == {1: 0.45}
    assert trials[bad.number].intermediate_values == {1: 0.1}
    assert trials[bad.number].user_attrs[pruning.PRUNED_AT] == 1
    assert pruning.PRUNED_AT not in trials[good.number].user_attrs
    assert pruning.epoch_reporter(None) is None  # outside a search: no callback


def _search(sweep_dir: Path, *overrides: str, n_trials: int) -> subprocess.CompletedProcess[str]:
    return run_cli(
        "train",
        "-m",
        "hparams_search=default",
        *TINY,
        f"hydra.sweeper.n_trials={n_trials}",
        f"hydra.sweep.dir={sweep_dir}",
        *overrides,
    )


@pytest.mark.slow
def test_a_crashed_search_resumes_and_its_best_trial_reruns_to_the_same_validation_score(tmp_path):
    sweep_dir = tmp_path / "search"
    cmd = cli_command("train", "-m", "hparams_search=default", *TINY)
    cmd += ["hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep_dir}"]
    # crash: kill -9 the sweeper as it launches its second trial
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=cli_env({"PYTHONUNBUFFERED": "1"}),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "] trial 1: " in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen[-20:])
    states = [t.state for t in _study(sweep_dir).trials]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING]

    # the same command again: the study continues from its SQLite file to 2 finished trials
    proc2 = _search(sweep_dir, n_trials=2)
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    study = _study(sweep_dir)
    s = optuna.trial.TrialState
    assert [t.state for t in study.trials] == [s.COMPLETE, s.FAIL, s.COMPLETE]
    assert study.trials[2].params == study.trials[1].params  # the abandoned trial is tried again

    # the objective is each trial's validation macro F1 as its run wrote it (never test), and
    # each epoch's val/f1_macro was reported to the trial
    for trial in (study.trials[0], study.trials[2]):
        run_dir = Path(trial.user_attrs["run_dir"])
        assert run_dir == sweep_dir / f"trial{trial.number}"
        assert trial.value == _metrics(run_dir)["val"]["f1_macro"]
        reported = {int(r["epoch"]): float(r["val/f1_macro"]) for r in _history(run_dir)}
        assert trial.intermediate_values == reported

    best = OmegaConf.load(sweep_dir / "best.yaml")
    top = max(study.trials[i].value for i in (0, 2))
    assert best.value == top and best.trial == study.best_trial.number
    assert best.config.model == OmegaConf.load(Path(best.run_dir) / "config.yaml").model
    for name in ("optimization_history", "param_importances", "intermediate_values"):
        assert (sweep_dir / "figures" / f"{name}.png").stat().st_size > 0

    # best.sh reruns the best trial as it ran: the same validation score, and no study touched
    script = (sweep_dir / "best.sh").read_text().splitlines()
    assert script[-1].startswith("mer-train ") and script[-1].endswith(' "$@"')
    rerun = tmp_path / "rerun"
    path = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # its mer-train
    proc3 = run(
        ["sh", str(sweep_dir / "best.sh"), f"hydra.run.dir={rerun}"], cwd=tmp_path, env=path, timeout=300
    )
    assert proc3.returncode == 0, proc3.stderr[-3000:]
    assert _metrics(rerun)["val"] == _metrics(Path(best.run_dir))["val"]
    assert len(_study(sweep_dir).trials) == 3


@pytest.mark.slow
def test_the_pruner_stops_a_hopeless_trial_after_its_first_epoch(tmp_path):
    # forced: no trial can reach a val/f1_macro above 1.01, so every one is hopeless
    sweep_dir = tmp_path / "search"
    proc = _search(
        sweep_dir,
        "trainer.loop.max_epochs=3",
        "trainer.loop.patience_epochs=3",
        "hydra/sweeper/pruner=threshold",
        "hydra.sweeper.pruner.lower=1.01",
        "hydra.sweeper.pruner.n_warmup_steps=0",
        n_trials=1,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = _study(sweep_dir)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.PRUNED]
    for trial in study.trials:
        run = _metrics(sweep_dir / f"trial{trial.number}")["run"]
        assert (run["epochs_trained"], run["stopped_early"]) == (1, True)  # of 3
        assert trial.user_attrs[pruning.PRUNED_AT] == 1
    assert not (sweep_dir / "best.yaml").exists()  # no trial completed


@pytest.mark.slow
def test_without_optuna_a_search_is_one_line_naming_the_extra(tmp_path):
    code = (
        "import sys; sys.modules['optuna'] = None; from mer_cli.cli import entry; "
        f"sys.argv = ['mer-train', '-m', 'hparams_search=default', 'hydra.sweep.dir={tmp_path / 's'}']; "
        "entry.train()"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "mer-train: error: hyperparameter search needs Optuna: pip install 'mer-cli[sweep]'"
    )
    assert not (tmp_path / "s" / "optuna.db").exists()


def test_best_yaml_of_a_trial_trained_on_another_machine_names_it_without_its_config(tmp_path):
    # several sweepers share a study: the best run may be in another machine's sweep directory
    study = optuna.create_study(direction="maximize")
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    trial.set_user_attr(search.RUN_DIR, "/elsewhere/search/trial0")
    trial.set_user_attr(search.OVERRIDES, ["seed=1"])
    study.tell(trial, 0.5)
    written = search.write_results(study, tmp_path, {})
    best = OmegaConf.load(tmp_path / "best.yaml")
    assert (best.run_dir, best.value, best.config) == ("/elsewhere/search/trial0", 0.5, None)
    assert tmp_path / "best.sh" in written

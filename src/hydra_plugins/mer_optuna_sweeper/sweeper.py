"""OptunaSweeper: Optuna's ask/tell loop over Hydra's launcher (``hydra/sweeper=mer_optuna``).

Per batch of ``n_jobs`` trials: ask Optuna, turn each trial's parameters into overrides, launch
the jobs through ``hydra/launcher`` (basic, joblib, submitit: any), tell Optuna each job's return
value (val/f1_macro), or that its run was pruned or failed. The study lives in Optuna's storage
(by default ``optuna.db`` in the sweep directory), so the same command with the same
``hydra.sweep.dir`` resumes a search that crashed; trials its dead sweeper left running are
marked failed and asked again. Several sweepers may share one study (the same ``storage`` and
``study_name``: `mer_cli.sweeps.sharing`): they ask under one lock, ``n_trials`` in all, and a
killed one's trial is failed (at once on its machine, after its heartbeat's grace period from
elsewhere) and asked again. Only Hydra is imported at module level: Hydra imports every
plugin module at start-up, and Optuna is an optional extra.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from mer_cli.core.artifacts import write_text
from mer_cli.sweeps import search, sharing
from mer_cli.training import pruning

log = logging.getLogger(__name__)


class OptunaSweeper(Sweeper):
    """Configured by configs/hydra/sweeper/mer_optuna.yaml (every argument is a key there)."""

    def __init__(
        self,
        n_trials: int,
        n_jobs: int,
        direction: str,
        storage: str | None,
        study_name: str | None,
        sampler: DictConfig,
        pruner: DictConfig,
        params: DictConfig | None,
        heartbeat_interval: int | None,
    ) -> None:
        self.n_trials = int(n_trials)
        self.n_jobs = int(n_jobs)
        self.direction = direction
        self.storage = storage
        self.study_name = study_name
        self.heartbeat_interval = None if heartbeat_interval is None else int(heartbeat_interval)
        # config nodes (_recursive_: false): the sampler's seed depends on the study, and every
        # job builds the same pruner from the study's copy of this node
        self.sampler_cfg = sampler
        self.pruner_cfg = pruner
        self.params = {str(k): str(v) for k, v in (params or {}).items()}
        self.hydra_context: HydraContext | None = None
        self.config: DictConfig | None = None
        self.launcher: Any = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> Any:
        from mer_cli.core.console import fail
        from mer_cli.core.errors import MerError

        try:
            return self._sweep(arguments)
        except MerError as e:  # a bad search space or storage, Optuna missing: one line, as mer-train's
            fail("mer-train", str(e))

    def _sweep(self, arguments: list[str]) -> Any:
        from hydra.utils import instantiate

        assert self.config is not None and self.hydra_context is not None and self.launcher is not None
        optuna = pruning.require_optuna()
        if self.n_trials < 1 or self.n_jobs < 1:
            raise search.ConfigError(
                f"hydra.sweeper.n_trials={self.n_trials}, n_jobs={self.n_jobs}: both must be at least 1"
            )
        sweep_dir = Path(self.config.hydra.sweep.dir).resolve()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        # atomic: several sweepers of one study may share the sweep directory
        write_text(sweep_dir / "multirun.yaml", OmegaConf.to_yaml(self.config))

        # the command line: a sweep (choice, interval, ...) adds to or replaces the preset's
        # search space; a plain value goes to every trial as written
        params = dict(self.params)
        fixed_cli: list[str] = []
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        for text, override in zip(arguments, parser.parse_overrides(arguments), strict=True):
            if override.is_sweep_override():
                params[override.get_key_element()] = text.partition("=")[2]
            else:
                fixed_cli.append(text)
        space, fixed = search.space_of(params)
        cli_keys = {t.partition("=")[0].lstrip("+~") for t in fixed_cli}
        fixed = [f for f in fixed if f.partition("=")[0] not in cli_keys] + fixed_cli

        url = self.storage or f"sqlite:///{sweep_dir / search.STORAGE_FILE}"
        study_name = self.study_name or sweep_dir.name
        lock = sharing.AskLock(url, study_name)
        storage: Any = None
        study: Any = None
        returns = []
        try:
            while True:
                # one sweeper at a time reclaims dead trials, counts and asks: several sweepers on
                # one study together ask n_trials, no more
                with lock:
                    if study is None:
                        # under the lock too: sweepers starting at once on a fresh database would
                        # otherwise race to create Optuna's tables (PostgreSQL: a duplicate-type error)
                        storage = sharing.storage_of(url, self.heartbeat_interval)
                        study = self._open(optuna, instantiate, storage, url, study_name)
                    sharing.reclaim(study)
                    todo = self.n_trials - sharing.n_counted(study)
                    if todo <= 0:
                        break
                    trials = [sharing.ask(study, space) for _ in range(min(self.n_jobs, todo))]
                    for trial in trials:
                        trial.set_user_attr(search.SWEEPER, search.sweeper_id())
                        trial.set_user_attr(search.OVERRIDES, [*fixed, *search.overrides_of(trial.params)])
                batch = []
                for trial in trials:
                    overrides = [*fixed, *search.overrides_of(trial.params)]
                    link = f"search={{storage:{_quote(url)},study:{_quote(study_name)},trial:{trial.number}}}"
                    batch.append([*overrides, link])
                    log.info("trial %d: %s", trial.number, " ".join(search.overrides_of(trial.params)))
                self.validate_batch_is_legal(batch)
                with sharing.heartbeats(storage, [trial._trial_id for trial in trials]):
                    results = self.launcher.launch(batch, initial_job_idx=trials[0].number)
                for trial, result in zip(trials, results, strict=True):
                    self._tell(optuna, search, study, trial, result)
                returns.append(results)

            with lock:  # the last sweeper to finish writes what every trial of the study gives
                for path in search.write_results(study, sweep_dir, space):
                    log.info("wrote %s", path)
        finally:
            lock.close()
        if any(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
            best = study.best_trial
            log.info("best: trial %d, %s %.4f: %s", best.number, pruning.OBJECTIVE, best.value, best.params)
        return returns

    def _open(self, optuna: Any, instantiate: Any, storage: Any, url: str, study_name: str) -> Any:
        """The study, created or loaded under the ask lock: the sampler's seed plus the trials the
        study holds, so a resumed search, and each of several sweepers, draws its own points."""
        existing = _n_trials_in(optuna, storage, study_name)
        sampler_cfg = OmegaConf.to_container(self.sampler_cfg, resolve=True)
        assert isinstance(sampler_cfg, dict)
        if sampler_cfg.get("seed") is not None:
            sampler_cfg["seed"] = int(sampler_cfg["seed"]) + existing
        pruner_cfg = OmegaConf.to_container(self.pruner_cfg, resolve=True)
        study = optuna.create_study(
            study_name=study_name,
            storage=storage,
            sampler=instantiate(sampler_cfg),
            pruner=instantiate(pruner_cfg),
            direction=self.direction,
            load_if_exists=True,
        )
        study.set_user_attr("pruner", pruner_cfg)  # jobs build the same pruner in their own process
        shown = sharing.shown(url)
        log.info("study %s in %s: %d trials so far, %d wanted", study_name, shown, existing, self.n_trials)
        return study

    @staticmethod
    def _tell(optuna: Any, search: Any, study: Any, trial: Any, result: Any) -> None:
        states = optuna.trial.TrialState
        try:
            value = search.value_of(result.return_value)
            error = None if math.isfinite(value) else "the job failed (see failed.json in its directory)"
        except Exception as e:  # the launcher captured an exception the job did not handle
            value, error = math.nan, f"{type(e).__name__}: {e}"
        # the job wrote this on the trial if the pruner stopped it (it ran in its own process)
        frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
        if frozen.state != states.RUNNING:  # failed by another sweeper: its heartbeat had stopped
            log.warning("trial %d was %s by another sweeper: not told", trial.number, frozen.state.name)
            return
        if result.hydra_cfg is not None:
            trial.set_user_attr(
                search.RUN_DIR, str(Path(result.hydra_cfg.hydra.runtime.output_dir).resolve())
            )
        if error is not None:
            trial.set_user_attr(sharing.ERROR, error)
            study.tell(trial, state=states.FAIL)
            log.warning("trial %d failed: %s", trial.number, error)
        elif pruning.PRUNED_AT in frozen.user_attrs:
            study.tell(trial, state=states.PRUNED)
            log.info("trial %d pruned at epoch %d", trial.number, frozen.user_attrs[pruning.PRUNED_AT])
        else:
            study.tell(trial, value)
            log.info("trial %d: %s %.4f", trial.number, pruning.OBJECTIVE, value)


def _quote(text: str) -> str:
    """A string as a quoted value in Hydra's override grammar."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _n_trials_in(optuna: Any, storage: Any, study_name: str) -> int:
    try:
        return len(optuna.load_study(study_name=study_name, storage=storage).get_trials(deepcopy=False))
    except KeyError:  # a new study
        return 0

"""A search trial's per-epoch reports: each epoch's val/f1_macro to the Optuna trial, and an
early stop when the study's pruner says so. Optuna is imported only when a trial asks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from mer_cli.core.errors import ConfigError, MerError
from mer_cli.training.loop import StopTraining

log = logging.getLogger(__name__)


OBJECTIVE = "val/f1_macro"  # the history column reported per epoch; mer-train returns its final value


# trial user attributes: set by a job when the pruner stopped it; by the sweeper on a trial whose
# sweeper died (it is retried as a new trial), and to rerun a trial (its overrides, its run directory)
PRUNERS = "optuna.pruners."  # the only callables a study's stored pruner config may name
PRUNED_AT = "pruned_at_epoch"


def require_optuna() -> Any:
    """The optuna module, or one error line saying how to install it."""
    try:
        import optuna
    except ImportError:
        raise MerError("hyperparameter search needs Optuna: pip install 'mer-cli[sweep]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweeper logs each trial itself
    return optuna


def checked_pruner(cfg: Any) -> dict[str, Any]:
    """The pruner a study's storage names (its config, as the sweeper stored it), if it is one of
    Optuna's own pruners with plain arguments: a storage is data, so it may name nothing else."""
    target = cfg.get("_target_") if isinstance(cfg, dict) else None
    plain = isinstance(cfg, dict) and all(
        isinstance(v, (bool, int, float, str, type(None))) for k, v in cfg.items() if k != "_target_"
    )
    if not (isinstance(target, str) and target.startswith(PRUNERS) and plain):
        raise ConfigError(f"the study's pruner {cfg!r} is not one of Optuna's pruners ({PRUNERS}*)")
    return cfg


def epoch_reporter(link: Mapping[str, Any] | None) -> Callable[[dict[str, float]], None] | None:
    """For ``train.fit``'s ``on_epoch``: report each epoch's val/f1_macro to the trial ``link``
    names (``{storage, study, trial}``, set by the sweeper); None outside a search.

    When the study's pruner prunes the trial, it records the epoch on the trial and raises
    `train.StopTraining`: the run ends as after an early stop, and the sweeper tells Optuna.
    """
    if not link:
        return None
    optuna = require_optuna()
    import sqlalchemy.pool
    from hydra.utils import instantiate

    # a connection per report, closed after it: with Hydra's basic launcher every trial is a job
    # in the sweeper's process, and pooled connections would pile up until a database server
    # refuses more (PostgreSQL's 100 by default: 2 per trial, a search stopped at about trial 45)
    unpooled = {"poolclass": sqlalchemy.pool.NullPool}
    storage = optuna.storages.RDBStorage(link["storage"], engine_kwargs=unpooled)
    try:
        study_id = storage.get_study_id_from_name(link["study"])
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, int(link["trial"]))
    except KeyError as e:
        raise ConfigError(f"search={dict(link)}: no such study or trial in the storage ({e})") from None
    pruner_cfg = storage.get_study_user_attrs(study_id).get("pruner")
    pruner = instantiate(checked_pruner(pruner_cfg)) if pruner_cfg else optuna.pruners.NopPruner()
    study = optuna.load_study(study_name=link["study"], storage=storage, pruner=pruner)
    trial = optuna.trial.Trial(study, trial_id)

    def report(row: dict[str, float]) -> None:
        epoch = int(row["epoch"])
        try:
            trial.report(float(row[OBJECTIVE]), step=epoch)
            pruned = trial.should_prune()
        except RuntimeError as e:  # the trial was finished elsewhere (its sweeper died): train on
            log.warning("trial %s: not reported: %s", link["trial"], e)
            return
        if pruned:
            trial.set_user_attr(PRUNED_AT, epoch)
            raise StopTraining(f"trial {link['trial']} pruned by {type(pruner).__name__}")

    return report


def reporting(
    on_epoch: Callable[[dict[str, float]], None], link: Mapping[str, Any] | None
) -> Callable[[dict[str, float]], None]:
    """``on_epoch`` (e.g. the tracker's), then, in a search trial, `epoch_reporter`'s report: the
    epoch a pruner stops at is logged like every other."""
    report = epoch_reporter(link)
    if report is None:
        return on_epoch

    def both(row: dict[str, float]) -> None:
        on_epoch(row)
        report(row)

    return both

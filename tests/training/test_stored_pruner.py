"""A study's storage is data: the pruner config a trial reads back from it may name only one of
Optuna's pruners with plain arguments; anything else is refused before it is built."""

from __future__ import annotations

import pytest

from mer_cli.core.errors import ConfigError
from mer_cli.training import pruning


def test_optunas_own_pruners_with_plain_arguments_pass():
    cfg = {"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": 5, "n_warmup_steps": 3}
    assert pruning.checked_pruner(cfg) == cfg


@pytest.mark.parametrize(
    "cfg",
    [
        {"_target_": "os.system", "command": "touch /tmp/x"},
        {"_target_": "optuna.pruners_evil.Thing"},
        {"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": {"_target_": "os.getcwd"}},
        ["optuna.pruners.MedianPruner"],
    ],
)
def test_anything_else_in_the_storage_is_refused(cfg):
    with pytest.raises(ConfigError, match="is not one of Optuna's pruners"):
        pruning.checked_pruner(cfg)

"""Hyperparameter search with Optuna: search spaces from config, a trial's per-epoch reports, and
what a finished search leaves in its sweep directory.

The sweeper (``hydra_plugins.mer_optuna_sweeper``, Hydra's Sweeper plugin interface) asks Optuna
for trials, turns each trial's parameters into command-line overrides (`space_of`,
`overrides_of`), launches them through the configured Hydra launcher and tells Optuna each job's
return value (val/f1_macro: never test). Every job gets ``search={storage, study, trial}``: it
reopens the study in its own process (a launcher may run it anywhere the storage reaches) and
`epoch_reporter` reports each epoch's val/f1_macro to the trial; when the study's pruner says
so, training stops like an early stop, the run is evaluated and written as usual, and the
sweeper tells Optuna the trial was pruned. At the end `write_results` writes ``best.yaml``,
``best.sh`` and the study's figures.

Optuna is imported inside the functions that need it: the core install has none.
"""

from __future__ import annotations

import logging
import math
import os
import shlex
import socket
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from mer_cli.core.artifacts import atomic_open, write_text
from mer_cli.core.errors import ConfigError
from mer_cli.training.pruning import OBJECTIVE, require_optuna

log = logging.getLogger(__name__)


STORAGE_FILE = "optuna.db"  # the default storage: a SQLite file in the sweep directory


INTERRUPTED = "interrupted"


OVERRIDES = "overrides"


RUN_DIR = "run_dir"


SWEEPER = "sweeper"  # host:pid of the sweeper that asked for the trial


def space_of(params: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
    """``{key: "choice(...)" | "interval(lo, hi)" | "tag(log, interval(lo, hi))" |
    "range(lo, hi, step)" | value}`` -> (Optuna distributions by key, fixed overrides).

    ``tag(log, ...)`` samples on a log scale, ``tag(int, interval(...))`` integers. A key ending
    in ``.<i>`` is entry i of a list (``model.encoder.hidden_sizes.0``): the sampler picks each
    layer's size as a scalar and `overrides_of` joins them into one list.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from hydra.errors import HydraException

    optuna = require_optuna()
    dist = optuna.distributions
    parser = OverridesParser.create()
    space: dict[str, Any] = {}
    fixed: list[str] = []
    for key, value in params.items():
        text = f"{key}={value}"
        try:
            (override,) = parser.parse_overrides([text])
        except HydraException as e:
            raise ConfigError(f"search space: {text}: {' '.join(str(e).split())}") from None
        if not override.is_sweep_override():
            fixed.append(f"{key}={override.get_value_element_as_str()}")
            continue
        sweep = override.value()
        if isinstance(sweep, ChoiceSweep):
            # Optuna stores numbers, strings and booleans; other choices (lists) as their override text
            texts = list(override.sweep_string_iterator())
            choices = [
                c if isinstance(c, (bool, int, float, str)) else t
                for c, t in zip(sweep.list, texts, strict=True)
            ]
            space[key] = dist.CategoricalDistribution(choices)
        elif isinstance(sweep, IntervalSweep):
            log_scale = "log" in sweep.tags
            if "int" in sweep.tags:
                space[key] = dist.IntDistribution(int(sweep.start or 0), int(sweep.end or 0), log=log_scale)
            else:
                space[key] = dist.FloatDistribution(
                    float(sweep.start or 0), float(sweep.end or 0), log=log_scale
                )
        elif isinstance(sweep, RangeSweep):
            start, stop, step = int(sweep.start), int(sweep.stop), int(sweep.step)  # type: ignore[arg-type]
            high = start + (stop - start - 1) // step * step  # Hydra's stop is exclusive, Optuna's high not
            space[key] = dist.IntDistribution(start, high, step=step)
        else:
            raise ConfigError(f"search space: {text}: use choice, interval, tag or range")
    return space, fixed


def overrides_of(params: Mapping[str, Any]) -> list[str]:
    """A trial's parameters as overrides; ``key.<i>`` entries become one list ``key=[...]``."""
    lists: dict[str, dict[int, Any]] = {}
    out: list[str] = []
    for key, value in params.items():
        head, _, last = key.rpartition(".")
        if head and last.isdigit():
            lists.setdefault(head, {})[int(last)] = value
        else:
            out.append(f"{key}={_text(value)}")
    for head, entries in lists.items():
        if sorted(entries) != list(range(len(entries))):
            raise ConfigError(f"search space: {head}.<i>: entries {sorted(entries)}, expected 0..n-1")
        out.append(f"{head}=[{','.join(_text(entries[i]) for i in range(len(entries)))}]")
    return out


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)  # all digits: the job trains with exactly the sampled value
    return str(value)


def sweeper_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def sweeper_is_gone(owner: str | None) -> bool:
    """True when the sweeper ``host:pid`` ran on this host and has ended (it crashed or was
    killed: its running trials will never be told). Another host's sweeper: unknown, False."""
    if not owner:
        return False
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def write_results(study: Any, sweep_dir: Path, space: Mapping[str, Any]) -> list[Path]:
    """``best.yaml``, ``best.sh`` and the study's figures in ``sweep_dir``; the paths written."""
    optuna = require_optuna()
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    written = write_figures(study, sweep_dir / "figures", len(complete))
    if not complete:
        log.warning("no trial completed: no best.yaml")
        return written
    best = study.best_trial
    run_dir = Path(best.user_attrs[RUN_DIR])
    try:
        config = OmegaConf.load(run_dir / "config.yaml")
        config.search = None  # the rerun reports to no study
    except FileNotFoundError:  # trained by a sweeper of the study on another machine
        log.info("the best trial's run directory %s is not on this machine: best.yaml has no config", run_dir)
        config = None
    overrides = list(best.user_attrs[OVERRIDES])
    command = shlex.join(["mer-train", *overrides])
    best_yaml = {
        "objective": OBJECTIVE,
        "value": best.value,
        "trial": best.number,
        "study": study.study_name,
        "params": dict(best.params),
        "run_dir": str(run_dir),
        "overrides": overrides,
        "command": command,
        "config": OmegaConf.to_container(config) if config is not None else None,
    }
    write_text(sweep_dir / "best.yaml", OmegaConf.to_yaml(OmegaConf.create(best_yaml)))
    script = sweep_dir / "best.sh"
    write_text(
        script,
        "#!/bin/sh\n"
        f"# trial {best.number} of study {study.study_name}: {OBJECTIVE} {best.value:.6g} in {run_dir}\n"
        '# reruns it as it ran (more overrides may follow, e.g. hydra.run.dir=DIR): sh best.sh "$@"\n'
        f'{command} "$@"\n',
    )
    script.chmod(0o755)
    return [*written, sweep_dir / "best.yaml", script]


def write_figures(study: Any, out_dir: Path, n_complete: int) -> list[Path]:
    """Optuna's matplotlib figures: optimization history, parameter importances (two completed
    trials or more), and each trial's per-epoch values (which pruning acted on)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    figures = {
        "optimization_history": vis.plot_optimization_history,
        "intermediate_values": vis.plot_intermediate_values,
    }
    if n_complete >= 2:
        figures["param_importances"] = vis.plot_param_importances
    written = []
    for name, plot in figures.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
            try:
                plot(study)
            except (ValueError, RuntimeError) as e:  # e.g. importances of a parameter that never varied
                log.warning("figure %s not drawn: %s", name, e)
                continue
        fig = plt.gcf()  # each plot draws a new figure
        path = out_dir / f"{name}.png"
        with atomic_open(path, "wb") as f:
            fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def value_of(return_value: Any) -> float:
    """A job's return value as the objective (nan: the job failed)."""
    try:
        value = float(return_value)
    except (TypeError, ValueError):
        return math.nan
    return value

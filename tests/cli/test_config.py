"""Every config group option and experiment composes, and builds a model that runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from conftest import REPO, compose_train
from mer_cli.cli.commands import config_dir
from mer_cli.models import modalities
from mer_cli.models.fusion import late as late_fusion
from mer_cli.runs import trained
from mer_cli.training import loop

CONFIGS = Path(config_dir())


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def test_every_group_has_the_documented_options():
    assert _options("modality") == ["acoustic", "early", "joint", "late", "visual", "xattn"]
    assert {"bilstm", "bilstm_notebook"} <= set(_options("model"))
    assert {"smoke", "notebook"} <= set(_options("experiment"))
    assert {"synthetic", "pickle"} <= set(_options("data"))


@pytest.mark.parametrize("model", _options("model"))
@pytest.mark.parametrize("experiment", [None, *_options("experiment")])
def test_model_options_build_and_predict_one_row_per_clip(model, experiment):
    overrides = [f"model={model}"] + ([f"experiment={experiment}"] if experiment else [])
    cfg = compose_train(*overrides)
    net = trained.build_model(cfg.model, n_features={"early": 69}, n_classes=6).eval()
    x = torch.randn(3, 11, 69)
    assert net({"early": (x, torch.tensor([11, 4, 1]))}).shape == (3, 6)
    opt = instantiate(cfg.trainer.optimizer)(net.parameters())
    instantiate(cfg.trainer.scheduler)(opt)
    loop.Settings(**cfg.trainer.loop)  # every loop key is a known setting


def test_notebook_experiment_is_the_notebooks_settings():
    cfg = compose_train("experiment=notebook")
    assert list(cfg.model.encoder.hidden_sizes) == [512, 256]
    assert cfg.model.dense_size == 512 and cfg.model.dropout == 0.8
    assert cfg.trainer.optimizer._target_ == "pytorch_optimizer.AdaBelief"
    assert cfg.trainer.loop.batch_size == 128 and cfg.trainer.loop.max_epochs == 100
    assert cfg.trainer.loop.patience_epochs == 20
    assert (cfg.trainer.scheduler.factor, cfg.trainer.scheduler.patience_epochs) == (0.8, 3)
    assert cfg.trainer.scheduler.min_lr == 3e-5
    assert cfg.preprocess.normalize is False and cfg.preprocess.length_percentile == 95


def test_smoke_experiment_keeps_a_users_data_file():
    cfg = compose_train("experiment=smoke", "data=pickle", "data.path=/data/x.pkl")
    assert cfg.data.name == "pickle" and cfg.data.path == "/data/x.pkl"
    assert cfg.data.limit_per_split == 48
    assert cfg.trainer.loop.max_epochs == 2


def test_every_modality_is_known_to_the_pipeline():
    assert set(_options("modality")) == set(modalities.MODALITIES.names())


def test_late_fusion_defaults_to_the_notebooks_plain_average():

    late = compose_train("modality=late").modality
    assert late.combiner == "mean" and late.acoustic_weight is None
    assert late.combiner in late_fusion.COMBINERS


def _readme_commands(tool: str) -> list[list[str]]:
    import shlex

    lines, pending = [], ""
    for line in (REPO / "README.md").read_text().splitlines():  # a command continued with "\\"
        if line.endswith("\\"):
            pending += line[:-1] + " "
        else:
            lines.append(pending + line)
            pending = ""
    commands = []
    for line in lines:
        words = shlex.split(line.split("#")[0]) if line.startswith(f"{tool} ") else []
        if words:
            commands.append(words[1:])
    return commands


@pytest.mark.parametrize("args", _readme_commands("mer-train"), ids=" ".join)
def test_readme_mer_train_examples_compose(args):
    overrides = [a for a in args if a not in ("-m", "--multirun")]
    # a sweep's comma lists: compose the first value of each
    overrides = [
        o.split("=", 1)[0] + "=" + o.split("=", 1)[1].split(",")[0]
        if "," in o and not o.split("=", 1)[1].startswith("[")  # a list value is one value
        else o
        for o in overrides
    ]
    cfg = compose_train(*overrides)
    assert cfg.modality.name in modalities.MODALITIES.names()

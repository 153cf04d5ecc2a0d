"""trainer.modality_dropout, trainer.class_weights and trainer.sampler in a run: part of which
model a run is (resume, a sweep's reuse), recorded in metrics.json, refused in one line."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from sklearn.utils.class_weight import compute_class_weight

from conftest import run_cli, smoke_config
from mer_cli.core.errors import ConfigError
from mer_cli.data import synthetic
from mer_cli.data.npz import save_npz
from mer_cli.runs import identity, reuse
from mer_cli.runs.resume import check_resumable

OPTIONS = ("trainer.modality_dropout=0.3", "trainer.class_weights=balanced", "trainer.sampler=balanced")


@pytest.mark.parametrize("option", OPTIONS)
def test_each_option_is_part_of_the_model_a_run_is(option):
    base = identity.model_identity(smoke_config("modality=joint"))
    other = identity.model_identity(smoke_config("modality=joint", option))
    key, value = option.split("=")
    (changed,) = identity.differences(base, other)
    assert changed.startswith(f"{key}: ") and changed.endswith(value if "dropout" in key else f"'{value}'")


def test_a_run_from_before_the_options_is_todays_default_run():
    before = smoke_config("modality=joint")
    for key in ("modality_dropout", "class_weights", "sampler"):
        del before["trainer"][key]
    assert identity.run_identity(before) == identity.run_identity(smoke_config("modality=joint"))
    assert identity.run_identity(before) != identity.run_identity(smoke_config("modality=joint", OPTIONS[0]))


def _finished_run(root: Path, cfg: dict) -> Path:
    """A run directory with the files a finished run has (their contents do not matter here)."""
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    for name in reuse.FINISHED_RUN_FILES:
        (root / name).write_text("{}")
    return root


def test_a_sweep_never_reuses_a_model_trained_with_other_options(tmp_path):
    plain = _finished_run(tmp_path / "0_acoustic_seed0", smoke_config("modality=acoustic"))
    weights = "trainer.class_weights=[1,2,1,1,1,1]"
    weighted = _finished_run(tmp_path / "1_acoustic_seed0", smoke_config("modality=acoustic", weights))
    me = tmp_path / "2_acoustic_seed0"
    want = OmegaConf.create(smoke_config("modality=acoustic", "trainer.sampler=balanced"))
    assert reuse.find_trained(tmp_path, want, me) is None
    assert reuse.find_trained(tmp_path, OmegaConf.create(smoke_config("modality=acoustic")), me) == plain
    same = OmegaConf.create(smoke_config("modality=acoustic", "trainer.class_weights=[1.0,2,1,1,1,1]"))
    assert reuse.find_trained(tmp_path, same, me) == weighted


def test_resume_with_another_option_names_the_key(tmp_path):
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(smoke_config("modality=early")))
    (tmp_path / "last.pt").write_bytes(b"")
    changed = OmegaConf.create(smoke_config("modality=early", "trainer.modality_dropout=0.3"))
    with pytest.raises(ConfigError, match=r"trainer\.modality_dropout: 0\.0 -> 0\.3"):
        check_resumable(changed, tmp_path, resume=True)


@pytest.mark.slow
def test_modality_dropout_on_late_fusion_stops_before_anything_is_trained(tmp_path):
    run_dir = tmp_path / "late"
    args = ("experiment=smoke", "modality=late", "trainer.modality_dropout=0.3")
    result = run_cli("train", *args, f"hydra.run.dir={run_dir}")
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "trainer.modality_dropout=0.3" in line and "not modality=late" in line
    assert not run_dir.exists() or not any(run_dir.rglob("*.pt"))


# ---------------------------------------------------------------------------------------------
# End to end


def _imbalanced_npz(path: Path) -> tuple[Path, np.ndarray]:
    """The embedded data, small, its train split cut to classes in the ratio 6 : 3 : 2 : 1 : 1 : 1."""
    splits = synthetic.generate(synthetic.Spec(n_actors=10, clips_per_actor_per_class=3))
    labels = splits.train.labels
    keep = np.concatenate([np.flatnonzero(labels == c)[:n] for c, n in enumerate((24, 12, 8, 4, 4, 4))])
    splits = replace(splits, train=splits.train.take(np.sort(keep)))
    return save_npz(splits, path), splits.train.labels


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.slow
def test_a_run_with_every_option_records_them_and_repeats_with_the_same_seed(tmp_path):
    data, train_labels = _imbalanced_npz(tmp_path / "imbalanced.npz")
    args = ("experiment=smoke", "data=npz", f"data.path={data}", "data.limit_per_split=null")
    args = (*args, "modality=joint", "runtime.save_plots=false")
    runs = []
    for name in ("a", "b"):
        result = run_cli("train", *args, *OPTIONS, f"hydra.run.dir={tmp_path / name}")
        assert result.returncode == 0, result.stderr
        runs.append(_metrics(tmp_path / name))
    run = runs[0]["run"]
    expected = compute_class_weight("balanced", classes=np.arange(6), y=train_labels)
    assert (run["modality_dropout"], run["sampler"]) == (0.3, "balanced")
    np.testing.assert_allclose(run["class_weights"], expected, rtol=1e-12)
    for metrics in runs:
        metrics["run"].pop("train_seconds")
    assert runs[0] == runs[1]  # same seed and options: the same run
    history = (tmp_path / "a" / "history.csv").read_text()
    assert "val/loss" in history and len(history.splitlines()) == 3  # two epochs trained


@pytest.mark.slow
def test_early_fusion_with_dropout_and_a_weight_list_trains_differently_from_the_plain_run(tmp_path):
    args = ("experiment=smoke", "modality=early", "runtime.save_plots=false")
    weighted = ("trainer.modality_dropout=0.5", "trainer.class_weights=[1,2,1,1,1,3]")
    for name, extra in (("plain", ()), ("options", weighted)):
        result = run_cli("train", *args, *extra, f"hydra.run.dir={tmp_path / name}")
        assert result.returncode == 0, result.stderr
    plain, options = _metrics(tmp_path / "plain"), _metrics(tmp_path / "options")
    assert options["run"]["class_weights"] == [1.0, 2.0, 1.0, 1.0, 1.0, 3.0]
    assert options["run"]["modality_dropout"] == 0.5 and options["run"]["sampler"] == "shuffle"
    assert plain["run"]["class_weights"] is None and plain["run"]["modality_dropout"] == 0.0
    assert options["val"]["loss"] != plain["val"]["loss"]

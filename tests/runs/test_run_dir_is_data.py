"""A run directory is data: crafted ones (a model shared online) make mer-evaluate, mer-predict and
mer-export refuse with one line, and run nothing they name."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FORMAT_1_RUN
from mer_cli.core.artifacts import load_checkpoint, save_checkpoint
from mer_cli.data import npz, synthetic
from mer_cli.runs import trained, upgrade


class Boom:
    """Unpickling this calls os.makedirs(marker): proof that a loader ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.makedirs, (str(self.marker),))


def _today(run: Path) -> dict:
    """The old run's checkpoint as today's format (format 3: registry names, plain values)."""
    return upgrade.checkpoint(load_checkpoint(run / "checkpoint.pt"), run / "checkpoint.pt")


def _crafted(tmp_path: Path, kind: str, marker: Path) -> Path:
    run = tmp_path / kind
    shutil.copytree(FORMAT_1_RUN, run)
    meta = _today(run)
    calls = {"_target_": "os.makedirs", "name": str(marker)}
    if kind == "format2_target":  # Hydra-era checkpoint naming any callable
        meta = {**meta, "format": 2, "model_config": {**calls, "encoder": {**calls, "_partial_": True}}}
    elif kind == "nested_target":  # today's format, a callable hidden in an encoder option
        enc = {**meta["model_config"]["encoder"], "hidden_sizes": calls}
        meta = {**meta, "model_config": {**meta["model_config"], "encoder": enc}}
    elif kind == "unknown_classifier":
        meta = {**meta, "model_config": {**meta["model_config"], "classifier": "subprocess.call"}}
    elif kind == "unknown_encoder":
        enc = {**meta["model_config"]["encoder"], "name": "os.system"}
        meta = {**meta, "model_config": {**meta["model_config"], "encoder": enc}}
    elif kind == "pickled_object":  # not tensors and plain values: torch's weights-only load refuses
        with (run / "checkpoint.pt").open("wb") as f:
            pickle.dump({"format": 3, "model": Boom(marker)}, f, protocol=2)
        return run
    elif kind == "config_resolver":  # an interpolation calling one of our own resolvers
        cfg = (run / "config.yaml").read_text().replace("path: null", f"path: ${{claim_dir:{marker}}}")
        (run / "config.yaml").write_text(cfg)
        return run
    save_checkpoint(run / "checkpoint.pt", meta)
    return run


CRAFTED = (
    "format2_target",
    "nested_target",
    "unknown_classifier",
    "unknown_encoder",
    "pickled_object",
)
EXPECTED = {
    "format2_target": "model class 'os.makedirs' is not a mer-cli model",
    "nested_target": "names a callable ('os.makedirs')",
    "unknown_classifier": "classifier='subprocess.call': valid: single, joint, xattn",
    "unknown_encoder": "model.encoder.name='os.system': valid: birnn, transformer, tcn, inception",
    "pickled_object": "not a mer-cli checkpoint, refused",
}


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The old run's own data (the embedded generator's clips) as an .npz for mer-predict."""
    spec = synthetic.Spec(seed=1234, n_actors=10, clips_per_actor_per_class=1)
    path = tmp_path_factory.mktemp("data") / "clips.npz"
    npz.save_npz(synthetic.generate(spec).limit(12), path)
    return path


def _tools(run: Path, clips: Path, out: Path) -> dict[str, list[str]]:
    return {
        "mer-evaluate": [str(run), "--no-plots"],
        "mer-predict": [str(run), "--data", str(clips), "--out", str(out / "p.csv")],
        "mer-export": [str(run), "--format", "torchscript", "--out", str(out / "model.pt")],
    }


def _main(tool: str):  # type: ignore[no-untyped-def]
    from mer_cli.cli import commands, export, predict

    mains = {"mer-evaluate": commands.evaluate_main, "mer-predict": predict.main, "mer-export": export.main}
    return mains[tool]


@pytest.mark.parametrize("kind", CRAFTED)
@pytest.mark.parametrize("tool", ["mer-evaluate", "mer-predict", "mer-export"])
def test_a_crafted_run_directory_runs_no_code_and_is_refused_in_one_line(
    tmp_path, capsys, monkeypatch, clips, kind, tool
):
    marker = tmp_path / "ran"
    run = _crafted(tmp_path, kind, marker)
    monkeypatch.setattr(sys, "argv", [tool])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        _main(tool)(_tools(run, clips, out)[tool])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert not marker.exists(), f"{tool} ran code from a crafted {kind} run"
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"{tool}: error: {run / 'checkpoint.pt'}: "), err
    assert EXPECTED[kind] in err, err
    assert not any(out.iterdir()), "a refused run left files behind"
    assert not (run / "evaluations").exists()


def test_a_config_with_an_interpolation_is_refused_before_anything_resolves_it(
    tmp_path, capsys, monkeypatch, clips
):
    marker = tmp_path / "claimed"
    run = _crafted(tmp_path, "config_resolver", marker)
    monkeypatch.setattr(sys, "argv", ["mer-evaluate"])
    with pytest.raises(SystemExit) as exit_info:
        _main("mer-evaluate")([str(run), "--no-plots"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and not marker.exists()
    assert err == (
        f"mer-evaluate: error: {run / 'config.yaml'}: data.path holds an interpolation (${{...}}); "
        "a run's config.yaml is written resolved, so this one did not come from mer-train"
    )


def test_a_late_json_naming_an_unknown_combiner_is_refused(tmp_path, capsys, monkeypatch, clips):
    run = tmp_path / "late"
    run.mkdir()
    (run / "late.json").write_text(
        json.dumps({"format": 2, "combiner": "os.system", "members": {"acoustic": "a", "visual": "v"}})
    )
    monkeypatch.setattr(sys, "argv", ["mer-predict"])
    with pytest.raises(SystemExit):
        _main("mer-predict")([str(run), "--data", str(clips), "--out", str(tmp_path / "p.csv")])
    err = capsys.readouterr().err.strip()
    assert err == (
        f"mer-predict: error: {run / 'late.json'}: "
        "combiner 'os.system' is not one of mean, weighted, stacking"
    )


def test_the_old_run_still_loads_and_predicts_as_before(clips):
    # the format-1 checkpoint read through every upgrade: the same weights, a working model
    model, _, meta = trained.load_trained(FORMAT_1_RUN)
    assert meta["format"] == upgrade.CHECKPOINT_FORMAT
    assert meta["model_config"]["classifier"] == "single"
    assert meta["model_config"]["encoder"]["name"] == "birnn"
    old = load_checkpoint(FORMAT_1_RUN / "checkpoint.pt")["model"]
    state = model.state_dict()
    for k, v in old.items():
        assert torch.equal(state.get(k, state.get(f"encoder.{k}")), v), k
    splits = npz.load_npz(clips)
    prob = trained.predict_run(FORMAT_1_RUN, splits, ("test",))["test"].y_prob
    np.testing.assert_allclose(prob.sum(axis=1), 1.0, atol=1e-5)

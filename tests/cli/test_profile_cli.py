"""mer-profile: a dataset's profile and the preprocessing it implies, without training."""

from __future__ import annotations

import importlib
import json
import pickle
import re

import numpy as np
import pytest

from conftest import REPO
from mer_cli.__main__ import COMMANDS
from mer_cli.cli import profile as profile_cli


def write_pickle(path, n=12):
    """The notebook's pickle layout; the acoustic features' scale differs by 10^-2..10^2 per clip,
    speakers differ between splits."""
    rng = np.random.default_rng(0)
    data = {}
    for k, split in enumerate(("train", "val", "test")):
        data[split] = {
            f"{1001 + 10 * k + i % 4}_DFA_{split}_{i}": (
                rng.standard_normal((int(rng.integers(20, 40)), 4)) * 10 ** rng.uniform(-2, 2),
                rng.random((int(rng.integers(6, 12)), 3)),
                i % 3,
            )
            for i in range(n if split == "train" else 6)
        }
    path.write_bytes(pickle.dumps(data))
    return path


def test_mer_profile_prints_a_pickles_profile_and_the_scaling_it_implies(tmp_path, capsys, monkeypatch):
    pkl = write_pickle(tmp_path / "feats.pkl", n=30)
    monkeypatch.chdir(tmp_path)
    profile_cli.main([str(pkl), "modality=acoustic"])  # returns: exit status 0 (errors exit 2, below)
    out = capsys.readouterr().out
    assert out.startswith(f"data profile of the training split ({pkl}):")
    assert "classes (3): train 10 per class; val 2 per class; test 2 per class" in out
    assert "frame rates: not recorded" in out
    assert "acoustic: scaling per_clip: auto: clip-level scale spread up to 10^" in out
    assert list(tmp_path.iterdir()) == [pkl]  # nothing written


def test_mer_profile_json_and_a_bad_path(tmp_path, capsys):
    pkl = write_pickle(tmp_path / "feats.pkl")
    profile_cli.main([str(pkl), "--json", "modality=joint", "preprocess.scaling=robust"])
    written = json.loads(capsys.readouterr().out)
    assert sorted(written["streams"]) == ["acoustic", "visual"]
    assert written["streams"]["acoustic"]["scaling"]["kind"] == "robust"
    assert written["streams"]["acoustic"]["scaling"]["auto"] == "per_clip"
    assert written["classes"]["counts"] == {"train": [4, 4, 4], "val": [2, 2, 2], "test": [2, 2, 2]}
    with pytest.raises(SystemExit) as stopped:
        profile_cli.main([str(tmp_path / "missing.pkl")])
    assert stopped.value.code == 2
    assert capsys.readouterr().err == f"mer-profile: error: {tmp_path / 'missing.pkl'}: file not found\n"


def test_the_mer_profile_console_script_runs_this_command():
    scripts = (REPO / "pyproject.toml").read_text().split("[project.scripts]")[1].split("\n[")[0]
    module, function = re.search(r'^mer-profile = "([\w.]+):(\w+)"$', scripts, re.MULTILINE).groups()
    assert getattr(importlib.import_module(module), function) is COMMANDS["profile"]

"""mer-predict RUN --data PATH reads every format mer-train reads, recognised the same way, and gives
the probabilities mer-evaluate's path gives on the same clips."""

from __future__ import annotations

import csv
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import FORMAT_1_RUN
from mer_cli.cli import predict as predict_cli
from mer_cli.data import formats, native, npz, synthetic
from mer_cli.data.notebook_pickle import load as load_pickle
from mer_cli.runs import trained


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same clips as the notebook's pickle, a native .npz and a native directory."""
    root = tmp_path_factory.mktemp("formats")
    splits = synthetic.generate(synthetic.Spec(seed=7, n_actors=10, clips_per_actor_per_class=1)).limit(12)
    raw = {
        s.name: {cid: (s.mfcc[i], s.aus[i], int(s.labels[i])) for i, cid in enumerate(s.clip_ids)}
        for s in splits.all()
    }
    (root / "features.pkl").write_bytes(pickle.dumps(raw))
    out = {"pickle": root / "features.pkl", "npz": root / "features.npz", "native": root / "features"}
    npz.save_npz(load_pickle(out["pickle"]), out["npz"])
    native.save_dir(load_pickle(out["pickle"]), out["native"])
    return out


def test_each_path_is_recognised_as_its_format(datasets):
    assert {name: formats.recognise(p).name for name, p in datasets.items()} == {
        "pickle": "pickle",
        "npz": "npz",
        "native": "native",
    }


def _predicted(path: Path) -> dict[str, np.ndarray]:
    with path.open() as f:
        rows = list(csv.DictReader(f))
    prob_cols = [c for c in rows[0] if c.startswith("prob_")]
    return {r["clip_id"]: np.array([float(r[c]) for c in prob_cols]) for r in rows}


@pytest.mark.parametrize("fmt", ["pickle", "npz", "native"])
@pytest.mark.slow
def test_mer_predict_data_reads_every_format_with_the_evaluate_paths_probabilities(
    tmp_path, monkeypatch, datasets, fmt
):
    out = tmp_path / "predictions.csv"
    monkeypatch.setattr(sys, "argv", ["mer-predict"])
    with pytest.raises(SystemExit) as exit_info:
        predict_cli.main([str(FORMAT_1_RUN), "--data", str(datasets[fmt]), "--out", str(out)])
    assert exit_info.value.code == 0
    got = _predicted(out)
    splits = formats.read(datasets[fmt])
    expected = trained.predict_run(FORMAT_1_RUN, splits, ("train", "val", "test"))
    want = {cid: p for pred in expected.values() for cid, p in zip(pred.clip_ids, pred.y_prob, strict=True)}
    assert sorted(got) == sorted(want)  # every clip of every split, once
    for cid, p in want.items():
        np.testing.assert_allclose(got[cid], p, atol=1e-6, err_msg=cid)


def test_a_directory_that_is_no_dataset_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["mer-predict"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        predict_cli.main([str(FORMAT_1_RUN), "--data", str(empty), "--out", str(tmp_path / "p.csv")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"mer-predict: error: {empty}: a directory without dataset.json"), err
    assert not (tmp_path / "p.csv").exists()

"""The emotion2vec back-end on a tiny randomly initialised emotion2vec (2 small blocks, 32 wide)
saved in funasr's layout: frames against funasr's own AutoModel, the record and the rebuild
from it, and the errors for a model that is not on this machine."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import EMOTION2VEC_TINY as TINY_CONF
from conftest import EMOTION2VEC_WIDTH as WIDTH
from conftest import REPO, SRC, write_wav
from conftest import save_tiny_emotion2vec as save_tiny
from mer_cli.core.errors import ConfigError, DataError
from mer_cli.data.features import catalog
from mer_cli.data.features import emotion2vec as e2v
from mer_cli.data.features.base import Frames, recipe_mismatch

# not importorskip: importing funasr at collection would change the whole session's warnings and
# logging (the back-end's import keeps that contained)
# funasr takes seconds to import (every model it has): with the end-to-end tests
pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("funasr") is None, reason="funasr not installed"),
    pytest.mark.slow,
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    e2v.emotion2vec_class()  # funasr's first import (~6 s: it imports every model it has)
    return save_tiny(tmp_path_factory.mktemp("e2v") / "tiny")


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "modelscope"))


def one(extractor: e2v.Extractor, path: Path) -> np.ndarray:
    (got,) = extractor.extract([path])
    assert isinstance(got, Frames), got
    return got.values


def test_frames_are_funasrs_own_frame_features(model_dir: Path, tmp_path: Path) -> None:
    from funasr import AutoModel

    wav = tmp_path / "a.wav"
    write_wav(wav, 1.5, 16000, 220.0, seed=4)
    x = one(e2v.Extractor(e2v.Settings(model_path=str(model_dir))), wav)
    # funasr's high-level API on the same directory, reading the file itself
    # ncpu: AutoModel sets torch's thread count for the process (4 unless told)
    auto = AutoModel(
        model=str(model_dir),
        device="cpu",
        disable_update=True,
        ncpu=torch.get_num_threads(),
        log_level="ERROR",
    )
    want = auto.generate(str(wav), granularity="frame")[0]["feats"]
    assert x.dtype == np.float32 and x.shape == want.shape == ((24000 - 400) // 320 + 1, WIDTH)
    np.testing.assert_allclose(x, want, rtol=1e-5, atol=1e-6)


def test_frames_come_at_50_hz(model_dir: Path, tmp_path: Path) -> None:
    extractor = e2v.Extractor(e2v.Settings(model_path=str(model_dir)))
    assert extractor.record()["frame_rate_hz"] == 50.0
    for seconds, n_frames in ((3.0, 149), (1.0, 49), (0.04, 1)):
        write_wav(tmp_path / f"{seconds}.wav", seconds, 16000, 300.0)
        assert one(extractor, tmp_path / f"{seconds}.wav").shape == (n_frames, WIDTH)


def test_the_record_names_the_weights_and_rebuilds_the_extractor(model_dir: Path, tmp_path: Path) -> None:
    write_wav(tmp_path / "a.wav", 1.0, 16000, 250.0)
    extractor = e2v.Extractor(e2v.Settings(model_id="tiny/emotion2vec", model_path=str(model_dir)))
    record = extractor.record()
    assert record["backend"] == "emotion2vec" and record["model_id"] == "tiny/emotion2vec"
    assert record["model_path"] == str(model_dir) and record["n_features"] == WIDTH
    assert record["feature_names"] is None and len(record["weights"]) == 32
    rebuilt = catalog.from_record("acoustic", record)
    assert rebuilt.record() == record
    np.testing.assert_array_equal(one(rebuilt, tmp_path / "a.wav"), one(extractor, tmp_path / "a.wav"))
    # the same weights moved elsewhere: the same recipe; other weights: other weights
    moved = shutil.copytree(model_dir, tmp_path / "moved")
    elsewhere = catalog.from_record("acoustic", record, model_path=str(moved))
    assert recipe_mismatch(record, elsewhere.record()) is None
    other = save_tiny(tmp_path / "other", seed=1)
    retrained = catalog.from_record("acoustic", record, model_path=str(other))
    assert "weights=" in (recipe_mismatch(record, retrained.record()) or "")


def test_a_model_in_the_local_modelscope_cache_is_found_by_id(model_dir: Path, tmp_path: Path) -> None:
    # modelscope's cache layout: models/<owner>--<name>/snapshots/<revision>/
    snapshot = tmp_path / "modelscope/models/iic--tiny_e2v/snapshots/master"
    shutil.copytree(model_dir, snapshot)
    extractor = e2v.Extractor(e2v.Settings(model_id="iic/tiny_e2v"))
    assert extractor.record()["model_path"] == str(snapshot)


def test_a_model_not_on_this_machine_is_one_error_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not in the local modelscope cache") as e:
        e2v.Extractor(e2v.Settings(model_id="iic/emotion2vec_plus_base"))
    assert "iic/emotion2vec_plus_base" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="not in the local huggingface cache"):
        e2v.Extractor(e2v.Settings(model_id="emotion2vec/not-here", hub="huggingface"))
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'nowhere'}: no such directory")):
        e2v.Extractor(e2v.Settings(model_path=str(tmp_path / "nowhere")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"no config\.yaml, model\.pt"):
        e2v.Extractor(e2v.Settings(model_path=str(tmp_path / "empty")))
    assert not (tmp_path / "modelscope").exists()  # nothing was fetched into the cache


def test_weights_that_do_not_fit_the_config_are_refused(model_dir: Path, tmp_path: Path) -> None:
    wider = save_tiny(tmp_path / "wider", conf={**TINY_CONF, "embed_dim": 48})
    bad = shutil.copytree(model_dir, tmp_path / "bad")
    shutil.copy(wider / "model.pt", bad / "model.pt")
    with pytest.raises(DataError, match=r"not the weights of its config\.yaml: it has other shapes"):
        e2v.Extractor(e2v.Settings(model_path=str(bad)))
    state = torch.load(model_dir / "model.pt", weights_only=True)
    del state["blocks.0.attn.qkv.weight"]
    torch.save(state, bad / "model.pt")
    with pytest.raises(DataError, match=r"it lacks blocks\.0\.attn\.qkv\.weight"):
        e2v.Extractor(e2v.Settings(model_path=str(bad)))


def test_bad_files_are_one_line_each_and_the_others_go_on(model_dir: Path, tmp_path: Path) -> None:
    write_wav(tmp_path / "ok.wav", 0.5, 16000, 220.0)
    write_wav(tmp_path / "short.wav", 0.02, 16000, 220.0)
    (tmp_path / "broken.wav").write_bytes(b"RIFF\x00\x00not a wave file")
    extractor = e2v.Extractor(e2v.Settings(model_path=str(model_dir)))
    ok, short, broken = extractor.extract([tmp_path / f"{n}.wav" for n in ("ok", "short", "broken")])
    assert isinstance(ok, Frames) and ok.values.shape == (24, WIDTH)
    assert short == "too short: 20.0 ms of audio, less than the 25 ms one emotion2vec frame sees"
    assert isinstance(broken, str) and "\n" not in broken and broken


def test_without_funasr_the_error_names_the_extra(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "funasr", None)  # import funasr raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'mer-cli\[emotion2vec\]'"):
        e2v.Extractor(e2v.Settings(model_path=str(model_dir)))


@pytest.mark.slow
def test_importing_funasr_leaves_the_process_as_it_was() -> None:
    code = (
        "import logging, os, warnings\n"
        "from mer_cli.data.features import emotion2vec\n"
        "before = (list(warnings.filters), list(logging.getLogger().handlers), logging.getLogger().level)\n"
        "emotion2vec.emotion2vec_class()\n"
        "after = (list(warnings.filters), list(logging.getLogger().handlers), logging.getLogger().level)\n"
        "assert after == before, 'changed'\n"
        "assert 'HYDRA_FULL_ERROR' not in os.environ\n"
    )
    env = {"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == ""  # funasr's notice went to stderr


def test_the_preset_names_a_model_it_looks_for_only_locally() -> None:
    options = yaml.safe_load((REPO / "configs/features/audio/emotion2vec.yaml").read_text())
    backend = catalog.get("acoustic", options.pop("backend"))
    settings = backend.make_settings(options, "emotion2vec")
    with pytest.raises(ConfigError, match="emotion2vec_plus_base is not in the local modelscope cache"):
        backend.open(settings)

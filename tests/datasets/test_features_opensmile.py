"""The openSMILE back-end: eGeMAPS and ComParE low-level descriptors against opensmile's own
process_file, its record and the rebuild from it, per-file problems, and the presets."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import REPO, write_wav
from mer_cli.core.errors import ConfigError
from mer_cli.data.features import catalog
from mer_cli.data.features import opensmile as smile_backend
from mer_cli.data.features.base import Frames, recipe_mismatch

opensmile = pytest.importorskip("opensmile")
# opensmile's "Segment too short"; openSMILE's library takes seconds to load: with the end-to-end tests
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.slow]


def reference(path: Path, feature_set: str, level: str) -> tuple[np.ndarray, list[str], np.ndarray]:
    """opensmile's high-level API on the file itself: values, column names, row start times (s)."""
    df = opensmile.Smile(feature_set=feature_set, feature_level=level).process_file(str(path))
    starts = df.index.get_level_values("start").total_seconds().to_numpy()
    return df.to_numpy(dtype=np.float32), list(df.columns), starts


def one(extractor: smile_backend.Extractor, path: Path) -> np.ndarray:
    (got,) = extractor.extract([path])
    assert isinstance(got, Frames), got
    return got.values


@pytest.mark.parametrize("feature_set, n_lld", [("eGeMAPSv02", 25), ("ComParE_2016", 65)])
def test_frames_are_opensmiles_own_lld_of_the_file(tmp_path: Path, feature_set: str, n_lld: int) -> None:
    wav = tmp_path / "a.wav"
    write_wav(wav, 1.5, 16000, 220.0, seed=1)
    extractor = smile_backend.Extractor(smile_backend.Settings(feature_set=feature_set))
    x = one(extractor, wav)
    want, names, starts = reference(wav, feature_set, "lld")
    assert x.dtype == np.float32 and x.shape == want.shape == (146, n_lld)  # floor((1500 - 50) / 10) + 1
    np.testing.assert_allclose(x, want, rtol=1e-5, atol=1e-5)
    record = extractor.record()
    assert record["feature_names"] == names
    # the record's rate is the one openSMILE's own index shows: a row every 10 ms
    assert record["frame_rate_hz"] == pytest.approx(1 / np.median(np.diff(starts)))


def test_compare_deltas_follow_the_65_lld(tmp_path: Path) -> None:
    wav = tmp_path / "a.wav"
    write_wav(wav, 1.0, 16000, 330.0, seed=2)
    extractor = smile_backend.Extractor(smile_backend.Settings(feature_set="ComParE_2016", deltas=True))
    x = one(extractor, wav)
    lld, lld_names, _ = reference(wav, "ComParE_2016", "lld")
    deltas, delta_names, _ = reference(wav, "ComParE_2016", "lld_de")
    assert x.shape == (lld.shape[0], 130)
    np.testing.assert_allclose(x[:, :65], lld, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x[:, 65:], deltas[: lld.shape[0]], rtol=1e-5, atol=1e-5)
    assert extractor.record()["feature_names"] == lld_names + delta_names
    # openSMILE's delta of a row: the regression over the 2 rows either side (edges repeated)
    padded = np.pad(lld[:, 8], 2, mode="edge")  # pcm_RMSenergy_sma
    slope = ((padded[3:-1] - padded[1:-3]) + 2 * (padded[4:] - padded[:-4])) / 10
    np.testing.assert_allclose(x[:, 65 + 8], slope, rtol=1e-4, atol=1e-6)


def test_a_44k_file_is_resampled_to_the_16k_rows(tmp_path: Path) -> None:
    write_wav(tmp_path / "a16.wav", 1.0, 16000, 220.0)
    write_wav(tmp_path / "a44.wav", 1.0, 44100, 220.0)
    extractor = smile_backend.Extractor(smile_backend.Settings())
    x16, x44 = one(extractor, tmp_path / "a16.wav"), one(extractor, tmp_path / "a44.wav")
    assert x16.shape == x44.shape == (96, 25)
    # F0semitoneFrom27.5Hz_sma3nz (0 where unvoiced): a 220 Hz tone is 36 semitones above 27.5 Hz
    f0 = extractor.record()["feature_names"].index("F0semitoneFrom27.5Hz_sma3nz")
    for x in (x16, x44):
        assert np.median(x[x[:, f0] > 0, f0]) == pytest.approx(12 * np.log2(220 / 27.5), abs=0.1)


def test_bad_files_are_one_line_each_and_the_others_go_on(tmp_path: Path) -> None:
    write_wav(tmp_path / "ok.wav", 0.5, 16000, 220.0)
    write_wav(tmp_path / "short.wav", 0.04, 16000, 220.0)
    (tmp_path / "broken.wav").write_bytes(b"RIFF\x00\x00not a wave file")
    extractor = smile_backend.Extractor(smile_backend.Settings())
    ok, short, broken = extractor.extract([tmp_path / f"{n}.wav" for n in ("ok", "short", "broken")])
    assert isinstance(ok, Frames) and ok.values.shape == (46, 25)
    assert isinstance(short, str) and short.startswith("too short: 40.0 ms")
    assert isinstance(broken, str) and "\n" not in broken and broken


def test_the_record_rebuilds_the_same_extractor_and_names_the_version(tmp_path: Path) -> None:
    write_wav(tmp_path / "a.wav", 0.8, 16000, 440.0, seed=3)
    extractor = smile_backend.Extractor(smile_backend.Settings(feature_set="ComParE_2016", deltas=True))
    record = extractor.record()
    assert record["backend"] == "opensmile" and record["opensmile_version"] == opensmile.__version__
    assert record["feature_set"] == "ComParE_2016" and record["deltas"] is True
    rebuilt = catalog.from_record("acoustic", record)
    assert rebuilt.record() == record
    np.testing.assert_array_equal(one(rebuilt, tmp_path / "a.wav"), one(extractor, tmp_path / "a.wav"))
    # features made by another openSMILE do not match this one's
    older = {**record, "opensmile_version": "2.5.1"}
    assert recipe_mismatch(older, rebuilt.record()) is not None


def test_settings_that_opensmile_has_no_lld_for_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="eGeMAPSv02 has no LLD deltas"):
        smile_backend.Settings(feature_set="eGeMAPSv02", deltas=True)
    with pytest.raises(ConfigError, match="valid: eGeMAPSv02, ComParE_2016"):
        smile_backend.Settings(feature_set="GeMAPS")


def test_without_opensmile_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opensmile", None)  # import opensmile raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'mer-cli\[opensmile\]'"):
        smile_backend.Extractor(smile_backend.Settings())


@pytest.mark.parametrize("preset, n_features", [("egemaps", 25), ("compare", 130)])
def test_presets_open_the_backend(preset: str, n_features: int) -> None:
    options = yaml.safe_load((REPO / "configs/features/audio" / f"{preset}.yaml").read_text())
    backend = catalog.get("acoustic", options.pop("backend"))
    extractor = backend.open(backend.make_settings(options, preset))
    assert len(extractor.record()["feature_names"]) == n_features

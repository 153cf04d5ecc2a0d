"""The snr corruption end to end: a run trained on mer-ingest's features, its test clips' own
recordings mixed with white noise at each SNR and their features computed again by the run's
recorded back-end; refused for other recordings, skipped (saying why) without them."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import compose_train, ingest_folder, make_folder, write_wav
from mer_cli.cli import commands
from mer_cli.core.errors import DataError
from mer_cli.data import formats
from mer_cli.data.features import audio, mfcc
from mer_cli.evaluation import perturb
from mer_cli.runs import execute, robustness

pytest.importorskip("librosa")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("snr")
    recordings, faces = make_folder(root / "clips", n_actors=6)
    data = root / "data"
    ingest_folder(recordings, faces, data)
    run_dir = root / "run"
    overrides = ("experiment=smoke", "modality=early", "data=native", f"data.path={data}")
    execute.run(compose_train(*overrides, "trainer.loop.max_epochs=1", "runtime.save_plots=false"), run_dir)
    return {"run": run_dir, "audio": recordings, "data": data}


def snr(db: float) -> perturb.Condition:
    return perturb.Condition("snr", "white", "acoustic", db, "dB SNR", db)


@pytest.mark.slow
def test_each_snr_is_scored_from_the_recordings_the_same_for_the_same_seed(trained, capsys):
    commands.evaluate_main([str(trained["run"]), "--perturb", "snr", "--audio", str(trained["audio"])])
    printed = capsys.readouterr().out
    result = json.loads((trained["run"] / "robustness.json").read_text())
    assert [(r["strength"], r["unit"], r["skipped"]) for r in result["rows"]] == [
        (db, "dB SNR", None) for db in (20.0, 10.0, 5.0, 0.0)
    ]
    assert result["recordings"] == str(trained["audio"].resolve())
    assert re.search(r"^snr white acoustic 0 dB SNR +macro F1 ", printed, re.M)
    assert (trained["run"] / "plots" / "robustness.png").stat().st_size > 0
    again, _ = robustness.evaluate_robustness(trained["run"], ["snr"], audio_dir=trained["audio"])
    assert again["rows"] == result["rows"]


@pytest.mark.slow
def test_the_noisy_features_are_the_back_end_s_own_on_the_mixed_recording(trained):
    target = robustness.read_target(trained["run"])
    test = formats.read(trained["data"]).test
    recordings = robustness.open_recordings(target, test, trained["audio"], None)
    # without noise to speak of, the features are the data's own (the whole path: read, write, extract)
    quiet = robustness.noisy_test(test, snr(300.0), recordings, seed=0)
    for i in range(len(test.clip_ids)):
        np.testing.assert_allclose(quiet.mfcc[i], test.mfcc[i], atol=1e-4)
    # at 0 dB: the first clip is its recording mixed by the condition's first draws, through MFCC
    loud = robustness.noisy_test(test, snr(0.0), recordings, seed=0)
    y, rate = audio.read(recordings.files[test.clip_ids[0]])
    mixed = perturb.mix_at_snr(y, 0.0, snr(0.0).rng(0))
    by_hand = trained["run"].parent / "by_hand.wav"
    audio.write(by_hand, mixed, rate)
    (expected,) = mfcc.Extractor(mfcc.Settings()).extract([by_hand])
    assert not isinstance(expected, str)
    np.testing.assert_allclose(loud.mfcc[0], expected.values, atol=1e-5)
    assert np.abs(loud.mfcc[0] - test.mfcc[0]).max() > 1.0  # the noise is really there


@pytest.mark.slow
def test_other_recordings_are_refused_in_one_line(trained, tmp_path):
    target = robustness.read_target(trained["run"])
    test = formats.read(trained["data"]).test
    other = tmp_path / "other"
    shutil.copytree(trained["audio"], other)
    write_wav(other / f"{test.clip_ids[1]}.wav", 1.0, 16000, 700.0, seed=99)  # another recording
    with pytest.raises(
        DataError, match=rf"{test.clip_ids[1]}.wav: its features now are not the test split's"
    ):
        robustness.open_recordings(target, test, other, None)
    (other / f"{test.clip_ids[0]}.wav").unlink()
    with pytest.raises(DataError, match=rf"no recording of 1 of the {len(test.clip_ids)} test clips"):
        robustness.open_recordings(target, test, other, None)


@pytest.mark.slow
def test_without_the_recordings_the_rows_are_skipped_saying_how_to_get_them(trained):
    result, _ = robustness.evaluate_robustness(trained["run"], ["snr"], save_plots=False)
    assert {r["skipped"] for r in result["rows"]} == {
        "needs the test clips' recordings: mer-evaluate RUN --perturb --audio DIR"
    }

"""bench-real's converter: the .ts parser on an inline file, and a tiny made-up archive set
written as a native dataset (official test kept whole, validation drawn from train by class,
the two streams, speakers, repeats of test clips left out of training). No network."""

import json

import numpy as np
import pytest
import real_data_fetch as fetch  # benchmarks/real_data_fetch.py (pytest's pythonpath)
import real_data_run

from mer_cli.data.native import load_dir

TS = """# a comment line
@problemName Tiny
@timeStamps false
@univariate false
@dimensions 2
@equalLength false
@classLabel true up down
@data
1.0,2.0,3.0:10,20,30:up
-1.5,?:0.25,4e2:down
"""


def test_parse_ts_reads_dimensions_as_columns_unequal_lengths_missing_values_and_labels():
    s = fetch.parse_ts(TS, "tiny.ts")
    assert s.class_labels == ["up", "down"] and s.labels == ["up", "down"]
    assert [c.shape for c in s.clips] == [(3, 2), (2, 2)]  # (frames, dimensions)
    np.testing.assert_array_equal(s.clips[0], [[1, 10], [2, 20], [3, 30]])
    assert np.isnan(s.clips[1][1, 0]) and s.clips[1][1, 1] == 400.0
    assert s.header["problemname"] == "Tiny"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("1,2:3:up", "tiny.ts:9: its dimensions have different lengths"),
        ("1,x:3,4:up", "tiny.ts:9: not a number"),
        ("1,2:3,4:left", "labels ['left'] are not in @classLabel"),
        ("1,2:up", "a clip without @dimensions 2 dimensions"),
    ],
)
def test_parse_ts_names_the_file_and_line_of_a_bad_clip(body, message):
    with pytest.raises(fetch.FetchError, match=message.replace("[", r"\[")):
        fetch.parse_ts(TS.split("@data")[0] + "@data\n" + body + "\n", "tiny.ts")


def test_the_envelope_is_rms_and_peak_per_window_with_a_shorter_last_window():
    x = np.arange(1, 13, dtype=np.float32)[:, None] * np.where(np.arange(12) % 2, -1, 1)[:, None]
    current, envelope = fetch.current_and_envelope(x)
    assert current is x and envelope.shape == (2, 2)  # 12 samples, windows of 10: 10 + 2
    np.testing.assert_allclose(envelope[0], [np.sqrt(np.mean(np.arange(1, 11) ** 2)), 10], rtol=1e-6)
    np.testing.assert_allclose(envelope[1], [np.sqrt((11**2 + 12**2) / 2), 12], rtol=1e-6)


def test_stratified_val_takes_the_fraction_of_each_class_and_leaves_each_a_training_clip():
    y = [0] * 10 + [1] * 5 + [2] * 2
    val = fetch.stratified_val(y, 0.2, seed=3)
    assert np.bincount(np.asarray(y)[val], minlength=3).tolist() == [2, 1, 1]
    assert val.tolist() == fetch.stratified_val(y, 0.2, seed=3).tolist()


def _series(n_per_class, classes, rng, lengths=(4, 9)):
    clips, labels = [], []
    for c in classes:
        for _ in range(n_per_class):
            clips.append(rng.normal(size=(int(rng.integers(*lengths)), 4)).astype(np.float32))
            labels.append(c)
    return fetch.Series(clips, labels, list(classes), {})


def test_convert_keeps_the_official_test_split_draws_val_from_train_and_maps_channels(tmp_path):
    rng = np.random.default_rng(0)
    train, test = _series(5, ["a", "b"], rng), _series(3, ["a", "b"], rng)
    train.clips[0] = test.clips[4].copy()  # the archive's PLAID repeats some test clips in train
    spec = fetch.RealSet(
        "JapaneseVowels",
        "speech",
        fetch.split_channels(1),
        {"acoustic": {"what": "x"}, "visual": {"what": "y"}},
        class_names=["A", "B"],
        speaker_is_label=True,
    )
    out = tmp_path / "set"
    fetch.convert(spec, train, test, out, val_fraction=0.2, seed=0)
    splits = load_dir(out)
    assert splits.class_names == ("A", "B") or list(splits.class_names) == ["A", "B"]
    assert len(splits.test) == 6 and [len(splits.train), len(splits.val)] == [7, 2]  # 9 train clips left
    assert np.bincount(splits.val.labels).tolist() == [1, 1]
    for i in range(6):  # test in the archive's order, channel 0 acoustic, channels 1-3 visual
        np.testing.assert_array_equal(splits.test.mfcc[i], test.clips[i][:, :1])
        np.testing.assert_array_equal(splits.test.aus[i], test.clips[i][:, 1:])
    seen = {c.tobytes() for s in (splits.train, splits.val) for c in s.mfcc}
    assert test.clips[4][:, :1].tobytes() not in seen
    assert set(splits.test.speakers) == {"A", "B"} and list(splits.test.speakers) == ["A"] * 3 + ["B"] * 3
    rate = json.loads((out / "dataset.json").read_text())["ingest_settings"]["acoustic"]["frame_rate_hz"]
    assert rate == pytest.approx(156.25)  # 6.4 ms frame shift
    assert real_data_run.describe_data(out)["clips"] == {"train": 7, "val": 2, "test": 6}


def test_best_models_picks_the_highest_mean_per_modality_and_overall():
    def model(label, modality, acc):
        return {
            "label": label,
            "modality": modality,
            "n_runs": 3,
            "test": {"accuracy": {"mean": acc, "std": 0.0, "ci": [acc - 0.1, acc]}, "f1_macro": None},
        }

    comparison = {
        "models": [
            model("early/tcn", "early", 0.6),
            model("early/inception", "early", 0.7),
            model("visual/tcn", "visual", 0.8),
        ]
    }
    best = real_data_run.best_models(comparison)
    assert list(best) == ["early", "visual", "overall"]  # the benchmark's modality order, overall last
    assert {k: v["label"] for k, v in best.items()} == {
        "early": "early/inception",
        "visual": "visual/tcn",
        "overall": "visual/tcn",
    }

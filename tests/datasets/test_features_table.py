"""The table video back-end: a face toolkit's per-frame CSV or .npy -> frames with a validity mask,
checked against the openface back-end on the same OpenFace CSV and against the tables written here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import REPO, write_openface_csv
from mer_cli.core.errors import ConfigError
from mer_cli.data.features import catalog, openface, table
from mer_cli.data.features.base import Frames
from mer_cli.data.features.extraction import Extraction

PRESETS = REPO / "configs" / "features" / "video"


def write_table(path: Path, header: list[str], rows: list[list[object]], delimiter: str = ",") -> Path:
    lines = [delimiter.join(header)] + [delimiter.join(str(v) for v in r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def extract_one(settings: table.Settings, path: Path) -> Frames | str:
    return table.Extractor(settings).extract([path])[0]


def frames_of(settings: table.Settings, path: Path) -> Frames:
    got = extract_one(settings, path)
    assert isinstance(got, Frames), got
    return got


def au_table(path: Path, delimiter: str = ",") -> Path:
    """Six frames of conf, AU01, AU02, AU12 and a text column; frame k's AU01 is k, AU02 10 + k,
    AU12 20 + k; frames 2 and 3 have confidence 0.1."""
    conf = [0.9, 0.9, 0.1, 0.1, 0.9, 0.9]
    rows = [[k, f"f{k}.png", conf[k], k, 10 + k, 20 + k] for k in range(6)]
    return write_table(path, ["frame", "input", "conf", "AU01", "AU02", "AU12"], rows, delimiter)


# ---------------------------------------------------------------------------------------------
# The openface back-end as the reference


@pytest.mark.parametrize("policy", ["interpolate", "drop", "zero"])
def test_an_openface_csv_read_by_pattern_gives_the_openface_back_ends_frames(tmp_path, policy):
    path = tmp_path / "clip.csv"
    write_openface_csv(path, 40, level=1.5, failed=(0, 7, 8, 39))
    settings = table.Settings(
        columns=("AU*_r",), success_column="success", timestamp_column="timestamp", invalid_frames=policy
    )
    got = frames_of(settings, path)
    want, fps = openface.read(path, openface.AU_COLUMNS, policy)
    np.testing.assert_array_equal(got.values, want)
    assert got.frame_rate_hz == pytest.approx(fps)
    assert got.valid is not None and got.valid.shape == (len(want),)
    if policy != "drop":
        assert np.flatnonzero(~got.valid).tolist() == [0, 7, 8, 39]


def test_the_openface_preset_gives_the_openface_back_end(tmp_path):
    options = yaml.safe_load((PRESETS / "openface.yaml").read_text())
    backend = catalog.get("visual", options.pop("backend"))
    settings = backend.make_settings(options, "openface.yaml")
    assert settings == openface.Settings()  # the preset spells out the back-end's defaults
    assert backend.open(settings).record()["feature_names"] == list(openface.AU_COLUMNS)


# ---------------------------------------------------------------------------------------------
# Columns: names, globs, regexes


@pytest.mark.parametrize(
    ("columns", "names"),
    [
        (("AU12", "AU01"), ["AU12", "AU01"]),  # named: the order given
        (("AU*",), ["AU01", "AU02", "AU12"]),  # a pattern: the table's order
        (("re:^AU0\\d$",), ["AU01", "AU02"]),
        (("AU12", "AU0?"), ["AU12", "AU01", "AU02"]),
        (("AU01", "AU*"), ["AU01", "AU02", "AU12"]),  # each column once
    ],
)
def test_columns_select_by_name_glob_and_regex(tmp_path, columns, names):
    path = au_table(tmp_path / "c.csv")
    ex = table.Extractor(table.Settings(columns=columns, invalid_frames="keep"))
    (got,) = ex.extract([path])
    assert isinstance(got, Frames)
    base = {"AU01": 0, "AU02": 10, "AU12": 20}
    want = np.array([[base[n] + k for n in names] for k in range(6)], dtype=np.float32)
    np.testing.assert_array_equal(got.values, want)
    assert ex.record()["feature_names"] == names


def test_no_columns_means_every_column_but_the_side_ones(tmp_path):
    rows = [[k, 0.9, k, 2 * k] for k in range(4)]
    path = write_table(tmp_path / "c.csv", ["t", "conf", "a", "b"], rows)
    got = frames_of(table.Settings(timestamp_column="t", confidence_column="conf"), path)
    np.testing.assert_array_equal(got.values, [[k, 2 * k] for k in range(4)])
    assert got.frame_rate_hz == pytest.approx(1.0)


@pytest.mark.parametrize("delimiter", [",", ";", "\t", ", "])
def test_comma_semicolon_and_tab_tables_read_the_same(tmp_path, delimiter):
    path = au_table(tmp_path / "c.csv", delimiter)
    got = frames_of(table.Settings(columns=("AU01", "AU12"), invalid_frames="keep"), path)
    np.testing.assert_array_equal(got.values, [[k, 20 + k] for k in range(6)])


def test_header_cells_are_stripped_of_spaces(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text(" a , b\n1, 2\n3 ,4\n")
    np.testing.assert_array_equal(
        frames_of(table.Settings(columns=("a", "b")), path).values, [[1, 2], [3, 4]]
    )


# ---------------------------------------------------------------------------------------------
# .npy input


def test_a_npy_with_named_columns_selects_like_a_csv(tmp_path):
    x = np.arange(24, dtype=np.float64).reshape(6, 4)
    x[:, 3] = [0, 0.5, 1, 1.5, 2, 2.5]  # seconds
    np.save(tmp_path / "c.npy", x)
    settings = table.Settings(
        columns=("AU*",), npy_columns=("AU01", "AU02", "x", "time"), timestamp_column="time"
    )
    got = frames_of(settings, tmp_path / "c.npy")
    np.testing.assert_array_equal(got.values, x[:, :2].astype(np.float32))
    assert got.frame_rate_hz == pytest.approx(2.0)


def test_an_unnamed_npy_gives_every_column_and_no_names(tmp_path):
    x = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    x[2, 1] = np.nan
    np.save(tmp_path / "c.npy", x)
    ex = table.Extractor(table.Settings(invalid_frames="zero"))
    (got,) = ex.extract([tmp_path / "c.npy"])
    assert isinstance(got, Frames) and got.valid is not None
    np.testing.assert_array_equal(got.values[[0, 1, 3, 4]], x[[0, 1, 3, 4]])
    np.testing.assert_array_equal(got.values[2], 0)
    assert got.valid.tolist() == [True, True, False, True, True]
    assert ex.record()["feature_names"] is None


def test_an_unnamed_npy_with_named_columns_says_how_to_name_them(tmp_path):
    np.save(tmp_path / "c.npy", np.zeros((3, 2)))
    assert "npy_columns" in extract_one(table.Settings(columns=("a",)), tmp_path / "c.npy")
    np.save(tmp_path / "d.npy", np.zeros((3, 2)))
    assert "2 columns, npy_columns names 3" in extract_one(
        table.Settings(npy_columns=("a", "b", "c")), tmp_path / "d.npy"
    )


# ---------------------------------------------------------------------------------------------
# Validity and the invalid-frame policies


@pytest.mark.parametrize(
    ("policy", "au01", "valid"),
    [
        ("interpolate", [0, 1, 2, 3, 4, 5], [1, 1, 0, 0, 1, 1]),  # 1 -> 4 in a line: frames 2, 3 are 2, 3
        ("drop", [0, 1, 4, 5], [1, 1, 1, 1]),
        ("zero", [0, 1, 0, 0, 4, 5], [1, 1, 0, 0, 1, 1]),
        ("keep", [0, 1, 2, 3, 4, 5], [1, 1, 0, 0, 1, 1]),
    ],
)
def test_frames_below_the_confidence_threshold_are_invalid_and_follow_the_policy(
    tmp_path, policy, au01, valid
):
    path = tmp_path / "c.csv"
    rows = [[k, 0.9 if k not in (2, 3) else 0.1, k if k not in (2, 3) else 50 + k] for k in range(6)]
    write_table(path, ["frame", "conf", "AU01"], rows)
    settings = table.Settings(
        columns=("AU01",), confidence_column="conf", confidence_threshold=0.5, invalid_frames=policy
    )
    got = frames_of(settings, path)
    want = [50 + k if policy == "keep" and k in (2, 3) else v for k, v in enumerate(au01)]
    np.testing.assert_allclose(got.values[:, 0], want)
    assert got.valid is not None and got.valid.astype(int).tolist() == valid


def test_the_threshold_is_inclusive_and_success_zero_is_invalid(tmp_path):
    rows = [[0.5, 1, 1.0], [0.49, 1, 2.0], [0.9, 0, 3.0], [0.9, 1, 4.0]]
    path = write_table(tmp_path / "c.csv", ["conf", "ok", "a"], rows)
    settings = table.Settings(
        columns=("a",), confidence_column="conf", success_column="ok", invalid_frames="keep"
    )
    assert frames_of(settings, path).valid.tolist() == [True, False, False, True]  # type: ignore[union-attr]


@pytest.mark.parametrize("missing", ["", "nan", "NaN", "NA"])
def test_empty_and_nan_cells_make_a_frame_invalid(tmp_path, missing):
    rows = [[0, 1], [1, missing], [2, 5]]
    path = write_table(tmp_path / "c.csv", ["t", "a"], rows)
    got = frames_of(table.Settings(columns=("a",), timestamp_column="t"), path)
    np.testing.assert_array_equal(got.values[:, 0], [1, 3, 5])  # interpolated
    assert got.valid.tolist() == [True, False, True]  # type: ignore[union-attr]


def test_a_millisecond_timestamp_column_gives_the_rate(tmp_path):
    rows = [[33.3 * k, k] for k in range(31)]
    path = write_table(tmp_path / "c.csv", ["ms", "a"], rows)
    got = frames_of(table.Settings(columns=("a",), timestamp_column="ms", timestamp_unit="ms"), path)
    assert got.frame_rate_hz == pytest.approx(1000 / 33.3)


def test_a_fixed_rate_is_the_records_and_no_file_measures_one(tmp_path):
    path = au_table(tmp_path / "c.csv")
    ex = table.Extractor(table.Settings(columns=("AU01",), frame_rate_hz=25.0))
    (got,) = ex.extract([path])
    assert isinstance(got, Frames) and got.frame_rate_hz is None
    assert ex.record()["frame_rate_hz"] == 25.0


# ---------------------------------------------------------------------------------------------
# Errors: one line per file; bad settings refused


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (table.Settings(columns=("AU01", "AU99")), "no column AU99"),
        (table.Settings(columns=("AU*_r",)), "no column matches 'AU*_r'"),
        (table.Settings(columns=("re:^X",)), "no column matches 're:^X'"),
        (table.Settings(columns=("input",)), "line 2, column input: 'f0.png' is not a number"),
        (table.Settings(columns=("AU01",), confidence_column="score"), "no confidence column score"),
        (
            table.Settings(columns=("AU01",), confidence_column="conf", confidence_threshold=2.0),
            "no valid frame",
        ),
    ],
)
def test_a_files_problem_is_one_line_naming_the_column(tmp_path, settings, message):
    assert message in extract_one(settings, au_table(tmp_path / "c.csv"))  # type: ignore[operator]


def test_ragged_rows_and_empty_files_are_named(tmp_path):
    (tmp_path / "r.csv").write_text("a,b\n1,2\n3\n")
    assert extract_one(table.Settings(), tmp_path / "r.csv") == "line 3 has 1 cells, the header 2"
    (tmp_path / "e.csv").write_text("")
    assert extract_one(table.Settings(), tmp_path / "e.csv") == "empty file"
    (tmp_path / "h.csv").write_text("a,b\n")
    assert extract_one(table.Settings(), tmp_path / "h.csv") == "no frames"


def test_a_file_whose_pattern_matches_other_columns_than_the_first_files_is_refused(tmp_path):
    a = write_table(tmp_path / "a.csv", ["AU01", "AU02"], [[1, 2]])
    b = write_table(tmp_path / "b.csv", ["AU01", "AU04"], [[1, 2]])
    got = table.Extractor(table.Settings(columns=("AU*",))).extract([a, b, a])
    assert isinstance(got[0], Frames) and isinstance(got[2], Frames)
    assert got[1] == "its columns AU01, AU04 are not the first file's AU01, AU02"


def test_extraction_gives_the_file_and_the_column(tmp_path):
    good, bad = au_table(tmp_path / "good.csv"), au_table(tmp_path / "bad.csv")
    bad.write_text(bad.read_text().replace("AU12", "AU13"))
    ex = table.Extractor(table.Settings(columns=("AU01", "AU12")))
    out = list(Extraction({"g": {"visual": good}, "b": {"visual": bad}}, {"visual": ex}, progress=False))
    assert out[0].frames is not None
    assert (out[1].file, out[1].problem) == (bad, "no column AU12")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"invalid_frames": "fill"}, "invalid_frames 'fill': valid: interpolate, drop, zero, keep"),
        ({"columns": ["re:("]}, "is not a regular expression"),
        ({"timestamp_unit": "us"}, "timestamp_unit 'us'"),
        ({"frame_rate_hz": 0}, "frame_rate_hz 0"),
        ({"columns": "AU01"}, "a list of non-empty column names"),
    ],
)
def test_bad_settings_are_one_config_error(options, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        table.BACKEND.make_settings(options, "table.yaml")


# ---------------------------------------------------------------------------------------------
# The record and the presets


def test_the_record_rebuilds_an_extractor_giving_the_same_frames(tmp_path):
    path = tmp_path / "clip.csv"
    write_openface_csv(path, 20, level=1.0, failed=(4,))
    ex = table.Extractor(
        table.Settings(
            columns=("re:^AU\\d+_r$",), confidence_column="confidence", timestamp_column="timestamp"
        )
    )
    (first,) = ex.extract([path])
    record = ex.record()
    assert record["backend"] == "table" and record["feature_names"] == list(openface.AU_COLUMNS)
    (again,) = catalog.from_record("visual", record).extract([path])
    assert isinstance(first, Frames) and isinstance(again, Frames)
    np.testing.assert_array_equal(first.values, again.values)
    np.testing.assert_array_equal(first.valid, again.valid)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["table", "pyfeat", "mediapipe"])
def test_each_table_preset_gives_valid_settings(name):
    options = yaml.safe_load((PRESETS / f"{name}.yaml").read_text())
    assert options.pop("backend") == "table"
    settings = table.BACKEND.make_settings(options, f"{name}.yaml")
    assert settings.invalid_frames == "interpolate"


def test_the_pyfeat_preset_reads_a_pyfeat_like_csv(tmp_path):
    options = yaml.safe_load((PRESETS / "pyfeat.yaml").read_text())
    options.pop("backend")
    aus = list(options["columns"])
    header = ["frame", "FaceRectX", "FaceScore", *aus, "anger", "input", "approx_time"]
    rows = [
        [k, 10, 0.99 if k != 1 else 0.0, *[j / 10 + k for j in range(len(aus))], 0.1, "v.mp4", "00:00"]
        for k in range(4)
    ]
    path = write_table(tmp_path / "v.csv", header, rows)
    ex = table.Extractor(table.BACKEND.make_settings(options, "pyfeat.yaml"))
    (got,) = ex.extract([path])
    assert isinstance(got, Frames) and got.values.shape == (4, 20)
    assert got.valid.tolist() == [True, False, True, True]  # type: ignore[union-attr]
    np.testing.assert_allclose(got.values[1], got.values[[0, 2]].mean(axis=0), rtol=1e-6)
    assert ex.record()["feature_names"] == aus


def test_the_mediapipe_preset_reads_blendshapes_and_their_timestamps(tmp_path):
    options = yaml.safe_load((PRESETS / "mediapipe.yaml").read_text())
    options.pop("backend")
    names = list(options["columns"])
    assert len(names) == 51 and len(set(names)) == 51 and "_neutral" not in names
    rows = [[40 * k, 0.5, *[0.01 * j for j in range(51)]] for k in range(10)]
    path = write_table(tmp_path / "v.csv", ["timestamp_ms", "_neutral", *names], rows)
    got = frames_of(table.BACKEND.make_settings(options, "mediapipe.yaml"), path)
    assert got.values.shape == (10, 51) and got.frame_rate_hz == pytest.approx(25.0)

"""make bench-features' script in --quick mode on two back-ends: real extraction of generated
clips in fresh processes, rows with measured values, the ingest memory check's row."""

from __future__ import annotations

import json
import sys

import extraction  # benchmarks/extraction.py (pytest's pythonpath)
import extraction_child
import pytest

from conftest import REPO, run


@pytest.mark.slow
def test_quick_run_times_mfcc_and_openface_and_checks_ingest_memory(tmp_path):
    out = tmp_path / "bench-features.jsonl"
    script = REPO / "benchmarks" / "extraction.py"
    argv = [sys.executable, str(script), "--quick", "--backends", "mfcc", "openface", "--json", str(out)]
    result = run(argv, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr + result.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    timed = {r["backend"]: r for r in rows if r["kind"] == "backend"}
    assert sorted(timed) == ["audio/mfcc", "video/openface"]
    # 4 clips of 2 s: MFCC at 100 frames/s (centred: 1 + 32000 // 160), OpenFace's CSVs at 30 rows/s
    for name, frames, features in (("audio/mfcc", 201, 52), ("video/openface", 60, 17)):
        r = timed[name]
        assert r["status"] == "ok" and r["clips"] == 4
        assert (r["frames"], r["features"]) == (4 * frames, features)
        assert r["clips_per_s"] > 0
        assert r["frames_per_s"] == pytest.approx(frames * r["clips_per_s"], rel=0.01)
        assert r["realtime_x"] == pytest.approx(2.0 * r["clips_per_s"], rel=0.01)
        assert r["load_s"] >= 0 and r["first_clip_s"] > 0
        # the child's peak from wait4 is at least its own high-water mark (and a python's size)
        assert r["peak_rss_mib"] >= r["vmhwm_mib"] - 0.5 and 20 < r["peak_rss_mib"] < 4096
    (ingest,) = [r for r in rows if r["kind"] == "ingest"]
    assert ingest["backends"] == "mfcc + openface" and ingest["clips"] == [8, 32]
    small, large = ingest["peak_rss_mib"]
    assert small > 20 and large > 20 and ingest["ratio"] == pytest.approx(large / small, abs=0.001)
    assert 0 < ingest["stored_kib_per_clip"] < 200  # 2 s of 52 + 17 float32 features a frame
    # the tables on stdout
    assert "| audio/mfcc | - | - |" in result.stdout and "| video/openface |" in result.stdout
    assert "| mfcc + openface | 8 |" in result.stdout and "load average" in result.stdout


def test_back_ends_are_picked_by_name_in_every_stream_or_by_stream_and_name():
    assert extraction.selected(["hf"]) == [("acoustic", "hf"), ("visual", "hf")]
    assert extraction.selected(["audio/hf", "openface"]) == [("acoustic", "hf"), ("visual", "openface")]
    assert len(extraction.selected(None)) == sum(len(r.names()) for r in extraction.catalog.BACKENDS.values())
    with pytest.raises(SystemExit, match="no back-end nope"):
        extraction.selected(["nope"])


def test_a_missing_library_is_a_row_naming_the_pip_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers: ImportError
    case = {"stream": "acoustic", "name": "hf", "folder": str(tmp_path), "hf_cache": [], "base_models": []}
    got = extraction_child.prepare(case)
    assert "transformers" in got["status"] and "pip install 'mer-cli[hf]'" in got["status"]

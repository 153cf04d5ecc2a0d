"""Sharded mer-ingest: shards 0..n-1 merged give the one-process dataset, file for file; a
finished shard run again is kept, a killed one redone; a merge with a shard missing names it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import make_folder
from mer_cli.cli import ingest as ingest_cli
from mer_cli.core.errors import ConfigError, DataError
from mer_cli.data import formats, ingest, shards
from mer_cli.data.features import mfcc, openface


def extractors() -> dict:
    return {"acoustic": mfcc.Extractor(mfcc.Settings()), "visual": openface.Extractor(openface.Settings())}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """24 clips of 4 actors, one of them a broken recording and one audio file without a face track."""
    audio, video = make_folder(tmp_path_factory.mktemp("clips"), n_actors=4)
    (audio / "1002_DFA_HAP_XX.wav").write_bytes(b"not a wav")
    (audio / "1003_DFA_ANG_HI.wav").write_bytes((audio / "1003_DFA_ANG_XX.wav").read_bytes())
    return audio, video


def assert_same_dataset(a: Path, b: Path) -> None:
    """Every file of two native dataset directories: the same arrays, the same index and record."""
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        if rel.suffix == ".npy":
            x, y = np.load(a / rel), np.load(b / rel)
            assert x.dtype == y.dtype and np.array_equal(x, y), rel
        else:
            assert json.loads((a / rel).read_text()) == json.loads((b / rel).read_text()), rel


def test_shards_partition_the_clips_in_order():
    clips = [f"c{i}" for i in range(10)]
    parts = [shards.shard_clips(clips, i, 3) for i in range(3)]
    assert [len(p) for p in parts] == [3, 3, 4]
    assert [c for p in parts for c in p] == clips
    assert shards.parse_shard("2/4") == (2, 4)
    for bad in ("4/4", "-1/4", "1", "a/b"):
        with pytest.raises(ConfigError, match="expected I/N"):
            shards.parse_shard(bad)


@pytest.mark.slow  # four ingests of 24 clips: seconds
def test_merged_shards_equal_a_one_process_ingest(folder, tmp_path):
    audio, video = folder
    whole = ingest.write(tmp_path / "whole", audio, video, extractors(), ingest.Names(), progress=False)
    parts = [tmp_path / f"part{i}" for i in range(3)]
    for i, part in enumerate(parts):
        done = shards.write_shard(part, (i, 3), audio, video, extractors(), ingest.Names(), progress=False)
        assert done is not None
    merged = shards.merge(tmp_path / "merged", [parts[2], parts[0], parts[1]])  # any order given
    assert_same_dataset(tmp_path / "whole", tmp_path / "merged")
    assert merged.counts == whole.counts and merged.record == whole.record
    assert merged.report == whole.report  # the broken recording and the unpaired file, as one process says
    assert len(whole.report.unreadable) == 1 and len(whole.report.unpaired) == 1


def test_a_finished_shard_is_kept_and_a_killed_one_is_redone(folder, tmp_path):
    audio, video = folder
    part = tmp_path / "part0"
    assert shards.write_shard(part, (0, 2), audio, video, extractors(), ingest.Names(), progress=False)
    stamp = (part / "shard.json").stat().st_mtime_ns
    assert (
        shards.write_shard(part, (0, 2), audio, video, extractors(), ingest.Names(), progress=False) is None
    )
    assert (part / "shard.json").stat().st_mtime_ns == stamp  # detected, not written again
    with pytest.raises(DataError, match="is not shard 1/2 of this ingest"):
        shards.write_shard(part, (1, 2), audio, video, extractors(), ingest.Names(), progress=False)

    # shard 1 killed while writing: only its hidden folder is left, and the merge refuses
    leftover = tmp_path / ".part1.tmp-12345-deadbeef"
    (leftover / "train").mkdir(parents=True)
    with pytest.raises(DataError, match=r"shard\(s\) 1/2 missing"):
        shards.merge(tmp_path / "merged", [part])
    assert shards.write_shard(
        tmp_path / "part1", (1, 2), audio, video, extractors(), ingest.Names(), progress=False
    )
    assert not leftover.exists()
    shards.merge(tmp_path / "merged", [part, tmp_path / "part1"])
    assert (tmp_path / "merged" / "dataset.json").is_file()


def test_mer_ingest_shard_and_merge_on_the_command_line(folder, tmp_path, capsys):
    audio, video = folder
    clips = ("--audio", str(audio), "--video", str(video), "--no-cache")
    for i in range(2):
        ingest_cli.main([str(tmp_path / f"p{i}"), *clips, "--shard", f"{i}/2"])
    assert "wrote shard 1/2 to" in capsys.readouterr().out
    ingest_cli.main([str(tmp_path / "p1"), *clips, "--shard", "1/2"])
    assert "already there: kept" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_code:
        ingest_cli.main([str(tmp_path / "x"), "--merge", str(tmp_path / "p0")])
    assert exit_code.value.code != 0 and "shard(s) 1/2 missing" in capsys.readouterr().err
    ingest_cli.main([str(tmp_path / "all.npz"), "--merge", str(tmp_path / "p0"), str(tmp_path / "p1")])
    assert f"wrote {tmp_path / 'all.npz'}" in capsys.readouterr().out
    merged = formats.read(tmp_path / "all.npz")
    assert sum(len(s) for s in merged.all()) == 23  # 4 actors x 6 emotions, less the broken recording

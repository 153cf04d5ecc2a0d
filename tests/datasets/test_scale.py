"""Data at scale (issue 14): ragged clips read clip by clip, the native directory, the generator's
on-disk cache, streaming fits and the DataLoader batches, each against an in-memory reference."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import STREAM, compose_train, make_split
from mer_cli.cli import commands
from mer_cli.core.errors import ConfigError, DataError
from mer_cli.data import folds, synthetic
from mer_cli.data.load import load_data
from mer_cli.data.native import DatasetWriter, NpyRows, is_dataset_dir, load_dir, save_dir
from mer_cli.data.npz import load_npz, save_npz
from mer_cli.data.splits import NOTEBOOK_CLASS_NAMES, Clips, Splits
from mer_cli.preprocess import align, sequences
from mer_cli.preprocess.sequences import Ragged, SequenceSet
from mer_cli.runs import execute, trained
from mer_cli.runs.evaluate import evaluate_run
from mer_cli.runs.train import prepare
from mer_cli.training import batching, loop

SPEC = synthetic.Spec(n_actors=6, clips_per_actor_per_class=2)


def _same_splits(a: Splits, b: Splits) -> None:
    assert a.class_names == b.class_names
    for sa, sb in zip(a.all(), b.all(), strict=True):
        assert sa.clip_ids == sb.clip_ids
        assert sa.labels.tolist() == sb.labels.tolist()
        for x, y in zip([*sa.mfcc, *sa.aus], [*sb.mfcc, *sb.aus], strict=True):
            assert x.dtype == y.dtype == np.float32
            np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------------------------------------
# Ragged clips


def test_clips_take_and_concat_copy_no_frames_and_keep_every_clip():
    rng = np.random.default_rng(0)
    parts = [make_split(n, 5, rng) for n in ("a", "b")]
    whole = Clips.concat([p.mfcc for p in parts])
    expected = [*parts[0].mfcc, *parts[1].mfcc]
    assert len(whole) == 10 and whole.lengths.tolist() == [len(x) for x in expected]
    picked = whole.take([9, 0, 4])
    for got, want in zip(picked, [expected[9], expected[0], expected[4]], strict=True):
        np.testing.assert_array_equal(got, want)
        assert np.shares_memory(got, whole.stores[0][0]) or np.shares_memory(got, whole.stores[1][0])


def test_folds_of_a_native_directory_are_the_folds_of_the_same_data_in_memory(tmp_path):
    mem = synthetic.generate(SPEC)
    disk = load_dir(save_dir(mem, tmp_path / "d"))
    for fold in range(3):
        _same_splits(
            folds.split(mem, 3, fold, folds.CREMA_D_ACTOR_PATTERN),
            folds.split(disk, 3, fold, folds.CREMA_D_ACTOR_PATTERN),
        )


# ---------------------------------------------------------------------------------------------
# The native directory


def test_native_directory_round_trip_reads_the_same_clips_from_disk(tmp_path):
    mem = synthetic.generate(SPEC)
    path = save_dir(mem, tmp_path / "features")
    back = load_dir(path)
    _same_splits(mem, back)
    # frames stay on disk: read by explicit reads, never loaded whole
    assert isinstance(back.train.mfcc.stores[0][0], NpyRows)
    # plain .npy files any tool can map
    frames = np.load(path / "train" / "mfcc.npy", mmap_mode="r")
    offsets = np.load(path / "train" / "mfcc_offsets.npy")
    np.testing.assert_array_equal(frames[offsets[3] : offsets[4]], mem.train.mfcc[3])
    index = json.loads((path / "dataset.json").read_text())
    assert index["splits"] == {s.name: len(s) for s in mem.all()}


def test_native_directory_carries_the_ingestion_settings(tmp_path):
    settings = {"acoustic": {"sample_rate": 16000}, "visual": {"au_columns": ["AU01_r"]}}
    splits = synthetic.generate(SPEC)
    splits = Splits(*splits.all(), splits.class_names, splits.source, ingest_settings=settings)
    assert load_dir(save_dir(splits, tmp_path / "d")).ingest_settings == settings


def test_mer_convert_writes_a_directory_from_a_pickle_or_an_npz(tmp_path, capsys):
    mem = synthetic.generate(SPEC)
    npz = save_npz(mem, tmp_path / "f.npz")
    commands.convert_main([str(npz), str(tmp_path / "from_npz")])
    assert f"wrote {tmp_path / 'from_npz'}: " in capsys.readouterr().out
    _same_splits(load_npz(npz), load_dir(tmp_path / "from_npz"))
    with pytest.raises(SystemExit):  # never over an existing path
        commands.convert_main([str(npz), str(tmp_path / "from_npz")])
    assert capsys.readouterr().err.strip() == (
        f"mer-convert: error: {tmp_path / 'from_npz'}: already exists; choose a new directory "
        "(nothing was written)"
    )


def _corrupt(path: Path, case: str) -> None:
    if case == "truncated":
        f = path / "val" / "aus.npy"
        f.write_bytes(f.read_bytes()[:-8])
    elif case == "offsets":
        np.save(path / "test" / "mfcc_offsets.npy", np.array([0, 5], dtype=np.int64))
    elif case == "missing":
        (path / "train" / "labels.npy").unlink()
    elif case == "nan":
        frames = np.load(path / "test" / "mfcc.npy", mmap_mode="r+")
        offsets = np.load(path / "test" / "mfcc_offsets.npy")
        frames[offsets[2] + 1, 0] = np.nan
        frames.flush()
    elif case == "index":
        (path / "dataset.json").write_text('{"format": "something else"}')


@pytest.mark.parametrize(
    ("case", "pattern"),
    [
        ("truncated", r"val/aus\.npy: truncated: \d+ bytes, the header promises \d+"),
        ("offsets", r"test: mfcc_offsets must rise from 0 to the \d+ frames of test/mfcc\.npy"),
        ("missing", r"train: missing labels\.npy"),
        ("nan", r"test/\S+: NaN or infinite values in 1 clip\(s\)"),
        ("index", r"dataset\.json: not a mer-cli dataset index"),
    ],
)
def test_bad_native_directory_is_one_error_naming_it(tmp_path, case, pattern):
    path = save_dir(synthetic.generate(SPEC), tmp_path / "d")
    _corrupt(path, case)
    with pytest.raises(DataError) as e:
        load_dir(path)
    assert re.search(pattern, str(e.value)), str(e.value)
    assert "\n" not in str(e.value)


def test_nan_policy_zero_on_a_directory_zeroes_when_read_and_leaves_the_file(tmp_path):
    path = save_dir(synthetic.generate(SPEC), tmp_path / "d")
    _corrupt(path, "nan")
    splits = load_dir(path, nan_policy="zero")
    assert splits.test.mfcc[2][1, 0] == 0.0 and np.isfinite(splits.test.mfcc[2]).all()
    assert np.isnan(np.load(path / "test" / "mfcc.npy")).sum() == 1
    assert len(load_dir(path, nan_policy="drop").test) == len(splits.test) - 1


# ---------------------------------------------------------------------------------------------
# The generator's on-disk cache


def test_generated_cache_holds_the_in_memory_dataset_and_is_reused(tmp_path, monkeypatch):
    disk = synthetic.cached(SPEC, tmp_path)
    _same_splits(synthetic.generate(SPEC), disk)
    (entry,) = tmp_path.iterdir()
    assert entry.name == f"synthetic-{synthetic.cache_key(SPEC)}"

    def fail(spec):
        raise AssertionError("generated again")

    monkeypatch.setattr(synthetic, "generate_clips", fail)
    _same_splits(disk, synthetic.cached(SPEC, tmp_path))
    other = synthetic.Spec(n_actors=6, clips_per_actor_per_class=2, seed=1)
    assert synthetic.cache_key(other) != synthetic.cache_key(SPEC)


def test_a_half_written_cache_is_never_seen_and_a_second_writer_yields(tmp_path):
    path = tmp_path / f"synthetic-{synthetic.cache_key(SPEC)}"
    writer = DatasetWriter(path, NOTEBOOK_CLASS_NAMES)
    for split, clip_id, mfcc, aus, label in synthetic.generate_clips(SPEC):
        writer.add(split, clip_id, mfcc, aus, label)
        break
    assert not is_dataset_dir(path)  # a concurrent run sees no dataset yet: it writes its own
    synthetic.cached(SPEC, tmp_path)  # that other run finishes first
    assert writer.finish() is False  # the first one then keeps theirs, and leaves nothing behind
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_load_data_puts_large_generated_data_in_the_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(synthetic.CACHE_ENV, str(tmp_path / "env"))
    cfg = OmegaConf.create(
        {
            "name": "synthetic",
            "limit_per_split": None,
            "cache": "disk",
            "cache_dir": None,
            "generator": {"n_actors": 6, "clips_per_actor_per_class": 2},
        }
    )
    splits = load_data(cfg)
    assert (tmp_path / "env").is_dir() and splits.source == SPEC.describe()
    cfg.cache = "sometimes"
    with pytest.raises(ConfigError, match=r"data.cache='sometimes': valid: auto, memory, disk"):
        load_data(cfg)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"clips_per_actor_per_class": 14}, "data.generator.clips_per_actor_per_class=14: must be 1..12"),
        ({"n_actors": 2}, "data.generator.n_actors=2: must be 3..8999"),
        ({"max_duration_s": 0.5}, "data.generator.max_duration_s=0.5: must be at least min_duration_s=1.2"),
        ({"n_actor": 5}, "data.generator.n_actor: unknown setting; valid: seed, n_actors"),
    ],
)
def test_generator_settings_are_checked_with_one_line(override, message):
    with pytest.raises(ConfigError) as e:
        synthetic.spec_from_config({**{"n_actors": 40}, **override})
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# Streaming fits


class _NoFrames(Clips):
    def __getitem__(self, i):  # type: ignore[override]
        raise AssertionError("a frame was read")


def test_target_length_reads_lengths_only():
    clips = Clips.pack([np.zeros((n, 2), np.float32) for n in (10, 20, 30, 40)])
    blind = _NoFrames(clips.stores)
    assert sequences.fit_target_length(blind, 95).length == 39


def test_the_scaler_fit_streams_over_ragged_clips_and_matches_numpy_on_all_frames():
    rng = np.random.default_rng(0)
    clips = [rng.normal(3, 5, (int(rng.integers(1, 60)), 4)).astype(np.float32) * 1e3 for _ in range(50)]
    frames = np.concatenate(clips).astype(np.float64)
    prep = sequences.fit(Clips.pack(clips), percentile=100, normalize=True)  # no clip cut
    np.testing.assert_allclose(prep.scaler.center, frames.mean(0), rtol=1e-12)
    np.testing.assert_allclose(prep.scaler.scale, frames.std(0), rtol=1e-9)


def test_early_fusion_per_clip_equals_fusing_every_clip_first():
    split = synthetic.generate(SPEC).train
    lazy = trained.model_inputs(split, "early", ["acoustic", "visual"])["early"]
    eager = [align.early_fuse(m, a) for m, a in zip(split.mfcc, split.aus, strict=True)]
    prep = sequences.fit(lazy, percentile=90, normalize=True)
    reference = sequences.fit(eager, percentile=90, normalize=True)
    assert prep.target == reference.target
    np.testing.assert_array_equal(prep.scaler.center, reference.scaler.center)
    np.testing.assert_array_equal(prep.scaler.scale, reference.scaler.scale)
    prepared = prep.apply(lazy)
    for i, x in enumerate(eager):
        np.testing.assert_array_equal(prepared.clip(i), prep.scaler.transform(x[: prep.target.length]))


# ---------------------------------------------------------------------------------------------
# DataLoader batches


@pytest.mark.parametrize("n", [2, 3, 17, 128, 129, 1024, 1025, 1031])
@pytest.mark.parametrize("bucket", [True, False])
def test_batch_count_is_known_before_the_batches_are_drawn(n, bucket):
    got = batching.batch_indices(torch.arange(n), 128, torch.Generator().manual_seed(0), bucket, 8)
    assert batching.n_batches(n, 128, bucket, 8) == len(got)


def _set(n: int = 40) -> SequenceSet:
    rng = np.random.default_rng(1)
    clips = [rng.normal(size=(int(rng.integers(3, 30)), 4)).astype(np.float32) for _ in range(n)]
    offsets = np.concatenate([[0], np.cumsum([len(c) for c in clips])]).astype(np.int64)
    y = torch.arange(n) % 6
    return SequenceSet({STREAM: Ragged(np.concatenate(clips), offsets, 29)}, y, tuple(map(str, range(n))))


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.slow
def test_loader_batches_are_batch_indices_padded(workers):
    data_set = _set()
    settings = loop.Settings(batch_size=8, bucket_batches=2)
    loader = batching.batch_loader(
        data_set,
        loop.BucketBatchSampler(data_set.lengths, settings, torch.Generator().manual_seed(3)),
        torch.device("cpu"),
        workers=workers,
    )
    expected = batching.batch_indices(data_set.lengths, 8, torch.Generator().manual_seed(3), True, 2)
    got = list(loader)
    assert len(got) == len(loader) == len(expected)
    for (inputs, y), idx in zip(got, expected, strict=True):
        x, lengths = inputs[STREAM]
        ref_x, ref_lengths = batching.gather_batch(data_set, idx, torch.device("cpu"))[0][STREAM]
        torch.testing.assert_close(x, ref_x, rtol=0, atol=0)
        assert lengths.tolist() == ref_lengths.tolist() == data_set.lengths[idx].tolist()
        assert x.shape[1] == min(29, batching.padded_length(int(lengths.max())))
        assert y.tolist() == data_set.y[idx].tolist()


def test_the_loader_leaves_the_global_rng_alone():
    data_set = _set()
    before = torch.get_rng_state()
    loader = batching.batch_loader(data_set, [[0, 1], [2, 3]], torch.device("cpu"))
    list(loader)
    assert torch.equal(before, torch.get_rng_state())  # dropout draws from it: same seed, same run


def test_loader_workers_setting_is_checked():
    with pytest.raises(ConfigError, match=r"runtime\.loader_workers=-1: must be 0 or more"):
        loop.Settings(loader_workers=-1)


def test_cache_root_follows_config_then_env_then_xdg(tmp_path, monkeypatch):
    monkeypatch.delenv(synthetic.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert synthetic.cache_root() == tmp_path / "xdg" / "mer-cli"
    monkeypatch.setenv(synthetic.CACHE_ENV, str(tmp_path / "env"))
    assert synthetic.cache_root() == tmp_path / "env"
    assert synthetic.cache_root(str(tmp_path / "cfg")) == tmp_path / "cfg"


def test_clips_on_disk_are_prepared_per_batch_as_those_in_memory_once(tmp_path):
    mem = synthetic.generate(SPEC)
    disk = load_dir(save_dir(mem, tmp_path / "d"))
    for modality, streams in (("early", ["acoustic", "visual"]), ("joint", ["acoustic", "visual"])):
        inputs = trained.model_inputs(mem.train, modality, streams)
        preps = {n: sequences.fit(f, percentile=95, normalize=True) for n, f in inputs.items()}
        in_memory = prepare(mem, modality, streams, preps)
        on_disk = prepare(disk, modality, streams, preps)
        for a, b in zip(in_memory, on_disk, strict=True):
            for name in preps:
                assert isinstance(a.streams[name], Ragged)  # prepared once
                assert isinstance(b.streams[name], sequences.Prepared)  # prepared when read
                assert a.streams[name].lengths.tolist() == b.streams[name].lengths.tolist()
                for i in range(len(a)):
                    np.testing.assert_array_equal(a.streams[name].clip(i), b.streams[name].clip(i))


SMOKE = ("experiment=smoke", "runtime.save_plots=false")
SMALL = (*SMOKE, "data.generator.n_actors=6", "data.generator.clips_per_actor_per_class=2")


@pytest.mark.parametrize("modality", ["early", "late"])
@pytest.mark.slow
def test_training_on_the_disk_cache_gives_the_in_memory_metrics_and_evaluates_again(tmp_path, modality):
    metrics = {}
    for where in ("memory", "disk"):
        cfg = compose_train(
            *SMALL, f"modality={modality}", f"data.cache={where}", f"data.cache_dir={tmp_path / 'cache'}"
        )
        metrics[where] = execute.run(cfg, tmp_path / where)
    assert (tmp_path / "cache").is_dir()
    for split in ("val", "test"):
        assert metrics["disk"][split] == metrics["memory"][split]
    _, again = evaluate_run(tmp_path / "disk", None, ("test",), save_plots=False)
    assert again["test"] == metrics["disk"]["test"]
    # mer-evaluate --data DIR: the run trained in memory, evaluated on the cache directory
    (cache,) = (tmp_path / "cache").iterdir()
    _, on_dir = evaluate_run(tmp_path / "memory", cache, ("test",), save_plots=False)
    assert on_dir["run"]["data"] == str(cache) and on_dir["test"] == metrics["memory"]["test"]


@pytest.mark.slow
def test_a_cv_fold_of_a_native_directory_trains_as_the_same_data_in_memory(tmp_path):
    npz = save_npz(synthetic.generate(SPEC), tmp_path / "f.npz")
    native = save_dir(load_npz(npz), tmp_path / "d")
    metrics = {}
    for name, path in (("npz", npz), ("native", native)):
        cfg = compose_train(
            *SMOKE, "modality=visual", f"data={name}", f"data.path={path}", "cv.folds=3", "cv.fold=1"
        )
        metrics[name] = execute.run(cfg, tmp_path / name)
    for split in ("val", "test"):
        assert metrics["native"][split] == metrics["npz"][split]

"""mer-ingest: raw clips (audio + face tracks or videos) -> a native dataset, through the feature
back-ends picked by name (data.ingest does the work, data.features the extraction); with
``--shard I/N`` one shard of that ingest, with ``--merge SHARD...`` the shards as one dataset
(data.shards)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from mer_cli.core.console import fail
from mer_cli.core.errors import ConfigError, MerError
from mer_cli.data import formats, ingest, shards
from mer_cli.data.features import catalog, mfcc, openface
from mer_cli.data.features.base import Extractor
from mer_cli.data.features.cache import default_root

PROG = "mer-ingest"
log = logging.getLogger("mer_cli")

# the config group of presets: configs/features/<folder>/<name>.yaml, a back-end and its options
PRESET_FOLDERS = {"acoustic": "audio", "visual": "video"}
# options a named flag sets, per stream: the first of the names that the back-end has
# (--audio-model / --video-model set the back-end's own `model_setting`)
FLAG_OPTIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "acoustic": {"layers": ("layers",)},
    "visual": {"columns": ("columns", "au_columns")},
}
# the MFCC and OpenFace flags of the first mer-ingest, kept: each sets its back-end's option
MFCC_FLAGS = {
    "sample_rate": "sample_rate",
    "window_ms": "window_ms",
    "hop_ms": "hop_ms",
    "n_mfcc": "n_mfcc",
    "n_mels": "n_mels",
    "deltas": "delta_orders",
}


def presets_dir() -> Path:
    from mer_cli.cli.commands import config_dir

    return Path(config_dir()) / "features"


def preset_names(stream: str) -> list[str]:
    """The presets users pick (``--audio-features NAME``): the preset files, then the back-ends."""
    files = sorted(p.stem for p in (presets_dir() / PRESET_FOLDERS[stream]).glob("*.yaml"))
    return list(dict.fromkeys([*files, *catalog.BACKENDS[stream].names()]))


def read_preset(stream: str, name: str) -> tuple[str, dict[str, Any]]:
    """(back-end, options) of preset ``name``: its YAML file, or a back-end's defaults."""
    path = presets_dir() / PRESET_FOLDERS[stream] / f"{name}.yaml"
    if path.is_file():
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict) or "backend" not in loaded:
            raise ConfigError(f"{path}: a preset is a mapping with a 'backend' key and its options")
        options = dict(loaded)
        return str(options.pop("backend")), options
    if name in catalog.BACKENDS[stream]:
        return name, {}
    flag = "--audio-features" if stream == "acoustic" else "--video-features"
    raise ConfigError(f"{flag} {name}: valid: {', '.join(preset_names(stream))}")


def parse_options(pairs: Sequence[str], flag: str) -> dict[str, Any]:
    """``KEY=VALUE`` pairs, each value read as YAML (``layers=[6, 9]``, ``batch_size=8``)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not key or not sep:
            raise ConfigError(f"{flag} {pair}: expected KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return out


def open_extractor(
    stream: str, preset: str, flags: Mapping[str, Any], options: Mapping[str, Any]
) -> Extractor:
    """The back-end of ``preset`` opened with the preset's options, then ``flags`` (named flags:
    --audio-model, ...), then ``options`` (--audio-option KEY=VALUE) over them."""
    name, merged = read_preset(stream, preset)
    backend = catalog.get(stream, name, "--audio-features" if stream == "acoustic" else "--video-features")
    fields = {f.name for f in dataclasses.fields(backend.settings)}
    for flag, value in flags.items():
        if value is None:
            continue
        names = (backend.model_setting or "",) if flag == "model" else FLAG_OPTIONS[stream].get(flag, (flag,))
        targets = [f for f in names if f in fields]
        if not targets:
            raise ConfigError(
                f"--{PRESET_FOLDERS[stream]}-{flag.replace('_', '-')}: the {name} back-end has no such option"
            )
        merged[targets[0]] = value
    merged.update(options)
    return backend.open(backend.make_settings(merged, f"{PROG} ({stream} back-end {name})"))


def main(argv: list[str] | None = None) -> None:
    """mer-ingest OUT --audio DIR --video DIR [--audio-features NAME] [--video-features NAME] ..."""
    a, n = mfcc.Settings(), ingest.Names()
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Build a native dataset (a directory, or an .npz) from one audio file and one "
        "video-side file (a face toolkit's CSV, or a video) per clip, paired by file name, split by "
        "actor, with the feature back-ends you pick; the dataset records how its features were made.",
    )
    parser.add_argument("target", type=Path, help="the dataset to write: a new directory, or FILE.npz")
    parser.add_argument("--audio", type=Path, help="folder of <clip>.wav (.flac, .ogg) files")
    parser.add_argument("--video", type=Path, help="folder of <clip>.csv / video files")
    g = parser.add_argument_group("sharded ingest (one process per shard, e.g. a SLURM array job)")
    g.add_argument(
        "--shard",
        metavar="I/N",
        help="write only shard I of N (0-based) of this ingest to TARGET, a directory; a finished "
        "shard run again is kept",
    )
    g.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        metavar="SHARD",
        help="write TARGET from the shard directories 0..N-1 of one ingest (no --audio/--video)",
    )
    g = parser.add_argument_group("acoustic features")
    g.add_argument(
        "--audio-features", default="mfcc", metavar="NAME", help="a preset or back-end (default mfcc)"
    )
    g.add_argument("--audio-model", help="a local model directory, or a model id in the local cache")
    g.add_argument("--audio-layers", help="hidden layers to keep: N, A-B, or all")
    g.add_argument(
        "--audio-option", action="append", default=[], metavar="KEY=VALUE", help="any back-end option"
    )
    g.add_argument("--sample-rate", type=int, help=f"mfcc: Hz (default {a.sample_rate}; files are resampled)")
    g.add_argument("--window-ms", type=float, help=f"mfcc (default {a.window_ms:g})")
    g.add_argument("--hop-ms", type=float, help=f"mfcc (default {a.hop_ms:g})")
    g.add_argument("--n-mfcc", type=int, help=f"mfcc (default {a.n_mfcc})")
    g.add_argument("--n-mels", type=int, help=f"mfcc (default {a.n_mels})")
    g.add_argument(
        "--deltas", type=int, choices=(0, 1, 2), help=f"mfcc: delta orders (default {a.delta_orders})"
    )
    g = parser.add_argument_group("visual features")
    g.add_argument(
        "--video-features", default="openface", metavar="NAME", help="a preset or back-end (default openface)"
    )
    g.add_argument("--video-model", help="a local vision model directory, or a model id in the local cache")
    g.add_argument("--video-columns", nargs="+", metavar="PATTERN", help="table columns: names or patterns")
    g.add_argument(
        "--video-option", action="append", default=[], metavar="KEY=VALUE", help="any back-end option"
    )
    g.add_argument("--au-columns", nargs="+", help="openface: the AU columns (default: the notebook's 17)")
    g.add_argument(
        "--failed-frames",
        choices=openface.FAILED_FRAME_POLICIES,
        help="openface: frames where the face was lost (success == 0; default interpolate)",
    )
    g = parser.add_argument_group("labels and splits")
    g.add_argument("--name-pattern", default=n.pattern, help="regex with groups 'actor' and 'emotion'")
    g.add_argument(
        "--emotions",
        nargs="+",
        default=[f"{k}={v}" for k, v in n.emotions.items()],
        metavar="CODE=CLASS",
        help="emotion codes, in label order (default: CREMA-D's, the notebook's order)",
    )
    g.add_argument("--val-fraction", type=float, default=0.15, help="of actors (0: no val split)")
    g.add_argument(
        "--test-fraction", type=float, default=0.15, help="of actors (1 with val 0: all clips in test)"
    )
    g.add_argument("--seed", type=int, default=0, help="draws which actors go to which split")
    g = parser.add_argument_group("feature cache")
    g.add_argument(
        "--cache", type=Path, default=None, help=f"folder of cached features (default {default_root()})"
    )
    g.add_argument("--no-cache", action="store_true", help="extract everything again, cache nothing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    if args.merge:
        if args.shard or args.audio or args.video:
            parser.error("--merge takes the shard directories only (no --shard, --audio, --video)")
        try:
            done = shards.merge(args.target, args.merge)
            splits = formats.read(args.target)
        except MerError as e:
            fail(PROG, str(e))
        print_done(args.target, done, splits)
        return
    if args.audio is None or args.video is None:
        parser.error("--audio and --video are required (or --merge SHARD...)")
    try:
        pairs = [e.partition("=") for e in args.emotions]
        if any(not code or not sep or not name for code, sep, name in pairs):
            raise MerError(f"--emotions {' '.join(args.emotions)}: expected CODE=CLASS pairs")
        names = ingest.Names(args.name_pattern, {code: name for code, _, name in pairs})
        audio_flags = {"model": args.audio_model, "layers": args.audio_layers}
        audio_flags |= {opt: getattr(args, flag) for flag, opt in MFCC_FLAGS.items()}
        video_flags = {"model": args.video_model, "columns": args.video_columns}
        video_flags |= {"au_columns": args.au_columns, "failed_frames": args.failed_frames}
        extractors = {
            "acoustic": open_extractor(
                "acoustic",
                args.audio_features,
                audio_flags,
                parse_options(args.audio_option, "--audio-option"),
            ),
            "visual": open_extractor(
                "visual", args.video_features, video_flags, parse_options(args.video_option, "--video-option")
            ),
        }
        options: dict[str, Any] = {
            "val_fraction": args.val_fraction,
            "test_fraction": args.test_fraction,
            "seed": args.seed,
            "cache_root": None if args.no_cache else (args.cache or default_root()),
        }
        if args.shard:
            index, count = shards.parse_shard(args.shard)
            got = shards.write_shard(
                args.target, (index, count), args.audio, args.video, extractors, names, **options
            )
            if got is None:
                print(f"{args.target}: shard {index}/{count} of this ingest is already there: kept")
            else:  # a part: its splits need not hold every class, so no summary table
                print(
                    f"wrote shard {index}/{count} to {args.target}: "
                    + ", ".join(f"{got.counts[s]} {s}" for s in got.counts)
                    + " clips; merge with --merge"
                )
            return
        else:
            done = ingest.write(args.target, args.audio, args.video, extractors, names, **options)
        splits = formats.read(args.target)
    except MerError as e:
        fail(PROG, str(e))
    print_done(args.target, done, splits)


def print_done(target: Path, done: ingest.Ingested, splits: Any) -> None:
    """What was left out (warnings), the cache's hits, clips per split and class, the features."""
    for line in done.report.lines():
        log.warning("left out %s", line)
    if done.cache_line:
        log.info("%s", done.cache_line)
    print(ingest.summary(splits))
    print(
        f"wrote {target}: "
        + ", ".join(f"{done.counts[s]} {s}" for s in done.counts)
        + f" clips; {done.n_features['acoustic']} acoustic ({done.record['acoustic']['backend']}) and "
        f"{done.n_features['visual']} visual ({done.record['visual']['backend']}) features per frame"
    )

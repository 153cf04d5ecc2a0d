"""Sharded ingestion: one ingest split over n processes (a SLURM array job, say), then merged.

`write_shard` plans the whole ingest as `ingest.write` does (files paired, labelled, splits drawn
by actor before any file is read), then extracts shard i of n: a contiguous block of the labelled
clips in file-name order, so the partition depends only on the clip list and n. Its output is a
native dataset directory holding that block plus ``shard.json`` (which shard, a digest of the
plan and the back-ends' records, the frame rates measured, what was left out), written into a
hidden sibling renamed into place: a shard is there whole or not at all. Run again, a finished
shard is detected and kept; a killed one left only its hidden leftover, which is removed.

`merge` checks that the shards are 0..n-1 of one plan and writes one dataset, each split's clips
shard after shard: the same clips in the same order, the same arrays, records and report as a
one-process ingest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mer_cli.core.artifacts import write_json
from mer_cli.core.errors import ConfigError, DataError
from mer_cli.data import native
from mer_cli.data.features.base import Extractor
from mer_cli.data.ingest import (
    Ingested,
    IngestReport,
    Names,
    Plan,
    check_splits_filled,
    dataset_target,
    extract_into,
    finish_dataset,
    plan,
)
from mer_cli.data.splits import SPLIT_NAMES

log = logging.getLogger(__name__)

SHARD_FILE = "shard.json"
SHARD_FORMAT = "mer-cli ingest shard"


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> (i, n), 0 <= i < n."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if m is None or not int(m.group(1)) < int(m.group(2)):
        raise ConfigError(f"--shard {text}: expected I/N with 0 <= I < N (e.g. 0/4, the first of four)")
    return int(m.group(1)), int(m.group(2))


def shard_clips(clips: Sequence[str], index: int, count: int) -> list[str]:
    """Shard ``index`` of ``count``: a contiguous block of ``clips``, the blocks' sizes differing
    by at most one (concatenated in shard order they give ``clips`` back)."""
    return list(clips[index * len(clips) // count : (index + 1) * len(clips) // count])


def plan_digest(planned: Plan, records: Mapping[str, Any], class_names: Sequence[str]) -> str:
    """What makes two shards parts of one ingest: the clips, their labels and splits, the
    back-ends' records and the classes (sha256)."""
    clips = [
        [stem, str(planned.pairs[stem]["acoustic"].name), str(planned.pairs[stem]["visual"].name),
         planned.actor_of[stem], planned.label_of[stem], planned.split_of[planned.actor_of[stem]]]
        for stem in planned.pairs
    ]  # fmt: skip
    text = json.dumps([clips, records, list(class_names)], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def read_shard_info(path: Path) -> dict[str, Any] | None:
    """``shard.json`` of ``path``, None where there is none (not a shard, or not finished)."""
    try:
        info = json.loads((path / SHARD_FILE).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get("format") == SHARD_FORMAT else None


def write_shard(
    out: Path,
    shard: tuple[int, int],
    audio_dir: Path,
    video_dir: Path,
    extractors: Mapping[str, Extractor],
    names: Names,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
    cache_root: Path | None = None,
    progress: bool = True,
) -> Ingested | None:
    """Shard ``shard`` = (i, n) of the ingest of the two folders, into the directory ``out``;
    None when ``out`` already holds this very shard (kept, nothing done)."""
    out = out.expanduser()
    index, count = shard
    planned = plan(audio_dir, video_dir, extractors, names, val_fraction, test_fraction, seed)
    records = {s: e.record() for s, e in extractors.items()}
    digest = plan_digest(planned, records, names.class_names)
    if out.exists():
        info = read_shard_info(out)
        if info is not None and (info["plan"], info["shard"], info["of"]) == (digest, index, count):
            return None
        raise DataError(
            f"{out}: already exists and is not shard {index}/{count} of this ingest; choose a new path"
        )
    if out.suffix == ".npz":
        raise ConfigError(f"{out}: a shard is a directory (the merged dataset may be an .npz)")
    if count > len(planned.pairs):
        raise ConfigError(f"--shard {index}/{count}: more shards than the {len(planned.pairs)} clips")
    for leftover in out.parent.glob(f".{out.name}.tmp-*"):  # of an earlier run of this shard, killed
        log.info("removing %s (an interrupted run of this shard)", leftover)
        shutil.rmtree(leftover, ignore_errors=True)
    clips = shard_clips(list(planned.pairs), index, count)
    writer = native.DatasetWriter(out, names.class_names, records)
    try:
        counts, rates, extraction = extract_into(writer, planned, clips, extractors, cache_root, progress)
        info = {
            "format": SHARD_FORMAT,
            "shard": index,
            "of": count,
            "plan": digest,
            "clips": clips,
            "wanted_splits": planned.wanted_splits,
            "records": records,
            "rates": rates,
            "report": {k: getattr(planned.report, k) for k in ("unpaired", "unlabelled", "unreadable")},
        }
        write_json(writer.tmp / SHARD_FILE, info)  # inside the folder renamed into place: whole or absent
        n_features = writer.n_features()
        if not writer.finish():
            raise DataError(f"{out}: appeared while writing; nothing was written")
    except BaseException:
        writer.abort()
        raise
    return Ingested(out, counts, n_features, records, planned.report, extraction.cache_line())


def merge(out: Path, shard_dirs: Sequence[Path]) -> Ingested:
    """One dataset at ``out`` (a directory or an .npz) from the shards 0..n-1 of one ingest."""
    out = out.expanduser()
    if out.exists():
        raise DataError(f"{out}: already exists; choose a new path (nothing was written)")
    infos = {}
    for d in shard_dirs:
        info = read_shard_info(d)
        if info is None:
            raise DataError(f"{d}: not a finished ingest shard (no {SHARD_FILE}): run its mer-ingest --shard")
        infos[Path(d)] = info
    first = next(iter(infos.values()), None)
    if first is None:
        raise ConfigError("--merge: name the shard directories to merge")
    others = [d for d, i in infos.items() if (i["plan"], i["of"]) != (first["plan"], first["of"])]
    if others:
        raise DataError(f"{others[0]}: a shard of another ingest (other clips, settings or shard count)")
    by_index: dict[int, Path] = {}
    for d, i in infos.items():
        if i["shard"] in by_index:
            raise DataError(f"{d}: shard {i['shard']}/{i['of']} again (also {by_index[i['shard']]})")
        by_index[i["shard"]] = d
    missing = [f"{i}/{first['of']}" for i in range(first["of"]) if i not in by_index]
    if missing:
        raise DataError(
            f"--merge: shard(s) {', '.join(missing)} missing; run them (mer-ingest --shard) first"
        )
    ordered = [native.open_parts(by_index[i]) for i in range(first["of"])]
    report = IngestReport(
        unpaired=list(first["report"]["unpaired"]),
        unlabelled=list(first["report"]["unlabelled"]),
        unreadable=[u for i in range(first["of"]) for u in infos[by_index[i]]["report"]["unreadable"]],
    )
    writer = native.DatasetWriter(dataset_target(out, first["wanted_splits"]), ordered[0][1])
    counts = dict.fromkeys(SPLIT_NAMES, 0)
    try:
        for split in SPLIT_NAMES:  # each split's clips shard after shard: the one-process order
            for splits, _ in ordered:
                part = splits[split]
                writer.add_split(part)
                counts[split] += len(part)
        check_splits_filled(counts, first["wanted_splits"], f"--merge {shard_dirs[0]} ...", report)
        rates = {
            s: [r for i in range(first["of"]) for r in infos[by_index[i]]["rates"][s]] for s in first["rates"]
        }
        record, n_features = finish_dataset(writer, first["records"], rates, out)
    except BaseException:
        writer.abort()
        raise
    return Ingested(out, counts, n_features, record, report, None)

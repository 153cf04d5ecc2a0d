"""make bench-features: how fast each feature back-end turns clips into frames and how much
memory it takes, and whether mer-ingest's memory stays flat as the number of clips grows.

For every back-end in `catalog.BACKENDS` (a new one joins with its default settings; one whose
optional library is missing is a row saying so), on generated clips (`extraction_inputs`: WAVs,
OpenFace-like CSVs, small videos) and, where it needs a model, a tiny random one saved to a
temporary folder, plus each base-size model the local caches already hold (never downloaded).
Each row runs in a fresh process: the back-end is opened (the load time, reported apart), one
clip is extracted to warm up (first-call compilation, oneDNN set-up: "first clip"), then all N
clips go through `extraction.Extraction` (the path mer-ingest and mer-predict take, in the
back-end's batches): clips/s, frames/s and seconds of media per second ("x realtime"); its
peak RSS is the child's ``ru_maxrss`` (from wait4). Torch back-ends run at each ``--threads``.
Then `mer_cli.data.ingest.write` ingests N and 4N clips (mfcc + openface; the tiny hf encoder +
openface) in fresh processes: both peak RSS values and their ratio, against a target of <= 1.1.

A child's ru_maxrss starts at its parent's high-water mark (Linux keeps the forked image's peak
through exec), so this parent never imports torch, transformers, funasr or PyAV: tiny models and
videos are made in children too, and each JSON row has the parent's peak (``parent_rss_mib``)
and the child's own (``vmhwm_mib``, VmHWM, reset by exec) to check against.

Output: the machine, load and versions, then two Markdown tables on stdout (each row also on
stderr as it finishes); ``--json FILE`` appends one JSON line per row.

    python benchmarks/extraction.py                             # every back-end (minutes on 2 cores)
    python benchmarks/extraction.py --backends mfcc audio/hf    # some (a name, or stream/name)
    python benchmarks/extraction.py --quick --backends mfcc openface   # seconds (the test suite)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import extraction_child as child
import extraction_inputs as inputs
import numpy as np

from mer_cli.core.errors import one_line
from mer_cli.data.features import catalog

STREAM_LABEL = {"acoustic": "audio", "visual": "video"}  # as mer-ingest's --audio-/--video-features
OPTIONS = {  # back-ends timed with settings of their own (the others: their defaults)
    ("acoustic", "opensmile"): {"eGeMAPSv02": {}, "ComParE_2016": {"feature_set": "ComParE_2016"}},
    ("visual", "table"): {  # the openface preset's columns through the generic reader
        "AU*_r, confidence, success": {
            "columns": ["AU*_r"],
            "timestamp_column": "timestamp",
            "confidence_column": "confidence",
            "success_column": "success",
        }
    },
}
MODELLED = set(inputs.TINY) | set(inputs.BASE_MODELS)  # back-ends with a model: torch's work
INGEST_MIXES = (("mfcc", "openface"), ("hf", "openface"))  # mer-ingest's audio + video back-ends
RSS_TARGET = 1.1  # peak RSS at 4N clips / at N clips
VERSIONS = ("numpy", "torch", "transformers", "librosa", "opensmile", "av", "funasr", "huggingface_hub")
ABSENT = "absent: not in the local cache"
# the settings that change these numbers, shown in the header (glibc's malloc: the RSS check)
ENVIRONMENT = (
    "OMP_WAIT_POLICY",
    "OMP_NUM_THREADS",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_ARENA_MAX",
    "GLIBC_TUNABLES",
)


def label(stream: str, name: str) -> str:
    return f"{STREAM_LABEL[stream]}/{name}"


def selected(wanted: Sequence[str] | None) -> list[tuple[str, str]]:
    """(stream, back-end) of every registered back-end ``wanted`` names (``mfcc``: in any
    stream; ``audio/hf``: that one), in the registry's order; all without ``wanted``."""
    every = [(s, n) for s, registry in catalog.BACKENDS.items() for n in registry.names()]
    if not wanted:
        return every
    known = {label(s, n) for s, n in every} | {n for _, n in every}
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise SystemExit(
            f"bench-features: no back-end {', '.join(unknown)}: valid: {', '.join(sorted(known))}"
        )
    return [(s, n) for s, n in every if n in wanted or label(s, n) in wanted]


# ---------------------------------------------------------------------------------------------
# In the parent: a child per row


def run_child(mode: str, case: dict[str, Any], work: Path) -> dict[str, Any]:
    """``case`` run in a fresh process (`extraction_child`, ``MODE``): its result, with
    ``peak_rss_mib`` the child's high-water mark from wait4 (ru_maxrss, KiB on Linux); or only
    ``status`` where it failed."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    if case.get("threads") is not None:  # the BLAS and OpenMP pools as well as torch's
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(case["threads"])
    spec, log = work / "case.json", work / "child.log"
    spec.write_text(json.dumps(case))
    parent = child.peak_rss_now_mib()
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, child.__file__, mode, str(spec)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        _, status, usage = os.wait4(proc.pid, 0)
    code, lines = os.waitstatus_to_exitcode(status), log.read_text().splitlines()
    if code != 0 or not lines or not lines[-1].startswith("{"):
        tail = next((x for x in reversed(lines) if x.strip()), "no output")
        return {"status": f"failed (exit {code}): {one_line(tail, 200)}"}
    return {
        **json.loads(lines[-1]),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
        "parent_rss_mib": parent,
    }


def backend_cases(
    stream: str, name: str, root: Path, hf_cache: set[str], threads: Sequence[int]
) -> list[dict[str, Any]]:
    """The rows of one back-end: each of its settings x model (tiny, cached base ones) x threads;
    a row with ``status`` instead where it cannot run (no input it reads, a missing library) and
    one per base model absent from this machine."""
    backend = catalog.get(stream, name)
    row: dict[str, Any] = {"kind": "backend", "backend": label(stream, name), "stream": stream, "name": name}
    row.update(model="-", threads=None)
    kind = inputs.input_kind(backend.file_patterns)
    if kind is None:
        return [{**row, "status": f"reads {', '.join(backend.file_patterns)}: nothing generated is one"}]
    models: dict[str, dict[str, Any]] = {"-": {}}
    absent = []
    if (stream, name) in MODELLED:
        got = run_child(
            "prepare",
            {
                "stream": stream,
                "name": name,
                "folder": str(root / "models" / f"{stream}-{name}"),
                "hf_cache": sorted(hf_cache),
                "base_models": inputs.BASE_MODELS.get((stream, name), ()),
            },
            root,
        )
        if "tiny" not in got:
            return [{**row, "status": got["status"]}]
        models = {"tiny random": got["tiny"]} if got["tiny"] else {}
        for model_id, options in got["base"].items():
            if options is None:
                absent.append({**row, "model": model_id, "status": ABSENT})
            else:
                models[model_id] = options
    cases = []
    for model, model_options in models.items():
        for variant, options in OPTIONS.get((stream, name), {"defaults": {}}).items():
            for k in threads if (stream, name) in MODELLED else (None,):
                shown = model if variant == "defaults" else variant
                merged = {**options, **model_options}
                cases.append({**row, "model": shown, "threads": k, "options": merged, "input": kind})
    return cases + absent


def ingest_rows(
    chosen: Sequence[tuple[str, str]], root: Path, args: argparse.Namespace, tiny: dict[str, Any]
) -> list[dict[str, Any]]:
    """One row per mix of INGEST_MIXES whose back-ends are all chosen: N and 4N clips ingested
    (the audio back-end's tiny model where it needs one), peak RSS of each and their ratio."""
    rows = []
    sizes = (args.ingest_clips, 4 * args.ingest_clips)
    for audio_name, video_name in INGEST_MIXES:
        if ("acoustic", audio_name) not in chosen or ("visual", video_name) not in chosen:
            continue
        modelled = ("acoustic", audio_name) in MODELLED
        options = tiny.get(label("acoustic", audio_name), {})
        row = {"kind": "ingest", "backends": f"{audio_name}{' (tiny)' if modelled else ''} + {video_name}"}
        if modelled and not options:
            why = "no tiny model (its row says why)"
            rows.append({**row, "clips": sizes, "peak_rss_mib": [None, None], "ratio": None, "status": why})
            continue
        got = []
        for n in sizes:
            folder = root / f"ingest-{n}"
            if not folder.is_dir():  # seed 1: other lengths than the back-ends' clips
                for kind in ("wav", "csv"):
                    inputs.write_clips(folder / kind, kind, inputs.clip_seconds(n, *args.seconds, seed=1))
            case = {
                "audio": str(folder / "wav"),
                "video": str(folder / "csv"),
                "out": str(root / f"dataset-{audio_name}-{n}"),
                "backends": {"acoustic": [audio_name, options], "visual": [video_name, {}]},
                "threads": max(args.threads) if modelled else None,
            }
            got.append(run_child("ingest", case, root))
        rss = [g.get("peak_rss_mib") for g in got]
        failed = [g["status"] for g in got if "peak_rss_mib" not in g]
        clips = [g.get("clips", n) for g, n in zip(got, sizes, strict=True)]
        rows.append(
            {
                **row,
                "clips": clips,
                "peak_rss_mib": rss,
                "ratio": None if failed else round(rss[1] / rss[0], 3),
                # what each clip more costs, against what its stored frames take (holding them all
                # in memory would grow the peak by about that much a clip)
                "growth_kib_per_clip": None
                if failed
                else round(1024 * (rss[1] - rss[0]) / (clips[1] - clips[0]), 1),
                "stored_kib_per_clip": got[-1].get("stored_kib_per_clip"),
                "target": RSS_TARGET,
                "ingest_s": [g.get("ingest_s") for g in got],
                "vmhwm_mib": [g.get("vmhwm_mib") for g in got],
                "parent_rss_mib": [g.get("parent_rss_mib") for g in got],
                "threads": case["threads"],
                "status": failed[0] if failed else "ok",
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------
# Output


def machine_lines(args: argparse.Namespace, hf_cache_path: str, n_cached: int) -> list[str]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            line.partition(":")[2].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    versions = []
    for dist in VERSIONS:
        try:
            versions.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{dist} (not installed)")
    return [
        f"bench-features {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {cpu}, "
        f"{len(os.sched_getaffinity(0))} cores, load average {load_average()} (1, 5, 15 min)",
        f"python {platform.python_version()}, {', '.join(versions)}",
        f"torch threads {' and '.join(map(str, args.threads))} for the model back-ends (also OMP/MKL); "
        "the others with their libraries' defaults; "
        + ", ".join(f"{k}={os.environ.get(k, '(unset)')}" for k in ENVIRONMENT),
        f"{args.clips} clips of {args.seconds[0]:g}-{args.seconds[1]:g} s: WAV {inputs.SAMPLE_RATE} Hz; "
        f"OpenFace-like CSV, {len(inputs.OPENFACE_HEADER)} columns, {inputs.FACE_FPS} rows/s; H.264 "
        f"{inputs.VIDEO_SIZE}x{inputs.VIDEO_SIZE} at {inputs.VIDEO_FPS} frames/s. RSS check: "
        f"{args.ingest_clips} vs {4 * args.ingest_clips} clips",
        f"local Hugging Face cache: {hf_cache_path} ({n_cached} models)",
    ]


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def fmt(value: Any, spec: str = "{}") -> str:
    return "-" if value is None else spec.format(value)


def backend_table(rows: Sequence[dict[str, Any]], header: bool = True) -> list[str]:
    out = [
        "| back-end | model / settings | torch threads | clips/s | frames/s | x realtime | load (s) | "
        "first clip (s) | peak RSS (MiB) | frames x features per clip | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    out = out if header else []
    for r in rows:
        if r["status"] == ABSENT:
            continue  # one line under the table
        per_clip = f"{r['frames'] / r['clips']:.0f} x {r['features']}" if r.get("clips") else "-"
        out.append(
            f"| {r['backend']} | {r['model']} | {fmt(r['threads'])} | "
            f"{fmt(r.get('clips_per_s'), '{:,.1f}')} | "
            f"{fmt(r.get('frames_per_s'), '{:,.0f}')} | {fmt(r.get('realtime_x'), '{:,.1f}')} | "
            f"{fmt(r.get('load_s'), '{:.2f}')} | {fmt(r.get('first_clip_s'), '{:.2f}')} | "
            f"{fmt(r.get('peak_rss_mib'), '{:,.0f}')} | {per_clip} | {r['status']} |"
        )
    absent = [r["model"] for r in rows if r["status"] == ABSENT]
    if absent and header:
        out += ["", f"Base models not in this machine's local caches, not timed: {', '.join(absent)}."]
    return out


def ingest_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    out = [
        "| mer-ingest (ingest.write) | clips | peak RSS (MiB) | 4x clips | peak RSS (MiB) | ratio | "
        f"target <= {RSS_TARGET} | growth (KiB/clip) | stored frames (KiB/clip) | status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        (n, n4), (a, b) = r["clips"], r["peak_rss_mib"]
        met = "-" if r["ratio"] is None else "met" if r["ratio"] <= RSS_TARGET else "NOT met"
        out.append(
            f"| {r['backends']} | {n} | {fmt(a, '{:,.0f}')} | {n4} | {fmt(b, '{:,.0f}')} | "
            f"{fmt(r['ratio'], '{:.3f}')} | {met} | {fmt(r.get('growth_kib_per_clip'), '{:.1f}')} | "
            f"{fmt(r.get('stored_kib_per_clip'), '{:.1f}')} | {r['status']} |"
        )
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", nargs="+", default=None, help="names (mfcc) or stream/name (audio/hf)")
    parser.add_argument("--clips", type=int, default=None, help="clips per back-end (default 32; --quick 4)")
    parser.add_argument("--ingest-clips", type=int, default=None, help="N of the RSS check (100; --quick 8)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads (default 1 2)")
    parser.add_argument("--json", type=Path, default=None, help="append one JSON line per row to this file")
    parser.add_argument("--quick", action="store_true", help="4 clips of 2 s, ingest 8 vs 32: seconds")
    args = parser.parse_args(argv)
    args.clips = args.clips or (4 if args.quick else 32)
    args.ingest_clips = args.ingest_clips or (8 if args.quick else 100)
    args.seconds = (2.0, 2.0) if args.quick else (2.0, 4.0)
    chosen = selected(args.backends)
    hf_cache, hf_cache_path = inputs.cached_models()
    header = machine_lines(args, hf_cache_path, len(hf_cache))
    seconds = inputs.clip_seconds(args.clips, *args.seconds)
    rows: list[dict[str, Any]] = []
    tiny: dict[str, Any] = {}  # back-end label -> the options of its tiny model
    written: dict[str, dict[str, Any]] = {}  # input kind -> how writing its clips went
    with tempfile.TemporaryDirectory(prefix="bench-features-") as tmp:
        root = Path(tmp)
        for stream, name in chosen:
            for case in backend_cases(stream, name, root, hf_cache, args.threads):
                if "status" not in case:
                    if case["model"] == "tiny random":
                        tiny[case["backend"]] = case["options"]
                    folder = root / "clips" / case["input"]
                    if case["input"] not in written:  # once per kind; a failure stays one
                        written[case["input"]] = write_inputs(folder, case["input"], seconds, root)
                    wrote = written[case["input"]]
                    if "status" in wrote:  # PyAV missing, for the videos
                        extra = catalog.get(stream, name).extra
                        hint = f"; pip install 'mer-cli[{extra}]'" if extra else ""
                        case = {**case, "status": f"cannot write its inputs: {wrote['status']}{hint}"}
                    else:
                        timed = {**case, "folder": str(folder), "media_seconds": float(seconds.sum())}
                        case = {**case, **run_child("backend", timed, root)}
                rows.append(case)
                for line in backend_table([case], header=False):  # none for an absent base model
                    print(line, file=sys.stderr, flush=True)
        rows += ingest_rows(chosen, root, args, tiny)
    header.append(f"load average at the end: {load_average()}")
    print("\n".join([*header, "", *backend_table([r for r in rows if r["kind"] == "backend"])]))
    print("\n".join(["", *ingest_table([r for r in rows if r["kind"] == "ingest"])]))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with args.json.open("a") as f:
            for r in rows:
                f.write(json.dumps({**r, "time_utc": stamp}) + "\n")


def write_inputs(folder: Path, kind: str, seconds: np.ndarray, root: Path) -> dict[str, Any]:
    """The clips of ``kind`` written: WAVs and CSVs here (numpy only), videos in a child (PyAV)."""
    if kind != "video":
        inputs.write_clips(folder, kind, seconds)
        return {}
    return run_child("prepare", {"folder": str(folder), "kind": kind, "seconds": seconds.tolist()}, root)


if __name__ == "__main__":
    main()

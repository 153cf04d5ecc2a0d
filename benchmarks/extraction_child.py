"""One measurement of make bench-features (benchmarks/extraction.py), in its own fresh process:
a back-end timed on a folder of clips, an ingest of N clips, or what the parent must not import
made (a tiny model, videos). The parent's peak RSS is where a child's ru_maxrss starts, so
whatever needs torch, transformers, funasr or PyAV happens here.

    python benchmarks/extraction_child.py MODE CASE.json    # MODE: backend | ingest | prepare

Input: the case (JSON). Output: one JSON line on stdout, the last, with the child's own peak
(``vmhwm_mib``: VmHWM, which exec resets) and torch's thread count where torch was imported.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import extraction_inputs as inputs
import numpy as np

from mer_cli.core.errors import MerError, one_line
from mer_cli.data.features import catalog


def peak_rss_now_mib() -> float | None:
    """This process's high-water mark (VmHWM) in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def set_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def time_backend(case: dict[str, Any]) -> dict[str, Any]:
    """Open the back-end, warm it up on one clip, extract every clip: the row's measurements."""
    from mer_cli.data.features.extraction import Extraction

    set_threads(case["threads"])
    backend = catalog.get(case["stream"], case["name"])
    paths = sorted(Path(case["folder"]).iterdir())
    started = time.perf_counter()
    try:
        extractor = backend.open(backend.make_settings(case["options"], "bench-features"))
    except MerError as e:  # a missing library or model: the row says which
        return {"status": one_line(e, 200)}
    load_s = time.perf_counter() - started
    rss_loaded = peak_rss_now_mib()
    started = time.perf_counter()
    extractor.extract(paths[:1])
    first_s = time.perf_counter() - started
    files = {p.stem: {case["stream"]: p} for p in paths}
    frames, features, problems = 0, None, []
    started = time.perf_counter()
    for clip in Extraction(files, {case["stream"]: extractor}, progress=False):
        if clip.frames is None:
            problems.append(f"{clip.clip_id}: {clip.problem}")
            continue
        x = clip.frames[case["stream"]].values
        frames, features = frames + x.shape[0], x.shape[1]
    seconds = time.perf_counter() - started
    done = len(paths) - len(problems)
    return {
        "status": "ok" if not problems else f"{len(problems)} clips failed: {problems[0]}",
        "load_s": round(load_s, 3),
        "first_clip_s": round(first_s, 3),
        "extract_s": round(seconds, 3),
        "clips": done,
        "frames": frames,
        "features": features,
        "clips_per_s": round(done / seconds, 2),
        "frames_per_s": round(frames / seconds, 1),
        "realtime_x": round(case["media_seconds"] / seconds, 1),
        "batch_size": extractor.batch_size,
        "rss_after_load_mib": rss_loaded,
    }


def time_ingest(case: dict[str, Any]) -> dict[str, Any]:
    """mer-ingest's real path (`ingest.write`) over the case's folders into a new dataset, with
    the malloc settings mer-ingest applies (`allocator.PROFILES["extract"]`)."""
    from mer_cli.core import allocator
    from mer_cli.data import ingest

    allocator.configure(profile="extract")

    set_threads(case["threads"])
    extractors = {}
    for stream, (name, options) in case["backends"].items():
        backend = catalog.get(stream, name)
        extractors[stream] = backend.open(backend.make_settings(options, "bench-features"))
    started = time.perf_counter()
    done = ingest.write(
        Path(case["out"]),
        Path(case["audio"]),
        Path(case["video"]),
        extractors,
        ingest.Names(),
        progress=False,
    )
    seconds, clips = time.perf_counter() - started, sum(done.counts.values())
    stored = sum(f.stat().st_size for f in Path(case["out"]).rglob("*") if f.is_file())
    return {
        "clips": clips,
        "ingest_s": round(seconds, 2),
        "stored_kib_per_clip": round(stored / 1024 / clips, 1),
    }


def prepare(case: dict[str, Any]) -> dict[str, Any]:
    """The case's clips written (``kind``), or a back-end's tiny model saved into the case's
    folder and the options of the base models this machine holds (None: absent)."""
    if "kind" in case:
        inputs.write_clips(Path(case["folder"]), case["kind"], np.asarray(case["seconds"]))
        return {}
    stream, name = case["stream"], case["name"]
    try:
        tiny = inputs.save_tiny(stream, name, Path(case["folder"]))
    except (ImportError, MerError) as e:
        extra = catalog.get(stream, name).extra
        hint = f": pip install 'mer-cli[{extra}]'" if extra else ""
        return {"status": f"cannot build its tiny model ({one_line(e, 120)}){hint}"}
    base = {m: inputs.base_options(stream, name, m, set(case["hf_cache"])) for m in case["base_models"]}
    return {"tiny": tiny, "base": base}


MODES = {"backend": time_backend, "ingest": time_ingest, "prepare": prepare}


def main(argv: list[str]) -> None:
    mode, spec = argv
    result = MODES[mode](json.loads(Path(spec).read_text()))
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    print(json.dumps({**result, "vmhwm_mib": peak_rss_now_mib(), "torch_threads": threads}))


if __name__ == "__main__":
    main(sys.argv[1:])

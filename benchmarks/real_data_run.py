"""`make bench-real`: mer-train's default settings on real public data, the zoo's best beside the
classic baselines.

    python benchmarks/real_data_run.py                         # fetch, sweep, summarise every set
    python benchmarks/real_data_run.py --tag per_clip --set preprocess.scaling=per_clip
    python benchmarks/real_data_run.py --summarize-only        # the summaries of finished sweeps

Input: the sets of benchmarks/real_data_fetch.py (converted into its cache on first use). For each
set one ``mer-train -m`` sweep at the default settings (nothing chosen per set but which encoders,
modalities and seeds fit the time: `GRIDS`; JapaneseVowels also sets data.allow_speaker_overlap,
its class being the speaker), into ``OUT/TAG/<set>`` (resume=auto: an interrupted benchmark
continues; finished runs are re-read, not retrained). ``report.baselines=true`` is added to every
sweep (each run then writes the classic baselines of its streams, baselines.json).
Output, per set, from the sweep's own comparison report (``comparison.json``) and the runs'
baselines.json (nothing re-scored here): ``summary.md`` and
``summary.json`` in ``OUT/TAG/<set>`` (the data's clips, classes, lengths and rates; the best
deep model per modality and overall, with the report's intervals; the baselines), and all sets
in ``OUT/TAG/summary.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import real_data_fetch as fetch  # benchmarks/real_data_fetch.py (the script's own folder)

from mer_cli.core.artifacts import write_text

MODALITIES = ("xattn", "early", "acoustic", "visual")  # longest first: two jobs at a time
METRICS = ("accuracy", "f1_macro")  # accuracy: the archive's own measure; macro F1: mer-cli's default


@dataclass(frozen=True)
class Grid:
    models: tuple[str, ...]
    seeds: tuple[int, ...]
    overrides: tuple[str, ...] = ()


# sized to about 30-45 min on 2 cores shared with other work (a run: 1-2 min on the small sets,
# ~10 min on PLAID, whose clips are cut to ~500 frames): tcn (the zoo's best on the embedded
# data) everywhere, inception beside it on the speech set, one seed on PLAID; --models / --seeds
# widen it (e.g. --models tcn inception bilstm)
GRIDS = {
    "JapaneseVowels": Grid(("tcn", "inception"), (0, 1, 2), ("data.allow_speaker_overlap=true",)),
    "BasicMotions": Grid(("tcn",), (0, 1, 2)),
    "PLAID": Grid(("tcn", "inception"), (0,)),
}


def mer_train() -> str:
    return str(Path(sys.executable).with_name("mer-train"))


def sweep_command(data: Path, grid: Grid, sweep_dir: Path, jobs: int, extra: Sequence[str]) -> list[str]:
    return [
        mer_train(),
        "-m",
        "hydra/launcher=joblib",
        f"hydra.launcher.n_jobs={jobs}",
        "runtime.num_threads=1",
        "data=native",
        f"data.path={data}",
        f"model={','.join(grid.models)}",
        f"modality={','.join(MODALITIES)}",
        f"seed={','.join(map(str, grid.seeds))}",
        "resume=auto",
        f"hydra.sweep.dir={sweep_dir}",
        *grid.overrides,
        *extra,
        "report.baselines=true",
    ]


def describe_data(path: Path) -> dict[str, Any]:
    """Clips per split, classes, frames per clip (min/median/max) and rates per stream of a native set."""
    index = json.loads((path / "dataset.json").read_text())
    streams: dict[str, Any] = {}
    for stream, field in (("acoustic", "mfcc"), ("visual", "aus")):
        lengths = np.concatenate(
            [np.diff(np.load(path / s / f"{field}_offsets.npy")) for s in index["splits"]]
        )
        rec = (index.get("ingest_settings") or {}).get(stream, {})
        streams[stream] = {
            "what": rec.get("what"),
            "features": len(rec.get("feature_names") or []),
            "frames": [int(lengths.min()), int(np.median(lengths)), int(lengths.max())],
            "frame_rate_hz": rec.get("frame_rate_hz"),
            "frames_per_sample": rec.get("frames_per_sample"),
        }
    return {"clips": index["splits"], "classes": len(index["class_names"]), "streams": streams}


def best_models(comparison: dict[str, Any], metric: str = "accuracy") -> dict[str, dict[str, Any]]:
    """Per modality and ``overall``, the model with the highest mean test ``metric`` (the report's
    mean over runs, its std and bootstrap interval, for every metric in `METRICS`)."""
    out: dict[str, dict[str, Any]] = {}
    for m in comparison["models"]:
        row = {"label": m["label"], "n_runs": m["n_runs"], **{k: m["test"].get(k) for k in METRICS}}
        for key in (m["modality"], "overall"):
            if key not in out or row[metric]["mean"] > out[key][metric]["mean"]:
                out[key] = row
    order = [*MODALITIES, *sorted(set(out) - {*MODALITIES, "overall"}), "overall"]
    return {k: out[k] for k in order if k in out}


def baseline_rows(sweep_dir: Path) -> list[dict[str, Any]] | None:
    """The classic baselines the sweep's runs wrote (``<run>/baselines.json``, mer-cli's own
    scores and intervals: one entry per baseline and set of streams), None where no run has them."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(sweep_dir.glob("*/baselines.json")):
        record = json.loads(path.read_text())
        streams = "+".join(record["data"]["streams"])
        for e in record["baselines"]:
            scores = {k: {"mean": e["test"][k], "std": None, "ci": e["test_ci"].get(k)} for k in METRICS}
            rows.setdefault(
                (streams, e["name"]),
                {"label": f"{e['name']} ({streams})", "chosen": e.get("chosen"), **scores},
            )
    return list(rows.values()) or None


def cell(summary: dict[str, Any] | None) -> str:
    if not summary:
        return "-"
    text = f"{100 * summary['mean']:.1f}"
    if summary.get("std") is not None:
        text += f" ± {100 * summary['std']:.1f}"
    if summary.get("ci"):
        text += " [{:.1f}, {:.1f}]".format(*(100 * v for v in summary["ci"]))
    return text


def summarise(name: str, grid: Grid, data: Path, sweep_dir: Path, extra: Sequence[str]) -> dict[str, Any]:
    comparison = json.loads((sweep_dir / "comparison.json").read_text())
    spec = fetch.SETS[name]
    return {
        "set": name,
        "domain": spec.domain,
        "data": describe_data(data),
        "settings": ["defaults", *grid.overrides, *extra],
        "grid": {
            "models": list(grid.models),
            "modalities": list(MODALITIES),
            "seeds": list(grid.seeds),
        },
        "ci_unit": sorted({m["ci_unit"] for m in comparison["models"]}),
        "confidence": comparison["settings"]["confidence"],
        "best": best_models(comparison),
        "baselines": baseline_rows(sweep_dir),
        "failures": len(comparison.get("failures", [])),
        "report": str(sweep_dir / "report.md"),
    }


def markdown(s: dict[str, Any]) -> str:
    d = s["data"]
    lines = [f"### {s['set']} ({s['domain']})", ""]
    lines.append(
        f"Clips train/val/test {d['clips']['train']}/{d['clips']['val']}/{d['clips']['test']}, "
        f"{d['classes']} classes; settings: {', '.join(s['settings'])}."
    )
    for stream, rec in d["streams"].items():
        rate = f"{rec['frame_rate_hz']:g} frames/s" if rec["frame_rate_hz"] else "rate not stated"
        if rec.get("frames_per_sample") not in (None, 1):
            rate += f", {rec['frames_per_sample']:g} frames per sample"
        lines.append(
            f"- {stream}: {rec['what']}, {rec['features']} features, frames min/median/max "
            f"{'/'.join(map(str, rec['frames']))}, {rate}"
        )
    lines += [
        "",
        f"| model (test, %: mean ± std over seeds [{100 * s['confidence']:.0f} % CI]) | best | "
        + " | ".join(METRICS)
        + " |",
        "|---|---|" + "---|" * len(METRICS),
    ]
    for key, row in s["best"].items():
        # a sweep over one encoder labels its models by modality only
        label = row["label"] if "/" in row["label"] else f"{row['label']}/{s['grid']['models'][0]}"
        lines.append(
            f"| {key} | `{label}` ({row['n_runs']} runs) | "
            + " | ".join(cell(row[k]) for k in METRICS)
            + " |"
        )
    for row in s["baselines"] or []:
        lines.append(f"| baseline | `{row['label']}` | " + " | ".join(cell(row[k]) for k in METRICS) + " |")
    if s["baselines"] is None:
        lines.append(
            "| baseline | (no report.baselines in this mer-cli) | " + " | ".join("-" * len(METRICS)) + " |"
        )
    lines += [
        "",
        f"Intervals: bootstrap over {'/'.join(s['ci_unit'])}; report: `{s['report']}`"
        + (f"; {s['failures']} failed run(s)" if s["failures"] else ""),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, default=fetch.default_cache())
    p.add_argument("--out", type=Path, default=Path("outputs/real-data"))
    p.add_argument("--tag", default="defaults", help="sub-folder of --out for this benchmark's sweeps")
    p.add_argument("--sets", nargs="+", default=list(GRIDS), choices=list(GRIDS))
    p.add_argument(
        "--set",
        dest="extra",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a mer-train override for every run (e.g. preprocess.scaling=per_clip)",
    )
    p.add_argument("--models", nargs="+", help="encoders for every set (default: each set's GRIDS entry)")
    p.add_argument("--seeds", nargs="+", type=int, help="seeds for every set (default: GRIDS)")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (one torch thread each)")
    p.add_argument("--summarize-only", action="store_true", help="no training: summarise finished sweeps")
    args = p.parse_args(argv)
    try:
        data = fetch.fetch(args.cache, args.sets, 0.2, 0)
    except fetch.FetchError as e:
        print(f"real_data_run: error: {e}", file=sys.stderr)
        return 2
    parts = []
    for name in args.sets:
        grid = GRIDS[name]
        grid = replace(grid, models=tuple(args.models or grid.models), seeds=tuple(args.seeds or grid.seeds))
        sweep_dir = args.out / args.tag / name
        if not args.summarize_only:
            cmd = sweep_command(data[name], grid, sweep_dir, args.jobs, args.extra)
            print(" ".join(cmd), flush=True)
            if subprocess.run(cmd).returncode != 0:
                print(
                    f"real_data_run: error: the {name} sweep failed (its log: {sweep_dir})", file=sys.stderr
                )
                return 1
        summary = summarise(name, grid, data[name], sweep_dir, args.extra)
        write_text(sweep_dir / "summary.json", json.dumps(summary, indent=1) + "\n")
        parts.append(markdown(summary))
        write_text(sweep_dir / "summary.md", parts[-1])
    write_text(args.out / args.tag / "summary.md", "\n".join(parts))
    print(f"summary: {args.out / args.tag / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

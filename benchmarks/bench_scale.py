"""make bench-scale: memory and speed of one training epoch as the dataset grows (issue 14).

For each size (clips), the embedded generator writes the dataset into the on-disk cache once
(``data.cache=disk``: 12 clips per actor and class, as many actors as it takes), then a fresh
``mer-train`` process trains the default model (early fusion) for one epoch on it. Reported per
size: the training process's peak RSS (the kernel's high-water mark, from wait4), the seconds from
its start to its first training batch (its train.log), the epoch's seconds (history.csv: training
and the validation pass) and the same for the generation step. One JSON line per size in --out
and a Markdown table on stdout.

    python benchmarks/bench_scale.py --sizes 1000,7000,70000,150000 --out outputs/bench-scale.jsonl
    python benchmarks/bench_scale.py --quick     # seconds: a tiny model on ~200 clips (the test suite)

Disk: the cache holds ~57 KB per clip (150k clips: ~8.6 GB) under --cache-dir.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLIPS_PER_ACTOR_PER_CLASS = 12
CLASSES = 6
QUICK_MODEL = ("model.encoder.hidden_sizes=[8,8]", "model.dense_size=16", "runtime.num_threads=1")
FIRST_BATCH = re.compile(r"first training batch ready ([\d.]+) s after the process started")


def actors_for(clips: int) -> int:
    return max(3, round(clips / (CLIPS_PER_ACTOR_PER_CLASS * CLASSES)))


def run_measured(cmd: list[str], env: dict[str, str], log: Path) -> tuple[int, float, float]:
    """Run ``cmd``; its exit code, wall seconds and peak RSS in MiB (its own, from wait4)."""
    started = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - started, usage.ru_maxrss / 1024  # KiB on Linux


def bench_size(clips: int, cache_dir: Path, work: Path, extra: list[str]) -> dict[str, object]:
    n_actors = actors_for(clips)
    generator = [
        f"data.generator.n_actors={n_actors}",
        f"data.generator.clips_per_actor_per_class={CLIPS_PER_ACTOR_PER_CLASS}",
        "data.cache=disk",
        f"data.cache_dir={cache_dir}",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    gen_code = (
        "import sys; from mer_cli.data import synthetic; "
        f"synthetic.cached(synthetic.Spec(n_actors={n_actors}, "
        f"clips_per_actor_per_class={CLIPS_PER_ACTOR_PER_CLASS}), __import__('pathlib').Path(sys.argv[1]))"
    )
    rc, gen_seconds, gen_rss = run_measured(
        [sys.executable, "-c", gen_code, str(cache_dir)], env, work / f"generate-{clips}.log"
    )
    if rc != 0:
        raise SystemExit(
            f"bench-scale: generating {clips} clips failed: see {work / f'generate-{clips}.log'}"
        )
    run_dir = work / f"run-{clips}"
    cmd = [
        sys.executable,
        "-m",
        "mer_cli",
        "train",
        *generator,
        "trainer.loop.max_epochs=1",
        "runtime.save_plots=false",
        "runtime.progress=false",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]
    rc, seconds, rss = run_measured(cmd, env, work / f"train-{clips}.log")
    if rc != 0:
        raise SystemExit(f"bench-scale: training on {clips} clips failed: see {work / f'train-{clips}.log'}")
    log_text = (run_dir / "train.log").read_text()
    first = FIRST_BATCH.search(log_text)
    with (run_dir / "history.csv").open() as f:
        epoch_seconds = float(next(csv.DictReader(f))["seconds"])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {
        "clips": n_actors * CLIPS_PER_ACTOR_PER_CLASS * CLASSES,
        "actors": n_actors,
        "peak_rss_mib": round(rss, 1),
        "first_batch_s": float(first.group(1)) if first else None,
        "epoch_s": round(epoch_seconds, 2),
        "wall_s": round(seconds, 2),
        "generate_s": round(gen_seconds, 2),
        "generate_peak_rss_mib": round(gen_rss, 1),
        "test_f1_macro": metrics["test"]["f1_macro"],
        "overrides": extra,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--sizes", default=None, help="clips per dataset, comma-separated (default 1000,7000)"
    )
    parser.add_argument("--out", type=Path, default=None, help="append one JSON line per size here")
    parser.add_argument("--cache-dir", type=Path, default=Path("outputs/cache"), help="the generated data")
    parser.add_argument("--quick", action="store_true", help="216 clips, a tiny model: seconds")
    parser.add_argument(
        "overrides", nargs="*", help="more mer-train overrides, e.g. runtime.loader_workers=1"
    )
    args = parser.parse_args(argv)
    # --quick: one toy size whatever --sizes says (make bench-scale ARGS=--quick)
    sizes = [216] if args.quick else [int(s) for s in (args.sizes or "1000,7000").split(",")]
    extra = [*(QUICK_MODEL if args.quick else ()), *args.overrides]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        for clips in sizes:
            row = bench_size(clips, args.cache_dir.resolve(), Path(tmp), extra)
            rows.append(row)
            if args.out is not None:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                with args.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
    print("| clips | peak RSS (GiB) | first batch (s) | epoch (s) | generation (s, once) |")
    print("|---|---|---|---|---|")
    for r in rows:
        first = "?" if r["first_batch_s"] is None else f"{r['first_batch_s']:.1f}"
        print(
            f"| {r['clips']:,} | {float(r['peak_rss_mib']) / 1024:.2f} | {first} | {r['epoch_s']} | "  # type: ignore[arg-type]
            f"{r['generate_s']} |"
        )


if __name__ == "__main__":
    main()

"""make bench: every speed figure with a target, measured in one run on this machine, in one table.

Parts, in this order (each is also its own make target, with more options):

- peaks: the fp32 and bf16 matmul peaks (`bench.matmul_peak`), what ``frac_of_peak`` divides by;
- train: mer-train's training and inference path (`bench.run_case`) for the default model
  (``bilstm``, 64/32) and the notebook's (``bilstm_notebook``, 512/256), early fusion's 356 x 69
  frames, fp32 and bf16: clips/s, fraction of the matmul peak, padding waste (make bench-peer,
  mer-bench);
- reference: every zoo encoder in early fusion against its plain PyTorch reference on the same
  weights and batches (`bench_reference.run_case`; make bench-reference for every fusion);
- padding: the padding waste of the default run's own training batches (the embedded data, the
  default trainer settings, 20 epochs of seed 0's batches), and with ``length_groups=5``;
- sweep: the 4-modality sweep, 2 seeds, ``--sweep-epochs`` epochs, sequentially (2 threads per job)
  and with ``hydra/launcher=joblib`` (2 jobs of 1 thread), wall seconds and their ratio;
- features: every feature back-end's clips/s and peak RSS (benchmarks/extraction.py, one fresh
  process per back-end), and mer-ingest's peak RSS at 8 and 32 clips against its <= 1.1x target
  (make bench-features for the 2-thread rows and the ingest check at 100 vs 400 clips).

Output: one table (target, measured, met or not) under a header naming the machine, the versions
and the thread settings; one JSON line per part's row in ``--out``. ``--quick``: tiny sizes, to
check that every part runs (seconds to a minute)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import bench
import bench_reference
import numpy as np
import torch

from mer_cli.core import allocator
from mer_cli.training import batching, loop

HERE = Path(__file__).resolve().parent
PARTS = ("train", "reference", "padding", "sweep", "features")
TARGETS = {  # issue 28's targets: (the bound, its direction)
    "frac_of_peak": (0.85, ">="),
    "padding_waste": (0.05, "<="),
    "reference_ratio": (1.0, ">="),
    "sweep_speedup": (1.4, ">="),
}
SWEEP_GRID = ("modality=early,acoustic,visual,late", "seed=0,1")  # longest modalities first


def machine() -> dict[str, Any]:
    """What decides the numbers: CPU, cores, memory, versions, threads, malloc, load."""
    mem = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    return {
        "cpu": bench.cpu_name(),
        "cores": os.cpu_count(),
        "memory": mem,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "malloc": allocator.describe(),
        "load_average": os.getloadavg()[0],
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def train_rows(args: argparse.Namespace, peaks: dict[str, float]) -> list[dict[str, Any]]:
    rows = []
    for model in ("bilstm",) if args.quick else ("bilstm", "bilstm_notebook"):
        for precision in ("fp32", "bf16"):
            case = bench.Case(
                shape="visual" if args.quick else "early",
                model=model,
                precision=precision,
                batch=4 if args.quick else 128,
                batches=2 if args.quick else args.batches,
                infer_clips=8 if args.quick else args.infer_clips,
            )
            rows.append({"part": "train", **bench.run_case(case, peaks)})
            progress(f"train {model} {precision}: {rows[-1]['train_clips_per_s']:.1f} clips/s")
    return rows


def reference_rows(args: argparse.Namespace, peaks: dict[str, float]) -> list[dict[str, Any]]:
    rows = []
    for model in bench_reference.MODELS:
        case = bench_reference.Case(
            fusion="early",
            model=model,
            batch=4 if args.quick else 128,
            batches=2 if args.quick else args.batches,
            infer_clips=8 if args.quick else args.infer_clips,
            rounds=1 if args.quick else args.rounds,
            scale=0.1 if args.quick else 1.0,
        )
        rows.append({"part": "reference", **bench_reference.run_case(case, peaks)})
        r = rows[-1]
        progress(f"reference {model}: train x{r['train_ratio']:.2f}, infer x{r['infer_ratio']:.2f}")
    return rows


def padding_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The default run's training batches (mer-train's own loading, preprocessing and settings)."""
    from hydra import compose, initialize_config_dir

    from mer_cli.cli.commands import config_dir
    from mer_cli.runs import execute, train

    overrides = ["experiment=smoke"] if args.quick else []
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    splits = execute.load_logged(cfg)
    modality, streams = cfg.modality.name, list(cfg.modality.streams)
    honoured = train.frame_validity(cfg, splits, modality, streams)
    preps = train.fit_preprocessing(cfg, splits, modality, streams, honoured)
    train_set = train.prepare(splits, modality, streams, preps, honoured)[0]
    max_len = int(train_set.streams[next(iter(train_set.streams))].max_length)
    rows = []
    for groups in (1, 5):
        settings = dataclasses.replace(train.loop_settings(cfg), length_groups=groups)
        waste = batching.epoch_padding_waste(train_set.lengths, settings, max_len, seed=cfg.seed, epochs=20)
        rows.append(
            {
                "part": "padding",
                "data": "embedded (the default run)",
                "modality": modality,
                "clips": len(train_set),
                "batch": settings.batch_size,
                "length_groups": groups,
                "padding_waste": round(waste, 4),
            }
        )
        progress(f"padding, length_groups={groups}: {waste:.1%}")
    return rows


def sweep_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The same sweep sequentially and on 2 joblib workers, each job 1 thread there."""
    try:
        import hydra_plugins.hydra_joblib_launcher  # noqa: F401
    except ImportError:
        return [
            {
                "part": "sweep",
                "status": "skipped: the joblib launcher is missing (pip install 'mer-cli[sweep]')",
            }
        ]
    epochs = 2 if args.quick else args.sweep_epochs
    common = [
        *SWEEP_GRID,
        f"trainer.loop.max_epochs={epochs}",
        *(["experiment=smoke"] if args.quick else []),
        "runtime.progress=false",
    ]
    mer_train = str(Path(sys.executable).with_name("mer-train"))
    walls = {}
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        for name, extra in (
            ("sequential", ["runtime.num_threads=2"]),
            ("joblib", ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "runtime.num_threads=1"]),
        ):
            cmd = [mer_train, "-m", *common, *extra, f"hydra.sweep.dir={Path(tmp) / name}"]
            t0 = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True)
            walls[name] = time.perf_counter() - t0
            if done.returncode != 0:
                tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
                return [{"part": "sweep", "status": f"{name} sweep failed: {' '.join(tail)}"}]
            progress(f"sweep {name}: {walls[name]:.0f} s")
    return [
        {
            "part": "sweep",
            "grid": " ".join(SWEEP_GRID),
            "epochs": epochs,
            "sequential_s": round(walls["sequential"], 1),
            "joblib_s": round(walls["joblib"], 1),
            "sweep_speedup": round(walls["sequential"] / walls["joblib"], 3),
        }
    ]


def feature_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """benchmarks/extraction.py's back-end rows, 1 torch thread (its own fresh processes)."""
    with tempfile.TemporaryDirectory(prefix="bench-summary-") as tmp:
        out = Path(tmp) / "features.jsonl"
        cmd = [sys.executable, str(HERE / "extraction.py"), "--json", str(out), "--threads", "1"]
        cmd += ["--quick"] if args.quick else ["--clips", str(args.feature_clips), "--ingest-clips", "8"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not out.exists():
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
            return [{"part": "features", "status": f"extraction.py failed: {' '.join(tail)}"}]
        found = [json.loads(line) for line in out.read_text().splitlines()]
    # the back-ends' rows, and mer-ingest's peak RSS at N and 4N clips (extraction.py runs both)
    rows = [{"part": "features", **r} for r in found if r.get("status") == "ok"]
    progress(f"features: {sum(r['kind'] == 'backend' for r in rows)} back-ends timed")
    return rows


def measure_peaks(quick: bool) -> dict[str, float]:
    return {"fp32": bench.matmul_peak(torch.float32, quick), "bf16": bench.matmul_peak(torch.bfloat16, quick)}


def progress(line: str) -> None:
    print(f"[bench] {line}", file=sys.stderr, flush=True)


def verdict(value: float | None, target: str) -> str:
    if value is None:
        return "-"
    bound, direction = TARGETS[target]
    ok = value >= bound if direction == ">=" else value <= bound
    return "met" if ok else "NOT met"


def table(rows: Sequence[dict[str, Any]], info: dict[str, Any]) -> str:
    """The one table: a line per measured figure, its target and whether it is met."""
    lines = [
        f"machine: {info['cpu']}, {info['cores']} cores, {info['memory']}; python {info['python']}, "
        f"torch {info['torch']}, numpy {info['numpy']}",
        f"threads: torch {info['torch_threads']}, OMP_NUM_THREADS={info['OMP_NUM_THREADS']}, "
        f"OMP_WAIT_POLICY={info['OMP_WAIT_POLICY']}; malloc: {info['malloc']}; "
        f"load average {info['load_average']:.2f} at the start, "
        f"{info.get('load_average_end', 0):.2f} at the end; "
        f"{info['time_utc']}, {info.get('wall_s', 0):.0f} s",
        "",
        "| figure | measured | target | |",
        "|---|---|---|---|",
    ]

    def add(figure: str, shown: str, target: str, value: float | None) -> None:
        bound, direction = TARGETS[target]
        shown_bound = f"{bound:.0%}" if target in ("frac_of_peak", "padding_waste") else f"{bound:g}x"
        lines.append(f"| {figure} | {shown} | {direction} {shown_bound} | {verdict(value, target)} |")

    peaks = next((r for r in rows if r["part"] == "peaks"), None)
    if peaks:
        lines.append(
            f"| matmul peak, fp32 / bf16 (the better of the start and the end) | "
            f"{peaks['fp32']:.1f} / {peaks['bf16']:.1f} GFLOP/s | - | |"
        )
    for r in (r for r in rows if r["part"] == "train"):
        name = "default 64/32" if r["model"] == "bilstm" else "notebook 512/256"
        add(
            f"{r['precision']} training, {name}: fraction of the {r['precision']} matmul peak",
            f"{r['frac_of_peak']:.1%} ({r['train_clips_per_s']:.1f} train, "
            f"{r['infer_clips_per_s']:.1f} infer clips/s)",
            "frac_of_peak",
            r["frac_of_peak"],
        )
    for r in [r for r in rows if r["part"] == "train"][:1]:
        add(
            "padding waste, the bench's batches",
            f"{r['padding_waste']:.1%}",
            "padding_waste",
            r["padding_waste"],
        )
    for r in (r for r in rows if r["part"] == "padding"):
        add(
            f"padding waste, the default run's batches, length_groups={r['length_groups']}",
            f"{r['padding_waste']:.1%}",
            "padding_waste",
            r["padding_waste"],
        )
    for r in (r for r in rows if r["part"] == "reference"):
        for side in ("train", "infer"):
            ratio = r[f"{side}_ratio"]
            # three decimals: at parity they show which side of 1 decided the verdict
            speeds = f"{r[f'{side}_clips_per_s']:.1f} vs {r[f'ref_{side}_clips_per_s']:.1f} clips/s"
            shown = f"{ratio:.3f}x ({speeds})"
            add(
                f"{r['model']} {side}, early fusion, mer-cli / plain PyTorch", shown, "reference_ratio", ratio
            )
    for r in (r for r in rows if r["part"] == "sweep"):
        if "status" in r:
            lines.append(f"| 2-job joblib sweep / sequential | {r['status']} | >= 1.4x | - |")
            continue
        walls = f"{r['sequential_s']:.0f} s vs {r['joblib_s']:.0f} s, {r['epochs']} epochs"
        shown = f"{r['sweep_speedup']:.2f}x ({walls})"
        add("2-job joblib sweep / sequential, 2 cores", shown, "sweep_speedup", r["sweep_speedup"])
    for r in (r for r in rows if r["part"] == "features"):
        if "status" in r and r["status"] != "ok":
            lines.append(f"| feature extraction | {r['status']} | - | |")
            continue
        if r["kind"] == "ingest":  # its target travels in the row (extraction.RSS_TARGET)
            (n, n4), (a, b) = r["clips"], r["peak_rss_mib"]
            met = "met" if r["ratio"] <= r["target"] else "NOT met"
            lines.append(
                f"| mer-ingest peak RSS, {r['backends']}: {n} vs {n4} clips | {a:.0f} -> {b:.0f} MiB "
                f"({r['ratio']:.3f}x) | <= {r['target']:g}x | {met} |"
            )
            continue
        lines.append(
            f"| extraction, {r['backend']} ({r['model']}) | {r['clips_per_s']:.1f} clips/s, "
            f"peak RSS {r['peak_rss_mib']:.0f} MiB | - | |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    allocator.configure()  # mer-train's malloc setting: the bench times what it runs
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    ap.add_argument("--batches", type=int, default=4, help="timed training batches of 128 per row")
    ap.add_argument("--infer-clips", type=int, default=1024, help="clips per timed inference pass")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of each reference row")
    ap.add_argument("--sweep-epochs", type=int, default=10, help="epochs of each sweep job")
    ap.add_argument("--feature-clips", type=int, default=16, help="clips per feature back-end")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: physical cores)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks that every part runs")
    ap.add_argument("--out", type=Path, default=None, help="append one JSON line per row here")
    ap.add_argument("--table", type=Path, default=None, help="also write the table (markdown) here")
    args = ap.parse_args(argv)
    loop.configure_threads(loop.Settings(num_threads=args.threads))
    info = machine()
    started = time.perf_counter()
    peaks = {
        "fp32": bench.matmul_peak(torch.float32, args.quick),
        "bf16": bench.matmul_peak(torch.bfloat16, args.quick),
    }
    rows: list[dict[str, Any]] = [{"part": "peaks", **peaks}]
    parts: dict[str, Callable[[], list[dict[str, Any]]]] = {
        "train": lambda: train_rows(args, peaks),
        "reference": lambda: reference_rows(args, peaks),
        "padding": lambda: padding_rows(args),
        "sweep": lambda: sweep_rows(args),
        "features": lambda: feature_rows(args),
    }
    for part in args.parts:
        rows += parts[part]()
    # the peaks again at the end: a cold first measurement can fall 20 % short (CPU clocks,
    # first-touch pages); what the machine attains is the better of the two
    end = measure_peaks(args.quick)
    best = {k: max(peaks[k], end[k]) for k in peaks}
    rows[0] = {"part": "peaks", **best, "start": dict(peaks), "end": end}
    for r in rows:
        if r["part"] in ("train", "reference") and r.get("frac_of_peak") is not None:
            p = r["precision"]
            r["frac_of_peak"] = round(r["frac_of_peak"] * peaks[p] / best[p], 3)
            r["matmul_peak_gflops"] = best[p]
    info["load_average_end"] = os.getloadavg()[0]
    info["wall_s"] = round(time.perf_counter() - started, 1)
    text = table(rows, info)
    print(text)
    if args.table is not None:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text(text + "\n")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            for row in [{"part": "machine", **info}, *rows]:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

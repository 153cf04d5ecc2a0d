"""runtime.compile: is torch.compile faster end to end, compile time included, for a default-length
run of each encoder? (make bench-compile)

Input: generated clips shaped as the default run's (early fusion, 356 x 69 frames at most, 840
training and 180 validation clips, batch 128, mer-train's length buckets). Each encoder trains
``--epochs`` epochs (each: its training steps through ``loop.train_step``, then a validation pass
through ``batching.predict_proba``) eagerly and with ``model.compile()`` (what ``runtime.compile:
true`` does in ``loop.fit``), each in a fresh process with an empty TorchInductor cache (a first
run's cost), eager and compiled alternating. Output: per encoder the seconds of each epoch, and a
default-length run estimated as the measured epochs plus ``--run-epochs`` - ``--epochs`` more at
the last epoch's speed (the default runs stop after 33-37 epochs on the embedded data); the ratio
eager / compiled (> 1: compiling is faster). A table and one JSON line per encoder (``--out``).

    python benchmarks/bench_compile.py --models bilstm tcn --threads 2 --out outputs/bench-compile.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MODELS = ("bilstm", "gru", "transformer", "tcn", "inception")
TRAIN_CLIPS, VAL_CLIPS = 840, 180  # the embedded data's train and validation splits


def child(model_name: str, compiled: bool, epochs: int, threads: int) -> dict[str, Any]:
    """Train ``epochs`` epochs in this process; the seconds of each (steps + validation)."""
    import bench
    import torch
    from torch import nn

    from mer_cli.core import allocator
    from mer_cli.training import batching, hardware, loop

    allocator.configure()
    loop.configure_threads(loop.Settings(num_threads=threads))
    max_len, n_features = bench.SHAPES["early"]
    train_set = bench.make_set(TRAIN_CLIPS, max_len, n_features, 0)
    val_set = bench.make_set(VAL_CLIPS, max_len, n_features, 1)
    settings = loop.Settings(progress=False, compile=compiled)
    device = torch.device("cpu")
    dtype = hardware.resolve_precision("auto", device)  # what mer-train runs here
    torch.manual_seed(0)
    model, _ = bench.build(model_name, n_features, "config")
    t0 = time.perf_counter()
    if settings.compile:
        model.compile()  # as loop.fit does
    optimizer = bench.build_optimizer("adamw", model)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(0)
    seconds = []
    for _ in range(epochs):
        model.train()
        # mer-train's buckets: the loop's own defaults, not a copy of them
        for idx in batching.epoch_batches(train_set.lengths, settings, generator):
            inputs, y = batching.gather_batch(train_set, idx, device)
            loop.train_step(model, optimizer, scaler, loss_fn, inputs, y, dtype)
        batching.predict_proba(model, val_set, settings.eval_batch_size, device, dtype)
        t1 = time.perf_counter()
        seconds.append(t1 - t0)
        t0 = t1
    return {"epoch_seconds": [round(s, 3) for s in seconds], "precision": str(dtype).removeprefix("torch.")}


def run_child(model: str, compiled: bool, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", model, "--epochs", str(args.epochs)]
    cmd += ["--threads", str(args.threads)] + (["--compiled"] if compiled else [])
    with tempfile.TemporaryDirectory() as cache:  # a cold TorchInductor cache: a first run's compile
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": cache}
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def estimate(epochs: Sequence[float], run_epochs: int) -> float:
    """A run of ``run_epochs`` epochs: those measured, the rest at the last one's speed."""
    return sum(epochs) + max(0, run_epochs - len(epochs)) * epochs[-1]


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--epochs", type=int, default=3, help="epochs measured per process")
    ap.add_argument("--run-epochs", type=int, default=35, help="the run length estimated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1, help="eager/compiled pairs per encoder")
    ap.add_argument("--out", default=None, help="append JSON lines here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.compiled, args.epochs, args.threads)))
        return
    rows = []
    for model in args.models:
        runs: dict[str, list[dict[str, Any]]] = {"eager": [], "compiled": []}
        for r in range(args.rounds):
            for mode in ("eager", "compiled")[:: 1 if r % 2 == 0 else -1]:
                print(f"[bench-compile] {model} round {r + 1}: {mode}", file=sys.stderr, flush=True)
                runs[mode].append(run_child(model, mode == "compiled", args))
        totals = {m: [estimate(x["epoch_seconds"], args.run_epochs) for x in v] for m, v in runs.items()}
        ratios = [e / c for e, c in zip(totals["eager"], totals["compiled"], strict=True)]
        row = {
            "mode": "compile",
            "model": model,
            "precision": runs["eager"][0]["precision"],
            "threads": args.threads,
            "epochs_measured": args.epochs,
            "run_epochs": args.run_epochs,
            "eager_epoch_seconds": [x["epoch_seconds"] for x in runs["eager"]],
            "compiled_epoch_seconds": [x["epoch_seconds"] for x in runs["compiled"]],
            "eager_run_s": round(statistics.median(totals["eager"]), 1),
            "compiled_run_s": round(statistics.median(totals["compiled"]), 1),
            "speedup": round(statistics.median(ratios), 3),  # eager / compiled: > 1, compiling pays
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    print(f"{'model':>12} {'eager run s':>12} {'compiled run s':>15} {'speedup':>8}")
    for r in rows:
        print(f"{r['model']:>12} {r['eager_run_s']:>12.1f} {r['compiled_run_s']:>15.1f} {r['speedup']:>8.2f}")


if __name__ == "__main__":
    main()

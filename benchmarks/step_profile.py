"""make bench-profile: where a training step's time goes, by phase and kind of operation.

One model (``--model``: configs/model/<name>.yaml, default the default ``bilstm`` and the
notebook's ``bilstm_notebook``) trains on the bench's generated clips of early fusion's shape
(356 x 69, `bench.make_set`) through mer-train's own step (`loop.train_step`: autocast, loss,
backward, optimizer step) in mer-train's length-bucketed batches, under ``torch.profiler``. Every
operator's own CPU time (its children's excluded) is put in

- a phase: *data* (`batching.gather_batch`: padding a batch), *optimizer* (under
  ``Optimizer.step``), *backward* (under autograd's engine), *forward* (the rest of the step);
- a kind: *recurrent kernel* (oneDNN's LSTM/GRU layer, forward or backward), *matmul* (addmm,
  mm, bmm: the dense head, attention, projections), *normalisation* (batch norm), *casts*
  (dtype conversions and copies: autocast's bf16 copies of weights and inputs), *element-wise and
  masking* (every other operator: masks, reversal within each clip's length, dropout,
  activations, the optimizer's arithmetic).

Output: per model and precision, milliseconds per step and share of the step in each phase x
kind, and the recurrent kernel's own rate (its FLOPs, counted as mer-bench counts them, over its
time) against the matmul peak. ``--json FILE`` appends one JSON line per model x precision.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import bench
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from mer_cli.core import allocator
from mer_cli.training import batching, hardware, loop

PHASES = ("data", "forward", "backward", "optimizer")
KINDS = ("recurrent kernel", "matmul", "normalisation", "casts", "element-wise and masking")
DATA_LABEL = "mer:data"


def kind_of(name: str) -> str:
    op = name.removeprefix("aten::")
    if "rnn" in op or "lstm" in op or "gru" in op:
        return "recurrent kernel"
    if op in ("addmm", "mm", "bmm", "matmul", "linear", "baddbmm"):
        return "matmul"
    if "batch_norm" in op:
        return "normalisation"
    if op in ("_to_copy", "copy_", "to", "_copy_from", "clone", "contiguous"):
        return "casts"
    return "element-wise and masking"


def phase_of(event: Any) -> str:
    """The phase of a profiler event, from its ancestors' names."""
    node = event
    while node is not None:
        name = node.name
        if name == DATA_LABEL:
            return "data"
        if name.startswith("Optimizer.step") or name.startswith("Optimizer.zero_grad"):
            return "optimizer"
        if name.startswith("autograd::engine::evaluate_function"):
            return "backward"
        node = node.cpu_parent
    return "forward"


def profile_case(model_name: str, precision: str, batches: int, peaks: dict[str, float]) -> dict[str, Any]:
    max_len, n_features = bench.SHAPES["early"]
    torch.manual_seed(0)
    model, cfg = bench.build(model_name, n_features, "config")
    optimizer = bench.build_optimizer("adamw", model)  # mer-train's default optimizer
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss_fn = nn.CrossEntropyLoss()
    device = torch.device("cpu")
    dtype = hardware.resolve_precision(precision, device)
    data = bench.make_set(128 * (batches + 1), max_len, n_features, seed=0)
    settings = loop.Settings(batch_size=128, progress=False)
    generator = torch.Generator().manual_seed(0)
    idx = batching.epoch_batches(data.lengths, settings, generator)
    model.train()

    def step(i: torch.Tensor) -> int:
        with record_function(DATA_LABEL):
            inputs, y = batching.gather_batch(data, i, device)
        loop.train_step(model, optimizer, scaler, loss_fn, inputs, y, dtype)
        return int(inputs[bench.STREAM][0].shape[0] * inputs[bench.STREAM][0].shape[1])

    step(idx[0])  # warm-up: kernels built, memory allocated
    timed = idx[1 : batches + 1]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        frames = sum(step(i) for i in timed)
        wall = time.perf_counter() - t0
    cells: dict[tuple[str, str], float] = defaultdict(float)
    for event in prof.events():
        if event.name.startswith("aten::") or event.name.startswith("mkldnn"):
            cells[(phase_of(event), kind_of(event.name))] += event.self_cpu_time_total / 1e3  # ms
    steps = len(timed)
    per_step = {f"{p}/{k}": round(v / steps, 2) for (p, k), v in sorted(cells.items())}
    rnn_ms = sum(v for (p, k), v in cells.items() if k == "recurrent kernel") / steps
    flops = bench.flops_function(model, cfg, n_features)  # the model's forward FLOPs per clip
    # the recurrent layers' share: the whole model's FLOPs less the dense head (frames-independent)
    per_clip = flops(frames / steps / 128) - flops(0)
    rnn_gflops = 3 * per_clip * 128 / (rnn_ms / 1e3) / 1e9 if rnn_ms else None
    name = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype, str(dtype))
    return {
        "model": model_name,
        "precision": name,
        "batch": 128,
        "steps": steps,
        "step_ms": round(wall / steps * 1e3, 1),
        "profiled_ms": round(sum(cells.values()) / steps, 1),
        "ms_per_step": per_step,
        "recurrent_gflops": None if rnn_gflops is None else round(rnn_gflops, 1),
        "recurrent_frac_of_peak": None if rnn_gflops is None else round(rnn_gflops / peaks[name], 3),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": bench.cpu_name(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def table(row: dict[str, Any]) -> str:
    total = row["profiled_ms"]
    head = (
        f"{row['model']} {row['precision']}: {row['step_ms']} ms a step of 128 clips ({row['steps']} steps)"
    )
    if row["recurrent_gflops"] is not None:
        head += (
            f"; recurrent kernel {row['recurrent_gflops']} GFLOP/s = "
            f"{row['recurrent_frac_of_peak']:.0%} of the {row['precision']} matmul peak"
        )
    lines = [head, "", "| phase | " + " | ".join(KINDS) + " | all |", "|---" * (len(KINDS) + 2) + "|"]
    for phase in PHASES:
        values = [row["ms_per_step"].get(f"{phase}/{k}", 0.0) for k in KINDS]
        if not any(values):
            continue
        cells = [f"{v:.1f} ms ({v / total:.0%})" if v else "-" for v in values]
        lines.append(
            f"| {phase} | " + " | ".join(cells) + f" | {sum(values):.1f} ms ({sum(values) / total:.0%}) |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    allocator.configure()  # mer-train's malloc setting
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", nargs="+", default=["bilstm", "bilstm_notebook"])
    ap.add_argument("--precision", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    ap.add_argument("--batches", type=int, default=3, help="profiled steps (after one warm-up step)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: physical cores)")
    ap.add_argument("--json", type=Path, default=None, help="append one JSON line per row here")
    args = ap.parse_args(argv)
    loop.configure_threads(loop.Settings(num_threads=args.threads))
    peaks = {"fp32": bench.matmul_peak(torch.float32), "bf16": bench.matmul_peak(torch.bfloat16)}
    threads = torch.get_num_threads()
    print(f"matmul peak: fp32 {peaks['fp32']:.1f}, bf16 {peaks['bf16']:.1f} GFLOP/s; {threads} threads")
    for model in args.model:
        for precision in args.precision:
            row = profile_case(model, precision, args.batches, peaks)
            print("\n" + table(row), flush=True)
            if args.json is not None:
                with args.json.open("a") as f:
                    f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

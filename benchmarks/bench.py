"""Training and inference speed of mer-cli's real code path, optionally side by side with the peer.

Input: generated clips shaped like the real features (acoustic 356x52, visual 105x17, early
356x69; lengths uniform in 40-100 % of the maximum, 5 % at the maximum, zero-padded, as the
Keras peer ``benchmarks/peer_keras.py`` draws them). Output: a table on stdout and one JSON line per
shape x model x device x precision (``--out``). Each row trains through ``batching.batch_indices``
(length buckets), ``batching.gather_batch`` and ``loop.train_step`` (the loop ``mer-train`` runs)
and infers through ``batching.predict_proba``.

    mer-bench                                    # every shape, every model, fp32 and bf16
    mer-bench --shape acoustic --model bilstm_notebook --precision bf16 --batches 4
    mer-bench --quick --out bench.jsonl          # seconds: checks it runs (CI)
    mer-bench --peer-python ~/.venvs/peer-tf/bin/python     # the Keras peer: benchmarks/peer_keras.py
    mer-bench --inference                        # exported-model latency and throughput, torch vs onnxruntime

``--inference`` times the graph mer-export writes (preprocessing + model + softmax, fp32) on one
clip (p50/p99 latency) and on batches of 64 clips (throughput), in torch and in onnxruntime.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from mer_cli.core import allocator
from mer_cli.models.encoders.rnn import BiRNNEncoder
from mer_cli.preprocess.sequences import Ragged, SequenceSet
from mer_cli.training import batching, hardware, loop

SHAPES = {"acoustic": (356, 52), "visual": (105, 17), "early": (356, 69)}
MODELS = ("bilstm", "bilstm_notebook", "gru", "transformer", "tcn")  # configs/model/<name>.yaml
PEER_MODELS = ("bilstm", "bilstm_notebook")  # the Keras peer's model at these sizes
RNN_ENCODERS = ("birnn",)  # model.encoder.name of the recurrent encoders (LSTM or GRU cells)
GATES = {"lstm": 4, "gru": 3}
PRECISIONS = ("fp32", "bf16", "fp16", "auto")
MASKINGS = ("config", "reverse", "packed", "none")  # none: plain padded nn.LSTM (wrong masking)
N_CLASSES = 6
# the Keras peer: a script of the source repository (TensorFlow is never a dependency of the package)
PEER_SCRIPT = Path(__file__).resolve().parent / "peer_keras.py"
EPOCH_CLIPS = 5000  # the epoch the estimate is for (CREMA-D's train split is about 5,200 clips)
# every JSON row has these keys (tests/benchmarks/test_bench.py checks them)
FIELDS = (
    "shape",
    "T",
    "D",
    "model",
    "hidden",
    "dense",
    "params",
    "device",
    "precision",
    "masking",
    "bucket_by_length",
    "optimizer",
    "batch",
    "train_batches",
    "train_clips_per_s",
    "infer_clips_per_s",
    "epoch_s_est",
    "epoch_clips",
    "peak_rss_mib",
    "train_gflop_per_clip_padded",
    "train_gflop_per_clip_useful",
    "achieved_gflops_padded",
    "achieved_gflops_computed",
    "infer_gflops_computed",
    "matmul_peak_gflops",
    "frac_of_peak",
    "mean_len_frac",
    "computed_len_frac",
    "padding_waste",
    "length_groups",
    "loss_first",
    "loss_last",
    "rounds",
    "torch",
    "threads",
    "glibc_tunables",
    "malloc",
    "omp_wait_policy",
    "cpu",
    "time_utc",
)


# ---------------------------------------------------------------------------------------------
# Data and FLOPs (the peer's definitions, so the numbers compare)


def make_lengths(rng: np.random.Generator, n: int, max_len: int) -> np.ndarray:
    """Lengths uniform in [40 %, 100 %] of ``max_len``; 5 % are longer clips cut to ``max_len``."""
    lengths = rng.integers(round(0.4 * max_len), max_len + 1, size=n)
    lengths[rng.random(n) < 0.05] = max_len
    return lengths


STREAM = "acoustic"  # the one input stream of the benchmarked models


def make_set(n: int, max_len: int, n_features: int, seed: int) -> SequenceSet:
    """``n`` random clips of at most ``max_len`` frames as a preprocessed ``SequenceSet``."""
    rng = np.random.default_rng(seed)
    lengths = make_lengths(rng, n, max_len)
    frames = rng.standard_normal((int(lengths.sum()), n_features), dtype=np.float32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return SequenceSet(
        streams={STREAM: Ragged(frames, offsets, max_len)},
        y=torch.from_numpy(rng.integers(0, N_CLASSES, n).astype(np.int64)),
        clip_ids=tuple(f"clip{i}" for i in range(n)),
    )


def forward_flops(
    frames: float, n_features: int, hidden: Sequence[int], dense: int, n_classes: int, gates: int = 4
) -> float:
    """Matmul FLOPs of one forward pass of one clip with ``frames`` LSTM steps (peer_keras.py's
    formula: 2 directions x 4 gates x (input + hidden) x hidden per frame, plus the dense head;
    ``gates=3``: a GRU's)."""
    f, d_in = 0.0, n_features
    for h in hidden:
        f += 2 * frames * 2 * (d_in + h) * gates * h
        d_in = 2 * h
    return f + 2 * (2 * hidden[-1] * dense + dense * dense + dense * n_classes)


def counted_forward_flops(model: nn.Module, frames: int, n_features: int) -> float:
    """FLOPs of one forward pass of one clip of ``frames`` frames, counted by
    ``torch.utils.flop_counter`` (matmuls, convolutions, attention), for encoders without a
    formula. (PyTorch's fused LSTM kernel is invisible to the counter: recurrent encoders use
    `forward_flops`.)"""
    from torch.utils import flop_counter

    # the CPU attention kernel has no formula of its own in torch 2.x: the flash kernel's is it
    def attention(q: Any, k: Any, v: Any, *args: Any, **kwargs: Any) -> int:
        return int(flop_counter.sdpa_flop_count(q, k, v))  # shapes: the counter passes them

    cpu_attention = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: attention}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    x = torch.zeros(1, frames, n_features, device=device)
    try:
        with (
            torch.no_grad(),
            flop_counter.FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter,
        ):
            model({STREAM: (x, torch.tensor([frames], device=device))})
    finally:
        model.train(was_training)
    return float(counter.get_total_flops())


def flops_function(model: nn.Module, cfg: dict[str, Any], n_features: int) -> Any:
    """Frames of one clip -> forward FLOPs of ``model``: the peer's formula for recurrent
    encoders, counted on one forward pass for the others (attention grows with frames squared,
    so the count is taken at the clip's length, rounded)."""
    encoder = cfg["encoder"]
    if encoder["name"] in RNN_ENCODERS:
        hidden, dense, gates = (
            list(encoder["hidden_sizes"]),
            int(cfg["dense_size"]),
            GATES[encoder.get("cell", "lstm")],
        )
        return lambda frames: forward_flops(frames, n_features, hidden, dense, N_CLASSES, gates)
    return lambda frames: counted_forward_flops(model, max(1, round(frames)), n_features)


def matmul_peak(dtype: torch.dtype = torch.float32, quick: bool = False) -> float:
    """Practical matmul peak in GFLOP/s: the best of 2048^2 and 4096^2 square products, each
    timed as the median of several (``--quick``: one 512^2 product)."""
    best = 0.0
    for n, reps in ((512, 3),) if quick else ((2048, 7), (4096, 5)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        c = torch.empty(n, n, dtype=dtype)
        for _ in range(2):
            torch.mm(a, b, out=c)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.mm(a, b, out=c)
            times.append(time.perf_counter() - t0)
        best = max(best, 2 * n**3 / statistics.median(times) / 1e9)
    return round(best, 1)


# ---------------------------------------------------------------------------------------------
# Memory


def reset_peak_rss() -> None:
    """Start a new peak-RSS window (Linux: VmHWM is reset by writing 5 to clear_refs)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    # ru_maxrss: kB on Linux, bytes on macOS; the process's peak, not this row's
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(rss / (2**20 if sys.platform == "darwin" else 1024), 1)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------------------------
# One row


class PaddedBiRNN(nn.Module):
    """Reference only (``--masking none``): a plain bidirectional ``nn.LSTM`` (or ``nn.GRU``) over
    the padded batch. Its backward direction starts in the padding: fast and wrong, the speed to
    match."""

    def __init__(self, input_size: int, hidden_size: int, cell: str = "lstm") -> None:
        super().__init__()
        rnn = nn.LSTM if cell == "lstm" else nn.GRU
        self.lstm = rnn(input_size, hidden_size, batch_first=True, bidirectional=True)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, state = self.lstm(x)
        h = state[0] if isinstance(state, tuple) else state
        return out, torch.cat([h[0], h[1]], dim=1)


def model_config(name: str) -> dict[str, Any]:
    from mer_cli.cli.commands import config_dir

    path = Path(config_dir()) / "model" / f"{name}.yaml"
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)  # type: ignore[return-value]


def build(
    model_name: str, n_features: int, masking: str, length_groups: int = 1
) -> tuple[nn.Module, dict[str, Any]]:
    from mer_cli.runs.trained import build_model

    cfg = model_config(model_name)
    encoder = cfg["encoder"]
    # what runs.train adds to the model for trainer.loop.length_groups (never to cfg: FLOPs read it)
    groups = {"length_groups": length_groups} if length_groups != 1 else {}
    if "masking" not in encoder:  # exact by construction (attention key mask, re-zeroed convs)
        return build_model({**cfg, **groups}, {STREAM: n_features}, N_CLASSES), cfg
    if masking not in ("config", "none"):
        encoder["masking"] = masking
    model = build_model({**cfg, **groups}, {STREAM: n_features}, N_CLASSES)
    if masking == "none":
        sizes = [n_features] + [2 * h for h in encoder["hidden_sizes"][:-1]]
        cell = encoder.get("cell", "lstm")
        rnn = cast(BiRNNEncoder, model.get_submodule("encoder"))
        setattr(
            rnn,
            rnn.layers_name,
            nn.ModuleList(
                PaddedBiRNN(d, h, cell) for d, h in zip(sizes, encoder["hidden_sizes"], strict=True)
            ),
        )
    return model, cfg


def build_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    from mer_cli.cli.commands import config_dir

    cfg = OmegaConf.load(Path(config_dir()) / "trainer" / "optimizer" / f"{name}.yaml")
    return instantiate(cfg)(model.parameters())


@dataclass(frozen=True)
class Case:
    shape: str
    model: str
    precision: str
    device: str = "cpu"
    batch: int = 128
    batches: int = 6  # timed training batches: one whole bucketed epoch of batch x batches clips
    warmup: int = 1  # untimed training batches first (one-off allocation, kernel creation)
    infer_clips: int = 1024
    masking: str = "config"
    bucket: bool = True
    optimizer: str = "adabelief"
    rounds: int = 1
    seed: int = 0
    length_groups: int = 1  # trainer.loop.length_groups


def run_case(case: Case, peaks: dict[str, float]) -> dict[str, Any]:
    """Train and infer one configuration; returns the JSON row."""
    reset_peak_rss()
    max_len, n_features = SHAPES[case.shape]
    settings = loop.Settings(
        batch_size=case.batch,
        device=case.device,
        precision=case.precision,
        bucket_by_length=case.bucket,
        progress=False,
        length_groups=case.length_groups,
    )
    device = hardware.resolve_device(settings.device)
    dtype = hardware.resolve_precision(settings.precision, device)
    torch.manual_seed(case.seed)
    model, cfg = build(case.model, n_features, case.masking, case.length_groups)
    model.to(device)
    optimizer = build_optimizer(case.optimizer, model)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    loss_fn = nn.CrossEntropyLoss()
    train_set = make_set(case.batch * case.batches, max_len, n_features, case.seed)
    warm_set = make_set(case.batch * max(case.warmup, 1), max_len, n_features, case.seed + 1)
    infer_set = make_set(case.infer_clips, max_len, n_features, case.seed + 2)
    generator = torch.Generator().manual_seed(case.seed)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def epoch(data: SequenceSet, limit: int | None = None) -> tuple[float, int, list[float]]:
        """Seconds, computed frames and losses of one pass of ``mer-train``'s inner loop."""
        model.train()
        batches = batching.epoch_batches(data.lengths, settings, generator)[:limit]
        frames, losses = 0, []
        drawn.extend(batches)
        sync()
        t0 = time.perf_counter()
        for idx in batches:
            inputs, y = batching.gather_batch(data, idx, device)
            loss, _ = loop.train_step(model, optimizer, scaler, loss_fn, inputs, y, dtype)
            losses.append(loss.item())
            frames += inputs[STREAM][0].shape[0] * inputs[STREAM][0].shape[1]
        sync()
        return time.perf_counter() - t0, frames, losses

    drawn: list[torch.Tensor] = []  # the timed epochs' batches (padding_waste)
    epoch(warm_set, case.warmup)
    drawn.clear()
    train_s: list[float] = []
    infer_s: list[float] = []
    losses: list[float] = []
    train_frames = 0
    for _ in range(case.rounds):
        seconds, train_frames, losses = epoch(train_set)
        train_s.append(seconds)
    # inference warm-up on a slice, then timed passes through predict_proba (length-sorted
    # batches of at most eval_batch_size, inference_mode)
    warm = infer_set.take(range(min(64, len(infer_set))))
    batching.predict_proba(model, warm, settings.eval_batch_size, device, dtype)
    for _ in range(case.rounds):
        sync()
        t0 = time.perf_counter()
        batching.predict_proba(model, infer_set, settings.eval_batch_size, device, dtype)
        sync()
        infer_s.append(time.perf_counter() - t0)
    infer_frames = sum(
        len(idx) * int(infer_set.lengths[idx].max())
        for idx in batching.inference_batches(infer_set.lengths, settings.eval_batch_size)
    )

    hidden, dense = list(cfg["encoder"]["hidden_sizes"]), int(cfg["dense_size"])
    n_train = len(train_set)
    train_cps = n_train / statistics.median(train_s)
    infer_cps = len(infer_set) / statistics.median(infer_s)
    mean_len = float(train_set.lengths.float().mean())
    flops = flops_function(model, cfg, n_features)  # training: forward + backward = 3 forwards
    flop_padded = 3 * flops(max_len)
    flop_useful = 3 * flops(mean_len)
    # frames the encoder computed per clip: what its input holds, less what length groups skip
    waste = batching.padding_waste(train_set.lengths, drawn, max_len, case.length_groups)
    computed_len = mean_len * (1 + waste) if case.length_groups > 1 else train_frames / n_train
    flop_computed = 3 * flops(computed_len)
    infer_flop = flops(infer_frames / len(infer_set))
    peak = peaks["bf16" if dtype == torch.bfloat16 else "fp32"]
    gflops_computed = flop_computed * train_cps / 1e9
    return {
        "shape": case.shape,
        "T": max_len,
        "D": n_features,
        "model": case.model,
        "hidden": hidden,
        "dense": dense,
        "params": sum(p.numel() for p in model.parameters()),
        "device": str(device),
        "precision": str(dtype).removeprefix("torch.").replace("float32", "fp32").replace("bfloat16", "bf16"),
        # None: an encoder without masking variants (exact by construction)
        "masking": (cfg["encoder"]["masking"] if case.masking == "config" else case.masking)
        if "masking" in cfg["encoder"]
        else None,
        "bucket_by_length": case.bucket,
        "optimizer": case.optimizer,
        "batch": case.batch,
        "train_batches": case.batches,
        "train_clips_per_s": round(train_cps, 2),
        "infer_clips_per_s": round(infer_cps, 2),
        "epoch_s_est": round(EPOCH_CLIPS / train_cps, 1),
        "epoch_clips": EPOCH_CLIPS,
        "peak_rss_mib": peak_rss_mib(),
        "train_gflop_per_clip_padded": round(flop_padded / 1e9, 4),
        "train_gflop_per_clip_useful": round(flop_useful / 1e9, 4),
        # the peer's definition (work of the fully padded clip / time): proportional to clips/s
        "achieved_gflops_padded": round(flop_padded * train_cps / 1e9, 1),
        # what the hardware did: frames actually computed (each batch padded to its longest clip)
        "achieved_gflops_computed": round(gflops_computed, 1),
        "infer_gflops_computed": round(infer_flop * infer_cps / 1e9, 1),
        "matmul_peak_gflops": peak,
        "frac_of_peak": round(gflops_computed / peak, 3) if peak else None,
        "mean_len_frac": round(mean_len / max_len, 3),
        "computed_len_frac": round(computed_len / max_len, 3),
        # computed / real frames - 1 of the encoder (trainer.loop.length_groups cut batches further)
        "padding_waste": round(waste, 4),
        "length_groups": case.length_groups,
        "loss_first": round(losses[0], 4),
        "loss_last": round(losses[-1], 4),
        "rounds": case.rounds,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "malloc": allocator.describe(),  # what mer_cli.allocator set at start-up, and why
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "cpu": cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(device),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# ---------------------------------------------------------------------------------------------
# Inference of the exported graph: torch vs onnxruntime

RUNTIMES = ("torch", "onnxruntime")
INFER_MODELS = ("bilstm", "bilstm_notebook")  # the default and the notebook's model
# every --inference JSON row has these keys (tests/benchmarks/test_bench.py checks them)
INFER_FIELDS = (
    "mode",
    "shape",
    "T",
    "D",
    "model",
    "params",
    "runtime",
    "precision",
    "latency_frames",
    "latency_runs",
    "latency_p50_ms",
    "latency_p99_ms",
    "batch",
    "throughput_batches",
    "throughput_clips_per_s",
    "max_abs_diff",
    "threads",
    "torch",
    "onnxruntime",
    "malloc",
    "cpu",
    "time_utc",
)


@dataclass(frozen=True)
class InferenceCase:
    shape: str
    model: str
    latency_runs: int = 200  # timed single-clip calls (p50, p99)
    batch: int = 64
    batches: int = 20  # timed batches of ``batch`` clips
    warmup: int = 5  # untimed calls first, each way
    seed: int = 0


def exported_graph(model_name: str, shape: str, seed: int) -> tuple[nn.Module, int]:
    """The graph mer-export writes for a single-stream run of ``model_name`` on ``shape`` clips:
    target length the shape's frames, a scaler fitted on generated clips, the model (untrained
    weights: speed does not depend on them), the softmax. Returns it and its parameter count."""
    from mer_cli.preprocess import sequences
    from mer_cli.serving import export

    max_len, n_features = SHAPES[shape]
    torch.manual_seed(seed)
    model, _ = build(model_name, n_features, "config")
    clips = make_set(64, max_len, n_features, seed + 3).streams[STREAM]
    frames = [clips.frames[clips.offsets[i] : clips.offsets[i + 1]] for i in range(len(clips))]
    prep = sequences.fit(frames, percentile=100, normalize=True)
    graph = export.RunGraph(model.eval(), {STREAM: prep}, STREAM, [STREAM]).eval()
    return graph, sum(p.numel() for p in model.parameters())


def padded_batches(case: InferenceCase) -> list[tuple[np.ndarray, np.ndarray]]:
    """``case.batches`` batches of ``case.batch`` generated clips, each padded to its longest."""
    max_len, n_features = SHAPES[case.shape]
    out = []
    for b in range(case.batches):
        data = make_set(case.batch, max_len, n_features, case.seed + 10 + b)
        idx = torch.arange(case.batch)
        lengths = data.lengths
        x = data.streams[STREAM].pad(idx, int(lengths.max()))
        out.append((x.numpy(), lengths.numpy()))
    return out


def timed(call: Any, feeds: Sequence[tuple[np.ndarray, np.ndarray]], warmup: int) -> list[float]:
    """Seconds of ``call(x, lengths)`` for each of ``feeds``, after ``warmup`` untimed calls."""
    for i in range(warmup):
        call(*feeds[i % len(feeds)])
    times = []
    for x, lengths in feeds:
        t0 = time.perf_counter()
        call(x, lengths)
        times.append(time.perf_counter() - t0)
    return times


def run_inference_case(case: InferenceCase) -> list[dict[str, Any]]:
    """One shape x model: a row per runtime (torch eager, onnxruntime), the same graph in both."""
    from mer_cli.serving import export

    ort = export.require_onnxruntime("--inference")
    max_len, n_features = SHAPES[case.shape]
    graph, params = exported_graph(case.model, case.shape, case.seed)
    frames = round(0.7 * max_len)  # one typical clip: the generated lengths' mean
    one = np.random.default_rng(case.seed).standard_normal((1, frames, n_features), dtype=np.float32)
    single = [(one, np.array([frames], dtype=np.int64))] * case.latency_runs
    batches = padded_batches(case)
    example = tuple(torch.from_numpy(a) for a in batches[0])
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the same threads as torch
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        export.to_onnx(graph, [STREAM], example), options, providers=["CPUExecutionProvider"]
    )

    def torch_call(x: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return graph(torch.from_numpy(x), torch.from_numpy(lengths)).numpy()

    def ort_call(x: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        return session.run([export.OUTPUT], {STREAM: x, f"{STREAM}_lengths": lengths})[0]

    # the same numbers from both, or the timings would compare different computations
    max_abs_diff = float(np.abs(torch_call(*batches[0]) - ort_call(*batches[0])).max())
    rows = []
    for runtime, call in (("torch", torch_call), ("onnxruntime", ort_call)):
        latency = np.array(timed(call, single, case.warmup)) * 1000
        throughput = timed(call, batches, min(case.warmup, 2))
        rows.append(
            {
                "mode": "inference",
                "shape": case.shape,
                "T": max_len,
                "D": n_features,
                "model": case.model,
                "params": params,
                "runtime": runtime,
                "precision": "fp32",  # what mer-export writes
                "latency_frames": frames,
                "latency_runs": case.latency_runs,
                "latency_p50_ms": round(float(np.percentile(latency, 50)), 3),
                "latency_p99_ms": round(float(np.percentile(latency, 99)), 3),
                "batch": case.batch,
                "throughput_batches": case.batches,
                "throughput_clips_per_s": round(case.batch * case.batches / sum(throughput), 2),
                "max_abs_diff": max_abs_diff,  # |p_onnxruntime - p_torch| on the first batch
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "onnxruntime": ort.__version__,
                "malloc": allocator.describe(),
                "cpu": cpu_name(),
                "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
        )
    return rows


def run_inference(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for shape in args.shape:
        for model in args.model:
            case = InferenceCase(
                shape=shape,
                model=model,
                latency_runs=3 if args.quick else args.latency_runs,
                batch=4 if args.quick else args.infer_batch,
                batches=2 if args.quick else args.infer_batches,
                warmup=1 if args.quick else 5,
                seed=args.seed,
            )
            for row in run_inference_case(case):
                rows.append(row)
                if not args.no_table:
                    print(format_table([row], INFER_COLUMNS).splitlines()[1], file=sys.stderr, flush=True)
    return rows


INFER_COLUMNS = (
    ("shape", "shape", "{}"),
    ("model", "model", "{}"),
    ("runtime", "runtime", "{}"),
    ("latency_p50_ms", "p50_ms", "{:.2f}"),
    ("latency_p99_ms", "p99_ms", "{:.2f}"),
    ("batch", "batch", "{}"),
    ("throughput_clips_per_s", "clips/s", "{:.1f}"),
)


# ---------------------------------------------------------------------------------------------
# Output

COLUMNS = (
    ("shape", "shape", "{}"),
    ("model", "model", "{}"),
    ("precision", "prec", "{}"),
    ("masking", "masking", "{}"),
    ("train_clips_per_s", "train/s", "{:.1f}"),
    ("infer_clips_per_s", "infer/s", "{:.1f}"),
    ("epoch_s_est", "epoch_s", "{:.1f}"),
    ("achieved_gflops_computed", "GFLOP/s", "{:.0f}"),
    ("frac_of_peak", "peak", "{:.0%}"),
    ("padding_waste", "waste", "{:.1%}"),
    ("peak_rss_mib", "rss_MiB", "{:.0f}"),
)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]] = COLUMNS) -> str:
    cells = [[title for _, title, _ in columns]]
    for r in rows:
        cells.append(["-" if r.get(k) is None else fmt.format(r[k]) for k, _, fmt in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells)


# ---------------------------------------------------------------------------------------------
# Side by side with the Keras peer


def peer_hidden(model: str) -> tuple[list[int], int]:
    cfg = model_config(model)
    return list(cfg["encoder"]["hidden_sizes"]), int(cfg["dense_size"])


# the peer runs with the Makefile's malloc setting, as mer-cli does (without it the peer ran 1.2-5x slower)
PEER_ENV = {"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"}


def run_json(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd`` (a fresh process, so neither side inherits the other's memory) and return the
    last JSON line it printed."""
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, **(env or {})})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def side_by_side(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Alternate peer and mer-cli runs (``--rounds`` times, each in its own process) and compare
    medians; ratios are formed within a round, then their median is reported."""
    peer = [args.peer_python, args.peer_script]
    results: list[dict[str, Any]] = []
    for shape in args.shape:
        for model in args.model:
            hidden, dense = peer_hidden(model)
            peer_cmd = [
                *peer,
                "--shape",
                shape,
                "--hidden",
                ",".join(map(str, hidden)),
                "--dense",
                str(dense),
            ]
            peer_cmd += ["--batch", str(args.batch), "--train-batches", str(args.peer_batches)]
            ours: dict[str, list[dict[str, Any]]] = {p: [] for p in args.precision}
            peers: list[dict[str, Any]] = []
            for r in range(args.rounds):
                # the peer goes first in even rounds, last in odd ones: a drift in machine load
                # then favours neither side
                for side in ("keras", *args.precision)[:: 1 if r % 2 == 0 else -1]:
                    print(
                        f"[bench-peer] {shape} {model} round {r + 1}/{args.rounds}: {side}", file=sys.stderr
                    )
                    if side == "keras":
                        peers.append(run_json([*peer_cmd, "--seed", str(r)], PEER_ENV))
                        continue
                    cmd = [sys.executable, str(Path(__file__).resolve()), "--shape", shape, "--model", model]
                    cmd += ["--precision", side, "--batch", str(args.batch), "--batches", str(args.batches)]
                    cmd += ["--warmup", str(args.warmup), "--optimizer", args.optimizer, "--no-table"]
                    cmd += ["--seed", str(r), "--out", "-", "--infer-clips", str(args.infer_clips)]
                    cmd += ["--quick"] if args.quick else []
                    ours[side].append(run_json(cmd))
            for p in args.precision:
                tr = [
                    o["train_clips_per_s"] / k["train_samples_per_s"]
                    for o, k in zip(ours[p], peers, strict=True)
                ]
                inf = [
                    o["infer_clips_per_s"] / k["infer_samples_per_s"]
                    for o, k in zip(ours[p], peers, strict=True)
                ]
                results.append(
                    {
                        "shape": shape,
                        "model": model,
                        "hidden": hidden,
                        "precision": ours[p][0]["precision"],
                        "rounds": args.rounds,
                        "peer_train_clips_per_s": statistics.median(k["train_samples_per_s"] for k in peers),
                        "peer_infer_clips_per_s": statistics.median(k["infer_samples_per_s"] for k in peers),
                        "train_clips_per_s": statistics.median(o["train_clips_per_s"] for o in ours[p]),
                        "infer_clips_per_s": statistics.median(o["infer_clips_per_s"] for o in ours[p]),
                        "train_ratio": round(statistics.median(tr), 2),
                        "infer_ratio": round(statistics.median(inf), 2),
                        "train_ratios": [round(v, 2) for v in tr],
                        "infer_ratios": [round(v, 2) for v in inf],
                        "epoch_s_est": statistics.median(o["epoch_s_est"] for o in ours[p]),
                        "peer_epoch_s_est": statistics.median(k["epoch_s_est"] for k in peers),
                        "peer_versions": peers[0].get("versions"),
                        "torch": ours[p][0]["torch"],
                        "threads": ours[p][0]["threads"],
                        "glibc_tunables": ours[p][0]["glibc_tunables"],
                        "malloc": ours[p][0]["malloc"],
                        "omp_wait_policy": ours[p][0]["omp_wait_policy"],
                        "cpu": ours[p][0]["cpu"],
                        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    }
                )
                print(json.dumps(results[-1]), file=sys.stderr)
    return results


PEER_COLUMNS = (
    ("shape", "shape", "{}"),
    ("model", "model", "{}"),
    ("precision", "prec", "{}"),
    ("peer_train_clips_per_s", "keras train/s", "{:.1f}"),
    ("train_clips_per_s", "mer train/s", "{:.1f}"),
    ("train_ratio", "x train", "{:.2f}"),
    ("peer_infer_clips_per_s", "keras infer/s", "{:.1f}"),
    ("infer_clips_per_s", "mer infer/s", "{:.1f}"),
    ("infer_ratio", "x infer", "{:.2f}"),
    ("epoch_s_est", "epoch_s", "{:.1f}"),
)


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="mer-bench",
        description="Train/infer speed of mer-cli's real training path on generated clips "
        "(one JSON line per shape x model x device x precision); with --peer-python, side by "
        "side with the Keras peer.",
    )
    ap.add_argument("--shape", nargs="+", choices=sorted(SHAPES), default=None, help="default: all")
    ap.add_argument(
        "--model",
        nargs="+",
        choices=sorted({*MODELS, *REFERENCE_MODELS}),
        default=None,
        help="default: all (with the peer: the LSTM ones; --reference: the zoo without bilstm_notebook)",
    )
    ap.add_argument("--precision", nargs="+", choices=PRECISIONS, default=["fp32", "bf16"])
    ap.add_argument("--device", choices=hardware.DEVICES, default="cpu")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--batches", type=int, default=6, help="timed training batches (one bucketed epoch)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed training batches first")
    ap.add_argument("--infer-clips", type=int, default=1024, help="clips per timed inference pass")
    ap.add_argument("--masking", choices=MASKINGS, default="config", help="none: padded nn.LSTM reference")
    ap.add_argument("--no-bucket", action="store_true", help="batches of random lengths (no buckets)")
    ap.add_argument("--optimizer", choices=("adabelief", "adamw"), default="adabelief")
    ap.add_argument("--threads", type=int, default=None, help="default: physical cores")
    ap.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="timed repetitions, medians reported (default 1; 2 with the peer)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--length-groups", type=int, default=1, help="trainer.loop.length_groups of mer-cli's models"
    )
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks only that it runs (CI)")
    ap.add_argument("--out", default=None, help="append JSON lines here ('-': stdout)")
    ap.add_argument("--no-table", action="store_true")
    ap.add_argument("--peer-python", default=None, help="python with TensorFlow: run the Keras peer too")
    ap.add_argument(
        "--peer-script",
        default=str(PEER_SCRIPT),
        help="the Keras peer (default: benchmarks/peer_keras.py of this source checkout)",
    )
    ap.add_argument("--peer-batches", type=int, default=3, help="the peer's timed training batches")
    r = ap.add_argument_group(
        "--reference: every encoder x fusion against plain PyTorch (benchmarks/reference.py)"
    )
    r.add_argument("--reference", action="store_true", help="mer-cli / reference ratios, interleaved rounds")
    r.add_argument("--fusion", nargs="+", choices=FUSIONS, default=None, help="default: all")
    g = ap.add_argument_group("--inference: the exported graph (mer-export), torch vs onnxruntime, fp32")
    g.add_argument("--inference", action="store_true", help="time inference instead of training")
    g.add_argument("--latency-runs", type=int, default=200, help="timed single-clip calls (p50, p99)")
    g.add_argument("--infer-batch", type=int, default=64, help="clips per batch for throughput")
    g.add_argument("--infer-batches", type=int, default=20, help="timed batches for throughput")
    args = ap.parse_args(argv)
    if args.reference and (args.inference or args.peer_python):
        ap.error("--reference runs on its own (not with --inference or --peer-python)")
    if args.inference and args.peer_python:
        ap.error("--inference times mer-cli's exported graph; the Keras peer has no such mode")
    if args.peer_python and not Path(args.peer_script).is_file():
        ap.error(
            f"--peer-script {args.peer_script}: no such file (the Keras peer ships with the "
            "source repository, not the installed package: pass its path)"
        )
    if args.reference:
        args.fusion = args.fusion or (["early"] if args.quick else list(FUSIONS))
        args.model = args.model or (["bilstm"] if args.quick else list(REFERENCE_MODELS))
        args.rounds = args.rounds or 2
        if args.precision == ["fp32", "bf16"]:  # not chosen: what mer-train runs (trainer.loop.precision)
            args.precision = ["auto"]
        return args
    if args.shape is None:  # --quick: one small shape and model, just to prove the path runs
        args.shape = (
            ["visual"]
            if args.quick
            else ["acoustic", "early"]
            if args.peer_python
            else ["early"]  # the default modality's input
            if args.inference
            else sorted(SHAPES)
        )
    if args.rounds is None:
        args.rounds = 2 if args.peer_python else 1
    if args.model is None:
        args.model = (
            ["bilstm"]
            if args.quick
            else list(PEER_MODELS if args.peer_python else INFER_MODELS if args.inference else MODELS)
        )
    if args.peer_python and set(args.model) - set(PEER_MODELS):
        ap.error(f"the Keras peer has the notebook's BiLSTM only: --model {' '.join(PEER_MODELS)}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    allocator.configure()  # first: mer-train's malloc setting, so the bench times what it runs
    args = parse_args(argv)
    loop.configure_threads(loop.Settings(num_threads=args.threads))
    if args.inference:
        from mer_cli.core.errors import MerError
        from mer_cli.serving import export

        try:
            export.require_onnxruntime("--inference")
        except MerError as e:
            print(f"mer-bench: error: {e}", file=sys.stderr)
            sys.exit(2)
    out = sys.stdout if args.out == "-" else open(args.out, "a") if args.out else None  # noqa: SIM115
    try:
        if args.reference:
            rows, columns = run_reference(args)
        elif args.peer_python:
            rows = side_by_side(args)
            columns: Sequence[tuple[str, str, str]] = PEER_COLUMNS
        elif args.inference:
            rows, columns = run_inference(args), INFER_COLUMNS
        else:
            rows, columns = run_all(args), COLUMNS
        if out is not None:
            for row in rows:
                out.write(json.dumps(row) + "\n")
            out.flush()
    finally:
        if out is not None and out is not sys.stdout:
            out.close()
    if not args.no_table:
        print(format_table(rows, columns), file=sys.stderr if args.out == "-" else sys.stdout)


FUSIONS = ("early", "joint", "xattn")  # bench_reference.FUSIONS (imported only with --reference)
REFERENCE_MODELS = ("bilstm", "gru", "transformer", "tcn", "inception")


def run_reference(args: argparse.Namespace) -> tuple[list[dict[str, Any]], Sequence[tuple[str, str, str]]]:
    """``--reference``: bench_reference's rows (it sits beside this script, outside the wheel)."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:  # mer-bench runs this file by path: its folder is not on sys.path
        sys.path.insert(0, here)
    import bench_reference

    peaks = {"fp32": matmul_peak(torch.float32, args.quick), "bf16": matmul_peak(torch.bfloat16, args.quick)}
    rows = []
    for fusion in args.fusion:
        for model in args.model:
            for precision in args.precision:
                case = bench_reference.Case(
                    fusion=fusion,
                    model=model,
                    precision=precision,
                    batch=4 if args.quick else args.batch,
                    batches=2 if args.quick else args.batches,
                    infer_clips=8 if args.quick else args.infer_clips,
                    rounds=args.rounds,
                    length_groups=args.length_groups,
                    seed=args.seed,
                    scale=0.1 if args.quick else 1.0,
                )
                rows.append(bench_reference.run_case(case, peaks))
                if not args.no_table:
                    line = format_table(rows[-1:], bench_reference.COLUMNS).splitlines()[1]
                    print(line, file=sys.stderr, flush=True)
    return rows, bench_reference.COLUMNS


def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    peaks = {
        "fp32": matmul_peak(torch.float32, args.quick),
        "bf16": matmul_peak(torch.bfloat16, args.quick) if "bf16" in args.precision else math.nan,
    }
    rows = []
    for shape in args.shape:
        for model in args.model:
            for precision in args.precision:
                case = Case(
                    shape=shape,
                    model=model,
                    precision=precision,
                    device=args.device,
                    batch=4 if args.quick else args.batch,
                    batches=2 if args.quick else args.batches,
                    warmup=1 if args.quick else args.warmup,
                    infer_clips=8 if args.quick else args.infer_clips,
                    masking=args.masking,
                    bucket=not args.no_bucket,
                    optimizer=args.optimizer,
                    rounds=args.rounds,
                    seed=args.seed,
                    length_groups=args.length_groups,
                )
                row = run_case(case, peaks)
                rows.append(row)
                if not args.no_table:
                    print(format_table([row]).splitlines()[1], file=sys.stderr, flush=True)
    return rows


if __name__ == "__main__":
    main()

"""mer-bench --reference: every encoder of the zoo in every fusion, mer-cli's model against its
plain PyTorch reference (benchmarks/reference.py), side by side in one process.

Input: generated clips (bench.make_lengths: 40-100 % of the maximum, 5 % at it): early fusion one
stream of 356 x 69, joint and xattn the acoustic 356 x 52 and visual 105 x 17 streams of the same
clips (visual lengths the acoustic ones x 105 / 356). Both models start from the same weights
(`reference.copy_weights`), train on the very same batches (mer-train's length buckets, the same
padded tensors, AdamW, `loop.train_step`) and infer through `batching.predict_proba`, with the
same threads and precision. Rounds are interleaved (mer-cli first in even rounds, the reference
first in odd ones) and the ratio mer-cli / reference is formed within each round; its median is
reported with each round's beside it. Output: one JSON row per encoder x fusion x precision.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import bench
import numpy as np
import reference
import torch
from torch import nn

from mer_cli.models.layers import Frames
from mer_cli.preprocess.sequences import Ragged, SequenceSet
from mer_cli.training import batching, hardware, loop

FUSIONS = ("early", "joint", "xattn")
MODELS = ("bilstm", "gru", "transformer", "tcn", "inception")  # configs/model/<name>.yaml
STREAM_SHAPES = {"acoustic": (356, 52), "visual": (105, 17)}
# every --reference JSON row has these keys (tests/benchmarks/test_bench_reference.py checks them)
FIELDS = (
    "mode",
    "fusion",
    "model",
    "encoder",
    "precision",
    "batch",
    "train_batches",
    "infer_clips",
    "length_groups",
    "train_clips_per_s",
    "ref_train_clips_per_s",
    "train_ratio",
    "train_ratios",
    "infer_clips_per_s",
    "ref_infer_clips_per_s",
    "infer_ratio",
    "infer_ratios",
    "padding_waste",
    "frac_of_peak",
    "max_abs_diff",
    "rounds",
    "threads",
    "torch",
    "cpu",
    "time_utc",
)


def make_streams(n: int, fusion: str, seed: int, scale: float = 1.0) -> SequenceSet:
    """``n`` generated clips as ``fusion`` reads them (early: one joined stream); ``scale``:
    every stream's maximum length times this (``--quick``: short clips)."""
    rng = np.random.default_rng(seed)
    shapes = {bench.STREAM: bench.SHAPES["early"]} if fusion == "early" else STREAM_SHAPES
    longest = round(bench.SHAPES["acoustic"][0] * scale)
    first = bench.make_lengths(rng, n, longest)
    streams = {}
    for name, (frames_max, n_features) in shapes.items():
        # the same clips: a stream's lengths scale with its frame rate (visual 105 / 356 frames)
        max_len = max(2, round(frames_max * scale))
        lengths = np.clip(np.round(first * max_len / longest), 1, max_len).astype(np.int64)
        frames = rng.standard_normal((int(lengths.sum()), n_features), dtype=np.float32)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        streams[name] = Ragged(frames, offsets, max_len)
    y = torch.from_numpy(rng.integers(0, bench.N_CLASSES, n).astype(np.int64))
    return SequenceSet(streams=streams, y=y, clip_ids=tuple(f"clip{i}" for i in range(n)))


@dataclass(frozen=True)
class Case:
    fusion: str
    model: str
    precision: str = "auto"
    batch: int = 128
    batches: int = 3
    infer_clips: int = 512
    rounds: int = 2
    length_groups: int = 1
    seed: int = 0
    scale: float = 1.0  # clip lengths x this (--quick: 0.1)


def build_pair(case: Case, n_features: dict[str, int]) -> tuple[nn.Module, nn.Module, dict[str, Any]]:
    """mer-cli's model of ``case`` (the registry) and its reference, on the same weights."""
    from mer_cli.runs.trained import build_model

    cfg = bench.model_config(case.model)
    classifier = "single" if case.fusion == "early" else case.fusion
    description = {"classifier": classifier, **cfg}
    if case.length_groups != 1:
        description["length_groups"] = case.length_groups
    torch.manual_seed(case.seed)
    ours = build_model(description, n_features, bench.N_CLASSES)
    ref = reference.ReferenceModel(cfg, n_features, bench.N_CLASSES, classifier)
    return ours, reference.copy_weights(ours, ref), cfg


def max_abs_diff(ours: nn.Module, ref: nn.Module, inputs: dict[str, Frames]) -> float:
    """The largest |logit difference| of the two models on one batch (eval mode, fp32)."""
    ours.eval(), ref.eval()
    with torch.no_grad():
        return float((ours(inputs) - ref(inputs)).abs().max())


def run_case(case: Case, peaks: dict[str, float]) -> dict[str, Any]:
    device = torch.device("cpu")
    dtype = hardware.resolve_precision(case.precision, device)
    train_set = make_streams(case.batch * case.batches, case.fusion, case.seed, case.scale)
    warm_set = make_streams(case.batch, case.fusion, case.seed + 1, case.scale)
    infer_set = make_streams(case.infer_clips, case.fusion, case.seed + 2, case.scale)
    ours, ref, cfg = build_pair(case, train_set.n_features)
    settings = loop.Settings(batch_size=case.batch, progress=False, length_groups=case.length_groups)
    generator = torch.Generator().manual_seed(case.seed)

    def batches_of(data: SequenceSet) -> list[tuple[torch.Tensor, tuple[dict[str, Frames], torch.Tensor]]]:
        idx = batching.epoch_batches(data.lengths, settings, generator)
        return [(i, batching.gather_batch(data, i, device)) for i in idx]

    train_batches, warm_batches = batches_of(train_set), batches_of(warm_set)
    diff = max_abs_diff(ours, ref, warm_batches[0][1][0])
    optimizers = {}
    for side, model in (("mer", ours), ("ref", ref)):
        optimizers[side] = bench.build_optimizer("adamw", model)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss_fn = nn.CrossEntropyLoss()

    def train(side: str, model: nn.Module, batches: Sequence[Any]) -> float:
        model.train()
        t0 = time.perf_counter()
        for _, (inputs, y) in batches:
            loop.train_step(model, optimizers[side], scaler, loss_fn, inputs, y, dtype)
        return time.perf_counter() - t0

    def infer(model: nn.Module, data: SequenceSet) -> float:
        t0 = time.perf_counter()
        batching.predict_proba(model, data, settings.eval_batch_size, device, dtype)
        return time.perf_counter() - t0

    sides = {"mer": ours, "ref": ref}
    for side, model in sides.items():  # warm-up: kernels built, memory allocated, outside the timing
        train(side, model, warm_batches)
        infer(model, warm_set.take(range(min(64, len(warm_set)))))
    seconds: dict[str, dict[str, list[float]]] = {s: {"train": [], "infer": []} for s in sides}
    for r in range(case.rounds):
        for side in ("mer", "ref")[:: 1 if r % 2 == 0 else -1]:
            seconds[side]["train"].append(train(side, sides[side], train_batches))
            seconds[side]["infer"].append(infer(sides[side], infer_set))
    n_train = len(train_set)
    train_ratios = [b / a for a, b in zip(seconds["mer"]["train"], seconds["ref"]["train"], strict=True)]
    infer_ratios = [b / a for a, b in zip(seconds["mer"]["infer"], seconds["ref"]["infer"], strict=True)]
    max_len = int(train_set.streams[next(iter(train_set.streams))].max_length)
    waste = batching.padding_waste(
        train_set.lengths, [i for i, _ in train_batches], max_len, case.length_groups
    )
    train_cps = n_train / statistics.median(seconds["mer"]["train"])
    frac = None
    if case.fusion == "early":  # one stream: the bench's FLOP count (LSTM formula, or counted)
        flops = bench.flops_function(ours, cfg, bench.SHAPES["early"][1])
        computed = float(train_set.lengths.float().mean()) * (1 + waste)
        peak = peaks["bf16" if dtype == torch.bfloat16 else "fp32"]
        frac = round(3 * flops(computed) * train_cps / 1e9 / peak, 3) if peak else None
    return {
        "mode": "reference",
        "fusion": case.fusion,
        "model": case.model,
        "encoder": cfg["encoder"]["name"],
        "precision": {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype, str(dtype)),
        "batch": case.batch,
        "train_batches": case.batches,
        "infer_clips": case.infer_clips,
        "length_groups": case.length_groups,
        "train_clips_per_s": round(train_cps, 2),
        "ref_train_clips_per_s": round(n_train / statistics.median(seconds["ref"]["train"]), 2),
        "train_ratio": round(statistics.median(train_ratios), 3),  # mer-cli / reference: > 1 faster
        "train_ratios": [round(v, 3) for v in train_ratios],
        "infer_clips_per_s": round(case.infer_clips / statistics.median(seconds["mer"]["infer"]), 2),
        "ref_infer_clips_per_s": round(case.infer_clips / statistics.median(seconds["ref"]["infer"]), 2),
        "infer_ratio": round(statistics.median(infer_ratios), 3),
        "infer_ratios": [round(v, 3) for v in infer_ratios],
        # mer-cli's computed / real frames - 1 in training, of the first stream (batches sort by it)
        "padding_waste": round(waste, 4),
        "frac_of_peak": frac,
        "max_abs_diff": diff,  # |logits mer-cli - reference|, same weights, eval mode, fp32
        "rounds": case.rounds,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": bench.cpu_name(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


COLUMNS = (
    ("fusion", "fusion", "{}"),
    ("model", "model", "{}"),
    ("precision", "prec", "{}"),
    ("train_clips_per_s", "mer train/s", "{:.1f}"),
    ("ref_train_clips_per_s", "ref train/s", "{:.1f}"),
    ("train_ratio", "x train", "{:.2f}"),
    ("infer_clips_per_s", "mer infer/s", "{:.1f}"),
    ("ref_infer_clips_per_s", "ref infer/s", "{:.1f}"),
    ("infer_ratio", "x infer", "{:.2f}"),
    ("padding_waste", "waste", "{:.1%}"),
    ("frac_of_peak", "peak", "{:.0%}"),
    ("max_abs_diff", "max_diff", "{:.1e}"),
)

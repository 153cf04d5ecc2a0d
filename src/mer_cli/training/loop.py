"""The training loop: length-bucketed batches, early stopping, LR on plateau, best checkpoint.

Input: a model, an optimizer and scheduler, train and validation `SequenceSet`s. Output: the
model with its best weights (lowest val/loss) restored, and the per-epoch history. Every epoch it
also writes ``last.pt`` so an interrupted run can resume where it stopped.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from mer_cli.core import allocator
from mer_cli.core.artifacts import deferred_interrupts, load_checkpoint, save_checkpoint
from mer_cli.core.errors import ConfigError
from mer_cli.evaluation import metrics
from mer_cli.models.layers import Frames
from mer_cli.preprocess.streams import SequenceSet, pad_clips

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
HISTORY_COLUMNS = (
    "epoch",
    "train/loss",
    "train/accuracy",
    "train/roc_auc",
    "lr",
    "val/loss",
    "val/accuracy",
    "val/roc_auc",
    "val/f1_macro",
    "seconds",
)


@dataclass(frozen=True)
class Settings:
    """``trainer.loop`` and ``runtime`` (less ``save_plots``) in the config; an unknown key is a
    TypeError at construction."""

    max_epochs: int = 100
    batch_size: int = 128
    patience_epochs: int = 20  # early stop on the N-th epoch in a row without a better val/loss
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (fp16: CUDA only)
    num_threads: int | None = None  # CPU threads; None: the physical cores available
    bucket_by_length: bool = True  # batch clips of similar length, pad each batch to its longest
    bucket_batches: int = 8  # batches per bucket pool: larger pools pad less, shuffle less
    bucket_length_jitter: float = 0.15  # relative noise on lengths before sorting: new batches each epoch
    eval_batch_size: int = 512  # at most this many clips per inference batch (see inference_batches)
    progress: bool = True  # a progress bar per epoch (only when stderr is a terminal)
    loader_workers: int = 0  # background processes assembling batches (0: the training process)
    pin_memory: bool | None = None  # page-locked batches for faster copies to a GPU; None: on CUDA

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ConfigError(f"runtime.device={self.device!r}: valid: {', '.join(DEVICES)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"trainer.loop.precision={self.precision!r}: valid: {', '.join(PRECISIONS)}")
        if self.batch_size < 2:  # BatchNorm cannot normalize one clip by the batch's statistics
            raise ConfigError(f"trainer.loop.batch_size={self.batch_size}: must be at least 2")
        if self.loader_workers < 0:
            raise ConfigError(f"runtime.loader_workers={self.loader_workers}: must be 0 or more")


class StopTraining(Exception):
    """Raised by an ``on_epoch`` callback to end training after this epoch (its state is saved);
    the best weights are restored as after an early stop."""


@dataclass
class History:
    rows: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False

    @property
    def best(self) -> dict[str, float]:
        return next(r for r in self.rows if r["epoch"] == self.best_epoch)


class PlateauScheduler(torch.optim.lr_scheduler.ReduceLROnPlateau):
    """LR x ``factor`` on the ``patience_epochs``-th epoch in a row without a better val/loss.

    One meaning of patience for the LR schedule and early stopping (``Settings.patience_epochs``),
    and Keras' (the notebook's): act on the N-th epoch without improvement. Torch's own
    ``patience=N`` waits for the (N+1)-th, so this passes it N - 1. Other keyword arguments
    (``mode``, ``min_lr``, ``threshold``, ``threshold_mode``, ...) are torch's.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, patience_epochs: int = 3, **kwargs: Any) -> None:
        if patience_epochs < 1:
            raise ConfigError(f"trainer.scheduler.patience_epochs={patience_epochs}: must be at least 1")
        super().__init__(optimizer, patience=patience_epochs - 1, **kwargs)


# ---------------------------------------------------------------------------------------------
# Hardware


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads share one core's LSTM throughput)."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    try:
        cores, cpu = set(), None
        with open("/proc/cpuinfo") as f:
            phys = "0"
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "processor":
                    cpu = int(value)
                elif key == "physical id":
                    phys = value
                elif key == "core id" and cpu in allowed:
                    cores.add((phys, value))
        return max(1, len(cores)) if cores else len(allowed)
    except OSError:
        return max(1, len(allowed))


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("runtime.device=cuda, but no CUDA device is available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 autocast trains and infers faster there, with test metrics within
    seed noise of fp32 (make bench, README). Elsewhere bf16 is emulated and slower: fp32."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, c, lambda: False)()) for c in checks)


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype (float32: no autocast). ``auto``: bf16 where the hardware has it."""
    if name == "fp16" and device.type != "cuda":
        raise ConfigError("trainer.loop.precision=fp16 needs CUDA; use bf16 or fp32 on a CPU")
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager[Any]:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def cpu_threads(parallel_jobs: int = 1) -> int:
    """Torch threads for one of ``parallel_jobs`` jobs sharing this machine: its physical cores
    split evenly, so parallel jobs never oversubscribe the CPU (at least one each)."""
    return max(1, physical_cores() // max(1, parallel_jobs))


def process_seconds() -> float:
    """Seconds since this process started (Linux: /proc; elsewhere since mer_cli.train loaded)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rpartition(")")[2].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _LOADED


_LOADED = time.perf_counter()


_fits_in_process = 0


def _log_first_batch(fit_started: float) -> None:
    """The first training batch's wait: from the process's start for its first training (imports,
    data, preprocessing: what a user waits for), else from this training's start (a launcher's
    worker process runs job after job; late fusion trains two members in one process)."""
    global _fits_in_process
    _fits_in_process += 1
    if _fits_in_process == 1:
        log.info("first training batch ready %.1f s after the process started", process_seconds())
    else:
        waited = time.perf_counter() - fit_started
        log.info("first training batch ready %.1f s after this training started", waited)


def configure_threads(settings: Settings) -> int:
    n = settings.num_threads or cpu_threads()
    torch.set_num_threads(n)
    return n


# ---------------------------------------------------------------------------------------------
# Batches

# Batches are padded to a multiple of this many frames: a handful of distinct batch shapes, so the
# oneDNN LSTM kernels built for one shape are reused instead of rebuilt (and their memory kept)
# for every new length; costs about PAD_MULTIPLE / 2 padded frames per clip (measured: make bench).
PAD_MULTIPLE = 8


def padded_length(longest: Any) -> Any:
    """``longest`` (an int or an integer array) rounded up to a multiple of ``PAD_MULTIPLE``."""
    return -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE


def batch_indices(
    lengths: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
    bucket: bool,
    pool_batches: int,
    length_jitter: float = 0.15,
) -> list[torch.Tensor]:
    """One epoch's batches: every clip exactly once, order drawn from ``generator``.

    With ``bucket``, clips are shuffled, cut into pools of ``pool_batches`` batches, sorted by
    length within a pool and cut into batches whose order is shuffled again: batches hold clips
    of similar length, so padding each batch to its own longest clip computes little padding.
    Lengths are scaled by a random factor in ``1 +- length_jitter`` before sorting: without it a
    small dataset (one pool) would see the very same batches every epoch, and generalize worse.

    Never a batch of one clip (BatchNorm cannot train on it): only the last batch can be short,
    and a single leftover clip joins the batch before it (one batch of ``batch_size + 1``).
    """
    n = lengths.shape[0]
    if n < 2:
        raise ConfigError(f"{n} training clip(s): training needs at least 2 (BatchNorm)")
    order = torch.randperm(n, generator=generator)
    if not bucket:
        batches = list(order.split(batch_size))
        return _fold_single_clip(batches)
    batches = []
    for pool in order.split(batch_size * pool_batches):
        noise = 1.0 + length_jitter * (2.0 * torch.rand(len(pool), generator=generator) - 1.0)
        by_length = pool[torch.argsort(lengths[pool] * noise, descending=True, stable=True)]
        batches.extend(by_length.split(batch_size))
    batches = _fold_single_clip(batches)
    perm = torch.randperm(len(batches), generator=generator)
    return [batches[i] for i in perm]


def _fold_single_clip(batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """The last batch joined to the one before it when it holds a single clip."""
    if len(batches) > 1 and len(batches[-1]) == 1:
        return [*batches[:-2], torch.cat(batches[-2:])]
    return batches


def n_batches(n: int, batch_size: int, bucket: bool, pool_batches: int) -> int:
    """How many batches `batch_indices` cuts ``n`` clips into (without drawing them)."""
    pool = batch_size * pool_batches if bucket else max(n, 1)
    sizes = [pool] * (n // pool) + ([n % pool] if n % pool else [])
    count = sum(-(-p // batch_size) for p in sizes)
    last = sizes[-1] % batch_size if sizes else 0
    return count - 1 if count > 1 and last == 1 else count


class BucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Each epoch's batches from `batch_indices` (length buckets), drawn from ``generator`` when
    an epoch starts: the same seed gives the same batches, and a resumed run (the generator's
    state restored) the batches the interrupted one would have drawn."""

    def __init__(self, lengths: torch.Tensor, settings: Settings, generator: torch.Generator) -> None:
        self.lengths, self.settings, self.generator = lengths, settings, generator

    def __iter__(self) -> Iterator[list[int]]:
        # a generator: the batches are drawn at the first batch, not when iter() is called (a
        # DataLoader with workers calls it twice for its first epoch and uses the second)
        s = self.settings
        batches = batch_indices(
            self.lengths,
            s.batch_size,
            self.generator,
            s.bucket_by_length,
            s.bucket_batches,
            s.bucket_length_jitter,
        )
        for b in batches:
            yield b.tolist()

    def __len__(self) -> int:
        s = self.settings
        return n_batches(len(self.lengths), s.batch_size, s.bucket_by_length, s.bucket_batches)


class ClipDataset(torch.utils.data.Dataset[tuple[dict[str, np.ndarray], int]]):
    """The clips of a `SequenceSet`: item i is each input stream's prepared frames of clip i
    (read, cut and scaled then, see `preprocess.Prepared`) and its label."""

    def __init__(self, data: SequenceSet) -> None:
        self.streams, self.y = dict(data.streams), data.y

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __getitem__(self, i: int) -> tuple[dict[str, np.ndarray], int]:
        return {name: s.clip(i) for name, s in self.streams.items()}, int(self.y[i])


class PadCollate:
    """Clips -> one batch: per stream, frames padded to the batch's own longest clip (rounded up
    to ``PAD_MULTIPLE``, never beyond the stream's target length ``max_lengths[name]``) and the
    clips' lengths; and the labels. CPU tensors (the DataLoader may pin them)."""

    def __init__(self, data: SequenceSet) -> None:
        self.max_lengths = {name: int(s.max_length) for name, s in data.streams.items()}
        self.n_features = data.n_features

    def __call__(
        self, items: list[tuple[dict[str, np.ndarray], int]]
    ) -> tuple[dict[str, Frames], torch.Tensor]:
        inputs = {}
        for name, limit in self.max_lengths.items():
            clips = [frames[name] for frames, _ in items]
            lengths = torch.tensor([len(c) for c in clips], dtype=torch.int64)
            length = min(limit, padded_length(int(lengths.max())))
            inputs[name] = (pad_clips(clips, length, self.n_features[name]), lengths)
        return inputs, torch.tensor([y for _, y in items], dtype=torch.int64)


def batch_loader(
    data: SequenceSet,
    batches: Iterable[list[int]],
    device: torch.device,
    workers: int = 0,
    pin_memory: bool | None = None,
) -> torch.utils.data.DataLoader[Any]:
    """The batches of ``data`` (clip indices per batch) assembled by a torch DataLoader:
    ``workers`` background processes (0: in this process), page-locked if ``pin_memory``
    (None: on CUDA)."""
    pin = device.type == "cuda" if pin_memory is None else pin_memory
    return torch.utils.data.DataLoader(
        ClipDataset(data),
        batch_sampler=batches,
        collate_fn=PadCollate(data),
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=workers > 0,
        # its own generator: the loader draws a seed for its workers each epoch, which must not
        # come from (and move) the global RNG that dropout draws from
        generator=torch.Generator().manual_seed(0),
    )


def to_device(
    batch: tuple[dict[str, Frames], torch.Tensor], device: torch.device
) -> tuple[dict[str, Frames], torch.Tensor]:
    non_blocking = device.type == "cuda"
    inputs, y = batch
    moved = {
        name: (x.to(device, non_blocking=non_blocking), n.to(device, non_blocking=non_blocking))
        for name, (x, n) in inputs.items()
    }
    return moved, y.to(device, non_blocking=non_blocking)


def gather_batch(
    data: SequenceSet, idx: torch.Tensor, device: torch.device
) -> tuple[dict[str, Frames], torch.Tensor]:
    """The clips ``idx`` as model inputs on ``device`` (`PadCollate`, in this process)."""
    dataset = ClipDataset(data)
    batch = PadCollate(data)([dataset[i] for i in idx.tolist()])
    if device.type == "cuda":
        batch = ({k: (x.pin_memory(), n) for k, (x, n) in batch[0].items()}, batch[1])
    return to_device(batch, device)


# ---------------------------------------------------------------------------------------------
# Prediction


def predict_proba(
    model: nn.Module,
    data: SequenceSet,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    workers: int = 0,
    pin_memory: bool | None = None,
) -> np.ndarray:
    """Class probabilities (N, C) in ``data``'s order; batches sorted by length pad least."""
    model.eval()
    batches = inference_batches(data.lengths, batch_size)
    out: list[torch.Tensor] = []
    loader = batch_loader(data, [b.tolist() for b in batches], device, workers, pin_memory)
    with torch.inference_mode(), autocast(device, dtype):
        for batch in loader:
            inputs, _ = to_device(batch, device)
            out.append(torch.softmax(model(inputs).float(), dim=1).cpu())
    probs = torch.empty(len(data), out[0].shape[1])
    probs[torch.cat(batches)] = torch.cat(out)
    return probs.numpy()


# Cost of one batch ~ its padded length x (clips + this many): every time step of a batch also
# pays a fixed price (kernel calls, small matrices) whatever the batch size. 4 measured best of
# 4 / 16 / 32 on a 2-core CPU, both model sizes, fp32 and bf16: 1,024 bench clips in 10 batches
# instead of 2 of 512 inferred 1.1-1.2x faster (default model), 512 clips in 9 instead of 1
# 1.2-1.7x faster (notebook model).
STEP_OVERHEAD_CLIPS = 4


def inference_batches(lengths: torch.Tensor, max_batch: int) -> list[torch.Tensor]:
    """Clip indices sorted by length (longest first), cut into equal-count batches of at most
    ``max_batch``; the number of batches minimizes the estimated cost: more batches compute less
    padding (each is padded to its own longest clip) but pay more per-step overhead."""
    order = torch.argsort(lengths, descending=True, stable=True)
    n = len(order)
    sorted_lengths = lengths[order].numpy()
    best_k, best_cost = 1, math.inf
    for k in range(max(1, -(-n // max_batch)), max(1, n // 8) + 1):
        size = -(-n // k)
        padded = padded_length(sorted_lengths[::size])  # each batch's longest, padded
        counts = np.minimum(size, n - np.arange(0, n, size))
        cost = float((padded * (counts + STEP_OVERHEAD_CLIPS)).sum())
        if cost < best_cost:
            best_k, best_cost = k, cost
    return list(order.split(-(-n // best_k)))


# ---------------------------------------------------------------------------------------------
# The loop


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    loss_fn: nn.Module,
    inputs: dict[str, Frames],
    y: torch.Tensor,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on one batch; returns the loss and the logits (``make bench`` times this).

    A model with a ``modulate_gradients(inputs, y)`` method (multi-stream models: OGM gradient
    modulation) has it called between backward and the optimizer step, to change the gradients;
    other models train exactly as without the hook."""
    with autocast(y.device, dtype):
        logits = model(inputs)
        loss = loss_fn(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    modulate = getattr(model, "modulate_gradients", None)
    if modulate is not None:
        modulate(inputs, y)
    scaler.step(optimizer)
    scaler.update()
    allocator.relieve()  # a heap fragmented past its bound gives its freed pages back
    return loss, logits


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau,
    train_set: SequenceSet,
    val_set: SequenceSet,
    settings: Settings,
    out_dir: Path,
    seed: int,
    checkpoint_meta: dict[str, Any],
    resume: bool = False,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> History:
    """Train until ``max_epochs`` or early stop; return the history with best weights restored.

    Writes ``out_dir/checkpoint.pt`` (best weights + ``checkpoint_meta``) whenever val/loss
    improves and ``out_dir/last.pt`` (everything needed to resume) after every epoch. With
    ``resume``, training continues from ``last.pt`` and ends as an uninterrupted run would.
    """
    device = resolve_device(settings.device)
    dtype = resolve_precision(settings.precision, device)
    model.to(device)
    # gradient scaling keeps small fp16 gradients from flushing to zero; bf16 needs none
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    generator = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    history = History()
    best_state: dict[str, torch.Tensor] | None = None
    best_loss, start_epoch, bad_epochs = math.inf, 1, 0

    first_batch, fit_started, trims_before = True, time.perf_counter(), allocator.trims
    last_path = out_dir / "last.pt"
    if resume and last_path.exists():
        state = load_checkpoint(last_path, map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["grad_scaler"])
        generator.set_state(state["batch_rng"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"])
        history = History(rows=state["history"], best_epoch=state["best_epoch"])
        best_state, best_loss, bad_epochs = state["best_model"], state["best_loss"], state["bad_epochs"]
        start_epoch = state["epoch"] + 1
        if bad_epochs >= settings.patience_epochs:  # it had stopped early: train no further epoch
            history.stopped_early, start_epoch = True, settings.max_epochs + 1
        log.info("resuming from %s at epoch %d", last_path, start_epoch)

    log.info(
        "training on %s (%s), %d threads, %d train / %d val clips, batch %d",
        device,
        str(dtype).removeprefix("torch."),
        torch.get_num_threads(),
        len(train_set),
        len(val_set),
        settings.batch_size,
    )
    loader = batch_loader(
        train_set,
        BucketBatchSampler(train_set.lengths, settings, generator),
        device,
        settings.loader_workers,
        settings.pin_memory,
    )
    for epoch in range(start_epoch, settings.max_epochs + 1):
        started = time.perf_counter()
        model.train()
        total_loss, y_true, y_prob = 0.0, [], []
        bar = tqdm(
            loader,
            desc=f"epoch {epoch}/{settings.max_epochs}",
            leave=False,
            disable=None if settings.progress else True,
            unit="batch",
        )
        for batch in bar:
            if first_batch:
                _log_first_batch(fit_started)
                first_batch = False
            inputs, y = to_device(batch, device)
            loss, logits = train_step(model, optimizer, scaler, loss_fn, inputs, y, dtype)
            total_loss += loss.item() * len(y)
            y_true.append(y.cpu())
            y_prob.append(torch.softmax(logits.detach().float(), dim=1).cpu())
            bar.set_postfix(loss=f"{loss.item():.3f}")
        yt, yp = torch.cat(y_true).numpy(), torch.cat(y_prob).numpy()

        val_prob = predict_proba(
            model,
            val_set,
            settings.eval_batch_size,
            device,
            dtype,
            settings.loader_workers,
            settings.pin_memory,
        )
        val_y = val_set.y.numpy()
        val_loss = _nll(val_prob, val_y)
        row = {
            "epoch": epoch,
            "train/loss": total_loss / len(train_set),
            "train/accuracy": float((yp.argmax(1) == yt).mean()),
            "train/roc_auc": metrics.roc_auc_micro(yt, yp),
            "lr": optimizer.param_groups[0]["lr"],
            "val/loss": val_loss,
            "val/accuracy": float((val_prob.argmax(1) == val_y).mean()),
            "val/roc_auc": metrics.roc_auc_micro(val_y, val_prob),
            # metrics.json's f1_macro (every class counted): what a hyperparameter search maximizes
            "val/f1_macro": metrics.f1_macro(val_y, val_prob),
            "seconds": time.perf_counter() - started,
        }
        history.rows.append(row)
        scheduler.step(val_loss)

        # the epoch's files as one unit: Ctrl-C or kill once checkpoint.pt is being written waits
        # until last.pt is too, so an interrupted run always has the last.pt its epoch earned
        with deferred_interrupts():
            improved = val_loss < best_loss
            if improved:
                best_loss, bad_epochs, history.best_epoch = val_loss, 0, epoch
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                save_checkpoint(
                    out_dir / "checkpoint.pt",
                    {**checkpoint_meta, "model": best_state, "epoch": epoch, "val_loss": val_loss},
                )
            else:
                bad_epochs += 1
            log.info(
                "epoch %3d  train/loss %.4f  train/accuracy %.3f  val/loss %.4f  val/accuracy %.3f  "
                "lr %.2e  %.1fs%s",
                epoch,
                row["train/loss"],
                row["train/accuracy"],
                val_loss,
                row["val/accuracy"],
                row["lr"],
                row["seconds"],
                "  *best" if improved else "",
            )
            save_checkpoint(
                last_path,
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "grad_scaler": scaler.state_dict(),
                    "batch_rng": generator.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state() if device.type == "cuda" else None,
                    "history": history.rows,
                    "best_epoch": history.best_epoch,
                    "best_model": best_state,
                    "best_loss": best_loss,
                    "bad_epochs": bad_epochs,
                    "epoch": epoch,
                },
            )
        if on_epoch is not None:
            try:
                on_epoch(row)
            except StopTraining as stop:  # e.g. a search's pruner: ends like an early stop
                history.stopped_early = True
                log.info("training stopped after epoch %d: %s", epoch, stop)
                break
        if bad_epochs >= settings.patience_epochs:
            history.stopped_early = True
            log.info("early stop: no better val/loss for %d epochs", bad_epochs)
            break

    if best_state is not None:
        model.load_state_dict(best_state)  # restore the best weights, as Keras' restore_best_weights
    log.info("best epoch %d: val/loss %.4f", history.best_epoch, best_loss)
    if trims := allocator.trims - trims_before:  # this training's (a worker process runs job after job)
        log.info(
            "malloc: freed heap pages given back %d times (more than %.0f GiB kept free)",
            trims,
            allocator.KEEP_FREE / 2**30,
        )
    return history


def _nll(prob: np.ndarray, y_true: np.ndarray) -> float:
    """Mean categorical cross-entropy of predicted probabilities."""
    return float(-np.log(np.clip(prob[np.arange(len(y_true)), y_true], 1e-12, None)).mean())

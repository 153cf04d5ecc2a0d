"""The training loop: length-bucketed batches, early stopping, LR on plateau, best checkpoint.

Input: a model, an optimizer and scheduler, train and validation `SequenceSet`s, and the
`options.Options` (class weights, balanced sampler, modality dropout; by default none). Output:
the model with its best weights (lowest val/loss) restored, and the per-epoch history. Every
epoch it also writes ``last.pt`` so an interrupted run can resume where it stopped.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from mer_cli.core import allocator
from mer_cli.core.artifacts import deferred_interrupts, load_checkpoint, save_checkpoint
from mer_cli.core.errors import ConfigError
from mer_cli.evaluation import calibration, metrics
from mer_cli.models.layers import Frames
from mer_cli.preprocess.sequences import SequenceSet
from mer_cli.training.batching import BucketBatchSampler, batch_loader, predict_proba, to_device
from mer_cli.training.hardware import (
    DEVICES,
    PRECISIONS,
    autocast,
    cpu_threads,
    resolve_device,
    resolve_precision,
)
from mer_cli.training.options import Options

log = logging.getLogger(__name__)


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
    length_groups: int = 1  # the model's encoder pass per batch in this many length groups (runs.train)
    eval_batch_size: int = 512  # at most this many clips per inference batch (see inference_batches)
    progress: bool = True  # a progress bar per epoch (only when stderr is a terminal)
    loader_workers: int = 0  # background processes assembling batches (0: the training process)
    pin_memory: bool | None = None  # page-locked batches for faster copies to a GPU; None: on CUDA
    compile: bool = False  # torch.compile the model (in place) before the first epoch

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ConfigError(f"runtime.device={self.device!r}: valid: {', '.join(DEVICES)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"trainer.loop.precision={self.precision!r}: valid: {', '.join(PRECISIONS)}")
        if self.batch_size < 2:  # BatchNorm cannot normalize one clip by the batch's statistics
            raise ConfigError(f"trainer.loop.batch_size={self.batch_size}: must be at least 2")
        if self.length_groups < 1:
            raise ConfigError(f"trainer.loop.length_groups={self.length_groups}: must be at least 1")
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


@dataclass
class Progress:
    """Where training stands: everything `fit` carries from one epoch to the next (and last.pt
    saves, so a resumed run continues exactly)."""

    history: History = field(default_factory=History)
    best_state: dict[str, torch.Tensor] | None = None
    best_loss: float = math.inf
    bad_epochs: int = 0
    next_epoch: int = 1


@dataclass
class Trainee:
    """What one training updates: the model, its optimizer, LR schedule and gradient scaler, the
    generator the batches (and the modality dropout's draws) come from, and the options."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau
    scaler: torch.amp.GradScaler
    generator: torch.Generator
    options: Options = field(default_factory=Options)


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
    options: Options | None = None,
) -> History:
    """Train until ``max_epochs`` or early stop; return the history with best weights restored.

    Writes ``out_dir/checkpoint.pt`` (best weights + ``checkpoint_meta``) whenever val/loss
    improves and ``out_dir/last.pt`` (everything needed to resume) after every epoch. With
    ``resume``, training continues from ``last.pt`` and ends as an uninterrupted run would.
    """
    device = resolve_device(settings.device)
    dtype = resolve_precision(settings.precision, device)
    model.to(device)
    if settings.compile:  # in place: state-dict names, checkpoints and resume are unchanged
        model.compile()
    # gradient scaling keeps small fp16 gradients from flushing to zero; bf16 needs none
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    options = options or Options()
    trainee = Trainee(model, optimizer, scheduler, scaler, torch.Generator().manual_seed(seed), options)
    fit_started, trims_before = time.perf_counter(), allocator.trims
    last_path = out_dir / "last.pt"
    progress = Progress()
    if resume and last_path.exists():
        progress = restore(last_path, trainee, device, settings)
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
        BucketBatchSampler(train_set.lengths, settings, trainee.generator, options.draw_weights(train_set.y)),
        device,
        settings.loader_workers,
        settings.pin_memory,
    )
    for epoch in range(progress.next_epoch, settings.max_epochs + 1):
        started = time.perf_counter()
        # the first batch of this session's first epoch logs how long training took to start
        first = fit_started if epoch == progress.next_epoch else None
        train_row = train_epoch(trainee, loader, device, dtype, epoch, settings, first)
        val_row = validate(model, val_set, device, dtype, settings, options.class_weights)
        row = {
            "epoch": epoch,
            **train_row,
            "lr": optimizer.param_groups[0]["lr"],
            **val_row,
            "seconds": time.perf_counter() - started,
        }
        progress.history.rows.append(row)
        scheduler.step(row["val/loss"])
        save_epoch(out_dir, trainee, progress, row, device, checkpoint_meta)
        if should_stop(progress, row, settings, on_epoch):
            break
    if progress.best_state is not None:
        model.load_state_dict(progress.best_state)  # the best weights, as Keras' restore_best_weights
    log.info("best epoch %d: val/loss %.4f", progress.history.best_epoch, progress.best_loss)
    if trims := allocator.trims - trims_before:  # this training's (a worker process runs job after job)
        log.info(
            "malloc: freed heap pages given back %d times (more than %.0f GiB kept free)",
            trims,
            allocator.KEEP_FREE / 2**30,
        )
    return progress.history


def restore(last_path: Path, trainee: Trainee, device: torch.device, settings: Settings) -> Progress:
    """An interrupted run's state from ``last.pt``: weights, optimizer, schedule, random streams
    and progress, so the epochs that follow are the ones the uninterrupted run would have had."""
    state = load_checkpoint(last_path, map_location=device)
    trainee.model.load_state_dict(state["model"])
    trainee.optimizer.load_state_dict(state["optimizer"])
    trainee.scheduler.load_state_dict(state["scheduler"])
    trainee.scaler.load_state_dict(state["grad_scaler"])
    trainee.generator.set_state(state["batch_rng"])
    torch.set_rng_state(state["torch_rng"])
    if device.type == "cuda" and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(state["cuda_rng"])
    progress = Progress(
        History(rows=state["history"], best_epoch=state["best_epoch"]),
        state["best_model"],
        state["best_loss"],
        state["bad_epochs"],
        state["epoch"] + 1,
    )
    if progress.bad_epochs >= settings.patience_epochs:  # it had stopped early: no further epoch
        progress.history.stopped_early, progress.next_epoch = True, settings.max_epochs + 1
    log.info("resuming from %s at epoch %d", last_path, progress.next_epoch)
    return progress


def train_epoch(
    trainee: Trainee,
    loader: Iterable[Any],
    device: torch.device,
    dtype: torch.dtype,
    epoch: int,
    settings: Settings,
    fit_started: float | None,
) -> dict[str, float]:
    """One pass over the training batches; the epoch's train/* history columns. ``fit_started``
    (the first epoch of a training only): its first batch logs the wait since then."""
    trainee.model.train()
    loss_fn, dropout = trainee.options.loss(device), trainee.options.dropout
    total_loss, y_true, y_prob = 0.0, [], []
    bar = tqdm(
        loader,
        desc=f"epoch {epoch}/{settings.max_epochs}",
        leave=False,
        disable=None if settings.progress else True,
        unit="batch",
    )
    for batch in bar:
        if fit_started is not None:
            _log_first_batch(fit_started)
            fit_started = None
        inputs, y = to_device(batch, device)
        if dropout is not None:  # training batches only: validation and test keep every stream
            inputs = dropout(inputs, trainee.generator)
        loss, logits = train_step(trainee.model, trainee.optimizer, trainee.scaler, loss_fn, inputs, y, dtype)
        total_loss += loss.item() * len(y)
        y_true.append(y.cpu())
        y_prob.append(torch.softmax(logits.detach().float(), dim=1).cpu())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    yt, yp = torch.cat(y_true).numpy(), torch.cat(y_prob).numpy()
    return {
        "train/loss": total_loss / len(yt),
        "train/accuracy": float((yp.argmax(1) == yt).mean()),
        "train/roc_auc": metrics.roc_auc_micro(yt, yp),
    }


def validate(
    model: nn.Module,
    val_set: SequenceSet,
    device: torch.device,
    dtype: torch.dtype,
    settings: Settings,
    class_weights: tuple[float, ...] | None = None,
) -> dict[str, float]:
    """The epoch's val/* history columns, from the model's class probabilities on validation.

    With ``class_weights``, val/loss is the validation cross-entropy with the same weights as
    the training loss: it picks the best epoch, cuts the LR and stops early, and those should
    judge the objective the user asked for (errors on a rare class cost more), not the plain NLL,
    which favours the frequent classes the weights are there to counter. metrics.json's ``loss``
    stays the plain NLL, comparable between runs."""
    val_prob = predict_proba(
        model, val_set, settings.eval_batch_size, device, dtype, settings.loader_workers, settings.pin_memory
    )
    val_y = val_set.y.numpy()
    return {
        "val/loss": calibration.nll(val_y, val_prob, class_weights),
        "val/accuracy": float((val_prob.argmax(1) == val_y).mean()),
        "val/roc_auc": metrics.roc_auc_micro(val_y, val_prob),
        # metrics.json's f1_macro (every class counted): what a hyperparameter search maximizes
        "val/f1_macro": metrics.f1_macro(val_y, val_prob),
    }


def save_epoch(
    out_dir: Path,
    trainee: Trainee,
    progress: Progress,
    row: dict[str, float],
    device: torch.device,
    checkpoint_meta: dict[str, Any],
) -> None:
    """The epoch's bookkeeping and files: checkpoint.pt when val/loss improved, last.pt always."""
    epoch, val_loss = int(row["epoch"]), row["val/loss"]
    history = progress.history
    # the epoch's files as one unit: Ctrl-C or kill once checkpoint.pt is being written waits
    # until last.pt is too, so an interrupted run always has the last.pt its epoch earned
    with deferred_interrupts():
        improved = val_loss < progress.best_loss
        if improved:
            progress.best_loss, progress.bad_epochs, history.best_epoch = val_loss, 0, epoch
            progress.best_state = {k: v.detach().clone() for k, v in trainee.model.state_dict().items()}
            save_checkpoint(
                out_dir / "checkpoint.pt",
                {**checkpoint_meta, "model": progress.best_state, "epoch": epoch, "val_loss": val_loss},
            )
        else:
            progress.bad_epochs += 1
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
            out_dir / "last.pt",
            {
                "model": trainee.model.state_dict(),
                "optimizer": trainee.optimizer.state_dict(),
                "scheduler": trainee.scheduler.state_dict(),
                "grad_scaler": trainee.scaler.state_dict(),
                "batch_rng": trainee.generator.get_state(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state() if device.type == "cuda" else None,
                "history": history.rows,
                "best_epoch": history.best_epoch,
                "best_model": progress.best_state,
                "best_loss": progress.best_loss,
                "bad_epochs": progress.bad_epochs,
                "epoch": epoch,
            },
        )


def should_stop(
    progress: Progress,
    row: dict[str, float],
    settings: Settings,
    on_epoch: Callable[[dict[str, float]], None] | None,
) -> bool:
    """After an epoch: the callback's say (a search's pruner raises `StopTraining`), then early
    stopping on ``patience_epochs`` epochs without a better val/loss."""
    if on_epoch is not None:
        try:
            on_epoch(row)
        except StopTraining as stop:  # ends like an early stop
            progress.history.stopped_early = True
            log.info("training stopped after epoch %d: %s", int(row["epoch"]), stop)
            return True
    if progress.bad_epochs >= settings.patience_epochs:
        progress.history.stopped_early = True
        log.info("early stop: no better val/loss for %d epochs", progress.bad_epochs)
        return True
    return False

"""Clips into padded batches: length buckets for training, cost-balanced length-sorted batches
for inference, and class probabilities of a model over a `SequenceSet`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from mer_cli.core.errors import ConfigError
from mer_cli.models.layers import Frames, padded_length
from mer_cli.preprocess.sequences import SequenceSet, pad_clips
from mer_cli.training.hardware import autocast

log = logging.getLogger(__name__)


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


def epoch_batches(
    lengths: torch.Tensor, settings: BatchSettings, generator: torch.Generator
) -> list[torch.Tensor]:
    """`batch_indices` with the training loop's settings (``trainer.loop``): one epoch's batches
    as mer-train draws them."""
    return batch_indices(
        lengths,
        settings.batch_size,
        generator,
        settings.bucket_by_length,
        settings.bucket_batches,
        settings.bucket_length_jitter,
    )


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


def padding_waste(
    lengths: torch.Tensor, batches: Iterable[torch.Tensor], max_length: int, groups: int = 1
) -> float:
    """Frames computed over real frames, minus 1, for ``batches`` (clip indices into ``lengths``):
    each batch padded as `PadCollate` pads it (its longest clip rounded up to ``layers.PAD_MULTIPLE``,
    at most ``max_length``) or, with ``groups`` > 1, each of its length groups as
    `layers.encode_by_length` cuts it (``trainer.loop.length_groups``). 0: no padding computed."""
    computed, real = 0, 0
    for idx in batches:
        batch = lengths[idx]
        real += int(batch.sum())
        steps = min(max_length, int(padded_length(int(batch.max()))))  # the batch's padded length
        parts = batch.sort(descending=True, stable=True).values.tensor_split(max(1, min(groups, len(batch))))
        computed += sum(len(part) * min(steps, int(padded_length(int(part.max())))) for part in parts)
    return computed / max(real, 1) - 1.0


def epoch_padding_waste(
    lengths: torch.Tensor, settings: BatchSettings, max_length: int, seed: int = 0, epochs: int = 10
) -> float:
    """`padding_waste` of ``epochs`` training epochs' batches as ``settings`` draw them (a fresh
    generator seeded ``seed``), ``settings.length_groups`` groups per batch where it has them."""
    generator = torch.Generator().manual_seed(seed)
    batches = [b for _ in range(epochs) for b in epoch_batches(lengths, settings, generator)]
    return padding_waste(lengths, batches, max_length, int(getattr(settings, "length_groups", 1)))


class BatchSettings(Protocol):
    """What `BucketBatchSampler` reads of the training loop's settings (`loop.Settings`)."""

    @property
    def batch_size(self) -> int: ...
    @property
    def bucket_by_length(self) -> bool: ...
    @property
    def bucket_batches(self) -> int: ...
    @property
    def bucket_length_jitter(self) -> float: ...


class BucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Each epoch's batches from `batch_indices` (length buckets), drawn from ``generator`` when
    an epoch starts: the same seed gives the same batches, and a resumed run (the generator's
    state restored) the batches the interrupted one would have drawn. ``draw_weights``
    (``trainer.sampler=balanced``): the epoch's clips are first drawn with replacement, as many
    as there are, each with probability proportional to its weight, then bucketed the same way."""

    def __init__(
        self,
        lengths: torch.Tensor,
        settings: BatchSettings,
        generator: torch.Generator,
        draw_weights: torch.Tensor | None = None,
    ) -> None:
        self.lengths, self.settings, self.generator = lengths, settings, generator
        self.draw_weights = draw_weights

    def __iter__(self) -> Iterator[list[int]]:
        # a generator: the batches are drawn at the first batch, not when iter() is called (a
        # DataLoader with workers calls it twice for its first epoch and uses the second)
        s = self.settings
        lengths, drawn = self.lengths, None
        if self.draw_weights is not None:
            n = len(self.lengths)
            drawn = torch.multinomial(self.draw_weights, n, replacement=True, generator=self.generator)
            lengths = self.lengths[drawn]
        for b in epoch_batches(lengths, s, self.generator):
            yield (b if drawn is None else drawn[b]).tolist()

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
    to ``layers.PAD_MULTIPLE``, never beyond the stream's target length ``max_lengths[name]``) and the
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


def predict_proba(
    model: nn.Module,
    data: SequenceSet,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    workers: int = 0,
    pin_memory: bool | None = None,
    temperature: float = 1.0,
) -> np.ndarray:
    """Class probabilities (N, C) in ``data``'s order, softmax(logits / ``temperature``); batches
    sorted by length pad least."""
    model.eval()
    batches = inference_batches(data.lengths, batch_size)
    out: list[torch.Tensor] = []
    loader = batch_loader(data, [b.tolist() for b in batches], device, workers, pin_memory)
    with torch.inference_mode(), autocast(device, dtype):
        for batch in loader:
            inputs, _ = to_device(batch, device)
            out.append(torch.softmax(model(inputs).float() / temperature, dim=1).cpu())
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

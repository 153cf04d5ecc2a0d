"""Modality dropout (``trainer.modality_dropout=P``): during training, each clip of a batch, with
probability P, has one whole input stream, chosen uniformly, replaced by zeros.

Input: a training batch (model input name -> (frames (B, T, F), lengths (B,))) after
preprocessing, and the training loop's seeded generator. Output: the same batch with the dropped
streams' frames zeroed and every length kept: zero is the training mean where features are
standardized, as `runs.trained.stream_contribution` blanks a stream to measure what the other
one carries. A model with one encoder per stream (joint, xattn) loses that stream's whole input;
early fusion, whose frames join every stream per frame, loses that stream's columns.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from mer_cli.core.errors import ConfigError
from mer_cli.models.layers import Frames


@dataclass(frozen=True)
class Slot:
    """Where one data stream lies in a batch: the model input ``input``, all of its feature
    columns (``columns`` None) or the columns ``columns[0]:columns[1]`` (early fusion)."""

    stream: str
    input: str
    columns: tuple[int, int] | None = None


def slots(inputs_kind: str, feature_spec: Mapping[str, Any]) -> tuple[Slot, ...]:
    """Each stream's `Slot` for a model whose inputs are made as ``inputs_kind`` says
    (`modalities.INPUT_KINDS`). Early fusion joins the streams' features per frame in the spec's
    stream order (`preprocess.align.early_fuse`), so stream k holds the columns after those of
    streams 0..k-1."""
    streams = feature_spec["streams"]
    inputs = dict(feature_spec["inputs"])
    if len(streams) < 2:
        raise ConfigError(
            f"trainer.modality_dropout: the model reads one stream ({', '.join(streams)}): "
            "there is no other stream to keep"
        )
    if inputs_kind == "streams":
        return tuple(Slot(name, name) for name in streams)
    if inputs_kind != "early" or len(inputs) != 1:
        raise ConfigError(f"trainer.modality_dropout: not for models whose inputs are {inputs_kind!r}")
    (fused, width), start, out = next(iter(inputs.items())), 0, []
    for name, stream in streams.items():
        n = int(stream["n_features"])
        out.append(Slot(name, fused, (start, start + n)))
        start += n
    if start != width:  # the spec and the fused input disagree: no column range can be trusted
        raise ConfigError(
            f"trainer.modality_dropout: the streams' {start} features do not add up to the "
            f"early-fused input's {width}"
        )
    return tuple(out)


class StreamDropout:
    """Zero one whole stream of a clip with probability ``p`` (`Slot` chosen uniformly)."""

    def __init__(self, p: float, stream_slots: tuple[Slot, ...]) -> None:
        self.p, self.slots = p, stream_slots

    def draw(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """(B,) int64: the slot each clip loses, -1 for a clip that keeps every stream (both
        draws from ``generator``: the same seed drops the same streams)."""
        dropped = torch.rand(batch_size, generator=generator) < self.p
        which = torch.randint(len(self.slots), (batch_size,), generator=generator)
        return torch.where(dropped, which, torch.full_like(which, -1))

    def __call__(self, inputs: Mapping[str, Frames], generator: torch.Generator) -> dict[str, Frames]:
        """The batch with each clip's drawn stream zeroed (lengths kept)."""
        batch_size = int(next(iter(inputs.values()))[1].shape[0])
        choice = self.draw(batch_size, generator)
        out = dict(inputs)
        for k, slot in enumerate(self.slots):
            rows = choice == k
            if bool(rows.any()):
                x, lengths = out[slot.input]
                out[slot.input] = (x.masked_fill(self.mask(rows, slot, x), 0.0), lengths)
        return out

    @staticmethod
    def mask(rows: torch.Tensor, slot: Slot, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, F) bool: the frames of ``x`` to zero, the slot's columns in the ``rows`` clips."""
        columns = torch.ones(x.shape[-1], dtype=torch.bool)
        if slot.columns is not None:
            columns = torch.zeros_like(columns)
            columns[slot.columns[0] : slot.columns[1]] = True
        return (rows[:, None, None] & columns[None, None, :]).to(x.device)

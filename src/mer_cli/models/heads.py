"""The single-stream classifier: one encoder and the shared dense head -> class logits (B, C)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import torch
from torch import nn

from mer_cli.models import layer_mix
from mer_cli.models.layers import INITS, Encoder, Frames, check_length_groups, encode_by_length, keras_init_


class Classifier(nn.Module):
    """One stream's encoder, then the head every encoder shares: Dropout -> Dense(d) -> BatchNorm
    -> ReLU -> Dropout -> Dense(d, ReLU) -> Dense(C), the notebook's classifier.

    ``n_features``: ``{stream: features per frame}`` of the one stream this model reads (a run-time
    fact from the data). ``encoder``: builds the encoder from that feature count (a partial from
    the config). ``dense_size`` 512 and ``dropout`` 0.8 are the notebook's sizes. ``init="keras"``
    draws the initial weights as Keras does (`keras_init_`); ``"torch"`` keeps PyTorch's defaults.
    ``batchnorm_momentum`` and ``batchnorm_eps`` are ``nn.BatchNorm1d``'s (PyTorch's momentum is
    the weight of the new batch: Keras' momentum 0.99 is 0.01 here). ``layer_weights``: where the
    stream stores several encoder layers per frame (`layer_mix.layouts`), mixed by learned weights
    before the encoder (`layer_mix.LayerMix`); None reads the frames as they are.
    ``length_groups``: in training, each batch's encoder pass in this many length-sorted groups
    (`layers.encode_by_length`: less padding computed); 1 (default): the whole batch at once.
    """

    def __init__(
        self,
        n_features: Mapping[str, int],
        n_classes: int,
        encoder: Callable[[int], nn.Module],
        dense_size: int = 512,
        dropout: float = 0.8,
        init: str = "torch",
        batchnorm_momentum: float = 0.1,
        batchnorm_eps: float = 1e-5,
        layer_weights: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
        length_groups: int = 1,
    ) -> None:
        super().__init__()
        if len(n_features) != 1:
            raise ValueError(f"a single-stream classifier reads one stream, not {sorted(n_features)}")
        if init not in INITS:
            raise ValueError(f"init {init!r}: valid: {', '.join(INITS)}")
        mixers = layer_mix.mixes(n_features, layer_weights)
        # only a model with layer weights has the submodule: every other state dict is unchanged
        self.layer_mix = mixers.get(next(iter(n_features)))
        ((self.stream, features),) = layer_mix.mixed_features(n_features, mixers).items()
        self.encoder = encoder(features)
        self.length_groups = check_length_groups(length_groups, self.encoder)
        self.dropout = nn.Dropout(dropout)
        self.head = shared_head(
            cast(Encoder, self.encoder).out_features,
            n_classes,
            dense_size,
            dropout,
            batchnorm_momentum,
            batchnorm_eps,
        )
        if init == "keras":
            keras_init_(self)

    def forward(self, inputs: Mapping[str, Frames]) -> torch.Tensor:
        x, lengths = inputs[self.stream]
        if self.layer_mix is not None:
            x = self.layer_mix(x)
        groups = self.length_groups if self.training else 1  # inference batches are length-sorted
        _, pooled = encode_by_length(cast(Encoder, self.encoder), x, lengths, groups, frames=False)
        return self.head(self.dropout(pooled))


def shared_head(
    in_features: int,
    n_classes: int,
    dense_size: int = 512,
    dropout: float = 0.8,
    batchnorm_momentum: float = 0.1,
    batchnorm_eps: float = 1e-5,
) -> nn.Sequential:
    """The head every classifier shares, from a pooled vector (after the input dropout): Dense(d)
    -> BatchNorm -> ReLU -> Dropout -> Dense(d, ReLU) -> Dense(C)."""
    return nn.Sequential(
        nn.Linear(in_features, dense_size),
        nn.BatchNorm1d(dense_size, eps=batchnorm_eps, momentum=batchnorm_momentum),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(dense_size, dense_size),
        nn.ReLU(),
        nn.Linear(dense_size, n_classes),
    )

"""Bidirectional recurrent encoders (LSTM, GRU): frames (B, T, F) -> per-frame features
and a masked-mean pooled vector, exact under padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import nn

from mer_cli.models.layers import FrameDropout, MaskedBiRNN


class BiRNNEncoder(nn.Module):
    """BiRNN(h1, sequences) -> per-frame dropout -> ... -> BiRNN(h_last): the notebook's
    recurrent stack, with LSTM (the notebook's) or GRU cells. Pooled vector: the last layer's
    final states of both directions (2 h_last)."""

    def __init__(
        self,
        n_features: int,
        hidden_sizes: Sequence[int] = (512, 256),
        dropout: float = 0.8,
        masking: str = "reverse",
        cell: str = "lstm",
    ) -> None:
        super().__init__()
        if not hidden_sizes:
            raise ValueError(f"hidden_sizes needs at least one {cell.upper()} size")
        sizes = [n_features] + [2 * h for h in hidden_sizes[:-1]]
        layers = nn.ModuleList(
            MaskedBiRNN(d_in, h, impl=masking, cell=cell) for d_in, h in zip(sizes, hidden_sizes, strict=True)
        )
        self.layers_name = f"{cell}s"  # "lstms": the state-dict names of every LSTM checkpoint
        self.add_module(self.layers_name, layers)
        self.frame_dropout = FrameDropout(dropout)  # between recurrent layers, on every frame
        self.out_features = 2 * hidden_sizes[-1]

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        last_state = x.new_zeros(0)
        layers = cast(nn.ModuleList, self.get_submodule(self.layers_name))
        for i, rnn in enumerate(layers):
            x, last_state = rnn(x, lengths)
            if i < len(layers) - 1:
                x = self.frame_dropout(x)  # per-frame dropout between recurrent layers, as the notebook
        return x, last_state


BiLSTMEncoder = BiRNNEncoder  # configs/model/bilstm*.yaml and checkpoints name it (cell="lstm")

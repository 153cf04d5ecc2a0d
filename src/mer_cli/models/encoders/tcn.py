"""A temporal convolutional encoder (dilated residual Conv1d blocks): frames (B, T, F) ->
per-frame features and a pooled vector, exact under padding.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

from mer_cli.models.layers import FrameDropout, frame_mask, masked_mean

POOLINGS = ("mean", "meanmax")


class TemporalBlock(nn.Module):
    """Residual block of two dilated "same" 1-D convolutions (odd kernel, centred, so a frame sees
    ``(k - 1) * dilation`` frames on each side per conv). Activations are re-zeroed past each
    clip's end after every conv: the next conv then reads zeros there, exactly what it reads
    beyond the end of an unpadded clip. No normalization (BatchNorm would couple the clips)."""

    def __init__(self, d_in: int, d_out: int, kernel_size: int, dilation: int, dropout: float) -> None:
        super().__init__()
        pad = (kernel_size - 1) // 2 * dilation
        self.conv1 = nn.Conv1d(d_in, d_out, kernel_size, dilation=dilation, padding=pad)
        self.conv2 = nn.Conv1d(d_out, d_out, kernel_size, dilation=dilation, padding=pad)
        self.residual = nn.Conv1d(d_in, d_out, 1) if d_in != d_out else nn.Identity()
        self.dropout = FrameDropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x`` (B, F, T), zero past each clip's end; ``mask`` (B, 1, T)."""
        y = self.dropout(torch.relu(self.conv1(x) * mask))
        y = self.dropout(torch.relu(self.conv2(y) * mask))
        return torch.relu(y + self.residual(x) * mask)


class TCNEncoder(nn.Module):
    """Temporal convolutional network: one residual `TemporalBlock` per ``hidden_sizes`` entry
    (its channels), dilation 1, 2, 4, ... Per-frame outputs are zero past each clip's length;
    pooled vector: the mean over real frames (``pooling="meanmax"``: mean and max, 2x wide)."""

    def __init__(
        self,
        n_features: int,
        hidden_sizes: Sequence[int] = (64, 64, 64),
        kernel_size: int = 3,
        dropout: float = 0.1,
        pooling: str = "mean",
    ) -> None:
        super().__init__()
        if not hidden_sizes:
            raise ValueError("hidden_sizes needs at least one block's channels")
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size {kernel_size}: odd, so the convolutions are centred")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling {pooling!r}: valid: {', '.join(POOLINGS)}")
        sizes = [n_features, *hidden_sizes]
        self.blocks = nn.ModuleList(
            TemporalBlock(d_in, d_out, kernel_size, 2**i, dropout)
            for i, (d_in, d_out) in enumerate(itertools.pairwise(sizes))
        )
        self.pooling = pooling
        self.out_features = hidden_sizes[-1] * (2 if pooling == "meanmax" else 1)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = frame_mask(lengths, x.shape[1]).to(x.dtype)  # (B, T, 1)
        h = torch.where(mask.bool(), x, 0.0).transpose(1, 2)  # (B, F, T); garbage padding zeroed
        mask_t = mask.transpose(1, 2)
        for block in self.blocks:
            h = block(h, mask_t)
        out = h.transpose(1, 2)  # (B, T, H), zero past each clip's end
        pooled = masked_mean(out, mask)
        if self.pooling == "meanmax":
            # activations are >= 0 after the ReLU, so zeros in the padding never win a max over a
            # clip with at least one frame
            pooled = torch.cat([pooled, out.amax(dim=1)], dim=1)
        return out, pooled

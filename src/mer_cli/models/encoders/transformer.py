"""A Transformer encoder with sinusoidal positions and key padding masks: frames (B, T, F)
-> per-frame features and a pooled vector, exact under padding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from mer_cli.models.layers import frame_mask, masked_mean


def sinusoidal_positions(steps: int, dim: int, device: torch.device) -> torch.Tensor:
    """(T, dim) sine/cosine position codes of "Attention is all you need" (any ``dim``)."""
    pos = torch.arange(steps, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    codes = torch.zeros(steps, dim, device=device)
    codes[:, 0::2] = torch.sin(pos * freq)
    codes[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return codes


class MaskedSelfAttentionLayer(nn.Module):
    """Pre-norm transformer layer: x + MHA(LN(x)), then x + FF(LN(x)). Padded keys are never
    attended (a key-padding mask in ``scaled_dot_product_attention``). ``dropout``: on the
    residual branches and inside the feed-forward; ``attention_dropout``: on the attention weights.
    Any attention dropout makes PyTorch's CPU attention take its unfused path, which materializes
    every (frames x frames) score matrix: 7x slower per layer at 356 frames here, and GiBs of
    memory (docs/benchmarks.md), hence 0 by default."""

    def __init__(
        self, dim: int, heads: int, ff_size: int, dropout: float, attention_dropout: float = 0.0
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"model width {dim} is not a multiple of heads={heads}")
        self.heads = heads
        self.attention_dropout = attention_dropout
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(
            nn.Linear(dim, ff_size), nn.GELU(), nn.Dropout(dropout), nn.Linear(ff_size, dim)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """``x`` (B, T, D); ``key_mask`` (B, 1, 1, T) bool, True at real frames."""
        batch, steps, dim = x.shape
        q, k, v = (
            self.qkv(self.norm1(x))
            .view(batch, steps, 3, self.heads, dim // self.heads)
            .permute(2, 0, 3, 1, 4)
        )
        att = nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=key_mask, dropout_p=self.attention_dropout if self.training else 0.0
        )
        x = x + self.drop(self.proj(att.transpose(1, 2).reshape(batch, steps, dim)))
        return x + self.drop(self.ff(self.norm2(x)))


class TransformerEncoder(nn.Module):
    """Linear projection to the model width + sinusoidal positions -> N pre-norm layers of masked
    self-attention and feed-forward -> LayerNorm. ``hidden_sizes``: the model width of each layer
    (one entry per layer, all equal: attention layers keep their width); ``heads`` divides it;
    the feed-forward is ``ff_mult`` x wider; ``dropout`` and ``attention_dropout`` as in
    ``MaskedSelfAttentionLayer``. Per-frame outputs are zero past each clip's length; pooled
    vector: their mean over the clip's real frames."""

    def __init__(
        self,
        n_features: int,
        hidden_sizes: Sequence[int] = (64, 64),
        heads: int = 4,
        ff_mult: int = 2,
        dropout: float = 0.1,
        attention_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not hidden_sizes or len(set(hidden_sizes)) != 1:
            raise ValueError(f"hidden_sizes {list(hidden_sizes)}: one equal width per transformer layer")
        dim = hidden_sizes[0]
        self.input_proj = nn.Linear(n_features, dim)
        self.layers = nn.ModuleList(
            MaskedSelfAttentionLayer(dim, heads, ff_mult * dim, dropout, attention_dropout)
            for _ in hidden_sizes
        )
        self.input_dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)
        self.out_features = dim

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        steps = x.shape[1]
        mask = frame_mask(lengths, steps)
        # padded frames are zeroed first: garbage there (even inf/nan) never reaches a real frame
        x = self.input_proj(torch.where(mask.bool(), x, 0.0))
        x = self.input_dropout(x + sinusoidal_positions(steps, x.shape[2], x.device).to(x.dtype))
        # a clip of length 0 attends its first frame, so no softmax row is empty
        key_mask = (torch.arange(steps, device=x.device)[None, :] < lengths.clamp(min=1)[:, None])[
            :, None, None
        ]
        for layer in self.layers:
            x = layer(x, key_mask)
        out = self.norm(x) * mask.to(x.dtype)
        return out, masked_mean(out, mask.to(out.dtype))

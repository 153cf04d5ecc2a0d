"""Cross-modal attention (MulT-style): each stream attends to the other before pooling."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, cast

import torch
from torch import nn
from torch.nn import functional as F

from mer_cli.models.fusion.streams import MultiStreamClassifier
from mer_cli.models.layers import Encoded, Encoder, frame_mask, masked_mean


class CrossAttention(nn.Module):
    """One stream's frames attending to another's (MulT-style): queries from ``query``'s frames,
    keys and values from ``context``'s, masked by the context's lengths; residual and LayerNorm.
    Output (B, T_query, d_model) for every query frame (padded query frames are garbage: pool
    them away with their lengths)."""

    def __init__(self, query_size: int, context_size: int, d_model: int, heads: int) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"attention size {d_model} is not divisible by {heads} heads")
        self.heads = heads
        self.q = nn.Linear(query_size, d_model)
        self.kv = nn.Linear(context_size, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)

    def forward(
        self, query: torch.Tensor, context: torch.Tensor, context_lengths: torch.Tensor
    ) -> torch.Tensor:
        b, t_q, _ = query.shape
        q = self.q(query)
        k, v = self.kv(context).chunk(2, dim=-1)

        def split(x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, heads, T, D / heads)
            return x.view(b, x.shape[1], self.heads, -1).transpose(1, 2)

        # True: attend; a clip's padded context frames are never attended to
        keep = torch.arange(context.shape[1], device=context.device)[None, :] < context_lengths[:, None]
        att = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=keep[:, None, None, :])
        att = att.transpose(1, 2).reshape(b, t_q, -1)
        return self.norm(q + self.out(att))


class CrossAttentionClassifier(MultiStreamClassifier):
    """``modality=xattn``: two streams, each encoded, then each attends to the other
    (`CrossAttention`: queries from one, keys and values from the other), a masked mean over each
    cross-attended sequence's own frames, concatenated, the shared head. No interpolation: the
    streams keep their frame rates. ``attention_heads`` splits the attention size (each stream's
    encoder output size)."""

    needs_frames = True

    def __init__(
        self,
        n_features: Mapping[str, int],
        n_classes: int,
        encoder: Callable[[int], nn.Module],
        attention_heads: int = 4,
        **kwargs: Any,
    ) -> None:
        self.attention_heads = attention_heads  # before the base class builds the fusion layers
        super().__init__(n_features, n_classes, encoder, **kwargs)

    def build_fusion(self) -> dict[str, int]:
        if len(self.streams) != 2:
            raise ValueError(f"cross-modal attention reads exactly two streams, not {self.streams}")
        sizes = {s: cast(Encoder, self.encoders[s]).out_features for s in self.streams}
        a, b = self.streams
        self.attend = nn.ModuleDict(
            {
                s: CrossAttention(sizes[s], sizes[o], sizes[s], self.attention_heads)
                for s, o in ((a, b), (b, a))
            }
        )
        return sizes

    def pool(self, encoded: Mapping[str, Encoded]) -> dict[str, torch.Tensor]:
        a, b = self.streams
        out = {}
        for s, o in ((a, b), (b, a)):
            frames, _, lengths = encoded[s]
            attended = self.attend[s](frames, encoded[o][0], encoded[o][2])
            # attended padded queries are not zero: zero them, then the encoders' masked mean
            mask = frame_mask(lengths, attended.shape[1]).to(attended.dtype)
            out[s] = masked_mean(torch.where(mask.bool(), attended, 0.0), mask)
        return out

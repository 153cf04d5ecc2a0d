"""The fitted preprocessing as torch modules on padded batches, for an exported graph: the same
numbers as the clip-by-clip numpy path (`sequences`, `scaling`, `align`), checked side by side in
the tests. Input: frames (B, T, F) zero-padded past each clip's length (B,); output: the same,
cut, scaled or fused.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from mer_cli.preprocess import scaling, sequences


class StreamPreprocess(nn.Module):
    """One stream's fitted preprocessing: cut to ``length`` frames (the start kept) and, with a
    scaler, its `scaling.Scaler.transform` in float64 then float32 (the same numbers): signed-log
    compression for ``signed_log`` and ``signed_log_per_clip``, then ``(x - center) / scale``,
    where ``per_clip`` and ``signed_log_per_clip`` take center and scale from each clip's own
    frames; frames past each clip's length are zeroed, as `sequences.Ragged.pad` pads."""

    center: torch.Tensor  # (F,) float64 buffers; empty without a fitted scaler
    scale: torch.Tensor

    def __init__(self, prep: sequences.StreamPrep) -> None:
        super().__init__()
        self.length = prep.target.length
        self.skip_zero_frames = prep.skip_zero_frames
        self.kind = prep.scaler.kind if prep.scaler is not None else "none"
        fitted = prep.scaler is not None and prep.scaler.center is not None
        center = prep.scaler.center if fitted else np.zeros(0)  # type: ignore[union-attr]
        scale = prep.scaler.scale if fitted else np.ones(0)  # type: ignore[union-attr]
        self.register_buffer("center", torch.from_numpy(np.asarray(center, dtype=np.float64)))
        self.register_buffer("scale", torch.from_numpy(np.asarray(scale, dtype=np.float64)))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x[:, : self.length]
        lengths = lengths.clamp(max=self.length)
        keep = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]  # (B, T)
        if self.skip_zero_frames:
            x, lengths, keep = self._drop_zero_frames(x, keep)
        if self.kind != "none":
            v = x.double()
            if self.kind in scaling.LOG_KINDS:
                v = torch.sign(v) * torch.log1p(v.abs())
            if self.kind in scaling.PER_CLIP_KINDS:  # each clip's own mean and std over its real frames
                mask = keep[:, :, None].double()
                n = lengths.clamp(min=1).double()[:, None, None]
                center = (v * mask).sum(dim=1, keepdim=True) / n
                std = ((((v - center) * mask) ** 2).sum(dim=1, keepdim=True) / n).sqrt()
                scale = torch.where(std >= scaling.MIN_SPREAD, std, torch.ones_like(std))
                x = ((v - center) / scale).float()
            else:
                x = ((v - self.center) / self.scale).float()
        return torch.where(keep[:, :, None], x, torch.zeros_like(x)), lengths

    @staticmethod
    def _drop_zero_frames(
        x: torch.Tensor, keep: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`sequences.drop_zero_frames` on a padded batch: each clip's frames that are not all 0
        moved to its start, in order (a clip with none keeps its first frame)."""
        kept = keep & (x != 0).any(dim=2)  # (B, T)
        first = torch.zeros_like(kept)
        first[:, 0] = True
        kept = kept | (first & ~kept.any(dim=1, keepdim=True))
        steps = x.shape[1]
        # frame t goes to position (kept frames up to t) - 1; dropped frames to a spare slot
        slot = torch.where(
            kept, kept.long().cumsum(dim=1) - 1, torch.full_like(kept, steps, dtype=torch.long)
        )
        out = torch.zeros(x.shape[0], steps + 1, x.shape[2], dtype=x.dtype, device=x.device)
        out = out.scatter(1, slot[:, :, None].expand(-1, -1, x.shape[2]), x)[:, :steps]
        lengths = kept.long().sum(dim=1)
        return out, lengths, torch.arange(steps, device=x.device)[None, :] < lengths[:, None]


class EarlyFuse(nn.Module):
    """`align.early_fuse` on a padded batch: each clip's second stream stretched linearly to its
    first stream's frame count (first and last frames kept), joined per frame. The sample
    positions are computed in float64 and the weights rounded to float32 as `align.stretch_frames`
    does, so the fused frames are the same numbers."""

    def forward(
        self, xa: torch.Tensor, la: torch.Tensor, xv: torch.Tensor, lv: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # frame i of a clip samples the second stream at i * (T_v - 1) / (T_a - 1); a one-frame
        # clip on either side gives ratio 0 or a single frame: its first frame repeated
        ratio = (lv - 1).double() / (la - 1).clamp(min=1).double()  # (B,)
        pos = torch.arange(xa.shape[1], device=xa.device).double()[None, :] * ratio[:, None]  # (B, T_a)
        last = (lv - 1)[:, None]
        lo = torch.minimum(pos.floor().long(), last)  # past a clip's end: its last frame (masked later)
        hi = torch.minimum(lo + 1, last)
        w = (pos - lo.double()).float()[:, :, None]
        n_v = xv.shape[2]
        low = xv.gather(1, lo[:, :, None].expand(-1, -1, n_v))
        high = xv.gather(1, hi[:, :, None].expand(-1, -1, n_v))
        return torch.cat([xa, low * (1 - w) + high * w], dim=2), la

"""An InceptionTime-style 1-D CNN encoder: frames (B, T, F) -> per-frame features (B, T, H) and
the mean over each clip's real frames (B, H), exact under padding.

Why InceptionTime (Ismail Fawaz et al., "InceptionTime: Finding AlexNet for time series
classification", 2020) and not the FCN/ResNet of Wang et al. (2017): on the UCR archive it was
ahead of that ResNet, and its receptive field suits clips of ~100-1000 frames: six modules with
kernels up to 39 frames see 1 + 6 x 38 = 229 frames (2.3 s at 100 frames/s), where the ResNet's
nine convolutions of 8/5/3 see 40. The 1x1 bottleneck in front of the long kernels keeps that
cheap: at width 64 (the paper's 128 halved) 1.6x the default TCN's multiply-adds per frame, though
3-4x its training time on a CPU (long kernels over 16 channels run far below oneDNN's peak).
One network, not the paper's ensemble of five; kernels 9/19/39 (the paper's 10/20/40 less one)
so that "same" padding is centred, as a clip alone would be padded. On the embedded data it is
the zoo's best single-stream encoder and behind the TCN in early fusion (docs/results.md).

Exact under padding, in every step: activations are zeroed past each clip's end before every
convolution and the max-pool, and both pad with zeros, so at a clip's last frames they read
exactly the zeros the clip alone would read; normalisation statistics never include padded
frames (`MaskedBatchNorm1d`, or ``norm="layer"``: per frame); pooling averages real frames only.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from mer_cli.models.layers import frame_mask, masked_mean

NORMS = ("batch", "layer")


class _MaskedNorm(torch.autograd.Function):
    """Normalisation by the real frames' statistics, on torch's fused batch-norm kernels.

    Autograd through masked sums made about a dozen broadcast passes over (B, C, T) per call (5x
    ``nn.BatchNorm1d``'s fused kernels: inception's training step was slower than one with
    ``nn.BatchNorm1d``). With the padded frames zeroed, torch's kernels over the whole batch give
    sums over the real frames, from which the real frames' statistics follow; the forward
    normalises with them (torch's kernel, eval form), and the backward is torch's batch-norm
    backward, whose mean terms divide by all B * T frames, plus the per-channel correction to
    the real frames' count.

    forward(x (B, C, T), mask (B, 1, T), weight (C,) or None, bias (C,) or None, eps) ->
    (y (B, C, T) in x's dtype, mean (C,), var (C,), n): statistics in float32 (or x's wider
    dtype); padded frames of y are garbage (the caller zeroes them); no gradient reaches a padded
    frame, and a padded frame's incoming gradient is ignored. The variance comes from the mean
    square less the squared mean: its rounding error grows as (mean / std)^2 x 6e-8 in float32,
    below 1e-3 relative unless a channel's mean is over a hundred of its standard deviations."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        mask: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.autocast(x.device.type, enabled=False):
            m = mask.to(x.dtype)
            zeroed = x * m
            frames = x.shape[0] * x.shape[2]  # every frame of the batch, padded ones included
            stats = torch.promote_types(x.dtype, torch.float32)
            n = mask.sum(dtype=stats)
            count = n.clamp(min=1.0)
            # all frames' mean and variance, padded zeros included: float32 under bf16 (torch's
            # kernel keeps its statistics in the dtype of its weight)
            ones = torch.ones(x.shape[1], dtype=stats, device=x.device)
            _, mean_all, rstd_all = torch.native_batch_norm(zeroed, ones, None, None, None, True, 0.0, 0.0)
            var_all = rstd_all.pow(-2)
            # the real frames': sums over all frames are sums over the real ones
            mean = mean_all * (frames / count)
            var = ((var_all + mean_all.square()) * (frames / count) - mean.square()).clamp(min=0.0)
            y = F.batch_norm(x, mean, var, weight, bias, training=False, eps=eps)
        rstd = torch.rsqrt(var + eps)
        ctx.save_for_backward(zeroed, m, weight, mean, rstd, count)  # type: ignore[arg-type]
        ctx.frames = frames  # type: ignore[attr-defined]
        ctx.mark_non_differentiable(mean, var, n)
        return y, mean, var, n

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_y: torch.Tensor, *_: torch.Tensor
    ) -> tuple[torch.Tensor | None, None, torch.Tensor | None, torch.Tensor | None, None]:
        zeroed, m, weight, mean, rstd, count = ctx.saved_tensors  # type: ignore[attr-defined]
        frames = ctx.frames  # type: ignore[attr-defined]
        with torch.autocast(zeroed.device.type, enabled=False):
            g = grad_y.to(zeroed.dtype) * m  # padded frames take no part
            w = weight if weight is not None else torch.ones_like(mean)  # float: float32 sums
            # torch's backward over all frames: scale * (g - sum(g) / frames - x_hat * sum(g x_hat)
            # / frames), and the sums of g and g * x_hat (grad_bias, grad_weight) over real frames
            grad_all, sum_gxhat, sum_g = torch.ops.aten.native_batch_norm_backward(
                g, zeroed, w, None, None, mean, rstd, True, 0.0, [True, True, True]
            )
            # the mean terms over the real frames instead:
            # - scale * (sum(g) + x_hat * sum(g x_hat)) * (1/n - 1/frames), affine in x per channel
            less = 1.0 / count - 1.0 / frames
            scale = w.to(rstd.dtype) * rstd
            slope = -(scale * rstd * sum_gxhat * less)  # times x
            shift = -(scale * sum_g * less) - slope * mean
            dt = zeroed.dtype  # the correction in x's dtype: mixed-dtype passes cost 2x
            correction = torch.addcmul(shift.to(dt)[None, :, None], zeroed, slope.to(dt)[None, :, None])
            grad_x = (grad_all + correction) * m
        needs = ctx.needs_input_grad  # type: ignore[attr-defined]
        needs_w, needs_b = weight is not None and needs[2], needs[3]
        grad_w = sum_gxhat.to(weight.dtype) if needs_w and weight is not None else None
        return grad_x.to(grad_y.dtype), None, grad_w, sum_g if needs_b else None, None


class MaskedBatchNorm1d(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` over channels whose training statistics (and so its running ones) are
    those of the real frames alone: exactly ``nn.BatchNorm1d`` on the batch's real frames stacked
    as one (frames, C) batch. In eval mode it is the same per-frame affine map as
    ``nn.BatchNorm1d``. Same parameters, buffers and state-dict names; ``momentum`` must be a
    number (no cumulative average)."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (B, C, T); ``mask`` (B, 1, T), 1 at real frames. Padded frames come out as
        garbage: the caller zeroes them."""
        if mask is None or not self.training:
            return super().forward(x)
        if self.momentum is None:
            raise ValueError("MaskedBatchNorm1d needs a momentum (the cumulative average is not kept)")
        weight, bias = (self.weight, self.bias) if self.affine else (None, None)
        y, mean, var, n = _MaskedNorm.apply(x, mask, weight, bias, self.eps)
        if self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():  # torch's update: the running variance is the unbiased one
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var * n / (n - 1.0).clamp(min=1.0), self.momentum)
                if self.num_batches_tracked is not None:
                    self.num_batches_tracked.add_(1)
        return y


class FrameLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of each frame of (B, C, T): one frame's statistics, never
    another frame's or clip's, so it is exact under padding in training too."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


def build_norm(norm: str, channels: int) -> nn.Module:
    """The normalisation ``norm`` names, for ``channels``; called as ``module(x, mask)``."""
    if norm == "batch":
        return MaskedBatchNorm1d(channels)
    if norm == "layer":
        return FrameLayerNorm(channels)
    raise ValueError(f"norm {norm!r}: valid: {', '.join(NORMS)}")


class _MaxOfThree(torch.autograd.Function):
    """The max over each frame and its two neighbours of an already padded (B, C, T + 2) input,
    as ``F.max_pool1d(kernel_size=3, stride=1)`` gives it, gradient included (to the first of
    tied maxima, as torch's). torch's CPU max-pool forward scans each window with an index kept
    per element: 14 ms for 128 clips x 64 channels x 300 frames, against about 3 ms here for two
    element-wise maxima and the winners' indices; the backward is torch's own max-pool kernel."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, padded: torch.Tensor) -> torch.Tensor:
        left, centre, right = padded[..., :-2], padded[..., 1:-1], padded[..., 2:]
        first_two = torch.maximum(left, centre)
        out = torch.maximum(first_two, right)
        if ctx.needs_input_grad[0]:  # type: ignore[attr-defined]
            # each output's winner as an index into its padded row: t, t + 1 or t + 2
            # 2 where the right one wins, else 1 where the centre beats the left (ties: earlier)
            offset = torch.maximum((centre > left).to(torch.uint8), (right > first_two).to(torch.uint8) * 2)
            frames = torch.arange(out.shape[-1], device=out.device)
            ctx.save_for_backward(padded, frames + offset)
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor) -> torch.Tensor:
        padded, winners = ctx.saved_tensors  # type: ignore[attr-defined]
        grad = torch.ops.aten.max_pool2d_with_indices_backward(
            grad_out.unsqueeze(2),
            padded.unsqueeze(2),
            [1, 3],
            [1, 1],
            [0, 0],
            [1, 1],
            False,
            winners.unsqueeze(2),
        )
        return grad.squeeze(2)


def max_pool_same(x: torch.Tensor) -> torch.Tensor:
    """Max over each frame and its two neighbours (B, C, T) -> (B, C, T), zeros beyond both ends
    (not torch's -inf padding: past a clip's end a padded batch holds zeros, so a clip alone must
    read zeros there too)."""
    padded = F.pad(x, (1, 1))
    exporting = torch.jit.is_tracing() or torch.compiler.is_compiling()  # graphs keep torch's op
    if exporting or not (torch.is_grad_enabled() and x.requires_grad):  # no winners to keep
        return F.max_pool1d(padded, kernel_size=3, stride=1)
    return _MaxOfThree.apply(padded)


class InceptionModule(nn.Module):
    """A 1x1 bottleneck (when the input has more than one channel), then parallel "same"
    convolutions of each kernel size, plus a branch of a 3-frame max-pool of the input and a 1x1
    convolution; the branches (``width / branches`` channels each) concatenated, normalised,
    ReLU. Convolutions have no bias: the normalisation's shift is the bias."""

    def __init__(
        self, d_in: int, width: int, kernel_sizes: Sequence[int], bottleneck: int, norm: str
    ) -> None:
        super().__init__()
        branch = width // (len(kernel_sizes) + 1)
        self.bottleneck = nn.Conv1d(d_in, bottleneck, 1, bias=False) if d_in > 1 else nn.Identity()
        d_conv = bottleneck if d_in > 1 else d_in
        self.convs = nn.ModuleList(
            nn.Conv1d(d_conv, branch, k, padding=k // 2, bias=False) for k in kernel_sizes
        )
        self.pool_conv = nn.Conv1d(d_in, branch, 1, bias=False)
        self.norm = build_norm(norm, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x`` (B, C, T), zero past each clip's end; ``mask`` (B, 1, T). Returns (B, width, T),
        zero past each clip's end."""
        b = self.bottleneck(x) * mask
        branches = [conv(b) for conv in self.convs] + [self.pool_conv(max_pool_same(x))]
        # padded frames of y are garbage: both norms ignore them, and they are zeroed after
        return torch.relu(self.norm(torch.cat(branches, dim=1), mask)) * mask


class Shortcut(nn.Module):
    """InceptionTime's residual connection: 1x1 convolution of a group's input, normalised."""

    def __init__(self, d_in: int, d_out: int, norm: str) -> None:
        super().__init__()
        self.conv = nn.Conv1d(d_in, d_out, 1, bias=False)
        self.norm = build_norm(norm, d_out)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x), mask) * mask


class InceptionEncoder(nn.Module):
    """InceptionTime: one `InceptionModule` per ``hidden_sizes`` entry (its width: a multiple of
    ``len(kernel_sizes) + 1``, the branches), a `Shortcut` around every ``residual_every``
    modules (the last group may be shorter: the smoke run's two modules keep one), then the
    mean over each clip's real frames.

    ``kernel_sizes``: odd (centred "same" convolutions). ``bottleneck_size``: the 1x1
    bottleneck's channels (None: one branch's width, as the paper's 32 and 32).
    ``norm``: ``batch`` (InceptionTime's BatchNorm, with statistics of real frames only:
    `MaskedBatchNorm1d`; in training, like any batch norm, a clip's output depends on the rest of
    its batch, never on the padding) or ``layer`` (per-frame LayerNorm over channels: no batch
    statistics, so a clip's output is its own in training too, and at batch size 1). ``batch``
    is the default: the paper's, and ahead on the embedded data's visual stream (test macro F1
    64.1 % against 61.1 %, three seeds); in eval mode both are per-frame maps, exact either way.
    """

    def __init__(
        self,
        n_features: int,
        hidden_sizes: Sequence[int] = (64, 64, 64, 64, 64, 64),
        kernel_sizes: Sequence[int] = (9, 19, 39),
        bottleneck_size: int | None = None,
        residual_every: int = 3,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        branches = len(kernel_sizes) + 1
        if not hidden_sizes:
            raise ValueError("hidden_sizes needs at least one inception module's width")
        if not kernel_sizes or any(k < 1 or k % 2 == 0 for k in kernel_sizes):
            raise ValueError(f"kernel_sizes {list(kernel_sizes)}: odd, so the convolutions are centred")
        if any(h % branches or h < branches for h in hidden_sizes):
            raise ValueError(
                f"hidden_sizes {list(hidden_sizes)}: each a multiple of {branches} "
                f"({len(kernel_sizes)} convolution branches and the max-pool branch)"
            )
        if residual_every < 1:
            raise ValueError(f"residual_every={residual_every}: at least 1")
        if norm not in NORMS:
            raise ValueError(f"norm {norm!r}: valid: {', '.join(NORMS)}")
        sizes = [n_features, *hidden_sizes]
        self.blocks = nn.ModuleList(
            InceptionModule(d_in, d_out, kernel_sizes, bottleneck_size or d_out // branches, norm)
            for d_in, d_out in itertools.pairwise(sizes)
        )
        # shortcut g spans modules [g * every, (g + 1) * every): from its first input to its last output
        starts = range(0, len(hidden_sizes), residual_every)
        self.shortcuts = nn.ModuleList(
            Shortcut(sizes[s], sizes[min(s + residual_every, len(hidden_sizes))], norm) for s in starts
        )
        self.residual_every = residual_every
        self.out_features = hidden_sizes[-1]
        self.couples_clips = norm == "batch"  # training statistics over the batch (layers.encode_by_length)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = frame_mask(lengths, x.shape[1]).to(x.dtype)  # (B, T, 1)
        h = torch.where(mask.bool(), x, 0.0).transpose(1, 2)  # (B, F, T); garbage (nan too) zeroed
        mask_t = mask.transpose(1, 2)
        group_input = h
        for i, module in enumerate(self.blocks):
            h = module(h, mask_t)
            if (i + 1) % self.residual_every == 0 or i == len(self.blocks) - 1:
                h = torch.relu(h + self.shortcuts[i // self.residual_every](group_input, mask_t))
                group_input = h
        out = h.transpose(1, 2)  # (B, T, H), zero past each clip's end
        return out, masked_mean(out, mask)

"""Multi-stream classifiers: one encoder per stream, each at its own frame rate, their
pooled vectors joined by a fusion and the shared head; OGM gradient modulation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import torch
from torch import nn

from mer_cli.models import layer_mix
from mer_cli.models.heads import shared_head
from mer_cli.models.layers import (
    INITS,
    Encoded,
    Encoder,
    Frames,
    check_length_groups,
    encode_by_length,
    keras_init_,
)


def ogm_coefficients(scores: Mapping[str, torch.Tensor], alpha: float) -> dict[str, float]:
    """OGM's gradient coefficient per stream from its contribution score (Peng et al., CVPR 2022).

    ``scores``: each stream's summed softmax probability of the true class over the batch. A
    stream's ratio is its score over the mean score of the other streams (two streams: the
    paper's ratio); a dominant stream (ratio > 1) gets ``1 - tanh(alpha * (ratio - 1))``, every
    other stream 1. The paper's Eq. 10 and the authors' code use ``1 - tanh(alpha * ratio)``
    instead: a jump at ratio 1, where a stream only just ahead is already slowed by
    ``1 - tanh(alpha)``; with ``- 1`` the coefficient grows continuously from 1.
    """
    names = list(scores)
    if len(names) < 2:
        raise ValueError("gradient modulation needs at least two streams")
    out = {}
    for s in names:
        others = torch.stack([scores[o] for o in names if o != s]).mean()
        ratio = float(scores[s] / others.clamp(min=1e-12))
        out[s] = 1.0 - torch.tensor(alpha * max(0.0, ratio - 1.0), dtype=torch.float64).tanh().item()
    return out


class MultiStreamClassifier(nn.Module):
    """Several streams, each at its own frame rate (no interpolation): one encoder per stream,
    built from the same ``encoder`` partial, one pooled vector per stream, concatenated in the
    order of ``n_features``, then the head every classifier shares (`shared_head`), trained end
    to end. Subclasses choose how a stream's pooled vector is made (`pool`).

    ``ogm_alpha``: None (default) trains as usual; a float turns on OGM gradient modulation
    (`modulate_gradients`, called by the training loop between backward and the optimizer step).
    ``ogm_noise``: also add OGM-GE's Gaussian noise to the encoders' gradients.
    ``layer_weights``: the streams that store several encoder layers per frame
    (`layer_mix.layouts`), each mixed by its learned weights before its encoder.
    ``length_groups``: in training, each stream's encoder pass in this many groups sorted by that
    stream's lengths (`layers.encode_by_length`); 1 (default): the whole batch at once.
    """

    needs_frames = False  # does `pool` read the per-frame features (else the pooled vectors only)

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
        ogm_alpha: float | None = None,
        ogm_noise: bool = False,
        layer_weights: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
        length_groups: int = 1,
    ) -> None:
        super().__init__()
        if len(n_features) < 2:
            raise ValueError(f"a multi-stream classifier reads two streams or more, not {sorted(n_features)}")
        if init not in INITS:
            raise ValueError(f"init {init!r}: valid: {', '.join(INITS)}")
        if ogm_alpha is not None and ogm_alpha < 0:
            raise ValueError(f"ogm_alpha={ogm_alpha}: must be >= 0 (or None: no modulation)")
        self.streams = list(n_features)
        mixers = layer_mix.mixes(n_features, layer_weights)
        # only a model with layer weights has the submodule: every other state dict is unchanged
        self.layer_mix = nn.ModuleDict(mixers) if mixers else None
        self.encoders = nn.ModuleDict(
            {s: encoder(f) for s, f in layer_mix.mixed_features(n_features, mixers).items()}
        )
        for e in self.encoders.values():  # each stream's encoder may refuse groups (batch norm)
            check_length_groups(length_groups, e)
        self.length_groups = length_groups
        self.pooled_sizes = self.build_fusion()
        self.dropout = nn.Dropout(dropout)
        self.head = shared_head(
            sum(self.pooled_sizes.values()), n_classes, dense_size, dropout, batchnorm_momentum, batchnorm_eps
        )
        self.ogm_alpha = ogm_alpha
        self.ogm_noise = ogm_noise
        self.last_coefficients: dict[str, float] = {}
        self._pooled: dict[str, torch.Tensor] = {}  # the last training batch's, for OGM only
        if init == "keras":
            keras_init_(self)

    def build_fusion(self) -> dict[str, int]:
        """Build any layers between encoders and head; return each stream's pooled size."""
        return {s: cast(Encoder, self.encoders[s]).out_features for s in self.streams}

    def pool(self, encoded: Mapping[str, Encoded]) -> dict[str, torch.Tensor]:
        """Each stream's pooled vector from every stream's (per-frame, pooled, lengths)."""
        return {s: encoded[s][1] for s in self.streams}

    def pooled(self, inputs: Mapping[str, Frames]) -> dict[str, torch.Tensor]:
        encoded = {}
        for s in self.streams:
            x, lengths = inputs[s]
            if self.layer_mix is not None and s in self.layer_mix:
                x = self.layer_mix[s](x)
            groups = self.length_groups if self.training else 1  # inference batches are length-sorted
            encoder = cast(Encoder, self.encoders[s])
            frames, pooled = encode_by_length(encoder, x, lengths, groups, frames=self.needs_frames)
            encoded[s] = (frames, pooled, lengths)
        return self.pool(encoded)

    def forward(self, inputs: Mapping[str, Frames]) -> torch.Tensor:
        pooled = self.pooled(inputs)
        if self.training and self.ogm_alpha is not None:  # read after backward, outside autocast
            self._pooled = {s: p.detach().float() for s, p in pooled.items()}
        return self.head(self.dropout(torch.cat([pooled[s] for s in self.streams], dim=1)))

    def stream_scores(self, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each stream's contribution to the last training batch: the summed softmax probability
        of the true class when the head sees that stream's pooled vector and zeros for the others
        (head in eval mode, no gradient: running statistics untouched, no dropout)."""
        was_training = self.head.training
        self.head.eval()
        try:
            with torch.no_grad():
                scores = {}
                for s in self.streams:
                    parts = [p if o == s else torch.zeros_like(p) for o, p in self._pooled.items()]
                    prob = torch.softmax(self.head(torch.cat(parts, dim=1)).float(), dim=1)
                    scores[s] = prob.gather(1, y[:, None]).sum()
        finally:
            self.head.train(was_training)
        return scores

    def modulate_gradients(self, inputs: Mapping[str, Frames], y: torch.Tensor) -> None:
        """OGM(-GE), after backward and before the optimizer step: the encoder of the stream that
        dominates this batch has its gradients scaled by its coefficient (`ogm_coefficients`);
        with ``ogm_noise``, every encoder gradient also gets Gaussian noise of its own standard
        deviation (GE). Nothing when ``ogm_alpha`` is None. Unlike the authors' code (which
        modulates only convolution kernels, within an epoch range), every parameter of an
        encoder is modulated, in every epoch; the head, the cross-attention layers and learned layer
        weights never."""
        if self.ogm_alpha is None or not self._pooled:
            return
        self.last_coefficients = ogm_coefficients(self.stream_scores(y), self.ogm_alpha)
        self._pooled = {}
        for s, k in self.last_coefficients.items():
            for p in self.encoders[s].parameters():
                if p.grad is None:
                    continue
                if k != 1.0:
                    p.grad.mul_(k)
                if self.ogm_noise and p.grad.numel() > 1:
                    p.grad.add_(torch.randn_like(p.grad) * (p.grad.std() + 1e-8))

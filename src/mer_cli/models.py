"""Classifiers = an encoder (frames, lengths -> per-frame features and a pooled vector) + one head.

Input: named streams, ``{"acoustic": (x, lengths), ...}`` with frames ``x`` (B, T, F) zero-padded
after each clip's ``lengths`` (B,). Output: class logits (B, C) (softmax is in the loss, or
applied at prediction time). Every encoder is exact under padding: padded frames never change an
output. A new encoder is a class with the `Encoder` signature and a ``configs/model/`` file; every
encoder takes ``hidden_sizes`` (one size per layer), the one key ``experiment=smoke`` shrinks.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, cast

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

MASKING_IMPLS = ("reverse", "packed")
INITS = ("torch", "keras")


def reverse_within_length(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse each sequence's first ``lengths[b]`` frames; padded frames stay where they are.

    Its own inverse. ``x`` is (B, T, F), ``lengths`` (B,) on the same device.
    """
    batch, steps = x.shape[:2]
    t = torch.arange(steps, device=x.device)
    idx = lengths[:, None] - 1 - t[None, :]  # (B, T)
    idx = torch.where(idx >= 0, idx, t[None, :]) + steps * torch.arange(batch, device=x.device)[:, None]
    # whole frames by row index: 1.3-2.5x faster than gather (and its scatter-add backward) here
    return x.reshape(batch * steps, -1).index_select(0, idx.reshape(-1)).view(x.shape)


CELLS = {"lstm": nn.LSTM, "gru": nn.GRU}


class MaskedBiRNN(nn.Module):
    """One bidirectional recurrent layer (``cell``: ``lstm`` or ``gru``) that reads each clip only
    up to its own length.

    ``impl="reverse"`` (default, fast on CPU): a forward RNN over the padded batch (padding comes
    after the real frames, so it cannot reach them) and a backward RNN over each clip reversed
    within its length, so the backward direction starts at the clip's true last frame, not in the
    padding. Both keep the fused dense kernels. ``impl="packed"``: the same result through
    ``pack_padded_sequence`` (per-step loop on CPU; cuDNN handles it well on GPU). The two RNNs
    are the submodules ``forward_<cell>`` and ``backward_<cell>`` (an LSTM's state-dict names are
    those of every checkpoint written before GRUs existed).
    """

    def __init__(self, input_size: int, hidden_size: int, impl: str = "reverse", cell: str = "lstm") -> None:
        super().__init__()
        if impl not in MASKING_IMPLS:
            raise ValueError(f"masking impl {impl!r}: valid: {', '.join(MASKING_IMPLS)}")
        if cell not in CELLS:
            raise ValueError(f"cell {cell!r}: valid: {', '.join(CELLS)}")
        self.impl = impl
        self.cell = cell
        self.hidden_size = hidden_size
        # one RNN per direction; the packed path uses them as one bidirectional RNN's weights
        self.add_module(f"forward_{cell}", CELLS[cell](input_size, hidden_size, batch_first=True))
        self.add_module(f"backward_{cell}", CELLS[cell](input_size, hidden_size, batch_first=True))

    def _rnns(self) -> tuple[nn.Module, nn.Module]:
        return self.get_submodule(f"forward_{self.cell}"), self.get_submodule(f"backward_{self.cell}")

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns per-frame outputs (B, T, 2H) (zero at padded frames) and last states (B, 2H)."""
        if self.impl == "packed":
            return self._packed(x, lengths)
        forward_rnn, backward_rnn = self._rnns()
        last = (lengths - 1).clamp(min=0)
        batch = torch.arange(x.shape[0], device=x.device)
        fwd, _ = forward_rnn(x)
        bwd_rev, _ = backward_rnn(reverse_within_length(x, lengths))
        last_state = torch.cat([fwd[batch, last], bwd_rev[batch, last]], dim=1)
        out = torch.cat([fwd, reverse_within_length(bwd_rev, lengths)], dim=2)
        mask = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]
        return out * mask[:, :, None].to(out.dtype), last_state

    def _packed(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        forward_rnn, backward_rnn = self._rnns()
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        fwd, state_f = forward_rnn(packed)
        # the backward direction: the same packed data, each clip reversed within its length
        rev = pack_padded_sequence(
            reverse_within_length(x, lengths), lengths.cpu(), batch_first=True, enforce_sorted=False
        )
        bwd, state_b = backward_rnn(rev)
        fwd_pad, _ = pad_packed_sequence(fwd, batch_first=True, total_length=x.shape[1])
        bwd_pad, _ = pad_packed_sequence(bwd, batch_first=True, total_length=x.shape[1])
        out = torch.cat([fwd_pad, reverse_within_length(bwd_pad, lengths)], dim=2)
        # an LSTM's state is (h, c), a GRU's h alone
        h_f = state_f[0] if isinstance(state_f, tuple) else state_f
        h_b = state_b[0] if isinstance(state_b, tuple) else state_b
        return out, torch.cat([h_f[0], h_b[0]], dim=1)


MaskedBiLSTM = MaskedBiRNN  # the LSTM layer (cell="lstm" is the default)


class FrameDropout(nn.Module):
    """``nn.Dropout`` for big per-frame activations, with a cheaper random mask: 16 random bits
    per element cut from 64-bit draws of torch's seeded generator (keep probability exact to
    1/65536). On a 2-core CPU, forward + backward of the (B, T, 2H) dropout between the LSTM
    layers take 1.6x less time than ``nn.Dropout``, whose Bernoulli sampling cost 5-14 % of a
    training step (torch.profiler, make bench)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability {p} is not in [0, 1]")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.p == 1.0:
            return x * 0.0
        n = x.numel()
        words = torch.randint(-(2**63), 2**63 - 1, (-(-n // 4),), dtype=torch.int64, device=x.device)
        bits = words.view(torch.int16)[:n].view(x.shape)  # uniform on [-32768, 32767]
        drop = bits < round(self.p * 65536) - 32768
        return x.mul(1.0 / (1.0 - self.p)).masked_fill_(drop, 0.0)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def keras_init_(module: nn.Module) -> None:
    """Re-draw the weights of every LSTM, GRU and Linear in ``module`` as Keras' defaults draw them.

    LSTM: input kernel Glorot-uniform over the whole (4H, F) matrix, recurrent kernel orthogonal,
    bias zero except the forget gate's 1 (``unit_forget_bias``; PyTorch's second bias ``b_hh``
    stays zero, so the sum is Keras' single bias). GRU: the same kernels, all biases zero (Keras'
    ``reset_after=True`` keeps two, as PyTorch). Linear (Dense): Glorot-uniform, zero bias.
    BatchNorm needs nothing: PyTorch's gamma 1, beta 0 and running statistics 0 / 1 are Keras'.
    PyTorch's defaults instead draw every LSTM weight and bias from U(+-1/sqrt(H)) and Linear
    weights and biases from U(+-1/sqrt(fan_in)).
    """
    for m in module.modules():
        if isinstance(m, (nn.LSTM, nn.GRU)):
            h = m.hidden_size
            for name, p in m.named_parameters():
                if name.startswith("weight_ih"):
                    nn.init.xavier_uniform_(p)
                elif name.startswith("weight_hh"):
                    nn.init.orthogonal_(p)
                elif name.startswith("bias"):
                    nn.init.zeros_(p)
                    if isinstance(m, nn.LSTM) and name.startswith("bias_ih"):  # gates i, f, g, o in both
                        nn.init.ones_(p[h : 2 * h])
        elif isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)


# one stream of a batch: frames (B, T, F), zero after each clip's length, and the lengths (B,)
Frames = tuple[torch.Tensor, torch.Tensor]
# one encoded stream: per-frame features (B, T, H), pooled vector (B, H), lengths (B,)
Encoded = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class Encoder(Protocol):
    """What the head needs of an encoder: ``out_features`` and ``forward(x, lengths)`` returning
    per-frame features (B, T, H), zero past each clip's length, and one pooled vector (B, H)."""

    out_features: int

    def __call__(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


def frame_mask(lengths: torch.Tensor, steps: int) -> torch.Tensor:
    """(B, T, 1) float mask: 1 at each clip's real frames, 0 in its padding."""
    return (torch.arange(steps, device=lengths.device)[None, :] < lengths[:, None])[:, :, None].float()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over each clip's real frames of ``x`` (B, T, H) that is zero past them: (B, H)."""
    return x.sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


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


class Classifier(nn.Module):
    """One stream's encoder, then the head every encoder shares: Dropout -> Dense(d) -> BatchNorm
    -> ReLU -> Dropout -> Dense(d, ReLU) -> Dense(C), the notebook's classifier.

    ``n_features``: ``{stream: features per frame}`` of the one stream this model reads (a run-time
    fact from the data). ``encoder``: builds the encoder from that feature count (a partial from
    the config). ``dense_size`` 512 and ``dropout`` 0.8 are the notebook's sizes. ``init="keras"``
    draws the initial weights as Keras does (`keras_init_`); ``"torch"`` keeps PyTorch's defaults.
    ``batchnorm_momentum`` and ``batchnorm_eps`` are ``nn.BatchNorm1d``'s (PyTorch's momentum is
    the weight of the new batch: Keras' momentum 0.99 is 0.01 here).
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
    ) -> None:
        super().__init__()
        if len(n_features) != 1:
            raise ValueError(f"a single-stream classifier reads one stream, not {sorted(n_features)}")
        if init not in INITS:
            raise ValueError(f"init {init!r}: valid: {', '.join(INITS)}")
        ((self.stream, features),) = n_features.items()
        self.encoder = encoder(features)
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
        _, pooled = self.encoder(x, lengths)
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


# ---------------------------------------------------------------------------------------------
# Jointly trained multi-stream models (modality=joint, modality=xattn)


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
        ogm_alpha: float | None = None,
        ogm_noise: bool = False,
    ) -> None:
        super().__init__()
        if len(n_features) < 2:
            raise ValueError(f"a multi-stream classifier reads two streams or more, not {sorted(n_features)}")
        if init not in INITS:
            raise ValueError(f"init {init!r}: valid: {', '.join(INITS)}")
        if ogm_alpha is not None and ogm_alpha < 0:
            raise ValueError(f"ogm_alpha={ogm_alpha}: must be >= 0 (or None: no modulation)")
        self.streams = list(n_features)
        self.encoders = nn.ModuleDict({s: encoder(f) for s, f in n_features.items()})
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
            frames, pooled = self.encoders[s](x, lengths)
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
        encoder is modulated, in every epoch; the head and the cross-attention layers never."""
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


class JointClassifier(MultiStreamClassifier):
    """``modality=joint``: each stream's encoder pooled vector, concatenated, one shared head."""


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

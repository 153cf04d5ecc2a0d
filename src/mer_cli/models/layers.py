"""Building blocks the encoders share: masked recurrent layers, frame masks and pooling,
frame dropout, Keras-style initial weights. Frames are (B, T, F), zero-padded after
each clip's length (B,).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn
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


# Batches (training.batching) and length groups (`encode_by_length`) are padded to a multiple of
# this many frames: a handful of distinct shapes, so the oneDNN LSTM kernels built for one shape
# are reused instead of rebuilt (and their memory kept) for every new length; costs about
# PAD_MULTIPLE / 2 padded frames per clip (measured: make bench).
PAD_MULTIPLE = 8


def padded_length(longest: Any) -> Any:
    """``longest`` (an int or an integer array) rounded up to a multiple of ``PAD_MULTIPLE``."""
    return -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE


def check_length_groups(groups: int, encoder: object) -> int:
    """``groups`` if ``encoder`` may be run in length groups; ValueError otherwise (fewer than
    1, or an encoder whose training output depends on the rest of its batch, as batch norm's)."""
    if groups < 1:
        raise ValueError(f"length_groups={groups}: at least 1")
    if groups > 1 and getattr(encoder, "couples_clips", False):
        raise ValueError(
            f"length_groups={groups}: {type(encoder).__name__} normalizes over its batch in training, "
            "so a clip's output would depend on its group (1 only)"
        )
    return groups


def encode_by_length(
    encoder: Encoder, x: torch.Tensor, lengths: torch.Tensor, groups: int, frames: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``encoder(x, lengths)`` computed in ``groups`` length-sorted parts of the batch, each cut to
    its own longest clip (rounded up to ``PAD_MULTIPLE``): the padding a batch of mixed
    lengths computes shrinks (trainer.loop.length_groups). Each clip's result is the one the
    whole batch gives (for encoders that compute clips independently), in the batch's order.
    ``frames=False``: per-frame outputs are not needed (an empty tensor comes back for them)."""
    batch, steps = x.shape[:2]
    if groups <= 1 or batch < 2:
        return encoder(x, lengths)
    order = torch.argsort(lengths, descending=True, stable=True)
    out_frames, out_pooled = [], []
    for idx in order.tensor_split(min(groups, batch)):
        longest = int(lengths[idx].max())
        cut = min(steps, max(1, padded_length(longest)))
        f, p = encoder(x[idx, :cut], lengths[idx])
        out_pooled.append(p)
        if frames:  # zero past each clip's end, as the encoder's own output is
            out_frames.append(nn.functional.pad(f, (0, 0, 0, steps - cut)))
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(batch, device=order.device)
    pooled = torch.cat(out_pooled)[inverse]
    return (torch.cat(out_frames)[inverse] if frames else pooled.new_zeros(0)), pooled

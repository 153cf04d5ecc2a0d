"""Plain PyTorch references of mer-cli's encoders and fusions, written the obvious way, for
mer-bench's side-by-side rows (``mer-bench --reference``) and the equality tests.

Input: a model config of the zoo (configs/model/<name>.yaml, as a plain dict), the streams and
their feature counts. Output: a reference network with the same interface as mer-cli's model
(``model({stream: (frames, lengths)}) -> logits``) and `copy_weights`, which copies a mer-cli
model's weights into it, so both compute the same function where the architectures match:

- bilstm, gru: a stack of bidirectional ``nn.LSTM`` / ``nn.GRU`` fed ``pack_padded_sequence``,
  ``nn.Dropout`` between the layers, pooled by the last layer's final states (mer-cli: one RNN
  per direction, the backward one over each clip reversed within its length).
- transformer: ``nn.TransformerEncoder`` of pre-norm ``nn.TransformerEncoderLayer`` (GELU) with
  ``src_key_padding_mask``, after the same input projection and sinusoidal positions; masked
  mean. Its attention dropout is set to 0, as mer-cli's default (``attention_dropout: 0.0``).
- tcn: the same dilated Conv1d blocks, the mask multiplied in after every convolution,
  ``nn.Dropout``.
- inception: the same modules with plain ``nn.BatchNorm1d`` (training statistics include padded
  frames: equal to mer-cli's in eval mode only) and the max-pool padded with zeros.
- early: one stream (the joined frames); joint: one reference encoder per stream, pooled vectors
  concatenated; xattn: each stream's frames projected to its width (the mer-cli ``q`` layer),
  then ``nn.MultiheadAttention`` with ``key_padding_mask`` over the other stream (its own query
  projection set to the identity by `copy_weights`), residual, LayerNorm, masked mean.

Every model ends in the same head, written out here: Dropout -> Linear -> BatchNorm1d -> ReLU ->
Dropout -> Linear -> ReLU -> Linear. Never part of the wheel.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

Inputs = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


def real_frames(lengths: torch.Tensor, steps: int) -> torch.Tensor:
    """(B, T) bool: True at each clip's real frames."""
    return torch.arange(steps, device=lengths.device)[None, :] < lengths[:, None]


def masked_average(x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` (B, T, H) over the frames where ``real`` (B, T) is True."""
    m = real[:, :, None].to(x.dtype)
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


class PackedRNN(nn.Module):
    """Bidirectional recurrent layers over ``pack_padded_sequence``: (frames, pooled)."""

    def __init__(self, n_features: int, hidden_sizes: Sequence[int], dropout: float, cell: str) -> None:
        super().__init__()
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
        sizes = [n_features] + [2 * h for h in hidden_sizes[:-1]]
        self.layers = nn.ModuleList(
            rnn(d, h, batch_first=True, bidirectional=True) for d, h in zip(sizes, hidden_sizes, strict=True)
        )
        self.dropout = nn.Dropout(dropout)
        self.out_features = 2 * hidden_sizes[-1]

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        steps, pooled = x.shape[1], x.new_zeros(0)
        for i, layer in enumerate(self.layers):
            packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
            out, state = layer(packed)
            h = state[0] if isinstance(state, tuple) else state  # LSTM: (h, c); GRU: h
            pooled = torch.cat([h[0], h[1]], dim=1)
            x, _ = pad_packed_sequence(out, batch_first=True, total_length=steps)
            if i < len(self.layers) - 1:
                x = self.dropout(x)
        return x, pooled


def positions(steps: int, dim: int, device: torch.device) -> torch.Tensor:
    """(T, dim) sinusoidal position codes (Vaswani et al.). Written out here on purpose, not
    imported: the reference shares no code with mer-cli's models, so the equality test can fail."""
    pos = torch.arange(steps, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    codes = torch.zeros(steps, dim, device=device)
    codes[:, 0::2] = torch.sin(pos * freq)
    codes[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return codes


class TorchTransformer(nn.Module):
    """Linear projection + positions -> ``nn.TransformerEncoder`` (pre-norm, GELU, final
    LayerNorm) with a key padding mask -> masked mean."""

    def __init__(
        self,
        n_features: int,
        hidden_sizes: Sequence[int],
        heads: int,
        ff_mult: int,
        dropout: float,
        attention_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        dim = hidden_sizes[0]
        self.input_proj = nn.Linear(n_features, dim)
        self.input_dropout = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(
            dim, heads, ff_mult * dim, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        # nested tensors are not used with pre-norm layers (torch says so at construction)
        self.encoder = nn.TransformerEncoder(
            layer, len(hidden_sizes), norm=nn.LayerNorm(dim), enable_nested_tensor=False
        )
        for block in self.encoder.layers:
            block.self_attn.dropout = attention_dropout  # nn.TransformerEncoderLayer uses `dropout`
        self.out_features = dim

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        steps = x.shape[1]
        real = real_frames(lengths, steps)
        h = self.input_proj(x * real[:, :, None].to(x.dtype))
        h = self.input_dropout(h + positions(steps, h.shape[2], h.device).to(h.dtype))
        # padding mask: True where a key is padding; a clip of length 0 keeps its first frame
        h = self.encoder(h, src_key_padding_mask=~real_frames(lengths.clamp(min=1), steps))
        out = h * real[:, :, None].to(h.dtype)
        return out, masked_average(out, real)


class ConvBlock(nn.Module):
    """Two dilated "same" Conv1d with ReLU and dropout, residual; the mask after each conv."""

    def __init__(self, d_in: int, d_out: int, kernel: int, dilation: int, dropout: float) -> None:
        super().__init__()
        pad = (kernel - 1) // 2 * dilation
        self.conv1 = nn.Conv1d(d_in, d_out, kernel, dilation=dilation, padding=pad)
        self.conv2 = nn.Conv1d(d_out, d_out, kernel, dilation=dilation, padding=pad)
        self.residual = nn.Conv1d(d_in, d_out, 1) if d_in != d_out else nn.Identity()
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        y = self.dropout(torch.relu(self.conv1(x) * m))
        y = self.dropout(torch.relu(self.conv2(y) * m))
        return torch.relu(y + self.residual(x) * m)


class PlainTCN(nn.Module):
    def __init__(
        self, n_features: int, hidden_sizes: Sequence[int], kernel_size: int, dropout: float, pooling: str
    ) -> None:
        super().__init__()
        sizes = [n_features, *hidden_sizes]
        self.blocks = nn.ModuleList(
            ConvBlock(sizes[i], sizes[i + 1], kernel_size, 2**i, dropout) for i in range(len(hidden_sizes))
        )
        self.pooling = pooling
        self.out_features = hidden_sizes[-1] * (2 if pooling == "meanmax" else 1)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        real = real_frames(lengths, x.shape[1])
        m = real[:, None, :].to(x.dtype)  # (B, 1, T)
        h = x.transpose(1, 2) * m
        for block in self.blocks:
            h = block(h, m)
        out = h.transpose(1, 2)
        pooled = masked_average(out, real)
        if self.pooling == "meanmax":
            pooled = torch.cat([pooled, out.amax(dim=1)], dim=1)
        return out, pooled


class PlainInceptionModule(nn.Module):
    def __init__(self, d_in: int, width: int, kernels: Sequence[int], bottleneck: int) -> None:
        super().__init__()
        branch = width // (len(kernels) + 1)
        self.bottleneck = nn.Conv1d(d_in, bottleneck, 1, bias=False) if d_in > 1 else nn.Identity()
        d_conv = bottleneck if d_in > 1 else d_in
        self.convs = nn.ModuleList(nn.Conv1d(d_conv, branch, k, padding=k // 2, bias=False) for k in kernels)
        self.pool_conv = nn.Conv1d(d_in, branch, 1, bias=False)
        self.norm = nn.BatchNorm1d(width)

    def forward(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        b = self.bottleneck(x) * m
        pooled = F.max_pool1d(F.pad(x, (1, 1)), 3, stride=1)  # zeros beyond both ends, as padding
        y = torch.cat([conv(b) for conv in self.convs] + [self.pool_conv(pooled)], dim=1)
        return torch.relu(self.norm(y)) * m


class PlainInception(nn.Module):
    def __init__(
        self,
        n_features: int,
        hidden_sizes: Sequence[int],
        kernel_sizes: Sequence[int],
        bottleneck_size: int | None,
        residual_every: int,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        if norm != "batch":
            raise ValueError("the reference inception has BatchNorm only")
        branches = len(kernel_sizes) + 1
        sizes = [n_features, *hidden_sizes]
        self.blocks = nn.ModuleList(
            PlainInceptionModule(
                sizes[i], sizes[i + 1], kernel_sizes, bottleneck_size or sizes[i + 1] // branches
            )
            for i in range(len(hidden_sizes))
        )
        self.shortcuts = nn.ModuleList(
            nn.ModuleDict(
                {
                    "conv": nn.Conv1d(
                        sizes[s], sizes[min(s + residual_every, len(hidden_sizes))], 1, bias=False
                    ),
                    "norm": nn.BatchNorm1d(sizes[min(s + residual_every, len(hidden_sizes))]),
                }
            )
            for s in range(0, len(hidden_sizes), residual_every)
        )
        self.every = residual_every
        self.out_features = hidden_sizes[-1]

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        real = real_frames(lengths, x.shape[1])
        m = real[:, None, :].to(x.dtype)
        h = group_input = x.transpose(1, 2) * m
        for i, module in enumerate(self.blocks):
            h = module(h, m)
            if (i + 1) % self.every == 0 or i == len(self.blocks) - 1:
                short = self.shortcuts[i // self.every]
                h = torch.relu(h + short["norm"](short["conv"](group_input)) * m)
                group_input = h
        out = h.transpose(1, 2)
        return out, masked_average(out, real)


def reference_encoder(n_features: int, encoder: Mapping[str, Any]) -> nn.Module:
    """The reference of ``model.encoder`` (a zoo config's encoder node) for ``n_features``."""
    name, hidden = encoder["name"], list(encoder["hidden_sizes"])
    if name == "birnn":
        return PackedRNN(n_features, hidden, float(encoder["dropout"]), encoder.get("cell", "lstm"))
    if name == "transformer":
        return TorchTransformer(
            n_features,
            hidden,
            int(encoder["heads"]),
            int(encoder["ff_mult"]),
            float(encoder["dropout"]),
            float(encoder.get("attention_dropout", 0.0)),
        )
    if name == "tcn":
        return PlainTCN(
            n_features,
            hidden,
            int(encoder["kernel_size"]),
            float(encoder["dropout"]),
            encoder.get("pooling", "mean"),
        )
    if name == "inception":
        return PlainInception(
            n_features,
            hidden,
            list(encoder["kernel_sizes"]),
            encoder.get("bottleneck_size"),
            int(encoder["residual_every"]),
            encoder.get("norm", "batch"),
        )
    raise ValueError(f"no reference for encoder {name!r}: valid: birnn, transformer, tcn, inception")


def head(
    in_features: int, n_classes: int, dense: int, dropout: float, momentum: float, eps: float
) -> nn.Module:
    return nn.Sequential(
        nn.Dropout(dropout),
        nn.Linear(in_features, dense),
        nn.BatchNorm1d(dense, eps=eps, momentum=momentum),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(dense, dense),
        nn.ReLU(),
        nn.Linear(dense, n_classes),
    )


class CrossAttend(nn.Module):
    """Queries projected to the model width, ``nn.MultiheadAttention`` over the other stream's
    frames with a key padding mask, residual on the projected queries, LayerNorm."""

    def __init__(self, query_size: int, context_size: int, dim: int, heads: int) -> None:
        super().__init__()
        self.q = nn.Linear(query_size, dim)
        self.mha = nn.MultiheadAttention(dim, heads, kdim=context_size, vdim=context_size, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(
        self, query: torch.Tensor, context: torch.Tensor, context_lengths: torch.Tensor
    ) -> torch.Tensor:
        q = self.q(query)
        pad = ~real_frames(context_lengths, context.shape[1])
        att, _ = self.mha(q, context, context, key_padding_mask=pad, need_weights=False)
        return self.norm(q + att)


class ReferenceModel(nn.Module):
    """One reference encoder per stream, the fusion the modality names, the head."""

    def __init__(
        self, cfg: Mapping[str, Any], n_features: Mapping[str, int], n_classes: int, fusion: str = "single"
    ) -> None:
        super().__init__()
        if fusion not in ("single", "joint", "xattn"):
            raise ValueError(f"fusion {fusion!r}: valid: single, joint, xattn")
        self.streams, self.fusion = list(n_features), fusion
        self.encoders = nn.ModuleDict(
            {s: reference_encoder(f, cfg["encoder"]) for s, f in n_features.items()}
        )
        sizes = {s: int(e.out_features) for s, e in self.encoders.items()}  # type: ignore[call-overload]
        if fusion == "xattn":
            a, b = self.streams
            heads = int(cfg.get("attention_heads", 4))
            self.attend = nn.ModuleDict(
                {s: CrossAttend(sizes[s], sizes[o], sizes[s], heads) for s, o in ((a, b), (b, a))}
            )
        self.head = head(
            sum(sizes.values()),
            n_classes,
            int(cfg["dense_size"]),
            float(cfg["dropout"]),
            float(cfg.get("batchnorm_momentum", 0.1)),
            float(cfg.get("batchnorm_eps", 1e-5)),
        )

    def forward(self, inputs: Inputs) -> torch.Tensor:
        encoded = {s: self.encoders[s](*inputs[s]) for s in self.streams}
        if self.fusion == "xattn":
            a, b = self.streams
            pooled = []
            for s, o in ((a, b), (b, a)):
                lengths = inputs[s][1]
                att = self.attend[s](encoded[s][0], encoded[o][0], inputs[o][1])
                pooled.append(masked_average(att, real_frames(lengths, att.shape[1])))
        else:
            pooled = [encoded[s][1] for s in self.streams]
        return self.head(torch.cat(pooled, dim=1))


# ---------------------------------------------------------------------------------------------
# mer-cli's weights into the reference


def _set(dst: torch.Tensor, src: torch.Tensor) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"shape {tuple(src.shape)} does not fit {tuple(dst.shape)}")
    dst.copy_(src)


def _copy_rnn(ours: nn.Module, ref: PackedRNN) -> None:
    layers = ours.get_submodule(ours.layers_name)  # type: ignore[operator]
    for layer, ref_layer in zip(layers, ref.layers, strict=True):
        fwd, bwd = layer.get_submodule(f"forward_{layer.cell}"), layer.get_submodule(f"backward_{layer.cell}")
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            _set(getattr(ref_layer, f"{name}_l0"), getattr(fwd, f"{name}_l0"))
            _set(getattr(ref_layer, f"{name}_l0_reverse"), getattr(bwd, f"{name}_l0"))


def _copy_transformer(ours: nn.Module, ref: TorchTransformer) -> None:
    _set(ref.input_proj.weight, ours.input_proj.weight)
    _set(ref.input_proj.bias, ours.input_proj.bias)
    for layer, block in zip(ours.layers, ref.encoder.layers, strict=True):  # type: ignore[arg-type]
        pairs = [
            (block.self_attn.in_proj_weight, layer.qkv.weight),
            (block.self_attn.in_proj_bias, layer.qkv.bias),
            (block.self_attn.out_proj.weight, layer.proj.weight),
            (block.self_attn.out_proj.bias, layer.proj.bias),
            (block.linear1.weight, layer.ff[0].weight),
            (block.linear1.bias, layer.ff[0].bias),
            (block.linear2.weight, layer.ff[3].weight),
            (block.linear2.bias, layer.ff[3].bias),
        ]
        for norm, ref_norm in ((layer.norm1, block.norm1), (layer.norm2, block.norm2)):
            pairs += [(ref_norm.weight, norm.weight), (ref_norm.bias, norm.bias)]
        for dst, src in pairs:
            _set(dst, src)
    final = ref.encoder.norm
    assert final is not None
    _set(final.weight, ours.norm.weight)
    _set(final.bias, ours.norm.bias)


def _copy_state(src: nn.Module, dst: nn.Module) -> None:
    """Parameters and buffers by position (modules built in the same order, same shapes)."""
    for d, s in zip(dst.state_dict().values(), src.state_dict().values(), strict=True):
        _set(d, s)


def _copy_inception(ours: nn.Module, ref: PlainInception) -> None:
    for block, ref_block in zip(ours.blocks, ref.blocks, strict=True):  # type: ignore[arg-type]
        _copy_state(block, ref_block)
    for short, ref_short in zip(ours.shortcuts, ref.shortcuts, strict=True):  # type: ignore[arg-type]
        _copy_state(short.conv, ref_short["conv"])
        _copy_state(short.norm, ref_short["norm"])


def copy_encoder(ours: nn.Module, ref: nn.Module) -> None:
    if isinstance(ref, PackedRNN):
        _copy_rnn(ours, ref)
    elif isinstance(ref, TorchTransformer):
        _copy_transformer(ours, ref)
    elif isinstance(ref, (PlainTCN, PlainInception)):
        _copy_state(ours, ref)
    else:
        raise TypeError(f"no weight copy for {type(ref).__name__}")


@torch.no_grad()
def copy_weights(ours: nn.Module, ref: ReferenceModel) -> ReferenceModel:
    """``ours`` (a mer-cli classifier of the same config) into ``ref``; returns ``ref``."""
    encoders = {ref.streams[0]: ours.encoder} if ref.fusion == "single" else dict(ours.encoders.items())  # type: ignore[union-attr]
    for s in ref.streams:
        copy_encoder(encoders[s], ref.encoders[s])
    if ref.fusion == "xattn":
        for s in ref.streams:
            mine, theirs = ours.attend[s], ref.attend[s]  # type: ignore[index]
            dim = theirs.q.out_features
            _copy_state(mine.q, theirs.q)
            k, v = mine.kv.weight.chunk(2, dim=0)
            kb, vb = mine.kv.bias.chunk(2, dim=0)
            eye = torch.eye(dim)  # the queries are projected once, by q
            if theirs.mha.in_proj_weight is not None:  # context as wide as the queries
                _set(theirs.mha.in_proj_weight, torch.cat([eye, k, v]))
            else:
                _set(theirs.mha.q_proj_weight, eye)
                _set(theirs.mha.k_proj_weight, k)
                _set(theirs.mha.v_proj_weight, v)
            _set(theirs.mha.in_proj_bias, torch.cat([torch.zeros(dim), kb, vb]))
            _copy_state(mine.out, theirs.mha.out_proj)
            _copy_state(mine.norm, theirs.norm)
    # ours: dropout, then the head's Sequential (Linear, BN, ReLU, Dropout, Linear, ReLU, Linear)
    _copy_state(ours.head, ref.head)  # type: ignore[arg-type]
    return ref

"""Learned layer weights (``model.layer_weights=learned``): the hidden layers a self-supervised
speech encoder's features store per frame, mixed into one by a softmax-weighted sum with one
learned weight per layer (SUPERB's weighted sum), before the model's encoder, trained with it.

Input: a model input's frames (B, T, F) in which each layered data stream holds its L stored
layers side by side, layer-major (columns ``offset + l*D : offset + (l+1)*D`` are layer
``layers[l]``; ``offset`` is 0, or, in early fusion, the columns of the streams joined before it).
Output: (B, T, F - (L-1)*D per layered stream): each layered block replaced by its weighted sum,
every other column as it was. Where the layers lie is read from the run's feature spec
(`layouts`) and kept as plain data in the model's description, so a checkpoint rebuilds it.

No LayerNorm per layer before the sum (SUPERB's optional one): the run's preprocessing already
standardizes every stored column on the training frames (``preprocess.scaling``), so each layer
enters at unit scale per dimension and the weights compare layers at equal scale; a per-frame
norm would be one more step every export has to reproduce, for no gain in scale.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mer_cli.core.errors import ConfigError

LEARNED = "learned"
VALUES = (None, LEARNED)  # model.layer_weights; None: the stored features as they are
# how mer-ingest stores several layers of a stream (the hint of the error line)
INGEST_HINTS = {
    "acoustic": "--audio-features hf --audio-layers A-B",
    "visual": "a video back-end that stores several layers",
}


def check_value(value: Any) -> None:
    """``model.layer_weights`` is null or ``learned``; one ConfigError line otherwise."""
    if value not in VALUES:
        raise ConfigError(f"model.layer_weights={value!r}: valid: null (the features as stored), learned")


def stored_layers(record: Mapping[str, Any] | None) -> list[int]:
    """The encoder layers a stream's ingest record says it stores per frame (empty: none recorded,
    or a back-end without layers)."""
    layers = (record or {}).get("layers")
    return [int(layer) for layer in layers] if isinstance(layers, Sequence) else []


def is_layered(record: Mapping[str, Any] | None) -> bool:
    """Whether the stream stores more than one layer per frame: something to weigh."""
    return len(stored_layers(record)) > 1 and bool((record or {}).get("layer_size"))


def nothing_to_weigh(streams: Mapping[str, Mapping[str, Any]], source: str) -> ConfigError:
    """The error line for layer weights asked of streams that store one layer each; ``streams``:
    the feature spec's (or ingest records wrapped as ``{"ingest": record}``)."""
    names = list(streams)
    what = "; ".join(_one_layer(s.get("ingest"), s.get("field", name)) for name, s in streams.items())
    store = "store one layer" + (" each" if len(names) > 1 else "")
    hint = " or ".join(dict.fromkeys(INGEST_HINTS.get(n, "several layers") for n in names))
    return ConfigError(
        f"model.layer_weights=learned: the {' and '.join(names)} features of {source} {store} ({what}): "
        f"nothing to weigh; ingest with {hint}"
    )


def _one_layer(record: Mapping[str, Any] | None, field: str) -> str:
    if not record:
        return str(field)
    layers = stored_layers(record)
    backend = str(record.get("backend", field))
    return f"{backend}, layer {layers[0]}" if layers else backend


def layouts(feature_spec: Mapping[str, Any], inputs_kind: str) -> dict[str, list[dict[str, Any]]]:
    """Where each layered stream's layers lie in the model's inputs: input name -> its layered
    blocks ``{"stream", "offset", "layers", "layer_size"}``. ``inputs_kind``: the modality's
    (`modalities.INPUT_KINDS`): early fusion joins the streams per frame in the spec's stream
    order, so a stream's columns start after those of the streams before it. A ConfigError line
    when no stream the model reads stores several layers."""
    streams = feature_spec["streams"]
    inputs = list(feature_spec["inputs"])
    out: dict[str, list[dict[str, Any]]] = {}
    offset = 0
    for name, stream in streams.items():
        n = int(stream["n_features"])
        record = stream.get("ingest")
        if is_layered(record):
            layers, size = stored_layers(record), int(record["layer_size"])
            if len(layers) * size != n:
                raise ConfigError(
                    f"model.layer_weights=learned: the {name} features of {feature_spec['source']} hold "
                    f"{n} values per frame, not {len(layers)} layers x {size}"
                )
            model_input = inputs[0] if inputs_kind == "early" else name
            block = {"stream": name, "offset": offset if inputs_kind == "early" else 0}
            out.setdefault(model_input, []).append({**block, "layers": layers, "layer_size": size})
        offset += n
    if not out:
        raise nothing_to_weigh(streams, str(feature_spec["source"]))
    return out


@dataclass(frozen=True)
class Block:
    """One layered stream's columns in a model input."""

    stream: str
    offset: int
    layers: tuple[int, ...]
    layer_size: int

    @property
    def width(self) -> int:
        return len(self.layers) * self.layer_size


class LayerMix(nn.Module):
    """One model input's layered blocks, each replaced by its softmax-weighted sum of layers.

    ``n_features``: the input's columns; ``blocks``: `layouts`' entries for it. One weight per
    stored layer (a parameter named by the stream), zero at first: every layer weighs 1 / L, the
    layers' mean. Padded frames (zeros) stay zeros: the sum has no bias.
    """

    def __init__(self, n_features: int, blocks: Sequence[Mapping[str, Any]]) -> None:
        super().__init__()
        self.blocks = sorted(
            (
                Block(str(b["stream"]), int(b["offset"]), tuple(b["layers"]), int(b["layer_size"]))
                for b in blocks
            ),
            key=lambda b: b.offset,
        )
        end = 0
        for b in self.blocks:
            if b.offset < end or b.offset + b.width > n_features or len(b.layers) < 2 or b.layer_size < 1:
                raise ValueError(
                    f"model.layer_weights: the {b.stream} layers ({len(b.layers)} x {b.layer_size} from "
                    f"column {b.offset}) do not fit an input of {n_features} features"
                )
            end = b.offset + b.width
        self.n_features = n_features
        self.out_features = n_features - sum(b.width - b.layer_size for b in self.blocks)
        self.weights = nn.ParameterDict(
            {b.stream: nn.Parameter(torch.zeros(len(b.layers))) for b in self.blocks}
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, n_features) -> (B, T, out_features)."""
        pieces, start = [], 0
        for b in self.blocks:
            if b.offset > start:
                pieces.append(x[..., start : b.offset])
            # sizes read from the tensor: a traced graph (mer-export) keeps batch and time dynamic,
            # where unflatten's would be frozen at the traced batch's
            layers = x[..., b.offset : b.offset + b.width].reshape(*x.shape[:-1], len(b.layers), b.layer_size)
            w = torch.softmax(self.weights[b.stream].float(), dim=0).to(x.dtype)
            pieces.append((layers * w[:, None]).sum(dim=-2))
            start = b.offset + b.width
        if start < self.n_features:
            pieces.append(x[..., start:])
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)

    def normalized(self) -> dict[str, dict[str, float]]:
        """Each stream's softmax weights by the real layer number: ``{"acoustic": {"6": 0.12, ...}}``."""
        out = {}
        with torch.no_grad():
            for b in self.blocks:
                w = torch.softmax(self.weights[b.stream].double(), dim=0).tolist()
                out[b.stream] = {str(layer): round(v, 6) for layer, v in zip(b.layers, w, strict=True)}
        return out


def mixes(
    n_features: Mapping[str, int], layer_weights: Mapping[str, Sequence[Mapping[str, Any]]] | str | None
) -> dict[str, LayerMix]:
    """A classifier's `LayerMix` per layered input (empty: the features as stored). The layout is
    a run-time fact: a bare ``learned`` here was not resolved from the data (`layouts`)."""
    if layer_weights is None:
        return {}
    if not isinstance(layer_weights, Mapping):
        raise ValueError(
            f"model.layer_weights={layer_weights!r}: where the layers lie comes from the data's feature "
            "spec (models.layer_mix.layouts), not from a config"
        )
    unknown = sorted(set(layer_weights) - set(n_features))
    if unknown:
        raise ValueError(
            f"model.layer_weights: no input {', '.join(unknown)} (inputs: {', '.join(n_features)})"
        )
    return {name: LayerMix(int(n_features[name]), blocks) for name, blocks in layer_weights.items()}


def mixed_features(n_features: Mapping[str, int], mixers: Mapping[str, LayerMix]) -> dict[str, int]:
    """Features per frame of each input once its layers are mixed (what its encoder reads)."""
    return {name: mixers[name].out_features if name in mixers else int(n) for name, n in n_features.items()}


def learned_weights(model: nn.Module) -> dict[str, dict[str, float]]:
    """Every stream's learned layer weights in ``model`` (empty for a model without them)."""
    out: dict[str, dict[str, float]] = {}
    for m in model.modules():
        if isinstance(m, LayerMix):
            out.update(m.normalized())
    return out

"""model.layer_weights=learned: the stored encoder layers mixed by learned softmax weights before
the encoder, for every classifier, laid out from the feature spec, refused in one line where the
data stores one layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mer_cli.core.errors import ConfigError
from mer_cli.models import layer_mix
from mer_cli.models.registry import build

LAYERS, SIZE = [6, 7, 8, 9], 5
ENCODER = {"name": "birnn", "hidden_sizes": [8, 4], "dropout": 0.0}
HEAD = {"dense_size": 16, "dropout": 0.0}


def hand_mixed(x: np.ndarray, logits: dict[str, np.ndarray], blocks: list[dict]) -> np.ndarray:
    """The mix by hand: each block's layers summed with softmax(logits) weights, in float64,
    every other column kept, in column order."""
    pieces, start = [], 0
    for b in sorted(blocks, key=lambda b: b["offset"]):
        w = np.exp(logits[b["stream"]] - logits[b["stream"]].max())
        w /= w.sum()
        pieces.append(x[..., start : b["offset"]])
        d = b["layer_size"]
        pieces.append(
            sum(w[i] * x[..., b["offset"] + i * d : b["offset"] + (i + 1) * d] for i in range(len(w)))
        )
        start = b["offset"] + len(b["layers"]) * d
    pieces.append(x[..., start:])
    return np.concatenate(pieces, axis=-1)


def block(stream: str, offset: int, layers: list[int] = LAYERS, size: int = SIZE) -> dict:
    return {"stream": stream, "offset": offset, "layers": list(layers), "layer_size": size}


def set_logits(mix: layer_mix.LayerMix, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = {}
    with torch.no_grad():
        for stream, p in mix.weights.items():
            logits[stream] = rng.normal(0, 2, size=p.shape[0])
            p.copy_(torch.from_numpy(logits[stream]))
    return logits


def test_the_mix_is_the_softmax_weighted_sum_of_each_streams_layers_and_keeps_other_columns():
    # early fusion's input: 3 columns before the acoustic layers, a 2-layer visual block after a gap
    blocks = [block("acoustic", 3), block("visual", 3 + 4 * SIZE + 2, layers=[1, 2], size=3)]
    n = 3 + 4 * SIZE + 2 + 2 * 3 + 1
    mix = layer_mix.LayerMix(n, blocks)
    assert mix.out_features == 3 + SIZE + 2 + 3 + 1
    # initialised equal: every stored layer weighs 1 / L
    assert mix.normalized() == {
        "acoustic": dict.fromkeys(["6", "7", "8", "9"], 0.25),
        "visual": {"1": 0.5, "2": 0.5},
    }
    logits = set_logits(mix, 0)
    x = np.random.default_rng(1).standard_normal((2, 7, n)).astype(np.float32)
    got = mix(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(got, hand_mixed(x.astype(np.float64), logits, blocks), rtol=1e-5, atol=1e-6)
    w = np.exp(logits["acoustic"]) / np.exp(logits["acoustic"]).sum()
    assert list(mix.normalized()["acoustic"].values()) == pytest.approx(w, abs=1e-6)
    assert not mix(torch.zeros(1, 4, n)).any()  # padding (zero frames) stays zero: no bias


def test_gradient_reaches_the_weights_and_the_layer_carrying_the_label_gets_the_largest():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    y = torch.arange(48) % 3
    # layer 8 carries the class (a per-class mean), layers 6, 7 and 9 are noise of the same scale
    x = torch.randn(48, 10, 4 * SIZE, generator=g)
    signal = torch.randn(3, SIZE, generator=g)[y][:, None, :] + 0.5 * torch.randn(48, 10, SIZE, generator=g)
    x[..., 2 * SIZE : 3 * SIZE] = signal
    lengths = torch.full((48,), 10)
    description = {"encoder": ENCODER, **HEAD, "layer_weights": {"acoustic": [block("acoustic", 0)]}}
    model = build(description, {"acoustic": 4 * SIZE}, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.03)
    for step in range(25):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model({"acoustic": (x, lengths)}), y)
        loss.backward()
        if step == 0:
            grad = model.get_submodule("layer_mix").weights["acoustic"].grad
            assert grad is not None and grad.abs().min() > 0
        optimizer.step()
    weights = layer_mix.learned_weights(model)["acoustic"]
    assert max(weights, key=weights.__getitem__) == "8"
    assert weights["8"] > 0.4 and sum(weights.values()) == pytest.approx(1.0)


@pytest.mark.parametrize("classifier", ["single", "joint", "xattn"])
def test_each_classifier_reads_its_layered_input_mixed_and_every_other_input_as_it_is(classifier):
    """The model with layer weights predicts what the same weights without them predict on the
    input mixed by hand: early fusion's acoustic columns only (single), the acoustic encoder's
    input only (joint, xattn)."""
    d_v = 3
    if classifier == "single":  # early fusion: [acoustic layers | visual] per frame
        raw, mixed = {"early": 4 * SIZE + d_v}, {"early": SIZE + d_v}
        layouts = {"early": [block("acoustic", 0)]}
    else:
        raw, mixed = {"acoustic": 4 * SIZE, "visual": d_v}, {"acoustic": SIZE, "visual": d_v}
        layouts = {"acoustic": [block("acoustic", 0)]}
    description = {"classifier": classifier, "encoder": ENCODER, **HEAD}
    torch.manual_seed(0)
    model = build({**description, "layer_weights": layouts}, raw, 6).eval()
    plain = build(description, mixed, 6).eval()
    state = model.state_dict()
    plain.load_state_dict({k: v for k, v in state.items() if not k.startswith("layer_mix.")})
    logits = set_logits(model.get_submodule(f"layer_mix{'' if classifier == 'single' else '.acoustic'}"), 3)
    rng = np.random.default_rng(4)
    lengths = torch.tensor([9, 4, 1])
    batch = {name: rng.standard_normal((3, 9, n)).astype(np.float32) for name, n in raw.items()}
    for x in batch.values():
        x[np.arange(9)[None, :] >= lengths.numpy()[:, None]] = 0.0
    by_hand = {
        name: hand_mixed(x.astype(np.float64), logits, layouts[name]) if name in layouts else x
        for name, x in batch.items()
    }
    with torch.no_grad():
        got = model({k: (torch.from_numpy(v), lengths) for k, v in batch.items()})
        expected = plain({k: (torch.from_numpy(v.astype(np.float32)), lengths) for k, v in by_hand.items()})
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_without_layer_weights_a_model_has_the_parameters_it_always_had():
    description = {"encoder": ENCODER, **HEAD}
    torch.manual_seed(0)
    before = build(description, {"acoustic": 20}, 6).state_dict()
    torch.manual_seed(0)
    now = build({**description, "layer_weights": None}, {"acoustic": 20}, 6).state_dict()
    assert list(now) == list(before) and all(torch.equal(now[k], before[k]) for k in before)


def test_a_bare_learned_without_the_datas_layout_is_one_config_error():
    with pytest.raises(ConfigError, match=r"model.layer_weights='learned': where the layers lie comes from"):
        build({"encoder": ENCODER, **HEAD, "layer_weights": "learned"}, {"acoustic": 20}, 6)


def spec(streams: dict[str, tuple[int, dict | None]], inputs: dict[str, int]) -> dict:
    return {
        "streams": {
            name: {"field": {"acoustic": "mfcc", "visual": "aus"}[name], "n_features": n, "ingest": ingest}
            for name, (n, ingest) in streams.items()
        },
        "inputs": inputs,
        "source": "DATA",
    }


HF = {"backend": "hf", "layers": LAYERS, "layer_size": SIZE}


def test_layouts_place_each_layered_stream_at_its_columns_in_the_models_inputs():
    visual_layered = spec(
        {"acoustic": (52, None), "visual": (2 * 3, {**HF, "layers": [1, 2], "layer_size": 3})}, {}
    )
    early = {**visual_layered, "inputs": {"early": 58}}
    assert layer_mix.layouts(early, "early") == {"early": [block("visual", 52, [1, 2], 3)]}
    joint = {**visual_layered, "inputs": {"acoustic": 52, "visual": 6}}
    assert layer_mix.layouts(joint, "streams") == {"visual": [block("visual", 0, [1, 2], 3)]}
    acoustic = spec({"acoustic": (4 * SIZE, HF)}, {"acoustic": 4 * SIZE})
    assert layer_mix.layouts(acoustic, "single") == {"acoustic": [block("acoustic", 0)]}


def test_data_storing_one_layer_is_one_line_naming_the_data_and_why():
    plain = spec({"acoustic": (52, None)}, {"acoustic": 52})
    with pytest.raises(ConfigError) as e:
        layer_mix.layouts(plain, "single")
    assert str(e.value) == (
        "model.layer_weights=learned: the acoustic features of DATA store one layer (mfcc): "
        "nothing to weigh; ingest with --audio-features hf --audio-layers A-B"
    )
    one_hf_layer = spec(
        {"acoustic": (SIZE, {**HF, "layers": [12]}), "visual": (17, {"backend": "openface"})},
        {"early": SIZE + 17},
    )
    with pytest.raises(ConfigError) as e:
        layer_mix.layouts(one_hf_layer, "early")
    assert str(e.value) == (
        "model.layer_weights=learned: the acoustic and visual features of DATA store one layer each "
        "(hf, layer 12; openface): nothing to weigh; ingest with --audio-features hf --audio-layers A-B "
        "or a video back-end that stores several layers"
    )
    wrong_size = spec({"acoustic": (4 * SIZE + 1, HF)}, {"acoustic": 4 * SIZE + 1})
    with pytest.raises(
        ConfigError, match=r"acoustic features of DATA hold 21 values per frame, not 4 layers x 5"
    ):
        layer_mix.layouts(wrong_size, "single")


def test_only_null_and_learned_are_values():
    layer_mix.check_value(None)
    layer_mix.check_value("learned")
    with pytest.raises(ConfigError, match=r"^model.layer_weights='fixed': valid: null"):
        layer_mix.check_value("fixed")

"""The plain PyTorch references (benchmarks/reference.py) compute what mer-cli's models compute on
the same weights, so mer-bench's side-by-side rows time the same function."""

import pytest
import reference  # benchmarks/reference.py (pytest's pythonpath)
import torch

from mer_cli.models import registry

STREAMS = {"acoustic": 5, "visual": 3}


def tiny(encoder: str) -> dict:
    """A zoo model at tiny sizes, dropout off (so training mode is deterministic)."""
    encoders = {
        "bilstm": {"name": "birnn", "hidden_sizes": [6, 4], "dropout": 0.0, "masking": "reverse"},
        "gru": {"name": "birnn", "cell": "gru", "hidden_sizes": [6, 4], "dropout": 0.0, "masking": "reverse"},
        "transformer": {
            "name": "transformer",
            "hidden_sizes": [8, 8],
            "heads": 2,
            "ff_mult": 2,
            "dropout": 0.0,
        },
        "tcn": {"name": "tcn", "hidden_sizes": [6, 6], "kernel_size": 3, "dropout": 0.0, "pooling": "mean"},
        "inception": {
            "name": "inception",
            "hidden_sizes": [8, 8, 8, 8],
            "kernel_sizes": [3, 5, 9],
            "residual_every": 3,
        },
    }
    return {"encoder": encoders[encoder], "dense_size": 8, "dropout": 0.0}


def batch(streams: dict[str, int], seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Clips of 1..T frames, zero after their length (each stream its own lengths)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (s, f) in enumerate(streams.items()):
        steps = 13 - 4 * i
        lengths = torch.randint(1, steps + 1, (6,), generator=g)
        lengths[0] = steps
        x = torch.randn(6, steps, f, generator=g)
        out[s] = (x * (torch.arange(steps)[None, :, None] < lengths[:, None, None]), lengths)
    return out


def pair(encoder: str, fusion: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    streams = {"acoustic": 5} if fusion == "single" else STREAMS
    cfg = tiny(encoder)
    torch.manual_seed(0)
    ours = registry.build(
        {"classifier": fusion, **cfg, **({"attention_heads": 2} if fusion == "xattn" else {})}, streams, 4
    )
    ref = reference.ReferenceModel({**cfg, "attention_heads": 2}, streams, 4, fusion)
    return ours, reference.copy_weights(ours, ref)


@pytest.mark.parametrize(
    ("encoder", "fusion"),
    [(e, "single") for e in ("bilstm", "gru", "transformer", "tcn", "inception")]
    + [("bilstm", "joint"), ("transformer", "xattn"), ("tcn", "xattn")],
)
def test_reference_gives_mer_clis_logits_on_the_same_weights(encoder, fusion):
    ours, ref = pair(encoder, fusion)
    x = batch({"acoustic": 5} if fusion == "single" else STREAMS)
    ours.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(ref(x), ours(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("encoder", ["bilstm", "gru", "transformer", "tcn"])
def test_reference_trains_as_mer_cli_does(encoder):
    # training mode (batch statistics in the head), gradients of every copied weight
    ours, ref = pair(encoder, "single")
    x = batch({"acoustic": 5}, seed=1)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    ours.train(), ref.train()
    loss_ours = torch.nn.functional.cross_entropy(ours(x), y)
    loss_ref = torch.nn.functional.cross_entropy(ref(x), y)
    torch.testing.assert_close(loss_ref, loss_ours, rtol=1e-5, atol=1e-6)
    loss_ours.backward(), loss_ref.backward()
    head_ours = [p.grad for p in ours.head.parameters()]
    head_ref = [p.grad for p in ref.head.parameters()]
    for a, b in zip(head_ref, head_ours, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # the encoder's first weight: the input projection / first layer / first convolution
    first_ours = next(p for p in ours.encoder.parameters() if p.dim() > 1)
    first_ref = next(p for p in ref.encoders["acoustic"].parameters() if p.dim() > 1)
    torch.testing.assert_close(first_ref.grad, first_ours.grad, rtol=1e-4, atol=1e-6)

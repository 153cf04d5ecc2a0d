"""trainer.loop.length_groups: a batch's encoder pass in length-sorted groups gives every clip the
result the whole batch gives, and the padding it computes is what padding_waste counts."""

import pytest
import torch

from mer_cli.core.errors import ConfigError
from mer_cli.models import registry
from mer_cli.models.layers import encode_by_length
from mer_cli.training import batching

ENCODERS = {
    "bilstm": {"name": "birnn", "hidden_sizes": [6, 4], "dropout": 0.0},
    "gru": {"name": "birnn", "cell": "gru", "hidden_sizes": [5], "dropout": 0.0},
    "transformer": {"name": "transformer", "hidden_sizes": [8], "heads": 2, "ff_mult": 2, "dropout": 0.0},
    "tcn": {"name": "tcn", "hidden_sizes": [6, 6], "dropout": 0.0},
    "inception": {"name": "inception", "hidden_sizes": [8, 8], "kernel_sizes": [3, 5, 9], "norm": "layer"},
}


def clips(n_features: int, steps: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, steps + 1, (10,), generator=g)
    lengths[3] = steps
    x = torch.randn(10, steps, n_features, generator=g)
    return x * (torch.arange(steps)[None, :, None] < lengths[:, None, None]), lengths


def model(encoder: dict, classifier: str, groups: int, streams: dict[str, int]) -> torch.nn.Module:
    torch.manual_seed(0)
    extra = {"attention_heads": 2} if classifier == "xattn" else {}
    description = {"classifier": classifier, "encoder": dict(encoder), "dense_size": 8, "dropout": 0.0}
    return registry.build({**description, **extra, "length_groups": groups}, streams, 3)


@pytest.mark.parametrize(
    ("name", "classifier"),
    [(n, "single") for n in ENCODERS] + [("bilstm", "joint"), ("transformer", "xattn")],
)
def test_grouped_training_pass_gives_the_whole_batchs_logits_and_gradients(name, classifier):
    streams = {"a": 4} if classifier == "single" else {"a": 4, "v": 3}
    batch = {s: clips(f, 21 - 6 * i, seed=i) for i, (s, f) in enumerate(streams.items())}
    whole, grouped = (
        model(ENCODERS[name], classifier, 1, streams),
        model(ENCODERS[name], classifier, 3, streams),
    )
    y = torch.tensor([0, 1, 2] * 3 + [0])
    losses = []
    for m in (whole, grouped):
        m.train()
        loss = torch.nn.functional.cross_entropy(m(batch), y)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (n, a), b in zip(whole.named_parameters(), grouped.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_grouped_frames_are_the_whole_batchs_zero_past_each_clip():
    encoder = registry.ENCODERS.get("birnn")(4, hidden_sizes=[3], dropout=0.0)
    x, lengths = clips(4, 19, seed=5)
    whole = encoder(x, lengths)
    grouped = encode_by_length(encoder, x, lengths, groups=4)
    torch.testing.assert_close(grouped[0], whole[0])
    torch.testing.assert_close(grouped[1], whole[1])


def test_batch_normalizing_inception_refuses_groups():
    with pytest.raises(ConfigError, match="normalizes over its batch"):
        model({**ENCODERS["inception"], "norm": "batch"}, "single", 2, {"a": 4})


def test_padding_waste_counts_each_groups_padded_frames():
    lengths = torch.tensor([10, 3, 17, 8, 5, 30])
    batches = [torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5])]
    real = 10 + 3 + 17 + 8 + 5 + 30
    # whole batches padded to 24 and 32 frames (longest rounded up to 8; the second capped at 30)
    assert batching.padding_waste(lengths, batches, 30) == pytest.approx((3 * 24 + 3 * 30) / real - 1)
    # two groups per batch: [17, 10] | [3] and [30, 8] | [5] -> 24, 8, 30, 8 frames
    assert batching.padding_waste(lengths, batches, 30, groups=2) == pytest.approx(
        (2 * 24 + 8 + 2 * 30 + 8) / real - 1
    )

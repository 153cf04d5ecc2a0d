"""Length-bucketed batches: every clip once per epoch, deterministic per seed, little padding."""

import torch

from mer_cli import train


def _epoch(lengths: torch.Tensor, seed: int, bucket: bool = True, batch_size: int = 16, pool: int = 4):
    return train.batch_indices(lengths, batch_size, torch.Generator().manual_seed(seed), bucket, pool)


def test_bucketed_batches_cover_every_clip_exactly_once():
    lengths = torch.randint(10, 100, (203,), generator=torch.Generator().manual_seed(0))
    for bucket in (True, False):
        batches = _epoch(lengths, seed=1, bucket=bucket)
        assert sorted(torch.cat(batches).tolist()) == list(range(203))
        assert max(len(b) for b in batches) == 16
        assert len(batches) == 13  # ceil(203 / 16)


def test_bucketed_batches_are_deterministic_per_seed_and_reshuffled_across_epochs():
    lengths = torch.randint(10, 100, (200,), generator=torch.Generator().manual_seed(0))
    a, b, c = _epoch(lengths, seed=3), _epoch(lengths, seed=3), _epoch(lengths, seed=4)
    assert [t.tolist() for t in a] == [t.tolist() for t in b]
    assert [t.tolist() for t in a] != [t.tolist() for t in c]
    g = torch.Generator().manual_seed(3)  # one generator across epochs, as fit() keeps it
    first, second = (train.batch_indices(lengths, 16, g, True, 4) for _ in range(2))
    assert [t.tolist() for t in first] != [t.tolist() for t in second]


def test_bucketed_batches_pad_less_than_random_ones():
    lengths = torch.randint(40, 101, (1024,), generator=torch.Generator().manual_seed(0))

    def padded_frames(batches: list[torch.Tensor]) -> int:
        return sum(len(b) * int(lengths[b].max()) for b in batches)

    bucketed = padded_frames(_epoch(lengths, seed=0, bucket=True, batch_size=64, pool=16))
    shuffled = padded_frames(_epoch(lengths, seed=0, bucket=False, batch_size=64, pool=16))
    useful = int(lengths.sum())
    assert bucketed < 1.05 * useful < shuffled


def test_train_step_lowers_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    from mer_cli.models import BiLSTMClassifier

    model = BiLSTMClassifier(3, 2, hidden_sizes=(8,), dense_size=8, dropout=0.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    x, lengths = torch.randn(16, 5, 3), torch.full((16,), 5)
    y = (x[:, :, 0].mean(1) > 0).long()
    losses = [
        train.train_step(model, optimizer, scaler, torch.nn.CrossEntropyLoss(), x, lengths, y, torch.float32)[
            0
        ].item()
        for _ in range(30)
    ]
    assert losses[-1] < 0.5 * losses[0]

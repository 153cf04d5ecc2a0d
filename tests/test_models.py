"""Exact masking: the fast ``reverse`` BiLSTM equals the packed-sequence reference."""

import torch

from mer_cli.models import BiLSTMClassifier, MaskedBiLSTM, reverse_within_length


def _random_batch(seed: int, batch: int = 6, max_len: int = 13, n_features: int = 5):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (batch,), generator=g)
    lengths[0] = max_len
    x = torch.randn(batch, max_len, n_features, generator=g, dtype=torch.float64)
    x = x * (torch.arange(max_len)[None, :] < lengths[:, None])[:, :, None]
    return x, lengths


def test_reverse_within_length_reverses_real_frames_only_and_is_its_own_inverse():
    x = torch.arange(10.0).reshape(2, 5, 1)
    lengths = torch.tensor([3, 5])
    rev = reverse_within_length(x, lengths)
    assert rev[0, :, 0].tolist() == [2.0, 1.0, 0.0, 3.0, 4.0]  # padding stays in place
    assert rev[1, :, 0].tolist() == [9.0, 8.0, 7.0, 6.0, 5.0]
    assert torch.equal(reverse_within_length(rev, lengths), x)


def test_masked_bilstm_matches_packed_outputs_and_gradients():
    for seed in range(3):
        torch.manual_seed(seed)
        fast = MaskedBiLSTM(5, 7, impl="reverse").double()
        packed = MaskedBiLSTM(5, 7, impl="packed").double()
        packed.load_state_dict(fast.state_dict())
        x, lengths = _random_batch(seed)
        outs = []
        for layer in (fast, packed):
            xi = x.clone().requires_grad_(True)
            seq, last = layer(xi, lengths)
            (seq.square().sum() + last.sin().sum()).backward()
            outs.append((seq.detach(), last.detach(), xi.grad, [p.grad for p in layer.parameters()]))
        (seq_f, last_f, gx_f, gp_f), (seq_p, last_p, gx_p, gp_p) = outs
        torch.testing.assert_close(seq_f, seq_p, rtol=0, atol=1e-6)
        torch.testing.assert_close(last_f, last_p, rtol=0, atol=1e-6)
        torch.testing.assert_close(gx_f, gx_p, rtol=0, atol=1e-6)
        for a, b in zip(gp_f, gp_p, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_classifier_ignores_padding_frames():
    torch.manual_seed(0)
    model = BiLSTMClassifier(5, 6, hidden_sizes=(8, 4), dense_size=16).double().eval()
    x, lengths = _random_batch(1)
    garbage = x + 100 * (torch.arange(x.shape[1])[None, :] >= lengths[:, None])[:, :, None]
    longer = torch.cat([x, torch.randn(x.shape[0], 4, x.shape[2], dtype=x.dtype)], dim=1)
    with torch.no_grad():
        ref = model(x, lengths)
        torch.testing.assert_close(model(garbage, lengths), ref, rtol=0, atol=1e-12)
        torch.testing.assert_close(model(longer, lengths), ref, rtol=0, atol=1e-12)

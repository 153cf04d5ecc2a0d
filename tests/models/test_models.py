import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from conftest import REPO, STREAM, bilstm, inputs, run_cli
from mer_cli.models.encoders.inception import NORMS
from mer_cli.models.encoders.rnn import BiLSTMEncoder, BiRNNEncoder
from mer_cli.models.encoders.transformer import TransformerEncoder
from mer_cli.models.layers import MASKING_IMPLS, MaskedBiLSTM, reverse_within_length
from mer_cli.runs.trained import build_model


def _batch(b=5, t=12, f=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    lengths[0] = t
    x = torch.randn(b, t, f, generator=g)
    x = x * (torch.arange(t)[None, :] < lengths[:, None])[:, :, None]
    return x, lengths


def test_reverse_within_length_reverses_real_frames_and_is_its_own_inverse():
    x = torch.arange(5.0).repeat(2, 1)[:, :, None]  # (2, 5, 1)
    lengths = torch.tensor([5, 3])
    r = reverse_within_length(x, lengths)
    assert r[:, :, 0].tolist() == [[4, 3, 2, 1, 0], [2, 1, 0, 3, 4]]
    assert torch.equal(reverse_within_length(r, lengths), x)


def test_masked_bilstm_equals_a_packed_bidirectional_lstm_outputs_and_gradients():
    torch.manual_seed(0)
    x, lengths = _batch()
    layer = MaskedBiLSTM(4, 6)
    ref = nn.LSTM(4, 6, batch_first=True, bidirectional=True)
    with torch.no_grad():  # same weights: forward direction, then the reverse direction
        for name, p in layer.forward_lstm.named_parameters():
            getattr(ref, name).copy_(p)
        for name, p in layer.backward_lstm.named_parameters():
            getattr(ref, f"{name}_reverse").copy_(p)

    x1 = x.clone().requires_grad_(True)
    out, last = layer(x1, lengths)
    x2 = x.clone().requires_grad_(True)
    packed = pack_padded_sequence(x2, lengths, batch_first=True, enforce_sorted=False)
    ref_packed, (h_n, _) = ref(packed)
    ref_out, _ = nn.utils.rnn.pad_packed_sequence(ref_packed, batch_first=True, total_length=x.shape[1])
    ref_last = torch.cat([h_n[0], h_n[1]], dim=1)

    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(last, ref_last, atol=1e-6, rtol=1e-5)
    (out.sum() + last.square().sum()).backward()
    (ref_out.sum() + ref_last.square().sum()).backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-6, rtol=1e-5)
    for name, p in layer.forward_lstm.named_parameters():
        torch.testing.assert_close(p.grad, getattr(ref, name).grad, atol=1e-5, rtol=1e-4)
    for name, p in layer.backward_lstm.named_parameters():
        torch.testing.assert_close(p.grad, getattr(ref, f"{name}_reverse").grad, atol=1e-5, rtol=1e-4)


def test_reverse_and_packed_impls_agree():
    torch.manual_seed(1)
    x, lengths = _batch(seed=1)
    a = MaskedBiLSTM(4, 3, impl="reverse")
    b = MaskedBiLSTM(4, 3, impl="packed")
    b.load_state_dict(a.state_dict())
    for got, want in zip(a(x, lengths), b(x, lengths), strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("masking", ["reverse", "packed"])
def test_extra_zero_padding_leaves_predictions_unchanged(masking):
    torch.manual_seed(0)
    model = bilstm(4, 6, hidden_sizes=(8, 5), dense_size=16, dropout=0.5, masking=masking).eval()
    x, lengths = _batch()
    padded = torch.cat([x, torch.zeros(x.shape[0], 50, x.shape[2])], dim=1)
    with torch.no_grad():
        expected = model(inputs(x, lengths))
        torch.testing.assert_close(expected, model(inputs(padded, lengths)), atol=1e-6, rtol=1e-5)
        # and the padding's content does not matter either: it is never read
        noisy = padded.clone()
        noisy[:, x.shape[1] :] = 123.0
        torch.testing.assert_close(expected, model(inputs(noisy, lengths)), atol=1e-6, rtol=1e-5)


def test_notebook_sizes_give_about_5_5_million_parameters_on_acoustic_input():
    model = bilstm(52, 6)  # defaults are the notebook's 512/256, 512, 0.8
    n = sum(p.numel() for p in model.parameters())
    assert 5.3e6 < n < 5.7e6
    # one bias vector more per LSTM than Keras (PyTorch keeps b_ih and b_hh): 4 * 2 * 2 * (512 + 256)
    assert model(inputs(torch.zeros(3, 7, 52), torch.tensor([7, 3, 1]))).shape == (3, 6)


def test_frame_dropout_drops_the_requested_fraction_and_keeps_the_expected_value():
    from mer_cli.models.layers import FrameDropout

    torch.manual_seed(0)
    x = torch.ones(64, 50, 40, requires_grad=True)
    layer = FrameDropout(0.8)
    y = layer(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.2) < 0.01
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 5.0))  # scaled by 1 / (1 - p)
    y.sum().backward()
    assert torch.equal(x.grad != 0, kept)  # gradient flows through kept elements only
    torch.manual_seed(0)
    assert torch.equal(FrameDropout(0.8)(x), y)  # seeded: reproducible
    assert torch.equal(layer.eval()(x), x)  # identity at inference


# every encoder of configs/model/*.yaml (bilstm and gru with each masking impl, inception with each
# norm), at the smoke sizes
MODEL_DIR = REPO / "configs" / "model"
VARIANTS = {"masking": MASKING_IMPLS, "norm": NORMS}  # encoder options whose every value is tested


def _encoder_cases() -> list[tuple[str, str | None]]:
    cases: list[tuple[str, str | None]] = []
    for path in sorted(MODEL_DIR.glob("*.yaml")):
        encoder = OmegaConf.load(path).encoder
        options = [f"{k}={v}" for k, values in VARIANTS.items() if k in encoder for v in values]
        cases += [(path.stem, option) for option in options or [None]]
    return cases


def _smoke_model(model_name: str, option: str | None, dropout: float | None = None) -> nn.Module:
    """The model of configs/model/<model_name>.yaml at the smoke sizes, with the encoder option
    ``option`` ("key=value") and, where given, every dropout rate set to ``dropout``."""
    cfg = OmegaConf.load(MODEL_DIR / f"{model_name}.yaml")
    cfg.encoder.hidden_sizes = [8, 8]  # the smoke size every encoder takes
    if option is not None:
        key, value = option.split("=")
        cfg.encoder[key] = value
    if dropout is not None:
        cfg.dropout = dropout
        if "dropout" in cfg.encoder:
            cfg.encoder.dropout = dropout
    torch.manual_seed(0)
    return build_model(cfg, {STREAM: 4}, 6)


def _garbage_padded(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``x`` with 20 more frames, and 123.0, not zeros, past every clip's end."""
    padded = torch.cat([x, torch.zeros(x.shape[0], 20, x.shape[2])], dim=1)
    keep = torch.arange(padded.shape[1])[None, :] < lengths[:, None]
    return torch.where(keep[:, :, None], padded, 123.0)


@pytest.mark.parametrize(("model_name", "option"), _encoder_cases())
def test_every_encoder_is_exact_under_padding_and_batching(model_name, option):
    model = _smoke_model(model_name, option).eval()
    g = torch.Generator().manual_seed(3)
    for m in model.modules():  # a trained batch norm's statistics, not a fresh one's identity map
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            for t in (m.running_mean, m.weight, m.bias):
                t.data = torch.randn(t.shape, generator=g)
            m.running_var.data = torch.rand(m.running_var.shape, generator=g) + 0.5
    x, lengths = _batch(b=5, t=12, f=4, seed=2)
    lengths[1] = 1  # a one-frame clip too
    x = x * (torch.arange(12)[None, :] < lengths[:, None])[:, :, None]
    padded = _garbage_padded(x, lengths)
    with torch.no_grad():
        frames, pooled = model.encoder(padded, lengths)
        logits = model(inputs(padded, lengths))
        assert frames.shape[:2] == padded.shape[:2] and pooled.shape == (5, model.encoder.out_features)
        for i, n in enumerate(lengths.tolist()):
            alone_frames, alone_pooled = model.encoder(x[i : i + 1, :n], lengths[i : i + 1])
            alone_logits = model(inputs(x[i : i + 1, :n], lengths[i : i + 1]))
            torch.testing.assert_close(frames[i, :n], alone_frames[0], atol=1e-5, rtol=1e-5)
            assert torch.all(frames[i, n:] == 0), "per-frame outputs are zero past the clip's end"
            torch.testing.assert_close(pooled[i], alone_pooled[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(logits[i], alone_logits[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("model_name", "option"), _encoder_cases())
def test_every_encoder_in_training_mode_never_reads_the_padding(model_name, option):
    # dropout off (its masks are drawn per padded shape); what is left of training mode is batch
    # statistics: they may couple the clips of a batch, never read its padding
    model = _smoke_model(model_name, option, dropout=0.0).train()
    x, lengths = _batch(b=5, t=12, f=4, seed=4)
    lengths[1] = 1
    x = x * (torch.arange(12)[None, :] < lengths[:, None])[:, :, None]
    frames, pooled = model.encoder(_garbage_padded(x, lengths), lengths)
    tight_frames, tight_pooled = model.encoder(x, lengths)
    torch.testing.assert_close(frames[:, :12], tight_frames, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, tight_pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        model(inputs(_garbage_padded(x, lengths), lengths)), model(inputs(x, lengths)), atol=1e-5, rtol=1e-5
    )
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.encoder.modules()):
        return  # a batch norm's training statistics are the batch's real frames (test_inception.py)
    for i, n in enumerate(lengths.tolist()):  # no batch statistics: each clip is on its own
        alone_frames, alone_pooled = model.encoder(x[i : i + 1, :n], lengths[i : i + 1])
        torch.testing.assert_close(frames[i, :n], alone_frames[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pooled[i], alone_pooled[0], atol=1e-5, rtol=1e-5)


def test_gru_encoder_uses_gru_cells_and_keeps_the_lstm_state_dict_names():
    gru = BiRNNEncoder(4, (6, 3), cell="gru")
    assert all(isinstance(m, nn.GRU) for m in gru.modules() if isinstance(m, nn.RNNBase))
    assert "grus.0.forward_gru.weight_ih_l0" in gru.state_dict()
    lstm = BiLSTMEncoder(4, (6, 3))  # the names of every checkpoint written before GRUs existed
    assert "lstms.0.forward_lstm.weight_ih_l0" in lstm.state_dict()
    assert "lstms.1.backward_lstm.bias_hh_l0" in lstm.state_dict()


def test_transformer_attention_dropout_acts_on_the_attention_weights_in_training_only():
    x, lengths = _batch(b=3, t=10, f=4, seed=1)
    torch.manual_seed(0)
    plain = TransformerEncoder(4, (8, 8), heads=2, dropout=0.0)  # the default: no attention dropout
    dropped = TransformerEncoder(4, (8, 8), heads=2, dropout=0.0, attention_dropout=0.5)
    dropped.load_state_dict(plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(dropped.eval()(x, lengths)[1], plain.eval()(x, lengths)[1])
        torch.manual_seed(1)
        a = plain.train()(x, lengths)[1]
        torch.manual_seed(1)
        b = plain(x, lengths)[1]
        torch.manual_seed(1)
        c = dropped.train()(x, lengths)[1]
    assert torch.equal(a, b), "with only zero dropouts, training mode is deterministic"
    assert not torch.allclose(a, c), "attention_dropout=0.5 changes the training-mode output"


SMOKE_MODALITIES = ("acoustic", "visual", "early", "late")


# the models that tests/reporting/test_compare.py's smoke sweep of every encoder in every modality
# (benchmarks/compare_report.ENCODERS) does not train
NOT_IN_THE_ZOO_SWEEP = ("inception",)


def test_every_model_config_is_trained_by_one_smoke_sweep_or_the_other():
    import compare_report  # benchmarks/compare_report.py (pytest's pythonpath): the sweep's encoders

    zoo_sweep = set(compare_report.ENCODERS)
    assert {p.stem for p in MODEL_DIR.glob("*.yaml")} == zoo_sweep | set(NOT_IN_THE_ZOO_SWEEP)


@pytest.mark.slow
@pytest.mark.parametrize("model_name", NOT_IN_THE_ZOO_SWEEP)
def test_every_model_trains_every_modality_in_a_smoke_run(model_name, tmp_path):
    # one multirun per model (late reuses the sweep's acoustic and visual members): experiment=smoke
    # shrinks every encoder through the size key they all take, model.encoder.hidden_sizes
    sweep = tmp_path / "sweep"
    proc = run_cli(
        "train",
        "-m",
        "experiment=smoke",
        f"model={model_name}",
        f"modality={','.join(SMOKE_MODALITIES)}",
        "compare.enabled=false",
        "runtime.save_plots=false",
        f"hydra.sweep.dir={sweep}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    encoder = OmegaConf.load(MODEL_DIR / f"{model_name}.yaml").encoder.name
    for i, modality in enumerate(SMOKE_MODALITIES):
        job = sweep / f"{i}_{modality}_seed0"
        assert (job / "metrics.json").is_file(), f"{model_name} x {modality}: no metrics.json"
        cfg = OmegaConf.load(job / "config.yaml")
        assert cfg.model.encoder.name == encoder and list(cfg.model.encoder.hidden_sizes) == [8, 8]


def test_tcn_mean_and_max_pooling_reads_real_frames_only():
    from mer_cli.models.encoders.tcn import TCNEncoder

    torch.manual_seed(0)
    encoder = TCNEncoder(4, (8, 8), pooling="meanmax").eval()
    x, lengths = _batch(b=4, t=10, f=4, seed=3)
    padded = torch.cat([x, torch.full((4, 7, 4), -123.0)], dim=1)
    with torch.no_grad():
        _, pooled = encoder(padded, lengths)
        assert pooled.shape == (4, 16)
        for i, n in enumerate(lengths.tolist()):
            torch.testing.assert_close(
                pooled[i], encoder(x[i : i + 1, :n], lengths[i : i + 1])[1][0], atol=1e-5, rtol=1e-5
            )

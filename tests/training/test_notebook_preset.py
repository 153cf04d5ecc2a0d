"""experiment=notebook trains as the Keras notebook did, defaults included (docs/notebook-settings.md)."""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from conftest import compose_train
from mer_cli.core import artifacts
from mer_cli.preprocess import sequences
from mer_cli.runs import trained
from mer_cli.training import loop


@pytest.fixture(scope="module")
def notebook():
    return compose_train("experiment=notebook")


def _optimizer(cfg, params):
    return instantiate(cfg.trainer.optimizer)(params)


# ---------------------------------------------------------------------------------------------
# Optimizer: TensorFlow Addons' AdaBelief(learning_rate=1e-3, weight_decay=1e-3, amsgrad=True,
# epsilon=1e-7), every other argument at its TFA default.


def test_optimizer_has_the_tfa_arguments_and_defaults(notebook):
    opt = _optimizer(notebook, [nn.Parameter(torch.zeros(3))])
    group = opt.param_groups[0]
    assert type(opt).__name__ == "AdaBelief"
    assert group["lr"] == 1e-3 and group["weight_decay"] == 1e-3 and group["eps"] == 1e-7
    assert tuple(group["betas"]) == (0.9, 0.999)
    assert group["ams_bound"] is True  # amsgrad=True
    assert group["rectify"] is True  # TFA's default, pytorch_optimizer's is False
    assert opt.n_sma_threshold == 5 and opt.degenerated_to_sgd is True  # sma_threshold=5.0
    # decoupled decay scaled by the learning rate (TFA: lr * (update + wd * var))
    assert group["weight_decouple"] is True and group["fixed_decay"] is False


def _tfa_adabelief(params, grads, lrs, wd=1e-3, eps=1e-7, b1=0.9, b2=0.999, threshold=5.0):
    """The update TFA's AdaBelief (amsgrad, rectify, no warmup) applies, step by step."""
    p = params.clone()
    m, s, s_max = torch.zeros_like(p), torch.zeros_like(p), torch.zeros_like(p)
    rho_inf = 2.0 / (1.0 - b2) - 1.0
    for t, (g, lr) in enumerate(zip(grads, lrs, strict=True), start=1):
        m = b1 * m + (1 - b1) * g
        s = b2 * s + (1 - b2) * (g - m) ** 2 + eps
        s_max = torch.maximum(s_max, s)
        m_hat = m / (1 - b1**t)
        root = torch.sqrt(s_max / (1 - b2**t))
        rho = rho_inf - 2.0 * t * b2**t / (1 - b2**t)
        if rho >= threshold:
            r = math.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
            update = r * m_hat / (root + eps)
        else:  # the first 5 steps: bias-corrected momentum, no adaptive scaling
            update = m_hat
        p = p - lr * (update + wd * p)
    return p


def _run(cfg_optimizer, params, grads, lrs):
    p = nn.Parameter(params.clone())
    opt = instantiate(cfg_optimizer)([p])
    for g, lr in zip(grads, lrs, strict=True):
        opt.param_groups[0]["lr"] = lr  # as ReduceLROnPlateau would set it
        p.grad = g.clone()
        opt.step()
    return p.detach()


@pytest.mark.parametrize("steps", [3, 5, 6, 40])  # before, at and after the rectification threshold
def test_optimizer_steps_as_tfa_adabelief(notebook, steps):
    g = torch.Generator().manual_seed(0)
    params = torch.randn(64, generator=g, dtype=torch.float64)
    grads = [torch.randn(64, generator=g, dtype=torch.float64) * 0.1 + 0.05 for _ in range(steps)]
    lrs = [1e-3 if t < 20 else 8e-4 for t in range(steps)]  # an LR cut mid-way
    expected = _tfa_adabelief(params, grads, lrs)
    moved = (expected - params).abs().max()
    got = _run(notebook.trainer.optimizer, params, grads, lrs)
    # equal but for where eps sits outside the root (bias-corrected or not): ~1e-6 of a step here
    assert (got - expected).abs().max() < 1e-4 * moved
    # pytorch_optimizer's default rectify=False takes Adam-sized steps from the first one: 5-11x
    # farther than TFA here
    unrectified = notebook.trainer.optimizer.copy()
    unrectified.rectify = False
    assert (_run(unrectified, params, grads, lrs) - expected).abs().max() > 2 * moved


def test_optimizer_state_resumes_from_a_weights_only_checkpoint(notebook, tmp_path):
    p = nn.Parameter(torch.ones(4))
    opt = _optimizer(notebook, [p])
    p.grad = torch.ones(4)
    opt.step()
    artifacts.save_checkpoint(tmp_path / "last.pt", {"optimizer": opt.state_dict()})
    state = artifacts.load_checkpoint(tmp_path / "last.pt")["optimizer"]  # weights_only=True
    fresh = _optimizer(notebook, [nn.Parameter(torch.ones(4))])
    fresh.load_state_dict(state)
    assert fresh.param_groups[0]["step"] == 1 and list(fresh.param_groups[0]["betas"]) == [0.9, 0.999]


# ---------------------------------------------------------------------------------------------
# Callbacks and the training loop


def test_plateau_threshold_is_keras_absolute_min_delta(notebook):
    sched = instantiate(notebook.trainer.scheduler)(_optimizer(notebook, [nn.Parameter(torch.zeros(1))]))
    assert (sched.mode, sched.factor, sched.min_lrs, sched.cooldown) == ("min", 0.8, [3e-5], 0)
    # Keras counts an epoch as better when val_loss < best - 1e-4, whatever the loss's size
    for loss, best in [(10.0, 10.0), (9.9995, 9.9995), (9.99945, 9.9995), (9.99939, 9.99939)]:
        sched.step(loss)
        assert sched.best == best  # 9.9995 is better: a relative 1e-4 would have needed < 9.999


def test_loop_is_keras_fit(notebook):
    settings = loop.Settings(**notebook.trainer.loop)
    assert (settings.batch_size, settings.max_epochs, settings.patience_epochs) == (128, 100, 20)
    assert settings.precision == "fp32"  # Keras' float32 policy, no autocast
    assert settings.bucket_by_length is False  # fit(shuffle=True): uniformly shuffled batches


def test_other_runs_keep_their_own_defaults():
    cfg = compose_train()
    assert cfg.trainer.loop.precision == "auto" and cfg.trainer.loop.bucket_by_length is True
    assert "threshold_mode" not in cfg.trainer.scheduler
    assert cfg.model.get("init", "torch") == "torch"


# ---------------------------------------------------------------------------------------------
# Model: Keras initializers and BatchNormalization defaults


def _net(cfg, n_features=52):
    torch.manual_seed(0)
    return trained.build_model(cfg.model, n_features={"acoustic": n_features}, n_classes=6)


def test_batchnorm_is_keras_momentum_and_epsilon(notebook):
    bn = next(m for m in _net(notebook).modules() if isinstance(m, nn.BatchNorm1d))
    assert bn.momentum == pytest.approx(1 - 0.99) and bn.eps == 1e-3
    default = next(m for m in _net(compose_train()).modules() if isinstance(m, nn.BatchNorm1d))
    assert (default.momentum, default.eps) == (0.1, 1e-5)  # the default model is unchanged


def test_weights_start_as_keras_draws_them(notebook):
    net = _net(notebook)
    lstms = [m for m in net.modules() if isinstance(m, nn.LSTM)]
    assert len(lstms) == 4  # two bidirectional layers, one LSTM per direction
    for lstm in lstms:
        h = lstm.hidden_size
        bias = lstm.bias_ih_l0 + lstm.bias_hh_l0  # Keras' single bias
        assert torch.equal(bias[h : 2 * h], torch.ones(h))  # unit_forget_bias
        assert not bias[:h].any() and not bias[2 * h :].any()
        w_hh = lstm.weight_hh_l0.detach()  # orthogonal: (4H, H) with orthonormal columns
        assert torch.allclose(w_hh.T @ w_hh, torch.eye(h), atol=1e-4)
        w_ih = lstm.weight_ih_l0
        limit = math.sqrt(6 / (w_ih.shape[0] + w_ih.shape[1]))  # glorot_uniform
        assert w_ih.abs().max() <= limit and w_ih.abs().max() > 0.9 * limit
    for dense in (m for m in net.modules() if isinstance(m, nn.Linear)):
        limit = math.sqrt(6 / sum(dense.weight.shape))
        assert dense.weight.abs().max() <= limit and not dense.bias.any()


def test_default_model_keeps_pytorch_initialization():
    net = _net(compose_train())
    lstm = next(m for m in net.modules() if isinstance(m, nn.LSTM))
    assert lstm.bias_hh_l0.abs().min() > 0  # PyTorch draws both LSTM biases
    assert next(m for m in net.modules() if isinstance(m, nn.Linear)).bias.abs().min() > 0


# ---------------------------------------------------------------------------------------------
# Masking(mask_value=0): Keras skips every all-zero frame (the LSTM state carries over it, in
# both directions and in the second BiLSTM, which receives the mask); mer-cli drops those frames.


def _keras_masked_bilstm(layers, x: torch.Tensor) -> torch.Tensor:
    """The notebook's BiLSTM stack on one clip (T, F), written as Keras runs it under Masking(0):
    a masked step leaves (h, c) as they were. Returns the last layer's two final states."""
    mask = (x != 0).any(dim=1)
    for layer in layers:
        finals, outputs = [], []
        scans = ((layer.forward_lstm, range(len(x))), (layer.backward_lstm, reversed(range(len(x)))))
        for lstm, steps in scans:
            cell = nn.LSTMCell(lstm.input_size, lstm.hidden_size)
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(cell, name).data.copy_(getattr(lstm, f"{name}_l0"))
            h = c = torch.zeros(1, lstm.hidden_size)
            out = torch.zeros(len(x), lstm.hidden_size)
            for t in steps:
                if mask[t]:
                    h, c = cell(x[t : t + 1], (h, c))
                out[t] = h[0]
            finals.append(h[0])
            outputs.append(out)
        x = torch.cat(outputs, dim=1)
    return torch.cat(finals)


def test_skipping_zero_frames_gives_what_keras_masking_gives_the_notebooks_bilstm(notebook):
    assert notebook.preprocess.skip_zero_frames is True
    torch.manual_seed(0)
    model = trained.build_model(notebook.model, {"acoustic": 5}, 6)
    encoder = model.encoder.eval()  # eval: the dropout between the layers is the identity
    for layer in encoder.lstms:  # the notebook's sizes, as the reference scans them
        assert layer.forward_lstm.hidden_size in (512, 256)
    clip = torch.randn(12, 5)
    clip[[0, 4, 5, 11]] = 0.0  # all-zero frames at the start, inside and at the end
    clip[7, :3] = 0.0  # some zero features: a real frame
    prep = sequences.StreamPrep(sequences.TargetLength(12), None, skip_zero_frames=True)
    kept = torch.from_numpy(prep.apply([clip.numpy()]).clip(0))
    assert len(kept) == 8
    with torch.no_grad():
        _, pooled = encoder(kept[None], torch.tensor([len(kept)]))
        expected = _keras_masked_bilstm(encoder.lstms, clip)
    torch.testing.assert_close(pooled[0], expected, atol=2e-5, rtol=1e-4)
    with torch.no_grad():  # and reading the zero frames as frames (no skipping) gives another output
        _, unskipped = encoder(clip[None], torch.tensor([12]))
    assert not torch.allclose(unskipped[0], expected, atol=1e-3)

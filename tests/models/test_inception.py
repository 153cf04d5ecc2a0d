"""model=inception: its masked batch norm against torch's on the real frames alone, its receptive
field, its sizes and errors, every multi-stream fusion, and a trained run exported."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import compose_train
from mer_cli.core.errors import ConfigError
from mer_cli.data.load import load_data
from mer_cli.models import registry
from mer_cli.models.encoders.inception import NORMS, InceptionEncoder, MaskedBatchNorm1d
from mer_cli.runs import execute, trained
from mer_cli.serving import export


def _frames(b: int, t: int, f: int, seed: int, fill: float = 123.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, F) frames with ``fill`` past each clip's end (the first clip is full), lengths (B,)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    lengths[0] = t
    x = torch.randn(b, t, f, generator=g)
    keep = torch.arange(t)[None, :, None] < lengths[:, None, None]
    return torch.where(keep, x, fill), lengths


def _trained_statistics(model: nn.Module, seed: int = 0) -> None:
    """Random running statistics and affine parameters in every batch norm (a trained model's,
    not a fresh one's identity map)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            for t in (m.running_mean, m.weight, m.bias):
                t.data = torch.randn(t.shape, generator=g)
            m.running_var.data = torch.rand(m.running_var.shape, generator=g) + 0.5


def test_masked_batch_norm_is_torch_batch_norm_on_the_real_frames_alone():
    x, lengths = _frames(b=4, t=9, f=5, seed=0)
    x = x.transpose(1, 2).contiguous()  # (B, C, T)
    mask = (torch.arange(9)[None, :] < lengths[:, None])[:, None, :].float()
    real = x.transpose(1, 2)[mask[:, 0].bool()]  # (real frames, C): what torch's batch norm sees
    ours, ref = MaskedBatchNorm1d(5), nn.BatchNorm1d(5)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 2.0)
        ours.bias.normal_()
    ref.load_state_dict(ours.state_dict())
    for step in range(3):  # running statistics after several updates
        x1, r1 = x.clone().requires_grad_(True), real.clone().requires_grad_(True)
        y = ours(x1, mask)
        y_ref = ref(r1)
        torch.testing.assert_close(y.transpose(1, 2)[mask[:, 0].bool()], y_ref, atol=1e-5, rtol=1e-5)
        w = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(step))
        (y.transpose(1, 2)[mask[:, 0].bool()] * w).sum().backward()
        (y_ref * w).sum().backward()
        torch.testing.assert_close(x1.grad.transpose(1, 2)[mask[:, 0].bool()], r1.grad, atol=1e-5, rtol=1e-5)
        assert torch.all(x1.grad * (1 - mask) == 0), "no gradient reaches a padded frame"
    for name, want in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[name], want, atol=1e-6, rtol=1e-5, msg=name)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad, atol=1e-5, rtol=1e-5)
    ours.eval(), ref.eval()
    with torch.no_grad():  # eval: the running statistics' per-frame affine map, as torch's
        torch.testing.assert_close(ours(x, mask), ref(x), atol=1e-6, rtol=1e-5)


def test_a_frame_sees_229_frames_at_the_default_sizes():
    # six modules with kernels up to 39: 1 + 6 x 38 frames, centred on the frame
    torch.manual_seed(0)
    encoder = InceptionEncoder(3).eval()
    x = torch.randn(1, 400, 3, requires_grad=True)
    frames, _ = encoder(x, torch.tensor([400]))
    frames[0, 200].sum().backward()
    seen = (x.grad[0].abs().sum(dim=1) > 0).nonzero()[:, 0]
    assert (seen.min().item(), seen.max().item()) == (200 - 114, 200 + 114)


def test_sizes_and_shortcuts():
    encoder = InceptionEncoder(52)
    assert encoder.out_features == 64 and len(encoder.shortcuts) == 2  # a shortcut every 3 modules
    assert len(InceptionEncoder(4, (8, 8)).shortcuts) == 1  # the smoke size keeps one
    assert len(InceptionEncoder(4, (8,) * 7).shortcuts) == 3  # 3 + 3 + 1
    assert 100_000 < sum(p.numel() for p in encoder.parameters()) < 150_000


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("hidden_sizes", [8, 10], r"hidden_sizes \[8, 10\]: each a multiple of 4"),
        ("kernel_sizes", [9, 20], "odd, so the convolutions are centred"),
        ("norm", "group", "norm 'group': valid: batch, layer"),
    ],
)
def test_sizes_that_cannot_be_built_are_one_config_error_line(option, value, message):
    description = {"encoder": {"name": "inception", option: value}, "dense_size": 16}
    with pytest.raises(ConfigError, match=message):
        registry.build(description, {"x": 4}, 6)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("classifier", ["joint", "xattn"])
def test_every_multi_stream_fusion_gives_a_clip_alone_its_row_of_a_padded_batch(classifier, norm):
    description = {
        "classifier": classifier,
        "encoder": {"name": "inception", "hidden_sizes": [8, 8, 8, 8], "norm": norm},
        "dense_size": 16,
        **({"attention_heads": 2} if classifier == "xattn" else {}),
    }
    torch.manual_seed(0)
    model = registry.build(description, {"acoustic": 5, "visual": 3}, 6).eval()
    _trained_statistics(model)
    batch = {"acoustic": _frames(5, 40, 5, seed=1), "visual": _frames(5, 9, 3, seed=2)}
    padded = {
        s: (torch.cat([x, torch.full((5, 11, x.shape[2]), 7.0)], dim=1), n) for s, (x, n) in batch.items()
    }
    with torch.no_grad():
        together = model(padded)
        for i in range(5):  # each clip alone, cut to its own lengths: no padding, no companions
            alone = {s: (x[i : i + 1, : int(n[i])], n[i : i + 1]) for s, (x, n) in batch.items()}
            torch.testing.assert_close(together[i : i + 1], model(alone), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("modality", ["acoustic", "xattn"])
def test_a_trained_run_reloads_from_its_checkpoint_and_exports_exactly(tmp_path: Path, modality: str):
    run = tmp_path / modality
    cfg = compose_train(
        "experiment=smoke",
        "model=inception",
        f"modality={modality}",
        "data.limit_per_split=24",
        "data.generator.n_actors=10",
        "trainer.loop.max_epochs=1",
        "runtime.save_plots=false",
    )
    metrics = execute.run(cfg, run)
    model, _, meta = trained.load_trained(run)
    assert meta["model_config"]["encoder"]["name"] == "inception"
    # a trained batch norm: its running statistics moved, and the reloaded model has them
    norms = [m for m in model.modules() if isinstance(m, MaskedBatchNorm1d)]
    assert norms and all(int(m.num_batches_tracked) > 0 for m in norms)
    # the reloaded model predicts what training scored
    again = trained.predict_run(run, load_data(cfg.data), ("test",))["test"]
    recorded = json.loads((run / "metrics.json").read_text())["test"]
    assert recorded["n_clips"] == metrics["test"]["n_clips"] == len(again.y_true) == 24
    assert np.mean(again.y_prob.argmax(axis=1) == again.y_true) == pytest.approx(recorded["accuracy"])
    nll = -np.log(again.y_prob[np.arange(24), again.y_true]).mean()
    assert nll == pytest.approx(recorded["nll"], abs=1e-5)
    for fmt in ("torchscript", "onnx"):  # export checks the file against torch, and a clip alone
        if fmt == "onnx":
            pytest.importorskip("onnxruntime", reason="the export extra is not installed")
        sidecar = export.export(run, fmt, tmp_path / f"{modality}{export.FORMATS[fmt]}")
        assert sidecar["check"]["max_abs_diff"] < 1e-5


@pytest.mark.parametrize("affine", [True, False])
def test_masked_batch_norms_closed_form_gradient_matches_finite_differences(affine):
    # the hand-written backward against numerical derivatives in float64, padded frames included
    torch.manual_seed(0)
    norm = MaskedBatchNorm1d(3, affine=affine).double().train()
    x = torch.randn(3, 3, 6, dtype=torch.float64, requires_grad=True)
    mask = (torch.arange(6)[None, :] < torch.tensor([6, 4, 2])[:, None])[:, None, :].double()
    params = [norm.weight, norm.bias] if affine else []
    if affine:
        with torch.no_grad():
            norm.weight.uniform_(0.5, 2.0), norm.bias.normal_()

    def f(x, *p):
        return norm(x, mask) * mask

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6)


def test_masked_batch_norm_in_bf16_agrees_with_float32_to_bf16_precision():
    # the bf16 path (autocast's dtype on the CPU) runs torch's mixed-dtype kernels: outputs and
    # gradients within a few bf16 roundings (2^-8 = 0.4 %) of the float32 ones
    torch.manual_seed(0)
    x = torch.randn(16, 8, 50) * 3 + 2
    mask = (torch.arange(50)[None, :] < torch.randint(10, 51, (16,))[:, None])[:, None, :].float()
    norm = MaskedBatchNorm1d(8)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0), norm.bias.normal_()
    w = torch.randn(16, 8, 50)

    def run(dtype):
        x1 = x.to(dtype).requires_grad_(True)
        norm.zero_grad()
        y = norm(x1, mask) * mask
        (y.float() * w).sum().backward()
        return y.float(), x1.grad.float(), norm.weight.grad.clone(), norm.bias.grad.clone()

    for low, high in zip(run(torch.bfloat16), run(torch.float32), strict=True):
        assert float((low - high).norm() / high.norm()) < 0.01

"""Jointly trained multi-stream models (modality=joint, xattn) and OGM gradient modulation."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import run_cli
from mer_cli.models.encoders.rnn import BiLSTMEncoder
from mer_cli.models.fusion.joint import JointClassifier
from mer_cli.models.fusion.streams import MultiStreamClassifier, ogm_coefficients
from mer_cli.models.fusion.xattn import CrossAttentionClassifier
from mer_cli.runs import identity
from mer_cli.training import loop

FEATURES = {"acoustic": 5, "visual": 3}
MODELS = {"joint": JointClassifier, "xattn": CrossAttentionClassifier}


def _model(kind: str, ogm_alpha: float | None = None, masking: str = "reverse") -> MultiStreamClassifier:
    return MODELS[kind](
        FEATURES,
        6,
        lambda f: BiLSTMEncoder(f, (8, 4), 0.5, masking),
        dense_size=16,
        dropout=0.5,
        ogm_alpha=ogm_alpha,
    )


def _batch(b: int = 5, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Two streams at different frame counts, zero after each clip's length."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for (name, f), t in zip(FEATURES.items(), (20, 7), strict=True):
        lengths = torch.randint(1, t + 1, (b,), generator=g)
        lengths[0] = t
        x = torch.randn(b, t, f, generator=g) * (torch.arange(t)[None, :] < lengths[:, None])[:, :, None]
        out[name] = (x, lengths)
    return out


@pytest.mark.parametrize("masking", ["reverse", "packed"])
@pytest.mark.parametrize("kind", ["joint", "xattn"])
def test_a_clip_gets_the_same_output_alone_as_in_a_padded_batch_with_garbage_padding(kind, masking):
    torch.manual_seed(0)
    model = _model(kind, masking=masking).eval()
    batch = _batch()
    noisy = {}
    for name, (x, lengths) in batch.items():
        padded = torch.cat([x, torch.zeros(x.shape[0], 13, x.shape[2])], dim=1)
        keep = torch.arange(padded.shape[1])[None, :] < lengths[:, None]
        noisy[name] = (torch.where(keep[:, :, None], padded, torch.full_like(padded, 123.0)), lengths)
    with torch.no_grad():
        together = model(noisy)
        for i in range(5):  # each clip alone, cut to its own lengths: no padding, no companions
            alone = {n: (x[i : i + 1, : int(ln[i])], ln[i : i + 1]) for n, (x, ln) in batch.items()}
            torch.testing.assert_close(together[i : i + 1], model(alone), atol=1e-5, rtol=1e-5)


def test_ogm_coefficient_slows_only_the_dominant_stream():
    k = ogm_coefficients({"acoustic": torch.tensor(6.0), "visual": torch.tensor(3.0)}, alpha=0.5)
    assert k["acoustic"] == pytest.approx(1 - math.tanh(0.5 * (6 / 3 - 1)))  # ratio 2: 0.538
    assert k["visual"] == 1.0
    assert ogm_coefficients({"a": torch.tensor(2.0), "v": torch.tensor(2.0)}, alpha=1.0) == {
        "a": 1.0,
        "v": 1.0,
    }


def _grads(model: nn.Module, inputs, y) -> dict[str, torch.Tensor]:
    model.train()
    torch.manual_seed(1)  # same dropout masks
    model.zero_grad()
    nn.functional.cross_entropy(model(inputs), y).backward()
    model.modulate_gradients(inputs, y)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["joint", "xattn"])
def test_ogm_scales_the_dominant_streams_encoder_gradients_only(kind):
    torch.manual_seed(0)
    plain = _model(kind)
    ogm = _model(kind, ogm_alpha=2.0)
    ogm.load_state_dict(plain.state_dict())
    inputs, y = _batch(8), torch.arange(8) % 6
    g0, g1 = _grads(plain, inputs, y), _grads(ogm, inputs, y)
    k = ogm.last_coefficients
    assert sorted(k) == ["acoustic", "visual"]
    assert min(k.values()) < 1.0 and max(k.values()) == 1.0
    for name, grad in g0.items():
        stream = name.split(".")[1] if name.startswith("encoders.") else None
        expected = grad * k[stream] if stream else grad
        torch.testing.assert_close(g1[name], expected, atol=0, rtol=1e-6)


@pytest.mark.parametrize("alpha", [None, 0.0])
def test_ogm_off_or_zero_trains_bit_identically_to_no_hook(alpha):
    torch.manual_seed(0)
    hooked = _model("joint", ogm_alpha=alpha)
    bare = copy.deepcopy(hooked)
    bare.modulate_gradients = None  # the training loop skips a model without the hook
    inputs, y = _batch(8), torch.arange(8) % 6
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for model in (hooked, bare):
        torch.manual_seed(3)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model.train()
        for _ in range(3):
            loop.train_step(model, opt, scaler, nn.CrossEntropyLoss(), inputs, y, torch.float32)
    for (name, a), b in zip(hooked.state_dict().items(), bare.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("modality", ["joint", "xattn"])
@pytest.mark.slow
def test_smoke_run_and_mer_evaluate_reproduce_its_metrics(tmp_path, modality):
    run = tmp_path / "run"
    overrides = ["modality.ogm_alpha=0.5"] if modality == "xattn" else []
    proc = run_cli(
        "train",
        "experiment=smoke",
        f"modality={modality}",
        "runtime.save_plots=false",
        f"hydra.run.dir={run}",
        *overrides,
    )
    assert proc.returncode == 0, proc.stderr
    trained = json.loads((run / "metrics.json").read_text())
    assert trained["run"]["modality"] == modality
    contribution = trained["test"]["stream_contribution"]
    assert sorted(contribution) == ["acoustic", "visual"]
    assert all(0.0 <= v <= 1.0 for v in contribution.values())
    proc = run_cli("evaluate", str(run), "--split", "all", "--no-plots")
    assert proc.returncode == 0, proc.stderr
    (out,) = (run / "evaluations").iterdir()
    again = json.loads((out / "metrics.json").read_text())
    for split in ("val", "test"):
        assert again[split] == trained[split], split  # exactly, loss and stream contribution included


def test_the_comparison_report_shows_each_streams_contribution_when_runs_recorded_it(tmp_path):
    from conftest import fake_run, markdown
    from mer_cli.reporting import analysis, options
    from mer_cli.reporting.collect import collect

    y = np.arange(48) % 4
    fake_run(tmp_path, "acoustic", 0, y, y)
    for seed, (a, v) in enumerate(((0.5, 0.25), (0.7, 0.35))):
        run = fake_run(tmp_path, "joint", seed, y, y)
        metrics = json.loads((run / "metrics.json").read_text())
        metrics["test"]["stream_contribution"] = {"acoustic": a, "visual": v}
        (run / "metrics.json").write_text(json.dumps(metrics))
    runs, _ = collect([tmp_path])
    result = analysis.build(runs, [], options.Settings(bootstrap_samples=100))
    by_label = {m["label"]: m for m in result["models"]}
    assert by_label["acoustic"]["stream_contribution"] is None
    assert by_label["joint"]["stream_contribution"] == pytest.approx({"acoustic": 0.6, "visual": 0.3})
    text = markdown(result, runs)
    assert "## Stream contribution" in text
    assert "| model | accuracy | acoustic only | visual only |" in text
    assert "| joint | 100.0 % | 60.0 % | 30.0 % |" in text
    assert "| acoustic | 100.0 % |" not in text.split("## Stream contribution")[1].split("##")[0]


def test_ogm_and_attention_options_are_part_of_a_models_identity():
    from mer_cli.models import modalities

    base = {"seed": 0, "modality": {"name": "xattn", "streams": ["acoustic", "visual"], "ogm_alpha": None}}
    ogm = {**base, "modality": {**base["modality"], "ogm_alpha": 0.5}}
    # else a sweep would reuse a run trained without OGM for one with it, and a report merge them
    assert identity.model_identity(base) != identity.model_identity(ogm)
    heads = {**base, "modality": {**base["modality"], "attention_heads": 2}}
    assert identity.model_identity(base) != identity.model_identity(heads)
    # the identity keeps exactly the options the modality's classifier takes
    assert modalities.get("xattn").options == ("ogm_alpha", "ogm_noise", "attention_heads")

"""trainer.class_weights, trainer.sampler and trainer.modality_dropout in the training loop: the
loss they give (by hand, scikit-learn), the clips they draw, the streams they drop."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.utils.class_weight import compute_class_weight
from torch import nn

from conftest import make_split
from mer_cli.core.artifacts import load_checkpoint
from mer_cli.core.errors import ConfigError
from mer_cli.data import spec
from mer_cli.data.splits import NOTEBOOK_CLASS_NAMES, Splits
from mer_cli.evaluation import calibration
from mer_cli.models.encoders.rnn import BiLSTMEncoder
from mer_cli.models.fusion.joint import JointClassifier
from mer_cli.preprocess import align
from mer_cli.preprocess.sequences import Ragged, SequenceSet
from mer_cli.runs import trained
from mer_cli.training import batching, loop, options
from mer_cli.training.stream_dropout import Slot, StreamDropout, slots

CLASSES = ("a", "b", "c")


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# Class weights


def _ce_by_hand(logits: list[list[float]], y: list[int], w: list[float]) -> float:
    """sum_i w[y_i] * -log softmax(z_i)[y_i] / sum_i w[y_i], one number at a time."""
    num = den = 0.0
    for z, label in zip(logits, y, strict=True):
        log_p = z[label] - math.log(sum(math.exp(v) for v in z))
        num += w[label] * -log_p
        den += w[label]
    return num / den


def test_class_weights_change_the_training_loss_exactly_as_computed_by_hand():
    logits = [[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [0.0, 0.0, 3.0], [1.0, -1.0, 0.2]]
    y = [0, 1, 2, 1]
    w = [1.0, 3.0, 0.5]
    z, t = torch.tensor(logits), torch.tensor(y)
    weighted = options.Options(class_weights=tuple(w)).loss(torch.device("cpu"))(z, t).item()
    plain = options.Options().loss(torch.device("cpu"))(z, t).item()
    assert weighted == pytest.approx(_ce_by_hand(logits, y, w), rel=1e-6)
    assert plain == pytest.approx(_ce_by_hand(logits, y, [1.0, 1.0, 1.0]), rel=1e-6)
    assert weighted != pytest.approx(plain, rel=1e-3)  # the weights did change it


def test_the_weighted_val_loss_is_the_same_weighted_cross_entropy_as_training():
    logits = [[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [0.0, 0.0, 3.0]]
    y, w = [0, 1, 1], [1.0, 3.0, 0.5]
    prob = torch.softmax(torch.tensor(logits, dtype=torch.float64), dim=1).numpy()
    assert calibration.nll(np.array(y), prob, w) == pytest.approx(_ce_by_hand(logits, y, w), rel=1e-9)


def test_balanced_weights_equal_scikit_learns_and_come_from_the_train_labels_only():
    labels = np.random.default_rng(0).choice(6, size=500, p=[0.5, 0.2, 0.1, 0.1, 0.05, 0.05])
    expected = compute_class_weight("balanced", classes=np.arange(6), y=labels)
    got = options.resolve_class_weights("balanced", labels, NOTEBOOK_CLASS_NAMES)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert max(got) > 3 * min(got)  # imbalanced enough for the check to mean something


def test_a_weight_list_is_used_as_given_and_null_is_the_plain_loss():
    labels = np.array([0, 1, 2, 2])
    assert options.resolve_class_weights([1, 2.5, 4], labels, CLASSES) == (1.0, 2.5, 4.0)
    assert options.resolve_class_weights(None, labels, CLASSES) is None


@pytest.mark.parametrize(
    ("weights", "says"),
    [
        ([1.0, 2.0], "2 weights for 3 classes"),
        ([1.0, -2.0, 1.0], "positive"),
        ([1.0, 0.0, 1.0], "positive"),
        ([1.0, float("nan"), 1.0], "positive"),
        ([1.0, "x", 1.0], "number"),
        ("inverse", "valid: null, balanced"),
    ],
)
def test_a_bad_weight_list_is_one_config_error_naming_the_key(weights, says):
    with pytest.raises(ConfigError, match=r"trainer\.class_weights") as e:
        options.resolve_class_weights(weights, np.array([0, 1, 2]), CLASSES)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_balancing_a_class_with_no_training_clip_is_one_config_error_naming_it():
    with pytest.raises(ConfigError, match="no training clip of class c"):
        options.resolve_class_weights("balanced", np.array([0, 1, 1]), CLASSES)


# ---------------------------------------------------------------------------------------------
# The balanced sampler


def _balanced_epochs(labels: torch.Tensor, lengths: torch.Tensor, seed: int, epochs: int = 1, **kw):
    settings = loop.Settings(batch_size=16, **kw)
    weights = options.Options(sampler="balanced").draw_weights(labels)
    sampler = batching.BucketBatchSampler(lengths, settings, torch.Generator().manual_seed(seed), weights)
    return [list(sampler) for _ in range(epochs)]


IMBALANCED = torch.tensor([0] * 600 + [1] * 150 + [2] * 30)  # 20 : 5 : 1


def test_the_balanced_sampler_draws_every_class_about_equally_often_from_imbalanced_labels():
    lengths = torch.randint(5, 400, (len(IMBALANCED),), generator=torch.Generator().manual_seed(1))
    (epoch,) = _balanced_epochs(IMBALANCED, lengths, seed=0)
    drawn = torch.tensor([i for batch in epoch for i in batch])
    assert len(drawn) == len(IMBALANCED)  # as many clips as the train split
    counts = torch.bincount(IMBALANCED[drawn], minlength=3).tolist()
    # 260 expected each (binomial sd 13); plain shuffling would give 600 / 150 / 30
    assert all(200 < c < 320 for c in counts), counts
    assert len(set(drawn.tolist())) < len(IMBALANCED)  # with replacement: rare clips repeat


def test_the_balanced_sampler_is_deterministic_per_seed_and_draws_anew_every_epoch():
    lengths = torch.randint(5, 400, (len(IMBALANCED),), generator=torch.Generator().manual_seed(1))
    first = _balanced_epochs(IMBALANCED, lengths, seed=3, epochs=2)
    assert _balanced_epochs(IMBALANCED, lengths, seed=3, epochs=2) == first
    assert first[0] != first[1]
    assert _balanced_epochs(IMBALANCED, lengths, seed=4)[0] != first[0]


def test_the_balanced_sampler_still_buckets_by_length():
    lengths = torch.randint(5, 400, (len(IMBALANCED),), generator=torch.Generator().manual_seed(1))

    def padded_frames(bucket: bool) -> int:
        (epoch,) = _balanced_epochs(IMBALANCED, lengths, seed=0, bucket_by_length=bucket)
        return sum(int(lengths[b].max()) * len(b) for b in epoch)

    assert padded_frames(True) < 0.7 * padded_frames(False)


# ---------------------------------------------------------------------------------------------
# Modality dropout

FEATURES = {"acoustic": 5, "visual": 3}


def _two_streams(b: int, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Clips with no zero frame (randn + 5) at full length: a zero is a dropped stream's."""
    g = torch.Generator().manual_seed(seed)
    return {
        name: (torch.randn(b, t, f, generator=g) + 5.0, torch.full((b,), t))
        for (name, f), t in zip(FEATURES.items(), (6, 4), strict=True)
    }


def _dropped(before, after) -> torch.Tensor:
    """(B, streams) bool: which streams of each clip were zeroed; asserts nothing is zeroed in
    part (a stream is whole or all zero) and that lengths never change."""
    out = []
    for name, (x, lengths) in before.items():
        y, new_lengths = after[name]
        assert torch.equal(new_lengths, lengths)
        zero = (y == 0).flatten(1).all(1)
        kept = (y == x).flatten(1).all(1)
        assert bool((zero ^ kept).all()), f"{name}: a clip's stream zeroed in part"
        out.append(zero)
    return torch.stack(out, dim=1)


def test_modality_dropout_zeroes_one_whole_stream_of_about_p_of_the_clips():
    batch = _two_streams(6000)
    dropout = StreamDropout(0.3, (Slot("acoustic", "acoustic"), Slot("visual", "visual")))
    dropped = _dropped(batch, dropout(batch, torch.Generator().manual_seed(0)))
    assert int(dropped.sum(1).max()) == 1  # never both streams of a clip
    assert dropped.any(1).float().mean().item() == pytest.approx(0.3, abs=0.02)  # sd 0.006
    per_stream = dropped.float().mean(0).tolist()  # the stream chosen uniformly
    assert per_stream == pytest.approx([0.15, 0.15], abs=0.015)


def test_modality_dropout_is_deterministic_per_seed():
    batch = _two_streams(200)
    dropout = StreamDropout(0.5, (Slot("acoustic", "acoustic"), Slot("visual", "visual")))

    def drops(seed: int) -> torch.Tensor:
        return _dropped(batch, dropout(batch, torch.Generator().manual_seed(seed)))

    assert torch.equal(drops(1), drops(1))
    assert not torch.equal(drops(1), drops(2))


def test_early_fusion_drops_the_columns_of_one_stream_as_the_fused_frames_hold_them(tiny_splits):
    """The slots come from the feature spec; the fused clips say where each stream really is."""
    streams = ["acoustic", "visual"]
    fused = trained.model_inputs(tiny_splits.train, "early", streams)["early"]
    feature_spec = spec.build(tiny_splits, "early", streams, {"early": fused.n_features})
    (a, v) = slots("early", feature_spec)
    assert (a, v) == (Slot("acoustic", "early", (0, 5)), Slot("visual", "early", (5, 8)))
    clip = fused[0]
    np.testing.assert_array_equal(clip[:, a.columns[0] : a.columns[1]], tiny_splits.train.mfcc[0])
    stretched = align.stretch_frames(tiny_splits.train.aus[0], len(clip))
    np.testing.assert_array_equal(clip[:, v.columns[0] : v.columns[1]], stretched)

    x = torch.randn(400, 7, 8) + 5.0
    batch = {"early": (x, torch.full((400,), 7))}
    y = StreamDropout(0.5, (a, v))(batch, torch.Generator().manual_seed(0))["early"][0]
    parts = {"acoustic": (x[..., :5], y[..., :5]), "visual": (x[..., 5:], y[..., 5:])}
    dropped = _dropped(
        {k: (p[0], batch["early"][1]) for k, p in parts.items()},
        {k: (p[1], batch["early"][1]) for k, p in parts.items()},
    )
    assert int(dropped.sum(1).max()) == 1 and 150 < int(dropped.any(1).sum()) < 250


@pytest.mark.parametrize("modality", ["acoustic", "visual", "late"])
def test_modality_dropout_on_a_single_stream_modality_is_one_config_error(modality):
    with pytest.raises(ConfigError) as e:
        options.check({"modality_dropout": 0.3}, modality)
    message = str(e.value)
    assert "trainer.modality_dropout=0.3" in message and "early,joint,xattn" in message
    assert f"not modality={modality}" in message and "\n" not in message
    options.check({"modality_dropout": 0.0}, modality)  # off: fine everywhere


@pytest.mark.parametrize("p", [-0.1, 1.5, "half", True])
def test_modality_dropout_must_be_a_probability(p):
    with pytest.raises(ConfigError, match="must be a probability"):
        options.check({"modality_dropout": p}, "joint")


def test_an_unknown_sampler_is_one_config_error_naming_the_valid_ones():
    with pytest.raises(ConfigError, match=r"trainer.sampler='weighted': valid: shuffle, balanced"):
        options.check({"sampler": "weighted"}, "early")


# ---------------------------------------------------------------------------------------------
# In the training loop


class Recorder(nn.Module):
    """A joint model that notes, per forward pass, whether it trained and which streams of
    which clips were all zero."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = JointClassifier(FEATURES, 3, lambda f: BiLSTMEncoder(f, (4,), 0.0), 8, 0.0)
        self.seen: list[tuple[bool, torch.Tensor]] = []

    def forward(self, inputs):  # type: ignore[no-untyped-def]
        zero = torch.stack([(inputs[s][0] == 0).flatten(1).all(1) for s in FEATURES], dim=1)
        self.seen.append((self.training, zero))
        return self.model(inputs)


def _set(n: int, seed: int) -> SequenceSet:
    """Two streams of full-length clips with no zero frame; labels 0 (most), 1, 2."""
    g = torch.Generator().manual_seed(seed)
    streams = {}
    for (name, f), t in zip(FEATURES.items(), (6, 4), strict=True):
        frames = (torch.randn(n * t, f, generator=g) + 5.0).numpy()
        streams[name] = Ragged(frames, np.arange(n + 1, dtype=np.int64) * t, t)
    y = torch.tensor([0, 0, 0, 0, 1, 1, 2, 0] * (n // 8))
    return SequenceSet(streams, y, tuple(f"c{i}" for i in range(n)))


def _fit(model: nn.Module, out: Path, opts: options.Options, epochs: int = 2, **kw) -> loop.History:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=0)
    settings = loop.Settings(max_epochs=epochs, batch_size=8, device="cpu", precision="fp32", progress=False)
    history = loop.fit(
        model, optimizer, scheduler, _set(32, 0), _set(16, 1), settings, out, 5, {}, options=opts, **kw
    )
    history.rows = [{k: v for k, v in r.items() if k != "seconds"} for r in history.rows]
    return history


SLOTS = (Slot("acoustic", "acoustic"), Slot("visual", "visual"))


def test_fit_drops_streams_in_training_batches_only_never_at_validation(tmp_path):
    model = Recorder()
    _fit(model, tmp_path, options.Options(modality_dropout=1.0, dropout=StreamDropout(1.0, SLOTS)))
    train = torch.cat([z for training, z in model.seen if training])
    val = torch.cat([z for training, z in model.seen if not training])
    assert len(train) == 2 * 32 and len(val) == 2 * 16
    assert bool((train.sum(1) == 1).all())  # p=1: every training clip lost exactly one stream
    assert not bool(val.any())  # validation: never


def test_val_loss_uses_the_class_weights_and_picks_the_best_epoch_by_them(tmp_path):
    weights = (0.5, 2.0, 4.0)
    model = Recorder()
    history = _fit(model, tmp_path, options.Options(class_weights=weights), epochs=3)
    val = _set(16, 1)
    prob = batching.predict_proba(model, val, 16, torch.device("cpu"), torch.float32)
    y = val.y.numpy()
    by_hand = sum(weights[c] * -math.log(prob[i, c]) for i, c in enumerate(y)) / sum(weights[c] for c in y)
    assert history.best["val/loss"] == pytest.approx(by_hand, rel=1e-5)  # the restored best weights


def test_a_resumed_run_with_every_option_on_ends_as_the_uninterrupted_one(tmp_path):
    weights = options.Options(
        modality_dropout=0.5,
        class_weights=(1.0, 2.0, 3.0),
        sampler="balanced",
        dropout=StreamDropout(0.5, SLOTS),
    )
    whole = _fit(Recorder(), tmp_path / "whole", weights, epochs=3)

    def stop(row: dict[str, float]) -> None:
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _fit(Recorder(), tmp_path / "cut", weights, epochs=3, on_epoch=stop)
    resumed = _fit(Recorder(), tmp_path / "cut", weights, epochs=3, resume=True)
    assert resumed.rows == whole.rows
    best = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")["model"]
    for name, tensor in load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["model"].items():
        assert torch.equal(tensor, best[name]), name
    plain = _fit(Recorder(), tmp_path / "plain", options.Options(), epochs=3)
    assert plain.rows != whole.rows  # the options did change the training


def test_options_resolve_from_the_trainer_config_against_the_data():
    rng = np.random.default_rng(0)
    train = make_split("train", 24, rng)
    splits = Splits(train, make_split("val", 6, rng), make_split("test", 6, rng), NOTEBOOK_CLASS_NAMES, "t")
    feature_spec = spec.build(splits, "joint", ["acoustic", "visual"], {"acoustic": 5, "visual": 3})
    trainer = {"modality_dropout": 0.25, "class_weights": "balanced", "sampler": "balanced"}
    opts = options.resolve(trainer, "joint", train.labels, NOTEBOOK_CLASS_NAMES, feature_spec)
    assert opts.record() == {"modality_dropout": 0.25, "class_weights": [1.0] * 6, "sampler": "balanced"}
    assert opts.dropout is not None and opts.dropout.slots == SLOTS
    default = options.resolve({}, "acoustic", train.labels, NOTEBOOK_CLASS_NAMES, feature_spec)
    assert default == options.Options()  # nothing set: the plain recipe

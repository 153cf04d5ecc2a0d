import logging
import math
import re
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SignalWhenPickled, bilstm, inputs, padded_set
from mer_cli.core import allocator
from mer_cli.core.errors import ConfigError
from mer_cli.runs.late import fuse_and_report
from mer_cli.training import batching, loop


def _set(n=40, t=20, f=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, t + 1, (n,), generator=g)
    y = torch.arange(n) % 3
    x = torch.randn(n, t, f, generator=g) + y[:, None, None].float()  # learnable: mean = class
    x = x * (torch.arange(t)[None, :] < lengths[:, None])[:, :, None]
    return padded_set(x, lengths, y)


@pytest.mark.parametrize("bucket", [True, False])
def test_every_clip_is_in_exactly_one_batch_per_epoch(bucket):
    lengths = torch.randint(1, 100, (1003,))
    batches = batching.batch_indices(lengths, 32, torch.Generator().manual_seed(0), bucket, pool_batches=4)
    seen = torch.cat(batches)
    assert sorted(seen.tolist()) == list(range(1003))
    assert max(len(b) for b in batches) == 32


def test_batches_are_deterministic_per_seed_and_reshuffled_every_epoch():
    lengths = torch.randint(1, 100, (300,))

    def epochs(seed):
        g = torch.Generator().manual_seed(seed)
        return [[b.tolist() for b in batching.batch_indices(lengths, 16, g, True, 4)] for _ in range(2)]

    first, second = epochs(7)
    assert epochs(7) == [first, second]
    assert first != second  # a new order every epoch
    assert epochs(8)[0] != first


def test_bucketing_pads_less_than_random_batches():
    lengths = torch.randint(40, 357, (2000,), generator=torch.Generator().manual_seed(0))

    def padded_frames(bucket):
        batches = batching.batch_indices(lengths, 128, torch.Generator().manual_seed(0), bucket, 32)
        return sum(int(lengths[b].max()) * len(b) for b in batches)

    useful = int(lengths.sum())
    assert padded_frames(True) < 1.25 * useful < 1.5 * useful < padded_frames(False)


def _fit(tmp_path: Path, epochs: int, seed: int = 0, meta: dict | None = None, **options):
    torch.manual_seed(seed)
    model = bilstm(3, 3, hidden_sizes=(6,), dense_size=8, dropout=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.8, patience=3, min_lr=3e-5)
    settings = loop.Settings(
        max_epochs=epochs, batch_size=8, progress=False, device="cpu", precision="fp32", **options
    )
    history = loop.fit(
        model,
        opt,
        sched,
        _set(),
        _set(seed=1),
        settings,
        tmp_path,
        seed=seed,
        checkpoint_meta=meta or {"note": "test"},
    )
    return model, history


def test_fit_learns_restores_the_best_epoch_and_checkpoints_it(tmp_path):
    model, history = _fit(tmp_path, epochs=6)
    assert len(history.rows) == 6
    assert list(history.rows[0]) == list(loop.HISTORY_COLUMNS)
    best = min(history.rows, key=lambda r: r["val/loss"])
    assert history.best_epoch == best["epoch"]
    assert best["val/accuracy"] > 0.5  # three well-separated classes
    prob = batching.predict_proba(model, _set(seed=1), 64, torch.device("cpu"), torch.float32)
    y = _set(seed=1).y.numpy()
    val_loss = float(-np.log(prob[np.arange(len(y)), y]).mean())
    assert math.isclose(val_loss, best["val/loss"], rel_tol=1e-5)  # best weights restored
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["epoch"] == history.best_epoch and saved["note"] == "test"
    assert (tmp_path / "last.pt").exists()


def test_ctrl_c_while_the_best_checkpoint_is_written_still_leaves_that_epochs_last_pt(tmp_path):
    """checkpoint.pt and last.pt are one unit: a Ctrl-C that lands while epoch 1's best weights
    are being written takes effect once its last.pt is in place too, so the run can resume."""
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path, epochs=3, meta={"trigger": SignalWhenPickled(signal.SIGINT)})
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["epoch"] == 1
    assert torch.load(tmp_path / "last.pt", weights_only=False)["epoch"] == 1


def test_early_stopping_stops_after_patience_epochs_without_improvement(tmp_path):
    _, history = _fit(tmp_path, epochs=60, patience_epochs=2)
    assert history.stopped_early
    assert len(history.rows) == history.best_epoch + 2


def test_same_seed_same_history(tmp_path):
    _, a = _fit(tmp_path / "a", epochs=3, seed=3)
    _, b = _fit(tmp_path / "b", epochs=3, seed=3)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(a.rows) == strip(b.rows)


def test_unknown_settings_are_rejected():
    with pytest.raises(TypeError):
        loop.Settings(max_epoch=3)  # typo
    with pytest.raises(Exception, match="valid: auto, cpu, cuda"):
        loop.Settings(device="gpu")


def test_train_step_lowers_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = bilstm(3, 2, hidden_sizes=(8,), dense_size=8, dropout=0.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    x, lengths = torch.randn(16, 5, 3), torch.full((16,), 5)
    y = (x[:, :, 0].mean(1) > 0).long()
    loss_fn = torch.nn.CrossEntropyLoss()
    losses = [
        loop.train_step(model, optimizer, scaler, loss_fn, inputs(x, lengths), y, torch.float32)[0].item()
        for _ in range(30)
    ]
    assert losses[-1] < 0.5 * losses[0]


def test_bucketed_batches_change_membership_between_epochs_even_in_one_pool():
    # one pool holds the whole epoch: without length jitter every epoch would repeat the batches
    lengths = torch.randint(100, 380, (840,), generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    first, second = (
        {frozenset(b.tolist()) for b in batching.batch_indices(lengths, 128, g, True, 32)} for _ in range(2)
    )
    assert len(first & second) == 0


def test_inference_batches_cover_every_clip_once_longest_first_and_predictions_keep_data_order():
    lengths = torch.randint(5, 400, (1000,), generator=torch.Generator().manual_seed(0))
    batches = batching.inference_batches(lengths, max_batch=128)
    assert sorted(torch.cat(batches).tolist()) == list(range(1000))
    assert all(len(b) <= 128 for b in batches)
    assert torch.equal(lengths[torch.cat(batches)], lengths.sort(descending=True).values)
    # more, shorter batches than the minimum 8: padding is cut where it costs more than overhead
    padded = sum(len(b) * int(lengths[b].max()) for b in batches)
    minimal = sum(len(b) * int(lengths[b].max()) for b in lengths.argsort(descending=True).split(128))
    assert len(batches) > 8 and padded < minimal

    # predictions come back in the data's order whatever the batching: same as one clip at a time
    torch.manual_seed(0)
    model = bilstm(3, 4, hidden_sizes=(5,), dense_size=8, dropout=0.0)
    data = _set(n=40, seed=2)
    together = batching.predict_proba(model, data, 16, torch.device("cpu"), torch.float32)
    one_by_one = batching.predict_proba(model, data, 1, torch.device("cpu"), torch.float32)
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)


def test_late_fusion_refuses_members_that_predicted_different_clips_before_fitting_a_weight(tmp_path):
    from mer_cli.core.errors import MerError
    from mer_cli.runs.outputs import Predictions

    def preds(split, ids):
        return Predictions(split, tuple(ids), np.zeros(len(ids), dtype=np.int64), np.full((len(ids), 2), 0.5))

    acoustic = {s: preds(s, ["a", "b", "c"]) for s in ("val", "test")}
    visual = {"val": preds("val", ["a", "b"]), "test": preds("test", ["a", "b", "c"])}
    with pytest.raises(MerError, match="val predictions are for different clips"):
        fuse_and_report(
            "weighted",
            None,
            {"acoustic": acoustic, "visual": visual},
            {},
            ("x", "y"),
            tmp_path,
            0,
            "test data",
        )
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("bucket", [True, False])
@pytest.mark.parametrize("n", [129, 1025, 2, 3])
def test_no_batch_holds_a_single_clip(n, bucket):
    # 129 = 128 + 1 (a leftover clip without buckets), 1,025 = 8 x 128 + 1 (a leftover pool of one)
    lengths = torch.randint(1, 300, (n,), generator=torch.Generator().manual_seed(n))
    batches = batching.batch_indices(lengths, 128, torch.Generator().manual_seed(0), bucket, pool_batches=8)
    assert sorted(torch.cat(batches).tolist()) == list(range(n))
    assert min(len(b) for b in batches) >= 2
    assert max(len(b) for b in batches) == min(n, 129 if n % 128 == 1 else 128)


@pytest.mark.parametrize("bucket", [True, False])
def test_training_on_one_more_clip_than_a_whole_batch_works(tmp_path, bucket):
    torch.manual_seed(0)
    model = bilstm(3, 3, hidden_sizes=(4,), dense_size=8, dropout=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=3)
    settings = loop.Settings(
        max_epochs=1, batch_size=16, bucket_by_length=bucket, bucket_batches=2, progress=False, device="cpu"
    )
    train_set = _set(n=33)  # 2 x 16 + 1: the last clip used to form a batch of its own
    history = loop.fit(model, opt, sched, train_set, _set(seed=1), settings, tmp_path, 0, {})
    assert len(history.rows) == 1
    assert math.isfinite(history.rows[0]["train/loss"])


def test_a_batch_size_of_one_is_refused_with_one_line():
    with pytest.raises(ConfigError, match=r"trainer.loop.batch_size=1: must be at least 2"):
        loop.Settings(batch_size=1)


def _keras_plateau_lrs(losses, lr, factor, patience, min_lr):
    """Keras' ReduceLROnPlateau rule, written out: the LR in force after each epoch."""
    best, wait, out = math.inf, 0, []
    for loss in losses:
        if loss < best:
            best, wait = loss, 0
        else:
            wait += 1
            if wait >= patience:
                lr, wait = max(lr * factor, min_lr), 0
        out.append(lr)
    return out


def test_the_lr_is_cut_on_the_third_epoch_without_a_better_val_loss_as_in_keras():
    losses = [1.0, 0.9, 0.95, 0.95, 0.95, 0.95, 0.95, 0.95, 0.5, 0.6, 0.6, 0.6, 0.4]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = loop.PlateauScheduler(opt, patience_epochs=3, factor=0.5, min_lr=0.01, threshold=0.0)
    lrs = []
    for loss in losses:
        sched.step(loss)
        lrs.append(opt.param_groups[0]["lr"])
    # epochs 3, 4, 5 without a better loss: cut after the 5th; again after the 8th and the 12th
    assert lrs == [1, 1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.25, 0.125, 0.125]
    assert lrs == _keras_plateau_lrs(losses, 1.0, 0.5, 3, 0.01)


def test_early_stopping_and_the_lr_schedule_count_patience_the_same_way(tmp_path):
    # the optimizer moves a parameter outside the model, so val/loss never improves after epoch 1
    torch.manual_seed(0)
    model = bilstm(3, 3, hidden_sizes=(4,), dense_size=8, dropout=0.1)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = loop.PlateauScheduler(opt, patience_epochs=3, factor=0.8)
    settings = loop.Settings(max_epochs=50, batch_size=8, patience_epochs=5, progress=False, device="cpu")
    history = loop.fit(model, opt, sched, _set(), _set(seed=1), settings, tmp_path, 0, {})
    # epoch 1 is the best; the 3rd epoch after it cuts the LR, the 5th stops training
    assert [r["lr"] for r in history.rows] == [1.0, 1.0, 1.0, 1.0, 0.8, 0.8]
    assert history.stopped_early and history.best_epoch == 1


def test_the_first_batch_wait_counts_from_the_process_start_once_then_from_each_training(
    tmp_path, monkeypatch, caplog
):
    # a launcher's worker process runs job after job: its second training must not report the
    # seconds since the worker started as its own wait
    monkeypatch.setattr(loop, "_fits_in_process", 0)
    monkeypatch.setattr(loop, "process_seconds", lambda: 5000.0)
    with caplog.at_level(logging.INFO, logger="mer_cli.training.loop"):
        _fit(tmp_path / "a", epochs=1)
        _fit(tmp_path / "b", epochs=1)
    waits = [r.getMessage() for r in caplog.records if r.getMessage().startswith("first training batch")]
    assert waits[0] == "first training batch ready 5000.0 s after the process started"
    second = re.fullmatch(r"first training batch ready ([\d.]+) s after this training started", waits[1])
    assert second is not None and float(second.group(1)) < 60


def test_a_training_logs_its_own_heap_trims_not_the_worker_process_total(tmp_path, monkeypatch, caplog):
    # a launcher's worker already trimmed 40 times for earlier jobs; this training trims every step
    monkeypatch.setattr(allocator, "trims", 40)

    def trim_every_step() -> bool:
        allocator.trims += 1
        return True

    monkeypatch.setattr(allocator, "relieve", trim_every_step)
    with caplog.at_level(logging.INFO, logger="mer_cli.training.loop"):
        _fit(tmp_path, epochs=2)
    steps = allocator.trims - 40
    assert steps > 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("malloc:")]
    assert lines == [f"malloc: freed heap pages given back {steps} times (more than 2 GiB kept free)"]

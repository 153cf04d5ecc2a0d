"""An interrupted run resumed from last.pt ends exactly as an uninterrupted one (CPU, same seed)."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import STREAM, bilstm, main_command, run_main, start, wait_for
from mer_cli.core.artifacts import load_checkpoint
from mer_cli.data import synthetic
from mer_cli.preprocess import sequences
from mer_cli.training import loop

EPOCHS = 4


def _sets() -> tuple[sequences.SequenceSet, sequences.SequenceSet]:
    splits = synthetic.generate(synthetic.Spec(n_actors=8, clips_per_actor_per_class=1)).limit(24)
    preps = {STREAM: sequences.fit(list(splits.train.aus), percentile=95, normalize=True)}
    train_set, val_set = (
        sequences.apply(preps, {STREAM: list(s.aus)}, s.labels, s.clip_ids)
        for s in (splits.train, splits.val)
    )
    return train_set, val_set


def _fit(out_dir: Path, init_seed: int, resume: bool = False, stop_after: int | None = None) -> loop.History:
    """The pipeline's pieces at toy size; ``stop_after``: Ctrl-C right after that epoch."""
    torch.manual_seed(init_seed)  # a resumed run must not depend on how its model was initialised
    train_set, val_set = _sets()
    model = bilstm(train_set.n_features[STREAM], 6, hidden_sizes=(8,), dense_size=16, dropout=0.5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    # mode max, patience 0: the LR halves after every epoch whose val/loss fell, so the
    # scheduler's state (best value, bad-epoch count, LR) must survive the interruption
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=0)
    settings = loop.Settings(
        max_epochs=EPOCHS, batch_size=8, patience_epochs=3, device="cpu", precision="fp32", progress=False
    )

    def interrupt(row: dict[str, float]) -> None:
        if row["epoch"] == stop_after:
            raise KeyboardInterrupt

    history = loop.fit(
        model,
        optimizer,
        scheduler,
        train_set,
        val_set,
        settings,
        out_dir,
        seed=7,
        checkpoint_meta={},
        resume=resume,
        on_epoch=interrupt if stop_after else None,
    )
    history.rows = [{k: v for k, v in r.items() if k != "seconds"} for r in history.rows]
    return history


pytestmark = pytest.mark.usefixtures("one_thread")


def test_resume_after_an_interruption_matches_an_uninterrupted_run_bit_for_bit(tmp_path):
    whole = _fit(tmp_path / "whole", init_seed=0)
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path / "cut", init_seed=0, stop_after=2)
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["epoch"] == 2
    resumed = _fit(tmp_path / "cut", init_seed=123, resume=True)

    assert resumed.rows == whole.rows  # losses, accuracies, ROC-AUC and lr of every epoch
    assert len(whole.rows) == EPOCHS
    assert len({r["lr"] for r in whole.rows}) > 1  # the schedule did act
    assert (resumed.best_epoch, resumed.stopped_early) == (whole.best_epoch, whole.stopped_early)
    best_whole = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")["model"]
    best_resumed = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["model"]
    for name, tensor in best_whole.items():
        assert torch.equal(tensor, best_resumed[name]), name


def test_resuming_a_run_that_stopped_early_trains_no_further_epoch(tmp_path):
    first = _fit(tmp_path / "run", init_seed=0)
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    state["bad_epochs"] = 3  # as if the last epoch had triggered the early stop
    torch.save(state, tmp_path / "run" / "last.pt")
    again = _fit(tmp_path / "run", init_seed=0, resume=True)
    assert again.stopped_early
    assert again.rows == first.rows


# ---------------------------------------------------------------------------------------------
# As a user does it: Ctrl-C, then the same command with resume=true


ARGS = (
    "experiment=smoke",
    "runtime.num_threads=1",  # tiny model: one thread is fastest, even on a busy machine
    "modality=visual",
    "runtime.save_plots=false",
    # enough epochs (0.1 s each on 2 cores) that Ctrl-C after the first one lands mid-training
    "trainer.loop.max_epochs=20",
    "trainer.loop.patience_epochs=20",
)


def _interrupt_after_first_epoch(run_dir: Path, signum: int) -> tuple[int, str]:
    """Start mer-train, send ``signum`` once its first epoch is saved (polling a file, not timing)."""
    proc = start(main_command("train", *ARGS, f"hydra.run.dir={run_dir}"))
    try:
        wait_for(proc, run_dir / "last.pt")
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    return proc.returncode, stderr


@pytest.mark.slow
def test_ctrl_c_or_kill_then_resume_gives_the_metrics_of_an_uninterrupted_run(tmp_path):
    whole = run_main("train", *ARGS, f"hydra.run.dir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr
    m_whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert m_whole["run"]["epochs_trained"] == 20

    for name, signum in (("ctrl_c", signal.SIGINT), ("kill", signal.SIGTERM)):
        run_dir = tmp_path / name
        code, stderr = _interrupt_after_first_epoch(run_dir, signum)
        assert code == 130, stderr
        assert stderr.strip().endswith(
            f"to resume, run the same command with resume=true hydra.run.dir={run_dir}"
        )
        assert load_checkpoint(run_dir / "last.pt")["epoch"] < 20
        assert not (run_dir / "metrics.json").exists()

        if name == "ctrl_c":
            again = run_main("train", *ARGS, f"hydra.run.dir={run_dir}")
            assert again.returncode == 2  # never overwrites a started run by accident
            assert "already holds a run (last.pt): add resume=true" in again.stderr
            other = run_main("train", *ARGS, "seed=1", "resume=true", f"hydra.run.dir={run_dir}")
            assert other.returncode == 2
            assert "resume=true: the settings differ from the run" in other.stderr
            assert "seed: 0 -> 1" in other.stderr

        resumed = run_main("train", *ARGS, "resume=true", f"hydra.run.dir={run_dir}")
        assert resumed.returncode == 0, resumed.stderr
        m_resumed = json.loads((run_dir / "metrics.json").read_text())
        assert m_resumed["val"] == m_whole["val"]
        assert m_resumed["test"] == m_whole["test"]
        assert m_resumed["run"]["epochs_trained"] == 20
        assert not list(run_dir.rglob("*.tmp"))  # atomic writes leave no temporary files behind


@pytest.mark.slow
def test_resume_auto_starts_fresh_then_continues_a_killed_run_with_the_same_metrics(tmp_path):
    """resume=auto, as a requeued cluster job runs: an empty directory starts a run; after kill -9
    (no handler runs, nothing is cleaned up) the same command continues it from last.pt."""
    auto = (*ARGS, "resume=auto")
    whole = run_main("train", *auto, f"hydra.run.dir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr
    m_whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert "resuming from" not in (tmp_path / "whole" / "train.log").read_text()

    run_dir = tmp_path / "killed"
    proc = start(main_command("train", *auto, f"hydra.run.dir={run_dir}"), stderr=subprocess.DEVNULL)
    try:
        wait_for(proc, run_dir / "last.pt")
        proc.kill()  # SIGKILL
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "metrics.json").exists()

    other = run_main("train", *auto, "seed=1", f"hydra.run.dir={run_dir}")
    assert other.returncode == 2  # another model's run is never trained over
    assert "resume=auto: the settings differ from the run" in other.stderr

    again = run_main("train", *auto, f"hydra.run.dir={run_dir}")
    assert again.returncode == 0, again.stderr
    assert "resuming from" in (run_dir / "train.log").read_text()
    m_again = json.loads((run_dir / "metrics.json").read_text())
    assert m_again["val"] == m_whole["val"]
    assert m_again["test"] == m_whole["test"]
    assert m_again["run"]["epochs_trained"] == 20

    # the training time is the epochs' own, whichever session ran them: a resumed run counts the
    # epochs before the kill, and a finished run resumed again (re-evaluated) keeps its time
    def epochs_seconds(run: Path) -> float:
        rows = (run / "history.csv").read_text().splitlines()
        col = rows[0].split(",").index("seconds")
        return sum(float(r.split(",")[col]) for r in rows[1:])

    assert m_again["run"]["train_seconds"] == pytest.approx(epochs_seconds(run_dir), abs=0.01)
    assert m_whole["run"]["train_seconds"] == pytest.approx(epochs_seconds(tmp_path / "whole"), abs=0.01)
    rerun = run_main("train", *auto, f"hydra.run.dir={tmp_path / 'whole'}")
    assert rerun.returncode == 0, rerun.stderr
    m_rerun = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert m_rerun["test"] == m_whole["test"]
    assert m_rerun["run"]["train_seconds"] == m_whole["run"]["train_seconds"] > 0

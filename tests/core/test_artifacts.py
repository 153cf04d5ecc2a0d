"""Atomic writes survive an interruption that arrives in the middle of them."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from conftest import SignalWhenPickled
from mer_cli.core import console
from mer_cli.core.artifacts import atomic_open, load_checkpoint, save_checkpoint


@pytest.fixture
def sigterm_as_ctrl_c():
    """mer-train's own SIGTERM handler, restored afterwards."""
    before = signal.getsignal(signal.SIGTERM)
    console.stop_on_sigterm()
    yield
    signal.signal(signal.SIGTERM, before)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_torch_save_waits_for_the_checkpoint_to_be_complete(
    tmp_path, signum, sigterm_as_ctrl_c
):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1, "weights": torch.zeros(3)})
    state = {"epoch": 2, "weights": torch.arange(1000.0), "trigger": SignalWhenPickled(signum)}

    with pytest.raises(KeyboardInterrupt):  # the interruption still takes effect, after the write
        save_checkpoint(path, state)

    saved = load_checkpoint(path)  # the new checkpoint, whole and loadable
    assert saved["epoch"] == 2
    assert torch.equal(saved["weights"], torch.arange(1000.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary file left
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_ctrl_c_in_the_middle_of_a_text_write_lands_after_the_file_is_in_place(tmp_path):
    path = tmp_path / "metrics.json"
    with pytest.raises(KeyboardInterrupt), atomic_open(path) as f:
        f.write("first half, ")
        os.kill(os.getpid(), signal.SIGINT)
        f.write("second half")  # without the deferral, KeyboardInterrupt is raised before this
    assert path.read_text() == "first half, second half"


def test_a_write_that_fails_after_a_signal_leaves_no_file_and_still_stops(tmp_path):
    path = tmp_path / "history.csv"
    with pytest.raises(KeyboardInterrupt), atomic_open(path) as f:
        f.write("epoch\n")
        os.kill(os.getpid(), signal.SIGINT)
        raise OSError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_signals_outside_a_write_act_at_once():
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):  # the handler runs within a few bytecodes
            pass

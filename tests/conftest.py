"""Shared helpers: hand-built Splits and a way to run the console scripts in a subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mer_cli.data.dataset import NOTEBOOK_CLASS_NAMES, Split, Splits
from mer_cli.models.encoders.rnn import BiLSTMEncoder
from mer_cli.models.heads import Classifier
from mer_cli.preprocess.streams import Ragged, SequenceSet

# tiny tensors: one thread avoids OpenMP spin-waiting on a busy 2-core machine
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _ctrl_c_raises_keyboard_interrupt():  # type: ignore[no-untyped-def]
    """Every test sees Python's own Ctrl-C handler, as a terminal's mer-train does. A test run
    started in the background (`cmd &`, nohup, some CI runners) inherits SIGINT ignored, and Python
    then installs no handler: the tests that signal themselves would see nothing happen."""
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def make_split(
    name: str,
    n: int,
    rng: np.random.Generator,
    n_classes: int = 6,
    d_a: int = 5,
    d_v: int = 3,
    prefix: str = "",
) -> Split:
    labels = np.arange(n) % n_classes
    return Split(
        name=name,
        clip_ids=tuple(f"{prefix}{name}_{i}" for i in range(n)),
        mfcc=tuple(rng.standard_normal((int(rng.integers(5, 30)), d_a)).astype(np.float32) for _ in range(n)),
        aus=tuple(rng.standard_normal((int(rng.integers(2, 10)), d_v)).astype(np.float32) for _ in range(n)),
        labels=labels.astype(np.int64),
    )


@pytest.fixture
def tiny_splits() -> Splits:
    rng = np.random.default_rng(0)
    return Splits(
        make_split("train", 24, rng),
        make_split("val", 12, rng),
        make_split("test", 12, rng),
        class_names=NOTEBOOK_CLASS_NAMES,
        source="tiny",
    )


def run_cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m mer_cli <args>`` as a user would run the console script."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "mer_cli", *args],
        cwd=cwd or REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_cli(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    """Start ``python -m mer_cli <args>`` in the background as a foreground console script runs:
    stdout discarded, stderr piped, SIGINT at its default (a background job inherits it ignored),
    for tests that signal a run."""
    return subprocess.Popen(
        [sys.executable, "-m", "mer_cli", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


STREAM = "x"  # the input stream of the hand-built sets and models below


def bilstm(
    n_features: int,
    n_classes: int,
    hidden_sizes: tuple[int, ...] = (512, 256),
    dense_size: int = 512,
    dropout: float = 0.8,
    masking: str = "reverse",
) -> Classifier:
    """A BiLSTM classifier reading the stream ``STREAM`` (the notebook's sizes by default)."""
    return Classifier(
        {STREAM: n_features},
        n_classes,
        lambda f: BiLSTMEncoder(f, hidden_sizes, dropout, masking),
        dense_size=dense_size,
        dropout=dropout,
    )


def padded_set(x: torch.Tensor, lengths: torch.Tensor, y: torch.Tensor) -> SequenceSet:
    """A one-stream ``SequenceSet`` from padded frames (B, T, F): clip i keeps ``x[i, :lengths[i]]``."""
    clips = [x[i, : int(n)].numpy() for i, n in enumerate(lengths)]
    offsets = np.concatenate([[0], np.cumsum([len(c) for c in clips])]).astype(np.int64)
    frames = np.concatenate(clips).astype(np.float32)
    ids = tuple(f"c{i}" for i in range(len(clips)))
    return SequenceSet({STREAM: Ragged(frames, offsets, int(x.shape[1]))}, y, ids)


def inputs(x: torch.Tensor, lengths: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A batch of one stream as a model's input."""
    return {STREAM: (x, lengths)}

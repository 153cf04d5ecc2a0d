"""Run directories: each run claims its own, atomically, and holds it while it runs; and the one
definition of which model a run is (`model_identity`).

Light on purpose (no torch, no Hydra): the console entry points import it before anything else.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from mer_cli.errors import MerError

LOCK_NAME = ".lock"
# what Hydra and the pipeline write before any training: a run directory holding nothing else
# was stopped (by bad input or an interruption) before it had anything worth keeping
SETUP_ONLY = frozenset({".hydra", "train.log", "config.yaml", LOCK_NAME})
_claimed: dict[str, Path] = {}


def claim(path: str) -> str:
    """Create a new directory ``path``, or ``path_2``, ``path_3``, ... when that name is taken.

    ``mkdir`` is exclusive, so two runs started in the same second never share a directory (a
    check-then-create would race). The default ``hydra.run.dir`` goes through this (the
    ``claim_dir`` resolver); Hydra resolves it several times per run, so one process gets the
    same answer for the same ``path``.
    """
    if path in _claimed:
        return str(_claimed[path])
    base = Path(path)
    base.parent.mkdir(parents=True, exist_ok=True)
    candidate, n = base, 1
    while True:
        try:
            candidate.mkdir()
            break
        except FileExistsError:
            n += 1
            candidate = base.with_name(f"{base.name}_{n}")
    _claimed[path] = candidate
    return str(candidate)


class RunDirBusy(MerError):
    """Another process holds the run directory: nothing of it may be touched."""


@contextlib.contextmanager
def hold(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir/.lock`` (an advisory ``flock``) while the block runs.

    A second run pointed at the same directory (the same explicit ``hydra.run.dir``) fails with
    one line instead of writing over the first. The kernel drops the lock when the process
    ends, however it ends, so a killed run never leaves a stale lock behind.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirBusy(
                f"{run_dir} is in use by another mer-train process: wait for it, or choose "
                "another hydra.run.dir"
            ) from None
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


@contextlib.contextmanager
def wait_and_hold(lock_path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an ``flock`` on ``lock_path`` while the block runs, waiting first for any other process
    that holds it (``on_wait`` is called then). Released however the holder ends, as in `hold`."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)  # Ctrl-C still interrupts the wait
        yield
    finally:
        os.close(fd)


def remove_if_nothing_trained(run_dir: Path) -> None:
    """Remove ``run_dir`` if it holds only set-up files: a failed start leaves no half-made run."""
    if not run_dir.is_dir() or any(p.name not in SETUP_ONLY for p in run_dir.iterdir()):
        return
    for p in run_dir.iterdir():
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    run_dir.rmdir()


def started() -> list[Path]:
    """This process's run directories: those it claimed, and an explicit ``hydra.run.dir=``
    on its command line (Hydra forgets its output dir when a job ends, however it ends)."""
    dirs = list(_claimed.values())
    for arg in sys.argv[1:]:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+") == "hydra.run.dir" and value:
            dirs.append(Path(value).expanduser())
    return dirs


# ---------------------------------------------------------------------------------------------
# Which model is this run


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config dict as ``{"trainer.loop.max_epochs": 100, ...}`` (flat input stays as is)."""
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


# how a run executed, where it was tracked, what happens after it, whether it was resumed, which
# search trial it was: never part of a model (data.cache*: where generated clips are kept, never
# which clips)
_NOT_IDENTITY = re.compile(r"^(runtime|logger|compare|hydra|search)\.|^(resume|search)$|^data\.cache(_dir)?$")
# which run of a model: runs that differ only here are the same model (a comparison's samples)
RUN_KEYS = ("seed", "cv.fold")
# where late fusion read its members from: the members' own identities decide, not their paths
_MEMBER_SOURCES = re.compile(r"^modality\.\w+_run$")
_SINGLE_MODALITY_KEYS = ("modality.name", "modality.streams")
# late fusion before modality.combiner: its acoustic_weight (0.5, a number, or "fit") in today's keys
_LATE_BEFORE_COMBINER = {0.5: ("mean", None), "fit": ("weighted", None)}


def model_identity(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The one answer to "which model is this": the resolved config (nested or flattened) without
    run-time knobs (``runtime.*``), the tracker (``logger.*``), report settings, ``resume``, where
    late fusion's members came from, and the keys that tell one run of the model from another
    (seed, CV fold). The comparison report groups runs by it; `run_identity` adds seed and fold
    for the sweep's reuse of trained runs and the resume check."""
    flat = flatten(cfg)
    # only late fusion reads modality options beyond these: a stray one elsewhere (a sweep-wide
    # ++modality.acoustic_weight=...) changes nothing a single model learns
    single = flat.get("modality.name") != "late"
    if not single and "modality.combiner" not in flat:  # a late run from before combiners
        weight = flat.get("modality.acoustic_weight", 0.5)
        combiner, weight = _LATE_BEFORE_COMBINER.get(weight, ("mean", weight))
        flat = {**flat, "modality.combiner": combiner, "modality.acoustic_weight": weight}
    if not single and flat.get("modality.acoustic_weight") == 0.5:
        flat = {**flat, "modality.acoustic_weight": None}  # equal weights either way
    if "preprocess.normalize" in flat:  # a run from before scaling options was standardized
        scaling = flat.get("preprocess.scaling", "standard") if flat["preprocess.normalize"] else None
        flat = {**flat, "preprocess.scaling": scaling}  # unscaled: the scaling option changes nothing
    if "preprocess.length_percentile" in flat:  # a run from before zero frames could be skipped
        flat.setdefault("preprocess.skip_zero_frames", False)
    if str(flat.get("model.encoder._target_", "")).endswith(".TransformerEncoder"):
        # before attention_dropout was its own key, the encoder's dropout acted on the attention
        # weights too: such a run resumes only with +model.encoder.attention_dropout=<its dropout>
        flat.setdefault("model.encoder.attention_dropout", flat.get("model.encoder.dropout"))
    return {
        k: v
        for k, v in flat.items()
        if not _NOT_IDENTITY.match(k)
        and k not in RUN_KEYS
        and not _MEMBER_SOURCES.match(k)
        and not (single and k.startswith("modality.") and k not in _model_options(flat))
    }


# the jointly trained fusions' modality options (pipeline.STREAM_MODELS): they change the model
_JOINT_OPTIONS: dict[str, tuple[str, ...]] = {
    "joint": ("modality.ogm_alpha", "modality.ogm_noise"),
    "xattn": ("modality.ogm_alpha", "modality.ogm_noise", "modality.attention_heads"),
}


def _model_options(flat: Mapping[str, Any]) -> tuple[str, ...]:
    """The ``modality`` keys a single model's identity keeps (its name, streams, joint options)."""
    return _SINGLE_MODALITY_KEYS + _JOINT_OPTIONS.get(str(flat.get("modality.name")), ())


def run_identity(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """`model_identity` plus seed and CV fold: two configs with equal run identities train the
    very same weights (on the same hardware)."""
    flat = flatten(cfg)
    return {**model_identity(flat), **{k: flat.get(k) for k in RUN_KEYS}}


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``key: old -> new`` for every key whose value differs (a missing key reads as None)."""
    return [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in sorted(old.keys() | new.keys())
        if old.get(k) != new.get(k)
    ]

"""glibc malloc settings applied at start-up, so ``mer-train`` typed directly runs as fast as
``make run`` without exporting anything.

Why: every training step allocates and frees a few oneDNN LSTM workspaces of tens to hundreds of
MB (about 3 KB per clip x frame, for each LSTM layer and direction). glibc mmaps every block above
32 MB and unmaps it on ``free``, so each step page-faults and zeroes them anew: training 1.2-1.6x
slower (docs/memory.md). Keeping big blocks in the heap (``M_MMAP_MAX=0``) and not trimming it
(``M_TRIM_THRESHOLD``) removes that cost: the setting the Makefile used to export as
``GLIBC_TUNABLES``, now applied by the tool itself. Its price is memory: the heap fragments
(2.15-2.44 GiB peak for a default run, which needs 1.15 GiB). Where memory matters more,
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (glibc reads it at process start only, so it must be in
the environment) gave 1.0 GiB, 16-18 % slower (docs/memory.md has the trade-off).

The heap is bounded, though: after every training step `relieve` gives the freed pages back when
it holds more than 2 GiB of freed memory (``malloc_trim``). A default run never gets there; a big
model does (the notebook's 512/256 BiLSTM grew to 13 GiB by its fifth epoch without the bound,
and two such sweep jobs were killed for memory on a 24 GiB machine).

``configure()`` is called once, first thing, by the entry points (mer-train, mer-evaluate,
mer-bench). It does nothing where:
- the C library is not glibc (macOS, musl): nothing to tune;
- ``MER_MALLOC=system``: glibc's own defaults (least memory, slower training);
- the user set glibc's malloc themselves (``GLIBC_TUNABLES`` with a ``glibc.malloc.`` entry, or
  one of the ``MALLOC_*_`` variables): theirs is kept, untouched.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Mapping

log = logging.getLogger(__name__)

SWITCH = "MER_MALLOC"  # tuned (default) | system
CHOICES = ("tuned", "system")

# mallopt parameter numbers (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4

# name -> (mallopt parameter, value); the names are glibc.malloc.<name> tunables with the same effect
TUNED = {
    "mmap_max": (M_MMAP_MAX, 0),  # no mmap: big blocks come from the heap and stay there
    "trim_threshold": (M_TRIM_THRESHOLD, 2**31 - 1),  # keep up to 2 GiB free at the heap's top
}

# feature extraction (mer-ingest) allocates the other way: a pretrained encoder's activations of
# every clip length, freed after each batch. In the heap they fragment it (mer-ingest with a speech
# encoder: peak RSS 1.16x at 4x the clips, growing ~280 KiB a clip); blocks from 64 KiB mmapped and
# unmapped on free keep it flat (1.04x; docs/benchmarks.md, feature extraction)
PROFILES = {
    "train": TUNED,
    "extract": {"mmap_threshold": (M_MMAP_THRESHOLD, 65536)},
}

# glibc's environment variables for the same knobs (the user's own setting wins)
USER_VARIABLES = (
    "MALLOC_ARENA_MAX",
    "MALLOC_ARENA_TEST",
    "MALLOC_MMAP_MAX_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_TRIM_THRESHOLD_",
)

# the most freed heap memory kept for reuse after a training step (`relieve`): the heap's top
# never keeps more than this either (trim_threshold above)
KEEP_FREE = TUNED["trim_threshold"][1]

_applied: dict[str, int] | None = None
_reason = "not configured yet"
_libc: ctypes.CDLL | None = None  # set where the tuned setting is applied and glibc counts its heap
trims = 0  # how many times `relieve` gave freed pages back (this process)


class _Mallinfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (2.33+): the heap's counters, in bytes, over every arena."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def user_setting(environ: Mapping[str, str]) -> str | None:
    """The user's own malloc setting in ``environ`` (a description), or None."""
    tunables = [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t.startswith("glibc.malloc.")]
    if tunables:
        return "GLIBC_TUNABLES=" + ":".join(tunables)
    for name in USER_VARIABLES:
        if environ.get(name, "") != "":
            return f"{name}={environ[name]}"
    return None


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (AttributeError where the C library is not glibc)
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def configure(environ: Mapping[str, str] | None = None, profile: str = "train") -> dict[str, int]:
    """Apply the tuned malloc settings of ``profile`` (`PROFILES`: train, the module's docstring;
    extract, for mer-ingest); returns what was applied, ``{}`` where nothing was. Only the first
    call acts: later ones return the first's result."""
    global _applied, _reason, _libc
    if _applied is not None:
        return dict(_applied)
    env = os.environ if environ is None else environ
    choice = env.get(SWITCH, "tuned").strip().lower() or "tuned"
    _applied = {}
    if choice not in CHOICES:
        _reason = f"{SWITCH}={choice!r} is not one of {', '.join(CHOICES)}: glibc's defaults"
        log.warning("%s", _reason)
    elif choice == "system":
        _reason = f"{SWITCH}=system: glibc's defaults"
    elif (user := user_setting(env)) is not None:
        _reason = f"the user's own setting kept: {user}"
    elif (libc := _glibc()) is None:
        _reason = "not glibc: the C library's defaults"
    else:
        for name, (param, value) in PROFILES[profile].items():
            if libc.mallopt(param, value) == 1:  # mallopt returns 1 on success
                _applied[name] = value
        if _applied and hasattr(libc, "mallinfo2"):  # glibc >= 2.33
            libc.mallinfo2.restype = _Mallinfo2
            _libc = libc
        _reason = f"tuned ({profile}): " + ", ".join(f"{k}={v}" for k, v in _applied.items())
    log.info("malloc: %s", _reason)
    return dict(_applied)


def relieve(keep_free: int = KEEP_FREE) -> bool:
    """Where the tuned heap holds more than ``keep_free`` bytes of freed memory, give the freed
    pages back to the system (``malloc_trim``); returns whether it did. Called after every
    training step: the tuned heap keeps big blocks for reuse, but blocks of changing sizes
    fragment it, and with a big model (the notebook's 512/256 BiLSTM: ~1 GiB LSTM workspaces) it
    grew to 3-4x what a step needs, 13 GiB by the fifth epoch (docs/memory.md). Below the bound,
    as in a default run, it never trims: the speed of keeping blocks is kept."""
    if _libc is None or _libc.mallinfo2().fordblks <= keep_free:  # fordblks: freed bytes, every arena
        return False
    global trims
    _libc.malloc_trim(0)
    trims += 1
    return True


def describe() -> str:
    """One line: what ``configure`` did and why (for logs and the bench's rows)."""
    return _reason

"""The entry points set glibc's malloc at start-up (mer_cli.allocator), unless switched off or the
user set malloc themselves.

Each case starts a fresh interpreter (malloc settings are per process and set once), replaces what
the entry point would do next with a probe, and asks glibc whether a 64 MiB block came from
``mmap`` (``mallinfo2().hblkhd``): glibc's default mmaps it, the tuned setting takes it from the
heap. A probe, not a getter: it fails if the entry point stops calling ``allocator.configure``.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from mer_cli import allocator


def _has_mallinfo2() -> bool:
    try:
        libc = ctypes.CDLL(None)
        return hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallinfo2")
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not _has_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2)")

PROBE = """
import ctypes, json, os, sys

def big_block_is_mmapped():
    libc = ctypes.CDLL(None)
    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
    libc.mallinfo2.restype = Info
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    before = libc.mallinfo2().hblkhd
    block = libc.malloc(64 << 20)
    mmapped = libc.mallinfo2().hblkhd - before >= 64 << 20
    libc.free(block)
    return mmapped

def report(*args, **kwargs):
    from mer_cli import allocator
    print(json.dumps({"mmapped": big_block_is_mmapped(), "why": allocator.describe()}), flush=True)
    os._exit(0)

from mer_cli import bench, cli, pipeline
pipeline.run = pipeline.evaluate_run = bench.run_all = report
entry = sys.argv[1]
sys.argv = [f"mer-{entry}", *sys.argv[2:]]
{"train": cli.train_main, "evaluate": cli.evaluate_main, "bench": bench.main}[entry]()
"""

CLEAN = ("GLIBC_TUNABLES", allocator.SWITCH, *allocator.USER_VARIABLES)


def probe(entry: str, tmp_path, **env: str) -> dict:
    full_env = {k: v for k, v in os.environ.items() if k not in CLEAN} | env
    args = {"train": [f"hydra.run.dir={tmp_path / 'run'}"], "evaluate": [str(tmp_path)], "bench": []}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, entry, *args[entry]],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize("entry", ["train", "evaluate", "bench"])
def test_every_entry_point_keeps_big_blocks_in_the_heap(tmp_path, entry):
    result = probe(entry, tmp_path)
    assert result["mmapped"] is False, result["why"]
    assert result["why"].startswith("tuned: mmap_max=0")


def test_mer_malloc_system_keeps_glibcs_defaults(tmp_path):
    result = probe("train", tmp_path, MER_MALLOC="system")
    assert result["mmapped"] is True
    assert "MER_MALLOC=system" in result["why"]


@pytest.mark.parametrize(
    "env",
    [
        {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=4194304"},
        {"MALLOC_MMAP_THRESHOLD_": "4194304"},
    ],
)
def test_the_users_own_malloc_setting_is_kept(tmp_path, env):
    # the user's threshold of 4 MiB mmaps the 64 MiB block; the tuned setting would not
    result = probe("train", tmp_path, **env)
    assert result["mmapped"] is True
    assert result["why"].startswith("the user's own setting kept")


def test_only_malloc_tunables_count_as_the_users_malloc_setting():
    assert allocator.user_setting({"GLIBC_TUNABLES": "glibc.cpu.x86_rep_movsb_threshold=4096"}) is None
    assert allocator.user_setting({"MALLOC_ARENA_MAX": ""}) is None
    tunables = "glibc.cpu.hwcaps=-AVX512F:glibc.malloc.arena_max=2"
    assert allocator.user_setting({"GLIBC_TUNABLES": tunables}) == "GLIBC_TUNABLES=glibc.malloc.arena_max=2"
    assert allocator.user_setting({"MALLOC_ARENA_MAX": "2"}) == "MALLOC_ARENA_MAX=2"

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
import torch

from conftest import REPO
from mer_cli.core import allocator


def _has_mallinfo2() -> bool:
    try:
        libc = ctypes.CDLL(None)
        return hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallinfo2")
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not _has_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2)")

# glibc's malloc, free and heap counters through ctypes: the probes' first lines
LIBC = """
import ctypes, json, os, sys

libc = ctypes.CDLL(None)
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc.mallinfo2.restype = Info
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
"""

PROBE = (
    LIBC
    + """
def big_block_is_mmapped():
    before = libc.mallinfo2().hblkhd
    block = libc.malloc(64 << 20)
    mmapped = libc.mallinfo2().hblkhd - before >= 64 << 20
    libc.free(block)
    return mmapped

def report(*args, **kwargs):
    from mer_cli.core import allocator
    print(json.dumps({"mmapped": big_block_is_mmapped(), "why": allocator.describe()}), flush=True)
    os._exit(0)

sys.path.insert(0, "benchmarks")
import bench
from mer_cli.cli import commands
from mer_cli.runs import evaluate, execute

execute.run = evaluate.evaluate_run = bench.run_all = report
entry = sys.argv[1]
sys.argv = [f"mer-{entry}", *sys.argv[2:]]
{"train": commands.train_main, "evaluate": commands.evaluate_main, "bench": bench.main}[entry]()
"""
)

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
@pytest.mark.slow
def test_every_entry_point_keeps_big_blocks_in_the_heap(tmp_path, entry):
    result = probe(entry, tmp_path)
    assert result["mmapped"] is False, result["why"]
    assert result["why"].startswith("tuned (train): mmap_max=0")


@pytest.mark.slow
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
@pytest.mark.slow
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


FRAGMENTED = """
import ctypes, json, os
from mer_cli.core import allocator

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

allocator.configure()  # tuned: big blocks from the heap, kept when freed
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
# a step's big blocks with small long-lived ones between them (what fragments a training heap)
big, pins = [], []
for _ in range(8):
    block = libc.malloc(64 << 20)
    ctypes.memset(block, 1, 64 << 20)
    big.append(block)
    pins.append(libc.malloc(4096))
for block in big:
    libc.free(block)
held = rss_mib()
under = allocator.relieve(keep_free=1 << 30)  # 512 MiB free: within a 1 GiB bound
after_under = rss_mib()
over = allocator.relieve(keep_free=256 << 20)  # beyond a 256 MiB bound
print(json.dumps({"held": held, "under": under, "after_under": after_under, "over": over,
                  "after_over": rss_mib(), "trims": allocator.trims}))
"""


@pytest.mark.slow
def test_a_heap_holding_more_freed_memory_than_its_bound_gives_the_pages_back(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in CLEAN}
    proc = subprocess.run(
        [sys.executable, "-c", FRAGMENTED], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.splitlines()[-1])
    # the tuned heap keeps the 512 MiB it was given back, and keeps it while within the bound
    assert r["held"] > 512
    assert r["under"] is False and r["after_under"] > r["held"] - 16
    # past the bound its freed pages go back to the system: what a user's `top` sees drops
    assert r["over"] is True and r["trims"] == 1
    assert r["after_over"] < r["held"] - 480


def test_every_training_step_offers_the_heap_a_chance_to_shrink(monkeypatch):
    from mer_cli.training import loop

    calls = []
    monkeypatch.setattr(allocator, "relieve", lambda: calls.append(1) or False)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    grad_scaler = torch.amp.GradScaler("cpu", enabled=False)
    x, y = torch.randn(4, 2, 3), torch.tensor([0, 1, 2, 0])
    for _ in range(3):
        loop.train_step(
            lambda inputs: model(inputs["x"]),
            optimizer,
            grad_scaler,
            torch.nn.CrossEntropyLoss(),
            {"x": x},
            y,
            torch.float32,
        )
    assert len(calls) == 3


EXTRACT_PROBE = (
    LIBC
    + """
from mer_cli.core import allocator

allocator.configure(profile="extract")
# glibc's default: freeing an mmapped 4 MiB block raises its threshold to 4 MiB, so the next 1 MiB
# blocks come from the heap and fragment it; the profile's fixed threshold maps them
libc.free(libc.malloc(4 << 20))
before = libc.mallinfo2().hblkhd
block = libc.malloc(1 << 20)
print(json.dumps({"mmapped": libc.mallinfo2().hblkhd - before >= 1 << 20, "why": allocator.describe()}))
"""
)


@pytest.mark.parametrize("profile", ["extract", "none"])
def test_the_extract_profile_of_mer_ingest_maps_blocks_from_64_kib(profile):
    env = {k: v for k, v in os.environ.items() if k not in CLEAN}
    if profile == "none":
        env[allocator.SWITCH] = "system"
    proc = subprocess.run(
        [sys.executable, "-c", EXTRACT_PROBE], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    if profile == "extract":
        assert result == {"mmapped": True, "why": "tuned (extract): mmap_threshold=65536"}
    else:  # glibc's own dynamic threshold: the block stays in the heap
        assert result["mmapped"] is False

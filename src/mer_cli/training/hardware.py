"""Where and how fast training runs: the device, the autocast precision, CPU threads (physical
cores, split between parallel jobs).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import torch

from mer_cli.core.errors import ConfigError

log = logging.getLogger(__name__)


DEVICES = ("auto", "cpu", "cuda")


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads share one core's LSTM throughput)."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    try:
        cores, cpu = set(), None
        with open("/proc/cpuinfo") as f:
            phys = "0"
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "processor":
                    cpu = int(value)
                elif key == "physical id":
                    phys = value
                elif key == "core id" and cpu in allowed:
                    cores.add((phys, value))
        return max(1, len(cores)) if cores else len(allowed)
    except OSError:
        return max(1, len(allowed))


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("runtime.device=cuda, but no CUDA device is available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 autocast trains and infers faster there, with test metrics within
    seed noise of fp32 (make bench, README). Elsewhere bf16 is emulated and slower: fp32."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, c, lambda: False)()) for c in checks)


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype (float32: no autocast). ``auto``: bf16 where the hardware has it."""
    if name == "fp16" and device.type != "cuda":
        raise ConfigError("trainer.loop.precision=fp16 needs CUDA; use bf16 or fp32 on a CPU")
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager[Any]:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def cpu_threads(parallel_jobs: int = 1) -> int:
    """Torch threads for one of ``parallel_jobs`` jobs sharing this machine: its physical cores
    split evenly, so parallel jobs never oversubscribe the CPU (at least one each)."""
    return max(1, physical_cores() // max(1, parallel_jobs))
